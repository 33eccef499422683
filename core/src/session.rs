//! Session recovery, shared by cdpd's start and cdp-agent's adoption of a
//! dead cdpd (docs/DESIGN.md, "Capture sessions"): recover every disk's
//! journal onto its image, record what recovery sealed and removed in the
//! catalog, and decide how the previous capture session ended.
//!
//! The caller holds every image open and OFD-locked ([`crate::image`]), so
//! no live cdpd can be writing the journals being recovered.

use std::fs::File;
use std::path::Path;

use thiserror::Error;

use crate::catalog::{Catalog, CatalogError, SessionRow};
use crate::journal::dirty::{DirtyMap, MapKind};
use crate::journal::recovery::{self, Recovered, RecoveryError};
use crate::layout::StateDir;
use crate::time::now_ns;

#[derive(Debug, Error)]
pub enum SessionError {
    #[error(transparent)]
    Recovery(#[from] RecoveryError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("journaling the resize of disk {disk} in {path}: {source}")]
    Resize {
        disk: String,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How the previous capture session of a VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreviousEnd {
    First,
    Clean,
    /// The process died on this host boot: the page cache kept every write.
    Crash,
    /// The host rebooted after an unclean end: writes may have been lost.
    PowerLoss,
}

impl PreviousEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            PreviousEnd::First => "first",
            PreviousEnd::Clean => "clean",
            PreviousEnd::Crash => "crash",
            PreviousEnd::PowerLoss => "power-loss",
        }
    }
}

/// Decide how the last session ended from the catalog and the journals.
pub fn previous_end(
    last: Option<&SessionRow>,
    journal_clean: bool,
    had_records: bool,
    boot_id: &str,
) -> PreviousEnd {
    match last {
        None if !had_records => PreviousEnd::First,
        // Journals but no catalog row: the catalog was lost. Without a boot
        // id to compare, assume the worst.
        None if journal_clean => PreviousEnd::Clean,
        None => PreviousEnd::PowerLoss,
        Some(s) if s.end_kind.as_deref() == Some("clean") || (journal_clean && had_records) => {
            PreviousEnd::Clean
        }
        Some(s) if s.boot_id == boot_id => PreviousEnd::Crash,
        Some(_) => PreviousEnd::PowerLoss,
    }
}

/// One disk to recover: its name, its image's path and the open, locked image.
pub struct DiskImage<'a> {
    pub disk: &'a str,
    pub path: &'a Path,
    pub file: &'a File,
}

/// What recovering every disk of a VM found.
#[derive(Debug, Default)]
pub struct VmRecovery {
    /// Per disk, in the order given.
    pub disks: Vec<Recovered>,
}

impl VmRecovery {
    pub fn last_seq(&self) -> u64 {
        self.disks.iter().map(|r| r.last_seq).max().unwrap_or(0)
    }

    pub fn last_ts_ns(&self) -> u64 {
        self.disks.iter().map(|r| r.last_ts_ns).max().unwrap_or(0)
    }

    pub fn had_records(&self) -> bool {
        self.disks.iter().any(|r| r.had_records)
    }

    /// Did every journal end with SESSION_END (or hold nothing)?
    pub fn journal_clean(&self) -> bool {
        self.disks.iter().all(|r| r.ended_clean)
    }

    pub fn redone(&self) -> u64 {
        self.disks.iter().map(|r| r.redone).sum()
    }

    pub fn torn_bytes(&self) -> u64 {
        self.disks.iter().map(|r| r.torn_bytes).sum()
    }

    pub fn sealed_segments(&self) -> usize {
        self.disks.iter().map(|r| r.sealed.len()).sum()
    }

    pub fn chain_breaks(&self) -> Vec<String> {
        self.disks
            .iter()
            .flat_map(|r| r.chain_breaks.iter().cloned())
            .collect()
    }

    /// How the previous session ended, given the catalog's last session.
    pub fn previous_end(&self, last: Option<&SessionRow>, boot_id: &str) -> PreviousEnd {
        previous_end(last, self.journal_clean(), self.had_records(), boot_id)
    }
}

