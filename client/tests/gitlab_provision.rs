//! GitLab end to end: `keybroker generate-key-pair gitlab://…` (real binary)
//! writes the variables into the fake GitLab REST API (tests/fakes/gitlab_api.py);
//! an in-process keybrokerd signs with `gitlab://…` as its key, and after the
//! variables are rotated and the cache TTL has passed, signs with the new key.
//! Plus project id / group targets, masked and protected flags, the errors
//! (401, 403, 404), and no secret in any output or log.

mod ci_fakes;
mod common;

use std::{collections::HashMap, path::Path};

use ci_fakes::{assert_no_secret, err, keybroker, out, start, Fake};
use common::TestBroker;
use keybroker_proto::v1::SignImageRequest;
use keybroker_providers::{ecdsa::verify_digest, P256Signer, Password, Sha256Digest};

const TOKEN: &str = "glpat-maintainer-0123456789";
const READONLY: &str = "glpat-developer-0123456789";
const PASSWORD: &str = "correct-horse$battery";

fn fake() -> Option<Fake> {
    start(
        "gitlab_api.py",
        "json",
        &[
            "--token",
            TOKEN,
            "--readonly-token",
            READONLY,
            "--project",
            "acme/app:12",
            "--project",
            "acme/tool:4242",
            "--project",
            "acme/short:13",
            "--group",
            "infra:77",
        ],
    )
}

fn run(
    fake: &Fake,
    dir: &Path,
    args: &[&str],
    token: &str,
    password: &str,
) -> std::process::Output {
    keybroker(
        dir,
        args,
        &[
            ("GITLAB_HOST", &fake.base),
            ("GITLAB_TOKEN", token),
            ("COSIGN_PASSWORD", password),
        ],
    )
}

/// The variables of `/_fake/variables/{kind}/{id}` by name.
async fn variables(fake: &Fake, kind: &str, id: u64) -> HashMap<String, serde_json::Value> {
    let v = fake.control(&format!("/_fake/variables/{kind}/{id}")).await;
    v.as_array()
        .unwrap()
        .iter()
        .map(|var| (var["key"].as_str().unwrap().to_string(), var.clone()))
        .collect()
}

/// COSIGN_PRIVATE_KEY decrypts with COSIGN_PASSWORD to the key of
/// COSIGN_PUBLIC_KEY and of the local file; returns (public PEM, private PEM).
fn check_pair(
    vars: &HashMap<String, serde_json::Value>,
    pub_file: &Path,
    password: &str,
) -> (String, String) {
    let value = |k: &str| {
        vars[k]["value"]
            .as_str()
            .unwrap_or_else(|| panic!("{k} has no value"))
            .to_string()
    };
    assert_eq!(value("COSIGN_PASSWORD"), password);
    let private = value("COSIGN_PRIVATE_KEY");
    let signer = P256Signer::from_pem(&private, Some(&Password::new(password)))
        .expect("COSIGN_PRIVATE_KEY decrypts with COSIGN_PASSWORD");
    let local = std::fs::read_to_string(pub_file).expect("cosign.pub written");
    assert_eq!(signer.public_key_pem(), local);
    assert_eq!(value("COSIGN_PUBLIC_KEY"), local);
    for (k, v) in vars {
        assert_eq!(v["raw"], true, "{k} must be raw (no $ expansion)");
        assert_eq!(v["environment_scope"], "*", "{k}");
        assert_eq!(v["variable_type"], "env_var", "{k}");
    }
    (local, private)
}

