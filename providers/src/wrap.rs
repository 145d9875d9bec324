//! Behaviour shared by every remote key source, as wrappers around any
//! `KeyProvider` rather than code repeated in each backend: retries with jittered
//! backoff, and a public-key cache with one in-flight fetch per key.

use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use rand_core::{OsRng, RngCore};

use crate::{
    CacheStats, Capabilities, Error, KeyProvider, PublicKey, Result, Sha256Digest, Signature,
};

/// How hard to retry a backend that is throttling us or briefly down.
#[derive(Debug, Clone, Copy)]
pub struct RetryConfig {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// No retry starts once this much time has passed since the first attempt.
    pub retry_timeout: Duration,
    /// Backoff before the first retry; doubles each time, up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Largest backoff.
    pub max_backoff: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_retries: 4,
            retry_timeout: Duration::from_secs(5),
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
        }
    }
}

/// Errors worth retrying: the backend was unavailable or throttled us.
fn retryable(e: &Error) -> bool {
    matches!(e, Error::Unavailable(_) | Error::ResourceExhausted(_))
}

/// Retries throttling and unavailability with "full jitter" exponential backoff,
/// bounded in count and in total time.
pub struct Retrying {
    inner: Arc<dyn KeyProvider>,
    config: RetryConfig,
}

