//! GitLab CI/CD variables (`gitlab://PROJECT_ID`, `gitlab://GROUP/PROJECT`,
//! `gitlab://GROUP`), as cosign stores a key pair there: `COSIGN_PRIVATE_KEY`
//! (cosign-encrypted PEM), `COSIGN_PASSWORD` and `COSIGN_PUBLIC_KEY`.
//!
//! [`GitLabClient`] is the few REST v4 calls we need (token `GITLAB_TOKEN` sent
//! as `PRIVATE-TOKEN`, host `GITLAB_HOST`, default gitlab.com, or a full URL).
//! A reference is tried as a project first and, on 404, as a group, like cosign.
//! Variables are those of environment scope `*`.
//!
//! [`GitLabKey`] is the signing source: it reads the private key and password
//! through the API, decrypts in memory, keeps the key for a TTL (default 60 s)
//! and then reads the variables again, so a rotated key is picked up. The key
//! version it reports is derived from the public key, so the broker notices a
//! rotation at the first signature made with the new key. A refresh that fails
//! fails the signature (the old key is not used past its TTL).

use std::{
    fmt,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Deserialize;
use zeroize::Zeroizing;

use crate::{
    ci_names,
    ecdsa::normalize_public_pem,
    rest::{self, encode_segment},
    Capabilities, Error, KeyProvider, P256Signer, Password, PublicKey, Result, Sha256Digest,
    Signature,
};

/// Default time a decrypted key is used before the variables are read again.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(60);

/// The environment scope keybroker reads and writes.
const SCOPE: &str = "*";

/// Where GitLab is and how to authenticate. `Debug` never shows the token.
#[derive(Clone, Default)]
pub struct GitLabOptions {
    /// Host name (`gitlab.example.com`, https) or a full URL
    /// (`http://127.0.0.1:8080`); default `GITLAB_HOST`, else `gitlab.com`.
    pub host: Option<String>,
    /// Token (api scope); default `GITLAB_TOKEN`.
    pub token: Option<Zeroizing<String>>,
    /// How long a decrypted key is used before the variables are read again;
    /// default 60 s.
    pub cache_ttl: Option<Duration>,
    /// Per-request timeout; default 10 s.
    pub timeout: Option<Duration>,
}

impl fmt::Debug for GitLabOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitLabOptions")
            .field("host", &self.host)
            .field("token", &self.token.as_ref().map(|_| "[redacted]"))
            .field("cache_ttl", &self.cache_ttl)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The REST v4 base URL for a host or URL.
pub fn api_base(host: &str) -> String {
    let base = rest::base_url(host);
    if base.ends_with("/api/v4") {
        base
    } else {
        format!("{base}/api/v4")
    }
}

/// Whether GitLab will mask `value` in job logs when the variable is stored
/// raw (unexpanded), as keybroker stores it: at least 8 characters, one line,
/// no whitespace.
pub fn can_mask(value: &str) -> bool {
    value.chars().count() >= 8 && !value.chars().any(char::is_whitespace)
}

/// A project or group that holds variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetKind {
    /// A project.
    Project,
    /// A group.
    Group,
}

/// A resolved project or group.
#[derive(Debug, Clone)]
pub struct Target {
    /// Project or group.
    pub kind: TargetKind,
    /// Numeric id.
    pub id: u64,
    /// Full path (`group/project`).
    pub full_path: String,
}

impl Target {
    fn collection(&self) -> &'static str {
        match self.kind {
            TargetKind::Project => "projects",
            TargetKind::Group => "groups",
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            TargetKind::Project => "project",
            TargetKind::Group => "group",
        };
        write!(f, "{kind} {} (id {})", self.full_path, self.id)
    }
}

/// A CI/CD variable as read back. `Debug` never shows the value.
pub struct Variable {
    /// Name.
    pub key: String,
    /// Value; `None` for a hidden variable (GitLab never returns those).
    pub value: Option<Zeroizing<String>>,
    /// Masked in job logs.
    pub masked: bool,
    /// Only for protected branches and tags.
    pub protected: bool,
    /// Hidden (masked and never shown again).
    pub hidden: bool,
}

