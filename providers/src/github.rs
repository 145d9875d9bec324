//! GitHub Actions secrets and variables (`github://OWNER/REPO`,
//! `github://ORG` for organization secrets, `github://OWNER/REPO?environment=ENV`
//! for a deployment environment): a **provisioning target only**. GitHub never
//! returns a secret's value through its API, so a workflow signs with the key
//! GitHub injects into its environment (`env://COSIGN_PRIVATE_KEY` with
//! `COSIGN_PASSWORD`); keybrokerd cannot sign with `github://`.
//!
//! [`GitHubClient`] is the few REST calls (API version 2022-11-28) that write
//! `COSIGN_PRIVATE_KEY`, `COSIGN_PASSWORD` and `COSIGN_PUBLIC_KEY` as secrets,
//! each a libsodium sealed box (X25519 + XSalsa20-Poly1305) for the scope's
//! public key, and the public key also as an Actions variable, which can be
//! read back. Token `GITHUB_TOKEN` (`Authorization: Bearer`); API base
//! `GITHUB_API_URL` (set inside Actions), else `GITHUB_HOST` (GitHub Enterprise
//! Server: `https://HOST/api/v3`), else `https://api.github.com`.

use std::fmt;

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::{
    ci_names,
    ecdsa::normalize_public_pem,
    rest::{self, encode_segment},
    Error, KeyRef, Result,
};

/// The REST API version every request asks for.
pub const API_VERSION: &str = "2022-11-28";

/// Where GitHub is and how to authenticate. `Debug` never shows the token.
#[derive(Clone, Default)]
pub struct GitHubOptions {
    /// API base URL; default `GITHUB_API_URL`, else from `GITHUB_HOST`, else
    /// `https://api.github.com`.
    pub api_url: Option<String>,
    /// Token; default `GITHUB_TOKEN`.
    pub token: Option<Zeroizing<String>>,
    /// Per-request timeout; default 10 s.
    pub timeout: Option<std::time::Duration>,
}

impl fmt::Debug for GitHubOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitHubOptions")
            .field("api_url", &self.api_url)
            .field("token", &self.token.as_ref().map(|_| "[redacted]"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The API base: `api_url`, else `GITHUB_API_URL`, else `GITHUB_HOST`
/// (`github.com` → `https://api.github.com`; any other host or URL →
/// `…/api/v3`, GitHub Enterprise Server), else `https://api.github.com`.
pub fn api_base(options: &GitHubOptions) -> String {
    if let Some(url) = options
        .api_url
        .clone()
        .or_else(|| rest::env_nonempty("GITHUB_API_URL"))
    {
        return rest::base_url(&url);
    }
    match rest::env_nonempty("GITHUB_HOST") {
        Some(host) => host_api_base(&host),
        None => "https://api.github.com".into(),
    }
}

fn host_api_base(host: &str) -> String {
    let base = rest::base_url(host);
    if matches!(
        base.as_str(),
        "https://github.com" | "https://api.github.com"
    ) {
        return "https://api.github.com".into();
    }
    if base.ends_with("/api/v3") {
        base
    } else {
        format!("{base}/api/v3")
    }
}

/// Where secrets go: a repository, an organization or a repository's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// `github://OWNER/REPO`.
    Repo {
        /// Owner.
        owner: String,
        /// Repository.
        repo: String,
    },
    /// `github://ORG`.
    Org {
        /// Organization.
        org: String,
    },
    /// `github://OWNER/REPO?environment=ENV`.
    Environment {
        /// Owner.
        owner: String,
        /// Repository.
        repo: String,
        /// Environment name.
        environment: String,
    },
}

impl Scope {
    /// The scope a `github://` reference names.
    pub fn from_ref(key_ref: &KeyRef) -> Result<Self> {
        match key_ref {
            KeyRef::GitHub {
                owner,
                repo: Some(repo),
                environment: None,
            } => Ok(Scope::Repo {
                owner: owner.clone(),
                repo: repo.clone(),
            }),
            KeyRef::GitHub {
                owner,
                repo: Some(repo),
                environment: Some(environment),
            } => Ok(Scope::Environment {
                owner: owner.clone(),
                repo: repo.clone(),
                environment: environment.clone(),
            }),
            KeyRef::GitHub {
                owner, repo: None, ..
            } => Ok(Scope::Org { org: owner.clone() }),
            other => Err(Error::InvalidArgument(format!(
                "{other} is not a github:// reference"
            ))),
        }
    }

    /// The path that `/secrets` and `/variables` hang off.
    fn prefix(&self) -> String {
        match self {
            Scope::Repo { owner, repo } => format!(
                "/repos/{}/{}/actions",
                encode_segment(owner),
                encode_segment(repo)
            ),
            Scope::Org { org } => format!("/orgs/{}/actions", encode_segment(org)),
            Scope::Environment {
                owner,
                repo,
                environment,
            } => format!(
                "/repos/{}/{}/environments/{}",
                encode_segment(owner),
                encode_segment(repo),
                encode_segment(environment)
            ),
        }
    }

    fn is_org(&self) -> bool {
        matches!(self, Scope::Org { .. })
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Repo { owner, repo } => write!(f, "repository {owner}/{repo}"),
            Scope::Org { org } => write!(f, "organization {org}"),
            Scope::Environment {
                owner,
                repo,
                environment,
            } => write!(f, "environment {environment} of repository {owner}/{repo}"),
        }
    }
}