/// How the reason of the catalog gap `cdpctl restore --in-place` records
/// begins: the image was replaced while the VM was stopped, so the next start
/// redoes no sealed segment onto it (docs/RELIABILITY.md, "A power loss").
pub const RESTORED_IN_PLACE: &str = "disk restored in place";

/// Recover each disk's journal onto its image and record in the catalog the
/// segments recovery sealed or removed, and a checkpoint at each journal's
/// last seq. `boot_id`: this boot's; when the
/// catalog's last session ran on another boot (or there is none), the host
/// may have lost power since the journals were written
/// ([`recovery::recover_disk_skipping`]'s `rebooted`).
pub fn recover_journals(
    cat: &Catalog,
    state: &StateDir,
    vm_uuid: &uuid::Uuid,
    disks: &[DiskImage<'_>],
    boot_id: &str,
) -> Result<VmRecovery, SessionError> {
    let vm = vm_uuid.hyphenated().to_string();
    let rebooted = cat.last_session(&vm)?.is_none_or(|s| s.boot_id != boot_id);
    // Disks a tool replaced while the VM was stopped: the journal after the
    // checkpoint is not theirs to redo.
    let replaced: Vec<String> = cat
        .gaps_after(&vm, cat.last_seq(&vm)?.0)?
        .into_iter()
        .filter(|(_, reason)| reason.starts_with(RESTORED_IN_PLACE))
        .map(|(disk, _)| disk)
        .collect();
    let mut out = VmRecovery::default();
    for d in disks {
        let dir = state.journal(&vm, d.disk);
        // Redo skips the ranges of a valid dirty map (resynced from the
        // image: newer than the journal there). One that does not check out
        // is left for the capture, which journals an unbounded GAP for it.
        // The end, not the metadata's length: a block device's is 0.
        let size = std::io::Seek::seek(&mut &*d.file, std::io::SeekFrom::End(0)).unwrap_or(0);
        let map = DirtyMap::read_only(&state.vm(&vm).dirty_map(d.disk), MapKind::Dirty, size)
            .ok()
            .flatten()
            .filter(|m| m.count() > 0);
        // The checkpoint: records after it may be durable in the journal
        // only (docs/RELIABILITY.md, "A power loss").
        let synced = DirtyMap::read_synced_seq(&state.vm(&vm).activity_log(d.disk))
            .filter(|_| !replaced.iter().any(|r| r == d.disk));
        let rec = recovery::recover_disk_skipping(
            &dir,
            vm_uuid,
            d.file,
            d.path,
            map.as_ref(),
            rebooted,
            synced,
        )?;
        for s in &rec.sealed {
            cat.put_segment(&vm, d.disk, s, true)?;
        }
        let log = state.vm(&vm).activity_log(d.disk);
        checkpoint_recovered(cat, &log, &vm, d.disk, rec.last_seq)?;
        for first in &rec.removed {
            cat.delete_segment(&vm, d.disk, *first)?;
        }
        reconcile_sealed(cat, state, &vm, d.disk)?;
        out.disks.push(rec);
    }
    Ok(out)
}

/// Recovery synced the image with every record of the journal redone: a
/// checkpoint at its last seq, durable in the activity log's header, then
/// in the catalog (the shipper may trim up to it; cdp-agent's recovery of
/// a stopped VM so lets its shipped journal go). The catalog is not told
/// when the log holds an older checkpoint it could not replace: a reboot's
/// redo starts there, and must find every record after it.
fn checkpoint_recovered(
    cat: &Catalog,
    log: &Path,
    vm: &str,
    disk: &str,
    seq: u64,
) -> Result<(), SessionError> {
    if seq == 0 {
        return Ok(());
    }
    match DirtyMap::write_synced_seq(log, seq) {
        // No log, or one never trusted: no redo starts from it.
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            eprintln!(
                "cdp: recovery: recording the checkpoint in {}: {e}",
                log.display()
            );
            return Ok(());
        }
    }
    cat.set_image_synced(vm, disk, seq)?;
    Ok(())
}