impl fmt::Debug for Variable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Variable")
            .field("key", &self.key)
            .field("value", &"[redacted]")
            .field("masked", &self.masked)
            .field("protected", &self.protected)
            .field("hidden", &self.hidden)
            .finish()
    }
}

#[derive(Deserialize)]
struct VariableJson {
    key: String,
    value: Option<String>,
    #[serde(default)]
    masked: bool,
    #[serde(default)]
    protected: bool,
    #[serde(default)]
    hidden: bool,
}

/// A variable to write (type `env_var`, `raw`, environment scope `*`).
pub struct NewVariable<'a> {
    /// Name.
    pub key: &'a str,
    /// Value.
    pub value: &'a str,
    /// Mask it in job logs (GitLab refuses values it cannot mask).
    pub masked: bool,
    /// Expose it only to protected branches and tags.
    pub protected: bool,
}

/// Whether a write created the variable or replaced an existing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// It did not exist.
    Created,
    /// It existed and was updated.
    Updated,
}

/// The GitLab REST v4 calls keybroker makes. `Debug` never shows the token.
pub struct GitLabClient {
    base: String,
    token: Zeroizing<String>,
    http: reqwest::Client,
}

impl fmt::Debug for GitLabClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitLabClient")
            .field("base", &self.base)
            .finish()
    }
}

impl GitLabClient {
    /// A client for `options` (defaults from `GITLAB_HOST`, `GITLAB_TOKEN`).
    /// Makes no request.
    pub fn new(options: &GitLabOptions) -> Result<Self> {
        let host = options
            .host
            .clone()
            .or_else(|| rest::env_nonempty("GITLAB_HOST"))
            .unwrap_or_else(|| "gitlab.com".into());
        let token = options
            .token
            .clone()
            .or_else(|| rest::env_nonempty("GITLAB_TOKEN").map(Zeroizing::new))
            .ok_or_else(|| {
                Error::PermissionDenied(
                    "no GitLab token: set GITLAB_TOKEN (a token with the api scope whose user is a Maintainer of the project or an Owner of the group)".into(),
                )
            })?;
        let token = Zeroizing::new(token.trim().to_string());
        Ok(GitLabClient {
            base: api_base(&host),
            token,
            http: rest::http_client(options.timeout.unwrap_or(rest::DEFAULT_TIMEOUT))?,
        })
    }

