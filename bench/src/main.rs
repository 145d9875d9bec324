//! keybroker-bench: one run, one machine, every number of docs/PERFORMANCE.md.
//!
//! Starts the real `keybrokerd` (from the same target directory) with a file key,
//! then measures, over its unix socket: the no-op gRPC round trip (health Check,
//! the transport ceiling), raw in-process signing (aws-lc-rs and p256 side by side),
//! `Sign` at 1/8/64 in flight, daemon start-up time and idle RSS; and, when
//! `KEYBROKER_TEST_REGISTRY` names a registry, `keybroker sign` of 100 images.
//! Every phase is bounded in time and count. Prints a Markdown report.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use hyper_util::rt::TokioIo;
use keybroker_proto::v1::SignRequest;
use keybroker_providers::{pem, P256Signer, Sha256Digest};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

mod kms_phase;
mod registry_phase;
mod vault_phase;

/// How long each throughput phase runs.
const PHASE: Duration = Duration::from_secs(3);
/// Hard cap on requests per phase, whatever the machine's speed.
const MAX_REQUESTS: u64 = 2_000_000;
/// HTTP/2 connections the load is spread over.
pub(crate) const CONNECTIONS: usize = 4;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Daemon {
    child: Child,
    socket: PathBuf,
    start_to_serving: Duration,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn sibling_binary(name: &str) -> Result<PathBuf, BoxError> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().ok_or("no exe dir")?.join(name);
    if !path.exists() {
        return Err(format!(
            "{} not found: build it first (scripts/bench.sh does)",
            path.display()
        )
        .into());
    }
    Ok(path)
}

async fn start_daemon(dir: &Path, extra_keys: &str) -> Result<Daemon, BoxError> {
    let key = dir.join("bench.key");
    let (_, der) = P256Signer::generate()?;
    std::fs::write(&key, pem::encode("PRIVATE KEY", &der))?;
    let socket = dir.join("bench.sock");
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let config = dir.join("bench.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nsocket = \"{}\"\nsocket_mode = \"0600\"\n[keys.file]\nref = \"{}\"\n{extra_keys}[[policy]]\ncallers = [\"uid:{uid}\"]\nkeys = [\"*\"]\nimages = [\"**\"]\nallow_raw_digest = true\n",
            socket.display(),
            key.display()
        ),
    )?;
    let started = Instant::now();
    let child = Command::new(sibling_binary("keybrokerd")?)
        .arg("--config")
        .arg(&config)
        .env("KEYBROKER_LOG", "warn")
        .stderr(Stdio::inherit())
        .spawn()?;
    let deadline = started + Duration::from_secs(10);
    while tokio::net::UnixStream::connect(&socket).await.is_err() {
        if Instant::now() > deadline {
            return Err("keybrokerd did not start within 10 s".into());
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    Ok(Daemon {
        child,
        socket,
        start_to_serving: started.elapsed(),
    })
}

async fn channel(socket: &Path) -> Result<Channel, BoxError> {
    let socket = socket.to_path_buf();
    Ok(Endpoint::from_static("http://keybrokerd.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let s = socket.clone();
            async move { tokio::net::UnixStream::connect(s).await.map(TokioIo::new) }
        }))
        .await?)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(|l| l.to_string())
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

/// Result of one closed-loop load phase.
struct Load {
    requests: u64,
    errors: u64,
    elapsed: Duration,
    latencies_us: Vec<u32>,
}

impl Load {
    fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    fn pct(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_us.len() - 1) as f64 * p).round() as usize;
        f64::from(self.latencies_us[i])
    }
}

/// Runs `in_flight` closed loops of `call` for PHASE (or MAX_REQUESTS).
pub(crate) async fn closed_loop<F, Fut>(in_flight: usize, call: F) -> Load
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let call = Arc::new(call);
    let start = Instant::now();
    let per_task = MAX_REQUESTS / in_flight as u64;
    let tasks: Vec<_> = (0..in_flight)
        .map(|i| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(1 << 16);
                let mut errors = 0u64;
                let mut n = 0u64;
                while start.elapsed() < PHASE && n < per_task {
                    let t = Instant::now();
                    if !call(i).await {
                        errors += 1;
                    }
                    lat.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                    n += 1;
                }
                (lat, errors)
            })
        })
        .collect();
    let mut latencies_us = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            latencies_us.extend(l);
            errors += e;
        }
    }
    let elapsed = start.elapsed();
    latencies_us.sort_unstable();
    Load {
        requests: latencies_us.len() as u64,
        errors,
        elapsed,
        latencies_us,
    }
}