/// The journal directory is the source of truth (issue 12): a sealed
/// segment on disk that the catalog does not know (its insert failed when
/// it was sealed: a locked or full catalog) is recorded now, so it is
/// shipped like any other. Only complete, sealed segments count; an open
/// one is the writer's. Returns the first seqs added.
pub fn reconcile_sealed(
    cat: &Catalog,
    state: &StateDir,
    vm: &str,
    disk: &str,
) -> Result<Vec<u64>, SessionError> {
    use crate::journal::{self, format::Tail, writer::SealedSegment, LoadedSegment};
    let known: std::collections::HashSet<u64> = cat
        .segments(vm)?
        .into_iter()
        .filter(|r| r.disk == disk)
        .map(|r| r.first_seq)
        .collect();
    let dir = state.journal(vm, disk);
    let mut added = Vec::new();
    for (first, path) in journal::list_segments(&dir).map_err(RecoveryError::from)? {
        if known.contains(&first) {
            continue;
        }
        let seg = match LoadedSegment::load(&path) {
            Ok(s) => s,
            // Trimmed or being created meanwhile, or not a segment yet.
            Err(_) => continue,
        };
        let Tail::Sealed(trailer) = &seg.scan.tail else {
            continue;
        };
        let (Some(a), Some(b)) = (seg.scan.records.first(), seg.scan.records.last()) else {
            continue;
        };
        let sealed = SealedSegment {
            path: path.clone(),
            first_seq: seg.scan.header.first_seq,
            last_seq: trailer.last_seq,
            first_ts_ns: a.header.ts_ns,
            last_ts_ns: b.header.ts_ns,
            records: u64::from(trailer.records),
            record_base: seg.scan.header.record_base,
            size_bytes: seg.bytes.len() as u64,
        };
        cat.put_segment(vm, disk, &sealed, true)?;
        added.push(first);
    }
    Ok(added)
}

/// Records per microsecond a history may average before a later
/// history's base could reach its seqs: 16 (16 M records a second).
const HISTORY_BASE_SHIFT: u32 = 4;

/// The seq just before a fresh history's first record (docs/DESIGN.md,
/// "Capture sessions"): the wall clock in microseconds times 16, so the
/// first record is `base + 1`. A later history of the same VM (its state
/// directory lost, or another host sharing the repository) starts far above
/// every seq an earlier one reached unless that one averaged more than 16
/// records per microsecond since it began, so the repository's object names
/// (named by seq) are never reused; a collision would need two starts in the
/// same microsecond, and create-only puts make even that an error, never a
/// replacement. A time, not a count: nothing needs the repository to pick it.
pub fn new_history_base(now_ns: u64) -> u64 {
    (now_ns / 1_000) << HISTORY_BASE_SHIFT
}

/// A history is fresh when neither the catalog nor the journal knows of any
/// record of the VM: a new VM, a lost state directory, or another host.
/// (A catalog initialised at [`new_history_base`] by another tool has a
/// last seq and continues it.)
pub fn is_fresh_history(catalog_last_seq: u64, journal_had_records: bool) -> bool {
    catalog_last_seq == 0 && !journal_had_records
}

/// A disk of a VM recorded before cdpd first serves it: its image's path
/// and size.
#[derive(Debug, Clone, Copy)]
pub struct OfflineDisk<'a> {
    pub disk: &'a str,
    pub path: &'a Path,
    pub size: u64,
}

