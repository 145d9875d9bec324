//! keybrokerd under systemd's protocols, driven by hand the way systemd drives
//! it: a listening socket passed as fd 3 with `LISTEN_FDS=1` (socket activation),
//! `READY=1` / `RELOADING=1` / `STOPPING=1` on a `NOTIFY_SOCKET` datagram socket,
//! and SIGHUP to reload the config. (scripts/deploy-test.sh repeats the
//! activation with systemd's own `systemd-socket-activate`.)

use std::{
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use keybroker_proto::v1::{ListKeysRequest, SignRequest};
use keybroker_providers::{ecdsa::verify_digest, Sha256Digest};
use tonic::transport::Endpoint;

fn write_key(path: &Path) {
    let (_, der) = keybroker_providers::P256Signer::generate().unwrap();
    std::fs::write(path, keybroker_providers::pem::encode("PRIVATE KEY", &der)).unwrap();
}

fn config(socket: &Path, keys: &[(&str, &Path)]) -> String {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let mut s = format!("[server]\nsocket = \"{}\"\n", socket.display());
    for (alias, path) in keys {
        s += &format!("[keys.{alias}]\nref = \"{}\"\n", path.display());
    }
    s += &format!(
        "[[policy]]\ncallers = [\"uid:{uid}\"]\nkeys = [\"*\"]\nimages = [\"**\"]\nallow_raw_digest = true\n"
    );
    s
}

async fn next_notification(sock: &tokio::net::UnixDatagram) -> String {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), sock.recv(&mut buf))
        .await
        .expect("no notification from keybrokerd within 10 s")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).trim_end().to_string()
}

async fn aliases(c: &mut keybroker_proto::Client) -> Vec<String> {
    c.list_keys(ListKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys
        .into_iter()
        .map(|k| k.alias)
        .collect()
}

/// Kills the daemon if the test fails half-way.
struct Reaper(Option<std::process::Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test]
async fn socket_activation_readiness_and_sighup_reload() {
    let dir = tempfile::tempdir().unwrap();
    let (key_a, key_b) = (dir.path().join("a.pem"), dir.path().join("b.pem"));
    write_key(&key_a);
    write_key(&key_b);
    // The config names a socket path; under activation it must not be bound.
    let configured = dir.path().join("configured.sock");
    let cfg = dir.path().join("keybrokerd.toml");
    std::fs::write(&cfg, config(&configured, &[("a", &key_a)])).unwrap();

    let activated = dir.path().join("activated.sock");
    let listener = std::os::unix::net::UnixListener::bind(&activated).unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = tokio::net::UnixDatagram::bind(&notify_path).unwrap();

    let fd = listener.as_raw_fd();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keybrokerd"));
    cmd.arg("--config")
        .arg(&cfg)
        .env("LISTEN_FDS", "1")
        .env("NOTIFY_SOCKET", &notify_path)
        .env_remove("KEYBROKER_SOCKET")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec: put the
    // listening socket at fd 3 without close-on-exec, as systemd does.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                if libc::fcntl(3, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = Reaper(Some(cmd.spawn().expect("spawn keybrokerd")));
    drop(listener);

    assert_eq!(next_notification(&notify).await, "READY=1");
    assert!(
        !configured.exists(),
        "bound its own socket under activation"
    );
    let path = activated.clone();
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
        .expect("connect to the activated socket");
    let mut c = keybroker_proto::client(channel);
    let sign = |key: &str, d: &Sha256Digest| SignRequest {
        key: key.into(),
        digest: d.as_bytes().to_vec(),
    };
    let d = Sha256Digest::of(b"activated");
    let r = c.sign(sign("a", &d)).await.unwrap().into_inner();
    verify_digest(&r.key.unwrap().public_key_pem, &d, &r.signature).unwrap();
    assert_eq!(aliases(&mut c).await, ["a"]);

    // SIGHUP with a new key: RELOADING=1, then READY=1, then the new key serves
    // on the same connection.
    std::fs::write(&cfg, config(&configured, &[("a", &key_a), ("b", &key_b)])).unwrap();
    let pid = child.0.as_ref().unwrap().id() as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let reloading = next_notification(&notify).await;
    assert!(reloading.starts_with("RELOADING=1"), "{reloading}");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    assert_eq!(next_notification(&notify).await, "READY=1");
    assert_eq!(aliases(&mut c).await, ["a", "b"]);
    let r = c.sign(sign("b", &d)).await.unwrap().into_inner();
    verify_digest(&r.key.unwrap().public_key_pem, &d, &r.signature).unwrap();

    // An invalid config (a key file that does not exist) is rejected: the
    // running keys and policy stay, the daemon stays up.
    std::fs::write(
        &cfg,
        config(&configured, &[("c", &dir.path().join("missing.pem"))]),
    )
    .unwrap();
    unsafe { libc::kill(pid, libc::SIGHUP) };
    assert!(next_notification(&notify).await.starts_with("RELOADING=1"));
    assert_eq!(next_notification(&notify).await, "READY=1");
    assert_eq!(aliases(&mut c).await, ["a", "b"]);
    std::fs::write(&cfg, "this is [not toml").unwrap();
    unsafe { libc::kill(pid, libc::SIGHUP) };
    assert!(next_notification(&notify).await.starts_with("RELOADING=1"));
    assert_eq!(next_notification(&notify).await, "READY=1");
    c.sign(sign("a", &d))
        .await
        .expect("old config still serves");

    // SIGTERM: STOPPING=1 and a clean exit.
    drop(c);
    unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(next_notification(&notify).await, "STOPPING=1");
    let mut c = child.0.take().unwrap();
    let status = tokio::task::spawn_blocking(move || c.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(!configured.exists());
}

#[test]
fn refuses_more_than_one_activated_socket() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keybrokerd"))
        .env("LISTEN_FDS", "2")
        .env("XDG_RUNTIME_DIR", dir.path())
        .env("XDG_DATA_HOME", dir.path())
        .env_remove("KEYBROKER_SOCKET")
        .env_remove("KEYBROKERD_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("passed 2 sockets"), "{err}");
}