fn raw_signing_rate() -> Result<(f64, f64), BoxError> {
    let (signer, der) = P256Signer::generate()?;
    let digest = Sha256Digest::of(b"bench");
    let bound = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_secs(2) && n < 1_000_000 {
            f();
            n += 1;
        }
        n as f64 / start.elapsed().as_secs_f64()
    };
    let aws_lc = bound(&mut || {
        let _ = signer.sign_digest(&digest);
    });
    use p256::{
        ecdsa::{signature::hazmat::PrehashSigner, Signature, SigningKey},
        pkcs8::DecodePrivateKey,
    };
    let sk = SigningKey::from_pkcs8_der(&der)?;
    let p256 = bound(&mut || {
        let _: Result<Signature, _> = sk.sign_prehash(digest.as_bytes());
    });
    Ok((aws_lc, p256))
}

pub(crate) fn row(name: &str, in_flight: usize, l: &Load) -> String {
    format!(
        "| {name} | {in_flight} | {:.0} | {:.0} | {:.0} | {} |",
        l.rate(),
        l.pct(0.50),
        l.pct(0.99),
        l.errors
    )
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), BoxError> {
    let dir = std::env::temp_dir().join(format!("keybroker-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("# keybroker-bench\n");
    println!("machine: {cores} cores; phases of {PHASE:?}, at most {MAX_REQUESTS} requests each\n");

    let (aws_lc, p256) = raw_signing_rate()?;
    println!("## Raw in-process ECDSA P-256 signing (one thread)\n");
    println!("| signer | signs/s |\n|---|---|\n| aws-lc-rs (used) | {aws_lc:.0} |\n| p256 0.13 | {p256:.0} |\n");

    let bao = vault_phase::Bao::from_env();
    if let Some(b) = &bao {
        b.create_key().await?;
    }
    let kms = kms_phase::Kms::from_env();
    if let Some(k) = &kms {
        k.create_key().await?;
    }
    let extra_keys = format!(
        "{}{}",
        bao.as_ref().map(|b| b.key_config()).unwrap_or_default(),
        kms.as_ref().map(|k| k.key_config()).unwrap_or_default()
    );
    let daemon = start_daemon(&dir, &extra_keys).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let idle_rss = rss_kib(daemon.child.id());
    println!(
        "## Daemon\n\n- start to serving (spawn → socket accepts, file key): {:.1} ms",
        daemon.start_to_serving.as_secs_f64() * 1e3
    );
    println!(
        "- idle RSS after start: {:.1} MiB\n",
        idle_rss as f64 / 1024.0
    );

    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(channel(&daemon.socket).await?);
    }
    let channels = Arc::new(channels);

    println!("## Over the unix socket\n");
    println!("| call | in flight | req/s | p50 µs | p99 µs | errors |\n|---|---|---|---|---|---|");
    let mut noop_64 = 0.0;
    for in_flight in [1usize, 64] {
        let ch = channels.clone();
        let l = closed_loop(in_flight, move |i| {
            let mut c = HealthClient::new(ch[i % CONNECTIONS].clone());
            async move {
                c.check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .is_ok()
            }
        })
        .await;
        if in_flight == 64 {
            noop_64 = l.rate();
        }
        println!("{}", row("no-op (health Check)", in_flight, &l));
    }
    let mut sign_64 = 0.0;
    for in_flight in [1usize, 8, 64] {
        let ch = channels.clone();
        let l = closed_loop(in_flight, move |i| {
            let mut c = keybroker_proto::client(ch[i % CONNECTIONS].clone());
            async move {
                let digest = Sha256Digest::of(&(i as u64).to_le_bytes());
                c.sign(SignRequest {
                    key: "file".into(),
                    digest: digest.as_bytes().to_vec(),
                })
                .await
                .is_ok()
            }
        })
        .await;
        if in_flight == 64 {
            sign_64 = l.rate();
        }
        println!("{}", row("Sign, file key", in_flight, &l));
    }
    println!(
        "\nSign/no-op ratio at 64 in flight: {:.2}",
        sign_64 / noop_64
    );
    println!(
        "RSS after load: {:.1} MiB\n",
        rss_kib(daemon.child.id()) as f64 / 1024.0
    );

    match &bao {
        Some(b) => vault_phase::run(b, channels.clone(), &dir).await?,
        None => println!("## Vault\n\nskipped: KEYBROKER_TEST_VAULT_ADDR not set (scripts/bench.sh starts OpenBao)\n"),
    }
    match &kms {
        Some(k) => kms_phase::run(k, channels.clone()).await?,
        None => println!("## AWS KMS\n\nskipped: KEYBROKER_TEST_AWS_ENDPOINT not set (scripts/bench.sh starts moto)\n"),
    }
    match std::env::var("KEYBROKER_TEST_REGISTRY") {
        Ok(registry) if !registry.is_empty() => {
            registry_phase::run(&registry, &daemon.socket, &sibling_binary("keybroker")?).await?;
        }
        _ => println!("## Client\n\nskipped: KEYBROKER_TEST_REGISTRY not set (scripts/bench.sh starts a registry)\n"),
    }
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
