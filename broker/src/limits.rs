//! Rate limits: token buckets per caller identity and per key alias, checked
//! after the policy admits a request and before the backend is asked to sign.
//! A request over either limit gets RESOURCE_EXHAUSTED with the time until a
//! token is free; it never reaches the key's backend.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::config::LimitConfig;

/// How many distinct buckets one limiter keeps; beyond that, buckets that are
/// full again (idle callers) are dropped first, so memory stays bounded.
const MAX_BUCKETS: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// One family of buckets (per caller, or per key) with the same rate and burst.
#[derive(Debug)]
struct Buckets {
    rate: f64,
    burst: f64,
    map: Mutex<HashMap<String, Bucket>>,
}

impl Buckets {
    fn new(c: &LimitConfig) -> Result<Buckets, String> {
        if !(c.per_second > 0.0 && c.per_second.is_finite()) {
            return Err(format!(
                "rate limit per_second must be > 0, not {}",
                c.per_second
            ));
        }
        let burst = c.burst.unwrap_or(c.per_second.ceil() as u32).max(1);
        Ok(Buckets {
            rate: c.per_second,
            burst: f64::from(burst),
            map: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a token for `id`, or says how long until one is free.
    fn take(&self, id: &str, now: Instant) -> Result<(), Duration> {
        let Ok(mut map) = self.map.lock() else {
            // A poisoned lock means a panic elsewhere; refusing is the safe side.
            return Err(Duration::from_secs(1));
        };
        if map.len() >= MAX_BUCKETS && !map.contains_key(id) {
            let (rate, burst) = (self.rate, self.burst);
            map.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let b = map.entry(id.to_string()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.rate))
        }
    }

    /// Gives back a token taken by `take` (the other family refused the request).
    fn give_back(&self, id: &str) {
        if let Ok(mut map) = self.map.lock() {
            if let Some(b) = map.get_mut(id) {
                b.tokens = (b.tokens + 1.0).min(self.burst);
            }
        }
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Limited {
    /// The caller's own rate.
    #[error("rate limit for caller {caller} exceeded; retry in {retry_ms} ms")]
    Caller {
        /// The caller's identity.
        caller: String,
        /// Milliseconds until a token is free.
        retry_ms: u64,
    },
    /// The key's rate (all callers together).
    #[error("rate limit for key {key:?} exceeded; retry in {retry_ms} ms")]
    Key {
        /// Key alias.
        key: String,
        /// Milliseconds until a token is free.
        retry_ms: u64,
    },
}

/// The limiter of one config.
#[derive(Debug, Default)]
pub struct Limiter {
    per_caller: Option<Buckets>,
    per_key: Option<Buckets>,
}

impl Limiter {
    /// From `[limits]`; no section, no limits.
    pub fn new(c: Option<&crate::config::LimitsConfig>) -> Result<Limiter, String> {
        let Some(c) = c else {
            return Ok(Limiter::default());
        };
        Ok(Limiter {
            per_caller: c
                .per_caller
                .as_ref()
                .map(Buckets::new)
                .transpose()
                .map_err(|e| format!("limits.per_caller: {e}"))?,
            per_key: c
                .per_key
                .as_ref()
                .map(Buckets::new)
                .transpose()
                .map_err(|e| format!("limits.per_key: {e}"))?,
        })
    }

    /// One signature for `caller` with `key`, now.
    pub fn check(&self, caller: &str, key: &str) -> Result<(), Limited> {
        self.check_at(caller, key, Instant::now())
    }

    fn check_at(&self, caller: &str, key: &str, now: Instant) -> Result<(), Limited> {
        let ms = |d: Duration| d.as_millis().max(1) as u64;
        if let Some(b) = &self.per_caller {
            b.take(caller, now).map_err(|d| Limited::Caller {
                caller: caller.to_string(),
                retry_ms: ms(d),
            })?;
        }
        if let Some(b) = &self.per_key {
            if let Err(d) = b.take(key, now) {
                // Refused after all: the caller's token was not spent.
                if let Some(c) = &self.per_caller {
                    c.give_back(caller);
                }
                return Err(Limited::Key {
                    key: key.to_string(),
                    retry_ms: ms(d),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LimitConfig, LimitsConfig};

    fn limiter(caller: Option<(f64, u32)>, key: Option<(f64, u32)>) -> Limiter {
        let l = |(per_second, burst)| LimitConfig {
            per_second,
            burst: Some(burst),
        };
        Limiter::new(Some(&LimitsConfig {
            per_caller: caller.map(l),
            per_key: key.map(l),
        }))
        .unwrap()
    }

    #[test]
    fn a_caller_gets_its_burst_then_its_rate() {
        let l = limiter(Some((10.0, 3)), None);
        let t0 = Instant::now();
        for _ in 0..3 {
            l.check_at("a", "k", t0).unwrap();
        }
        let e = l.check_at("a", "k", t0).unwrap_err();
        assert!(matches!(e, Limited::Caller { retry_ms: 100, .. }), "{e:?}");
        // Another caller is not affected.
        l.check_at("b", "k", t0).unwrap();
        // 100 ms later one token is back, and only one.
        let t1 = t0 + Duration::from_millis(100);
        l.check_at("a", "k", t1).unwrap();
        assert!(l.check_at("a", "k", t1).is_err());
    }

    #[test]
    fn a_key_limit_covers_all_callers_and_does_not_spend_their_tokens() {
        let l = limiter(Some((1.0, 2)), Some((1.0, 2)));
        let t0 = Instant::now();
        l.check_at("a", "k", t0).unwrap();
        l.check_at("b", "k", t0).unwrap();
        assert!(matches!(l.check_at("c", "k", t0), Err(Limited::Key { .. })));
        // c's refused request did not cost c a token: c still has its burst of 2
        // for another key.
        l.check_at("c", "other", t0).unwrap();
        l.check_at("c", "other", t0).unwrap();
        assert!(matches!(
            l.check_at("c", "other", t0),
            Err(Limited::Caller { .. })
        ));
    }

    #[test]
    fn bad_rates_are_config_errors_and_no_section_means_no_limit() {
        assert!(Limiter::new(Some(&LimitsConfig {
            per_caller: Some(LimitConfig {
                per_second: 0.0,
                burst: None
            }),
            per_key: None
        }))
        .is_err());
        let none = Limiter::new(None).unwrap();
        for _ in 0..10_000 {
            none.check("a", "k").unwrap();
        }
    }
}
