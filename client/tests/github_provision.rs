//! `keybroker generate-key-pair github://…` and `public-key --key github://…`
//! end to end through the real binary, against the fake GitHub REST API
//! (tests/fakes/github_api.py), which decrypts every sealed box it receives:
//! a repository, an organization, an environment, GitHub Enterprise Server
//! paths, the errors (401, 403, 404), and no secret in any output or log.

mod ci_fakes;

use std::path::Path;

use ci_fakes::{assert_no_secret, err, keybroker, out, start, Fake};
use keybroker_providers::{P256Signer, Password};

const TOKEN: &str = "ghp_fulltoken0123456789";
const READONLY: &str = "ghp_readonly0123456789";
const PASSWORD: &str = "s3cret pass$word";

fn fake(extra: &[&str]) -> Option<Fake> {
    let mut args = vec![
        "--token",
        TOKEN,
        "--readonly-token",
        READONLY,
        "--repo",
        "acme/app",
        "--org",
        "acme-org",
        "--environment",
        "acme/app:production",
    ];
    args.extend_from_slice(extra);
    start("github_api.py", "nacl", &args)
}

/// The decrypted secrets of a scope, as the fake received them.
struct Stored {
    private_key: String,
    password: String,
    public_key: String,
    variable: String,
    visibility: serde_json::Value,
}

async fn stored(fake: &Fake, scope: &str) -> Stored {
    let v = fake.control(&format!("/_fake/secrets/{scope}")).await;
    let s = |name: &str| {
        v["secrets"][name]
            .as_str()
            .unwrap_or_else(|| panic!("{scope}: no secret {name}: {v}"))
            .to_string()
    };
    Stored {
        private_key: s("COSIGN_PRIVATE_KEY"),
        password: s("COSIGN_PASSWORD"),
        public_key: s("COSIGN_PUBLIC_KEY"),
        variable: v["variables"]["COSIGN_PUBLIC_KEY"]
            .as_str()
            .unwrap_or_else(|| panic!("{scope}: no variable COSIGN_PUBLIC_KEY: {v}"))
            .to_string(),
        visibility: v["visibility"].clone(),
    }
}

/// The stored private key decrypts with the stored password to the key whose
/// public key is the stored public key, the variable and the local file.
fn check_pair(s: &Stored, pub_file: &Path) -> String {
    assert_eq!(s.password, PASSWORD);
    assert!(
        s.private_key
            .starts_with("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----"),
        "{}",
        s.private_key.lines().next().unwrap_or("")
    );
    let signer = P256Signer::from_pem(&s.private_key, Some(&Password::new(s.password.as_str())))
        .expect("COSIGN_PRIVATE_KEY decrypts with COSIGN_PASSWORD");
    let local = std::fs::read_to_string(pub_file).expect("cosign.pub written");
    assert_eq!(signer.public_key_pem(), local);
    assert_eq!(s.public_key, local);
    assert_eq!(s.variable, local);
    local
}

fn env<'a>(fake: &'a Fake, token: &'a str) -> Vec<(&'static str, String)> {
    vec![
        ("GITHUB_API_URL", fake.base.clone()),
        ("GITHUB_TOKEN", token.to_string()),
        ("COSIGN_PASSWORD", PASSWORD.to_string()),
    ]
}

