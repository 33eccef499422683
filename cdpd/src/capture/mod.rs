//! The capture daemon: one VM, its disks, their journals.
//!
//! Data path of a guest write (docs/DESIGN.md, "Write path"): the connection thread parses a
//! batch of requests, takes the disk's journal lock once for the batch,
//! reserves sequence numbers, appends every record with one `pwritev`
//! (write-ahead), applies the writes to the image in sequence order, and
//! replies. FLUSH and FUA replies wait for the disk's sync thread, which
//! makes the journal durable for every waiting request at once (group
//! commit) and hands the result back to each connection, which replies:
//! replies may come out of order. The image is made durable by checkpoints
//! ([`checkpoint`]).
//!
//! - [`batch`]: one batch of requests (handle, op, range, payload, result).
//! - [`conn`]: one NBD connection: handshake, reading batches, replies.
//! - [`degraded`]: degraded mode, the dirty map, the resync.
//! - [`activity`]: the activity log (the extents a power loss may have
//!   left different in journal and image), made durable before the image
//!   is written.
//! - this module: the VM, its disks, journaling and applying a batch, the
//!   sync and sealer threads.
//!
//! Invariant: the image always equals the initial image plus the journal
//! replayed in order. Holding the disk lock from seq reservation to the last
//! image write of a batch makes the image's write order the sequence order.

pub(crate) mod activity;
pub(crate) mod applier;
pub(crate) mod batch;
pub(crate) mod checkpoint;
pub(crate) mod conn;
pub(crate) mod control;
pub(crate) mod degraded;
pub(crate) mod inplace;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use thiserror::Error;

use cdp_core::catalog::{Catalog, CatalogError};
use cdp_core::config::JournalSettings;
use cdp_core::image;
use cdp_core::journal::format::{Kind, SegmentHeader};
use cdp_core::journal::writer::{OpenSegment, Record, SealedSegment, SpareSegment};
use cdp_core::layout::RunDir;
use cdp_core::names::NameError;
use cdp_core::nbd::proto::nbd_errno;
use cdp_core::time::now_ns;

use batch::{Batch, Op, Req};

/// Counters of one disk, updated once per batch, never logged per request.
#[derive(Default)]
pub struct DiskStats {
    pub bytes_written: AtomicU64,
    pub write_requests: AtomicU64,
    pub bytes_read: AtomicU64,
    pub read_requests: AtomicU64,
    pub in_flight: AtomicU64,
    pub connections: AtomicU64,
    pub errors: AtomicU64,
    pub protocol_errors: AtomicU64,
    /// Sync rounds that answered FLUSH or FUA requests (a checkpoint asked
    /// by the sealer alone is counted in `checkpoints` only).
    pub flushes: AtomicU64,
    pub seal_errors: AtomicU64,
    pub times_degraded: AtomicU64,
    pub resync_bytes_read: AtomicU64,
    pub resync_bytes_journaled: AtomicU64,
    pub resyncs_done: AtomicU64,
    /// Batches journaled on a connection's executor thread while the next
    /// one was read (see `conn::PIPELINE_MIN_BYTES`).
    pub pipelined_batches: AtomicU64,
    /// Syncs of the journal directory that made new segment names durable.
    pub name_syncs: AtomicU64,
    /// Image writebacks started after a seal by age ([`image_writeback`]).
    pub image_writebacks: AtomicU64,
    /// Checkpoints made: sync rounds that made the image durable too
    /// ([`checkpoint`]).
    pub checkpoints: AtomicU64,
    /// Sealed segments whose pages were dropped from the page cache
    /// ([`Vm::uncache_sealed`]); not those trimmed before their turn.
    pub segments_uncached: AtomicU64,
    /// WRITEs answered once journaled, before their image writes
    /// ([`JournalState::inplace`]).
    pub early_acks: AtomicU64,
    /// Journal writebacks started by the writer while FLUSHes come
    /// ([`journal_writeback`]).
    pub journal_writebacks: AtomicU64,
}

/// While a FLUSH (or FUA) came within this much of an append, the writer
/// starts the journal's writeback for every [`WRITEBACK_WINDOW`] appended
/// ([`journal_writeback`]).
const FLUSH_RECENT_NS: u64 = 1_000_000_000;

/// How much journal is appended between two writebacks started by the
/// writer.
const WRITEBACK_WINDOW: u64 = 1 << 20;

/// The most sealed segments a disk leaves in the page cache, whatever their
/// size: a disk written slowly seals a small segment every `segment_age`,
/// and the list of those left cached stays short (16 s of them at 250 ms).
const MAX_CACHED_SEGMENTS: usize = 64;

/// Journal state of one disk, behind the disk lock.
pub struct JournalState {
    /// The segment being appended to; created on the first record after a seal.
    pub open: Option<OpenSegment>,
    /// Record base of the next segment to be created.
    pub next_base: u64,
    /// Segments switched out and waiting for the sealer.
    pub to_seal: Vec<OpenSegment>,
    /// Files of segments not yet made durable by the sealer; a FLUSH syncs them.
    pub unsynced: Vec<Arc<File>>,
    /// Segments created (renamed into place) in the journal directory, and
    /// how many of those names the last directory sync made durable
    /// ([`OpenSegment::create_unsynced`]). The sealer syncs a new name while
    /// its segment is open, so the seal finds it durable; a FLUSH or a seal
    /// that finds it not yet synced syncs it first ([`sync_names`]).
    pub names_created: u64,
    pub names_synced: u64,
    /// `names_created` when the newest segment in `to_seal` was switched
    /// out: the names its seal needs durable.
    pub seal_names: u64,
    /// A file the sealer prepared for the next segment (off the data path).
    pub spare: Option<SpareSegment>,
    pub last_seq: u64,
    /// Degraded mode: the dirty map, the room left (docs/RELIABILITY.md,
    /// "A full journal").
    pub deg: degraded::DegradedState,
    /// The extents that may hold writes not yet durable (docs/RELIABILITY.md,
    /// "A power loss").
    pub al: activity::ActivityLog,
    /// When the image was last made durable ([`checkpoint`]).
    pub ck: checkpoint::State,
    /// Where the image takes writes in place: a WRITE there is answered
    /// once journaled, before its image write (docs/DESIGN.md, "Write
    /// path", step 5).
    pub inplace: inplace::InPlace,
}

