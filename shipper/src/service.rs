//! `cdp-shipper run`: the shipper's life as a process, in the library so
//! tests reach it. Take the VM's shipper lock (waiting while cdp-agent holds
//! it), then run passes until told to stop or until the followed cdpd has
//! exited, and drain what is sealed before leaving (docs/DESIGN.md,
//! "Processes").

use std::time::{Duration, Instant};

use cdp_core::layout::StateDir;
use tokio::sync::watch;

use thiserror::Error;

use crate::error::ShipError;
use crate::lock::{self, LockError};
use crate::wake::StateWatch;
use crate::{PassStats, Shipper};

/// The longest an idle shipper goes without a whole pass (the VM
/// definition, the free space, delayed segments coming due): between them
/// it only looks every `poll` whether the catalog changed (a cheap read, no
/// write), and passes at once when it did (cdpd sealed a segment).
pub const IDLE_PASS: Duration = Duration::from_secs(1);

/// A shipper that shipped nothing for this long gives its encoding
/// buffers back ([`crate::pool::release`]); a busy disk seals more often
/// and keeps them from one segment to the next.
pub const RELEASE_BUFFERS_AFTER: Duration = Duration::from_secs(2);

/// Wait, idle, until `woken()` or `until`; true when `stop` came instead.
/// `woken()` (the catalog changed, the followed cdpd exited) is asked when
/// the VM's state directory changed (`watch`), or every `poll` without a
/// watch.
pub async fn idle_wait(
    poll: Duration,
    until: Instant,
    stop: &mut watch::Receiver<bool>,
    watch: Option<&StateWatch>,
    mut woken: impl FnMut() -> bool,
) -> bool {
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let look = async {
            match watch {
                Some(w) if w.changed().await.is_ok() => {}
                _ => tokio::time::sleep(poll.min(left)).await,
            }
        };
        tokio::select! {
            _ = stop.wait_for(|v| *v) => return true,
            _ = tokio::time::sleep(left) => return false,
            _ = look => {}
        }
        if woken() {
            return false;
        }
    }
}

/// How `run` ends.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mode {
    /// One pass, then return its statistics.
    pub once: bool,
    /// Follow this process (the VM's cdpd): when it has exited, ship what is
    /// left and return.
    pub follow_pid: Option<i32>,
    /// The longest an idle shipper goes without a whole pass (None:
    /// [`IDLE_PASS`]); a test sets it to hours to see that a seal, not the
    /// timer, wakes the shipper.
    pub idle_pass: Option<Duration>,
}