/// Signs an image digest through the broker's socket; returns (payload, signature, PEM).
async fn sign(broker: &TestBroker) -> Result<(Vec<u8>, Vec<u8>, String), tonic::Status> {
    let mut client = keybroker_client::broker::connect(&broker.socket)
        .await
        .expect("connect to the broker");
    let resp = client
        .sign_image(SignImageRequest {
            key: "ci".into(),
            docker_reference: "registry.example.com/acme/app".into(),
            manifest_digest: format!("sha256:{}", "ab".repeat(32)),
            annotations: Default::default(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let pem = resp.key.map(|k| k.public_key_pem).unwrap_or_default();
    Ok((resp.payload, resp.signature, pem))
}

fn verifies(pem: &str, payload: &[u8], sig: &[u8]) -> bool {
    verify_digest(pem, &Sha256Digest::of(payload), sig).is_ok()
}

#[tokio::test]
async fn gitlab_variables_sign_in_the_broker_and_rotate() {
    let Some(fake) = fake() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut outputs = String::new();

    // A project by path: three variables, the password masked, nothing protected.
    let o = run(
        &fake,
        d,
        &["generate-key-pair", "gitlab://acme/app"],
        TOKEN,
        PASSWORD,
    );
    assert!(o.status.success(), "{}", err(&o));
    for name in [
        "COSIGN_PRIVATE_KEY (created)",
        "COSIGN_PASSWORD (created, masked)",
        "COSIGN_PUBLIC_KEY (created)",
        "project acme/app (id 12)",
    ] {
        assert!(err(&o).contains(name), "{name} not in {}", err(&o));
    }
    outputs += &(out(&o) + &err(&o));
    let vars = variables(&fake, "projects", 12).await;
    let (pub1, priv1) = check_pair(&vars, &d.join("cosign.pub"), PASSWORD);
    assert_eq!(vars["COSIGN_PASSWORD"]["masked"], true);
    assert_eq!(vars["COSIGN_PRIVATE_KEY"]["masked"], false);
    assert_eq!(vars["COSIGN_PUBLIC_KEY"]["masked"], false);
    assert!(vars.values().all(|v| v["protected"] == false));

    let o = run(
        &fake,
        d,
        &["public-key", "--key", "gitlab://acme/app"],
        TOKEN,
        "",
    );
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(out(&o), pub1);

    // keybrokerd signs with the variables, re-reading them after the TTL.
    let token_file = d.join("gitlab-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let broker = TestBroker::start(&format!(
        r#"
        [keys.ci]
        ref = "gitlab://acme/app"
        [keys.ci.gitlab]
        host = "{}"
        token_file = "{}"
        cache_ttl_secs = 1

        [[policy]]
        callers = ["uid:{}"]
        keys = ["ci"]
        images = ["registry.example.com/**"]
        "#,
        fake.base,
        token_file.display(),
        common::uid()
    ))
    .await;
    let (payload, sig, pem) = sign(&broker).await.expect("sign with gitlab://");
    assert_eq!(pem, pub1);
    assert!(
        verifies(&pub1, &payload, &sig),
        "signature does not verify with COSIGN_PUBLIC_KEY"
    );

    // Rotate: refused without --force, then replaced (PUT, "updated").
    let o = run(
        &fake,
        d,
        &[
            "generate-key-pair",
            "--output-key-prefix",
            "new",
            "gitlab://acme/app",
        ],
        TOKEN,
        PASSWORD,
    );
    assert!(!o.status.success());
    assert!(
        err(&o).contains("already holds COSIGN_PRIVATE_KEY"),
        "{}",
        err(&o)
    );
    let o = run(
        &fake,
        d,
        &[
            "generate-key-pair",
            "--force",
            "--output-key-prefix",
            "new",
            "gitlab://acme/app",
        ],
        TOKEN,
        PASSWORD,
    );
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        err(&o).contains("COSIGN_PRIVATE_KEY (updated)"),
        "{}",
        err(&o)
    );
    outputs += &(out(&o) + &err(&o));
    let vars = variables(&fake, "projects", 12).await;
    let (pub2, priv2) = check_pair(&vars, &d.join("new.pub"), PASSWORD);
    assert_ne!(pub1, pub2);

    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let (payload, sig, pem) = sign(&broker).await.expect("sign after rotation");
    assert_eq!(pem, pub2, "the broker still reports the old public key");
    assert!(
        verifies(&pub2, &payload, &sig),
        "not signed with the new key"
    );
    assert!(!verifies(&pub1, &payload, &sig));
    drop(broker);

    // A project by id, protected; a group; an unmaskable password.
    let o = run(
        &fake,
        d,
        &[
            "generate-key-pair",
            "--output-key-prefix",
            "tool",
            "--gitlab-protected",
            "gitlab://4242",
        ],
        TOKEN,
        PASSWORD,
    );
    assert!(o.status.success(), "{}", err(&o));
    let vars = variables(&fake, "projects", 4242).await;
    let (_, priv3) = check_pair(&vars, &d.join("tool.pub"), PASSWORD);
    assert!(vars.values().all(|v| v["protected"] == true), "{vars:?}");

    let o = run(
        &fake,
        d,
        &[
            "generate-key-pair",
            "--output-key-prefix",
            "infra",
            "--gitlab-masked=false",
            "gitlab://infra",
        ],
        TOKEN,
        PASSWORD,
    );
    assert!(o.status.success(), "{}", err(&o));
    assert!(err(&o).contains("group infra (id 77)"), "{}", err(&o));
    let vars = variables(&fake, "groups", 77).await;
    let (infra_pub, priv4) = check_pair(&vars, &d.join("infra.pub"), PASSWORD);
    assert_eq!(vars["COSIGN_PASSWORD"]["masked"], false);
    let o = run(
        &fake,
        d,
        &["public-key", "--key", "gitlab://infra"],
        TOKEN,
        "",
    );
    assert_eq!(out(&o), infra_pub, "{}", err(&o));

    let o = run(
        &fake,
        d,
        &[
            "generate-key-pair",
            "--output-key-prefix",
            "short",
            "--gitlab-masked",
            "gitlab://acme/short",
        ],
        TOKEN,
        "short",
    );
    assert!(!o.status.success());
    assert!(err(&o).contains("cannot mask"), "{}", err(&o));
    assert!(
        variables(&fake, "projects", 13).await.is_empty(),
        "written although refused"
    );
    let o = run(
        &fake,
        d,
        &[
            "generate-key-pair",
            "--output-key-prefix",
            "short",
            "gitlab://acme/short",
        ],
        TOKEN,
        "short",
    );
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        err(&o).contains("warning: COSIGN_PASSWORD is stored unmasked"),
        "{}",
        err(&o)
    );
    let vars = variables(&fake, "projects", 13).await;
    check_pair(&vars, &d.join("short.pub"), "short");
    assert_eq!(vars["COSIGN_PASSWORD"]["masked"], false);

    // Every API request carried the token as PRIVATE-TOKEN.
    let reqs = fake.control("/_fake/requests").await;
    assert!(
        reqs.as_array()
            .unwrap()
            .iter()
            .all(|r| r["auth"] == "private-token"),
        "{reqs}"
    );

    let secrets = [PASSWORD, TOKEN, &priv1, &priv2, &priv3, &priv4];
    assert_no_secret("keybroker's output", &outputs, &secrets);
    assert_no_secret("the fake's log", &fake.log(), &secrets);
}

