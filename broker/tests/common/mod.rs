//! What the broker's integration tests share: the daemon child that is killed
//! when the test ends, a client on its unix socket, and the rule for tests that
//! need a server (`CI` set: fail when it is missing; else say SKIPPED).

#![allow(dead_code)]

use std::{path::Path, process::Child, time::Duration};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::Endpoint;

/// A running keybrokerd, killed and reaped on drop.
pub struct Daemon(pub Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A KeyBroker client on `socket`, once the daemon accepts there (up to 10 s).
pub async fn client(socket: &Path) -> keybroker_proto::Client {
    let p = socket.to_path_buf();
    for _ in 0..500 {
        if UnixStream::connect(&p).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ch = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = p.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(p).await?)) }
        }))
        .await
        .unwrap();
    keybroker_proto::client(ch)
}

/// The value of a test server's variable; missing: a failure under CI, else
/// SKIPPED (None).
pub fn test_env(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Some(v),
        _ if std::env::var_os("CI").is_some() => {
            panic!("{name} not set: run through scripts/test.sh")
        }
        _ => {
            eprintln!("SKIPPED: {name} not set (run scripts/test.sh)");
            None
        }
    }
}