/// Who waits for a group commit: told once what it covers is durable
/// (`Ok`) or could not be made so (the NBD error), for the requests it
/// named. A connection's reply writer is one; the sync thread formats
/// nothing.
pub trait SyncWaiter: Send + Sync {
    fn synced(&self, cookies: &[u64], result: Result<(), u32>);
}

/// Requests waiting for the sync thread, by NBD handle.
pub struct SyncJob {
    pub waiter: Arc<dyn SyncWaiter>,
    pub cookies: Vec<u64>,
    /// A checkpoint: the image too ([`checkpoint`]); a FLUSH or FUA needs
    /// the journal only.
    pub full: bool,
}

/// Why `cdpctl mark` failed.
#[derive(Debug, Error)]
pub enum MarkError {
    #[error(transparent)]
    Label(#[from] NameError),
    #[error("a mark named {0:?} exists already: choose another label")]
    Exists(String),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("writing the mark to the journal: {0}")]
    Journal(#[source] io::Error),
}

pub struct Disk {
    pub index: usize,
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    pub image: File,
    pub journal_dir: PathBuf,
    pub journal: Mutex<JournalState>,
    pub stats: DiskStats,
    /// The newest sealed segments, oldest first, with their sizes: those
    /// left in the page cache (`journal_cache`). The sealer's alone.
    cached: Mutex<std::collections::VecDeque<(PathBuf, u64)>>,
    sync_tx: Mutex<Option<Sender<SyncJob>>>,
    /// The last checkpoint made durable: every record up to this seq is
    /// durable in the image ([`checkpoint`]); and the one the catalog has.
    pub synced_seq: AtomicU64,
    published_seq: AtomicU64,
    /// Writes a large batch to the image while the journal append runs,
    /// and syncs the image while a FLUSH syncs the journal.
    applier: applier::Applier,
    /// An image write failed after its WRITE had been answered: every
    /// request fails with EIO until cdpd restarts (docs/RELIABILITY.md,
    /// "A failed image write").
    pub image_failed: AtomicBool,
    /// When the last FLUSH or FUA round began ([`Disk::mono_ns`]; 0: none
    /// yet).
    flushed: AtomicU64,
    /// The disk's own monotonic clock starts here ([`Disk::mono_ns`]).
    epoch: std::time::Instant,
}

/// Sequence numbers and timestamps, one sequence per VM.
struct Clock {
    last_seq: u64,
    last_ts: u64,
    /// When `last_ts` was given (the monotonic clock never jumps).
    last_mono: std::time::Instant,
}

/// The next record timestamp: the wall clock, never below the last one.
/// After the wall clock stepped back (a forward jump corrected, NTP), the
/// timestamps do not freeze at the last one until the wall clock catches
/// up: they go on at half the monotonic rate, so the wall clock catches up
/// with them (at half a second per second) and records stay distinct and
/// ordered in time (issue 12).
fn next_ts(last_ts: u64, mono_elapsed_ns: u64, wall_ns: u64) -> u64 {
    if wall_ns >= last_ts {
        wall_ns
    } else {
        last_ts + mono_elapsed_ns / 2
    }
}

/// The most one resync record holds (and the resync buffer's size).
const RESYNC_PIECE: u64 = 1 << 20;

pub struct Vm {
    pub uuid: uuid::Uuid,
    pub uuid_str: String,
    pub name: String,
    pub disks: Vec<Arc<Disk>>,
    pub settings: JournalSettings,
    pub catalog: Mutex<Catalog>,
    /// Sealed segments whose catalog insert failed (the catalog locked past
    /// its busy timeout, its disk full), by disk name: tried again at each
    /// seal pass, and recorded from the journal at the next start if cdpd
    /// stops first (`cdp_core::session::reconcile_sealed`).
    unrecorded: Mutex<Vec<(String, SealedSegment)>>,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub pid: u32,
    pub session_id: Mutex<i64>,
    clock: Mutex<Clock>,
    pub stopping: AtomicBool,
    sealer_wake: (Mutex<bool>, Condvar),
    /// Memory sized by clients (READ replies, large WRITEs) held by all
    /// connections at once.
    pub budget: crate::limits::Budget,
}

impl Disk {
    pub fn sync_sender(&self) -> Option<Sender<SyncJob>> {
        self.sync_tx.lock().unwrap().clone()
    }

    pub fn lock_journal(&self) -> MutexGuard<'_, JournalState> {
        self.journal.lock().unwrap()
    }

    /// Nanoseconds since the disk was set up, at least 1 (a monotonic
    /// clock: a step of the wall clock changes nothing).
    fn mono_ns(&self) -> u64 {
        (self.epoch.elapsed().as_nanos() as u64).max(1)
    }
}

