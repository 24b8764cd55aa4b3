//! Per-workspace rate limits: a token bucket per workspace (`requests_per_second` sustained,
//! `burst` at once), checked after authentication. Buckets live in a sharded map, so
//! workspaces never wait on each other's lock.

use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::config::RateLimitConfig;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// A token bucket per workspace.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: DashMap<String, Bucket>,
}

impl RateLimiter {
    /// A limiter allowing `requests_per_second` per workspace with bursts of `burst` (both at
    /// least 1).
    pub fn new(requests_per_second: u64, burst: u64) -> Self {
        Self {
            rate: requests_per_second.max(1) as f64,
            burst: burst.max(1) as f64,
            buckets: DashMap::new(),
        }
    }

    /// The limiter of `[auth.rate_limit]`; `None` when limits are off.
    pub fn from_config(config: &RateLimitConfig) -> Option<Self> {
        config
            .enabled
            .then(|| Self::new(config.requests_per_second, config.burst))
    }

    /// Takes one request from `workspace`'s bucket, or says how long until one is available.
    pub fn check(&self, workspace: &str) -> Result<(), Duration> {
        self.check_at(workspace, Instant::now())
    }

    pub(crate) fn check_at(&self, workspace: &str, now: Instant) -> Result<(), Duration> {
        let take = |bucket: &mut Bucket| {
            let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
            bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
            bucket.updated = bucket.updated.max(now);
            if bucket.tokens >= 1.0 {
                bucket.tokens -= 1.0;
                Ok(())
            } else {
                Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
            }
        };
        if let Some(mut bucket) = self.buckets.get_mut(workspace) {
            return take(&mut bucket);
        }
        let mut bucket = self.buckets.entry(workspace.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            updated: now,
        });
        take(&mut bucket)
    }

    /// Forgets buckets untouched for `idle` that have refilled to the burst by now (a new
    /// bucket starts full, so forgetting one changes nothing); returns how many were dropped.
    /// Call it now and then to bound memory.
    pub fn sweep(&self, idle: Duration) -> usize {
        self.sweep_at(idle, Instant::now())
    }

    fn sweep_at(&self, idle: Duration, now: Instant) -> usize {
        let before = self.buckets.len();
        self.buckets.retain(|_, bucket| {
            let elapsed = now.saturating_duration_since(bucket.updated);
            // Drained buckets stay however long they idle: with a burst above what `idle`
            // refills, dropping one would hand its workspace a full burst early.
            elapsed < idle || bucket.tokens + elapsed.as_secs_f64() * self.rate < self.burst
        });
        before - self.buckets.len()
    }

    /// How many workspaces have a bucket.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether none has.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate_per_workspace() {
        let limiter = RateLimiter::new(10, 3);
        let start = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check_at("ws_a", start).is_ok());
        }
        let retry = limiter.check_at("ws_a", start).unwrap_err();
        assert!(retry > Duration::from_millis(90) && retry <= Duration::from_millis(100));
        // Another workspace is unaffected.
        assert!(limiter.check_at("ws_b", start).is_ok());
        // After 100 ms one more request is allowed, not two.
        let later = start + Duration::from_millis(100);
        assert!(limiter.check_at("ws_a", later).is_ok());
        assert!(limiter.check_at("ws_a", later).is_err());
        // Long idle refills to the burst only.
        let much_later = start + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(limiter.check_at("ws_a", much_later).is_ok());
        }
        assert!(limiter.check_at("ws_a", much_later).is_err());
    }

    #[test]
    fn config_and_sweep() {
        let off = RateLimitConfig {
            enabled: false,
            requests_per_second: 1,
            burst: 1,
        };
        assert!(RateLimiter::from_config(&off).is_none());
        let limiter = RateLimiter::from_config(&RateLimitConfig {
            enabled: true,
            ..off
        })
        .unwrap();
        assert!(limiter.check("ws").is_ok());
        assert!(limiter.check("ws").is_err());
        assert_eq!(limiter.len(), 1);
        assert_eq!(limiter.sweep(Duration::ZERO), 0, "drained: kept");
        let refilled = Instant::now() + Duration::from_secs(2);
        assert_eq!(limiter.sweep_at(Duration::ZERO, refilled), 1);
        assert!(limiter.is_empty());
    }

    #[test]
    fn a_sweep_keeps_buckets_that_have_not_refilled() {
        let limiter = RateLimiter::new(1, 200);
        let start = Instant::now();
        for _ in 0..200 {
            assert!(limiter.check_at("ws_a", start).is_ok());
        }
        // 61 s idle refills 61 of 200: the bucket is not full, so it stays.
        let later = start + Duration::from_secs(61);
        assert_eq!(limiter.sweep_at(Duration::from_secs(60), later), 0);
        let allowed = (0..200)
            .take_while(|_| limiter.check_at("ws_a", later).is_ok())
            .count();
        assert_eq!(allowed, 61, "the rate, not a fresh burst");
        // Once full again it goes.
        let full = later + Duration::from_secs(200);
        assert_eq!(limiter.sweep_at(Duration::from_secs(60), full), 1);
        assert!(limiter.is_empty());
    }

    #[test]
    fn concurrent_checks_never_exceed_the_burst() {
        let limiter = std::sync::Arc::new(RateLimiter::new(1, 50));
        let allowed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let limiter = limiter.clone();
                let allowed = allowed.clone();
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        if limiter.check("ws").is_ok() {
                            allowed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let allowed = allowed.load(std::sync::atomic::Ordering::Relaxed);
        assert!((50..=52).contains(&allowed), "{allowed}");
    }
}
