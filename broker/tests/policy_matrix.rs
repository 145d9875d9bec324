//! The policy against the real `keybrokerd` (issue 6, "Tests"):
//!
//! * a matrix over every rule dimension (caller uid / gid / neither / `*`; key
//!   listed / not listed / `*`; image globs `*` and `**`; required annotations;
//!   raw `Sign` and `allow_raw_digest`): each request is allowed or refused with
//!   PERMISSION_DENIED, the refusal names the rule family that failed and nothing
//!   of the other rules, and each decision has its audit record;
//! * several users on one socket: clients running as other uids/gids (through
//!   `setpriv`) see and use only the keys their rules give them, and the audit
//!   log names them. This needs root (it is, here and in CI).

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use hyper_util::rt::TokioIo;
use keybroker_proto::v1::{ListKeysRequest, SignImageRequest, SignRequest};
use keybroker_providers::{ecdsa::verify_digest, Sha256Digest};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tonic::{transport::Endpoint, Code, Status};

// ---------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------

/// A running keybrokerd with its own config, socket and audit log.
struct Daemon {
    child: Child,
    socket: PathBuf,
    audit: PathBuf,
    log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_key(path: &Path) {
    let (_, der) = keybroker_providers::P256Signer::generate().unwrap();
    std::fs::write(path, keybroker_providers::pem::encode("PRIVATE KEY", &der)).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

fn egid() -> u32 {
    // SAFETY: getegid cannot fail.
    unsafe { libc::getegid() }
}

/// The config text: `[server]` (socket, audit log, `server_extra`), one file key
/// per alias, then `policy` verbatim.
fn config_text(dir: &Path, aliases: &[&str], server_extra: &str, policy: &str) -> String {
    let mut s = format!(
        "[server]\nsocket = \"{}\"\naudit_log = \"{}\"\n{server_extra}\n",
        dir.join("keybroker.sock").display(),
        dir.join("audit.jsonl").display()
    );
    for alias in aliases {
        let key = dir.join(format!("{alias}.pem"));
        write_key(&key);
        s += &format!("[keys.{alias}]\nref = \"{}\"\n", key.display());
    }
    s + policy
}

async fn start(dir: &Path, config: &str) -> Daemon {
    let cfg = dir.join("keybrokerd.toml");
    std::fs::write(&cfg, config).unwrap();
    let log = dir.join("keybrokerd.log");
    let child = Command::new(env!("CARGO_BIN_EXE_keybrokerd"))
        .arg("--config")
        .arg(&cfg)
        .env_remove("KEYBROKER_SOCKET")
        .env_remove("KEYBROKERD_CONFIG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn keybrokerd");
    let mut d = Daemon {
        child,
        socket: dir.join("keybroker.sock"),
        audit: dir.join("audit.jsonl"),
        log,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::UnixStream::connect(&d.socket).await.is_err() {
        let exited = d.child.try_wait().unwrap();
        assert!(
            exited.is_none() && Instant::now() < deadline,
            "keybrokerd did not start serving ({exited:?}):\n{}\nconfig:\n{config}",
            std::fs::read_to_string(&d.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    d
}

async fn client(socket: &Path) -> keybroker_proto::Client {
    let socket = socket.to_path_buf();
    let channel = Endpoint::from_static("http://keybrokerd.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let s = socket.clone();
            async move { tokio::net::UnixStream::connect(s).await.map(TokioIo::new) }
        }))
        .await
        .expect("connect to keybrokerd");
    keybroker_proto::client(channel)
}

fn audit_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn line_hash(line: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(line.as_bytes())))
}

// ---------------------------------------------------------------------------
// Requests and what a refusal says
// ---------------------------------------------------------------------------

/// The rule family a refusal names (policy.rs `Denied`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Caller,
    Key,
    Image,
    /// Naming exactly these missing annotations.
    Annotations(&'static [&'static str]),
    RawDigest,
}

impl Family {
    const ALL: [Family; 5] = [
        Family::Caller,
        Family::Key,
        Family::Image,
        Family::Annotations(&[]),
        Family::RawDigest,
    ];

    /// The words of `Denied`'s message that say which family failed.
    fn marker(self) -> &'static str {
        match self {
            Family::Caller => "no policy rule admits caller",
            Family::Key => "let this caller use key",
            Family::Image => "let this caller sign ",
            Family::Annotations(_) => "missing required annotation",
            Family::RawDigest => "raw digest signing is not allowed",
        }
    }

    /// The one family a refusal message names, or why it names none / several.
    fn of(message: &str) -> Result<Family, String> {
        let named: Vec<Family> = Family::ALL
            .into_iter()
            .filter(|f| message.contains(f.marker()))
            .collect();
        match named[..] {
            [f] => Ok(f),
            _ => Err(format!("names families {named:?}: {message:?}")),
        }
    }

    fn same_kind(self, other: Family) -> bool {
        std::mem::discriminant(&self) == std::mem::discriminant(&other)
    }
}

