//! Attestations end to end against a real registry (Debian docker-registry on
//! 127.0.0.1, started by scripts/test.sh) and the real broker service: the
//! broker builds and DSSE-signs the in-toto statement, the `keybroker` CLI
//! stores it in cosign's `.att` layout and verifies it; Python's
//! securesystemslib (tests/dsse/verify_envelope.py) verifies the envelope
//! independently.

mod common;

use std::path::Path;

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use common::*;
use keybroker_client::{
    cosign::{
        append_layer,
        attestation::{append_attestation, attestation_tag, DSSE_MEDIA_TYPE},
        Layer, Mode, SIGNATURE_ANNOTATION,
    },
    registry::{ImageRef, OCI_MANIFEST},
};
use serde_json::{json, Value};

/// Environment variables that would make the CLI see a CI system other than
/// the fixture's (the test itself may run inside one).
const CI_VARS: &[&str] = &[
    "GITHUB_ACTIONS",
    "GITLAB_CI",
    "GIT_COMMIT",
    "JENKINS_URL",
    "BUILD_URL",
    "KEYBROKER_BUILD_STARTED_ON",
    "KEYBROKER_ID_TOKEN",
    "KEYBROKER_ID_TOKEN_FILE",
];

fn config_for(keys: &[(&str, &TestKey)]) -> String {
    let mut c = String::new();
    for (alias, k) in keys {
        c.push_str(&format!(
            "[keys.{alias}]\nref = \"{}\"\n",
            k.key_path.display()
        ));
    }
    c.push_str(&format!(
        "[[policy]]\ncallers = [\"uid:{}\"]\nkeys = [{}]\nimages = [\"127.0.0.1:*/att/**\"]\n",
        uid(),
        keys.iter()
            .map(|(a, _)| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    c
}

/// Runs the CLI with CI detection variables cleared, then `env`, in `cwd`.
async fn kb(
    socket: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    cwd: Option<&Path>,
) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_keybroker"));
    cmd.arg("--socket").arg(socket).args(args);
    cmd.env_remove("KEYBROKER_REGISTRY_USERNAME")
        .env_remove("KEYBROKER_REGISTRY_PASSWORD");
    for v in CI_VARS {
        cmd.env_remove(v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    cmd.output().await.expect("run keybroker")
}

async fn att_layers(reg: &TestRegistry, repo: &str, digest: &str) -> Vec<Value> {
    let img = ImageRef::parse(&format!("{}/{repo}", reg.addr)).unwrap();
    let (body, _) = reg
        .client()
        .get_manifest(&img, &attestation_tag(digest), OCI_MANIFEST)
        .await
        .unwrap()
        .expect(".att exists");
    let m: Value = serde_json::from_slice(&body).unwrap();
    m["layers"].as_array().unwrap().clone()
}

async fn blob(reg: &TestRegistry, repo: &str, layer: &Value) -> Vec<u8> {
    let img = ImageRef::parse(&format!("{}/{repo}", reg.addr)).unwrap();
    reg.client()
        .get_blob(&img, layer["digest"].as_str().unwrap())
        .await
        .unwrap()
}

fn statement_of(envelope: &[u8]) -> Value {
    let env: Value = serde_json::from_slice(envelope).unwrap();
    serde_json::from_slice(&B64.decode(env["payload"].as_str().unwrap()).unwrap()).unwrap()
}

/// Runs the independent verifier; `None` when securesystemslib is missing
/// outside CI (SKIPPED printed).
fn python_verify(envelope: &[u8], public_pem_path: &Path) -> Option<Result<Value, String>> {
    let have = std::process::Command::new("python3")
        .args(["-c", "import securesystemslib.dsse, cryptography"])
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        if std::env::var_os("CI").is_some() {
            panic!("python3 with securesystemslib[crypto] is required (scripts/install-test-deps.sh installs it)");
        }
        eprintln!("SKIPPED: independent DSSE check (pip install 'securesystemslib[crypto]')");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("envelope.json");
    std::fs::write(&path, envelope).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/dsse/verify_envelope.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(&path)
        .arg(public_pem_path)
        .output()
        .unwrap();
    Some(if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("verifier prints the statement"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    })
}

fn lines(out: &std::process::Output) -> Vec<Value> {
    stdout(out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON statement per line"))
        .collect()
}

#[tokio::test]
async fn attests_in_cosigns_layout_and_verifies_independently() {
    let Some(reg) = anon_registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "att");
    let other = write_key(dir.path(), "other");
    let broker = TestBroker::start(&config_for(&[("att", &key)])).await;
    let digest = reg.push_image("att/app", "v1").await;
    let image = format!("{}/att/app:v1", reg.addr);
    let repo = format!("{}/att/app", reg.addr);

    // --type custom wraps the file, whatever it holds, as cosign does.
    let pred = dir.path().join("notes.txt");
    std::fs::write(&pred, "reviewed by alice\n").unwrap();
    let out = kb(
        &broker.socket,
        &[
            "attest",
            &image,
            "--key",
            "att",
            "--predicate",
            pred.to_str().unwrap(),
            "--type",
            "custom",
        ],
        &[],
        None,
    )
    .await;
    assert!(out.status.success(), "attest failed: {}", stderr(&out));
    assert_eq!(stdout(&out).trim(), format!("{repo}@{digest}"));

    // A JSON predicate under a URI type.
    let pred2 = dir.path().join("scan.json");
    std::fs::write(&pred2, r#"{"result":"clean","scanner":"x"}"#).unwrap();
    let out = kb(
        &broker.socket,
        &[
            "attest",
            &image,
            "--key",
            "att",
            "--predicate",
            pred2.to_str().unwrap(),
            "--type",
            "https://example.com/scan/v1",
        ],
        &[],
        None,
    )
    .await;
    assert!(out.status.success(), "attest failed: {}", stderr(&out));

    // cosign's .att layout.
    let layers = att_layers(&reg, "att/app", &digest).await;
    assert_eq!(layers.len(), 2);
    for (l, ty) in layers.iter().zip([
        "https://cosign.sigstore.dev/attestation/v1",
        "https://example.com/scan/v1",
    ]) {
        assert_eq!(l["mediaType"], DSSE_MEDIA_TYPE);
        assert_eq!(
            l["annotations"],
            json!({SIGNATURE_ANNOTATION: "", "predicateType": ty})
        );
    }
    let img = ImageRef::parse(&repo).unwrap();
    let (body, _) = reg
        .client()
        .get_manifest(&img, &attestation_tag(&digest), OCI_MANIFEST)
        .await
        .unwrap()
        .unwrap();
    let manifest: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(manifest["mediaType"], OCI_MANIFEST);
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let config: Value = serde_json::from_slice(
        &reg.client()
            .get_blob(&img, manifest["config"]["digest"].as_str().unwrap())
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        config["rootfs"]["diff_ids"],
        json!([layers[0]["digest"], layers[1]["digest"]])
    );

    // The envelope and its statement.
    let envelope = blob(&reg, "att/app", &layers[0]).await;
    let env: Value = serde_json::from_slice(&envelope).unwrap();
    assert_eq!(env["payloadType"], "application/vnd.in-toto+json");
    let st = statement_of(&envelope);
    assert_eq!(st["_type"], "https://in-toto.io/Statement/v0.1");
    assert_eq!(
        st["subject"],
        json!([{"name": repo, "digest": {"sha256": digest.strip_prefix("sha256:").unwrap()}}])
    );
    assert_eq!(
        st["predicateType"],
        "https://cosign.sigstore.dev/attestation/v1"
    );
    assert_eq!(st["predicate"]["Data"], "reviewed by alice\n");
    assert!(st["predicate"]["Timestamp"]
        .as_str()
        .unwrap()
        .ends_with('Z'));

    // An independent DSSE implementation accepts it with our key, not another.
    if let Some(r) = python_verify(&envelope, &key.pub_path) {
        assert_eq!(r.expect("securesystemslib verifies the envelope"), st);
        let e = python_verify(&envelope, &other.pub_path)
            .unwrap()
            .unwrap_err();
        assert!(e.contains("verification failed"), "{e}");
    }

    // verify-attestation: every statement, one per line; --type filters.
    let out = kb(
        &broker.socket,
        &[
            "verify-attestation",
            &image,
            "--key",
            key.pub_path.to_str().unwrap(),
        ],
        &[],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let got = lines(&out);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0], st);
    assert_eq!(
        got[1]["predicate"],
        json!({"result": "clean", "scanner": "x"})
    );
    let out = kb(
        &broker.socket,
        &[
            "verify-attestation",
            &image,
            "--key",
            "att",
            "--type",
            "https://example.com/scan/v1",
        ],
        &[],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(lines(&out).len(), 1);
    let out = kb(
        &broker.socket,
        &[
            "verify-attestation",
            &image,
            "--key",
            key.pub_path.to_str().unwrap(),
            "--type",
            "slsaprovenance1",
        ],
        &[],
        None,
    )
    .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("for predicate type https://slsa.dev/provenance/v1"),
        "{}",
        stderr(&out)
    );
    // Another key verifies nothing.
    let out = kb(
        &broker.socket,
        &[
            "verify-attestation",
            &image,
            "--key",
            other.pub_path.to_str().unwrap(),
            "--prefer",
            "classic",
        ],
        &[],
        None,
    )
    .await;
    assert!(!out.status.success());
    assert!(stdout(&out).is_empty());
    assert!(
        stderr(&out).contains("no envelope signature matches the key"),
        "{}",
        stderr(&out)
    );

    // A policy outside the rule's images is refused by the broker; nothing is written.
    let elsewhere = reg.push_image("elsewhere/app", "v1").await;
    let out = kb(
        &broker.socket,
        &[
            "attest",
            &format!("{}/elsewhere/app@{elsewhere}", reg.addr),
            "--key",
            "att",
            "--predicate",
            pred.to_str().unwrap(),
        ],
        &[],
        None,
    )
    .await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("policy"), "{}", stderr(&out));
    let img = ImageRef::parse(&format!("{}/elsewhere/app", reg.addr)).unwrap();
    assert!(reg
        .client()
        .get_manifest(&img, &attestation_tag(&elsewhere), OCI_MANIFEST)
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn tampered_payload_and_wrong_subject_are_rejected() {
    let Some(reg) = anon_registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "k");
    let broker = TestBroker::start(&config_for(&[("k", &key)])).await;
    let good_digest = reg.push_image("att/tamper", "good").await;
    let pred = dir.path().join("p.json");
    std::fs::write(&pred, r#"{"approved":false}"#).unwrap();
    let out = kb(
        &broker.socket,
        &[
            "attest",
            &format!("{}/att/tamper:good", reg.addr),
            "--key",
            "k",
            "--predicate",
            pred.to_str().unwrap(),
            "--type",
            "https://example.com/review/v1",
        ],
        &[],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let layers = att_layers(&reg, "att/tamper", &good_digest).await;
    let envelope = blob(&reg, "att/tamper", &layers[0]).await;

    let client = reg.client();
    let img = ImageRef::parse(&format!("{}/att/tamper", reg.addr)).unwrap();
    let pub_path = key.pub_path.to_str().unwrap();

    // 1. Wrong subject: the genuine envelope, copied to another image.
    let other_digest = reg.push_image("att/tamper", "other").await;
    append_attestation(
        &client,
        &img,
        &other_digest,
        &envelope,
        "https://example.com/review/v1",
        false,
    )
    .await
    .unwrap();
    let out = kb(
        &broker.socket,
        &[
            "verify-attestation",
            &format!("{}/att/tamper:other", reg.addr),
            "--key",
            pub_path,
        ],
        &[],
        None,
    )
    .await;
    assert!(!out.status.success());
    assert!(stdout(&out).is_empty());
    assert!(
        stderr(&out).contains(&format!("is about {good_digest} not {other_digest}")),
        "{}",
        stderr(&out)
    );

    // 2. Tampered payload under the genuine signature.
    let mut env: Value = serde_json::from_slice(&envelope).unwrap();
    let mut st = statement_of(&envelope);
    st["predicate"]["approved"] = json!(true);
    env["payload"] = json!(B64.encode(serde_json::to_vec(&st).unwrap()));
    let tampered = serde_json::to_vec(&env).unwrap();
    let third = reg.push_image("att/tamper", "third").await;
    // The tampered statement names the original digest; store it there too, so
    // only the signature can reject it.
    let tampered_layer = Layer {
        media_type: DSSE_MEDIA_TYPE.into(),
        blob: tampered.clone(),
        annotations: [
            (SIGNATURE_ANNOTATION.to_string(), String::new()),
            (
                "predicateType".to_string(),
                "https://example.com/review/v1".to_string(),
            ),
        ]
        .into(),
    };
    append_layer(
        &client,
        &img,
        &attestation_tag(&third),
        &tampered_layer,
        Mode::Append,
    )
    .await
    .unwrap();
    st["subject"][0]["digest"]["sha256"] = json!(third.strip_prefix("sha256:").unwrap());
    env["payload"] = json!(B64.encode(serde_json::to_vec(&st).unwrap()));
    let tampered_subject = serde_json::to_vec(&env).unwrap();
    append_attestation(
        &client,
        &img,
        &third,
        &tampered_subject,
        "https://example.com/review/v1",
        false,
    )
    .await
    .unwrap();
    let out = kb(
        &broker.socket,
        &[
            "verify-attestation",
            &format!("{}/att/tamper:third", reg.addr),
            "--key",
            pub_path,
        ],
        &[],
        None,
    )
    .await;
    assert!(!out.status.success());
    assert!(stdout(&out).is_empty());
    let err = stderr(&out);
    assert!(
        err.contains("checked 2")
            && err.matches("no envelope signature matches the key").count() == 2,
        "{err}"
    );
    if let Some(r) = python_verify(&tampered, &key.pub_path) {
        assert!(r.is_err(), "securesystemslib accepted a tampered payload");
        assert!(python_verify(&envelope, &key.pub_path).unwrap().is_ok());
    }

    // The genuine one still verifies where it belongs.
    let out = kb(
        &broker.socket,
        &[
            "verify-attestation",
            &format!("{}/att/tamper:good", reg.addr),
            "--key",
            pub_path,
        ],
        &[],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(lines(&out)[0]["predicate"]["approved"], false);
}

#[tokio::test]
async fn concurrent_attesters_keep_every_envelope() {
    let Some(reg) = anon_registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "k");
    let broker = TestBroker::start(&config_for(&[("k", &key)])).await;
    let digest = reg.push_image("att/race", "v1").await;
    let image = format!("{}/att/race:v1", reg.addr);
    let n = 4;
    let runs: Vec<_> = (0..n)
        .map(|i| {
            let socket = broker.socket.clone();
            let image = image.clone();
            let pred = dir.path().join(format!("p{i}.json"));
            std::fs::write(&pred, format!(r#"{{"writer":{i}}}"#)).unwrap();
            tokio::spawn(async move {
                kb(
                    &socket,
                    &[
                        "attest",
                        &image,
                        "--key",
                        "k",
                        "--predicate",
                        pred.to_str().unwrap(),
                        "--type",
                        "https://example.com/race/v1",
                    ],
                    &[],
                    None,
                )
                .await
            })
        })
        .collect();
    for r in runs {
        let out = r.await.unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert_eq!(
        att_layers(&reg, "att/race", &digest).await.len(),
        n,
        "a concurrent attester's envelope was lost"
    );
    let out = kb(
        &broker.socket,
        &[
            "verify-attestation",
            &image,
            "--key",
            key.pub_path.to_str().unwrap(),
        ],
        &[],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let mut writers: Vec<i64> = lines(&out)
        .iter()
        .map(|s| s["predicate"]["writer"].as_i64().unwrap())
        .collect();
    writers.sort();
    assert_eq!(writers, (0..n as i64).collect::<Vec<_>>());
}

#[tokio::test]
async fn replace_drops_only_the_same_predicate_type_and_identical_layers_are_skipped() {
    let Some(reg) = anon_registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "k");
    let broker = TestBroker::start(&config_for(&[("k", &key)])).await;
    let digest = reg.push_image("att/replace", "v1").await;
    let image = format!("{}/att/replace:v1", reg.addr);
    let attest = |body: &'static str, ty: &'static str, replace: bool| {
        let socket = broker.socket.clone();
        let image = image.clone();
        let pred = dir
            .path()
            .join(format!("{}.json", body.len() * 31 + ty.len()));
        std::fs::write(&pred, body).unwrap();
        async move {
            let mut args = vec![
                "attest".to_string(),
                image,
                "--key".into(),
                "k".into(),
                "--predicate".into(),
                pred.to_str().unwrap().to_string(),
                "--type".into(),
                ty.to_string(),
            ];
            if replace {
                args.push("--replace".into());
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = kb(&socket, &args, &[], None).await;
            assert!(out.status.success(), "{}", stderr(&out));
        }
    };
    attest(r#"{"n":1}"#, "https://example.com/a/v1", false).await;
    attest(r#"{"n":22}"#, "https://example.com/a/v1", false).await;
    attest(r#"{"n":333}"#, "https://example.com/b/v1", false).await;
    assert_eq!(att_layers(&reg, "att/replace", &digest).await.len(), 3);
    attest(r#"{"n":4444}"#, "https://example.com/a/v1", true).await;
    let layers = att_layers(&reg, "att/replace", &digest).await;
    let mut kept = Vec::new();
    for l in &layers {
        let st = statement_of(&blob(&reg, "att/replace", l).await);
        kept.push((
            st["predicateType"].as_str().unwrap().to_string(),
            st["predicate"]["n"].as_i64().unwrap(),
        ));
    }
    // cosign's order: the replacing attestation first, then the kept ones.
    assert_eq!(
        kept,
        [
            ("https://example.com/a/v1".to_string(), 4444),
            ("https://example.com/b/v1".to_string(), 333),
        ]
    );

    // Storing the same envelope again writes nothing.
    let envelope = blob(&reg, "att/replace", &layers[1]).await;
    let img = ImageRef::parse(&format!("{}/att/replace", reg.addr)).unwrap();
    let written = append_attestation(
        &reg.client(),
        &img,
        &digest,
        &envelope,
        "https://example.com/b/v1",
        false,
    )
    .await
    .unwrap();
    assert!(!written, "identical envelope stored twice");
    assert_eq!(att_layers(&reg, "att/replace", &digest).await.len(), 2);
}

fn github_fixture() -> Vec<(&'static str, &'static str)> {
    vec![
        ("GITHUB_ACTIONS", "true"),
        ("GITHUB_SERVER_URL", "https://github.com"),
        ("GITHUB_REPOSITORY", "acme/api"),
        ("GITHUB_SHA", "0123456789abcdef0123456789abcdef01234567"),
        ("GITHUB_REF", "refs/heads/main"),
        (
            "GITHUB_WORKFLOW_REF",
            "acme/api/.github/workflows/release.yml@refs/heads/main",
        ),
        ("GITHUB_RUN_ID", "9001"),
        ("GITHUB_RUN_ATTEMPT", "1"),
        ("GITHUB_EVENT_NAME", "push"),
        ("KEYBROKER_BUILD_STARTED_ON", "2026-11-25T08:00:00Z"),
    ]
}

#[tokio::test]
async fn provenance_from_each_ci_environment() {
    let Some(reg) = anon_registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "k");
    let broker = TestBroker::start(&config_for(&[("k", &key)])).await;
    let pub_path = key.pub_path.to_str().unwrap().to_string();

    let gitlab = vec![
        ("GITLAB_CI", "true"),
        ("CI_SERVER_URL", "https://gitlab.example"),
        ("CI_PROJECT_URL", "https://gitlab.example/grp/api"),
        ("CI_PROJECT_PATH", "grp/api"),
        ("CI_COMMIT_SHA", "89abcdef0123456789abcdef0123456789abcdef"),
        ("CI_COMMIT_TAG", "v2.0.0"),
        (
            "CI_PIPELINE_URL",
            "https://gitlab.example/grp/api/-/pipelines/5",
        ),
        ("CI_JOB_URL", "https://gitlab.example/grp/api/-/jobs/77"),
        ("CI_RUNNER_ID", "3"),
        ("CI_JOB_STARTED_AT", "2026-11-25T07:00:00Z"),
    ];
    let jenkins = vec![
        ("JENKINS_URL", "https://jenkins.example/"),
        ("BUILD_URL", "https://jenkins.example/job/api/12/"),
        ("JOB_NAME", "api"),
        ("GIT_COMMIT", "fedcba9876543210fedcba9876543210fedcba98"),
        ("GIT_BRANCH", "origin/main"),
        ("GIT_URL", "https://bot:secret@git.example/team/api.git"),
    ];

    // A plain git checkout, no CI variables.
    let repo_dir = tempfile::tempdir().unwrap();
    let git = |args: &[&str]| {
        let o = std::process::Command::new("git")
            .arg("-C")
            .arg(repo_dir.path())
            .args(args)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .output()
            .unwrap();
        assert!(o.status.success(), "git {args:?}: {o:?}");
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    };
    git(&["init", "-q", "-b", "trunk"]);
    std::fs::write(repo_dir.path().join("f"), "x").unwrap();
    git(&["add", "f"]);
    git(&["commit", "-q", "-m", "c"]);
    git(&["remote", "add", "origin", "git@git.example:team/local.git"]);
    let head = git(&["rev-parse", "HEAD"]);

    struct Case<'a> {
        name: &'a str,
        env: Vec<(&'a str, &'a str)>,
        cwd: Option<&'a Path>,
        build_type: &'a str,
        source: String,
        commit: String,
        claimed_builder: &'a str,
        invocation: Option<&'a str>,
        started: Option<&'a str>,
    }
    let cases = [
        Case {
            name: "github",
            env: github_fixture(),
            cwd: None,
            build_type: "https://keybroker.dev/buildtypes/github-actions/v1",
            source: "git+https://github.com/acme/api@refs/heads/main".into(),
            commit: "0123456789abcdef0123456789abcdef01234567".into(),
            claimed_builder: "https://github.com/actions/runner/github-hosted",
            invocation: Some("https://github.com/acme/api/actions/runs/9001/attempts/1"),
            started: Some("2026-11-25T08:00:00Z"),
        },
        Case {
            name: "gitlab",
            env: gitlab,
            cwd: None,
            build_type: "https://keybroker.dev/buildtypes/gitlab-ci/v1",
            source: "git+https://gitlab.example/grp/api@refs/tags/v2.0.0".into(),
            commit: "89abcdef0123456789abcdef0123456789abcdef".into(),
            claimed_builder: "https://gitlab.example/grp/api/-/runners/3",
            invocation: Some("https://gitlab.example/grp/api/-/jobs/77"),
            started: Some("2026-11-25T07:00:00Z"),
        },
        Case {
            name: "jenkins",
            env: jenkins,
            cwd: None,
            build_type: "https://keybroker.dev/buildtypes/jenkins/v1",
            source: "git+https://git.example/team/api@refs/heads/main".into(),
            commit: "fedcba9876543210fedcba9876543210fedcba98".into(),
            claimed_builder: "https://jenkins.example/",
            invocation: Some("https://jenkins.example/job/api/12/"),
            started: None,
        },
        Case {
            name: "git",
            env: vec![("HOSTNAME", "devbox")],
            cwd: Some(repo_dir.path()),
            build_type: "https://keybroker.dev/buildtypes/git-checkout/v1",
            source: "git+https://git.example/team/local@refs/heads/trunk".into(),
            commit: head.clone(),
            claimed_builder: "https://keybroker.dev/builders/local/devbox",
            invocation: None,
            started: None,
        },
    ];
    for c in &cases {
        let digest = reg.push_image(&format!("att/prov-{}", c.name), "v1").await;
        let image = format!("{}/att/prov-{}:v1", reg.addr, c.name);
        let out = kb(
            &broker.socket,
            &["attest", &image, "--key", "k", "--provenance"],
            &c.env,
            c.cwd,
        )
        .await;
        assert!(out.status.success(), "{}: {}", c.name, stderr(&out));
        let out = kb(
            &broker.socket,
            &[
                "verify-attestation",
                &image,
                "--key",
                &pub_path,
                "--type",
                "slsaprovenance1",
            ],
            &[],
            None,
        )
        .await;
        assert!(out.status.success(), "{}: {}", c.name, stderr(&out));
        let st = &lines(&out)[0];
        assert_eq!(st["predicateType"], "https://slsa.dev/provenance/v1");
        assert_eq!(
            st["subject"][0]["digest"]["sha256"],
            digest.strip_prefix("sha256:").unwrap()
        );
        let p = &st["predicate"];
        let bd = &p["buildDefinition"];
        assert_eq!(bd["buildType"], c.build_type, "{}", c.name);
        assert_eq!(
            bd["resolvedDependencies"],
            json!([{"uri": c.source, "digest": {"gitCommit": c.commit}}]),
            "{}",
            c.name
        );
        assert!(bd["externalParameters"]["repository"].is_string());
        assert!(bd["externalParameters"]["ref"]
            .as_str()
            .unwrap()
            .starts_with("refs/"));
        let rd = &p["runDetails"];
        // Over the unix socket the broker cannot vouch for a builder: it keeps
        // the claimed id and says so.
        assert_eq!(rd["builder"]["id"], c.claimed_builder, "{}", c.name);
        assert_eq!(
            rd["builder"]["version"]["keybroker.dev/builder-id-source"],
            "claimed"
        );
        assert_eq!(
            rd["metadata"].get("invocationId").and_then(Value::as_str),
            c.invocation,
            "{}",
            c.name
        );
        assert_eq!(
            rd["metadata"].get("startedOn").and_then(Value::as_str),
            c.started,
            "{}",
            c.name
        );
        assert!(rd["metadata"]["finishedOn"]
            .as_str()
            .unwrap()
            .ends_with('Z'));
        // No credential from a remote URL reaches the statement.
        assert!(!st.to_string().contains("secret"), "{}", c.name);
    }

    // Outside any CI and any checkout, --provenance says why it cannot run.
    let empty = tempfile::tempdir().unwrap();
    let digest = reg.push_image("att/prov-none", "v1").await;
    let out = kb(
        &broker.socket,
        &[
            "attest",
            &format!("{}/att/prov-none@{digest}", reg.addr),
            "--key",
            "k",
            "--provenance",
        ],
        &[],
        Some(empty.path()),
    )
    .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no CI environment detected"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn sign_ci_annotations_land_in_the_payload() {
    let Some(reg) = anon_registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let key = write_key(dir.path(), "k");
    let broker = TestBroker::start(&config_for(&[("k", &key)])).await;
    let digest = reg.push_image("att/signci", "v1").await;
    let image = format!("{}/att/signci:v1", reg.addr);
    let out = kb(
        &broker.socket,
        &[
            "sign",
            &image,
            "--key",
            "k",
            "--ci-annotations",
            "-a",
            "branch=override",
            "-a",
            "env=prod",
        ],
        &github_fixture(),
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        format!("{}/att/signci@{digest}", reg.addr)
    );
    let out = kb(
        &broker.socket,
        &[
            "verify",
            &image,
            "--key",
            key.pub_path.to_str().unwrap(),
            "--prefer",
            "classic",
        ],
        &[],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let payloads: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let opt = &payloads[0]["optional"];
    assert_eq!(opt["commit"], "0123456789abcdef0123456789abcdef01234567");
    assert_eq!(opt["repo"], "https://github.com/acme/api");
    assert_eq!(
        opt["build-url"],
        "https://github.com/acme/api/actions/runs/9001/attempts/1"
    );
    // -a wins over the detected value.
    assert_eq!(opt["branch"], "override");
    assert_eq!(opt["env"], "prod");
}
