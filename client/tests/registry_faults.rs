//! Registry faults (issue 12): the real test registry behind
//! `tests/fakes/registry_proxy.py`, which injects 5xx, 429 + Retry-After, slow
//! answers, connections reset mid-upload or after the write, and truncated
//! bodies. The client must retry idempotent steps, write blobs before the
//! manifest, never drop a stored signature, and fail clearly when it gives up.
//! Also checks the proxy's `--referrers` emulation of the OCI 1.1 referrers API.

mod common;

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use keybroker_client::{
    cosign::{append_signature, signature_tag, SignatureLayer},
    registry::{
        client::RetryPolicy, sha256_digest, ImageRef, Registry, RegistryOptions, OCI_MANIFEST,
    },
};
use serde_json::{json, Value};

/// `tests/fakes/registry_proxy.py` as a child process, killed on drop.
struct FaultProxy {
    child: Child,
    /// `127.0.0.1:PORT`, usable as the registry part of an image reference.
    addr: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl FaultProxy {
    /// Starts the proxy in front of `upstream` (`HOST:PORT`) and waits for its port file.
    fn start(upstream: &str, referrers: bool) -> FaultProxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let port_file = dir.path().join("port");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fakes/registry_proxy.py");
        let mut cmd = Command::new("python3");
        cmd.arg(&script)
            .arg("--upstream")
            .arg(format!("http://{upstream}"))
            .args(["--port", "0", "--port-file"])
            .arg(&port_file)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("proxy.log")).expect("proxy log"));
        if referrers {
            cmd.arg("--referrers");
        }
        let mut child = cmd.spawn().expect("start python3 registry_proxy.py");
        let deadline = Instant::now() + Duration::from_secs(15);
        let port = loop {
            if let Ok(s) = std::fs::read_to_string(&port_file) {
                if let Ok(p) = s.trim().parse::<u16>() {
                    break p;
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("registry_proxy.py exited early: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "registry_proxy.py wrote no port file"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        FaultProxy {
            child,
            addr: format!("127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Replaces the fault rules.
    async fn faults(&self, rules: Value) {
        let resp = self
            .http
            .post(self.url("/_proxy/faults"))
            .json(&rules)
            .send()
            .await
            .expect("set faults");
        assert_eq!(
            resp.status(),
            200,
            "{}",
            resp.text().await.unwrap_or_default()
        );
    }

    /// The requests seen since the last clear: method, path, status, fault.
    async fn log(&self) -> Vec<Value> {
        self.http
            .get(self.url("/_proxy/log"))
            .send()
            .await
            .expect("get log")
            .json()
            .await
            .expect("log is JSON")
    }

    async fn clear_log(&self) {
        self.http
            .delete(self.url("/_proxy/log"))
            .send()
            .await
            .expect("clear log");
    }

    /// A registry client that speaks to the proxy.
    fn client(&self, retries: u32) -> Registry {
        Registry::new(RegistryOptions::default())
            .expect("registry client")
            .with_retry_policy(RetryPolicy {
                retries,
                ..RetryPolicy::default()
            })
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The proxy's request log, only when a test failed.
        if std::thread::panicking() {
            if let Ok(log) = std::fs::read_to_string(self._dir.path().join("proxy.log")) {
                eprintln!("--- registry_proxy.py {} ---\n{log}", self.addr);
            }
        }
    }
}

fn broker_config(key: &TestKey) -> String {
    format!(
        "[keys.release]\nref = \"{}\"\n[[policy]]\ncallers = [\"uid:{}\"]\nkeys = [\"release\"]\nimages = [\"127.0.0.1:*/faults/**\"]\n",
        key.key_path.display(),
        uid()
    )
}

/// Everything one fault scenario needs: the registry, a broker, a proxy and a
/// fresh image (pushed straight to the registry) to sign through the proxy.
struct Scene {
    reg: TestRegistry,
    broker: TestBroker,
    proxy: FaultProxy,
    repo: String,
    digest: String,
    _dir: tempfile::TempDir,
}

impl Scene {
    async fn new(repo: &str) -> Option<Scene> {
        let reg = anon_registry()?;
        let dir = tempfile::tempdir().unwrap();
        let key = write_key(dir.path(), "release");
        let broker = TestBroker::start(&broker_config(&key)).await;
        let proxy = FaultProxy::start(&reg.addr, false);
        let digest = reg.push_image(repo, "v1").await;
        Some(Scene {
            reg,
            broker,
            proxy,
            repo: repo.to_string(),
            digest,
            _dir: dir,
        })
    }

    /// The image by tag, reached through the proxy.
    fn image(&self) -> String {
        format!("{}/{}:v1", self.proxy.addr, self.repo)
    }

    /// `keybroker --stats sign IMAGE --key release -a run=N` through the proxy.
    async fn sign(&self, run: &str, env: &[(&str, &str)]) -> std::process::Output {
        let annotation = format!("run={run}");
        // The default policy unless the test says otherwise, whatever the
        // environment running the tests holds.
        let mut env = env.to_vec();
        if !env.iter().any(|(k, _)| *k == "KEYBROKER_REGISTRY_RETRIES") {
            env.push(("KEYBROKER_REGISTRY_RETRIES", "4"));
        }
        keybroker(
            &self.broker.socket,
            &[
                "--stats",
                "sign",
                &self.image(),
                "--key",
                "release",
                "-a",
                &annotation,
            ],
            &env,
        )
        .await
    }

    /// The `.sig` manifest's layers, read from the registry directly (not the proxy).
    async fn sig_layers(&self) -> Vec<Value> {
        let img = ImageRef::parse(&format!("{}/{}", self.reg.addr, self.repo)).unwrap();
        let Some((body, _)) = self
            .reg
            .client()
            .get_manifest(&img, &signature_tag(&self.digest), OCI_MANIFEST)
            .await
            .unwrap()
        else {
            return Vec::new();
        };
        let m: Value = serde_json::from_slice(&body).unwrap();
        m["layers"].as_array().unwrap().clone()
    }

    fn sig_path(&self) -> String {
        format!(
            "/v2/{}/manifests/{}",
            self.repo,
            signature_tag(&self.digest)
        )
    }
}

fn requests_stat(stderr: &str) -> u64 {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("registry requests: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no request count in: {stderr}"))
}

fn entries<'a>(log: &'a [Value], method: &str, path_part: &str) -> Vec<&'a Value> {
    log.iter()
        .filter(|e| e["method"] == method && e["path"].as_str().unwrap_or("").contains(path_part))
        .collect()
}

/// The layer's `run` annotation value from the signed payload.
fn runs(
    layers: &[Value],
    reg: &TestRegistry,
    repo: &str,
) -> impl std::future::Future<Output = Vec<String>> {
    let img = ImageRef::parse(&format!("{}/{repo}", reg.addr)).unwrap();
    let client = reg.client();
    let digests: Vec<String> = layers
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    async move {
        let mut out = Vec::new();
        for d in digests {
            let blob = client.get_blob(&img, &d).await.unwrap();
            let p: Value = serde_json::from_slice(&blob).unwrap();
            out.push(p["optional"]["run"].as_str().unwrap_or("").to_string());
        }
        out
    }
}

#[tokio::test]
async fn two_503s_then_success_costs_two_more_requests() {
    let Some(s) = Scene::new("faults/t503").await else {
        return;
    };
    // Baseline: the request budget of a clean signature.
    let out = s.sign("1", &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let clean = requests_stat(&stderr(&out));
    eprintln!("clean signature: {clean} registry requests");

    s.proxy
        .faults(json!([{"method": "PUT", "path": r"\.sig$", "kind": "status", "status": 503, "times": 2}]))
        .await;
    s.proxy.clear_log().await;
    let out = s.sign("2", &[]).await;
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("HTTP 503"), "{err}");
    assert!(
        err.contains("retry 1 of 4") && err.contains("retry 2 of 4"),
        "{err}"
    );
    assert!(!err.contains("retry 3 of"), "{err}");
    // Retries are requests: the per-image budget grows by exactly the two retries.
    assert_eq!(requests_stat(&err), clean + 2, "{err}");
    let log = s.proxy.log().await;
    let puts = entries(&log, "PUT", &s.sig_path());
    let statuses: Vec<&Value> = puts.iter().map(|e| &e["status"]).collect();
    assert_eq!(statuses, [&json!(503), &json!(503), &json!(201)], "{log:?}");
    let layers = s.sig_layers().await;
    assert_eq!(runs(&layers, &s.reg, &s.repo).await, ["1", "2"]);
}

#[tokio::test]
async fn honours_retry_after_on_429() {
    let Some(s) = Scene::new("faults/t429").await else {
        return;
    };
    s.proxy
        .faults(json!([{"method": "HEAD", "path": "/manifests/v1$", "kind": "status", "status": 429, "retry_after": "1", "times": 1}]))
        .await;
    let client = s.proxy.client(4);
    let img = ImageRef::parse(&s.image()).unwrap();
    let t = Instant::now();
    let digest = client
        .resolve_digest(&img)
        .await
        .expect("resolves after the 429");
    let waited = t.elapsed();
    assert_eq!(digest, s.digest);
    assert!(
        waited >= Duration::from_secs(1),
        "did not wait for Retry-After: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "waited far longer than Retry-After: {waited:?}"
    );
    assert_eq!(client.request_count(), 2);
    eprintln!("429 + Retry-After: 1 → resolved in {waited:?}");

    // An HTTP-date Retry-After two seconds ahead is honoured too (to the second).
    let at = std::time::SystemTime::now() + Duration::from_secs(2);
    s.proxy
        .faults(json!([{"method": "HEAD", "path": "/manifests/v1$", "kind": "status", "status": 503, "retry_after": http_date(at), "times": 1}]))
        .await;
    let t = Instant::now();
    client
        .resolve_digest(&img)
        .await
        .expect("resolves after the 503");
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    eprintln!("503 + Retry-After: <date +2 s> → resolved in {waited:?}");

    // A Retry-After beyond the cap is cut to the cap (1 s here), not obeyed.
    let capped = Registry::new(RegistryOptions::default())
        .unwrap()
        .with_retry_policy(RetryPolicy {
            retries: 1,
            max_retry_after: Duration::from_secs(1),
            ..RetryPolicy::default()
        });
    s.proxy
        .faults(json!([{"method": "HEAD", "path": "/manifests/v1$", "kind": "status", "status": 429, "retry_after": "3600", "times": 1}]))
        .await;
    let t = Instant::now();
    capped.resolve_digest(&img).await.expect("resolves");
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` for a time (the test's own, independent formatter).
fn http_date(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 1;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    // Civil date by counting (plain and slow, fine for a test).
    let (mut y, mut d) = (1970u64, days);
    loop {
        let len = if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 {
            366
        } else {
            365
        };
        if d < len {
            break;
        }
        d -= len;
        y += 1;
    }
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let months = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let names = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let mut m = 0;
    while d >= months[m] {
        d -= months[m];
        m += 1;
    }
    format!(
        "{weekday}, {:02} {} {y} {:02}:{:02}:{:02} GMT",
        d + 1,
        names[m],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[tokio::test]
async fn reset_mid_blob_upload_restarts_from_post() {
    let Some(s) = Scene::new("faults/treset").await else {
        return;
    };
    s.proxy
        .faults(json!([{"method": "PUT", "path": "/blobs/uploads/", "kind": "reset", "times": 1}]))
        .await;
    let out = s.sign("1", &[]).await;
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("uploading blob sha256:") && err.contains("retry 1 of"),
        "{err}"
    );
    let log = s.proxy.log().await;
    let seq: Vec<(String, Value)> = log
        .iter()
        .filter(|e| e["path"].as_str().unwrap().contains("/blobs/uploads/"))
        .map(|e| {
            (
                e["method"].as_str().unwrap().to_string(),
                e["status"].clone(),
            )
        })
        .collect();
    // POST, PUT (reset), then a fresh POST and PUT — not a PUT to the dead session.
    assert_eq!(
        seq[..4],
        [
            ("POST".to_string(), json!(202)),
            ("PUT".to_string(), Value::Null),
            ("POST".to_string(), json!(202)),
            ("PUT".to_string(), json!(201)),
        ],
        "{log:?}"
    );
    assert_eq!(s.sig_layers().await.len(), 1);
}

#[tokio::test]
async fn slow_answer_under_the_timeout_is_not_a_fault() {
    let Some(s) = Scene::new("faults/tslow").await else {
        return;
    };
    s.proxy
        .faults(
            json!([{"method": "GET", "path": r"\.sig$", "kind": "slow", "delay": 2.0, "times": 1}]),
        )
        .await;
    let t = Instant::now();
    let out = s.sign("1", &[]).await;
    let took = t.elapsed();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("retry"), "a slow answer was retried: {err}");
    assert!(took >= Duration::from_secs(2), "{took:?}");
    eprintln!("sign with one 2 s answer took {took:?}");
    assert_eq!(s.sig_layers().await.len(), 1);
}

#[tokio::test]
async fn truncated_bodies_are_fetched_again() {
    let Some(s) = Scene::new("faults/ttrunc").await else {
        return;
    };
    let out = s.sign("1", &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));

    // The CLI: the .sig manifest read is cut in half once.
    s.proxy
        .faults(json!([{"method": "GET", "path": r"\.sig$", "kind": "truncate", "times": 1}]))
        .await;
    s.proxy.clear_log().await;
    let out = s.sign("2", &[]).await;
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("retry 1 of"), "{err}");
    let log = s.proxy.log().await;
    let gets = entries(&log, "GET", &s.sig_path());
    assert_eq!(gets[0]["fault"], "truncate", "{log:?}");
    assert_eq!(gets[1]["status"], 200, "{log:?}");
    let layers = s.sig_layers().await;
    assert_eq!(runs(&layers, &s.reg, &s.repo).await, ["1", "2"]);

    // The library: a manifest by digest and a blob, each cut once, come back whole.
    let client = s.proxy.client(4);
    let img = ImageRef::parse(&s.image()).unwrap();
    s.proxy
        .faults(json!([
            {"method": "GET", "path": "/manifests/sha256:", "kind": "truncate", "times": 1},
            {"method": "GET", "path": "/blobs/sha256:", "kind": "truncate", "times": 1},
        ]))
        .await;
    let (body, _) = client
        .get_manifest(&img, &s.digest, OCI_MANIFEST)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sha256_digest(&body), s.digest);
    let layer = layers[0]["digest"].as_str().unwrap();
    let blob = client.get_blob(&img, layer).await.unwrap();
    assert_eq!(sha256_digest(&blob), layer);
    assert_eq!(client.request_count(), 4);

    // Retries off: a truncated body is an error that says so.
    let once = s.proxy.client(0);
    s.proxy
        .faults(
            json!([{"method": "GET", "path": "/blobs/sha256:", "kind": "truncate", "times": 1}]),
        )
        .await;
    let e = once.get_blob(&img, layer).await.unwrap_err().to_string();
    assert!(e.contains("1 attempt (retries disabled)"), "{e}");
    assert!(
        e.contains("reading the body") || e.contains("cut short"),
        "{e}"
    );
}

#[tokio::test]
async fn a_fault_that_never_stops_fails_clearly_and_drops_nothing() {
    let Some(s) = Scene::new("faults/tdead").await else {
        return;
    };
    for run in ["1", "2"] {
        let out = s.sign(run, &[]).await;
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let before = s.sig_layers().await;
    assert_eq!(before.len(), 2);

    // Blob uploads always 503: the client gives up and writes no manifest.
    s.proxy
        .faults(
            json!([{"method": "POST", "path": "/blobs/uploads/", "kind": "status", "status": 503}]),
        )
        .await;
    s.proxy.clear_log().await;
    let t = Instant::now();
    let out = s.sign("3", &[("KEYBROKER_REGISTRY_RETRIES", "2")]).await;
    let took = t.elapsed();
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "signing succeeded against a dead registry: {err}"
    );
    assert_eq!(out.status.code(), Some(1));
    let last = err
        .lines()
        .find(|l| l.contains("failed after"))
        .unwrap_or("");
    assert!(
        last.contains("uploading blob sha256:")
            && last.contains("failed after 3 attempts")
            && last.contains("last error: POST /v2/faults/tdead/blobs/uploads/: HTTP 503"),
        "{err}"
    );
    eprintln!("gave up after {took:?}: {last}");
    let log = s.proxy.log().await;
    assert_eq!(entries(&log, "POST", "/blobs/uploads/").len(), 3, "{log:?}");
    assert!(
        entries(&log, "PUT", "/manifests/").is_empty(),
        "a manifest was written after a failed blob upload: {log:?}"
    );
    assert_eq!(s.sig_layers().await, before);

    // Connections reset on every manifest PUT: blobs are in, the manifest is
    // not, and the signatures already stored are all still there.
    s.proxy
        .faults(json!([{"method": "PUT", "path": r"\.sig$", "kind": "reset"}]))
        .await;
    s.proxy.clear_log().await;
    let out = s.sign("4", &[("KEYBROKER_REGISTRY_RETRIES", "1")]).await;
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("PUT {} failed after 2 attempts", s.sig_path())),
        "{err}"
    );
    let log = s.proxy.log().await;
    assert_eq!(entries(&log, "PUT", &s.sig_path()).len(), 2, "{log:?}");
    let layers = s.sig_layers().await;
    assert_eq!(layers, before);
    assert_eq!(runs(&layers, &s.reg, &s.repo).await, ["1", "2"]);

    // A bad setting is refused up front, not ignored.
    let out = s.sign("5", &[("KEYBROKER_REGISTRY_RETRIES", "lots")]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("KEYBROKER_REGISTRY_RETRIES"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn a_lost_answer_to_a_manifest_put_neither_duplicates_nor_drops() {
    let Some(s) = Scene::new("faults/tlost").await else {
        return;
    };
    let out = s.sign("1", &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    // The registry stores the manifest, the answer never arrives; the retried
    // PUT writes the same bytes again.
    s.proxy
        .faults(json!([{"method": "PUT", "path": r"\.sig$", "kind": "reset", "stage": "response", "times": 1}]))
        .await;
    s.proxy.clear_log().await;
    let out = s.sign("2", &[]).await;
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let log = s.proxy.log().await;
    let puts = entries(&log, "PUT", &s.sig_path());
    assert_eq!(puts.len(), 2, "{log:?}");
    assert_eq!(puts[0]["status"], Value::Null);
    assert_eq!(puts[1]["status"], 201);
    let layers = s.sig_layers().await;
    assert_eq!(runs(&layers, &s.reg, &s.repo).await, ["1", "2"]);

    // The library, the same fault while appending a third: still one of each.
    let client = s.proxy.client(4);
    let img = ImageRef::parse(&format!("{}/{}", s.proxy.addr, s.repo)).unwrap();
    s.proxy
        .faults(json!([{"method": "PUT", "path": r"\.sig$", "kind": "reset", "stage": "response", "times": 1}]))
        .await;
    let sig = SignatureLayer {
        payload: br#"{"optional":{"run":"3"}}"#.to_vec(),
        signature_b64: "MEUCIQ==".into(),
    };
    assert!(append_signature(&client, &img, &s.digest, &sig)
        .await
        .unwrap());
    let layers = s.sig_layers().await;
    assert_eq!(runs(&layers, &s.reg, &s.repo).await, ["1", "2", "3"]);
}

#[tokio::test]
async fn retries_disabled_means_one_attempt() {
    let Some(s) = Scene::new("faults/toff").await else {
        return;
    };
    s.proxy
        .faults(json!([{"method": "HEAD", "path": "/manifests/v1$", "kind": "status", "status": 502, "times": 1}]))
        .await;
    let out = s.sign("1", &[("KEYBROKER_REGISTRY_RETRIES", "0")]).await;
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "HEAD /v2/{}/manifests/v1 failed after 1 attempt (retries disabled)",
            s.repo
        )) && err.contains("HTTP 502"),
        "{err}"
    );
    assert!(!err.contains("retry 1"), "{err}");
    // The fault is spent; the next run signs.
    let out = s.sign("1", &[("KEYBROKER_REGISTRY_RETRIES", "0")]).await;
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Nothing listening: each attempt is refused, then the error says so. Needs no registry.
#[tokio::test]
async fn connection_refused_is_retried_then_reported() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let client = Registry::new(RegistryOptions::default())
        .unwrap()
        .with_retry_policy(RetryPolicy {
            retries: 2,
            base_delay: Duration::from_millis(50),
            ..RetryPolicy::default()
        });
    let img = ImageRef::parse(&format!("127.0.0.1:{port}/faults/none:v1")).unwrap();
    let e = client.resolve_digest(&img).await.unwrap_err().to_string();
    assert!(
        e.contains("HEAD /v2/faults/none/manifests/v1 failed after 3 attempts"),
        "{e}"
    );
    assert!(e.to_lowercase().contains("refused"), "{e}");
    assert_eq!(client.request_count(), 3);
    let e = client.push_blob(&img, b"x").await.unwrap_err().to_string();
    assert!(
        e.contains("uploading blob sha256:") && e.contains("failed after 3 attempts"),
        "{e}"
    );
}

/// The `--referrers` emulation the referrers client is tested against: PUT a
/// manifest with a subject, list, filter, delete.
#[tokio::test]
async fn referrers_emulation_lists_filters_and_forgets() {
    let Some(reg) = anon_registry() else { return };
    let subject = reg.push_image("faults/referrers", "v1").await;
    let proxy = FaultProxy::start(&reg.addr, true);
    let client = proxy.client(0);
    let img = ImageRef::parse(&format!("{}/faults/referrers", proxy.addr)).unwrap();
    let http = reqwest::Client::new();
    let base = proxy.url("/v2/faults/referrers");
    let list = |query: &'static str| {
        let url = format!("{base}/referrers/{subject}{query}");
        let http = http.clone();
        async move { http.get(url).send().await.unwrap() }
    };

    // Nothing refers to it yet: 200 with an empty index, not 404.
    let resp = list("").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "application/vnd.oci.image.index.v1+json"
    );
    let index: Value = resp.json().await.unwrap();
    assert_eq!(
        index,
        json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []})
    );

    let empty = client.push_blob(&img, b"{}").await.unwrap();
    let payload = client.push_blob(&img, b"a signature").await.unwrap();
    let subject_desc = json!({"mediaType": OCI_MANIFEST, "digest": subject, "size": 1});
    let put = |manifest: Value| {
        let body = serde_json::to_vec(&manifest).unwrap();
        let digest = sha256_digest(&body);
        let url = format!("{base}/manifests/{digest}");
        let http = http.clone();
        async move {
            let resp = http
                .put(url)
                .header("content-type", OCI_MANIFEST)
                .body(body.clone())
                .send()
                .await
                .unwrap();
            (resp, digest, body.len())
        }
    };
    // An artifact with artifactType and annotations.
    let (resp, sig_digest, sig_size) = put(json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json", "digest": payload, "size": 11}],
        "subject": subject_desc,
        "annotations": {"created": "now"},
    }))
    .await;
    assert_eq!(resp.status(), 201);
    assert_eq!(resp.headers()["oci-subject"], subject.as_str());
    // One without artifactType: its config media type stands in.
    let (resp, other_digest, other_size) = put(json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.example.other", "digest": empty, "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": payload, "size": 11}],
        "subject": subject_desc,
    }))
    .await;
    assert_eq!(resp.status(), 201);
    // No subject: not a referrer, no header.
    let (resp, _, _) = put(json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.example.other", "digest": empty, "size": 2},
        "layers": [],
    }))
    .await;
    assert_eq!(resp.status(), 201);
    assert!(resp.headers().get("oci-subject").is_none());

    let index: Value = list("").await.json().await.unwrap();
    assert_eq!(
        index["manifests"],
        json!([
            {"mediaType": OCI_MANIFEST, "digest": sig_digest, "size": sig_size,
             "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json",
             "annotations": {"created": "now"}},
            {"mediaType": OCI_MANIFEST, "digest": other_digest, "size": other_size,
             "artifactType": "application/vnd.example.other"},
        ])
    );

    let resp = list("?artifactType=application/vnd.example.other").await;
    assert_eq!(resp.headers()["oci-filters-applied"], "artifactType");
    let index: Value = resp.json().await.unwrap();
    let digests: Vec<&Value> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| &d["digest"])
        .collect();
    assert_eq!(digests, [&json!(other_digest)]);

    // Deleting a referrer by digest takes it off the list.
    let resp = http
        .delete(format!("{base}/manifests/{other_digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let index: Value = list("").await.json().await.unwrap();
    let digests: Vec<&Value> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| &d["digest"])
        .collect();
    assert_eq!(digests, [&json!(sig_digest)]);

    // A malformed digest is the registry's 400; without --referrers the real
    // registry's 404 comes through.
    let resp = http
        .get(format!("{base}/referrers/sha256:nothex"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let plain = FaultProxy::start(&reg.addr, false);
    let resp = http
        .get(plain.url(&format!("/v2/faults/referrers/referrers/{subject}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

/// On an authenticated registry, the emulated endpoint asks for credentials as
/// the registry does.
#[tokio::test]
async fn referrers_emulation_follows_upstream_auth() {
    let Some(reg) = auth_registry() else { return };
    let subject = reg.push_image("faults/refauth", "v1").await;
    let proxy = FaultProxy::start(&reg.addr, true);
    let url = proxy.url(&format!("/v2/faults/refauth/referrers/{subject}"));
    let http = reqwest::Client::new();
    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic"));
    let creds = reg.credentials.as_ref().unwrap();
    let resp = http
        .get(&url)
        .basic_auth(&creds.username, Some(creds.password.as_str()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}