/// Start a VM's history in its catalog before cdpd ever served it, so a
/// baseline taken now, offline, is exact at the base (docs/DESIGN.md,
/// "Baselines"): when the history is fresh ([`is_fresh_history`]: no seq
/// in the catalog, no segment in any journal), record the VM, its policy
/// and its disks with their sizes and set the catalog's last seq to
/// [`new_history_base`]`(now_ns)`. cdpd's start then finds a history that
/// is not fresh: it journals no "new history" GAP and its first record is
/// `base + 1`, right after the baseline. Returns the base, or `None` when
/// the VM has a history already (nothing is changed).
pub fn start_offline_history(
    cat: &Catalog,
    state: &StateDir,
    vm: &str,
    name: &str,
    policy: &str,
    disks: &[OfflineDisk<'_>],
    now_ns: u64,
) -> Result<Option<u64>, SessionError> {
    let mut had_records = false;
    for d in disks {
        had_records |= !crate::journal::list_segments(&state.journal(vm, d.disk))
            .map_err(RecoveryError::from)?
            .is_empty();
    }
    if !is_fresh_history(cat.last_seq(vm)?.0, had_records) || cat.last_session(vm)?.is_some() {
        return Ok(None);
    }
    let base = new_history_base(now_ns);
    cat.upsert_vm(vm, name)?;
    cat.set_vm_policy(vm, policy)?;
    for d in disks {
        cat.upsert_disk(vm, d.disk, d.path, d.size)?;
    }
    cat.set_last_seq(vm, base, now_ns)?;
    Ok(Some(base))
}

/// The GAP reason that starts a fresh history at `base`.
pub fn new_history_reason(base: u64) -> String {
    format!(
        "new history (generation {base}): this host has no earlier state for this VM \
         (a new VM, a lost state directory, or another host); its seqs start at {}, \
         above every earlier history's, so no repository object is reused; \
         points before this one are restored from their own baselines; points after it from \
         a baseline taken after it (the shipper takes one)",
        base + 1
    )
}

/// A disk's size change found at start, journaled as RESIZE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resize {
    pub seq: u64,
    pub ts_ns: u64,
    pub record_base: u64,
    pub old_size: u64,
    pub new_size: u64,
}

/// Journal a RESIZE (offset 0, length the new size, payload
/// `{"old_size", "new_size"}`) in `journal_dir` as a sealed segment of its
/// own, durable and recorded in the catalog before the session that serves
/// the new size starts (docs/DESIGN.md, "Capture sessions"): restore uses
/// the size as of each point.
pub fn journal_resize(
    cat: &Catalog,
    journal_dir: &Path,
    vm_uuid: &uuid::Uuid,
    disk: &str,
    r: &Resize,
) -> Result<(), SessionError> {
    use crate::journal::{format::Kind, writer::OpenSegment, writer::Record};
    let payload = serde_json::to_vec(&serde_json::json!({
        "old_size": r.old_size,
        "new_size": r.new_size,
    }))
    .expect("JSON of two numbers");
    let io = |source| SessionError::Resize {
        disk: disk.to_string(),
        path: journal_dir.to_path_buf(),
        source,
    };
    let mut seg = OpenSegment::create(
        journal_dir,
        *vm_uuid.as_bytes(),
        r.seq,
        r.record_base,
        r.ts_ns,
    )
    .map_err(io)?;
    let rec = Record {
        kind: Kind::Resize,
        flags: 0,
        offset: 0,
        length: r.new_size,
        payload: &payload,
    };
    seg.append(r.seq, r.ts_ns, [rec]).map_err(io)?;
    let sealed = seg.seal(now_ns()).map_err(io)?;
    let vm = vm_uuid.hyphenated().to_string();
    cat.put_segment(&vm, disk, &sealed, true)?;
    cat.set_last_seq(&vm, r.seq, r.ts_ns)?;
    Ok(())
}

