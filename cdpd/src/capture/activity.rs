//! The activity log of a disk (docs/RELIABILITY.md, "A power loss";
//! docs/DESIGN.md, "Write path"): the 4 MiB extents that may hold writes not
//! yet durable, DRBD-style, so that the start after a power loss resyncs
//! only those extents instead of taking a new baseline.
//!
//! Rule: an extent's bit is durable in the log (pwrite + fdatasync) BEFORE
//! any write to that extent reaches the image, because the image's page may
//! reach the disk before the journal's on a power loss. A write to an extent
//! already in the log costs a bit test under the disk lock the batch holds
//! anyway; only a cold extent costs a log sync.
//!
//! Bits are cleared only after a checkpoint (a sync round with journal,
//! image and dirty map synced; a FLUSH's round syncs the journal only)
//! covered every write to them: the extents written since the round
//! began are tracked in memory, and after a successful round, if the log
//! holds more than [`CAP`] extents, it is rewritten as just those (each of
//! them is in the durable log already, so whatever part of the rewrite
//! reaches the disk, the log on disk is a superset of what it must hold; a
//! torn rewrite fails its CRC, which costs an unbounded GAP, never a wrong
//! resync).
//!
//! The file is the dirty map's format with its own magic and granule
//! ([`cdp_core::journal::dirty::MapKind::Activity`]).

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;

use cdp_core::journal::dirty::{DirtyMap, Found, MapKind};

use super::batch::{Batch, Op};

/// Extents the log may hold before a successful sync round rewrites it as
/// the extents written during that round (256 × 4 MiB = 1 GiB to resync at
/// most, beyond what the last round covered).
pub const CAP: u64 = 256;

/// Extents logged ahead of a sequential writer with the cold extent it
/// reaches (so 64 MiB per log sync; only while the log is under [`CAP`]).
/// The cost of a superset: a power loss resyncs up to that much more.
const AHEAD: u64 = 15;

/// A disk's activity log, behind the disk lock.
pub struct ActivityLog {
    /// The log; its bits are the durable set. None when it could not be
    /// kept (then a power loss costs an unbounded GAP).
    log: Option<DirtyMap>,
    /// Extents written since the sync round began: a bitmap and its set
    /// bits (cleared at the next round's start).
    touched: Vec<u8>,
    touched_list: Vec<u64>,
    /// The extents (offset, length) the previous run's log held, as found
    /// at start; None when there was no valid log.
    pub found: Option<Vec<(u64, u64)>>,
    /// Cold extents made durable in the log (a log sync each).
    pub cold_syncs: u64,
}

impl ActivityLog {
    /// Open the log of a disk at `path` (at cdpd start), reading what the
    /// previous run left in it ([`ActivityLog::found`]). Its bits stay set
    /// (a superset is safe) until [`ActivityLog::reset`].
    pub fn open(path: &Path, disk: &str, disk_size: u64) -> ActivityLog {
        let existed = std::fs::metadata(path).is_ok_and(|m| m.len() > 0);
        let (log, found) = match DirtyMap::open_kind(path, MapKind::Activity, disk_size) {
            Ok((map, found)) => {
                let found = match found {
                    Found::Clean if existed => Some(Vec::new()),
                    Found::Clean => None,
                    Found::Dirty => Some(extents(&map)),
                    Found::Corrupt(why) => {
                        eprintln!("cdpd: disk {disk}: activity log {}: {why}", path.display());
                        None
                    }
                };
                (Some(map), found)
            }
            Err(e) => {
                eprintln!(
                    "cdpd: disk {disk}: {e}: without an activity log, a power loss costs a new baseline"
                );
                (None, None)
            }
        };
        let n = log
            .as_ref()
            .map_or(0, |m| m.header().disk_size.div_ceil(m.granule()));
        ActivityLog {
            log,
            touched: vec![0u8; n.div_ceil(8) as usize],
            touched_list: Vec::new(),
            found,
            cold_syncs: 0,
        }
    }

    /// Is there a log being kept?
    pub fn is_kept(&self) -> bool {
        self.log.is_some()
    }

    /// Every extent set in the log (the honest dirty set after a failed
    /// image sync); None when no log is kept.
    pub fn extents(&self) -> Option<Vec<(u64, u64)>> {
        self.log.as_ref().map(extents)
    }

    /// Extents set in the log.
    pub fn count(&self) -> u64 {
        self.log.as_ref().map_or(0, |m| m.count())
    }

    /// Before a batch's changes reach the image (under the disk lock): every
    /// extent they touch is durable in the log. A hot extent costs two bit
    /// tests; a cold one a pwrite, and one fdatasync per batch.
    pub(super) fn cover(&mut self, disk: &str, batch: &Batch) {
        let changes = batch
            .reqs
            .iter()
            .filter(|r| matches!(r.op, Op::Journal(k) if k.changes_data()))
            .map(|r| (r.offset, r.length));
        self.cover_ranges(disk, changes);
    }