#[derive(Debug, Clone, Copy)]
enum Call {
    /// `Sign` of a raw digest.
    Raw { key: &'static str },
    /// `SignImage` with these annotation keys (values are "v").
    Image {
        key: &'static str,
        image: &'static str,
        annotations: &'static [&'static str],
    },
}

impl Call {
    fn key(self) -> &'static str {
        match self {
            Call::Raw { key } | Call::Image { key, .. } => key,
        }
    }

    /// Everything the request itself carries: a refusal may echo these.
    fn own_words(self) -> Vec<&'static str> {
        match self {
            Call::Raw { key } => vec![key],
            Call::Image {
                key,
                image,
                annotations,
            } => [key, image]
                .into_iter()
                .chain(annotations.iter().copied())
                .collect(),
        }
    }
}

fn raw(key: &'static str) -> Call {
    Call::Raw { key }
}

fn image(key: &'static str, image: &'static str, annotations: &'static [&'static str]) -> Call {
    Call::Image {
        key,
        image,
        annotations,
    }
}

#[derive(Debug, Clone, Copy)]
enum Expect {
    Allowed,
    Denied(Family),
    /// The alias is not in `[keys]`: NOT_FOUND, before the policy is asked.
    NoSuchKey,
}
use Expect::{Allowed, Denied, NoSuchKey};
use Family::{Annotations, Caller, Image, Key, RawDigest};

const MANIFEST_DIGEST: &str =
    "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// Makes the call; on success checks the signature (and the payload's