/// End the catalog's open session `last` (if it is open) as `prev`.
pub fn end_open_session(
    cat: &Catalog,
    last: Option<&SessionRow>,
    prev: PreviousEnd,
) -> Result<(), CatalogError> {
    match last {
        Some(s) if s.end_kind.is_none() => cat.end_session(s.id, now_ns(), prev.as_str()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(end: Option<&str>, boot: &str) -> SessionRow {
        SessionRow {
            id: 1,
            boot_id: boot.into(),
            pid: 1,
            started_ns: 0,
            end_kind: end.map(str::to_string),
        }
    }

    #[test]
    fn previous_end_table() {
        use PreviousEnd::*;
        assert_eq!(previous_end(None, true, false, "b"), First);
        assert_eq!(previous_end(None, true, true, "b"), Clean);
        assert_eq!(previous_end(None, false, true, "b"), PowerLoss);
        assert_eq!(
            previous_end(Some(&row(Some("clean"), "a")), false, true, "b"),
            Clean
        );
        assert_eq!(previous_end(Some(&row(None, "a")), true, true, "b"), Clean);
        assert_eq!(previous_end(Some(&row(None, "b")), false, true, "b"), Crash);
        assert_eq!(
            previous_end(Some(&row(None, "a")), false, true, "b"),
            PowerLoss
        );
        assert_eq!(
            previous_end(Some(&row(Some("crash"), "a")), false, false, "b"),
            PowerLoss
        );
    }

    #[test]
    fn recover_journals_of_a_fresh_vm_records_nothing() {
        let d = tempfile::tempdir().unwrap();
        let state = StateDir::new(d.path());
        let u = uuid::Uuid::new_v4();
        let cat = Catalog::open(state.path(), &u.to_string()).unwrap();
        let img_path = d.path().join("a.img");
        let img = File::create(&img_path).unwrap();
        img.set_len(1 << 20).unwrap();
        let rec = recover_journals(
            &cat,
            &state,
            &u,
            &[DiskImage {
                disk: "vda",
                path: &img_path,
                file: &img,
            }],
            "boot-1",
        )
        .unwrap();
        assert_eq!(rec.disks.len(), 1);
        assert!(!rec.had_records() && rec.journal_clean());
        assert_eq!(rec.previous_end(None, "b"), PreviousEnd::First);
        assert!(state.journal(&u.hyphenated().to_string(), "vda").is_dir());
    }

    /// An offline start of history records the disks and the base once,
    /// and then the history is no longer fresh: cdpd continues it.
    #[test]
    fn an_offline_history_is_started_once_and_then_continued() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let vm = "0b5c6a3e-1d2f-4a5b-8c9d-0e1f2a3b4c5d";
        std::fs::create_dir_all(state.vm(vm).path()).unwrap();
        let cat = Catalog::open(dir.path(), vm).unwrap();
        let disks = [OfflineDisk {
            disk: "vda",
            path: Path::new("/images/a.raw"),
            size: 1 << 20,
        }];
        let now = 1_790_000_000_000_000_000u64;
        let base = start_offline_history(&cat, &state, vm, "web", "gold", &disks, now)
            .unwrap()
            .unwrap();
        assert_eq!(base, new_history_base(now));
        assert_eq!(cat.last_seq(vm).unwrap().0, base);
        assert!(!is_fresh_history(cat.last_seq(vm).unwrap().0, false));
        assert_eq!(
            cat.disks(vm).unwrap(),
            vec![("vda".to_string(), "/images/a.raw".to_string(), 1 << 20)]
        );
        assert_eq!(cat.vm_name(vm).unwrap().as_deref(), Some("web"));
        // A second call (or one after cdpd served the VM) changes nothing.
        assert_eq!(
            start_offline_history(&cat, &state, vm, "x", "y", &disks, now + 5_000_000).unwrap(),
            None
        );
        assert_eq!(cat.last_seq(vm).unwrap().0, base);
    }

    #[test]
    fn a_later_history_starts_above_an_earlier_one() {
        let t0 = 1_790_000_000_000_000_000u64;
        let a = new_history_base(t0);
        // 16 M records a second for a second, then a start one second later.
        let b = new_history_base(t0 + 1_000_000_000);
        assert!(a + 16_000_000 <= b, "{a} {b}");
        assert!(new_history_base(t0 + 1_000) > a);
        // Any u64 nanosecond time fits SQLite's signed 64-bit integers.
        assert!(new_history_base(u64::MAX) < i64::MAX as u64);
        assert!(is_fresh_history(0, false));
        assert!(!is_fresh_history(a, false) && !is_fresh_history(0, true));
    }

    #[test]
    fn journal_resize_seals_one_record_in_the_catalog() {
        use crate::journal::{format::Kind, LoadedSegment};
        let d = tempfile::tempdir().unwrap();
        let state = StateDir::new(d.path());
        let u = uuid::Uuid::new_v4();
        let vm = u.hyphenated().to_string();
        let cat = Catalog::open(state.path(), &vm).unwrap();
        cat.upsert_vm(&vm, "a").unwrap();
        let dir = state.journal(&vm, "vda");
        std::fs::create_dir_all(&dir).unwrap();
        let r = Resize {
            seq: 41,
            ts_ns: 7,
            record_base: 3,
            old_size: 1 << 20,
            new_size: 3 << 20,
        };
        journal_resize(&cat, &dir, &u, "vda", &r).unwrap();
        let segs = cat.segments(&vm).unwrap();
        assert_eq!(segs.len(), 1);
        assert_eq!((segs[0].first_seq, segs[0].last_seq), (41, 41));
        assert_eq!(cat.last_seq(&vm).unwrap(), (41, 7));
        let seg = LoadedSegment::load(&dir.join(crate::journal::segment_file_name(41))).unwrap();
        let rec = &seg.scan.records[0];
        assert_eq!(rec.header.kind, Kind::Resize);
        assert_eq!((rec.header.offset, rec.header.length), (0, 3 << 20));
        assert_eq!(seg.scan.header.record_base, 3);
    }

    /// Recovery reads the disk's dirty map (without changing it) and redoes
    /// no record over a range it holds (docs/RELIABILITY.md, "A power loss").
    #[test]
    fn recover_journals_skips_redo_under_the_dirty_map() {
        use crate::journal::writer::{OpenSegment, Record};
        use std::os::unix::fs::FileExt;
        let d = tempfile::tempdir().unwrap();
        let state = StateDir::new(d.path());
        let u = uuid::Uuid::new_v4();
        let vm = u.hyphenated().to_string();
        let cat = Catalog::open(state.path(), &vm).unwrap();
        let dir = state.journal(&vm, "vda");
        std::fs::create_dir_all(&dir).unwrap();
        let img_path = d.path().join("a.img");
        let img = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&img_path)
            .unwrap();
        img.set_len(1 << 20).unwrap();
        let mut seg = OpenSegment::create(&dir, *u.as_bytes(), 1, 0, 1).unwrap();
        for (off, byte) in [(0u64, 0xaau8), (512 << 10, 0xbb)] {
            let p = [byte; 512];
            let rec = Record {
                kind: crate::journal::Kind::Write,
                flags: 0,
                offset: off,
                length: 512,
                payload: &p,
            };
            seg.append(off + 1, 10, [rec]).unwrap();
        }
        // Newer, unjournaled data at 0, its range in the dirty map.
        img.write_all_at(&[0xdd; 512], 0).unwrap();
        let map_path = state.vm(&vm).dirty_map("vda");
        let (mut m, _) = DirtyMap::open(&map_path, 1 << 20).unwrap();
        m.set(0, 512).unwrap();
        drop(m);
        let before = std::fs::read(&map_path).unwrap();
        let rec = recover_journals(
            &cat,
            &state,
            &u,
            &[DiskImage {
                disk: "vda",
                path: &img_path,
                file: &img,
            }],
            "boot-1",
        )
        .unwrap();
        assert_eq!((rec.disks[0].redone, rec.disks[0].skipped), (1, 1));
        let mut b = [0u8; 512];
        img.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(b, [0xdd; 512], "the newer data stays");
        img.read_exact_at(&mut b, 512 << 10).unwrap();
        assert_eq!(b, [0xbb; 512], "redone");
        assert_eq!(std::fs::read(&map_path).unwrap(), before, "map unchanged");
    }
}