#[derive(Debug, Error)]
pub enum ServiceError {
    #[error(transparent)]
    Ship(#[from] ShipError),
    #[error(transparent)]
    Lock(#[from] LockError),
}

/// What the process did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `--once`: the statistics of its one pass (targets may have failed).
    Once(PassStats),
    /// Stopped (signal or the followed cdpd exited) after a final pass.
    Drained(PassStats),
    /// Stopped while waiting for the lock: another process ships the VM.
    NotOurs,
}

/// Run the shipper until `stop` turns true (SIGTERM in the binary) or, per
/// `mode`, after one pass or when the followed process has exited.
pub async fn run(
    mut s: Shipper,
    mode: Mode,
    mut stop: watch::Receiver<bool>,
) -> Result<Outcome, ServiceError> {
    let poll: Duration = s.opts.poll;
    let follow_gone = || mode.follow_pid.is_some_and(cdp_core::proc::is_gone);
    let mut said_waiting = false;
    // One shipper per VM (crate::lock): while cdp-agent holds the lock for an
    // adoption pass, wait for it.
    let lock = loop {
        if let Some(l) = lock::try_lock(&s.opts.state_dir, &s.opts.vm_uuid)? {
            break l;
        }
        if !mode.once && follow_gone() {
            eprintln!(
                "cdp-shipper: cdpd has exited; the journal is being shipped by another process"
            );
            return Ok(Outcome::NotOurs);
        }
        if !said_waiting {
            eprintln!(
                "cdp-shipper: another process ships this VM ({} is locked); waiting",
                lock::lock_path(&s.opts.state_dir, &s.opts.vm_uuid).display()
            );
            said_waiting = true;
        }
        tokio::select! {
            _ = stop.wait_for(|v| *v) => return Ok(Outcome::NotOurs),
            _ = tokio::time::sleep(poll) => {}
        }
    };
    if mode.once {
        return Ok(Outcome::Once(s.pass().await?));
    }
    // Woken by a change in the VM's state directory (no watch: every poll).
    let watch = cdp_core::names::check_uuid(&s.opts.vm_uuid)
        .ok()
        .map(|u| StateDir::new(&s.opts.state_dir).vm(&u.hyphenated().to_string()))
        .and_then(|dir| StateWatch::new(dir.path()).ok());
    let mut failures = 0u32;
    let mut last_shipped = Instant::now();
    loop {
        if follow_gone() {
            eprintln!(
                "cdp-shipper: cdpd (pid {}) has exited",
                mode.follow_pid.unwrap_or_default()
            );
            break;
        }
        // Read before the pass: a segment sealed while it ran wakes the next.
        let seen = s.catalog_version();
        // A pass that fails as a whole (the catalog, a local file) does not
        // end the shipper: said, then tried again after a backoff (a dead
        // shipper ships nothing and tells nobody). A target's own failure
        // never gets here: it is that target's state (`Shipper::pass`).
        let wait = match s.pass().await {
            Ok(st) if st.shipped > 0 => {
                failures = 0;
                last_shipped = Instant::now();
                continue;
            }
            Ok(_) => {
                failures = 0;
                // Idle for a while (not between two segments of a busy
                // disk): the encoding buffers go back to the allocator.
                if last_shipped.elapsed() >= RELEASE_BUFFERS_AFTER {
                    crate::pool::release();
                }
                let mut until = Instant::now() + mode.idle_pass.unwrap_or(IDLE_PASS).max(poll);
                if let Some(w) = s.next_wake() {
                    until = until.min(w);
                }
                let woken = || follow_gone() || seen.is_none() || s.catalog_version() != seen;
                if idle_wait(poll, until, &mut stop, watch.as_ref(), woken).await {
                    break;
                }
                continue;
            }
            Err(e) => {
                failures += 1;
                let wait = crate::backoff(failures, true).max(poll);
                if failures == 1 || failures.is_multiple_of(20) {
                    eprintln!(
                        "cdp-shipper: pass failed: {e} (failure {failures}, retrying in {wait:?})"
                    );
                }
                wait
            }
        };
        tokio::select! {
            _ = stop.wait_for(|v| *v) => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    // Drain what is sealed before leaving.
    let st = s.pass().await?;
    eprintln!(
        "cdp-shipper: stopping; last pass shipped {} segments, {} waiting",
        st.shipped, st.waiting
    );
    drop(lock);
    Ok(Outcome::Drained(st))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Woken on the third look: back after about three polls, long before
    /// `until`.
    #[tokio::test]
    async fn idle_wait_returns_when_woken() {
        let (_tx, mut stop) = watch::channel(false);
        let looks = AtomicU32::new(0);
        let t0 = Instant::now();
        let until = t0 + Duration::from_secs(30);
        let woken = || looks.fetch_add(1, Ordering::SeqCst) + 1 >= 3;
        assert!(!idle_wait(Duration::from_millis(10), until, &mut stop, None, woken).await);
        assert_eq!(looks.load(Ordering::SeqCst), 3);
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    }

    /// Never woken: back at `until`; a stop ends the wait and says so.
    #[tokio::test]
    async fn idle_wait_ends_at_until_or_on_stop() {
        let (tx, mut stop) = watch::channel(false);
        let t0 = Instant::now();
        let until = t0 + Duration::from_millis(150);
        assert!(!idle_wait(Duration::from_millis(20), until, &mut stop, None, || false).await);
        assert!(t0.elapsed() >= Duration::from_millis(150));
        tx.send(true).unwrap();
        let until = Instant::now() + Duration::from_secs(30);
        assert!(idle_wait(Duration::from_millis(20), until, &mut stop, None, || false).await);
    }

    /// With a watch, the look comes when the directory changes, however
    /// long the poll: a write 50 ms in wakes a wait of 30 s polls.
    #[tokio::test]
    async fn idle_wait_with_a_watch_looks_when_the_directory_changes() {
        let dir = tempfile::tempdir().unwrap();
        let w = StateWatch::new(dir.path()).unwrap();
        let (_tx, mut stop) = watch::channel(false);
        let t0 = Instant::now();
        let until = t0 + Duration::from_secs(60);
        let file = dir.path().join("catalog.sqlite-wal");
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            std::fs::write(file, b"x").unwrap();
        });
        let woken = || true;
        let poll = Duration::from_secs(30);
        assert!(!idle_wait(poll, until, &mut stop, Some(&w), woken).await);
        assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    }
}
