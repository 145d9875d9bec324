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
