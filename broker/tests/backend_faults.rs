//! A backend that dies under load (OpenBao behind a loopback proxy the test
//! cuts): its key answers UNAVAILABLE with retry advice, quickly once the
//! circuit breaker is open, while another key goes on signing unaffected; when
//! the backend returns, the key works again without a restart.

mod common;

use common::{client, test_env, Daemon};

use std::{
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use keybroker_proto::v1::SignRequest;
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;

/// A TCP proxy to `upstream` that can be cut: while down it closes every
/// connection, open ones included.
async fn proxy(upstream: String, down: Arc<AtomicBool>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = l.accept().await else {
                return;
            };
            if down.load(Ordering::SeqCst) {
                continue; // dropped: the client sees the connection closed
            }
            let upstream = upstream.clone();
            let down = down.clone();
            tokio::spawn(async move {
                let Ok(mut out) = TcpStream::connect(&upstream).await else {
                    return;
                };
                let copy = tokio::io::copy_bidirectional(&mut inbound, &mut out);
                let cut = async {
                    while !down.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                };
                tokio::select! {
                    _ = copy => {}
                    _ = cut => {}
                }
            });
        }
    });
    port
}

fn req(key: &str, n: u8) -> SignRequest {
    SignRequest {
        key: key.into(),
        digest: vec![n; 32],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_backend_fails_fast_leaves_other_keys_alone_and_recovers() {
    let (Some(bao), Some(bao_token)) = (
        test_env("KEYBROKER_TEST_VAULT_ADDR"),
        test_env("KEYBROKER_TEST_VAULT_TOKEN"),
    ) else {
        return;
    };
    let name = format!("faults-{}", std::process::id());
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
    let down = Arc::new(AtomicBool::new(false));
    let upstream = bao.trim_start_matches("http://").to_string();
    let port = proxy(upstream, down.clone()).await;

    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &bao_token).unwrap();
    let key = dir.path().join("k.pem");
    let (_, der) = keybroker_providers::P256Signer::generate().unwrap();
    std::fs::write(&key, keybroker_providers::pem::encode("PRIVATE KEY", &der)).unwrap();
    let socket = dir.path().join("f.sock");
    let cfg = dir.path().join("f.toml");
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    std::fs::write(
        &cfg,
        format!(
            "[server]\nsocket = \"{}\"\n\
             [keys.v]\nref = \"openbao://{name}\"\n[keys.v.vault]\naddress = \"http://127.0.0.1:{port}\"\ntoken_file = \"{}\"\ntimeout_ms = 1000\n\
             [keys.f]\nref = \"{}\"\n\
             [[policy]]\ncallers = [\"uid:{uid}\"]\nkeys = [\"v\", \"f\"]\nimages = [\"**\"]\nallow_raw_digest = true\n",
            socket.display(),
            token_file.display(),
            key.display()
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
    c.clone()
        .sign(req("v", 1))
        .await
        .expect("v while OpenBao is up");
    c.clone().sign(req("f", 1)).await.expect("f");

    // OpenBao goes away. 8 callers keep signing with v for 4 s; one keeps
    // signing with the file key f.
    down.store(true, Ordering::SeqCst);
    // The proxy cuts open connections within 20 ms; wait that out, so no call
    // below can still ride a connection from before.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let until = Instant::now() + Duration::from_secs(4);
    let mut v_tasks = Vec::new();
    for t in 0..8u8 {
        let mut c = c.clone();
        v_tasks.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            while Instant::now() < until {
                let started = Instant::now();
                let r = c.sign(req("v", t)).await;
                outcomes.push((
                    started.elapsed(),
                    r.map(|_| ())
                        .map_err(|e| (e.code(), e.message().to_string())),
                ));
            }
            outcomes
        }));
    }
    let f_task = {
        let mut c = c.clone();
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            let mut n = 0;
            while Instant::now() < until {
                let started = Instant::now();
                c.sign(req("f", 2))
                    .await
                    .expect("the file key failed while OpenBao was down");
                worst = worst.max(started.elapsed());
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (n, worst)
        })
    };
    let mut all = Vec::new();
    for t in v_tasks {
        all.extend(t.await.unwrap());
    }
    let (f_calls, f_worst) = f_task.await.unwrap();
    eprintln!(
        "OpenBao down 4 s: {} calls on v, {} on f (slowest {:?})",
        all.len(),
        f_calls,
        f_worst
    );
    assert!(f_calls > 50, "the file key hardly ran: {f_calls}");
    assert!(
        f_worst < Duration::from_secs(1),
        "file key slowed to {f_worst:?}"
    );
    for (took, r) in &all {
        let (code, msg) = r.as_ref().expect_err("v signed while OpenBao was down");
        assert_eq!(*code, Code::Unavailable, "{msg} after {took:?}");
    }
    // Once the breaker is open, failures are fast and say when to retry: far
    // more calls than the 8 callers could make waiting out timeouts.
    let fast: Vec<_> = all
        .iter()
        .filter(|(took, r)| {
            *took < Duration::from_millis(50)
                && r.as_ref().is_err_and(|(_, m)| m.contains("retry in"))
        })
        .collect();
    assert!(
        fast.len() > 100,
        "only {} fast failures of {}",
        fast.len(),
        all.len()
    );

    // OpenBao is back: v signs again without a restart (after the open period).
    down.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut c = c.clone();
    loop {
        match c.sign(req("v", 3)).await {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e}");
                assert!(Instant::now() < deadline, "v never recovered: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
