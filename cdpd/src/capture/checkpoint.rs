//! Checkpoints of a disk's image (docs/DESIGN.md, "Write path";
//! docs/RELIABILITY.md, "A power loss").
//!
//! A FLUSH or FUA makes the journal durable, not the image: the image always
//! equals the journal replayed, so a record durable in the journal is a
//! write the guest keeps. The image is made durable by a *checkpoint*, a
//! full sync round (journal, image, dirty map) that the sealer asks of the
//! disk's sync thread every `checkpoint_interval` (the policy's, 30 s by
//! default) or every [`MAX_BYTES`] of journal
//! (a quarter of `journal_max` when that is less), at once while the disk
//! is degraded or resyncing or its journal has less room left than it took
//! since the last one (trimming waits for checkpoints), and that cdpd runs
//! at start and at a clean stop. A disk running degraded or resyncing, or
//! without an activity log, has every round full, as before.
//!
//! A checkpoint that began when the disk's last record had seq `S`:
//! - writes `S` into the activity log's header and syncs it
//!   ([`cdp_core::journal::dirty::Header::synced_seq`]); after a reboot,
//!   recovery redoes the records after `S` from the sealed segments too
//!   (`cdp_core::journal::recovery`);
//! - lets the activity log forget the extents written before it began
//!   (only a checkpoint does: a failed image sync marks every extent written
//!   since the last one);
//! - is published in the catalog (`disks.image_synced_seq`) once durable in
//!   the log, so the shipper trims no segment with a record after it (its
//!   records may be durable nowhere else).
//!
//! Why: a FLUSH that syncs the image as well waits for a second sync and
//! writes every guest byte to the device twice before it answers. Measured
//! (BENCHMARKS.md, "Issue 13: FLUSH syncs the journal only"): 4 KiB random
//! writes with a FLUSH every 16 went 1.17–1.39× faster; at 1 MiB the device
//! bytes halved but the throughput did not move (not the image's sync,
//! then). Between checkpoints the image's page cache absorbs
//! overwrites, as the peers' does.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Disk, SyncJob, SyncWaiter, Vm};

/// The most journal appended between checkpoints (a quarter of
/// `journal_max` when that is less, so that trimming keeps up): what a
/// power loss makes recovery redo at most, a few seconds of the disk. Not
/// less: a checkpoint writes back what the image's page cache would have
/// absorbed; at 1 GiB, 1 MiB sequential writes over 512 MiB ran at 0.82x
/// (BENCHMARKS.md, "Issue 13: FLUSH syncs the journal only").
pub const MAX_BYTES: u64 = 8 << 30;

/// A disk's checkpoint state, behind the disk lock.
pub struct State {
    /// When the last full round began.
    pub at: Instant,
    /// Journal bytes appended since then.
    pub bytes: u64,
    /// A checkpoint was asked of the sync thread and has not begun yet.
    pub asked: bool,
}

impl Default for State {
    fn default() -> Self {
        State {
            at: Instant::now(),
            bytes: 0,
            asked: false,
        }
    }
}

impl State {
    /// A full round begins (under the disk lock).
    pub fn begin(&mut self) {
        *self = State::default();
    }
}

/// Nobody waits for a checkpoint the sealer asked for.
struct NoWaiter;

impl SyncWaiter for NoWaiter {
    fn synced(&self, _: &[u64], _: Result<(), u32>) {}
}

impl Vm {
    /// The most journal between checkpoints of a disk.
    pub(super) fn checkpoint_bytes(&self) -> u64 {
        MAX_BYTES.min(self.settings.journal_max / 4)
    }

    /// On the sealer's pass: ask the sync thread for a checkpoint of `disk`
    /// when one is due, and publish the last one made durable in the
    /// catalog. Returns how long until one is due at the latest.
    pub(super) fn checkpoint_pass(&self, disk: &Disk) -> Duration {
        // Granules filled by small writes, found off the data path
        // ([`super::inplace`]).
        let rescan = disk.lock_journal().inplace.rescan_due(Instant::now());
        if let Some(mut found) = rescan {
            found.fill(&disk.image);
            disk.lock_journal().inplace.merge(found);
        }
        let (due, wait) = {
            let mut st = disk.lock_journal();
            let written = st.last_seq > disk.synced_seq.load(Ordering::Acquire);
            let elapsed = st.ck.at.elapsed();
            let interval = self.settings.checkpoint_interval;
            // Trimming waits for a checkpoint: one is due at once while the
            // journal is degraded or resyncing, or when what it took since
            // the last one is as much as the room it has left.
            let tight = st.deg.mode != super::degraded::Mode::Normal
                || st.deg.room.saturating_sub(st.deg.appended) <= st.ck.bytes;
            let due = written
                && !st.ck.asked
                && (elapsed >= interval
                    || st.ck.bytes >= self.checkpoint_bytes()
                    || tight
                    || !st.al.is_kept());
            if due {
                st.ck.asked = true;
            }
            // Asked: the sync thread's round resets the clock; no pass is
            // needed before then.
            let wait = if written && !st.ck.asked {
                interval.saturating_sub(elapsed)
            } else {
                interval
            };
            (due, wait)
        };
        if due {
            let job = SyncJob {
                waiter: Arc::new(NoWaiter),
                cookies: Vec::new(),
                full: true,
            };
            // No sync thread (stopping): the stop makes the checkpoint.
            if disk.sync_sender().is_none_or(|tx| tx.send(job).is_err()) {
                disk.lock_journal().ck.asked = false;
            }
        }
        self.publish_checkpoint(disk);
        wait
    }

    /// Record the disk's last durable checkpoint in the catalog (the
    /// shipper's trim waits for it), if it is newer than the one recorded.
    pub(super) fn publish_checkpoint(&self, disk: &Disk) {
        let seq = disk.synced_seq.load(Ordering::Acquire);
        if seq <= disk.published_seq.load(Ordering::Relaxed) {
            return;
        }
        let r = self
            .catalog
            .lock()
            .unwrap()
            .set_image_synced(&self.uuid_str, &disk.name, seq);
        match r {
            Ok(()) => disk.published_seq.store(seq, Ordering::Relaxed),
            // Tried again at the next pass; meanwhile trimming waits.
            Err(e) => {
                if disk.stats.seal_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                    eprintln!("cdpd: disk {}: recording its checkpoint: {e}", disk.name);
                }
            }
        }
    }

    /// A checkpoint of every disk, now, published (at start, once recovery
    /// synced the images, and at a clean stop, with the sync threads gone).
    /// The first failure's NBD error.
    pub fn checkpoint_all(&self) -> Result<(), u32> {
        let mut result = Ok(());
        for d in &self.disks {
            result = result.and(super::make_durable(d, true));
            self.publish_checkpoint(d);
        }
        result
    }
}