/// authenticated caller) and returns nothing, else the status.
async fn perform(c: &mut keybroker_proto::Client, call: Call) -> Result<(), Status> {
    let caller = format!("unix:uid={},gid={}", euid(), egid());
    match call {
        Call::Raw { key } => {
            let digest = Sha256Digest::of(b"policy matrix");
            let r = c
                .sign(SignRequest {
                    key: key.into(),
                    digest: digest.as_bytes().to_vec(),
                })
                .await?
                .into_inner();
            let pem = r.key.expect("key info").public_key_pem;
            verify_digest(&pem, &digest, &r.signature).expect("signature verifies");
        }
        Call::Image {
            key,
            image,
            annotations,
        } => {
            let r = c
                .sign_image(SignImageRequest {
                    key: key.into(),
                    docker_reference: image.into(),
                    manifest_digest: MANIFEST_DIGEST.into(),
                    annotations: annotations
                        .iter()
                        .map(|a| (a.to_string(), "v".to_string()))
                        .collect(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let pem = r.key.expect("key info").public_key_pem;
            verify_digest(&pem, &Sha256Digest::of(&r.payload), &r.signature)
                .expect("signature over the payload verifies");
            let p: Value = serde_json::from_slice(&r.payload).unwrap();
            assert_eq!(p["critical"]["identity"]["docker-reference"], image);
            assert_eq!(
                p["critical"]["image"]["docker-manifest-digest"],
                MANIFEST_DIGEST
            );
            assert_eq!(p["optional"]["keybroker.dev/caller"], caller.as_str());
            for a in annotations {
                assert_eq!(p["optional"][*a], "v", "annotation {a} in the payload");
            }
        }
    }
    Ok(())
}

/// Every string of every `[[policy]]` rule (callers, keys, image globs,
/// required annotations): what a refusal must not reveal beyond what the
/// request itself carried.
fn policy_words(config: &str) -> Vec<String> {
    let v: toml::Table = toml::from_str(config).unwrap();
    let mut words = Vec::new();
    for rule in v.get("policy").and_then(|p| p.as_array()).unwrap() {
        for field in ["callers", "keys", "images", "require_annotations"] {
            for w in rule
                .get(field)
                .and_then(|f| f.as_array())
                .into_iter()
                .flatten()
            {
                words.push(w.as_str().unwrap().to_string());
            }
        }
    }
    words
}

/// Checks a refusal's message: exactly the expected family, the request's key /
/// image / missing annotations named, and no word of the policy the request did
/// not carry itself.
fn check_refusal(message: &str, want: Family, call: Call, policy: &[String]) -> Result<(), String> {
    let got = Family::of(message)?;
    if !got.same_kind(want) {
        return Err(format!(
            "refusal names {got:?}, expected {want:?}: {message:?}"
        ));
    }
    let mut may_echo = call.own_words();
    match (want, call) {
        (Family::Key | Family::RawDigest, _) if !message.contains(&format!("{:?}", call.key())) => {
            return Err(format!(
                "refusal does not name key {:?}: {message:?}",
                call.key()
            ));
        }
        (Family::Image, Call::Image { image, .. }) if !message.contains(image) => {
            return Err(format!("refusal does not name image {image}: {message:?}"));
        }
        (Family::Annotations(missing), _) => {
            let listed = message
                .split_once(": ")
                .map(|(_, l)| l.split(", ").collect::<Vec<_>>())
                .unwrap_or_default();
            let (mut listed, mut missing) = (listed, missing.to_vec());
            listed.sort_unstable();
            missing.sort_unstable();
            if listed != missing {
                return Err(format!(
                    "refusal lists {listed:?}, expected {missing:?}: {message:?}"
                ));
            }
            may_echo.extend(missing);
        }
        _ => {}
    }
    if let Some(leak) = policy
        .iter()
        .find(|w| message.contains(w.as_str()) && !may_echo.iter().any(|e| e.contains(w.as_str())))
    {
        return Err(format!("refusal leaks policy text {leak:?}: {message:?}"));
    }
    Ok(())
}

/// Checks the one audit record a call must have added (and its chain link).
fn check_audit(
    before: &[String],
    after: &[String],
    call: Call,
    result: &Result<(), Status>,
) -> Result<(), String> {
    if after.len() != before.len() + 1 || after[..before.len()] != *before {
        return Err(format!(
            "expected exactly one new audit record, log went from {} to {} lines",
            before.len(),
            after.len()
        ));
    }
    let line = after.last().unwrap();
    let rec: Value = serde_json::from_str(line).map_err(|e| format!("audit line {line}: {e}"))?;
    let prev = before
        .last()
        .map_or_else(|| format!("sha256:{}", "0".repeat(64)), |l| line_hash(l));
    let (rpc, image) = match call {
        Call::Raw { .. } => ("Sign", None),
        Call::Image { image, .. } => ("SignImage", Some(image)),
    };
    let mut want = vec![
        ("prev", Value::from(prev)),
        ("rpc", rpc.into()),
        ("key", call.key().into()),
        ("/caller/uid", euid().into()),
        ("/caller/gid", egid().into()),
        ("/caller/pid", std::process::id().into()),
    ];
    if let Some(image) = image {
        want.push(("image", image.into()));
        want.push(("digest", MANIFEST_DIGEST.into()));
    }
    match result {
        Ok(()) => {
            want.push(("decision", "allowed".into()));
            if rec.get("reason").is_some() || rec.get("key_version").is_none() {
                return Err(format!(
                    "allowed record with a reason or without key_version: {line}"
                ));
            }
        }
        Err(s) => {
            want.push(("decision", "denied".into()));
            want.push(("reason", s.message().into()));
        }
    }
    for (field, value) in want {
        let got = if field.starts_with('/') {
            rec.pointer(field)
        } else {
            rec.get(field)
        };
        if got != Some(&value) {
            return Err(format!("audit {field}: {got:?}, expected {value}: {line}"));
        }
    }
    if let Call::Image { annotations, .. } = call {
        for a in annotations {
            if rec["annotations"][*a] != "v" {
                return Err(format!("audit record lacks annotation {a}: {line}"));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The matrix
// ---------------------------------------------------------------------------

/// One policy and what it does with each request. `{uid}` / `{gid}` stand for
/// the test's own (effective) ids, which are the caller's on the socket.
struct Scenario {
    name: &'static str,
    policy: &'static str,
    cases: Vec<(Call, Expect)>,
}

/// Keys defined in every scenario's `[keys]`; "ghost-key" is in none.
const ALIASES: [&str; 3] = ["release-key", "nightly-key", "decoy-key"];

/// Appended to every scenario: someone else's rule. No refusal may mention it.
const DECOY_RULE: &str = r#"
[[policy]]
callers = ["uid:31337", "gid:31338"]
keys = ["decoy-key"]
images = ["reg.test/decoy-team/**"]
require_annotations = ["decoy-approval"]
allow_raw_digest = true
"#;

fn scenarios() -> Vec<Scenario> {
    vec![
        // ---- caller ----
        Scenario {
            name: "caller: uid matches",
            policy: r#"
[[policy]]
callers = ["uid:{uid}"]
keys = ["release-key"]
images = ["**"]
allow_raw_digest = true
"#,
            cases: vec![
                (raw("release-key"), Allowed),
                (image("release-key", "reg.test/app/x", &[]), Allowed),
            ],
        },
        Scenario {
            name: "caller: gid matches (the uid listed is someone else's)",
            policy: r#"
[[policy]]
callers = ["uid:4242", "gid:{gid}"]
keys = ["release-key"]
images = ["**"]
allow_raw_digest = true
"#,
            cases: vec![
                (raw("release-key"), Allowed),
                (image("release-key", "reg.test/app/x", &[]), Allowed),
            ],
        },
        Scenario {
            name: "caller: neither uid nor gid matches",
            policy: r#"
[[policy]]
callers = ["uid:4242", "gid:4243"]
keys = ["release-key"]
images = ["reg.test/app/*"]
require_annotations = ["git-commit"]
allow_raw_digest = true
"#,
            cases: vec![
                (raw("release-key"), Denied(Caller)),
                (
                    image("release-key", "reg.test/app/x", &["git-commit"]),
                    Denied(Caller),
                ),
                (raw("decoy-key"), Denied(Caller)),
                // Aliases are not secret (PublicKey serves any caller): an
                // unknown one is NOT_FOUND even for a caller no rule admits.
                (raw("ghost-key"), NoSuchKey),
            ],
        },
        Scenario {
            name: "caller: `*` admits anyone",
            policy: r#"
[[policy]]
callers = ["*"]
keys = ["release-key"]
images = ["**"]
allow_raw_digest = true
"#,
            cases: vec![(raw("release-key"), Allowed)],
        },
        // ---- key ----
        Scenario {
            name: "key: listed, not listed, unknown",
            policy: r#"
[[policy]]
callers = ["uid:{uid}"]
keys = ["release-key"]
images = ["**"]
allow_raw_digest = true
"#,
            cases: vec![
                (raw("release-key"), Allowed),
                (image("release-key", "reg.test/app/x", &[]), Allowed),
                (raw("nightly-key"), Denied(Key)),
                (image("nightly-key", "reg.test/app/x", &[]), Denied(Key)),
                // Someone else's key, named in someone else's rule.
                (raw("decoy-key"), Denied(Key)),
                (
                    image("decoy-key", "reg.test/decoy-team/x", &["decoy-approval"]),
                    Denied(Key),
                ),
                (raw("ghost-key"), NoSuchKey),
            ],
        },
        Scenario {
            name: "key: `*` covers every key",
            policy: r#"
[[policy]]
callers = ["uid:{uid}"]
keys = ["*"]
images = ["**"]
allow_raw_digest = true
"#,
            cases: vec![
                (raw("release-key"), Allowed),
                (raw("nightly-key"), Allowed),
                (raw("decoy-key"), Allowed),
                (image("nightly-key", "reg.test/app/x", &[]), Allowed),
                (raw("ghost-key"), NoSuchKey),
            ],
        },
        // ---- image ----
        Scenario {
            name: "image: `*` stays within one path segment",
            policy: r#"
[[policy]]
callers = ["uid:{uid}"]
keys = ["release-key"]
images = ["reg.test/app/*"]
"#,
            cases: vec![
                (image("release-key", "reg.test/app/x", &[]), Allowed),
                (image("release-key", "reg.test/app/x/y", &[]), Denied(Image)),
                (image("release-key", "reg.test/app2/x", &[]), Denied(Image)),
                (image("release-key", "reg.test/app", &[]), Denied(Image)),
                (image("release-key", "other.test/app/x", &[]), Denied(Image)),
                // Covered by the decoy rule's glob, which is not this caller's.
                (
                    image("release-key", "reg.test/decoy-team/x", &["decoy-approval"]),
                    Denied(Image),
                ),
            ],
        },
        Scenario {
            name: "image: `**` crosses segments; another key's globs do not count",
            policy: r#"
[[policy]]
callers = ["uid:{uid}"]
keys = ["release-key"]
images = ["reg.test/app/**"]

[[policy]]
callers = ["uid:{uid}"]
keys = ["nightly-key"]
images = ["reg.test/nightly/*"]
"#,
            cases: vec![
                (image("release-key", "reg.test/app/x", &[]), Allowed),
                (image("release-key", "reg.test/app/x/y/z", &[]), Allowed),
                (image("release-key", "reg.test/app2/x", &[]), Denied(Image)),
                (
                    image("release-key", "reg.test/nightly/x", &[]),
                    Denied(Image),
                ),
                (image("nightly-key", "reg.test/nightly/x", &[]), Allowed),
                (image("nightly-key", "reg.test/app/x", &[]), Denied(Image)),
            ],
        },
        Scenario {
            name: "image: a rule without images signs no image",
            policy: r#"
[[policy]]
callers = ["uid:{uid}"]
keys = ["release-key"]
allow_raw_digest = true
"#,
            cases: vec![
                (image("release-key", "reg.test/app/x", &[]), Denied(Image)),
                (raw("release-key"), Allowed),
            ],
        },
        // ---- required annotations ----
        Scenario {
            name: "annotations: all present, one missing, all missing",
            policy: r#"
[[policy]]
callers = ["uid:{uid}"]
keys = ["release-key"]
images = ["reg.test/app/**"]
require_annotations = ["git-commit", "ci-pipeline"]

[[policy]]
callers = ["uid:{uid}"]
keys = ["nightly-key"]
images = ["reg.test/app/**"]
require_annotations = ["nightly-ticket"]
"#,
            cases: vec![
                (
                    image(
                        "release-key",
                        "reg.test/app/x",
                        &["git-commit", "ci-pipeline"],
                    ),
                    Allowed,
                ),
                (
                    image(
                        "release-key",
                        "reg.test/app/x",
                        &["ci-pipeline", "git-commit", "note"],
                    ),
                    Allowed,
                ),
                (
                    image("release-key", "reg.test/app/x", &["git-commit"]),
                    Denied(Annotations(&["ci-pipeline"])),
                ),
                (
                    image("release-key", "reg.test/app/x", &["ci-pipeline"]),
                    Denied(Annotations(&["git-commit"])),
                ),
                // The other key's requirement is neither asked for nor named.
                (
                    image("release-key", "reg.test/app/x", &[]),
                    Denied(Annotations(&["git-commit", "ci-pipeline"])),
                ),
                (
                    image("nightly-key", "reg.test/app/x", &["git-commit"]),
                    Denied(Annotations(&["nightly-ticket"])),
                ),
                (
                    image("nightly-key", "reg.test/app/x", &["nightly-ticket"]),
                    Allowed,
                ),
                // Annotations are about image payloads, not raw digests.
                (raw("release-key"), Denied(RawDigest)),
            ],
        },
        Scenario {
            name: "annotations: rules are alternatives",
            policy: r#"
[[policy]]
callers = ["uid:{uid}"]
keys = ["release-key"]
images = ["reg.test/app/**"]
require_annotations = ["git-commit", "ci-pipeline"]

[[policy]]
callers = ["gid:{gid}"]
keys = ["release-key"]
images = ["reg.test/app/dev/*"]
"#,
            cases: vec![
                (image("release-key", "reg.test/app/dev/x", &[]), Allowed),
                (
                    image("release-key", "reg.test/app/prod/x", &[]),
                    Denied(Annotations(&["git-commit", "ci-pipeline"])),
                ),
            ],
        },
        // ---- raw digests ----
        Scenario {
            name: "raw Sign: allow_raw_digest true / false",
            policy: r#"
[[policy]]
callers = ["uid:{uid}"]
keys = ["release-key"]
images = ["**"]
allow_raw_digest = true

[[policy]]
callers = ["uid:{uid}"]
keys = ["nightly-key"]
images = ["**"]
allow_raw_digest = false
"#,
            cases: vec![
                (raw("release-key"), Allowed),
                (raw("nightly-key"), Denied(RawDigest)),
                (image("nightly-key", "reg.test/app/x", &[]), Allowed),
                (raw("decoy-key"), Denied(Key)),
            ],
        },
        // ---- which family is reported ----
        Scenario {
            name: "the first failing family is the one reported",
            policy: r#"
[[policy]]
callers = ["uid:{uid}"]
keys = ["release-key"]
images = ["reg.test/app/*"]
require_annotations = ["git-commit"]
"#,
            cases: vec![
                // Wrong key and wrong image: the key.
                (image("nightly-key", "reg.test/other/x", &[]), Denied(Key)),
                // Wrong image and missing annotation: the image.
                (image("release-key", "reg.test/other/x", &[]), Denied(Image)),
                (
                    image("release-key", "reg.test/app/x", &[]),
                    Denied(Annotations(&["git-commit"])),
                ),
                (
                    image("release-key", "reg.test/app/x", &["git-commit"]),
                    Allowed,
                ),
            ],
        },
    ]
}

#[tokio::test]
async fn policy_matrix_on_the_real_daemon() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for s in scenarios() {
        let dir = tempfile::tempdir().unwrap();
        let policy = format!("{}{DECOY_RULE}", s.policy)
            .replace("{uid}", &euid().to_string())
            .replace("{gid}", &egid().to_string());
        let config = config_text(dir.path(), &ALIASES, "", &policy);
        let words = policy_words(&config);
        let d = start(dir.path(), &config).await;
        let mut c = client(&d.socket).await;
        for (i, (call, expect)) in s.cases.into_iter().enumerate() {
            let before = audit_lines(&d.audit);
            let result = perform(&mut c, call).await;
            let after = audit_lines(&d.audit);
            let verdict = match (&result, expect) {
                (Ok(()), Allowed) => Ok(()),
                (Err(e), Denied(f)) if e.code() == Code::PermissionDenied => {
                    check_refusal(e.message(), f, call, &words)
                }
                (Err(e), NoSuchKey) if e.code() == Code::NotFound => Ok(()),
                (got, want) => Err(format!("expected {want:?}, got {got:?}")),
            }
            .and_then(|()| check_audit(&before, &after, call, &result));
            if let Err(why) = verdict {
                failures.push(format!("[{}] case {i} {call:?}: {why}", s.name));
            }
            checked += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} policy cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------
// Several users on one socket
// ---------------------------------------------------------------------------

/// Set (to the socket path) only when the test binary is re-run as another user
/// to act as the client of [`several_uids_on_one_socket`].
const CLIENT_ENV: &str = "KEYBROKER_POLICY_MATRIX_CLIENT_SOCKET";

const NOBODY: u32 = 65534;
/// A uid with no rule of its own.
const STRANGER: u32 = 65533;

/// Rules of the multi-user daemon: "a" for nobody's uid, "b" for ours, "c"
/// (images only) for nobody's gid.
const MULTI_USER_POLICY: &str = r#"
[[policy]]
callers = ["uid:65534"]
keys = ["a"]
images = ["**"]
allow_raw_digest = true

[[policy]]
callers = ["uid:{uid}"]
keys = ["b"]
images = ["**"]
allow_raw_digest = true

[[policy]]
callers = ["gid:65534"]
keys = ["c"]
images = ["reg.test/shared/*"]
"#;

/// The requests every client identity makes, in this order.
fn client_script() -> Vec<(String, Call)> {
    let mut script = Vec::new();
    for key in ["a", "b", "c"] {
        script.push((format!("sign:{key}"), raw(key)));
        script.push((format!("image:{key}"), image(key, "reg.test/shared/x", &[])));
    }
    script
}

/// Runs [`client_script`] (plus ListKeys) and returns `label -> outcome`, the
/// outcome being "ok", the refusal's family (`Key`, `Caller`, …) or the code.
async fn run_client_script(socket: &Path) -> BTreeMap<String, String> {
    let mut c = client(socket).await;
    let mut keys: Vec<String> = c
        .list_keys(ListKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys
        .into_iter()
        .map(|k| k.alias)
        .collect();
    keys.sort();
    let mut out = BTreeMap::from([("list".to_string(), keys.join(","))]);
    for (label, call) in client_script() {
        let outcome = match perform(&mut c, call).await {
            Ok(()) => "ok".to_string(),
            Err(e) if e.code() == Code::PermissionDenied => match Family::of(e.message()) {
                Ok(Family::Annotations(_)) => "Annotations".to_string(),
                Ok(f) => format!("{f:?}"),
                Err(why) => why,
            },
            Err(e) => format!("{:?}: {}", e.code(), e.message()),
        };
        out.insert(label, outcome);
    }
    out
}

/// Not a test of its own: the client half of [`several_uids_on_one_socket`],
/// run in a copy of this binary under `setpriv` as another user. Does nothing
/// unless that test started it.
#[tokio::test]
async fn other_user_client() {
    let Some(socket) = std::env::var_os(CLIENT_ENV) else {
        return;
    };
    for (label, outcome) in run_client_script(Path::new(&socket)).await {
        println!("RESULT {label} {outcome}");
    }
}

/// Prints SKIPPED (or fails, under CI) when the host cannot run this test.
fn cannot_run(why: &str) {
    assert!(std::env::var_os("CI").is_none(), "{why}: required under CI");
    eprintln!("SKIPPED: {why}");
}

/// Whether this host can run programs as other users; says why not otherwise.
fn other_users_available() -> bool {
    if euid() != 0 {
        cannot_run("running a client as another user needs root");
        return false;
    }
    let setpriv = Command::new("setpriv").arg("--version").output();
    if !setpriv.is_ok_and(|o| o.status.success()) {
        cannot_run("setpriv (util-linux) is not installed");
        return false;
    }
    true
}

fn as_user(uid: u32, gid: u32, program: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg("--")
        .arg(program)
        .env_remove(CLIENT_ENV)
        .env_remove("KEYBROKER_SOCKET");
    cmd
}

/// `program` itself if nobody can run it where it is (`probe` must succeed),
/// else a copy in `copies` (0755, in a 0755 directory).
fn runnable_by_nobody(program: &Path, probe: &str, copies: &Path) -> PathBuf {
    let in_place = as_user(NOBODY, NOBODY, program)
        .arg(probe)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if in_place {
        return program.to_path_buf();
    }
    std::fs::set_permissions(copies, std::fs::Permissions::from_mode(0o755)).unwrap();
    let copy = copies.join(program.file_name().unwrap());
    std::fs::copy(program, &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

/// A daemon any local user can reach (socket 0666 in a 0755 directory).
async fn multi_user_daemon(dir: &Path) -> Daemon {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let policy = MULTI_USER_POLICY.replace("{uid}", &euid().to_string());
    let config = config_text(dir, &["a", "b", "c"], "socket_mode = \"0666\"", &policy);
    let d = start(dir, &config).await;
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666, "socket mode");
    d
}

#[tokio::test]
async fn several_uids_on_one_socket() {
    if !other_users_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let copies = tempfile::tempdir().unwrap();
    let d = multi_user_daemon(dir.path()).await;
    let me = std::env::current_exe().unwrap();
    let exe = runnable_by_nobody(&me, "--list", copies.path());

    // (uid, gid, keys listed, then the outcome of each client_script() call).
    let ok = "ok";
    let expected: [(u32, u32, &str, [&str; 6]); 3] = [
        // sign:a image:a sign:b image:b sign:c image:c
        (
            NOBODY,
            NOBODY,
            "a,c",
            [ok, ok, "Key", "Key", "RawDigest", ok],
        ),
        // Only nobody's gid: rule "c" alone.
        (
            STRANGER,
            NOBODY,
            "c",
            ["Key", "Key", "Key", "Key", "RawDigest", ok],
        ),
        (STRANGER, STRANGER, "", ["Caller"; 6]),
    ];
    let mut pids = BTreeMap::new();
    for (uid, gid, list, outcomes) in expected {
        let child = as_user(uid, gid, &exe)
            .args([
                "--exact",
                "other_user_client",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CLIENT_ENV, &d.socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "client as {uid}:{gid} failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: BTreeMap<String, String> = stdout
            .lines()
            // libtest prints "test other_user_client ... " without a newline.
            .filter_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
            .map(|l| {
                let (k, v) = l.split_once(' ').unwrap_or((l, ""));
                (k.to_string(), v.to_string())
            })
            .collect();
        let mut want = BTreeMap::from([("list".to_string(), list.to_string())]);
        for ((label, _), outcome) in client_script().into_iter().zip(outcomes) {
            want.insert(label, outcome.to_string());
        }
        assert_eq!(got, want, "client as uid {uid} gid {gid}:\n{stdout}");
        pids.insert(pid, (uid, gid));
    }

    // Ourselves, on the same socket at the same time: only "b".
    let mine = run_client_script(&d.socket).await;
    let want: BTreeMap<String, String> = [
        ("list", "b"),
        ("sign:a", "Key"),
        ("image:a", "Key"),
        ("sign:b", "ok"),
        ("image:b", "ok"),
        ("sign:c", "Key"),
        ("image:c", "Key"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(mine, want, "client as ourselves (uid {})", euid());

    // The audit log names each of them: the kernel's uid/gid and the pid of the
    // process that asked, with the right decision.
    let records: Vec<Value> = audit_lines(&d.audit)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 4 * 6, "one record per signing request");
    let mut by_caller: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
    for r in &records {
        let (uid, gid) = (
            r["caller"]["uid"].as_u64().unwrap(),
            r["caller"]["gid"].as_u64().unwrap(),
        );
        let pid = r["caller"]["pid"].as_u64().unwrap() as u32;
        if uid != u64::from(euid()) {
            assert_eq!(
                pids.get(&pid),
                Some(&(uid as u32, gid as u32)),
                "audit pid {pid} is not the client that ran as {uid}:{gid}: {r}"
            );
            assert_eq!(
                r["caller"]["exe"].as_str().map(PathBuf::from),
                Some(exe.canonicalize().unwrap()),
                "{r}"
            );
        }
        let rpc = if r["rpc"] == "Sign" { "sign" } else { "image" };
        by_caller.entry((uid, gid)).or_default().push(format!(
            "{rpc}:{} {}",
            r["key"].as_str().unwrap(),
            r["decision"].as_str().unwrap()
        ));
    }
    let decisions = |outcomes: [&str; 6]| -> Vec<String> {
        client_script()
            .into_iter()
            .zip(outcomes)
            .map(|((label, _), o)| {
                format!("{label} {}", if o == "ok" { "allowed" } else { "denied" })
            })
            .collect()
    };
    let mut want = BTreeMap::new();
    for (uid, gid, _, outcomes) in expected {
        want.insert((u64::from(uid), u64::from(gid)), decisions(outcomes));
    }
    want.insert(
        (u64::from(euid()), u64::from(egid())),
        decisions(["denied", "denied", ok, ok, "denied", "denied"]),
    );
    assert_eq!(by_caller, want, "audit decisions by caller");
}

#[tokio::test]
async fn keybroker_keys_lists_each_users_own_keys() {
    if !other_users_available() {
        return;
    }
    let cli = PathBuf::from(env!("CARGO_BIN_EXE_keybrokerd")).with_file_name("keybroker");
    if !cli.exists() {
        cannot_run(&format!(
            "{} is not built (cargo build -p keybroker-client)",
            cli.display()
        ));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let copies = tempfile::tempdir().unwrap();
    let d = multi_user_daemon(dir.path()).await;
    let cli_for_nobody = runnable_by_nobody(&cli, "--version", copies.path());

    let keys = |mut cmd: Command| {
        let out = cmd
            .arg("--socket")
            .arg(&d.socket)
            .arg("keys")
            .env_remove("KEYBROKER_SOCKET")
            .env_remove("KEYBROKER_URL")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "keybroker keys: {stderr}");
        let aliases: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split('\t').next().unwrap().to_string())
            .collect();
        (aliases, stderr)
    };
    let (nobody, _) = keys(as_user(NOBODY, NOBODY, &cli_for_nobody));
    assert_eq!(nobody, ["a", "c"], "keys as nobody");
    let (gid_only, _) = keys(as_user(STRANGER, NOBODY, &cli_for_nobody));
    assert_eq!(gid_only, ["c"], "keys as uid {STRANGER} in nobody's group");
    let (stranger, stderr) = keys(as_user(STRANGER, STRANGER, &cli_for_nobody));
    assert!(stranger.is_empty(), "keys as a stranger: {stranger:?}");
    assert!(stderr.contains("no keys"), "{stderr}");
    let (me, _) = keys(Command::new(&cli));
    assert_eq!(me, ["b"], "keys as uid {}", euid());
}

/// `gid:N` rules admit members of N through their supplementary groups (read
/// with SO_PEERGROUPS at connect), as file permissions on the socket would.
#[tokio::test]
async fn supplementary_groups_count_for_gid_rules() {
    if !other_users_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let copies = tempfile::tempdir().unwrap();
    let d = multi_user_daemon(dir.path()).await;
    let me = std::env::current_exe().unwrap();
    let exe = runnable_by_nobody(&me, "--list", copies.path());
    // A stranger whose primary group is its own, but who is in nobody's group.
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={STRANGER}"))
        .arg(format!("--regid={STRANGER}"))
        .arg(format!("--groups={NOBODY}"))
        .arg("--")
        .arg(&exe)
        .args([
            "--exact",
            "other_user_client",
            "--nocapture",
            "--test-threads=1",
        ])
        .env_remove("KEYBROKER_SOCKET")
        .env(CLIENT_ENV, &d.socket);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: BTreeMap<String, String> = stdout
        .lines()
        .filter_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap_or((l, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    assert_eq!(got.get("list").map(String::as_str), Some("c"), "{stdout}");
    assert_eq!(
        got.get("image:c").map(String::as_str),
        Some("ok"),
        "{stdout}"
    );
    assert_eq!(
        got.get("sign:a").map(String::as_str),
        Some("Key"),
        "{stdout}"
    );
    // The audit record lists the groups the kernel reported.
    let last: Value = serde_json::from_str(audit_lines(&d.audit).last().unwrap()).unwrap();
    assert_eq!(last["caller"]["uid"], STRANGER);
    assert!(
        last["caller"]["groups"]
            .as_array()
            .unwrap()
            .contains(&Value::from(NOBODY)),
        "{last}"
    );
}
