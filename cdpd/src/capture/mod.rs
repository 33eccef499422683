//! The capture daemon: one VM, its disks, their journals.
//!
//! Data path of a guest write (docs/DESIGN.md, "Write path"): the connection thread parses a
//! batch of requests, takes the disk's journal lock once for the batch,
//! reserves sequence numbers, appends every record with one `pwritev`
//! (write-ahead), applies the writes to the image in sequence order, and
//! replies. FLUSH and FUA replies are deferred to the disk's sync thread,
//! which makes journal and image durable for every waiting request at once
//! (group commit) and then replies: replies may come out of order.
//!
//! Invariant: the image always equals the initial image plus the journal
//! replayed in order. Holding the disk lock from seq reservation to the last
//! image write of a batch makes the image's write order the sequence order.

pub(crate) mod conn;
pub(crate) mod control;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use cdp_core::catalog::Catalog;
use cdp_core::config::JournalSettings;
use cdp_core::image;
use cdp_core::journal::format::{Kind, RecordHeader, RECORD_HEADER_LEN};
use cdp_core::journal::writer::{OpenSegment, SealedSegment};
use cdp_core::layout::RunDir;
use cdp_core::nbd::proto::{self, nbd_errno};
use cdp_core::time::now_ns;

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
    pub flushes: AtomicU64,
    pub seal_errors: AtomicU64,
}

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
    pub last_seq: u64,
}

/// A journaled operation of a batch.
#[derive(Debug, Clone, Copy)]
pub struct JOp<'a> {
    pub kind: Kind,
    pub flags: u8,
    pub offset: u64,
    pub length: u64,
    pub payload: &'a [u8],
}

/// Requests waiting for the sync thread: their replies are sent once journal
/// and image are durable.
pub struct SyncJob {
    pub replier: Arc<conn::Replier>,
    pub cookies: Vec<u64>,
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
    sync_tx: Mutex<Option<Sender<SyncJob>>>,
}

/// Sequence numbers and timestamps, one sequence per VM.
struct Clock {
    last_seq: u64,
    last_ts: u64,
}

pub struct Vm {
    pub uuid: uuid::Uuid,
    pub uuid_str: String,
    pub name: String,
    pub disks: Vec<Arc<Disk>>,
    pub settings: JournalSettings,
    pub catalog: Mutex<Catalog>,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub pid: u32,
    pub session_id: Mutex<i64>,
    clock: Mutex<Clock>,
    pub stopping: AtomicBool,
    sealer_wake: (Mutex<bool>, Condvar),
}

impl Disk {
    pub fn sync_sender(&self) -> Option<Sender<SyncJob>> {
        self.sync_tx.lock().unwrap().clone()
    }

    pub fn lock_journal(&self) -> MutexGuard<'_, JournalState> {
        self.journal.lock().unwrap()
    }
}

/// How appending a batch went: per op, 0 or an NBD error.
pub type OpResults = Vec<u32>;

impl Vm {
    /// Reserve `n` sequence numbers and one timestamp for them. The clock
    /// never goes backwards.
    fn reserve(&self, n: u64) -> (u64, u64) {
        let mut c = self.clock.lock().unwrap();
        let ts = now_ns().max(c.last_ts);
        c.last_ts = ts;
        let first = c.last_seq + 1;
        c.last_seq += n;
        (first, ts)
    }

    pub fn last_seq(&self) -> u64 {
        self.clock.lock().unwrap().last_seq
    }