/// Which repositories of an organization may use its secrets and variables
/// (ignored for repositories and environments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Visibility {
    /// `all`, `private` or `selected`.
    pub visibility: String,
    /// With `selected`: the repository ids.
    pub selected_repository_ids: Vec<u64>,
}

impl Default for Visibility {
    fn default() -> Self {
        Visibility {
            visibility: "private".into(),
            selected_repository_ids: vec![],
        }
    }
}

impl Visibility {
    fn add_to(&self, body: &mut serde_json::Value) {
        body["visibility"] = self.visibility.clone().into();
        if self.visibility == "selected" {
            body["selected_repository_ids"] = self.selected_repository_ids.clone().into();
        }
    }
}

/// A scope's secrets public key.
#[derive(Clone)]
pub struct SecretsKey {
    /// GitHub's id of the key, sent back with every secret.
    pub key_id: String,
    /// The X25519 public key.
    pub key: crypto_box::PublicKey,
}

impl fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretsKey")
            .field("key_id", &self.key_id)
            .finish()
    }
}

/// Seals `plaintext` for `key` (libsodium `crypto_box_seal`) and base64-encodes it.
pub fn seal(key: &crypto_box::PublicKey, plaintext: &[u8]) -> Result<String> {
    let sealed = key
        .seal(&mut rand_core::OsRng, plaintext)
        .map_err(|_| Error::Other("sealed-box encryption failed".into()))?;
    Ok(B64.encode(sealed))
}

#[derive(Deserialize)]
struct PublicKeyJson {
    key_id: String,
    key: String,
}

/// The GitHub REST calls keybroker makes. `Debug` never shows the token.
pub struct GitHubClient {
    base: String,
    token: Zeroizing<String>,
    http: reqwest::Client,
}

impl fmt::Debug for GitHubClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitHubClient")
            .field("base", &self.base)
            .finish()
    }
}

impl GitHubClient {
    /// A client for `options` (defaults from `GITHUB_API_URL`, `GITHUB_HOST`,
    /// `GITHUB_TOKEN`). Makes no request.
    pub fn new(options: &GitHubOptions) -> Result<Self> {
        let token = options
            .token
            .clone()
            .or_else(|| rest::env_nonempty("GITHUB_TOKEN").map(Zeroizing::new))
            .ok_or_else(|| {
                Error::PermissionDenied(
                    "no GitHub token: set GITHUB_TOKEN (a token that may write Actions secrets and variables)".into(),
                )
            })?;
        let token = Zeroizing::new(token.trim().to_string());
        Ok(GitHubClient {
            base: api_base(options),
            token,
            http: rest::http_client(options.timeout.unwrap_or(rest::DEFAULT_TIMEOUT))?,
        })
    }

