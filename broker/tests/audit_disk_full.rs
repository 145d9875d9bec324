//! The audit log's file system fills up under a running keybrokerd: every
//! signing request fails closed (UNAVAILABLE, no signature without its record),
//! and signing resumes by itself once space returns, with one unbroken chain.
//!
//! "Disk full" is real here: the log lives on a small tmpfs mounted for the
//! test (root is needed; CI runs as root) and filled with a filler file.

mod common;

use common::{client, Daemon};

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use keybroker_proto::v1::SignRequest;
use tonic::Code;

/// A tmpfs of `size` at `dir`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .ok()?;
        if out.status.success() {
            Some(Tmpfs(dir.to_path_buf()))
        } else {
            let why = String::from_utf8_lossy(&out.stderr);
            if std::env::var_os("CI").is_some() {
                panic!("cannot mount a tmpfs for the disk-full test: {why}");
            }
            eprintln!("SKIPPED: cannot mount a tmpfs ({why})");
            None
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system at `dir` until it refuses another byte.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let block = vec![0u8; 4096];
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling the tmpfs: {e}"),
        }
    }
    // Small writes too, so not even a partial record fits.
    while f.write(&[0u8]).is_ok_and(|n| n == 1) {}
    filler
}

#[tokio::test]
async fn a_full_audit_disk_fails_closed_and_recovers_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(&dir.path().join("audit"), "256k") else {
        return;
    };
    let log = fs.0.join("audit.jsonl");
    let key = dir.path().join("k.pem");
    let (_, der) = keybroker_providers::P256Signer::generate().unwrap();
    std::fs::write(&key, keybroker_providers::pem::encode("PRIVATE KEY", &der)).unwrap();
    let socket = dir.path().join("a.sock");
    let cfg = dir.path().join("a.toml");
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    std::fs::write(
        &cfg,
        format!(
            "[server]\nsocket = \"{}\"\naudit_log = \"{}\"\n[keys.k]\nref = \"{}\"\n\
             [[policy]]\ncallers = [\"uid:{uid}\"]\nkeys = [\"k\"]\nimages = [\"**\"]\nallow_raw_digest = true\n",
            socket.display(),
            log.display(),
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
    let mut c = client(&socket).await;
    let sign = |n: u8| SignRequest {
        key: "k".into(),
        digest: vec![n; 32],
    };
    let mut signatures = 0;
    for n in 0..3 {
        c.sign(sign(n)).await.expect("signing with space on disk");
        signatures += 1;
    }

    let filler = fill(&fs.0);
    // The log's last page may still have room (tmpfs allocates whole pages):
    // signing goes on until a record no longer fits, which must come soon.
    let mut first_refusal = None;
    for n in 0..64u8 {
        match c.sign(sign(100 + n)).await {
            Ok(_) => signatures += 1,
            Err(e) => {
                first_refusal = Some(e);
                break;
            }
        }
    }
    let e = first_refusal.expect("64 records fitted on a full file system");
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    for n in 10..15 {
        let e = c
            .sign(sign(n))
            .await
            .expect_err("signed without an audit record");
        assert_eq!(e.code(), Code::Unavailable, "{e}");
        assert!(e.message().contains("audit"), "{e}");
    }

    // Space returns: signing resumes without a restart.
    std::fs::remove_file(&filler).unwrap();
    for n in 20..22 {
        c.sign(sign(n)).await.expect("signing after space returned");
        signatures += 1;
    }

    // One unbroken chain, one `allowed` record per signature handed out, and
    // nothing half-written from the failed attempts.
    let text = std::fs::read_to_string(&log).unwrap();
    let mut prev = keybroker_broker::audit::GENESIS.to_string();
    let mut allowed = 0;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("a whole JSON record");
        assert_eq!(v["prev"], prev.as_str(), "chain broken at {line}");
        prev = keybroker_broker::audit::line_hash(line.as_bytes());
        if v["decision"] == "allowed" {
            allowed += 1;
        }
    }
    assert!(text.ends_with('\n'));
    assert_eq!(allowed, signatures, "{text}");
}
