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
    time::{Duration, SystemTime},
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

/// How often and how patiently registry requests are retried.
///
/// Retried: transport failures (refused, reset, timed out, a body cut short)
/// and 429/500/502/503/504, on idempotent steps only — GET, HEAD, PUT of a
/// manifest (the same bytes under the same tag), and a whole blob upload from
/// its POST. The wait before retry `n` is the registry's Retry-After (seconds
/// or an HTTP date, at most `max_retry_after`) or else a uniformly random time
/// in `[0, min(max_delay, base_delay × 2^(n-1))]` ("full jitter"): many
/// signers hitting one overloaded registry spread out instead of returning
/// in lockstep. With the defaults a registry that stays down costs at most 3 s
/// of backoff per step before the error (40 s if it keeps sending Retry-After).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts after the first; 0 disables retries.
    pub retries: u32,
    /// First backoff ceiling; doubled per retry.
    pub base_delay: Duration,
    /// Largest backoff ceiling.
    pub max_delay: Duration,
    /// Longest Retry-After honoured; longer ones are cut to this.
    pub max_retry_after: Duration,
}

/// The environment variable that sets [`RetryPolicy::retries`].
pub const RETRIES_ENV: &str = "KEYBROKER_REGISTRY_RETRIES";
/// Upper bound for [`RETRIES_ENV`]: more would only hide a dead registry.
const MAX_RETRIES: u32 = 20;

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retries: 4,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The default policy, with `retries` from `KEYBROKER_REGISTRY_RETRIES` when set.
    pub fn from_env() -> Result<Self, Error> {
        Self::with_retries_var(std::env::var(RETRIES_ENV).ok().as_deref())
    }

    fn with_retries_var(value: Option<&str>) -> Result<Self, Error> {
        let mut policy = RetryPolicy::default();
        if let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) {
            policy.retries = v
                .parse::<u32>()
                .ok()
                .filter(|n| *n <= MAX_RETRIES)
                .ok_or_else(|| {
                    Error::Other(format!(
                        "{RETRIES_ENV}={v:?}: expected a number of retries from 0 (off) to {MAX_RETRIES}"
                    ))
                })?;
        }
        Ok(policy)
    }

    /// The wait before retry number `retry` (1-based).
    fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(after) = retry_after {
            return after.min(self.max_retry_after);
        }
        let ceiling = self
            .base_delay
            .saturating_mul(1u32 << retry.saturating_sub(1).min(16))
            .min(self.max_delay);
        ceiling.mul_f64(random_fraction())
    }
}

/// A uniform number in [0, 1) without a random-number crate: std's `RandomState`
/// is seeded from the OS once per thread and stepped per instance.
fn random_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// What one attempt of a retried step came to.
enum Step<T> {
    Done(T),
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
}

impl<T> Step<T> {
    fn retry(reason: String) -> Self {
        Step::Retry {
            reason,
            retry_after: None,
        }
    }

    /// Prefixes a retry reason with the request it came from (blob uploads are two).
    fn context(self, request: &str) -> Self {
        match self {
            Step::Retry {
                reason,
                retry_after,
            } => Step::Retry {
                reason: format!("{request}: {reason}"),
                retry_after,
            },
            done => done,
        }
    }
}

/// Statuses that say "not now" rather than "no".
fn retryable_status(s: StatusCode) -> bool {
    matches!(s.as_u16(), 429 | 500 | 502 | 503 | 504)
}

/// A retryable answer as a retry step: its status, error text and Retry-After.
async fn status_step<T>(resp: Response) -> Step<T> {
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    let text = error_text(resp).await;
    let reason = if text.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {text}")
    };
    Step::Retry {
        reason,
        retry_after,
    }
}

/// Retry-After (RFC 9110 §10.2.3): delay-seconds or an IMF-fixdate.
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = parse_imf_fixdate(value)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` (the only HTTP date form senders may use,
/// RFC 9110 §5.6.7; the obsolete forms are not accepted).
fn parse_imf_fixdate(s: &str) -> Option<SystemTime> {
    let (_, rest) = s.split_once(", ")?;
    let parts: Vec<&str> = rest.split(' ').collect();
    let [day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    let day: u32 = day.parse().ok()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| m == month)? as u32
        + 1;
    let year: i64 = year.parse().ok()?;
    let hms: Vec<u64> = time
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, sec] = hms.as_slice() else {
        return None;
    };
    if !(1..=31).contains(&day) || *h > 23 || *m > 59 || *sec > 60 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = u64::try_from(days).ok()? * 86_400 + h * 3600 + m * 60 + sec;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`, from his public "chrono-Compatible Low-Level Date