    /// The API base URL (`https://gitlab.com/api/v4`).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// One request; returns the status and the body (zeroized on drop).
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
        what: &str,
    ) -> Result<(u16, Zeroizing<Vec<u8>>)> {
        let mut rb = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("PRIVATE-TOKEN", self.token.as_str())
            .header("Accept", "application/json");
        if let Some(b) = body {
            rb = rb.header("Content-Type", "application/json").body(b);
        }
        let resp = rb
            .send()
            .await
            .map_err(|e| rest::transport_error(what, e))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| rest::transport_error(what, e))?;
        Ok((status, Zeroizing::new(bytes.to_vec())))
    }

    fn error(&self, what: &str, status: u16, body: &[u8], sent: &[&str]) -> Error {
        let detail = rest::server_detail(body, sent);
        let detail = if detail.is_empty() {
            String::new()
        } else {
            format!(" ({detail})")
        };
        let hint = match status {
            401 => "; check GITLAB_TOKEN: it is unknown, expired or revoked (it needs the api scope)",
            403 => "; the token's user needs the Maintainer role on the project (Owner on a group) to read or write CI/CD variables",
            _ => "",
        };
        rest::status_error(
            status,
            format!(
                "{what}: GitLab at {} answered {status}{detail}{hint}",
                self.base
            ),
        )
    }

    /// Resolves `path` (a project id, `GROUP/PROJECT` or `GROUP`): a project,
    /// or, when no project answers to it, a group.
    pub async fn resolve(&self, path: &str) -> Result<Target> {
        let what = format!("gitlab://{path}");
        for (kind, collection, path_field) in [
            (TargetKind::Project, "projects", "path_with_namespace"),
            (TargetKind::Group, "groups", "full_path"),
        ] {
            let (status, body) = self
                .send(
                    reqwest::Method::GET,
                    &format!("/{collection}/{}", encode_segment(path)),
                    None,
                    &what,
                )
                .await?;
            match status {
                200 => {
                    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
                        Error::Other(format!(
                            "{what}: GitLab's {collection} reply is not JSON: {e}"
                        ))
                    })?;
                    let id = v
                        .get("id")
                        .and_then(serde_json::Value::as_u64)
                        .ok_or_else(|| {
                            Error::Other(format!("{what}: GitLab's {collection} reply has no id"))
                        })?;
                    let full_path = v
                        .get(path_field)
                        .and_then(serde_json::Value::as_str)
                        .unwrap_or(path)
                        .to_string();
                    return Ok(Target {
                        kind,
                        id,
                        full_path,
                    });
                }
                404 => continue,
                s => return Err(self.error(&what, s, &body, &[])),
            }
        }
        Err(Error::NotFound(format!(
            "{what}: GitLab at {} has no project or group {path} (or the token cannot see it)",
            self.base
        )))
    }

    fn variable_path(target: &Target, key: Option<&str>) -> String {
        let mut p = format!("/{}/{}/variables", target.collection(), target.id);
        if let Some(k) = key {
            p.push('/');
            p.push_str(&encode_segment(k));
            p.push_str("?filter%5Benvironment_scope%5D=");
            p.push_str(&encode_segment(SCOPE));
        }
        p
    }

    /// Reads variable `key` (environment scope `*`); `None` when it does not exist.
    pub async fn get_variable(&self, target: &Target, key: &str) -> Result<Option<Variable>> {
        let what = format!("reading CI/CD variable {key} of {target}");
        let (status, body) = self
            .send(
                reqwest::Method::GET,
                &Self::variable_path(target, Some(key)),
                None,
                &what,
            )
            .await?;
        match status {
            200 => {
                let v: VariableJson = serde_json::from_slice(&body).map_err(|_| {
                    Error::Other(format!("{what}: GitLab's reply is not a variable"))
                })?;
                Ok(Some(Variable {
                    key: v.key,
                    value: v.value.map(Zeroizing::new),
                    masked: v.masked,
                    protected: v.protected,
                    hidden: v.hidden,
                }))
            }
            404 => Ok(None),
            s => Err(self.error(&what, s, &body, &[])),
        }
    }

    /// Creates or updates a variable (type `env_var`, raw so `$` is never
    /// expanded, environment scope `*`).
    pub async fn put_variable(&self, target: &Target, var: &NewVariable<'_>) -> Result<Written> {
        let what = format!("writing CI/CD variable {} of {target}", var.key);
        let (status, reply) = self
            .send(
                reqwest::Method::PUT,
                &Self::variable_path(target, Some(var.key)),
                Some(variable_body(var, false).to_vec()),
                &what,
            )
            .await?;
        match status {
            200 => return Ok(Written::Updated),
            404 => {}
            s => return Err(self.error(&what, s, &reply, &[var.value])),
        }
        let (status, reply) = self
            .send(
                reqwest::Method::POST,
                &Self::variable_path(target, None),
                Some(variable_body(var, true).to_vec()),
                &what,
            )
            .await?;
        match status {
            200 | 201 => Ok(Written::Created),
            s => Err(self.error(&what, s, &reply, &[var.value])),
        }
    }
}

