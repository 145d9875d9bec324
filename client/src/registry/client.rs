//! A small OCI distribution client: just the calls signing and verifying need,
//! with docker's auth dance (Basic, or Bearer tokens from the realm the registry
//! names). Every request is counted, so the request budget per image is measured.
//!
//! Hand-written on reqwest rather than an OCI client crate: the append protocol
//! needs raw manifest bytes in and out, and the per-image request budget
//! (docs/PERFORMANCE.md) needs control of every round trip, including auth.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

use reqwest::{header, Method, RequestBuilder, Response, StatusCode};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use super::{credentials, Credentials, ImageRef};
use crate::Error;

/// Manifest media types we accept when resolving a tag.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";
/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Largest manifest or signature blob we read (a .sig manifest with thousands of layers fits).
const MAX_READ: usize = 4 * 1024 * 1024;

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Credentials for every registry (overrides docker's config).
    pub credentials: Option<Credentials>,
    /// Hosts spoken to over plain HTTP besides loopback ones.
    pub plain_http: Vec<String>,
}

#[derive(Clone)]
enum HostAuth {
    Basic(Credentials),
    Bearer {
        realm: String,
        service: Option<String>,
        tokens: HashMap<String, Zeroizing<String>>,
    },
}

/// A registry client shared by all images of one invocation.
pub struct Registry {
    http: reqwest::Client,
    options: RegistryOptions,
    auth: Mutex<HashMap<String, HostAuth>>,
    requests: AtomicU64,
}