    /// [`ActivityLog::cover`] for byte ranges (offset, length).
    fn cover_ranges(&mut self, disk: &str, ranges: impl Iterator<Item = (u64, u64)>) {
        let Some(log) = self.log.as_mut() else {
            return;
        };
        let mut cold = false;
        for (offset, length) in ranges {
            let (e0, e1) = log.granules(offset, length);
            for e in e0..e1 {
                let (byte, bit) = ((e / 8) as usize, 1u8 << (e % 8));
                if self.touched[byte] & bit == 0 {
                    self.touched[byte] |= bit;
                    self.touched_list.push(e);
                }
                if !log.bit(e) {
                    cold = true;
                    // A cold extent right after a logged one: a sequential
                    // writer moving on; log the extents it reaches next with
                    // the same sync (one sync per AHEAD + 1 extents).
                    let ahead = if e > 0 && log.bit(e - 1) && log.count() + AHEAD < CAP {
                        AHEAD
                    } else {
                        0
                    };
                    // (Clipped to the disk by `mark`.)
                    if let Err(err) = log.mark(e * log.granule(), (1 + ahead) * log.granule()) {
                        return self.lose(disk, &err);
                    }
                }
            }
        }
        if cold {
            match log.commit().and_then(|()| log.sync()) {
                Ok(()) => self.cold_syncs += 1,
                Err(e) => self.lose(disk, &e),
            }
        }
    }

    /// The log cannot be kept (a write or sync of it failed): it is removed,
    /// so that the start after a power loss does not trust it.
    fn lose(&mut self, disk: &str, e: &io::Error) {
        let Some(log) = self.log.take() else { return };
        let removed = std::fs::remove_file(&log.path);
        eprintln!(
            "cdpd: disk {disk}: activity log {}: {e}: no longer kept ({}); a power loss now costs a new baseline",
            log.path.display(),
            match removed {
                Ok(()) => "removed".to_string(),
                Err(r) => format!("removing it failed too: {r}"),
            }
        );
    }

    /// A sync round begins (under the disk lock): track the extents written
    /// from now on.
    pub fn begin_round(&mut self) {
        for e in self.touched_list.drain(..) {
            self.touched[(e / 8) as usize] = 0;
        }
    }

    /// The round begun last made everything before it durable (under the
    /// disk lock). A log over [`CAP`] extents is rewritten as the extents
    /// written since; the file to sync (outside the lock) is returned.
    pub fn round_done(&mut self, disk: &str) -> Option<Arc<File>> {
        let log = self.log.as_mut()?;
        if log.count() <= CAP {
            return None;
        }
        match log.replace(self.touched_list.iter().copied()) {
            Ok(()) => Some(log.file.clone()),
            Err(e) => {
                self.lose(disk, &e);
                None
            }
        }
    }

    /// A checkpoint made every record up to `seq` durable in the image:
    /// recorded in the log's header (under the disk lock); the file to sync
    /// (outside it) is returned. None without a log, or when it was lost.
    pub fn set_synced(&mut self, disk: &str, seq: u64) -> Option<Arc<File>> {
        let m = self.log.as_mut()?;
        match m.set_synced_seq(seq) {
            Ok(()) => Some(m.file.clone()),
            Err(e) => {
                self.lose(disk, &e);
                None
            }
        }
    }

    /// Before a power loss's resync GAP is journaled: the lowest seq that GAP
    /// can have, made durable in the log's header (the first one given is
    /// kept until [`ActivityLog::reset`]). Should the host lose power again
    /// before the extents are durable in the dirty map, the next start
    /// finds the log as it was and its RESYNCED heals that earlier GAP too.
    /// Returns the floor in force; None without a log.
    pub fn gap_floor(&mut self, disk: &str, floor: u64) -> Option<u64> {
        let m = self.log.as_mut()?;
        match m.set_gap_seq(floor).and_then(|()| m.sync()) {
            Ok(()) => Some(m.header().gap_seq),
            Err(e) => {
                self.lose(disk, &e);
                None
            }
        }
    }

    /// Clear the log, durably (at start, once what it held is durable in the
    /// image or tracked in the dirty map).
    pub fn reset(&mut self, disk: &str) {
        self.begin_round();
        if let Some(Err(e)) = self.log.as_mut().map(|m| m.reset()) {
            self.lose(disk, &e);
        }
    }
}

