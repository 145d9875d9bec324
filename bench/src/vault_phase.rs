//! Phase 4: a Vault (OpenBao) transit key through keybrokerd, next to calling
//! OpenBao's transit API directly at the same concurrency; then the number of
//! backend calls per signature after warm-up, read from OpenBao's own audit log.

use std::{path::Path, sync::Arc};

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use keybroker_proto::v1::SignRequest;
use keybroker_providers::Sha256Digest;
use tonic::transport::Channel;

use crate::{closed_loop, row, BoxError, CONNECTIONS};

pub struct Bao {
    pub addr: String,
    pub token: String,
    pub key: String,
}

impl Bao {
    pub fn from_env() -> Option<Bao> {
        let addr = std::env::var("KEYBROKER_TEST_VAULT_ADDR")
            .ok()
            .filter(|a| !a.is_empty())?;
        let token = std::env::var("KEYBROKER_TEST_VAULT_TOKEN").ok()?;
        Some(Bao {
            addr,
            token,
            key: format!("bench-{}", std::process::id()),
        })
    }

    async fn post(
        &self,
        http: &reqwest::Client,
        path: &str,
        body: String,
    ) -> Result<reqwest::Response, BoxError> {
        Ok(http
            .post(format!("{}/v1/{path}", self.addr))
            .header("X-Vault-Token", &self.token)
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await?)
    }

    pub async fn create_key(&self) -> Result<(), BoxError> {
        let r = self
            .post(
                &reqwest::Client::new(),
                &format!("transit/keys/{}", self.key),
                r#"{"type":"ecdsa-p256"}"#.into(),
            )
            .await?;
        if !r.status().is_success() {
            return Err(format!("creating transit key: {}", r.status()).into());
        }
        Ok(())
    }

    /// The daemon config stanza for this key.
    pub fn key_config(&self) -> String {
        format!(
            "[keys.vault]\nref = \"openbao://{}\"\n[keys.vault.vault]\naddress = \"{}\"\ntoken_env = \"KEYBROKER_TEST_VAULT_TOKEN\"\n",
            self.key, self.addr
        )
    }
}

pub async fn run(bao: &Bao, channels: Arc<Vec<Channel>>, audit_dir: &Path) -> Result<(), BoxError> {
    println!("## Vault (OpenBao transit), direct vs through keybrokerd\n");
    println!("| call | in flight | req/s | p50 µs | p99 µs | errors |\n|---|---|---|---|---|---|");
    let http = reqwest::Client::new();
    let bao = Arc::new(Bao {
        addr: bao.addr.clone(),
        token: bao.token.clone(),
        key: bao.key.clone(),
    });
    for in_flight in [1usize, 8, 64] {
        let (h, b) = (http.clone(), bao.clone());
        let direct = closed_loop(in_flight, move |i| {
            let (h, b) = (h.clone(), b.clone());
            async move {
                let d = Sha256Digest::of(&(i as u64).to_le_bytes());
                let body = format!(r#"{{"input":"{}","prehashed":true}}"#, B64.encode(d.as_bytes()));
                matches!(b.post(&h, &format!("transit/sign/{}/sha2-256", b.key), body).await, Ok(r) if r.status().is_success())
            }
        })
        .await;
        println!(
            "{}",
            row("OpenBao transit sign, direct HTTP", in_flight, &direct)
        );
        let ch = channels.clone();
        let brokered = closed_loop(in_flight, move |i| {
            let mut c = keybroker_proto::client(ch[i % CONNECTIONS].clone());
            async move {
                let d = Sha256Digest::of(&(i as u64).to_le_bytes());
                c.sign(SignRequest {
                    key: "vault".into(),
                    digest: d.as_bytes().to_vec(),
                })
                .await
                .is_ok()
            }
        })
        .await;
        println!(
            "{}",
            row("Sign via keybrokerd, Vault key", in_flight, &brokered)
        );
        println!(
            "| → broker/direct | {in_flight} | {:.2} | | | |",
            brokered.rate() / direct.rate()
        );
    }

    // Backend calls per signature, counted by OpenBao itself.
    let audit = audit_dir.join("openbao-audit.log");
    let r = bao
        .post(
            &http,
            "sys/audit/bench",
            format!(
                r#"{{"type":"file","options":{{"file_path":"{}"}}}}"#,
                audit.display()
            ),
        )
        .await?;
    if !r.status().is_success() {
        println!(
            "\n(audit device could not be enabled: {}; backend call count skipped)\n",
            r.status()
        );
        return Ok(());
    }
    const N: usize = 200;
    let mut c = keybroker_proto::client(channels[0].clone());
    for i in 0..N {
        let d = Sha256Digest::of(&(i as u64).to_be_bytes());
        c.sign(SignRequest {
            key: "vault".into(),
            digest: d.as_bytes().to_vec(),
        })
        .await?;
    }
    let _ = http
        .delete(format!("{}/v1/sys/audit/bench", bao.addr))
        .header("X-Vault-Token", &bao.token)
        .send()
        .await;
    let log = std::fs::read_to_string(&audit).unwrap_or_default();
    // Our own audit-device calls are logged too; count only what the broker sent.
    let requests: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(r#""type":"request""#) && !l.contains("sys/audit"))
        .collect();
    let signs = requests
        .iter()
        .filter(|l| l.contains("transit/sign/"))
        .count();
    let others = requests.len() - signs;
    println!(
        "\nBackend calls for {N} signatures after warm-up (OpenBao audit log): {signs} transit/sign, {others} other ({:.2} per signature)\n",
        requests.len() as f64 / N as f64
    );
    Ok(())
}