/// The JSON body of a variable write. Our copies of the value are zeroized
/// (the one handed to the HTTP stack is out of our reach).
fn variable_body(var: &NewVariable<'_>, with_key: bool) -> Zeroizing<Vec<u8>> {
    let mut body = serde_json::json!({
        "value": var.value,
        "variable_type": "env_var",
        "protected": var.protected,
        "masked": var.masked,
        "raw": true,
        "environment_scope": SCOPE,
    });
    if with_key {
        body["key"] = serde_json::Value::String(var.key.to_string());
    }
    let encoded = Zeroizing::new(body.to_string().into_bytes());
    if let Some(serde_json::Value::String(v)) = body.get_mut("value") {
        zeroize::Zeroize::zeroize(v);
    }
    encoded
}

/// Reads `COSIGN_PUBLIC_KEY` of `gitlab://PATH` (what `keybroker public-key` prints).
pub async fn read_public_key(path: &str, options: &GitLabOptions) -> Result<String> {
    let client = GitLabClient::new(options)?;
    let target = client.resolve(path).await?;
    let var = client
        .get_variable(&target, ci_names::PUBLIC_KEY)
        .await?
        .ok_or_else(|| {
            Error::NotFound(format!(
                "gitlab://{path}: {target} has no CI/CD variable {} (create the key pair with keybroker generate-key-pair gitlab://{path})",
                ci_names::PUBLIC_KEY
            ))
        })?;
    let pem = var.value.ok_or_else(|| {
        Error::Unsupported(format!(
            "gitlab://{path}: {} is hidden; GitLab never returns hidden values",
            ci_names::PUBLIC_KEY
        ))
    })?;
    normalize_public_pem(&pem)
}

/// The key version a [`GitLabKey`] reports: the first 16 hex digits of the
/// SHA-256 of its public key PEM, so a rotated key has a new version.
pub fn key_version_of(public_pem: &str) -> String {
    Sha256Digest::of(public_pem.as_bytes()).to_hex()[..16].to_string()
}

struct Loaded {
    at: Instant,
    signer: Arc<P256Signer>,
    version: String,
}

/// A cosign key pair in GitLab CI/CD variables, as a signing source.
pub struct GitLabKey {
    id: String,
    path: String,
    client: GitLabClient,
    ttl: Duration,
    target: tokio::sync::OnceCell<Target>,
    loaded: tokio::sync::Mutex<Option<Loaded>>,
}

impl fmt::Debug for GitLabKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitLabKey")
            .field("id", &self.id)
            .field("api", &self.client.base)
            .field("cache_ttl", &self.ttl)
            .finish()
    }
}

impl GitLabKey {
    /// The key in `gitlab://PATH`. Makes no request: the variables are read at
    /// first use.
    pub fn open(path: &str, options: &GitLabOptions) -> Result<Self> {
        Ok(GitLabKey {
            id: format!("gitlab://{path}"),
            path: path.to_string(),
            client: GitLabClient::new(options)?,
            ttl: options.cache_ttl.unwrap_or(DEFAULT_CACHE_TTL),
            target: tokio::sync::OnceCell::new(),
            loaded: tokio::sync::Mutex::new(None),
        })
    }

    async fn target(&self) -> Result<&Target> {
        self.target
            .get_or_try_init(|| self.client.resolve(&self.path))
            .await
    }

    async fn read_value(&self, target: &Target, key: &str) -> Result<Zeroizing<String>> {
        let var = self.client.get_variable(target, key).await?.ok_or_else(|| {
            Error::NotFound(format!(
                "{}: {target} has no CI/CD variable {key} (environment scope *); create the key pair with keybroker generate-key-pair {}",
                self.id, self.id
            ))
        })?;
        var.value.ok_or_else(|| {
            Error::Unsupported(format!(
                "{}: CI/CD variable {key} is hidden and GitLab never returns hidden values; store it masked but not hidden (keybroker generate-key-pair does)",
                self.id
            ))
        })
    }

