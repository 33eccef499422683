//! The upload rate of a target (`rate` in `[target.NAME]`, bytes per
//! second): a token bucket shared by that target's concurrent uploads of
//! segments and baselines (docs/DESIGN.md, "Shipping").
//!
//! An upload pays for its whole object before it is sent. The bucket holds
//! at most a quarter second of the rate (the burst after an idle time); an
//! object larger than what the bucket holds is let through by going into
//! debt, and every later upload waits until the debt is paid. So over any
//! stretch of busy shipping the bytes sent are at most `rate × time + burst`
//! plus one object, whatever the objects' sizes and however many uploads
//! run at once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Shared by clones: one per target, all its uploads take from it.
#[derive(Debug, Clone, Default)]
pub struct Throttle(Option<Arc<Mutex<Bucket>>>);

impl Throttle {
    /// No limit.
    pub fn unlimited() -> Throttle {
        Throttle(None)
    }

    /// At most `rate` bytes per second (`None` or 0: no limit).
    pub fn new(rate: Option<u64>) -> Throttle {
        match rate {
            Some(r) if r > 0 => {
                Throttle(Some(Arc::new(Mutex::new(Bucket::new(r, Instant::now())))))
            }
            _ => Throttle(None),
        }
    }

    /// The limit, bytes per second.
    pub fn rate(&self) -> Option<u64> {
        self.0.as_ref().map(|b| b.lock().unwrap().rate)
    }

    /// Wait until `bytes` may be sent (at once when unlimited).
    pub async fn acquire(&self, bytes: u64) {
        let Some(b) = &self.0 else {
            return;
        };
        let wait = b.lock().unwrap().take(bytes, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Tokens are bytes; a negative level is debt.
#[derive(Debug)]
pub struct Bucket {
    rate: u64,
    capacity: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    /// Full at `now`: a burst of a quarter second of `rate` (at least 64 KiB).
    pub fn new(rate: u64, now: Instant) -> Bucket {
        let capacity = (rate as f64 / 4.0).max(64.0 * 1024.0);
        Bucket {
            rate,
            capacity,
            level: capacity,
            at: now,
        }
    }

    /// The burst it allows after an idle time, bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity as u64
    }

    /// Take `bytes` at `now`: how long the caller waits before sending them
    /// (the bytes are reserved now, so the next caller waits behind them).
    pub fn take(&mut self, bytes: u64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = self.at.max(now);
        self.level = (self.level + elapsed * self.rate as f64).min(self.capacity);
        self.level -= bytes as f64;
        if self.level >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.level / self.rate as f64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_full_bucket_lets_its_burst_through_then_paces_at_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(8 * MIB, t0);
        assert_eq!(b.capacity(), 2 * MIB);
        assert_eq!(b.take(2 * MIB, t0), Duration::ZERO);
        // Empty: 1 MiB more waits 1/8 s.
        let w = b.take(MIB, t0);
        assert!((w.as_secs_f64() - 0.125).abs() < 1e-6, "{w:?}");
        // A second caller at the same instant waits behind the first.
        let w = b.take(MIB, t0);
        assert!((w.as_secs_f64() - 0.25).abs() < 1e-6, "{w:?}");
    }

    #[test]
    fn an_object_larger_than_the_bucket_goes_into_debt() {
        let t0 = Instant::now();
        let mut b = Bucket::new(MIB, t0);
        // 4 MiB at 1 MiB/s with a 256 KiB burst: 3.75 s.
        let w = b.take(4 * MIB, t0);
        assert!((w.as_secs_f64() - 3.75).abs() < 1e-6, "{w:?}");
        // 2 s later the debt is 1.75 s: a byte waits that long.
        let w = b.take(0, t0 + Duration::from_secs(2));
        assert!((w.as_secs_f64() - 1.75).abs() < 1e-6, "{w:?}");
    }

    #[test]
    fn idle_time_refills_only_up_to_the_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::new(4 * MIB, t0);
        b.take(MIB, t0);
        // An hour idle: still only one burst (1 MiB) is free.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(b.take(MIB, later), Duration::ZERO);
        let w = b.take(MIB, later);
        assert!((w.as_secs_f64() - 0.25).abs() < 1e-6, "{w:?}");
    }

    #[test]
    fn over_a_long_run_the_bytes_follow_the_rate() {
        // Callers that send as soon as they may: after 10 s of 100 KiB
        // objects at 1 MiB/s, 10 MiB plus the burst have gone, no more.
        let t0 = Instant::now();
        let mut b = Bucket::new(MIB, t0);
        let (mut now, mut sent) = (t0, 0u64);
        while now < t0 + Duration::from_secs(10) {
            now += b.take(100 * 1024, now);
            sent += 100 * 1024;
        }
        let expected = 10 * MIB + b.capacity();
        assert!(
            sent.abs_diff(expected) <= 100 * 1024,
            "{sent} bytes vs {expected}"
        );
    }

    #[tokio::test]
    async fn concurrent_uploads_share_one_bucket() {
        let t = Throttle::new(Some(4 * MIB));
        let start = std::time::Instant::now();
        // 8 uploads of 512 KiB at once, through clones: 4 MiB minus the
        // 1 MiB burst at 4 MiB/s is 0.75 s (never less; more on a busy host).
        let all = (0..8).map(|_| {
            let t = t.clone();
            async move { t.acquire(512 * 1024).await }
        });
        futures::future::join_all(all).await;
        let took = start.elapsed().as_secs_f64();
        assert!((0.74..2.0).contains(&took), "{took}");
        // Unlimited does not wait.
        let u = Throttle::new(None);
        let s = std::time::Instant::now();
        u.acquire(u64::MAX).await;
        assert!(s.elapsed() < Duration::from_millis(100));
        assert_eq!(Throttle::new(Some(0)).rate(), None);
    }
}