impl Vm {
    /// Reserve `n` sequence numbers and one timestamp for them. The clock
    /// never goes backwards.
    fn reserve(&self, n: u64) -> (u64, u64) {
        let mut c = self.clock.lock().unwrap();
        let mono = std::time::Instant::now();
        let elapsed = mono.saturating_duration_since(c.last_mono).as_nanos() as u64;
        let ts = next_ts(c.last_ts, elapsed, now_ns());
        c.last_ts = ts;
        c.last_mono = mono;
        let first = c.last_seq + 1;
        c.last_seq += n;
        (first, ts)
    }

    pub fn last_seq(&self) -> u64 {
        self.clock.lock().unwrap().last_seq
    }

    /// The segment `n` records starting at `first_seq` go to: the open one,
    /// or, if there is none or its index would pass the record limit
    /// ([`cdp_core::journal::format::MAX_SEGMENT_RECORDS`]), a new one.
    fn ensure_open<'s>(
        &self,
        disk: &Disk,
        st: &'s mut JournalState,
        first_seq: u64,
        ts: u64,
        n: usize,
    ) -> io::Result<&'s mut OpenSegment> {
        if st.open.as_ref().is_some_and(|s| s.is_full_for(n)) {
            self.switch(st);
        }
        if st.open.is_none() {
            // The directory's sync waits for a FLUSH or the seal; the file
            // is the spare the sealer prepared, if there is one.
            let header = SegmentHeader {
                vm_uuid: *self.uuid.as_bytes(),
                first_seq,
                record_base: st.next_base,
                created_ns: ts,
            };
            let seg = match st.spare.take() {
                Some(spare) => OpenSegment::create_from_spare(spare, header)
                    .or_else(|_| OpenSegment::create_unsynced(&disk.journal_dir, header)),
                None => OpenSegment::create_unsynced(&disk.journal_dir, header),
            };
            st.open = Some(seg?);
            st.names_created += 1;
            // The sealer syncs the new name while the segment is open (so
            // its seal waits for one sync less), and seals a segment that
            // filled up once its successor exists: the new header's sync
            // does not queue behind the seal's writeback of the full one.
            self.wake_sealer();
        }
        Ok(st.open.as_mut().unwrap())
    }

    /// Switch out the open segment; the sealer seals it.
    fn switch(&self, st: &mut JournalState) {
        if switch_out(st) {
            self.wake_sealer();
        }
    }

    /// Journal the changes and FLUSHes of a batch on one disk and apply the
    /// changes to its image, in sequence order, under the disk lock. Each
    /// journaled request's result slot gets 0 or its NBD error. Payloads are
    /// in `buf`.
    #[cfg(test)]
    pub(crate) fn journal_and_apply(&self, disk: &Disk, batch: &mut Batch, buf: &[u8]) {
        self.journal_and_apply_then(disk, batch, buf, &mut |_| false);
    }

    /// [`Vm::journal_and_apply`], and `ack` once the batch is journaled,
    /// before its image writes, under the disk lock, when some of its plain
    /// WRITEs land where the image takes writes in place
    /// ([`JournalState::inplace`]; marked [`batch::Req::early`]): it answers
    /// those at once if the socket takes the replies without waiting, and
    /// says whether it did (if not, they are answered with the others). An
    /// image write that fails after its WRITE was answered fails the disk
    /// ([`Disk::image_failed`]).
    pub(crate) fn journal_and_apply_then(
        &self,
        disk: &Disk,
        batch: &mut Batch,
        buf: &[u8],
        ack: &mut dyn FnMut(&Batch) -> bool,
    ) {
        let n = batch.journaled() as u64;
        if n == 0 {
            return;
        }
        let mut guard = disk.lock_journal();
        let st = &mut *guard;
        for r in &batch.reqs {
            if matches!(r.op, Op::Journal(Kind::Zero | Kind::Trim)) {
                // It may leave holes that a later write would fill.
                st.inplace.punched(r.offset, r.length);
            }
        }
        // Before any of the batch's changes can reach the image.
        st.al.cover(&disk.name, batch);
        if st.deg.mode == degraded::Mode::Degraded {
            self.apply_degraded(disk, st, batch, buf);
            return;
        }
        let (seq0, ts) = self.reserve(n);
        // Before the helper may see the batch.
        let candidates = batch.mark_early(|r| st.inplace.covers(r.offset, r.length));
        // A large batch goes to the image on the helper while it is
        // appended here (see [`applier`]); waited for before anything else.
        let overlapped = if batch.write_bytes() >= applier::OVERLAP_MIN_BYTES {
            disk.applier.start_apply(disk, batch, buf)
        } else {
            None
        };
        let appended = self
            .ensure_open(disk, st, seq0, ts, n as usize)
            .and_then(|seg| {
                let at = seg.pos;
                seg.append(seq0, ts, batch.records(buf))
                    .map(|()| seg.pos - at)
            });
        let acked = candidates && appended.is_ok() && ack(batch);
        let failed = overlapped.map(applier::Pending::wait_apply);
        if candidates && !acked {
            // Answered with the others, after the image writes.
            batch.clear_early();
        }
        let applied = failed.map(|errors| set_results(batch, &errors));
        match appended {
            Ok(bytes) => {
                st.deg.appended += bytes;
                let limit = self.checkpoint_bytes();
                if st.ck.bytes < limit && st.ck.bytes + bytes >= limit {
                    // A checkpoint is due: the sealer asks for it.
                    self.wake_sealer();
                }
                st.ck.bytes += bytes;
            }
            Err(e) => {
                // Nothing was journaled: the guest's write is not failed
                // for it, the disk runs degraded.
                self.enter_degraded(disk, st, &format!("appending to the journal failed: {e}"));
                self.apply_degraded(disk, st, batch, buf);
                return;
            }
        }
        st.last_seq = seq0 + n - 1;
        let writeback = st
            .open
            .as_mut()
            .and_then(|seg| journal_writeback(disk, seg));
        if !applied.unwrap_or_else(|| apply(disk, batch, buf)) {
            disk.stats.errors.fetch_add(1, Ordering::Relaxed);
            if acked {
                fail_answered(disk, batch);
            }
            self.resync_failed(disk, st, batch);
        }
        for r in &batch.reqs {
            // (Those answered early were in place already.)
            if r.op == Op::Journal(Kind::Write) && r.result == 0 && !r.early {
                st.inplace.written(r.offset, r.length);
            }
        }
        if st
            .open
            .as_ref()
            .is_some_and(|s| s.pos >= self.settings.segment_size)
        {
            // The sealer is woken when the next segment is created (see
            // `ensure_open`), or finds it at its next pass.
            switch_out(st);
        }
        if st.deg.appended >= st.deg.room {
            self.enter_degraded(
                disk,
                st,
                "the journal reached journal_max or journal_min_free",
            );
        }
        drop(guard);
        if let Some((file, from, len)) = writeback {
            cdp_core::journal::writer::start_writeback(&file, from, len);
            disk.stats
                .journal_writebacks
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An image write failed after its record was journaled: the image may
    /// hold anything in that range now. Journal what the image really holds,
    /// so that the invariant stays true; if even that fails, journal a GAP.
    /// The range (up to 4 GiB for a ZERO or TRIM) is read and journaled in
    /// pieces of at most [`RESYNC_PIECE`] through one buffer, and a piece
    /// that reads as zeros is journaled as a ZERO record (no payload).
    fn resync_failed(&self, disk: &Disk, st: &mut JournalState, batch: &Batch) {
        let mut buf = Vec::new();
        for r in &batch.reqs {
            let Op::Journal(kind) = r.op else { continue };
            if r.result == 0 || !kind.changes_data() {
                continue;
            }
            let end = r.offset + r.length;
            let mut off = r.offset;
            while off < end {
                let n = (end - off).min(RESYNC_PIECE);
                buf.resize(n as usize, 0);
                let gap;
                let read = disk.image.read_exact_at(&mut buf, off);
                let rec = match read {
                    Ok(()) if buf.iter().all(|&b| b == 0) => Record {
                        kind: Kind::Zero,
                        flags: 0,
                        offset: off,
                        length: n,
                        payload: &[],
                    },
                    Ok(()) => Record {
                        kind: Kind::Write,
                        flags: 0,
                        offset: off,
                        length: n,
                        payload: &buf,
                    },
                    Err(ref e) => {
                        let reason = format!(
                            "image write and re-read failed at offset {off} ({} bytes): {e}; a new baseline is needed",
                            end - off
                        );
                        gap = serde_json::to_vec(&serde_json::json!({ "reason": reason })).unwrap();
                        Record {
                            kind: Kind::Gap,
                            flags: 0,
                            offset: off,
                            length: end - off,
                            payload: &gap,
                        }
                    }
                };
                let (seq, ts) = self.reserve(1);
                let _ = self.append_at(disk, st, seq, ts, rec);
                if read.is_err() {
                    break;
                }
                off += n;
            }
        }
    }

    /// Append one record at `seq` under a held disk lock.
    fn append_at(
        &self,
        disk: &Disk,
        st: &mut JournalState,
        seq: u64,
        ts: u64,
        rec: Record<'_>,
    ) -> io::Result<()> {
        self.ensure_open(disk, st, seq, ts, 1)?
            .append(seq, ts, [rec])?;
        st.last_seq = seq;
        Ok(())
    }

    /// Write the same metadata record into every disk's journal at one
    /// sequence number: one consistent cut across the VM (MARK,
    /// SESSION_START, SESSION_END, GAP). Returns (seq, ts).
    pub fn append_to_all(&self, kind: Kind, info: &serde_json::Value) -> io::Result<(u64, u64)> {
        let payload = serde_json::to_vec(info).map_err(io::Error::other)?;
        let mut guards: Vec<_> = self.disks.iter().map(|d| d.lock_journal()).collect();
        let (seq, ts) = self.reserve(1);
        for (d, g) in self.disks.iter().zip(guards.iter_mut()) {
            let rec = Record {
                kind,
                flags: 0,
                offset: 0,
                length: 0,
                payload: &payload,
            };
            self.append_at(d, g, seq, ts, rec)?;
        }
        Ok((seq, ts))
    }

    /// `cdpctl mark`: a MARK in every disk at one sequence number.
    /// `quiesced`: the caller froze the guest's filesystems for it; the
    /// payload says so (`"quiesced": true`, absent otherwise:
    /// docs/JOURNAL_FORMAT.md, "Record kinds"), and so does the catalog.
    pub fn mark(&self, label: &str, quiesced: bool) -> Result<(u64, u64), MarkError> {
        cdp_core::names::check_label(label)?;
        if self
            .catalog
            .lock()
            .unwrap()
            .mark_exists(&self.uuid_str, label)?
        {
            return Err(MarkError::Exists(label.to_string()));
        }
        let (seq, ts) = self
            .append_to_all(
                Kind::Mark,
                &cdp_core::journal::mark_payload(label, quiesced),
            )
            .map_err(MarkError::Journal)?;
        self.catalog
            .lock()
            .unwrap()
            .add_mark_as(&self.uuid_str, label, seq, ts, quiesced)?;
        Ok((seq, ts))
    }

    pub fn wake_sealer(&self) {
        let (m, cv) = &self.sealer_wake;
        *m.lock().unwrap() = true;
        cv.notify_one();
    }

    /// Seal what was switched out, and switch out segments older than the
    /// age limit. Runs on the sealer thread, off the data path.
    pub fn seal_pass(&self, force_all: bool) -> Duration {
        let age = self.settings.segment_age;
        let mut next = age;
        if !self.record_unrecorded() {
            next = next.min(Duration::from_secs(1));
        }
        for disk in &self.disks {
            let mut by_age = false;
            let (to_seal, want_spare, need_names) = {
                let mut st = disk.lock_journal();
                if let Some(seg) = &st.open {
                    let elapsed = seg.opened.elapsed();
                    if force_all || (seg.records() > 0 && elapsed >= age) {
                        by_age = !force_all;
                        self.switch(&mut st);
                    } else if seg.records() > 0 {
                        next = next.min(age - elapsed);
                    }
                }
                if force_all {
                    if let Some(spare) = st.spare.take() {
                        spare.discard();
                    }
                }
                // A segment filled up and its successor is open: the disk
                // is busy, prepare the file of the one after.
                let want_spare = !force_all
                    && st.spare.is_none()
                    && st.open.is_some()
                    && !st.to_seal.is_empty()
                    && st.deg.mode == degraded::Mode::Normal;
                (std::mem::take(&mut st.to_seal), want_spare, st.seal_names)
            };
            if want_spare {
                self.prepare_spare(disk);
            }
            if !to_seal.is_empty() {
                if let Err(e) = sync_names(disk, need_names) {
                    // Sealed only once named durably: try again soon.
                    if disk.stats.seal_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!(
                            "cdpd: syncing {}: {e} (will retry)",
                            disk.journal_dir.display()
                        );
                    }
                    next = next.min(Duration::from_millis(100));
                    let mut st = disk.lock_journal();
                    let mut failed = to_seal;
                    failed.append(&mut st.to_seal);
                    st.to_seal = failed;
                    continue;
                }
            }
            let mut failed = Vec::new();
            for seg in to_seal {
                match seg.seal(now_ns()) {
                    Ok(sealed) => {
                        self.record_sealed(disk, &sealed);
                        self.uncache_sealed(disk, &sealed);
                        disk.lock_journal()
                            .unsynced
                            .retain(|f| !Arc::ptr_eq(f, &seg.file));
                    }
                    Err(e) => {
                        // Cut the partial seal off and try again soon (a
                        // full disk may get room). Flushes keep syncing it.
                        let _ = seg.file.set_len(seg.pos);
                        if disk.stats.seal_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("cdpd: sealing {}: {e} (will retry)", seg.path.display());
                        }
                        failed.push(seg);
                    }
                }
            }
            if !failed.is_empty() {
                next = next.min(Duration::from_millis(100));
                let mut st = disk.lock_journal();
                failed.append(&mut st.to_seal);
                st.to_seal = failed;
            } else if by_age {
                image_writeback(disk);
            }
            // The open segment's name, made durable while it is open rather
            // than at its seal: the seal then waits for one sync less (each
            // may wait for the filesystem's journal commit). Best effort:
            // its seal or a FLUSH syncs it if this fails.
            if disk.lock_journal().names_unsynced() {
                let _ = sync_names(disk, u64::MAX);
            }
            if !force_all {
                next = next.min(self.checkpoint_pass(disk));
            }
        }
        next
    }

    /// Leave at most `journal_cache` bytes of a disk's newest sealed
    /// segments in the page cache, `sealed` included, and at most
    /// [`MAX_CACHED_SEGMENTS`] of them: drop the pages of older ones
    /// (docs/DESIGN.md, "Write path", step 6). A shipper that keeps up
    /// reads and trims a segment long before; one that lags, or a disk
    /// without one, would otherwise fill the host's memory with journal and
    /// make every new record take a page never used before.
    fn uncache_sealed(&self, disk: &Disk, sealed: &SealedSegment) {
        let mut cached = disk.cached.lock().unwrap_or_else(|p| p.into_inner());
        cached.push_back((sealed.path.clone(), sealed.size_bytes));
        let mut total: u64 = cached.iter().map(|(_, n)| n).sum();
        while total > self.settings.journal_cache || cached.len() > MAX_CACHED_SEGMENTS {
            let Some((path, n)) = cached.pop_front() else {
                break;
            };
            total -= n;
            if cdp_core::journal::writer::drop_cached(&path) {
                disk.stats.segments_uncached.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Prepare the file of a disk's next segment off the data path (best
    /// effort: without one, the data path creates it).
    fn prepare_spare(&self, disk: &Disk) {
        // Room for a whole segment and the batch that passes its size.
        let room = self.settings.segment_size + (4 << 20);
        if let Ok(spare) = SpareSegment::prepare(&disk.journal_dir, room) {
            // Only this thread prepares, and only when there was none.
            let mut st = disk.lock_journal();
            debug_assert!(st.spare.is_none());
            st.spare = Some(spare);
        }
    }

    fn record_sealed(&self, disk: &Disk, s: &SealedSegment) {
        if let Err(e) = self.try_record(&disk.name, s) {
            let mut pending = self.unrecorded.lock().unwrap();
            if pending.is_empty() {
                eprintln!(
                    "cdpd: recording sealed segment {} in the catalog: {e} (will retry)",
                    s.path.display()
                );
            }
            pending.push((disk.name.clone(), s.clone()));
        }
    }

    fn try_record(&self, disk: &str, s: &SealedSegment) -> Result<(), CatalogError> {
        let cat = self.catalog.lock().unwrap();
        cat.put_segment(&self.uuid_str, disk, s, true)
            .and_then(|_| cat.set_last_seq(&self.uuid_str, s.last_seq, s.last_ts_ns))
    }

    /// Try the sealed segments whose insert failed again, in order; true
    /// when none is left.
    fn record_unrecorded(&self) -> bool {
        let pending = std::mem::take(&mut *self.unrecorded.lock().unwrap());
        if pending.is_empty() {
            return true;
        }
        let mut left = Vec::new();
        for (disk, s) in pending {
            if !left.is_empty() || self.try_record(&disk, &s).is_err() {
                left.push((disk, s));
            }
        }
        let done = left.is_empty();
        if done {
            eprintln!("cdpd: every sealed segment is recorded in the catalog again");
        }
        let mut p = self.unrecorded.lock().unwrap();
        left.append(&mut p);
        *p = left;
        done
    }

    /// The sealer thread: wakes when a segment is switched out, or when the
    /// oldest open segment reaches the age limit.
    pub fn sealer_loop(&self) {
        // The resync's buffer, one piece long once used.
        let mut resync_buf = Vec::new();
        // The first pass at once: a dirty map found at start resumes.
        let mut wait = Duration::from_millis(1);
        loop {
            {
                let (m, cv) = &self.sealer_wake;
                let g = m.lock().unwrap();
                let (mut g, _) = cv.wait_timeout_while(g, wait, |woken| !*woken).unwrap();
                *g = false;
            }
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            wait = self
                .seal_pass(false)
                .min(self.degraded_pass(&mut resync_buf))
                .max(Duration::from_millis(1));
        }
    }

    /// The sync thread of a disk: group commit for FLUSH and FUA. Every job
    /// waiting when a round starts gets that round's result.
    pub fn sync_loop(disk: &Disk, rx: Receiver<SyncJob>) {
        let mut jobs: Vec<SyncJob> = Vec::new();
        while let Ok(job) = rx.recv() {
            jobs.push(job);
            while let Ok(j) = rx.try_recv() {
                jobs.push(j);
            }
            // A FLUSH or FUA (a checkpoint alone names no request).
            let flush = jobs.iter().any(|j| !j.cookies.is_empty());
            if flush {
                disk.flushed.store(disk.mono_ns(), Ordering::Relaxed);
            }
            let result = make_durable(disk, jobs.iter().any(|j| j.full));
            if flush {
                disk.stats.flushes.fetch_add(1, Ordering::Relaxed);
            }
            for job in jobs.drain(..) {
                disk.stats
                    .in_flight
                    .fetch_sub(job.cookies.len() as u64, Ordering::Relaxed);
                job.waiter.synced(&job.cookies, result);
            }
        }
    }

    /// Socket path of a disk.
    pub fn socket_path(&self, disk: &str) -> PathBuf {
        RunDir::new(&self.run_dir)
            .vm(&self.uuid_str)
            .disk_socket(disk)
    }
}

/// A disk as `Vm::new` needs it, after recovery.
pub struct DiskSetup {
    pub name: String,
    pub path: PathBuf,
    pub image: image::Image,
    pub journal_dir: PathBuf,
    pub next_base: u64,
    pub last_seq: u64,
}

/// Everything `Vm::new` needs, after recovery.
pub struct VmSetup {
    pub uuid: uuid::Uuid,
    pub name: String,
    pub disks: Vec<DiskSetup>,
    pub settings: JournalSettings,
    pub catalog: Catalog,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    /// Where the VM's sequence and clock resume.
    pub last_seq: u64,
    pub last_ts: u64,
}

impl Vm {
    /// The VM and, per disk, the receiving end of its sync thread's queue.
    pub fn new(setup: VmSetup) -> (Arc<Vm>, Vec<Receiver<SyncJob>>) {
        let mut rxs = Vec::new();
        let disks = setup
            .disks
            .into_iter()
            .enumerate()
            .map(|(index, d)| {
                let (tx, rx) = std::sync::mpsc::channel();
                rxs.push(rx);
                let vm_dir = cdp_core::layout::StateDir::new(&setup.state_dir)
                    .vm(&setup.uuid.hyphenated().to_string());
                let deg = degraded::DegradedState::open(
                    &vm_dir.dirty_map(&d.name),
                    &d.name,
                    d.image.size,
                );
                let al = activity::ActivityLog::open(
                    &vm_dir.activity_log(&d.name),
                    &d.name,
                    d.image.size,
                );
                Arc::new(Disk {
                    index,
                    name: d.name,
                    path: d.path,
                    size: d.image.size,
                    journal_dir: d.journal_dir,
                    journal: Mutex::new(JournalState {
                        open: None,
                        next_base: d.next_base,
                        to_seal: Vec::new(),
                        unsynced: Vec::new(),
                        names_created: 0,
                        names_synced: 0,
                        seal_names: 0,
                        spare: None,
                        last_seq: d.last_seq,
                        deg,
                        al,
                        ck: checkpoint::State::default(),
                        inplace: inplace::InPlace::open(&d.image),
                    }),
                    stats: DiskStats::default(),
                    cached: Mutex::default(),
                    sync_tx: Mutex::new(Some(tx)),
                    synced_seq: AtomicU64::new(0),
                    published_seq: AtomicU64::new(0),
                    applier: applier::Applier::default(),
                    image_failed: AtomicBool::new(false),
                    flushed: AtomicU64::new(0),
                    epoch: std::time::Instant::now(),
                    image: d.image.file,
                })
            })
            .collect();
        let vm = Arc::new(Vm {
            uuid_str: setup.uuid.hyphenated().to_string(),
            uuid: setup.uuid,
            name: setup.name,
            disks,
            settings: setup.settings,
            catalog: Mutex::new(setup.catalog),
            unrecorded: Mutex::new(Vec::new()),
            state_dir: setup.state_dir,
            run_dir: setup.run_dir,
            pid: std::process::id(),
            session_id: Mutex::new(0),
            clock: Mutex::new(Clock {
                last_seq: setup.last_seq,
                last_ts: setup.last_ts,
                last_mono: std::time::Instant::now(),
            }),
            stopping: AtomicBool::new(false),
            sealer_wake: (Mutex::new(false), Condvar::new()),
            budget: crate::limits::Budget::new(crate::limits::BUDGET),
        });
        (vm, rxs)
    }

    /// Drop the sync senders so the sync threads end once every connection
    /// is gone.
    pub fn close_sync(&self) {
        for d in &self.disks {
            d.sync_tx.lock().unwrap().take();
        }
    }

    /// Make every open segment durable (used at start, after SESSION_START).
    pub fn sync_open_segments(&self) -> io::Result<()> {
        for d in &self.disks {
            sync_names(d, u64::MAX)?;
            let st = d.lock_journal();
            if let Some(s) = &st.open {
                s.file.sync_data()?;
            }
        }
        Ok(())
    }
}

/// A segment sealed by age (the disk writes less than a segment per age)
/// on a sparse image: start the image's writeback of what was written since
/// (docs/DESIGN.md, "Write path"). The page cache would otherwise hold it
/// until the kernel's flusher writes it all at once, and that writeback
/// allocates blocks, which every sync on the file system then waits for
/// (ext4's ordered mode): the next seal's, a FLUSH's, the shipper's. A disk
/// that fills its segments is left to the page cache (a burst stays
/// absorbed), and so is an image with every block allocated.
fn image_writeback(disk: &Disk) {
    use std::os::unix::fs::MetadataExt;
    // A block device (size 0 here) or an image with every block allocated
    // has nothing to allocate: its writeback is left to the kernel.
    let sparse = disk
        .image
        .metadata()
        .is_ok_and(|m| m.blocks().saturating_mul(512) < m.len());
    if sparse {
        cdp_core::journal::writer::start_writeback(&disk.image, 0, 0);
        disk.stats.image_writebacks.fetch_add(1, Ordering::Relaxed);
    }
}

impl JournalState {
    /// A segment name is not durable yet.
    pub fn names_unsynced(&self) -> bool {
        self.names_synced < self.names_created
    }
}

/// Make the first `need` segment names of a disk's journal directory
/// durable, if they are not yet (every name created so far with `need` =
/// `u64::MAX`).
fn sync_names(disk: &Disk, need: u64) -> io::Result<()> {
    let created = {
        let st = disk.lock_journal();
        if st.names_synced >= need.min(st.names_created) {
            return Ok(());
        }
        st.names_created
    };
    cdp_core::journal::writer::sync_dir(&disk.journal_dir)?;
    disk.stats.name_syncs.fetch_add(1, Ordering::Relaxed);
    let mut st = disk.lock_journal();
    st.names_synced = st.names_synced.max(created);
    Ok(())
}

/// Switch out the open segment for the sealer (which the caller wakes, or
/// which finds it at its next pass). True when there was one.
fn switch_out(st: &mut JournalState) -> bool {
    let Some(seg) = st.open.take() else {
        return false;
    };
    st.seal_names = st.names_created;
    st.next_base += seg.records() as u64;
    st.unsynced.push(seg.file.clone());
    st.to_seal.push(seg);
    true
}

/// Apply the journaled changes of a batch to the image, in order. A failed
/// write sets its request's result. Returns false when one failed.
fn apply(disk: &Disk, batch: &mut Batch, buf: &[u8]) -> bool {
    let mut errors = Vec::new();
    apply_reqs(disk, &batch.reqs, buf, &mut errors);
    set_results(batch, &errors)
}

/// The range of the open segment whose writeback the writer starts, if
/// any (docs/DESIGN.md, "Write path", step 6): [`WRITEBACK_WINDOW`] more
/// appended since the last, while a FLUSH or FUA round began within
/// [`FLUSH_RECENT_NS`]. A guest that flushes often then finds little left
/// to write at its next FLUSH, whose `fdatasync` would otherwise start the
/// writeback of everything appended since the last; a guest that does not
/// flush leaves the journal's writeback to the seal and the kernel, and a
/// burst is taken into the page cache. Started once the disk lock is
/// released: `sync_file_range` waits while the device's queue is full.
fn journal_writeback(disk: &Disk, seg: &mut OpenSegment) -> Option<(Arc<File>, u64, u64)> {
    if seg.pos - seg.writeback_from < WRITEBACK_WINDOW {
        return None;
    }
    let from = std::mem::replace(&mut seg.writeback_from, seg.pos);
    let last = disk.flushed.load(Ordering::Relaxed);
    let flushing = last != 0 && disk.mono_ns().saturating_sub(last) <= FLUSH_RECENT_NS;
    flushing.then(|| (seg.file.clone(), from, seg.pos - from))
}

/// An image write failed after its WRITE was answered (the image was
/// thought to take writes in place): the guest was told it succeeded, so
/// no later request may see the image without it. The disk fails every
/// request with EIO from now on, as a disk that died would; the journal
/// holds the write, then what the image holds ([`Vm::resync_failed`]).
fn fail_answered(disk: &Disk, batch: &Batch) {
    let Some(r) = batch.reqs.iter().find(|r| r.early && r.result != 0) else {
        return;
    };
    disk.image_failed.store(true, Ordering::Release);
    eprintln!(
        "cdpd: disk {}: the image write at offset {} ({} bytes) failed with NBD error {} after the guest was told it succeeded: every request on this disk fails with EIO until cdpd restarts; the journal holds the write; check the image's file system",
        disk.name, r.offset, r.length, r.result
    );
}

/// Give the requests that failed their NBD error; true when none did.
fn set_results(batch: &mut Batch, errors: &[(usize, u32)]) -> bool {
    for &(i, e) in errors {
        batch.reqs[i].result = e;
    }
    errors.is_empty()
}

/// Write the journaled changes of `reqs` to the image, in order; the
/// failed ones go to `errors` as (index, NBD error).
fn apply_reqs(disk: &Disk, reqs: &[Req], buf: &[u8], errors: &mut Vec<(usize, u32)>) {
    for (i, r) in reqs.iter().enumerate() {
        let written = match r.op {
            Op::Journal(Kind::Write) => disk.image.write_all_at(r.payload(buf), r.offset),
            Op::Journal(kind @ (Kind::Zero | Kind::Trim)) => cdp_core::journal::zero_range(
                &disk.image,
                r.offset,
                r.length,
                cdp_core::journal::may_punch(kind, r.flags),
            ),
            _ => continue,
        };
        if let Err(e) = written {
            errors.push((i, nbd_errno(&e)));
        }
    }
}

/// Make the journal of a disk durable: the journal directory's names and
/// every segment file not yet synced by the sealer; and, for a checkpoint
/// (`full`, or whenever the disk is degraded or resyncing or keeps no
/// activity log), at the same time on the disk's helper thread when it is
/// free, the image ([`checkpoint`]). The NBD error of the first failure.
///
/// While degraded or resyncing, the dirty map is synced first. A journal
/// file that fails to sync poisons the journal ([`degraded::poison`]), and
/// so does the image ([`degraded::poison_image`]): the FLUSH or FUA that
/// saw it gets the error. A checkpoint that succeeds lets the activity log
/// forget the extents written before it began, and records its seq.
fn make_durable(disk: &Disk, full: bool) -> Result<(), u32> {
    let (map, files, full, flush_needs_image, seq) = {
        let mut st = disk.lock_journal();
        // Writes not journaled (degraded), or no log whose checkpoint
        // recovery would redo from: a FLUSH needs the image durable.
        let flush_needs_image = st.deg.mode != degraded::Mode::Normal || !st.al.is_kept();
        let full = full || flush_needs_image;
        if full {
            st.al.begin_round();
            st.ck.begin();
        }
        let map = match st.deg.mode {
            degraded::Mode::Normal => None,
            _ => st.deg.map.as_ref().map(|m| m.file.clone()),
        };
        let files: Vec<Arc<File>> = st
            .open
            .iter()
            .map(|s| s.file.clone())
            .chain(st.unsynced.iter().cloned())
            .collect();
        (map, files, full, flush_needs_image, st.last_seq)
    };
    // The image syncs on the helper while the journal syncs here.
    let image_sync = full.then(|| disk.applier.start_sync(disk));
    let mut result = Ok(());
    for f in map.iter() {
        if let Err(e) = f.sync_data() {
            result = Err(nbd_errno(&e));
        }
    }
    if let Err(e) = sync_names(disk, u64::MAX) {
        result = result.and(Err(nbd_errno(&e)));
    }
    for f in files.iter() {
        if let Err(e) = f.sync_data() {
            result = result.and(Err(nbd_errno(&e)));
            degraded::poison(disk, &e);
        }
    }
    let image = match image_sync {
        None => Ok(()),
        Some(Some(p)) => p.wait_sync(),
        Some(None) => disk.image.sync_data(),
    };
    let image_ok = image.is_ok();
    if let Err(e) = image {
        // What a FLUSH covered is durable in the journal: a checkpoint's
        // failure is the disk's (poisoned, resynced), not the FLUSH's.
        if flush_needs_image {
            result = result.and(Err(nbd_errno(&e)));
        }
        degraded::poison_image(disk, &e);
    }
    if result.is_err() || !image_ok {
        disk.stats.errors.fetch_add(1, Ordering::Relaxed);
    } else if full {
        disk.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
        let log = {
            let mut st = disk.lock_journal();
            let rewritten = st.al.round_done(&disk.name);
            st.al.set_synced(&disk.name, seq).or(rewritten)
        };
        // The checkpoint counts once durable in the log (a superset of a
        // rewrite is on disk already). Without a log, the image is durable
        // all the same: the shipper may trim.
        match log.map(|f| f.sync_data()) {
            Some(Err(_)) => {}
            _ => {
                disk.synced_seq.fetch_max(seq, Ordering::AcqRel);
            }
        }
    }
    result
}

#[cfg(test)]
mod clock_tests {
    use super::next_ts;

    const S: u64 = 1_000_000_000;

    /// A forward jump taken back: timestamps neither go back nor freeze;
    /// they advance at half rate until the wall clock has caught up, then
    /// follow it again.
    #[test]
    fn timestamps_go_on_after_the_wall_clock_steps_back() {
        let start = 1_000 * S;
        // The wall clock jumped an hour ahead, and a record took it.
        let mut ts = next_ts(start, S, start + 3600 * S);
        assert_eq!(ts, start + 3600 * S);
        // It is stepped back. Each second of real time, a record.
        let mut wall = start + 2 * S;
        let mut caught_up = None;
        for i in 0..10_000u64 {
            let next = next_ts(ts, S, wall);
            assert!(next >= ts, "backwards at step {i}");
            if next == wall {
                caught_up = Some(i);
                break;
            }
            assert!(next > ts, "frozen at step {i}");
            ts = next;
            wall += S;
        }
        // The hour's lead shrinks by half a second per second.
        let i = caught_up.expect("the wall clock catches up");
        assert!((7190..=7210).contains(&i), "{i}");
        // Without a step, the wall clock it is.
        assert_eq!(next_ts(5 * S, S, 7 * S), 7 * S);
    }
}
