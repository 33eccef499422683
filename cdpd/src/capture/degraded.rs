//! Degraded mode: a full journal never fails the guest (docs/RELIABILITY.md,
//! "A full journal"; docs/DESIGN.md, "Write path").
//!
//! Invariant, per disk, at all times: for every byte range, EITHER its bit
//! in the dirty map is set OR the journal replayed equals the image there.
//!
//! - Normal: records are journaled; the bytes appended since the sealer last
//!   measured the room left (`journal_max`, `journal_min_free`) are counted
//!   under the disk lock the batch holds anyway. An append that fails
//!   (ENOSPC, EDQUOT, EIO, …), a batch that uses the room up, or a failed
//!   sync of the journal (poisoning) enters degraded mode.
//! - Degraded: a batch's changes go to the image only (the guest gets
//!   success) and their ranges' bits are set in the dirty map, which FLUSH
//!   and FUA sync together with the image.
//! - Leaving (the sealer, once there is room again): a GAP
//!   `{"resync": true}` is journaled, journaling resumes at once, and the
//!   sealer journals the dirty ranges as the image holds them, piece by
//!   piece (WRITE|RESYNC, or ZERO|RESYNC when all zero, at most
//!   [`RESYNC_PIECE`] through one buffer, each under the disk lock), then
//!   RESYNCED `{"gap_seq": g}` heals the window, and the map is cleared.
//! - A map that cannot be kept (none could be created, a write to it failed,
//!   or it was found corrupt at start) makes the way out today's unbounded
//!   GAP, recorded in the catalog (the shipper takes a new baseline).

use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cdp_core::config::UNLIMITED;
use cdp_core::journal::dirty::{DirtyMap, Found};
use cdp_core::journal::format::{Kind, FLAG_RESYNC, RECORD_HEADER_LEN};
use cdp_core::journal::writer::Record;
use cdp_core::time::{fmt_ns, now_ns};

use super::batch::{Batch, Op};
use super::{apply, switch_out, Disk, JournalState, Vm, RESYNC_PIECE};

/// The journal mode of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal,
    Degraded,
    Resyncing,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Normal => "normal",
            Mode::Degraded => "degraded",
            Mode::Resyncing => "resyncing",
        }
    }
}

/// Room (bytes) needed before leaving degraded mode, so that it does not
/// flap: this much, or a quarter of `journal_max` when that is smaller.
const EXIT_ROOM: u64 = 4 << 20;

/// How often the room is measured while journaling normally.
const MEASURE_EVERY: Duration = Duration::from_millis(250);

/// Resync pieces per sealer pass (the sealer seals between passes).
const PIECES_PER_PASS: usize = 16;

/// Degraded-mode state of a disk, behind the disk lock.
pub struct DegradedState {
    pub mode: Mode,
    /// The disk's dirty map; None when it could not be opened.
    pub map: Option<DirtyMap>,
    /// Ranges were taken that the map does not hold (no map, or a write to
    /// it failed): leaving needs an unbounded GAP.
    pub map_lost: bool,
    /// An unbounded GAP to journal at the sealer's next pass (a corrupt
    /// map found at start).
    pub pending_gap: Option<String>,
    /// Bytes that may be appended before the journal's bound or floor is
    /// reached, as last measured.
    pub room: u64,
    /// Record bytes appended since that measure.
    pub appended: u64,
    measured: Option<Instant>,
    /// Where the resync goes on.
    cursor: u64,
    /// Extents and bytes journaled by this resync (RESYNCED's payload).
    extents: u64,
    bytes: u64,
}