    /// The API base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
        what: &str,
    ) -> Result<(u16, bool, Zeroizing<Vec<u8>>)> {
        let mut rb = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(self.token.as_str())
            .header("Accept", "application/vnd.github+json")
            .header("X-GitHub-Api-Version", API_VERSION);
        if let Some(b) = body {
            rb = rb.header("Content-Type", "application/json").body(b);
        }
        let resp = rb
            .send()
            .await
            .map_err(|e| rest::transport_error(what, e))?;
        let status = resp.status().as_u16();
        let rate_limited = resp
            .headers()
            .get("x-ratelimit-remaining")
            .is_some_and(|v| v.as_bytes() == b"0");
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| rest::transport_error(what, e))?;
        Ok((status, rate_limited, Zeroizing::new(bytes.to_vec())))
    }

    fn error(
        &self,
        what: &str,
        status: u16,
        rate_limited: bool,
        body: &[u8],
        sent: &[&str],
    ) -> Error {
        let detail = rest::server_detail(body, sent);
        let detail = if detail.is_empty() {
            String::new()
        } else {
            format!(" ({detail})")
        };
        let msg = format!("{what}: GitHub at {} answered {status}{detail}", self.base);
        match status {
            403 | 429 if rate_limited => Error::ResourceExhausted(format!("{msg}; rate limited, retry later")),
            401 => Error::PermissionDenied(format!(
                "{msg}; check GITHUB_TOKEN: it is unknown, expired or revoked"
            )),
            403 => Error::PermissionDenied(format!(
                "{msg}; the token may not write here: a fine-grained token needs the \"Secrets\" and \"Variables\" repository permissions (read and write), or \"Organization secrets\" and \"Organization variables\" for an organization; a classic token needs the repo scope (admin:org for an organization)"
            )),
            404 => Error::NotFound(format!(
                "{msg}; no such repository, organization or environment, or the token cannot see it"
            )),
            s => rest::status_error(s, msg),
        }
    }

    /// The scope's public key for secrets.
    pub async fn secrets_key(&self, scope: &Scope) -> Result<SecretsKey> {
        let what = format!("reading the Actions secrets public key of {scope}");
        let (status, limited, body) = self
            .send(
                reqwest::Method::GET,
                &format!("{}/secrets/public-key", scope.prefix()),
                None,
                &what,
            )
            .await?;
        if status != 200 {
            return Err(self.error(&what, status, limited, &body, &[]));
        }
        let pk: PublicKeyJson = serde_json::from_slice(&body)
            .map_err(|e| Error::Other(format!("{what}: unexpected reply: {e}")))?;
        let raw: [u8; 32] = B64
            .decode(&pk.key)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                Error::Other(format!("{what}: the key is not 32 base64-encoded bytes"))
            })?;
        Ok(SecretsKey {
            key_id: pk.key_id,
            key: crypto_box::PublicKey::from(raw),
        })
    }

    /// Whether secret `name` exists in `scope`.
    pub async fn secret_exists(&self, scope: &Scope, name: &str) -> Result<bool> {
        let what = format!("reading Actions secret {name} of {scope}");
        let (status, limited, body) = self
            .send(
                reqwest::Method::GET,
                &format!("{}/secrets/{}", scope.prefix(), encode_segment(name)),
                None,
                &what,
            )
            .await?;
        match status {
            200 => Ok(true),
            404 => Ok(false),
            s => Err(self.error(&what, s, limited, &body, &[])),
        }
    }

    /// Creates or replaces secret `name`, sealed for `key`.
    pub async fn put_secret(
        &self,
        scope: &Scope,
        key: &SecretsKey,
        name: &str,
        value: &str,
        visibility: &Visibility,
    ) -> Result<()> {
        let what = format!("writing Actions secret {name} of {scope}");
        let mut body = serde_json::json!({
            "encrypted_value": seal(&key.key, value.as_bytes())?,
            "key_id": key.key_id,
        });
        if scope.is_org() {
            visibility.add_to(&mut body);
        }
        let (status, limited, reply) = self
            .send(
                reqwest::Method::PUT,
                &format!("{}/secrets/{}", scope.prefix(), encode_segment(name)),
                Some(body.to_string().into_bytes()),
                &what,
            )
            .await?;
        match status {
            201 | 204 => Ok(()),
            s => Err(self.error(&what, s, limited, &reply, &[value])),
        }
    }

    /// Creates variable `name`, or updates it when it exists (POST, then PATCH on 409).
    pub async fn put_variable(
        &self,
        scope: &Scope,
        name: &str,
        value: &str,
        visibility: &Visibility,
    ) -> Result<()> {
        let what = format!("writing Actions variable {name} of {scope}");
        let mut body = serde_json::json!({ "name": name, "value": value });
        if scope.is_org() {
            visibility.add_to(&mut body);
        }
        let (status, limited, reply) = self
            .send(
                reqwest::Method::POST,
                &format!("{}/variables", scope.prefix()),
                Some(body.to_string().into_bytes()),
                &what,
            )
            .await?;
        match status {
            201 => return Ok(()),
            409 => {}
            s => return Err(self.error(&what, s, limited, &reply, &[value])),
        }
        let (status, limited, reply) = self
            .send(
                reqwest::Method::PATCH,
                &format!("{}/variables/{}", scope.prefix(), encode_segment(name)),
                Some(body.to_string().into_bytes()),
                &what,
            )
            .await?;
        match status {
            200 | 204 => Ok(()),
            s => Err(self.error(&what, s, limited, &reply, &[value])),
        }
    }

    /// Reads variable `name`; `None` when it does not exist.
    pub async fn get_variable(&self, scope: &Scope, name: &str) -> Result<Option<String>> {
        let what = format!("reading Actions variable {name} of {scope}");
        let (status, limited, body) = self
            .send(
                reqwest::Method::GET,
                &format!("{}/variables/{}", scope.prefix(), encode_segment(name)),
                None,
                &what,
            )
            .await?;
        match status {
            200 => {
                let v: serde_json::Value = serde_json::from_slice(&body)
                    .map_err(|e| Error::Other(format!("{what}: unexpected reply: {e}")))?;
                Ok(v.get("value")
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_string))
            }
            404 => Ok(None),
            s => Err(self.error(&what, s, limited, &body, &[])),
        }
    }
}