impl Retrying {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn KeyProvider>, config: RetryConfig) -> Self {
        Retrying { inner, config }
    }

    async fn run<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let started = Instant::now();
        let mut backoff = self.config.initial_backoff;
        let mut attempt = 0;
        loop {
            match op().await {
                Err(e) if retryable(&e) && attempt < self.config.max_retries => {
                    let jitter_ms =
                        u64::from(OsRng.next_u32()) % (backoff.as_millis() as u64).max(1);
                    let sleep = Duration::from_millis(jitter_ms);
                    if started.elapsed() + sleep >= self.config.retry_timeout {
                        return Err(e);
                    }
                    tracing::debug!(key = self.inner.key_id(), attempt, ?sleep, error = %e, "retrying");
                    tokio::time::sleep(sleep).await;
                    backoff = (backoff * 2).min(self.config.max_backoff);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

impl fmt::Debug for Retrying {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retrying")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .finish()
    }
}

#[async_trait::async_trait]
impl KeyProvider for Retrying {
    fn key_id(&self) -> &str {
        self.inner.key_id()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn sign_digest(&self, digest: &Sha256Digest) -> Result<Signature> {
        self.run(|| self.inner.sign_digest(digest)).await
    }
    async fn public_key(&self) -> Result<PublicKey> {
        self.run(|| self.inner.public_key()).await
    }
    fn public_key_cache(&self) -> Option<CacheStats> {
        self.inner.public_key_cache()
    }
}

/// When to stop calling a backend that keeps failing.
#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    /// Consecutive UNAVAILABLE outcomes (after retries) that open the circuit.
    pub threshold: u32,
    /// How long the circuit stays open at first; doubles after each failed
    /// probe, up to `max_open`.
    pub open_for: Duration,
    /// Longest open period.
    pub max_open: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            threshold: 5,
            open_for: Duration::from_secs(2),
            max_open: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Default)]
struct BreakerState {
    failures: u32,
    open_until: Option<Instant>,
    open_for: Duration,
    probing: bool,
}

/// A circuit breaker: after `threshold` consecutive UNAVAILABLE outcomes the
/// backend is not called at all for a while — callers get UNAVAILABLE at once,
/// with how long to wait — so a dead backend cannot tie up every request
/// worker (each call would otherwise wait out its timeouts and retries). When
/// the period ends one call goes through as a probe; its success closes the
/// circuit, its failure opens it again for twice as long. Only UNAVAILABLE
/// counts: throttling, refusals and bad input say the backend is alive.
pub struct CircuitBreaker {
    inner: Arc<dyn KeyProvider>,
    config: BreakerConfig,
    state: std::sync::Mutex<BreakerState>,
}

impl CircuitBreaker {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn KeyProvider>, config: BreakerConfig) -> Self {
        CircuitBreaker {
            inner,
            config,
            state: std::sync::Mutex::new(BreakerState {
                open_for: config.open_for,
                ..BreakerState::default()
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// May a call go to the backend now? `Ok(true)`: yes, as the probe.
    fn admit(&self) -> Result<bool> {
        let mut st = self.state();
        let Some(until) = st.open_until else {
            return Ok(false);
        };
        let now = Instant::now();
        if now < until || st.probing {
            let wait = until
                .saturating_duration_since(now)
                .max(Duration::from_millis(100));
            return Err(Error::Unavailable(format!(
                "{}: backend failed {} times in a row; not calling it for now, retry in {:.1} s",
                self.inner.key_id(),
                st.failures,
                wait.as_secs_f64()
            )));
        }
        st.probing = true;
        Ok(true)
    }

    fn record<T>(&self, probe: bool, r: &Result<T>) {
        let mut st = self.state();
        if probe {
            st.probing = false;
        }
        match r {
            Err(Error::Unavailable(_)) => {
                st.failures = st.failures.saturating_add(1);
                if probe {
                    st.open_for = (st.open_for * 2).min(self.config.max_open);
                }
                if probe || (st.open_until.is_none() && st.failures >= self.config.threshold) {
                    st.open_until = Some(Instant::now() + st.open_for);
                    tracing::warn!(
                        key = self.inner.key_id(),
                        failures = st.failures,
                        open_for = ?st.open_for,
                        "backend unavailable; circuit open"
                    );
                }
            }
            _ => {
                if st.open_until.is_some() {
                    tracing::info!(
                        key = self.inner.key_id(),
                        "backend answers again; circuit closed"
                    );
                }
                *st = BreakerState {
                    open_for: self.config.open_for,
                    ..BreakerState::default()
                };
            }
        }
    }

    async fn run<T, Fut>(&self, op: impl FnOnce() -> Fut) -> Result<T>
    where
        Fut: std::future::Future<Output = Result<T>>,
    {
        let probe = self.admit()?;
        let r = op().await;
        self.record(probe, &r);
        r
    }
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .finish()
    }
}

#[async_trait::async_trait]
impl KeyProvider for CircuitBreaker {
    fn key_id(&self) -> &str {
        self.inner.key_id()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn sign_digest(&self, digest: &Sha256Digest) -> Result<Signature> {
        self.run(|| self.inner.sign_digest(digest)).await
    }
    async fn public_key(&self) -> Result<PublicKey> {
        self.run(|| self.inner.public_key()).await
    }
    fn public_key_cache(&self) -> Option<CacheStats> {
        self.inner.public_key_cache()
    }
}

/// Caches the public key for `ttl`. Concurrent callers wait on one fetch
/// instead of each asking the backend.
pub struct CachedPublicKey {
    inner: Arc<dyn KeyProvider>,
    ttl: Duration,
    cached: tokio::sync::Mutex<Option<(Instant, PublicKey)>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl CachedPublicKey {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn KeyProvider>, ttl: Duration) -> Self {
        CachedPublicKey {
            inner,
            ttl,
            cached: tokio::sync::Mutex::new(None),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }
}

impl fmt::Debug for CachedPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedPublicKey")
            .field("inner", &self.inner)
            .field("ttl", &self.ttl)
            .finish()
    }
}

#[async_trait::async_trait]
impl KeyProvider for CachedPublicKey {
    fn key_id(&self) -> &str {
        self.inner.key_id()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn sign_digest(&self, digest: &Sha256Digest) -> Result<Signature> {
        let sig = self.inner.sign_digest(digest).await?;
        // A signature from a version we have not cached means the key rotated:
        // drop the cache so the next public_key() reads the new version.
        let mut cached = self.cached.lock().await;
        if cached
            .as_ref()
            .is_some_and(|(_, pk)| pk.key_version != sig.key_version)
        {
            *cached = None;
        }
        Ok(sig)
    }
    async fn public_key(&self) -> Result<PublicKey> {
        let mut cached = self.cached.lock().await;
        if let Some((at, pk)) = cached.as_ref() {
            if at.elapsed() < self.ttl {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(pk.clone());
            }
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let fresh = self.inner.public_key().await?;
        *cached = Some((Instant::now(), fresh.clone()));
        Ok(fresh)
    }
    fn public_key_cache(&self) -> Option<CacheStats> {
        Some(CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        })
    }
}

/// A public key given in the configuration, for backends whose credentials may
/// only sign (a Vault token limited to `transit/sign`): `public_key()` answers
/// from the configured PEM and never asks the backend.
pub struct StaticPublicKey {
    inner: Arc<dyn KeyProvider>,
    public: PublicKey,
}

impl StaticPublicKey {
    /// Wraps `inner`; `pem` must be a P-256 SPKI public key.
    pub fn new(inner: Arc<dyn KeyProvider>, pem: &str, key_version: &str) -> Result<Self> {
        let pem = crate::ecdsa::normalize_public_pem(pem)?;
        Ok(StaticPublicKey {
            inner,
            public: PublicKey {
                pem,
                key_version: key_version.to_string(),
            },
        })
    }
}

impl fmt::Debug for StaticPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticPublicKey")
            .field("inner", &self.inner)
            .finish()
    }
}

#[async_trait::async_trait]
impl KeyProvider for StaticPublicKey {
    fn key_id(&self) -> &str {
        self.inner.key_id()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn sign_digest(&self, digest: &Sha256Digest) -> Result<Signature> {
        let mut sig = self.inner.sign_digest(digest).await?;
        // The configured key stands for whatever version signs.
        sig.key_version = self.public.key_version.clone();
        Ok(sig)
    }
    async fn public_key(&self) -> Result<PublicKey> {
        Ok(self.public.clone())
    }
    fn public_key_cache(&self) -> Option<CacheStats> {
        self.inner.public_key_cache()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// A provider that fails its first `failures` calls with `error`, counting calls.
    #[derive(Debug)]
    struct Flaky {
        failures: u32,
        calls: AtomicU32,
        error: fn() -> Error,
    }

    #[async_trait::async_trait]
    impl KeyProvider for Flaky {
        fn key_id(&self) -> &str {
            "flaky"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                sign: true,
                public_key: true,
            }
        }
        async fn sign_digest(&self, _: &Sha256Digest) -> Result<Signature> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if n < self.failures {
                return Err((self.error)());
            }
            Ok(Signature {
                der: vec![n as u8],
                key_version: "1".into(),
            })
        }
        async fn public_key(&self) -> Result<PublicKey> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(PublicKey {
                pem: "pem".into(),
                key_version: "1".into(),
            })
        }
    }

    fn flaky(failures: u32, error: fn() -> Error) -> Arc<Flaky> {
        Arc::new(Flaky {
            failures,
            calls: AtomicU32::new(0),
            error,
        })
    }

    const FAST: RetryConfig = RetryConfig {
        max_retries: 3,
        retry_timeout: Duration::from_secs(2),
        initial_backoff: Duration::from_millis(2),
        max_backoff: Duration::from_millis(10),
    };

    #[tokio::test]
    async fn retries_throttling_then_succeeds() {
        let inner = flaky(2, || Error::ResourceExhausted("429".into()));
        let r = Retrying::new(inner.clone(), FAST);
        assert!(r.sign_digest(&Sha256Digest::of(b"x")).await.is_ok());
        assert_eq!(inner.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn gives_up_after_max_retries_and_never_retries_caller_errors() {
        let inner = flaky(100, || Error::Unavailable("down".into()));
        let r = Retrying::new(inner.clone(), FAST);
        assert!(matches!(
            r.sign_digest(&Sha256Digest::of(b"x")).await,
            Err(Error::Unavailable(_))
        ));
        assert_eq!(inner.calls.load(Ordering::SeqCst), 4);

        let inner = flaky(100, || Error::PermissionDenied("no".into()));
        let r = Retrying::new(inner.clone(), FAST);
        assert!(r.sign_digest(&Sha256Digest::of(b"x")).await.is_err());
        assert_eq!(inner.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn retry_time_is_bounded() {
        let inner = flaky(100, || Error::Unavailable("down".into()));
        let slow = RetryConfig {
            max_retries: 1000,
            retry_timeout: Duration::from_millis(100),
            ..FAST
        };
        let started = Instant::now();
        assert!(Retrying::new(inner, slow)
            .sign_digest(&Sha256Digest::of(b"x"))
            .await
            .is_err());
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn the_breaker_opens_fails_fast_probes_and_closes() {
        let inner = flaky(8, || Error::Unavailable("down".into()));
        let config = BreakerConfig {
            threshold: 3,
            open_for: Duration::from_millis(200),
            max_open: Duration::from_secs(1),
        };
        let b = CircuitBreaker::new(inner.clone(), config);
        let d = Sha256Digest::of(b"x");
        for _ in 0..3 {
            assert!(b.sign_digest(&d).await.is_err());
        }
        assert_eq!(inner.calls.load(Ordering::SeqCst), 3);
        // Open: no backend call, a fast UNAVAILABLE that says when to retry.
        let started = Instant::now();
        for _ in 0..100 {
            match b.sign_digest(&d).await {
                Err(Error::Unavailable(m)) => assert!(m.contains("retry in"), "{m}"),
                other => panic!("{other:?}"),
            }
        }
        assert!(started.elapsed() < Duration::from_millis(100));
        assert_eq!(inner.calls.load(Ordering::SeqCst), 3);
        // After the open period one probe goes through; it fails (call 4), so
        // the circuit opens again, for twice as long.
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(b.sign_digest(&d).await.is_err());
        assert_eq!(inner.calls.load(Ordering::SeqCst), 4);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(b.sign_digest(&d).await.is_err(), "still open (400 ms)");
        assert_eq!(inner.calls.load(Ordering::SeqCst), 4);
        // The backend recovers (calls 5..=8 fail, 9 succeeds): probes until it does.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if b.sign_digest(&d).await.is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "never closed");
        }
        // Closed: every call reaches the backend again.
        let before = inner.calls.load(Ordering::SeqCst);
        assert!(b.sign_digest(&d).await.is_ok());
        assert_eq!(inner.calls.load(Ordering::SeqCst), before + 1);
    }

    #[tokio::test]
    async fn refusals_and_throttling_never_open_the_breaker() {
        for error in [
            (|| Error::PermissionDenied("no".into())) as fn() -> Error,
            || Error::ResourceExhausted("429".into()),
        ] {
            let inner = flaky(20, error);
            let b = CircuitBreaker::new(inner.clone(), BreakerConfig::default());
            for _ in 0..20 {
                assert!(b.sign_digest(&Sha256Digest::of(b"x")).await.is_err());
            }
            assert_eq!(inner.calls.load(Ordering::SeqCst), 20);
        }
    }

    #[tokio::test]
    async fn one_public_key_fetch_for_many_concurrent_callers() {
        let inner = flaky(0, || Error::Other(String::new()));
        let cache = Arc::new(CachedPublicKey::new(inner.clone(), Duration::from_secs(60)));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let c = cache.clone();
                tokio::spawn(async move { c.public_key().await.map(|p| p.pem) })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), "pem");
        }
        assert_eq!(inner.calls.load(Ordering::SeqCst), 1);
        assert_eq!(
            cache.public_key_cache(),
            Some(CacheStats {
                hits: 15,
                misses: 1
            })
        );
        // Wrappers report the cache behind them; a bare provider has none.
        let retrying = Retrying::new(cache.clone(), FAST);
        retrying.public_key().await.unwrap();
        assert_eq!(retrying.public_key_cache().map(|s| s.hits), Some(16));
        assert_eq!(inner.public_key_cache(), None);
    }
}
