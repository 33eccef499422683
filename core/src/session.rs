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
use crate::journal::recovery::{self, Recovered, RecoveryError};
use crate::layout::StateDir;
use crate::time::now_ns;

#[derive(Debug, Error)]
pub enum SessionError {
    #[error(transparent)]
    Recovery(#[from] RecoveryError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
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

/// Recover each disk's journal onto its image and record in the catalog the
/// segments recovery sealed or removed.
pub fn recover_journals(
    cat: &Catalog,
    state: &StateDir,
    vm_uuid: &uuid::Uuid,
    disks: &[DiskImage<'_>],
) -> Result<VmRecovery, SessionError> {
    let vm = vm_uuid.hyphenated().to_string();
    let mut out = VmRecovery::default();
    for d in disks {
        let dir = state.journal(&vm, d.disk);
        let rec = recovery::recover_disk(&dir, vm_uuid, d.file, d.path)?;
        for s in &rec.sealed {
            cat.put_segment(&vm, d.disk, s, true)?;
        }
        for first in &rec.removed {
            cat.delete_segment(&vm, d.disk, *first)?;
        }
        reconcile_sealed(cat, state, &vm, d.disk)?;
        out.disks.push(rec);
    }
    Ok(out)
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
        )
        .unwrap();
        assert_eq!(rec.disks.len(), 1);
        assert!(!rec.had_records() && rec.journal_clean());
        assert_eq!(rec.previous_end(None, "b"), PreviousEnd::First);
        assert!(state.journal(&u.hyphenated().to_string(), "vda").is_dir());
    }
}