impl DegradedState {
    /// Open the dirty map of a disk at `path` (at cdpd start): a map with
    /// bits set resumes degraded mode (no GAP journaled for it yet) or the
    /// resync (its GAP is journaled); a corrupt one is replaced and an
    /// unbounded GAP is due.
    pub fn open(path: &Path, disk: &str, disk_size: u64) -> DegradedState {
        let mut s = DegradedState {
            mode: Mode::Normal,
            map: None,
            map_lost: false,
            pending_gap: None,
            room: u64::MAX,
            appended: 0,
            measured: None,
            cursor: 0,
            extents: 0,
            bytes: 0,
        };
        match DirtyMap::open(path, disk_size) {
            Ok((map, found)) => {
                // Written but perhaps not synced by a run that crashed: it
                // must outlive a power loss now that recovery synced the
                // image it tracks.
                if found == Found::Dirty {
                    if let Err(e) = map.sync() {
                        eprintln!("cdpd: disk {disk}: syncing {}: {e}", path.display());
                    }
                }
                match found {
                    Found::Clean => {}
                    Found::Dirty if map.header().gap_seq != 0 => {
                        eprintln!(
                            "cdpd: disk {disk}: {} bytes marked in {} are resynced (the GAP at seq {} is healed once done)",
                            map.dirty_bytes(),
                            path.display(),
                            map.header().gap_seq
                        );
                        s.mode = Mode::Resyncing;
                    }
                    Found::Dirty => {
                        eprintln!(
                            "cdpd: disk {disk}: {} bytes marked in {}: degraded since {}, resynced once the journal has room",
                            map.dirty_bytes(),
                            path.display(),
                            fmt_ns(map.header().since_ns)
                        );
                        s.mode = Mode::Degraded;
                    }
                    Found::Corrupt(why) => {
                        eprintln!("cdpd: disk {disk}: dirty map {}: {why}", path.display());
                        s.pending_gap = Some(format!(
                            "the dirty map {} of an earlier run cannot be trusted ({why}): writes it \
                             tracked may be missing from the journal; a new baseline is needed",
                            path.display()
                        ));
                    }
                }
                s.map = Some(map);
            }
            Err(e) => eprintln!(
                "cdpd: disk {disk}: {e}: without a dirty map, a full journal ends in a GAP that needs a new baseline"
            ),
        }
        s
    }

    /// Mark a range dirty (the header follows at [`DegradedState::commit`]);
    /// a failed write loses the map.
    fn mark(&mut self, offset: u64, length: u64) {
        match self.map.as_mut().map(|m| m.mark(offset, length)) {
            Some(Ok(_)) => {}
            _ => self.map_lost = true,
        }
    }

    /// Write the map's header after a batch of [`DegradedState::mark`]s.
    fn commit(&mut self) {
        if let Some(Err(_)) = self.map.as_mut().map(|m| m.commit()) {
            self.map_lost = true;
        }
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.map.as_ref().map_or(0, |m| m.dirty_bytes())
    }

    pub fn since_ns(&self) -> u64 {
        match self.mode {
            Mode::Normal => 0,
            _ => self.map.as_ref().map_or(0, |m| m.header().since_ns),
        }
    }
}

/// Enter degraded mode (under the disk lock): the map records since when,
/// and what was journaled so far is switched out to be sealed. True when a
/// segment was switched out (the sealer has work).
fn enter(disk: &Disk, st: &mut JournalState, why: &str) -> bool {
    if st.deg.mode == Mode::Degraded {
        return false;
    }
    set_mode(st, Mode::Degraded);
    disk.stats.times_degraded.fetch_add(1, Ordering::Relaxed);
    match st.deg.map.as_mut().map(|m| m.set_since(now_ns())) {
        Some(Ok(())) => {}
        _ => st.deg.map_lost = true,
    }
    eprintln!(
        "cdpd: disk {}: {why}: degraded: writes go to the image and their ranges to the dirty map until the journal has room",
        disk.name
    );
    // A sealed segment is never redone over the image at the next start
    // (redo would put older data back under a dirty range).
    st.open.as_ref().is_some_and(|s| s.records() > 0) && switch_out(st)
}