/// Reads the `COSIGN_PUBLIC_KEY` Actions variable of a `github://` reference
/// (what `keybroker public-key` prints).
pub async fn read_public_key(key_ref: &KeyRef, options: &GitHubOptions) -> Result<String> {
    let scope = Scope::from_ref(key_ref)?;
    let client = GitHubClient::new(options)?;
    let pem = client
        .get_variable(&scope, ci_names::PUBLIC_KEY)
        .await?
        .ok_or_else(|| {
            Error::NotFound(format!(
                "{key_ref}: {scope} has no Actions variable {} (keybroker generate-key-pair {key_ref} writes it; cosign writes only the secret, which GitHub never returns)",
                ci_names::PUBLIC_KEY
            ))
        })?;
    normalize_public_pem(&pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_boxes_open_with_the_secret_key() {
        let secret = crypto_box::SecretKey::generate(&mut rand_core::OsRng);
        let sealed = seal(&secret.public_key(), b"hunter2").unwrap();
        let raw = B64.decode(sealed).unwrap();
        assert_eq!(raw.len(), 32 + 16 + 7);
        assert_eq!(secret.unseal(&raw).unwrap(), b"hunter2");
        let other = crypto_box::SecretKey::generate(&mut rand_core::OsRng);
        assert!(other.unseal(&raw).is_err());
    }

    #[test]
    fn api_bases() {
        let o = |u: &str| GitHubOptions {
            api_url: Some(u.into()),
            ..Default::default()
        };
        assert_eq!(api_base(&o("http://127.0.0.1:1/")), "http://127.0.0.1:1");
        assert_eq!(host_api_base("github.com"), "https://api.github.com");
        assert_eq!(
            host_api_base("ghe.example.com"),
            "https://ghe.example.com/api/v3"
        );
        assert_eq!(
            host_api_base("http://127.0.0.1:8080"),
            "http://127.0.0.1:8080/api/v3"
        );
    }

    #[test]
    fn scopes_from_references() {
        let s = |r: &str| Scope::from_ref(&KeyRef::parse(r).unwrap()).unwrap();
        assert_eq!(s("github://acme/app").prefix(), "/repos/acme/app/actions");
        assert_eq!(s("github://acme").prefix(), "/orgs/acme/actions");
        assert_eq!(
            s("github://acme/app?environment=prod eu").prefix(),
            "/repos/acme/app/environments/prod%20eu"
        );
    }

    #[test]
    fn org_visibility_is_sent_only_for_organizations() {
        let mut body = serde_json::json!({});
        Visibility {
            visibility: "selected".into(),
            selected_repository_ids: vec![1, 2],
        }
        .add_to(&mut body);
        assert_eq!(body["visibility"], "selected");
        assert_eq!(body["selected_repository_ids"], serde_json::json!([1, 2]));
        assert!(!Scope::Repo {
            owner: "a".into(),
            repo: "b".into()
        }
        .is_org());
    }

    #[test]
    fn debug_hides_the_token() {
        let o = GitHubOptions {
            token: Some(Zeroizing::new("ghp_supersecret".into())),
            ..Default::default()
        };
        assert!(!format!("{o:?}").contains("supersecret"));
        assert!(!format!("{:?}", GitHubClient::new(&o).unwrap()).contains("supersecret"));
    }
}
