//! The fake GitHub and GitLab REST APIs (tests/fakes/*.py) as test fixtures:
//! started on 127.0.0.1 with `--port 0`, killed on drop; and the real
//! `keybroker` binary run against them with a clean environment.
//!
//! Without python3 (or PyNaCl, for the GitHub fake) a test prints SKIPPED and
//! passes, except under CI (`CI` set), where it fails: CI must install them
//! (`pip install pynacl`).

#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
};

/// A running fake, killed on drop. Its stderr (one line per request) goes to a file.
pub struct Fake {
    child: Child,
    pub base: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn python_has(import: &str) -> bool {
    Command::new("python3")
        .arg("-c")
        .arg(format!("import {import}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts `tests/fakes/<script>` with `args`, or `None` (test skipped) when
/// python3 or `needs` (a Python module) is missing outside CI.
pub fn start(script: &str, needs: &str, args: &[&str]) -> Option<Fake> {
    if !python_has(needs) {
        let what =
            format!("python3 with module {needs} (pip install pynacl) for tests/fakes/{script}");
        if std::env::var_os("CI").is_some() {
            panic!("{what} is missing");
        }
        eprintln!("SKIPPED: no {what}");
        return None;
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fakes")
        .join(script);
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("fake.log");
    let mut child = Command::new("python3")
        .arg(&script)
        .args(["--port", "0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start the fake");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("PORT= line");
    let port = line
        .trim()
        .strip_prefix("PORT=")
        .unwrap_or_else(|| panic!("{} printed {line:?}, not PORT=", script.display()))
        .to_string();
    Some(Fake {
        base: format!("http://127.0.0.1:{port}"),
        child,
        log,
        _dir: dir,
    })
}

impl Fake {
    /// Everything the fake logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET a test-only `/_fake/...` endpoint.
    pub async fn control(&self, path: &str) -> serde_json::Value {
        let resp = reqwest::get(format!("{}{path}", self.base))
            .await
            .expect("fake control endpoint");
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        serde_json::from_slice(&resp.bytes().await.expect("body")).expect("JSON")
    }
}

/// Runs the real `keybroker` in `dir` with only `env` of the CI-related
/// variables (the caller's GITHUB_*, GITLAB_*, COSIGN_* are removed).
pub fn keybroker(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keybroker"));
    cmd.args(args).current_dir(dir).stdin(Stdio::null());
    for (k, _) in std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v))) {
        if ["GITHUB_", "GITLAB_", "COSIGN_", "KEYBROKER_"]
            .iter()
            .any(|p| k.starts_with(p))
        {
            cmd.env_remove(&k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("run keybroker")
}

pub fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts that none of `secrets` (nor any long line of them, for PEMs)
/// appears in `text`.
pub fn assert_no_secret(what: &str, text: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(
            !text.contains(s),
            "a secret value appears in {what}:\n{text}"
        );
        for line in s
            .lines()
            .filter(|l| l.len() >= 16 && !l.starts_with("-----"))
        {
            assert!(
                !text.contains(line),
                "a line of a secret PEM appears in {what}:\n{text}"
            );
        }
    }
}
