//! Retry with backoff, above the backends (which make one attempt per
//! call): transient errors ([`StoreError::is_transient`]) are tried again,
//! permanent ones returned at once.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::StoreError;

pub type OnRetry = Arc<dyn Fn(&str, &StoreError, u32, Duration) + Send + Sync>;

/// How [`with_retry`] retries transient failures: exponential backoff from
/// `initial_delay`, doubling up to `max_delay`, with ±20% jitter, until
/// `max_attempts` attempts were made or the next wait would end after
/// `deadline` (counted from the first attempt).
#[derive(Clone)]
pub struct RetryPolicy {
    pub initial_delay: Duration,
    pub max_delay: Duration,
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: u32,
    pub deadline: Duration,
    /// Called before each wait: (what, the error, attempts so far, the wait).
    pub on_retry: Option<OnRetry>,
}

impl Default for RetryPolicy {
    /// 100 ms doubling to 5 s, at most 10 attempts within 30 s.
    fn default() -> Self {
        RetryPolicy {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            max_attempts: 10,
            deadline: Duration::from_secs(30),
            on_retry: None,
        }
    }
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("initial_delay", &self.initial_delay)
            .field("max_delay", &self.max_delay)
            .field("max_attempts", &self.max_attempts)
            .field("deadline", &self.deadline)
            .field("on_retry", &self.on_retry.is_some())
            .finish()
    }
}

impl RetryPolicy {
    /// No retry: one attempt.
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..Default::default()
        }
    }
}

/// A factor in [0.8, 1.2) from a cheap, non-cryptographic source.
fn jitter() -> f64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    let mut x = nanos ^ COUNTER.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    0.8 + 0.4 * ((x >> 11) as f64 / (1u64 << 53) as f64)
}

/// Run `f` until it succeeds, returns a permanent error, or the policy's
/// attempts or deadline run out; transient errors ([`StoreError::is_transient`])
/// are retried with exponential backoff. The last error is returned as it was.
/// `what` names the operation for `policy.on_retry`.
pub async fn with_retry<T, F, Fut>(
    what: &str,
    policy: &RetryPolicy,
    mut f: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let start = Instant::now();
    let mut delay = policy.initial_delay;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let err = match f().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if !err.is_transient() || attempts >= policy.max_attempts.max(1) {
            return Err(err);
        }
        let wait = delay.mul_f64(jitter()).min(policy.max_delay);
        if start.elapsed() + wait > policy.deadline {
            return Err(err);
        }
        if let Some(cb) = &policy.on_retry {
            cb(what, &err, attempts, wait);
        }
        tokio::time::sleep(wait).await;
        delay = (delay * 2).min(policy.max_delay);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_in_bounds() {
        for _ in 0..1000 {
            let j = jitter();
            assert!((0.8..1.2).contains(&j), "{j}");
        }
    }

    #[tokio::test]
    async fn retry_stops_on_permanent_and_retries_transient() {
        let policy = RetryPolicy {
            initial_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(4),
            max_attempts: 5,
            deadline: Duration::from_secs(5),
            on_retry: None,
        };
        let unreachable = || StoreError::Unreachable {
            url: "u".into(),
            op: "get",
            key: "k".into(),
            detail: "refused".into(),
            hint: "is the server up?",
            source: "refused".into(),
        };
        // Transient, then success.
        let mut n = 0;
        let r = with_retry("x", &policy, || {
            n += 1;
            let fail = n < 3;
            async move {
                if fail {
                    Err(unreachable())
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(r.unwrap(), 3);
        // Permanent: one attempt.
        let mut n = 0;
        let r: Result<(), _> = with_retry("x", &policy, || {
            n += 1;
            async {
                Err(StoreError::NotFound {
                    url: "u".into(),
                    key: "k".into(),
                })
            }
        })
        .await;
        assert!(matches!(r, Err(StoreError::NotFound { .. })));
        assert_eq!(n, 1);
        // Transient forever: bounded attempts, the last error returned.
        let mut n = 0;
        let r: Result<(), _> = with_retry("x", &policy, || {
            n += 1;
            async { Err(unreachable()) }
        })
        .await;
        assert!(matches!(r, Err(StoreError::Unreachable { .. })));
        assert_eq!(n, 5);
    }
}