#[tokio::test]
async fn gitlab_errors_say_what_to_do() {
    let Some(fake) = fake() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases: [(&str, &str, &[&str]); 3] = [
        ("glpat-wrong", "gitlab://acme/app", &["401", "GITLAB_TOKEN"]),
        (READONLY, "gitlab://acme/app", &["403", "Maintainer"]),
        (
            TOKEN,
            "gitlab://acme/nothing",
            &["no project or group acme/nothing"],
        ),
    ];
    for (token, reference, needles) in cases {
        let o = run(&fake, d, &["generate-key-pair", reference], token, PASSWORD);
        assert!(!o.status.success(), "{reference} with {token} succeeded");
        let e = err(&o);
        for n in needles {
            assert!(e.contains(n), "{reference}: {n:?} not in {e}");
        }
        assert_no_secret(
            "keybroker's output",
            &(out(&o) + &e),
            &[PASSWORD, TOKEN, READONLY, "glpat-wrong"],
        );
        assert!(!d.join("cosign.pub").exists());
    }
    let o = run(
        &fake,
        d,
        &["public-key", "--key", "gitlab://acme/app"],
        TOKEN,
        "",
    );
    assert!(
        !o.status.success() && err(&o).contains("no CI/CD variable COSIGN_PUBLIC_KEY"),
        "{}",
        err(&o)
    );
    let o = keybroker(
        d,
        &["generate-key-pair", "gitlab://acme/app"],
        &[("GITLAB_HOST", &fake.base)],
    );
    assert!(
        !o.status.success() && err(&o).contains("set GITLAB_TOKEN"),
        "{}",
        err(&o)
    );

    // The broker: a wrong token is PERMISSION_DENIED with GitLab's 401, never the token.
    let token_file = d.join("wrong-token");
    std::fs::write(&token_file, "glpat-wrong").unwrap();
    let broker = TestBroker::start(&format!(
        "[keys.ci]\nref = \"gitlab://acme/app\"\n[keys.ci.gitlab]\nhost = \"{}\"\ntoken_file = \"{}\"\n\n[[policy]]\ncallers = [\"uid:{}\"]\nkeys = [\"ci\"]\nimages = [\"registry.example.com/**\"]\n",
        fake.base,
        token_file.display(),
        common::uid()
    ))
    .await;
    let status = sign(&broker).await.expect_err("signed with a wrong token");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("401"), "{}", status.message());
    assert!(!status.message().contains("glpat-wrong"));
    assert_no_secret(
        "the fake's log",
        &fake.log(),
        &[PASSWORD, TOKEN, READONLY, "glpat-wrong"],
    );
}