    fn ensure_open<'s>(
        &self,
        disk: &Disk,
        st: &'s mut JournalState,
        first_seq: u64,
        ts: u64,
    ) -> io::Result<&'s mut OpenSegment> {
        if st.open.is_none() {
            let seg = OpenSegment::create(
                &disk.journal_dir,
                *self.uuid.as_bytes(),
                first_seq,
                st.next_base,
                ts,
            )?;
            st.open = Some(seg);
        }
        Ok(st.open.as_mut().unwrap())
    }

    /// Switch out the open segment; the sealer seals it.
    fn switch(&self, st: &mut JournalState) {
        if let Some(seg) = st.open.take() {
            st.next_base += seg.records() as u64;
            st.unsynced.push(seg.file.clone());
            st.to_seal.push(seg);
            self.wake_sealer();
        }
    }

    /// Journal a batch of operations on one disk and apply them to its
    /// image, in sequence order, under the disk lock. `hdrs` is a reusable
    /// buffer. Returns the NBD error of each op (0 for success).
    pub fn journal_and_apply(
        &self,
        disk: &Disk,
        ops: &[JOp<'_>],
        hdrs: &mut Vec<u8>,
        results: &mut OpResults,
    ) {
        results.clear();
        results.resize(ops.len(), 0);
        if ops.is_empty() {
            return;
        }
        let mut guard = disk.lock_journal();
        let st = &mut *guard;
        let (seq0, ts) = self.reserve(ops.len() as u64);
        hdrs.clear();
        let mut payloads: Vec<&[u8]> = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter().enumerate() {
            let h = RecordHeader {
                kind: op.kind,
                flags: op.flags,
                seq: seq0 + i as u64,
                ts_ns: ts,
                offset: op.offset,
                length: op.length,
                payload_len: op.payload.len() as u32,
                crc: 0,
            };
            hdrs.extend_from_slice(&h.encode(op.payload));
            payloads.push(op.payload);
        }
        let appended = self
            .ensure_open(disk, st, seq0, ts)
            .and_then(|seg| seg.append(hdrs, &payloads));
        if let Err(e) = appended {
            // Nothing was journaled, so nothing may reach the image.
            let errno = nbd_errno(&e);
            results.iter_mut().for_each(|r| *r = errno);
            disk.stats.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        st.last_seq = seq0 + ops.len() as u64 - 1;
        let mut failed = false;
        for (i, op) in ops.iter().enumerate() {
            let r = match op.kind {
                Kind::Write => disk.image.write_all_at(op.payload, op.offset),
                Kind::Zero | Kind::Trim => cdp_core::journal::zero_range(
                    &disk.image,
                    op.offset,
                    op.length,
                    cdp_core::journal::may_punch(op.kind, op.flags),
                ),
                _ => Ok(()),
            };
            if let Err(e) = r {
                results[i] = nbd_errno(&e);
                failed = true;
            }
        }
        if failed {
            disk.stats.errors.fetch_add(1, Ordering::Relaxed);
            self.resync_failed(disk, st, ops, results);
        }
        if st
            .open
            .as_ref()
            .is_some_and(|s| s.pos >= self.settings.segment_size)
        {
            self.switch(st);
        }
    }

    /// An image write failed after its record was journaled: the image may
    /// hold anything in that range now. Journal what the image really holds,
    /// so that the invariant stays true; if even that fails, journal a GAP.
    fn resync_failed(&self, disk: &Disk, st: &mut JournalState, ops: &[JOp<'_>], results: &[u32]) {
        for (op, r) in ops.iter().zip(results) {
            if *r == 0 || !op.kind.changes_data() {
                continue;
            }
            let mut buf = vec![0u8; op.length as usize];
            let (kind, payload, info) = match disk.image.read_exact_at(&mut buf, op.offset) {
                Ok(()) => (Kind::Write, &buf[..], None),
                Err(e) => (
                    Kind::Gap,
                    &[][..],
                    Some(format!(
                        "image write and re-read failed at offset {} ({} bytes): {e}; a new baseline is needed",
                        op.offset, op.length
                    )),
                ),
            };
            let json;
            let (payload, length) = match &info {
                Some(reason) => {
                    json = serde_json::to_vec(&serde_json::json!({ "reason": reason })).unwrap();
                    (&json[..], op.length)
                }
                None => (payload, op.length),
            };
            let _ = self.append_record(disk, st, kind, 0, op.offset, length, payload);
        }
    }

    /// Append one record (metadata or a resync write) under a held disk lock.
    #[allow(clippy::too_many_arguments)]
    fn append_record(
        &self,
        disk: &Disk,
        st: &mut JournalState,
        kind: Kind,
        flags: u8,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> io::Result<u64> {
        let (seq, ts) = self.reserve(1);
        self.append_at(disk, st, kind, flags, seq, ts, offset, length, payload)?;
        Ok(seq)
    }

    #[allow(clippy::too_many_arguments)]
    fn append_at(
        &self,
        disk: &Disk,
        st: &mut JournalState,
        kind: Kind,
        flags: u8,
        seq: u64,
        ts: u64,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> io::Result<()> {
        let h = RecordHeader {
            kind,
            flags,
            seq,
            ts_ns: ts,
            offset,
            length,
            payload_len: payload.len() as u32,
            crc: 0,
        };
        let hb: [u8; RECORD_HEADER_LEN] = h.encode(payload);
        self.ensure_open(disk, st, seq, ts)?
            .append(&hb, &[payload])?;
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
            self.append_at(d, g, kind, 0, seq, ts, 0, 0, &payload)?;
        }
        Ok((seq, ts))
    }

    /// `cdpctl mark`: a MARK in every disk at one sequence number.
    pub fn mark(&self, label: &str) -> Result<(u64, u64), String> {
        cdp_core::names::check_label(label).map_err(|e| e.to_string())?;
        {
            let cat = self.catalog.lock().unwrap();
            if cat
                .mark_exists(&self.uuid_str, label)
                .map_err(|e| e.to_string())?
            {
                return Err(format!(
                    "a mark named {label:?} exists already: choose another label"
                ));
            }
        }
        let (seq, ts) = self
            .append_to_all(Kind::Mark, &serde_json::json!({ "label": label }))
            .map_err(|e| format!("writing the mark to the journal: {e}"))?;
        self.catalog
            .lock()
            .unwrap()
            .add_mark(&self.uuid_str, label, seq, ts)
            .map_err(|e| e.to_string())?;
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
        for disk in &self.disks {
            let to_seal = {
                let mut st = disk.lock_journal();
                if let Some(seg) = &st.open {
                    let elapsed = seg.opened.elapsed();
                    if force_all || (seg.records() > 0 && elapsed >= age) {
                        self.switch(&mut st);
                    } else if seg.records() > 0 {
                        next = next.min(age - elapsed);
                    }
                }
                std::mem::take(&mut st.to_seal)
            };
            let mut failed = Vec::new();
            for seg in to_seal {
                match seg.seal(now_ns()) {
                    Ok(sealed) => {
                        self.record_sealed(disk, &sealed);
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
            }
        }
        next
    }

    fn record_sealed(&self, disk: &Disk, s: &SealedSegment) {
        let cat = self.catalog.lock().unwrap();
        let r = cat
            .put_segment(&self.uuid_str, &disk.name, s, true)
            .and_then(|_| cat.set_last_seq(&self.uuid_str, s.last_seq, s.last_ts_ns));
        if let Err(e) = r {
            eprintln!("cdpd: {e}");
        }
    }

    /// The sealer thread: wakes when a segment is switched out, or when the
    /// oldest open segment reaches the age limit.
    pub fn sealer_loop(&self) {
        let mut wait = self.settings.segment_age;
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
            wait = self.seal_pass(false).max(Duration::from_millis(1));
        }
    }

    /// The sync thread of a disk: group commit for FLUSH and FUA.
    pub fn sync_loop(disk: &Disk, rx: Receiver<SyncJob>) {
        let mut jobs: Vec<SyncJob> = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        while let Ok(job) = rx.recv() {
            jobs.push(job);
            while let Ok(j) = rx.try_recv() {
                jobs.push(j);
            }
            let files: Vec<Arc<File>> = {
                let st = disk.lock_journal();
                st.open
                    .iter()
                    .map(|s| s.file.clone())
                    .chain(st.unsynced.iter().cloned())
                    .collect()
            };
            let mut err = 0u32;
            for f in &files {
                if let Err(e) = f.sync_data() {
                    err = nbd_errno(&e);
                }
            }
            if let Err(e) = disk.image.sync_data() {
                err = nbd_errno(&e);
            }
            if err != 0 {
                disk.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
            disk.stats.flushes.fetch_add(1, Ordering::Relaxed);
            for job in jobs.drain(..) {
                buf.clear();
                for c in &job.cookies {
                    proto::put_simple_reply(&mut buf, err, *c);
                }
                job.replier.send(&buf);
                disk.stats
                    .in_flight
                    .fetch_sub(job.cookies.len() as u64, Ordering::Relaxed);
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

/// Everything `Vm::new` needs, after recovery.
pub struct DiskSetup {
    pub name: String,
    pub path: PathBuf,
    pub image: image::Image,
    pub journal_dir: PathBuf,
    pub next_base: u64,
    pub last_seq: u64,
}

impl Vm {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        uuid: uuid::Uuid,
        name: String,
        disks: Vec<DiskSetup>,
        settings: JournalSettings,
        catalog: Catalog,
        state_dir: PathBuf,
        run_dir: PathBuf,
        last_seq: u64,
        last_ts: u64,
    ) -> (Arc<Vm>, Vec<Receiver<SyncJob>>) {
        let mut rxs = Vec::new();
        let disks = disks
            .into_iter()
            .enumerate()
            .map(|(index, d)| {
                let (tx, rx) = std::sync::mpsc::channel();
                rxs.push(rx);
                Arc::new(Disk {
                    index,
                    name: d.name,
                    path: d.path,
                    size: d.image.size,
                    image: d.image.file,
                    journal_dir: d.journal_dir,
                    journal: Mutex::new(JournalState {
                        open: None,
                        next_base: d.next_base,
                        to_seal: Vec::new(),
                        unsynced: Vec::new(),
                        last_seq: d.last_seq,
                    }),
                    stats: DiskStats::default(),
                    sync_tx: Mutex::new(Some(tx)),
                })
            })
            .collect();
        let vm = Arc::new(Vm {
            uuid_str: uuid.hyphenated().to_string(),
            uuid,
            name,
            disks,
            settings,
            catalog: Mutex::new(catalog),
            state_dir,
            run_dir,
            pid: std::process::id(),
            session_id: Mutex::new(0),
            clock: Mutex::new(Clock { last_seq, last_ts }),
            stopping: AtomicBool::new(false),
            sealer_wake: (Mutex::new(false), Condvar::new()),
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
            let st = d.lock_journal();
            if let Some(s) = &st.open {
                s.file.sync_data()?;
            }
        }
        Ok(())
    }
}