/// A sync of the journal failed (the FLUSH that saw it gets the error):
/// what the segments not yet sealed hold may be lost, so their ranges are
/// marked dirty and the disk runs degraded until they are resynced. No
/// later FLUSH succeeds over dropped data without them being tracked.
pub fn poison(disk: &Disk, e: &io::Error) {
    let mut g = disk.lock_journal();
    let st = &mut *g;
    let ranges: Vec<(u64, u64)> = st
        .open
        .iter()
        .chain(st.to_seal.iter())
        .flat_map(|s| s.index.iter())
        .filter(|i| i.kind.changes_data())
        .map(|i| (i.offset, i.length))
        .collect();
    for (o, l) in ranges {
        st.deg.mark(o, l);
    }
    st.deg.commit();
    enter(
        disk,
        st,
        &format!("syncing the journal failed ({e}): it is poisoned"),
    );
}

/// A sync of the image failed (the FLUSH that saw it gets the error): what
/// it dropped is unknown but lies in the activity log's extents (every write
/// not covered by a successful sync round is in them), which are marked
/// dirty, and the disk runs degraded until they are resynced. Without an
/// activity log the map cannot hold it: leaving then needs a new baseline.
pub fn poison_image(disk: &Disk, e: &io::Error) {
    let mut g = disk.lock_journal();
    let st = &mut *g;
    match st.al.extents() {
        Some(extents) => {
            for (o, l) in extents {
                st.deg.mark(o, l);
            }
        }
        None => st.deg.map_lost = true,
    }
    st.deg.commit();
    enter(
        disk,
        st,
        &format!("syncing the image failed ({e}): it is poisoned"),
    );
}

fn set_mode(st: &mut JournalState, m: Mode) {
    st.deg.mode = m;
}

/// Room left on the journal of a disk: under `journal_max` and above the
/// filesystem's `journal_min_free`.
fn measure_room(vm: &Vm, disk: &Disk) -> u64 {
    let s = &vm.settings;
    let mut room = u64::MAX;
    if s.journal_max != UNLIMITED {
        room = s
            .journal_max
            .saturating_sub(super::control::journal_usage(&disk.journal_dir).0);
    }
    if let Ok(v) = nix::sys::statvfs::statvfs(&disk.journal_dir) {
        let frag = v.fragment_size();
        let total = v.blocks().saturating_mul(frag);
        let free = v.blocks_available().saturating_mul(frag);
        room = room.min(free.saturating_sub(s.journal_min_free.bytes(total)));
    }
    room
}