/// The set extents of a log as (offset, length), one per extent.
fn extents(map: &DirtyMap) -> Vec<(u64, u64)> {
    let mut v = Vec::new();
    let mut at = 0;
    while let Some((o, l)) = map.next_dirty(at, map.granule()) {
        v.push((o, l));
        // o is extent-aligned; l may be clipped by the disk's end.
        at = o + map.granule();
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const EXTENT: u64 = 4 * MIB;

    fn on_disk(p: &Path, size: u64) -> Vec<u64> {
        let m = DirtyMap::read_only(p, MapKind::Activity, size)
            .unwrap()
            .unwrap();
        (0..size / EXTENT).filter(|&e| m.bit(e)).collect()
    }

    /// A cold extent is durable in the log before the batch goes on, a hot
    /// one costs no sync; a successful round over the cap rewrites the log
    /// as the extents written since it began; what a run left is found by
    /// the next one.
    #[test]
    fn extents_are_logged_once_and_forgotten_after_a_round_over_the_cap() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("activity.log");
        let size = 4 << 30;
        let mut al = ActivityLog::open(&p, "vda", size);
        assert!(
            al.found.is_none(),
            "no log before: nothing bounds a power loss"
        );
        al.cover_ranges("vda", [(0, 4096)].into_iter());
        assert_eq!((al.cold_syncs, on_disk(&p, size)), (1, vec![0]));
        al.cover_ranges("vda", [(EXTENT - 512, 512), (100, 1)].into_iter());
        assert_eq!(al.cold_syncs, 1, "a hot extent costs no sync");
        // One sync for a batch of cold extents.
        al.begin_round();
        al.cover_ranges("vda", (1..=CAP + 10).map(|e| (e * EXTENT, 1)));
        assert_eq!((al.cold_syncs, al.count()), (2, CAP + 11));
        assert!(al.round_done("vda").is_some(), "over the cap");
        assert_eq!(
            al.count(),
            CAP + 10,
            "extent 0 was not written in the round"
        );
        al.begin_round();
        al.cover_ranges("vda", [(2 * EXTENT - 1, 2)].into_iter());
        assert_eq!(al.cold_syncs, 2, "across a boundary, both hot");
        al.begin_round();
        al.cover_ranges("vda", [(5 * EXTENT, 1)].into_iter());
        al.round_done("vda").unwrap().sync_data().unwrap();
        assert_eq!(on_disk(&p, size), vec![5]);
        assert!(al.round_done("vda").is_none(), "under the cap: kept");
        drop(al);

        let mut al = ActivityLog::open(&p, "vda", size);
        assert_eq!(al.found, Some(vec![(5 * EXTENT, EXTENT)]));
        assert_eq!(al.extents(), Some(vec![(5 * EXTENT, EXTENT)]));
        al.reset("vda");
        assert!(on_disk(&p, size).is_empty());
        drop(al);
        assert_eq!(ActivityLog::open(&p, "vda", size).found, Some(vec![]));

        // A log that does not check out bounds nothing.
        std::fs::write(&p, b"garbage").unwrap();
        assert!(ActivityLog::open(&p, "vda", size).found.is_none());
    }

    /// A sequential writer costs one log sync per `AHEAD + 1` extents; a
    /// cold extent that does not follow a logged one is logged alone; near
    /// the cap nothing is logged ahead.
    #[test]
    fn a_sequential_writer_is_logged_ahead() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("activity.log");
        let size = 2 << 30;
        let mut al = ActivityLog::open(&p, "vda", size);
        al.cover_ranges("vda", [(40 * EXTENT, 4096)].into_iter());
        assert_eq!(on_disk(&p, size), vec![40], "no predecessor: alone");
        al.reset("vda");
        let before = al.cold_syncs;
        for mib in 0..256 {
            al.cover_ranges("vda", [(mib * MIB, MIB)].into_iter());
        }
        // Extent 0 alone, then 1..=16, 17..=32, 33..=48, 49..=64.
        assert_eq!(al.cold_syncs - before, 5);
        assert_eq!(on_disk(&p, size), (0..=64).collect::<Vec<_>>());
        // Near the cap: a cold extent after a logged one, logged alone.
        al.reset("vda");
        al.cover_ranges("vda", (0..CAP - 5).map(|e| (e * EXTENT, 1)));
        al.cover_ranges("vda", [((CAP - 5) * EXTENT, 1)].into_iter());
        assert_eq!(al.count(), CAP - 4);
    }

    /// A power loss's floor is durable with the log's extents: a second
    /// power loss before the log is reset finds both, and the floor given
    /// first stays (the RESYNCED then heals the earlier GAP too); the reset
    /// that follows a durable dirty map clears it.
    #[test]
    fn the_gap_floor_survives_with_the_extents_until_the_reset() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("activity.log");
        let size = 64 * MIB;
        let mut al = ActivityLog::open(&p, "vda", size);
        al.cover_ranges("vda", [(EXTENT, 1)].into_iter());
        assert_eq!(al.gap_floor("vda", 10), Some(10));
        drop(al); // power lost again before the reset
        let mut al = ActivityLog::open(&p, "vda", size);
        assert_eq!(al.found, Some(vec![(EXTENT, EXTENT)]));
        assert_eq!(al.gap_floor("vda", 17), Some(10), "the first floor stays");
        al.reset("vda");
        drop(al);
        let mut al = ActivityLog::open(&p, "vda", size);
        assert_eq!(al.gap_floor("vda", 30), Some(30), "a reset clears it");
    }
}