fn is_loopback(host: &str) -> bool {
    let h = host
        .rsplit_once(':')
        .map(|(h, p)| {
            if p.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
        .unwrap_or(host);
    h == "localhost" || h.starts_with("127.") || h == "[::1]"
}

impl Registry {
    /// A client with the given options.
    pub fn new(options: RegistryOptions) -> Result<Self, Error> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("keybroker/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(std::time::Duration::from_secs(10))
            .timeout(std::time::Duration::from_secs(120))
            .build()
            .map_err(|e| Error::Other(format!("HTTP client: {e}")))?;
        Ok(Registry {
            http,
            options,
            auth: Mutex::new(HashMap::new()),
            requests: AtomicU64::new(0),
        })
    }

    /// Requests sent so far (auth token fetches included).
    pub fn request_count(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub(super) fn base(&self, img: &ImageRef) -> String {
        let host = img.api_host();
        let scheme = if is_loopback(host) || self.options.plain_http.iter().any(|h| h == host) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{host}/v2/{}", img.repository)
    }

    fn credentials(&self, img: &ImageRef) -> Option<Credentials> {
        self.options
            .credentials
            .clone()
            .or_else(|| credentials::from_docker_config(&img.registry))
    }

    pub(super) fn registry_err(img: &ImageRef, reason: impl Into<String>) -> Error {
        Error::Registry {
            registry: img.registry.clone(),
            reason: reason.into(),
        }
    }

    fn apply_auth(&self, img: &ImageRef, scope: &str, rb: RequestBuilder) -> RequestBuilder {
        let auth = self.auth.lock().unwrap_or_else(|p| p.into_inner());
        match auth.get(img.api_host()) {
            Some(HostAuth::Basic(c)) => rb.basic_auth(&c.username, Some(c.password.as_str())),
            Some(HostAuth::Bearer { tokens, .. }) => match tokens.get(scope) {
                Some(t) => rb.bearer_auth(t.as_str()),
                None => rb,
            },
            None => rb,
        }
    }

    /// Sends a request built by `build` (called again for the retry after an auth
    /// challenge), handling 401 once. `push` widens the token scope to pull,push.
    pub(super) async fn send(
        &self,
        img: &ImageRef,
        push: bool,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Response, Error> {
        let scope = format!(
            "repository:{}:{}",
            img.repository,
            if push { "pull,push" } else { "pull" }
        );
        if let Some((realm, service)) = self.missing_token(img, &scope) {
            self.fetch_token(img, &scope, realm, service).await?;
        }
        for attempt in 0..2 {
            let rb = self.apply_auth(img, &scope, build(&self.http));
            self.requests.fetch_add(1, Ordering::Relaxed);
            let resp = rb
                .send()
                .await
                .map_err(|e| Self::registry_err(img, transport_reason(&e)))?;
            if resp.status() != StatusCode::UNAUTHORIZED {
                return Ok(resp);
            }
            let challenge = resp
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            if attempt == 1 {
                break;
            }
            self.answer_challenge(img, &scope, &challenge).await?;
        }
        let reason = if self.credentials(img).is_some() {
            "credentials were refused"
        } else {
            "no credentials configured"
        };
        Err(Error::RegistryAuth {
            registry: img.registry.clone(),
            reason: reason.into(),
        })
    }

    async fn answer_challenge(
        &self,
        img: &ImageRef,
        scope: &str,
        challenge: &str,
    ) -> Result<(), Error> {
        let auth_err = |reason: &str| Error::RegistryAuth {
            registry: img.registry.clone(),
            reason: reason.to_string(),
        };
        let (kind, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        let params = parse_challenge_params(params);
        if kind.eq_ignore_ascii_case("basic") {
            let host = img.api_host().to_string();
            let creds = self.credentials(img).ok_or_else(|| {
                auth_err("the registry wants a username and password; none configured")
            })?;
            self.auth
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(host, HostAuth::Basic(creds));
            return Ok(());
        }
        if !kind.eq_ignore_ascii_case("bearer") {
            return Err(auth_err(&format!("unsupported auth challenge {kind:?}")));
        }
        let realm = params
            .get("realm")
            .cloned()
            .ok_or_else(|| auth_err("Bearer challenge without realm"))?;
        let service = params.get("service").cloned();
        self.fetch_token(img, scope, realm, service).await
    }

    /// Gets a Bearer token for `scope` from the registry's token realm and caches it.
    async fn fetch_token(
        &self,
        img: &ImageRef,
        scope: &str,
        realm: String,
        service: Option<String>,
    ) -> Result<(), Error> {
        let auth_err = |reason: &str| Error::RegistryAuth {
            registry: img.registry.clone(),
            reason: reason.to_string(),
        };
        let mut token_url =
            reqwest::Url::parse(&realm).map_err(|_| auth_err("Bearer realm is not a URL"))?;
        token_url.query_pairs_mut().append_pair("scope", scope);
        if let Some(s) = &service {
            token_url.query_pairs_mut().append_pair("service", s);
        }
        let mut rb = self.http.get(token_url);
        if let Some(c) = self.credentials(img) {
            rb = rb.basic_auth(&c.username, Some(c.password.as_str()));
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let resp = rb
            .send()
            .await
            .map_err(|e| auth_err(&format!("token endpoint: {}", transport_reason(&e))))?;
        if !resp.status().is_success() {
            return Err(auth_err(&format!(
                "token endpoint answered {}",
                resp.status()
            )));
        }
        #[derive(serde::Deserialize)]
        struct TokenReply {
            token: Option<String>,
            access_token: Option<String>,
        }
        let body = Zeroizing::new(read_limited(img, resp).await?);
        let reply: TokenReply =
            serde_json::from_slice(&body).map_err(|e| auth_err(&format!("token reply: {e}")))?;
        let token = reply
            .token
            .or(reply.access_token)
            .ok_or_else(|| auth_err("token reply without a token"))?;
        let mut auth = self.auth.lock().unwrap_or_else(|p| p.into_inner());
        let entry = auth
            .entry(img.api_host().to_string())
            .or_insert_with(|| HostAuth::Bearer {
                realm: realm.clone(),
                service: service.clone(),
                tokens: HashMap::new(),
            });
        match entry {
            HostAuth::Bearer { tokens, .. } => {
                tokens.insert(scope.to_string(), Zeroizing::new(token));
            }
            HostAuth::Basic(_) => {
                *entry = HostAuth::Bearer {
                    realm,
                    service,
                    tokens: HashMap::from([(scope.to_string(), Zeroizing::new(token))]),
                }
            }
        }
        Ok(())
    }

    /// For a host known to use Bearer tokens, the realm to ask for a scope we hold
    /// no token for yet: fetching it first saves the 401 round trip.
    fn missing_token(&self, img: &ImageRef, scope: &str) -> Option<(String, Option<String>)> {
        let auth = self.auth.lock().unwrap_or_else(|p| p.into_inner());
        match auth.get(img.api_host()) {
            Some(HostAuth::Bearer {
                realm,
                service,
                tokens,
            }) if !tokens.contains_key(scope) => Some((realm.clone(), service.clone())),
            _ => None,
        }
    }

    /// Resolves the image's tag (or digest) to the manifest digest.
    pub async fn resolve_digest(&self, img: &ImageRef) -> Result<String, Error> {
        if let Some(d) = &img.digest {
            return Ok(d.clone());
        }
        let url = format!("{}/manifests/{}", self.base(img), img.manifest_reference());
        let resp = self
            .send(img, false, |h| {
                h.head(&url).header(header::ACCEPT, MANIFEST_ACCEPT)
            })
            .await?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Err(Error::ImageNotFound(img.to_string())),
            s => {
                return Err(Self::registry_err(
                    img,
                    format!("HEAD manifest answered {s}"),
                ))
            }
        }
        if let Some(d) = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
        {
            if d.starts_with("sha256:") {
                return Ok(d.to_string());
            }
        }
        // No digest header: fetch and hash the manifest ourselves.
        let (body, _) = self
            .get_manifest(img, img.manifest_reference(), MANIFEST_ACCEPT)
            .await?
            .ok_or_else(|| Error::ImageNotFound(img.to_string()))?;
        Ok(sha256_digest(&body))
    }

    /// Fetches a manifest's raw bytes and media type; `None` if it does not exist.
    pub async fn get_manifest(
        &self,
        img: &ImageRef,
        reference: &str,
        accept: &str,
    ) -> Result<Option<(Vec<u8>, String)>, Error> {
        let url = format!("{}/manifests/{reference}", self.base(img));
        let resp = self
            .send(img, false, |h| h.get(&url).header(header::ACCEPT, accept))
            .await?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            s => {
                return Err(Self::registry_err(
                    img,
                    format!(
                        "GET manifest {reference} answered {s}: {}",
                        error_text(resp).await
                    ),
                ))
            }
        }
        let media_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = read_limited(img, resp).await?;
        Ok(Some((body, media_type)))
    }

    /// Stores a manifest under `tag`; returns its digest.
    pub async fn put_manifest(
        &self,
        img: &ImageRef,
        tag: &str,
        body: &[u8],
        media_type: &str,
    ) -> Result<String, Error> {
        let url = format!("{}/manifests/{tag}", self.base(img));
        let body = bytes_of(body);
        let resp = self
            .send(img, true, |h| {
                h.put(&url)
                    .header(header::CONTENT_TYPE, media_type)
                    .body(body.clone())
            })
            .await?;
        if !resp.status().is_success() {
            let s = resp.status();
            return Err(Self::registry_err(
                img,
                format!(
                    "PUT manifest {tag} answered {s}: {}",
                    error_text(resp).await
                ),
            ));
        }
        Ok(sha256_digest(&body))
    }

    /// Uploads a blob (monolithic: POST then PUT); returns its digest.
    pub async fn push_blob(&self, img: &ImageRef, data: &[u8]) -> Result<String, Error> {
        let digest = sha256_digest(data);
        let start = format!("{}/blobs/uploads/", self.base(img));
        let resp = self
            .send(img, true, |h| {
                h.post(&start).header(header::CONTENT_LENGTH, "0")
            })
            .await?;
        if resp.status() != StatusCode::ACCEPTED {
            let s = resp.status();
            return Err(Self::registry_err(
                img,
                format!(
                    "starting blob upload answered {s}: {}",
                    error_text(resp).await
                ),
            ));
        }
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Self::registry_err(img, "blob upload without Location"))?;
        let mut url = reqwest::Url::parse(&self.base(img))
            .and_then(|base| base.join(location))
            .map_err(|e| {
                Self::registry_err(img, format!("bad upload Location {location:?}: {e}"))
            })?;
        url.query_pairs_mut().append_pair("digest", &digest);
        let body = bytes_of(data);
        let resp = self
            .send(img, true, |h| {
                h.request(Method::PUT, url.clone())
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .body(body.clone())
            })
            .await?;
        if resp.status() != StatusCode::CREATED {
            let s = resp.status();
            return Err(Self::registry_err(
                img,
                format!(
                    "finishing blob upload answered {s}: {}",
                    error_text(resp).await
                ),
            ));
        }
        Ok(digest)
    }

    /// Fetches a blob and checks its digest.
    pub async fn get_blob(&self, img: &ImageRef, digest: &str) -> Result<Vec<u8>, Error> {
        let url = format!("{}/blobs/{digest}", self.base(img));
        let resp = self.send(img, false, |h| h.get(&url)).await?;
        if !resp.status().is_success() {
            let s = resp.status();
            return Err(Self::registry_err(
                img,
                format!("GET blob {digest} answered {s}"),
            ));
        }
        let body = read_limited(img, resp).await?;
        if sha256_digest(&body) != digest {
            return Err(Self::registry_err(
                img,
                format!("blob {digest} does not match its digest"),
            ));
        }
        Ok(body)
    }
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Request bodies are rebuilt for the retry after an auth challenge; `Bytes` clones are cheap.
pub(super) fn bytes_of(data: &[u8]) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(data)
}

pub(super) async fn read_limited(img: &ImageRef, mut resp: Response) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| Registry::registry_err(img, transport_reason(&e)))?
    {
        if out.len() + chunk.len() > MAX_READ {
            return Err(Registry::registry_err(
                img,
                format!("response larger than {MAX_READ} bytes"),
            ));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

pub(super) async fn error_text(resp: Response) -> String {
    let text = resp.text().await.unwrap_or_default();
    let text = text.trim();
    if text.len() > 300 {
        format!("{}…", &text[..text.floor_char_boundary(300)])
    } else {
        text.to_string()
    }
}

fn transport_reason(e: &reqwest::Error) -> String {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg = format!("{msg}: {s}");
        src = s.source();
    }
    msg
}

fn parse_challenge_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let (value, remaining) = if let Some(q) = after.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (&q[..end], &q[end + 1..]),
                None => (q, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        out.insert(key, value.to_string());
        rest = remaining.trim_start_matches([',', ' ']);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenges() {
        let p = parse_challenge_params(
            r#"realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/x:pull,push""#,
        );
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        assert_eq!(p["scope"], "repository:library/x:pull,push");
    }

    #[test]
    fn loopback_hosts_use_plain_http() {
        for h in [
            "127.0.0.1:5000",
            "localhost",
            "localhost:5000",
            "[::1]:5000",
        ] {
            assert!(is_loopback(h), "{h}");
        }
        for h in ["ghcr.io", "10.0.0.1:5000", "localhost.example.com"] {
            assert!(!is_loopback(h), "{h}");
        }
    }
}