impl Vm {
    /// A batch while degraded: its ranges into the dirty map, its changes
    /// to the image; the guest gets the image's result, never the
    /// journal's. Called under the disk lock.
    pub(super) fn apply_degraded(
        &self,
        disk: &Disk,
        st: &mut JournalState,
        batch: &mut Batch,
        buf: &[u8],
    ) {
        for r in &batch.reqs {
            if matches!(r.op, Op::Journal(k) if k.changes_data()) {
                st.deg.mark(r.offset, r.length);
            }
        }
        st.deg.commit();
        if !apply(disk, batch, buf) {
            disk.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Enter degraded mode (under the disk lock); see [`enter`].
    pub(super) fn enter_degraded(&self, disk: &Disk, st: &mut JournalState, why: &str) {
        if enter(disk, st, why) {
            self.wake_sealer();
        }
    }

    /// The sealer's degraded-mode work for every disk: measure the room,
    /// leave degraded mode when there is enough, resync. Returns how soon
    /// to come back.
    pub fn degraded_pass(&self, buf: &mut Vec<u8>) -> Duration {
        let mut next = Duration::from_secs(1);
        for disk in &self.disks {
            let (due, appended0) = {
                let st = disk.lock_journal();
                let due = st.deg.mode != Mode::Normal
                    || st.deg.pending_gap.is_some()
                    || st.deg.measured.is_none_or(|t| t.elapsed() >= MEASURE_EVERY);
                (due, st.deg.appended)
            };
            if !due {
                continue;
            }
            let room = measure_room(self, disk);
            let mut st = disk.lock_journal();
            st.deg.appended = st.deg.appended.saturating_sub(appended0);
            st.deg.room = room;
            st.deg.measured = Some(Instant::now());
            if let Some(reason) = st.deg.pending_gap.take() {
                drop(st);
                self.journal_unbounded_gap(disk, reason);
                continue;
            }
            match st.deg.mode {
                Mode::Normal => {}
                Mode::Degraded => {
                    let exit = EXIT_ROOM.min(self.settings.journal_max / 4);
                    if room >= exit {
                        drop(st);
                        self.leave_degraded(disk);
                        next = Duration::ZERO;
                    }
                }
                Mode::Resyncing => {
                    drop(st);
                    if self.resync_some(disk, buf) {
                        next = Duration::ZERO;
                    }
                }
            }
        }
        next
    }

    /// The extents and bytes the activity logs of every disk held at start,
    /// when each disk has a valid log and a dirty map to resync them
    /// through (a bounded resync after a power loss is possible); None
    /// otherwise.
    pub fn power_loss_extents(&self) -> Option<(u64, u64)> {
        let (mut n, mut bytes) = (0, 0);
        for d in &self.disks {
            let st = d.lock_journal();
            let found = st.al.found.as_ref()?;
            if st.deg.map.is_none() || st.deg.map_lost || st.deg.pending_gap.is_some() {
                return None;
            }
            n += found.len() as u64;
            bytes += found.iter().map(|(_, l)| l).sum::<u64>();
        }
        Some((n, bytes))
    }

    /// After a power loss, the GAP at `gap_seq` journaled: every disk's
    /// activity-log extents go to its dirty map (durably), and the resync
    /// journals them from the image, then RESYNCED heals the GAP
    /// (docs/RELIABILITY.md, "A power loss"). A map that cannot take them
    /// makes the way out an unbounded GAP.
    pub fn resync_after_power_loss(&self, gap_seq: u64) {
        for disk in &self.disks {
            let mut g = disk.lock_journal();
            let st = &mut *g;
            let extents = st.al.found.take().unwrap_or_default();
            for &(o, l) in &extents {
                st.deg.mark(o, l);
            }
            st.deg.commit();
            let durable = match st.deg.map.as_mut() {
                Some(m) if !st.deg.map_lost => m.set_gap_seq(gap_seq).and_then(|()| m.sync()),
                _ => Err(io::Error::other("no dirty map")),
            };
            if let Err(e) = durable {
                st.deg.map_lost = true;
                st.deg.pending_gap = Some(format!(
                    "after a power loss, the activity log's extents could not be recorded in the                      dirty map ({e}): a new baseline is needed"
                ));
                continue;
            }
            // Even with no extent: RESYNCED must heal the GAP.
            if st.deg.mode == Mode::Normal {
                st.deg.cursor = 0;
                st.deg.extents = 0;
                st.deg.bytes = 0;
                set_mode(st, Mode::Resyncing);
            }
            eprintln!(
                "cdpd: disk {}: power loss: resyncing the {} extents of the activity log ({} bytes);                  RESYNCED then heals the GAP at seq {gap_seq}",
                disk.name,
                extents.len(),
                extents.iter().map(|(_, l)| l).sum::<u64>()
            );
        }
        self.wake_sealer();
    }

    /// Clear every disk's activity log, once what it held is durable in the
    /// image (recovery synced it) or tracked in the dirty map.
    /// [`ActivityLog::gap_floor`] on every disk: the floor every RESYNCED
    /// of this power loss names (the lowest in force), or None when a disk
    /// keeps no log.
    pub fn power_loss_gap_floor(&self, floor: u64) -> Option<u64> {
        let mut lowest = u64::MAX;
        for d in &self.disks {
            lowest = lowest.min(d.lock_journal().al.gap_floor(&d.name, floor)?);
        }
        Some(lowest)
    }

    pub fn reset_activity_logs(&self) {
        for d in &self.disks {
            d.lock_journal().al.reset(&d.name);
        }
    }

    /// Reserve one seq with a timestamp no earlier than `since` (the GAP
    /// of a window is dated at its start, so that points named by a time
    /// inside the window resolve into it).
    fn reserve_from(&self, since: u64) -> (u64, u64) {
        let mut c = self.clock.lock().unwrap();
        c.last_seq += 1;
        c.last_ts = c.last_ts.max(since);
        (c.last_seq, c.last_ts)
    }

    /// Journal the GAP that ends degraded mode: healable when the map holds
    /// every range taken, else unbounded.
    fn leave_degraded(&self, disk: &Disk) {
        let mut g = disk.lock_journal();
        let st = &mut *g;
        if st.deg.mode != Mode::Degraded {
            return;
        }
        let since = st.deg.since_ns();
        if st.deg.map_lost || st.deg.map.is_none() {
            let reason = format!(
                "journal full since {}: the ranges written since could not all be tracked (the dirty map \
                 could not be written); a new baseline is needed",
                fmt_ns(since)
            );
            drop(g);
            self.journal_unbounded_gap(disk, reason);
            return;
        }
        let dirty = st.deg.dirty_bytes();
        let reason = format!(
            "journal full since {}: {dirty} bytes written meanwhile were not journaled; they are \
             journaled again from the image (RESYNC records), then RESYNCED heals this gap",
            fmt_ns(since)
        );
        let payload = serde_json::to_vec(&serde_json::json!({
            "reason": reason, "resync": true, "since_ns": since, "dirty_bytes": dirty,
        }))
        .unwrap_or_default();
        let (seq, ts) = self.reserve_from(since);
        let rec = Record {
            kind: Kind::Gap,
            flags: 0,
            offset: 0,
            length: 0,
            payload: &payload,
        };
        if self.append_at(disk, st, seq, ts, rec).is_err() {
            return;
        }
        st.deg.appended += (RECORD_HEADER_LEN + payload.len()) as u64;
        if let Some(m) = st.deg.map.as_mut() {
            if m.set_gap_seq(seq).is_err() {
                st.deg.map_lost = true;
            }
        }
        st.deg.cursor = 0;
        st.deg.extents = 0;
        st.deg.bytes = 0;
        set_mode(st, Mode::Resyncing);
        eprintln!(
            "cdpd: disk {}: the journal has room again: journaling, and resyncing {dirty} bytes (GAP at seq {seq})",
            disk.name
        );
    }

    /// Today's GAP: what changed cannot be told, a new baseline is needed
    /// (recorded in the catalog, which makes the shipper take one). The map
    /// is cleared: the baseline covers it.
    fn journal_unbounded_gap(&self, disk: &Disk, reason: String) {
        let (seq, ts) = {
            let mut g = disk.lock_journal();
            let st = &mut *g;
            let payload =
                serde_json::to_vec(&serde_json::json!({ "reason": reason })).unwrap_or_default();
            let since = st.deg.since_ns();
            let (seq, ts) = self.reserve_from(since);
            let rec = Record {
                kind: Kind::Gap,
                flags: 0,
                offset: 0,
                length: 0,
                payload: &payload,
            };
            if self.append_at(disk, st, seq, ts, rec).is_err() {
                st.deg.pending_gap = Some(reason);
                return;
            }
            if let Some(m) = st.deg.map.as_mut() {
                st.deg.map_lost = m.reset().is_err();
            }
            set_mode(st, Mode::Normal);
            (seq, ts)
        };
        eprintln!("cdpd: disk {}: GAP at seq {seq}: {reason}", disk.name);
        if let Err(e) =
            self.catalog
                .lock()
                .unwrap()
                .add_gap(&self.uuid_str, &disk.name, seq, ts, &reason)
        {
            eprintln!(
                "cdpd: disk {}: recording the GAP at seq {seq} in the catalog: {e}",
                disk.name
            );
        }
    }

    /// Journal up to [`PIECES_PER_PASS`] dirty pieces of a disk as the image
    /// holds them. Returns true when there is more to do now.
    fn resync_some(&self, disk: &Disk, buf: &mut Vec<u8>) -> bool {
        for _ in 0..PIECES_PER_PASS {
            let mut g = disk.lock_journal();
            let st = &mut *g;
            if st.deg.mode != Mode::Resyncing {
                return false;
            }
            let Some(map) = st.deg.map.as_ref() else {
                return false;
            };
            let next = map
                .next_dirty(st.deg.cursor, RESYNC_PIECE)
                .or_else(|| map.next_dirty(0, RESYNC_PIECE));
            let Some((off, len)) = next else {
                self.finish_resync(disk, st);
                return false;
            };
            if st.deg.appended + len + RECORD_HEADER_LEN as u64 > st.deg.room {
                self.enter_degraded(disk, st, "the journal filled again during the resync");
                return false;
            }
            if let Err(e) = self.resync_piece(disk, st, buf, off, len) {
                self.enter_degraded(disk, st, &format!("resyncing at offset {off}: {e}"));
                return false;
            }
        }
        true
    }

    /// One piece: read it from the image and journal it (under the disk
    /// lock, so no guest write comes between), then clear its bits.
    fn resync_piece(
        &self,
        disk: &Disk,
        st: &mut JournalState,
        buf: &mut Vec<u8>,
        off: u64,
        len: u64,
    ) -> io::Result<()> {
        if buf.len() < RESYNC_PIECE as usize {
            buf.resize(RESYNC_PIECE as usize, 0);
        }
        let data = &mut buf[..len as usize];
        disk.image.read_exact_at(data, off)?;
        let zero = data.iter().all(|&b| b == 0);
        let rec = Record {
            kind: if zero { Kind::Zero } else { Kind::Write },
            flags: FLAG_RESYNC,
            offset: off,
            length: len,
            payload: if zero { &[] } else { data },
        };
        let (seq, ts) = self.reserve(1);
        self.append_at(disk, st, seq, ts, rec)?;
        let bytes = RECORD_HEADER_LEN as u64 + rec.payload.len() as u64;
        st.deg.appended += bytes;
        if st
            .open
            .as_ref()
            .is_some_and(|s| s.pos >= self.settings.segment_size)
        {
            self.switch(st);
        }
        // A bit left set in the file (a failed write) is only resynced again.
        if let Some(m) = st.deg.map.as_mut() {
            let _ = m.clear(off, len);
        }
        st.deg.cursor = off + len;
        st.deg.extents += 1;
        st.deg.bytes += len;
        let s = &disk.stats;
        s.resync_bytes_read.fetch_add(len, Ordering::Relaxed);
        s.resync_bytes_journaled
            .fetch_add(rec.payload.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Every tracked range is journaled again: RESYNCED, made durable with
    /// the resync's records, then the map is cleared.
    fn finish_resync(&self, disk: &Disk, st: &mut JournalState) {
        let Some(gap_seq) = st.deg.map.as_ref().map(|m| m.header().gap_seq) else {
            return;
        };
        let payload = serde_json::to_vec(&serde_json::json!({
            "gap_seq": gap_seq, "extents": st.deg.extents, "bytes": st.deg.bytes,
        }))
        .unwrap_or_default();
        let (seq, ts) = self.reserve(1);
        let rec = Record {
            kind: Kind::Resynced,
            flags: 0,
            offset: 0,
            length: 0,
            payload: &payload,
        };
        let durable = self.append_at(disk, st, seq, ts, rec).and_then(|()| {
            for f in st.open.iter().map(|s| &s.file).chain(st.unsynced.iter()) {
                f.sync_data()?;
            }
            Ok(())
        });
        if let Err(e) = durable {
            self.enter_degraded(disk, st, &format!("journaling RESYNCED: {e}"));
            return;
        }
        st.deg.appended += (RECORD_HEADER_LEN + payload.len()) as u64;
        if let Some(m) = st.deg.map.as_mut() {
            st.deg.map_lost = m.reset().is_err();
        }
        set_mode(st, Mode::Normal);
        disk.stats.resyncs_done.fetch_add(1, Ordering::Relaxed);
        eprintln!(
            "cdpd: disk {}: resync done: {} extents, {} bytes journaled again; RESYNCED at seq {seq} heals the GAP at seq {gap_seq}",
            disk.name, st.deg.extents, st.deg.bytes
        );
    }
}