/// Algorithms" paper).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The path of a URL (no scheme, host or query) for messages.
fn path_of(url: &str) -> String {
    reqwest::Url::parse(url)
        .map(|u| u.path().to_string())
        .unwrap_or_else(|_| url.to_string())
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
    retry: RetryPolicy,
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
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| Error::Other(format!("HTTP client: {e}")))?;
        Ok(Registry {
            http,
            options,
            auth: Mutex::new(HashMap::new()),
            requests: AtomicU64::new(0),
            retry: RetryPolicy::from_env()?,
        })
    }

    /// The same client with another retry policy (the default comes from
    /// `KEYBROKER_REGISTRY_RETRIES`, see [`RetryPolicy::from_env`]).
    pub fn with_retry_policy(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Requests sent so far (auth token fetches and retries included).
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

    /// Sends a request built by `build` (called again for every retry and for the
    /// retry after an auth challenge), handling 401 once. `push` widens the token
    /// scope to pull,push. Idempotent methods (GET, HEAD, PUT, DELETE) are retried
    /// after transport errors, 429 and 500/502/503/504 as the retry policy allows;
    /// giving up is an error that names the request, the attempts and the last
    /// reason. Any other status is the caller's to judge. Not for the PUT that
    /// finishes a blob upload: its session may be spent, [`Registry::push_blob`]
    /// starts over from the POST instead.
    pub(super) async fn send(
        &self,
        img: &ImageRef,
        push: bool,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Response, Error> {
        let (what, idempotent) = match build(&self.http).build() {
            Ok(r) => (
                format!("{} {}", r.method(), r.url().path()),
                matches!(
                    *r.method(),
                    Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
                ),
            ),
            Err(_) => ("request".to_string(), false),
        };
        if !idempotent {
            return match self.send_once(img, push, &build).await? {
                Ok(resp) => Ok(resp),
                Err(reason) => Err(Self::registry_err(img, format!("{what}: {reason}"))),
            };
        }
        let (build, what) = (&build, what.as_str());
        self.retrying(img, what, || async move {
            let resp = match self.send_once(img, push, build).await? {
                Ok(resp) => resp,
                Err(reason) => return Ok(Step::retry(reason)),
            };
            if retryable_status(resp.status()) {
                return Ok(status_step(resp).await);
            }
            Ok(Step::Done(resp))
        })
        .await
    }

    /// One attempt of [`Registry::send`]: auth handled (a 401 answered once), no
    /// retries. `Ok(Err(reason))` is a transport failure worth retrying; `Err` is
    /// final (auth refused, a request that cannot be built).
    async fn send_once(
        &self,
        img: &ImageRef,
        push: bool,
        build: &impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Result<Response, String>, Error> {
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
            let resp = match rb.send().await {
                Ok(resp) => resp,
                Err(e) if e.is_builder() => {
                    return Err(Self::registry_err(img, transport_reason(&e)))
                }
                Err(e) => return Ok(Err(transport_reason(&e))),
            };
            if resp.status() != StatusCode::UNAUTHORIZED {
                return Ok(Ok(resp));
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

    /// Runs `op` until it is done, fails for good, or the retry policy runs out,
    /// sleeping between attempts (Retry-After when the registry sent one, else
    /// exponential backoff with full jitter). `what` names the step in warnings
    /// and in the final error: method and path, never credentials.
    async fn retrying<T, Fut>(
        &self,
        img: &ImageRef,
        what: &str,
        mut op: impl FnMut() -> Fut,
    ) -> Result<T, Error>
    where
        Fut: std::future::Future<Output = Result<Step<T>, Error>>,
    {
        let attempts = self.retry.retries.saturating_add(1);
        let mut attempt = 1;
        loop {
            let (reason, retry_after) = match op().await? {
                Step::Done(v) => return Ok(v),
                Step::Retry {
                    reason,
                    retry_after,
                } => (reason, retry_after),
            };
            if attempt >= attempts {
                let tries = if attempts == 1 {
                    "1 attempt (retries disabled)".to_string()
                } else {
                    format!("{attempts} attempts")
                };
                return Err(Self::registry_err(
                    img,
                    format!("{what} failed after {tries}; last error: {reason}"),
                ));
            }
            let delay = self.retry.delay(attempt, retry_after);
            eprintln!(
                "keybroker: warning: registry {}: {what}: {reason}; retry {attempt} of {} in {} ms",
                img.registry,
                attempts - 1,
                delay.as_millis()
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
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
    /// A body cut short (or, fetched by digest, one that does not match it) is
    /// fetched again like a 503.
    pub async fn get_manifest(
        &self,
        img: &ImageRef,
        reference: &str,
        accept: &str,
    ) -> Result<Option<(Vec<u8>, String)>, Error> {
        let url = format!("{}/manifests/{reference}", self.base(img));
        let what = format!("GET {}", path_of(&url));
        let (url, what) = (url.as_str(), what.as_str());
        self.retrying(img, what, || async move {
            let resp = match self
                .send_once(img, false, &|h: &reqwest::Client| {
                    h.get(url).header(header::ACCEPT, accept)
                })
                .await?
            {
                Ok(resp) => resp,
                Err(reason) => return Ok(Step::retry(reason)),
            };
            match resp.status() {
                StatusCode::OK => {}
                StatusCode::NOT_FOUND => return Ok(Step::Done(None)),
                s if retryable_status(s) => return Ok(status_step(resp).await),
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
            let body = match read_body(resp).await {
                Ok(body) => body,
                Err(ReadError::Cut(reason)) => return Ok(Step::retry(reason)),
                Err(ReadError::TooLarge) => return Err(too_large(img)),
            };
            if reference.starts_with("sha256:") && sha256_digest(&body) != reference {
                return Ok(Step::retry(
                    "the manifest does not match its digest".to_string(),
                ));
            }
            Ok(Step::Done(Some((body, media_type))))
        })
        .await
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

    /// Uploads a blob (monolithic: POST then PUT); returns its digest. Any retryable
    /// failure restarts from the POST: an upload session whose PUT was cut off
    /// midway is in an unknown state, a fresh one is not.
    pub async fn push_blob(&self, img: &ImageRef, data: &[u8]) -> Result<String, Error> {
        let digest = sha256_digest(data);
        let start = format!("{}/blobs/uploads/", self.base(img));
        let what = format!("uploading blob {digest}");
        let body = bytes_of(data);
        let (start, body, digest_ref) = (start.as_str(), &body, digest.as_str());
        self.retrying(img, &what, || async move {
            let post = format!("POST {}", path_of(start));
            let resp = match self
                .send_once(img, true, &|h: &reqwest::Client| {
                    h.post(start).header(header::CONTENT_LENGTH, "0")
                })
                .await?
            {
                Ok(resp) => resp,
                Err(reason) => return Ok(Step::retry(format!("{post}: {reason}"))),
            };
            match resp.status() {
                StatusCode::ACCEPTED => {}
                s if retryable_status(s) => return Ok(status_step(resp).await.context(&post)),
                s => {
                    return Err(Self::registry_err(
                        img,
                        format!(
                            "starting blob upload answered {s}: {}",
                            error_text(resp).await
                        ),
                    ))
                }
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
            url.query_pairs_mut().append_pair("digest", digest_ref);
            let put = format!("PUT {}", url.path());
            let resp = match self
                .send_once(img, true, &|h: &reqwest::Client| {
                    h.request(Method::PUT, url.clone())
                        .header(header::CONTENT_TYPE, "application/octet-stream")
                        .body(body.clone())
                })
                .await?
            {
                Ok(resp) => resp,
                Err(reason) => return Ok(Step::retry(format!("{put}: {reason}"))),
            };
            match resp.status() {
                StatusCode::CREATED => Ok(Step::Done(())),
                s if retryable_status(s) => Ok(status_step(resp).await.context(&put)),
                s => Err(Self::registry_err(
                    img,
                    format!(
                        "finishing blob upload answered {s}: {}",
                        error_text(resp).await
                    ),
                )),
            }
        })
        .await?;
        Ok(digest)
    }

    /// Fetches a blob and checks its digest; a body cut short or not matching
    /// the digest is fetched again.
    pub async fn get_blob(&self, img: &ImageRef, digest: &str) -> Result<Vec<u8>, Error> {
        let url = format!("{}/blobs/{digest}", self.base(img));
        let what = format!("GET {}", path_of(&url));
        let url = url.as_str();
        self.retrying(img, &what, || async move {
            let resp = match self
                .send_once(img, false, &|h: &reqwest::Client| h.get(url))
                .await?
            {
                Ok(resp) => resp,
                Err(reason) => return Ok(Step::retry(reason)),
            };
            match resp.status() {
                s if s.is_success() => {}
                s if retryable_status(s) => return Ok(status_step(resp).await),
                s => {
                    return Err(Self::registry_err(
                        img,
                        format!("GET blob {digest} answered {s}"),
                    ))
                }
            }
            let body = match read_body(resp).await {
                Ok(body) => body,
                Err(ReadError::Cut(reason)) => return Ok(Step::retry(reason)),
                Err(ReadError::TooLarge) => return Err(too_large(img)),
            };
            if sha256_digest(&body) != digest {
                return Ok(Step::retry(format!(
                    "blob {digest} does not match its digest"
                )));
            }
            Ok(Step::Done(body))
        })
        .await
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

pub(super) async fn read_limited(img: &ImageRef, resp: Response) -> Result<Vec<u8>, Error> {
    match read_body(resp).await {
        Ok(body) => Ok(body),
        Err(ReadError::Cut(reason)) => Err(Registry::registry_err(img, reason)),
        Err(ReadError::TooLarge) => Err(too_large(img)),
    }
}

/// Why a response body could not be read whole.
enum ReadError {
    /// The connection failed or closed early: reading again may work.
    Cut(String),
    /// Over [`MAX_READ`]: reading again will not help.
    TooLarge,
}

fn too_large(img: &ImageRef) -> Error {
    Registry::registry_err(img, format!("response larger than {MAX_READ} bytes"))
}

/// Reads a body up to [`MAX_READ`], checking it against Content-Length: hyper
/// reports a connection closed early, the length check is the belt to that.
async fn read_body(mut resp: Response) -> Result<Vec<u8>, ReadError> {
    let expected = resp.content_length();
    let mut out = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| ReadError::Cut(format!("reading the body: {}", transport_reason(&e))))?
    {
        if out.len() + chunk.len() > MAX_READ {
            return Err(ReadError::TooLarge);
        }
        out.extend_from_slice(&chunk);
    }
    match expected {
        Some(n) if n != out.len() as u64 => Err(ReadError::Cut(format!(
            "body cut short: {} of {n} bytes",
            out.len()
        ))),
        _ => Ok(out),
    }
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

/// A transport error with its causes, without the URL (the caller names the
/// request; upload URLs carry long state tokens).
fn transport_reason(e: &reqwest::Error) -> String {
    let mut msg = e.to_string();
    if let Some(url) = e.url() {
        msg = msg.replace(&format!(" for url ({url})"), "");
    }
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg = format!("{msg}: {s}");
        src = s.source();
    }
    msg
}

#[doc(hidden)]
pub fn parse_challenge_params(s: &str) -> HashMap<String, String> {
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
    fn retry_after_takes_seconds_or_an_http_date() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(784_111_770);
        assert_eq!(parse_retry_after("1", now), Some(Duration::from_secs(1)));
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        // RFC 9110's example date is 784111777 s after the epoch.
        assert_eq!(
            parse_imf_fixdate("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(std::time::UNIX_EPOCH + Duration::from_secs(784_111_777))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::from_secs(7))
        );
        // A date in the past means now.
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_imf_fixdate("Thu, 29 Feb 2024 23:59:59 GMT"),
            Some(std::time::UNIX_EPOCH + Duration::from_secs(1_709_251_199))
        );
        for bad in [
            "",
            "-1",
            "soon",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "Sun, 06 Nov 1994 08:49:37 PST",
            "Sun, 32 Nov 1994 08:49:37 GMT",
        ] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn backoff_is_jittered_under_a_doubling_ceiling() {
        let p = RetryPolicy::default();
        for retry in 1..=8u32 {
            let ceiling = (p.base_delay * (1 << (retry - 1))).min(p.max_delay);
            let delays: Vec<Duration> = (0..200).map(|_| p.delay(retry, None)).collect();
            assert!(delays.iter().all(|d| *d <= ceiling), "retry {retry}");
            // Full jitter: spread over the whole range, not clustered at the top.
            assert!(delays.iter().any(|d| *d < ceiling / 4), "retry {retry}");
            assert!(delays.iter().any(|d| *d > ceiling * 3 / 4), "retry {retry}");
        }
        // Retry-After wins over backoff, up to the cap.
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(3600))),
            p.max_retry_after
        );
        assert_eq!(p.delay(40, None).max(p.max_delay), p.max_delay);
    }

    #[test]
    fn retries_come_from_the_environment_variable() {
        assert_eq!(RetryPolicy::with_retries_var(None).unwrap().retries, 4);
        assert_eq!(RetryPolicy::with_retries_var(Some("")).unwrap().retries, 4);
        assert_eq!(RetryPolicy::with_retries_var(Some("0")).unwrap().retries, 0);
        assert_eq!(RetryPolicy::with_retries_var(Some("7")).unwrap().retries, 7);
        for bad in ["-1", "many", "21", "1.5"] {
            let e = RetryPolicy::with_retries_var(Some(bad))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(RETRIES_ENV) && e.contains("0 (off) to 20"),
                "{e}"
            );
        }
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
