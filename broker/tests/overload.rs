//! Overload: a caller sends 4× the calls in flight its share allows, against a
//! key on the real OpenBao. The excess is answered RESOURCE_EXHAUSTED at once
//! (never queued), every admitted call signs, and another user's calls on the
//! same socket still go through while the noisy one is at its limit (per-caller
//! fairness: the noisy caller holds at most its own share). Figures printed
//! for docs/RELIABILITY.md. Needs root for the second user (it is, here and in CI).

mod common;

use common::{client, test_env, Daemon};

use std::{
    os::unix::fs::PermissionsExt,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use keybroker_proto::v1::SignRequest;
use tonic::Code;

fn pct(v: &mut [Duration], q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excess_load_is_refused_fast_and_other_callers_still_get_through() {
    let (Some(bao), Some(bao_token)) = (
        test_env("KEYBROKER_TEST_VAULT_ADDR"),
        test_env("KEYBROKER_TEST_VAULT_TOKEN"),
    ) else {
        return;
    };
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        assert!(std::env::var_os("CI").is_none(), "CI must run as root");
        eprintln!("SKIPPED: a second user needs root");
        return;
    }
    let cli =
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_keybrokerd")).with_file_name("keybroker");
    if !cli.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{} missing: cargo build --workspace first",
            cli.display()
        );
        eprintln!("SKIPPED: {} not built", cli.display());
        return;
    }
    let name = format!("overload-{}", std::process::id());
    let created = Command::new(env!("CARGO_BIN_EXE_keybrokerd"))
        .args(["--create-key", &format!("openbao://{name}")])
        .env("VAULT_ADDR", &bao)
        .env("VAULT_TOKEN", &bao_token)
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The other user's client: a copy it can execute.
    let their_cli = dir.path().join("keybroker");
    std::fs::copy(&cli, &their_cli).unwrap();
    std::fs::set_permissions(&their_cli, std::fs::Permissions::from_mode(0o755)).unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &bao_token).unwrap();
    let socket = dir.path().join("o.sock");
    let cfg = dir.path().join("o.toml");
    const NOBODY: u32 = 65534;
    const SHARE: usize = 8;
    std::fs::write(
        &cfg,
        format!(
            "[server]\nsocket = \"{}\"\nsocket_mode = \"0666\"\nmax_in_flight_per_caller = {SHARE}\n\
             [keys.v]\nref = \"openbao://{name}\"\n[keys.v.vault]\naddress = \"{bao}\"\ntoken_file = \"{}\"\n\
             [[policy]]\ncallers = [\"uid:0\", \"uid:{NOBODY}\"]\nkeys = [\"v\"]\nimages = [\"**\"]\nallow_raw_digest = true\n",
            socket.display(),
            token_file.display()
        ),
    )
    .unwrap();
    let _d = Daemon(
        Command::new(env!("CARGO_BIN_EXE_keybrokerd"))
            .arg("--config")
            .arg(&cfg)
            .env_remove("KEYBROKER_SOCKET")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let c = client(&socket).await;

    // `callers` concurrent loops for `secs`; returns (ok latencies, refused latencies).
    let run = |callers: usize, secs: u64| {
        let c = c.clone();
        async move {
            let until = Instant::now() + Duration::from_secs(secs);
            let mut tasks = Vec::new();
            for t in 0..callers {
                let mut c = c.clone();
                tasks.push(tokio::spawn(async move {
                    let (mut ok, mut refused) = (Vec::new(), Vec::new());
                    while Instant::now() < until {
                        let started = Instant::now();
                        match c
                            .sign(SignRequest {
                                key: "v".into(),
                                digest: vec![t as u8; 32],
                            })
                            .await
                        {
                            Ok(_) => ok.push(started.elapsed()),
                            Err(e) => {
                                assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
                                assert!(e.message().contains("busy"), "{e}");
                                refused.push(started.elapsed());
                                // A well-behaved client backs off a little.
                                tokio::time::sleep(Duration::from_millis(1)).await;
                            }
                        }
                    }
                    (ok, refused)
                }));
            }
            let (mut ok, mut refused) = (Vec::new(), Vec::new());
            for t in tasks {
                let (o, r) = t.await.unwrap();
                ok.extend(o);
                refused.extend(r);
            }
            (ok, refused)
        }
    };

    // Within the share: nothing refused.
    let (mut ok1, refused1) = run(SHARE, 2).await;
    assert!(
        refused1.is_empty(),
        "{} refused within the share",
        refused1.len()
    );
    // 4× the share, while the other user asks for the public key now and then.
    let other = {
        let socket = socket.clone();
        let their_cli = their_cli.clone();
        tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(500));
            let mut outcomes = Vec::new();
            for _ in 0..5 {
                let started = Instant::now();
                let out = Command::new("setpriv")
                    .arg(format!("--reuid={NOBODY}"))
                    .arg(format!("--regid={NOBODY}"))
                    .arg("--clear-groups")
                    .arg("--")
                    .arg(&their_cli)
                    .arg("--socket")
                    .arg(&socket)
                    .args(["public-key", "--key", "v"])
                    .output()
                    .unwrap();
                outcomes.push((
                    out.status.success(),
                    started.elapsed(),
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                ));
                std::thread::sleep(Duration::from_millis(200));
            }
            outcomes
        })
    };
    let (mut ok4, mut refused4) = run(4 * SHARE, 3).await;
    let other = other.await.unwrap();

    eprintln!(
        "within share ({SHARE} in flight): {} ok, p50 {:?}, p99 {:?}",
        ok1.len(),
        pct(&mut ok1, 0.5),
        pct(&mut ok1, 0.99)
    );
    eprintln!(
        "4x share ({} in flight): {} ok, p50 {:?}, p99 {:?}; {} refused, p50 {:?}, p99 {:?}; other user: {:?}",
        4 * SHARE,
        ok4.len(),
        pct(&mut ok4, 0.5),
        pct(&mut ok4, 0.99),
        refused4.len(),
        pct(&mut refused4, 0.5),
        pct(&mut refused4, 0.99),
        other.iter().map(|(ok, t, _)| (*ok, *t)).collect::<Vec<_>>()
    );
    assert!(!ok4.is_empty(), "nothing admitted at 4x");
    assert!(!refused4.is_empty(), "nothing refused at 4x the share");
    // Refusals are immediate: never slower than the slowest admitted call.
    assert!(
        pct(&mut refused4, 0.99) <= *ok4.iter().max().unwrap(),
        "refusals are queued, not immediate"
    );
    for (ok, took, stderr) in &other {
        assert!(
            ok,
            "the other user was refused while the noisy one was at its limit ({took:?}): {stderr}"
        );
    }
}