    /// Reads both variables and decrypts the key.
    async fn load(&self) -> Result<Loaded> {
        let target = self.target().await?;
        let pem = self.read_value(target, ci_names::PRIVATE_KEY).await?;
        let password = Password::new(
            self.read_value(target, ci_names::PASSWORD)
                .await?
                .as_bytes()
                .to_vec(),
        );
        let signer = P256Signer::from_pem(&pem, Some(&password)).map_err(|e| match e {
            Error::KeyFormat(m) => Error::KeyFormat(format!(
                "{}: CI/CD variable {}: {m}",
                self.id,
                ci_names::PRIVATE_KEY
            )),
            Error::WrongPassword => Error::KeyFormat(format!(
                "{}: {} does not decrypt with {} (wrong password or corrupted key)",
                self.id,
                ci_names::PRIVATE_KEY,
                ci_names::PASSWORD
            )),
            other => other,
        })?;
        let version = key_version_of(signer.public_key_pem());
        Ok(Loaded {
            at: Instant::now(),
            signer: Arc::new(signer),
            version,
        })
    }

    /// The key to use now: the cached one within its TTL, else freshly read.
    /// Concurrent callers wait for one refresh.
    async fn current(&self) -> Result<(Arc<P256Signer>, String)> {
        let mut loaded = self.loaded.lock().await;
        if let Some(l) = loaded.as_ref().filter(|l| l.at.elapsed() < self.ttl) {
            return Ok((l.signer.clone(), l.version.clone()));
        }
        let fresh = match self.load().await {
            // A key pair being replaced right now: the two variables are written
            // one after the other, so read them once more.
            Err(Error::KeyFormat(_)) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                self.load().await?
            }
            other => other?,
        };
        if loaded.as_ref().is_some_and(|l| l.version != fresh.version) {
            tracing::info!(key = %self.id, version = %fresh.version, "GitLab key changed; using the new key");
        }
        let out = (fresh.signer.clone(), fresh.version.clone());
        *loaded = Some(fresh);
        Ok(out)
    }
}

#[async_trait::async_trait]
impl KeyProvider for GitLabKey {
    fn key_id(&self) -> &str {
        &self.id
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            sign: true,
            public_key: true,
        }
    }
    async fn sign_digest(&self, digest: &Sha256Digest) -> Result<Signature> {
        let (signer, version) = self.current().await?;
        Ok(Signature {
            der: signer.sign_digest(digest)?,
            key_version: version,
        })
    }
    async fn public_key(&self) -> Result<PublicKey> {
        let (signer, version) = self.current().await?;
        Ok(PublicKey {
            pem: signer.public_key_pem().to_string(),
            key_version: version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_base_from_host_or_url() {
        assert_eq!(api_base("gitlab.com"), "https://gitlab.com/api/v4");
        assert_eq!(
            api_base("https://gitlab.example.com/"),
            "https://gitlab.example.com/api/v4"
        );
        assert_eq!(
            api_base("http://127.0.0.1:9999"),
            "http://127.0.0.1:9999/api/v4"
        );
        assert_eq!(
            api_base("https://gl.example.com/api/v4"),
            "https://gl.example.com/api/v4"
        );
    }

    #[test]
    fn masking_rules() {
        assert!(can_mask("correct-horse$battery"));
        assert!(!can_mask("short"));
        assert!(!can_mask("has a space in it"));
        assert!(!can_mask("-----BEGIN\nmulti-line\n"));
    }

    #[test]
    fn debug_hides_token_and_values() {
        let o = GitLabOptions {
            token: Some(Zeroizing::new("glpat-supersecret".into())),
            ..Default::default()
        };
        assert!(!format!("{o:?}").contains("supersecret"));
        let key = GitLabKey::open("g/p", &o).unwrap();
        assert!(!format!("{key:?}").contains("supersecret"));
        let v = Variable {
            key: "COSIGN_PASSWORD".into(),
            value: Some(Zeroizing::new("hunter2hunter2".into())),
            masked: true,
            protected: false,
            hidden: false,
        };
        assert!(!format!("{v:?}").contains("hunter2"));
    }

    #[test]
    fn versions_follow_the_public_key() {
        assert_eq!(key_version_of("a").len(), 16);
        assert_ne!(key_version_of("a"), key_version_of("b"));
    }
}