fn run(dir: &Path, args: &[&str], env: &[(&'static str, String)]) -> std::process::Output {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    keybroker(dir, args, &env)
}

#[tokio::test]
async fn github_repo_org_and_environment_secrets_round_trip() {
    let Some(fake) = fake(&[]) else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let e = env(&fake, TOKEN);
    let mut outputs = String::new();

    // A repository.
    let o = run(d, &["generate-key-pair", "github://acme/app"], &e);
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        err(&o).contains("COSIGN_PRIVATE_KEY") && err(&o).contains("repository acme/app"),
        "{}",
        err(&o)
    );
    outputs += &(out(&o) + &err(&o));
    let repo = stored(&fake, "repos/acme/app").await;
    let repo_pub = check_pair(&repo, &d.join("cosign.pub"));

    let o = run(d, &["public-key", "--key", "github://acme/app"], &e);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(out(&o), repo_pub);

    // Again: refused without --force, replaced with it (variable updated by PATCH).
    let o = run(
        d,
        &["generate-key-pair", "github://acme/app", "--force"],
        &e,
    );
    assert!(o.status.success(), "{}", err(&o));
    let o = run(
        d,
        &[
            "generate-key-pair",
            "--output-key-prefix",
            "again",
            "github://acme/app",
        ],
        &e,
    );
    assert!(!o.status.success());
    assert!(
        err(&o).contains("already holds COSIGN_PRIVATE_KEY") && err(&o).contains("--force"),
        "{}",
        err(&o)
    );
    assert!(!d.join("again.pub").exists());
    let o = run(
        d,
        &[
            "generate-key-pair",
            "--force",
            "--output-key-prefix",
            "again",
            "github://acme/app",
        ],
        &e,
    );
    assert!(o.status.success(), "{}", err(&o));
    outputs += &(out(&o) + &err(&o));
    let rotated = stored(&fake, "repos/acme/app").await;
    let rotated_pub = check_pair(&rotated, &d.join("again.pub"));
    assert_ne!(rotated_pub, repo_pub);

    // An organization: visibility private by default, or as asked.
    let o = run(
        d,
        &[
            "generate-key-pair",
            "--output-key-prefix",
            "org",
            "github://acme-org",
        ],
        &e,
    );
    assert!(o.status.success(), "{}", err(&o));
    outputs += &(out(&o) + &err(&o));
    let org = stored(&fake, "orgs/acme-org").await;
    let org_pub = check_pair(&org, &d.join("org.pub"));
    for name in ["COSIGN_PRIVATE_KEY", "COSIGN_PASSWORD", "COSIGN_PUBLIC_KEY"] {
        assert_eq!(org.visibility[name], "private", "{name}");
    }
    let o = run(d, &["public-key", "--key", "github://acme-org"], &e);
    assert_eq!(out(&o), org_pub, "{}", err(&o));
    let o = run(
        d,
        &[
            "generate-key-pair",
            "--force",
            "--output-key-prefix",
            "org",
            "--github-visibility",
            "all",
            "github://acme-org",
        ],
        &e,
    );
    assert!(o.status.success(), "{}", err(&o));
    let org = stored(&fake, "orgs/acme-org").await;
    check_pair(&org, &d.join("org.pub"));
    assert_eq!(org.visibility["COSIGN_PRIVATE_KEY"], "all");
    let o = run(
        d,
        &[
            "generate-key-pair",
            "--force",
            "--github-visibility",
            "all",
            "github://acme/app",
        ],
        &e,
    );
    assert!(
        !o.status.success() && err(&o).contains("organization"),
        "{}",
        err(&o)
    );

    // A deployment environment: its own key pair and secrets.
    let env_ref = "github://acme/app?environment=production";
    let o = run(
        d,
        &["generate-key-pair", "--output-key-prefix", "prod", env_ref],
        &e,
    );
    assert!(o.status.success(), "{}", err(&o));
    assert!(err(&o).contains("environment production"), "{}", err(&o));
    outputs += &(out(&o) + &err(&o));
    let prod = stored(&fake, "repos/acme/app/environments/production").await;
    let prod_pub = check_pair(&prod, &d.join("prod.pub"));
    assert_ne!(prod_pub, rotated_pub);
    assert_eq!(
        stored(&fake, "repos/acme/app").await.public_key,
        rotated_pub
    );
    let o = run(d, &["public-key", "--key", env_ref], &e);
    assert_eq!(out(&o), prod_pub, "{}", err(&o));

    // Every request as GitHub wants it.
    let reqs = fake.control("/_fake/requests").await;
    for r in reqs.as_array().unwrap() {
        assert_eq!(r["auth"], "Bearer", "{r}");
        assert_eq!(r["api_version"], "2022-11-28", "{r}");
        assert_eq!(r["accept"], "application/vnd.github+json", "{r}");
        assert!(
            r["user_agent"]
                .as_str()
                .is_some_and(|u| u.starts_with("keybroker/")),
            "{r}"
        );
    }

    // No secret in keybroker's output or the fake's log.
    let mut secrets = vec![PASSWORD, TOKEN];
    let keys = [
        &repo.private_key,
        &rotated.private_key,
        &org.private_key,
        &prod.private_key,
    ];
    secrets.extend(keys.iter().map(|k| k.as_str()));
    assert_no_secret("keybroker's output", &outputs, &secrets);
    assert_no_secret("the fake's log", &fake.log(), &secrets);
}

#[tokio::test]
async fn github_errors_say_what_to_do_and_write_nothing() {
    let Some(fake) = fake(&[]) else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases: [(&str, &str, &[&str]); 5] = [
        (
            "ghp_wrong",
            "github://acme/app",
            &["401", "Bad credentials", "GITHUB_TOKEN"],
        ),
        (READONLY, "github://acme/app", &["403", "Secrets"]),
        (
            TOKEN,
            "github://acme/missing",
            &["404", "no such repository"],
        ),
        (TOKEN, "github://nobody-org", &["404"]),
        (
            TOKEN,
            "github://acme/app?environment=staging",
            &["404", "environment staging"],
        ),
    ];
    for (token, reference, needles) in cases {
        let o = run(d, &["generate-key-pair", reference], &env(&fake, token));
        assert!(!o.status.success(), "{reference} with {token} succeeded");
        let e = err(&o);
        for n in needles {
            assert!(e.contains(n), "{reference}: {n:?} not in {e}");
        }
        assert!(e.lines().count() <= 2, "not a short message: {e}");
        assert_no_secret(
            "keybroker's output",
            &(out(&o) + &e),
            &[PASSWORD, TOKEN, READONLY, "ghp_wrong"],
        );
        assert!(
            !d.join("cosign.pub").exists(),
            "{reference}: cosign.pub written after a failure"
        );
    }
    assert!(stored_names(&fake, "repos/acme/app").await.is_empty());
    let o = run(
        d,
        &["public-key", "--key", "github://acme/app"],
        &env(&fake, TOKEN),
    );
    assert!(!o.status.success());
    assert!(
        err(&o).contains("no Actions variable COSIGN_PUBLIC_KEY"),
        "{}",
        err(&o)
    );
    let o = run(
        d,
        &["generate-key-pair", "github://acme/app"],
        &[("GITHUB_API_URL", fake.base.clone())],
    );
    assert!(
        !o.status.success() && err(&o).contains("set GITHUB_TOKEN"),
        "{}",
        err(&o)
    );
    assert_no_secret("the fake's log", &fake.log(), &[PASSWORD, TOKEN, READONLY]);
}

async fn stored_names(fake: &Fake, scope: &str) -> Vec<String> {
    let v = fake.control(&format!("/_fake/secrets/{scope}")).await;
    v["secrets"].as_object().unwrap().keys().cloned().collect()
}

#[tokio::test]
async fn github_enterprise_server_from_github_host() {
    let Some(fake) = fake(&["--prefix", "/api/v3"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let e = vec![
        ("GITHUB_HOST", fake.base.clone()),
        ("GITHUB_TOKEN", TOKEN.to_string()),
        ("COSIGN_PASSWORD", PASSWORD.to_string()),
    ];
    let o = run(dir.path(), &["generate-key-pair", "github://acme/app"], &e);
    assert!(o.status.success(), "{}", err(&o));
    assert!(err(&o).contains("/api/v3"), "{}", err(&o));
    check_pair(
        &stored(&fake, "repos/acme/app").await,
        &dir.path().join("cosign.pub"),
    );
}

#[tokio::test]
async fn keybrokerd_refuses_github_as_a_signing_key() {
    let config =
        keybroker_broker::config::Config::parse("[keys.gh]\nref = \"github://acme/app\"\n")
            .unwrap();
    let e = keybroker_broker::keys::open_all(&config.keys, keybroker_broker::keys::Startup::Strict)
        .await
        .unwrap_err();
    assert!(
        e.contains("never returns")
            && e.contains("env://COSIGN_PRIVATE_KEY")
            && e.contains("COSIGN_PASSWORD"),
        "{e}"
    );
}
