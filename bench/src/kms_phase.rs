//! Phase 4b: an AWS KMS key (moto's server, DIGEST defect corrected) through
//! keybrokerd, next to calling KMS Sign directly with the same SDK and concurrency.

use std::sync::Arc;

use keybroker_proto::v1::SignRequest;
use keybroker_providers::{aws_kms::AwsKmsKey, KeyProvider, Sha256Digest};
use tonic::transport::Channel;

use crate::{closed_loop, row, BoxError, CONNECTIONS};

/// The moto endpoint and the alias the bench creates there.
pub struct Kms {
    pub endpoint: String,
    pub alias: String,
}

impl Kms {
    pub fn from_env() -> Option<Kms> {
        let endpoint = std::env::var("KEYBROKER_TEST_AWS_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty())?;
        Some(Kms {
            endpoint,
            alias: format!("alias/bench-{}", std::process::id()),
        })
    }

    pub async fn create_key(&self) -> Result<(), BoxError> {
        AwsKmsKey::create(Some(&self.endpoint), &self.alias).await?;
        Ok(())
    }

    pub fn key_config(&self) -> String {
        format!(
            "[keys.kms]\nref = \"awskms://{}/{}\"\n",
            self.endpoint, self.alias
        )
    }
}

pub async fn run(kms: &Kms, channels: Arc<Vec<Channel>>) -> Result<(), BoxError> {
    println!("## AWS KMS (moto), direct SDK calls vs through keybrokerd\n");
    println!("| call | in flight | req/s | p50 µs | p99 µs | errors |\n|---|---|---|---|---|---|");
    let direct_key = Arc::new(AwsKmsKey::open(Some(&kms.endpoint), &kms.alias).await?);
    for in_flight in [1usize, 8, 64] {
        let k = direct_key.clone();
        let direct = closed_loop(in_flight, move |i| {
            let k = k.clone();
            async move {
                k.sign_digest(&Sha256Digest::of(&(i as u64).to_le_bytes()))
                    .await
                    .is_ok()
            }
        })
        .await;
        println!(
            "{}",
            row("KMS Sign, direct (aws-sdk-kms)", in_flight, &direct)
        );
        let ch = channels.clone();
        let brokered = closed_loop(in_flight, move |i| {
            let mut c = keybroker_proto::client(ch[i % CONNECTIONS].clone());
            async move {
                let d = Sha256Digest::of(&(i as u64).to_le_bytes());
                c.sign(SignRequest {
                    key: "kms".into(),
                    digest: d.as_bytes().to_vec(),
                })
                .await
                .is_ok()
            }
        })
        .await;
        println!(
            "{}",
            row("Sign via keybrokerd, KMS key", in_flight, &brokered)
        );
        println!(
            "| → broker/direct | {in_flight} | {:.2} | | | |",
            brokered.rate() / direct.rate()
        );
    }
    println!();
    Ok(())
}
