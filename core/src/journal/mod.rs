//! The journal: every change to a protected disk, in sequence order.
//!
//! [`format`] is the byte layout (pure code). This module adds the files:
//! listing a disk's segments, reading them, appending to the open one,
//! sealing it, and applying records to an image (used by recovery's redo and
//! by `cdpctl journal replay`). See `docs/JOURNAL_FORMAT.md`.

pub mod dirty;
pub mod extents;
pub mod format;
pub mod mark;
pub mod recovery;
pub mod writer;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

pub use format::{FormatError, IndexEntry, Kind, RecordHeader, Scan, Tail};
pub use mark::{mark_payload, MarkPayload};

/// Errors reading or applying a journal, with the file and position.
#[derive(Debug, Error)]
pub enum JournalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} at byte {pos}: {source}")]
    Format {
        path: PathBuf,
        pos: u64,
        #[source]
        source: FormatError,
    },
    #[error("{path}: sealed segment is corrupt at byte {pos} ({reason}); the journal cannot be replayed past seq {last_good_seq}")]
    Corrupt {
        path: PathBuf,
        pos: u64,
        reason: FormatError,
        last_good_seq: u64,
    },
    #[error("applying seq {seq} ({kind} at offset {offset}, {length} bytes) to {path}: {source}")]
    Apply {
        path: PathBuf,
        seq: u64,
        kind: &'static str,
        offset: u64,
        length: u64,
        #[source]
        source: io::Error,
    },
    #[error("journal of disk {disk} does not start at its beginning (first segment has record base {base}); older segments were removed, so it cannot be replayed onto the initial image")]
    Truncated { disk: String, base: u64 },
    #[error("journal chain broken between {prev} and {next}: expected record base {expected}, found {found}")]
    Chain {
        prev: PathBuf,
        next: PathBuf,
        expected: u64,
        found: u64,
    },
}

impl JournalError {
    pub fn io(path: &Path, source: io::Error) -> Self {
        JournalError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// The file is not there (a segment trimmed meanwhile).
    pub fn is_not_found(&self) -> bool {
        matches!(self, JournalError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

/// `<first-seq:020>.seg`
pub fn segment_file_name(first_seq: u64) -> String {
    format!("{first_seq:020}.seg")
}

/// `.<first-seq:020>.seg.tmp`: a segment being created, before its header is
/// durable (see [`writer::OpenSegment::create`]). Not a segment name: readers
/// never see it; start-up recovery removes one left by a crash.
pub fn temp_segment_file_name(first_seq: u64) -> String {
    format!(".{first_seq:020}.seg.tmp")
}

/// Is `name` a [`temp_segment_file_name`]?
pub fn is_temp_segment_file_name(name: &str) -> bool {
    name.strip_prefix('.')
        .and_then(|n| n.strip_suffix(".tmp"))
        .and_then(parse_segment_file_name)
        .is_some()
}

pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `<state-dir>/vms/<vm-uuid>/<disk>/journal` (see [`crate::layout`]).
pub fn journal_dir(state_dir: &Path, vm_uuid: &str, disk: &str) -> PathBuf {
    crate::layout::StateDir::new(state_dir).journal(vm_uuid, disk)
}

/// The segments of one disk's journal, in replay order.
pub fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(JournalError::io(dir, e)),
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| JournalError::io(dir, e))?;
        if let Some(seq) = ent.file_name().to_str().and_then(parse_segment_file_name) {
            out.push((seq, ent.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The disks that have a journal directory under a VM's state.
pub fn list_disks(state_dir: &Path, vm_uuid: &str) -> Result<Vec<String>, JournalError> {
    let vm = crate::layout::StateDir::new(state_dir).vm(vm_uuid);
    vm.journal_disks()
        .map_err(|e| JournalError::io(vm.path(), e))
}

/// Open a local segment (`<state>/vms/<uuid>/<disk>/journal/<seq>.seg`)
/// for reading. The VM's user owns everything below `<state>/vms`: no link
/// there is followed, and only a regular file with one name is read (root
/// reading a restore's local journal never reads another file through it,
/// docs/DESIGN.md "Trust boundaries"). `<state>` itself is the operator's.
pub fn open_local_segment(path: &Path) -> Result<std::fs::File, JournalError> {
    let parts: Vec<_> = path.components().collect();
    let n = parts.len();
    let is_segment =
        n > 5 && parts[n - 5].as_os_str() == "vms" && parts[n - 2].as_os_str() == "journal";
    if !is_segment {
        return Err(JournalError::io(
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "not a journal segment path"),
        ));
    }
    let state: PathBuf = parts[..n - 5].iter().collect();
    let rel: PathBuf = parts[n - 5..].iter().collect();
    let dir = std::fs::File::open(&state).map_err(|e| JournalError::io(&state, e))?;
    let dir = crate::fsat::DirFd::from_file(dir, state.clone())
        .map_err(|e| JournalError::io(path, io::Error::other(e.to_string())))?;
    dir.open_beneath(&rel).map_err(|e| {
        let kind = if e.is_not_found() {
            io::ErrorKind::NotFound
        } else {
            io::ErrorKind::Other
        };
        JournalError::io(path, io::Error::new(kind, e.to_string()))
    })
}

/// A segment read into memory and scanned.
pub struct LoadedSegment {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
    pub scan: Scan,
}

impl LoadedSegment {
    pub fn load(path: &Path) -> Result<LoadedSegment, JournalError> {
        let bytes = std::fs::read(path).map_err(|e| JournalError::io(path, e))?;
        let scan = format::scan_segment(&bytes).map_err(|source| JournalError::Format {
            path: path.to_path_buf(),
            pos: 0,
            source,
        })?;
        Ok(LoadedSegment {
            path: path.to_path_buf(),
            bytes,
            scan,
        })
    }

    /// Fail unless the segment ends cleanly (sealed, or open with no torn tail
    /// when `open_ok`).
    pub fn check_complete(&self, open_ok: bool) -> Result<(), JournalError> {
        match &self.scan.tail {
            Tail::Sealed(_) => Ok(()),
            Tail::Open if open_ok => Ok(()),
            Tail::Open => Err(JournalError::Corrupt {
                path: self.path.clone(),
                pos: self.bytes.len() as u64,
                reason: FormatError::BadTrailer,
                last_good_seq: self.scan.last_seq().unwrap_or(0),
            }),
            Tail::Torn { valid_len, reason } => Err(JournalError::Corrupt {
                path: self.path.clone(),
                pos: *valid_len,
                reason: reason.clone(),
                last_good_seq: self.scan.last_seq().unwrap_or(0),
            }),
        }
    }
}

/// Apply one data record to an image. Idempotent, so that redo may apply a
/// record the image already has.
pub fn apply_record(image: &File, h: &RecordHeader, payload: &[u8]) -> io::Result<()> {
    match h.kind {
        Kind::Write => image.write_all_at(payload, h.offset),
        Kind::Zero | Kind::Trim => {
            zero_range(image, h.offset, h.length, may_punch(h.kind, h.flags))
        }
        _ => Ok(()),
    }
}

/// May a ZERO or TRIM record leave a hole? TRIM and ZERO without NO_HOLE may.
pub fn may_punch(kind: Kind, flags: u8) -> bool {
    kind == Kind::Trim || flags & format::FLAG_NO_HOLE == 0
}

/// Make a range read as zeros: punch a hole where possible (or when `punch`
/// is asked for TRIM), else zero it in place, else write zeros.
pub fn zero_range(f: &File, offset: u64, len: u64, punch: bool) -> io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags as F};
    use std::os::fd::AsRawFd;
    if len == 0 {
        return Ok(());
    }
    let punch_mode = F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE;
    let zero_mode = F::FALLOC_FL_ZERO_RANGE | F::FALLOC_FL_KEEP_SIZE;
    let modes = if punch {
        [punch_mode, zero_mode]
    } else {
        [zero_mode, punch_mode]
    };
    for mode in modes {
        match fallocate(
            f.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        ) {
            Ok(()) => return Ok(()),
            Err(
                nix::errno::Errno::EOPNOTSUPP
                | nix::errno::Errno::ENODEV
                | nix::errno::Errno::EINVAL,
            ) => {}
            Err(e) => return Err(e.into()),
        }
    }
    static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(ZEROS.len() as u64) as usize;
        f.write_all_at(&ZEROS[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Where a replay stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upto {
    All,
    Seq(u64),
    TimeNs(u64),
}

impl Upto {
    pub fn includes(&self, h: &RecordHeader) -> bool {
        match *self {
            Upto::All => true,
            Upto::Seq(s) => h.seq <= s,
            Upto::TimeNs(t) => h.ts_ns <= t,
        }
    }
}

/// Counters from a replay.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct ReplayStats {
    pub segments: u64,
    pub records_applied: u64,
    pub bytes_written: u64,
    pub last_seq: u64,
}

/// Replay a disk's whole local journal, in order, onto `image` (a copy of the
/// disk as it was when the journal began). Records after `upto` are skipped.
/// A RESIZE record sets the image's size.
/// A corrupt sealed segment stops the replay with an error; the newest
/// segment may be open (no seal) but not torn.
pub fn replay_disk(
    state_dir: &Path,
    vm_uuid: &str,
    disk: &str,
    image: &File,
    image_path: &Path,
    upto: Upto,
) -> Result<ReplayStats, JournalError> {
    let segs = list_segments(&journal_dir(state_dir, vm_uuid, disk))?;
    let mut stats = ReplayStats::default();
    let mut expected_base = 0u64;
    let mut prev: Option<PathBuf> = None;
    let n = segs.len();
    for (i, (_, path)) in segs.into_iter().enumerate() {
        let seg = LoadedSegment::load(&path)?;
        if seg.scan.header.record_base != expected_base {
            return Err(match prev {
                None => JournalError::Truncated {
                    disk: disk.to_string(),
                    base: seg.scan.header.record_base,
                },
                Some(prev) => JournalError::Chain {
                    prev,
                    next: path,
                    expected: expected_base,
                    found: seg.scan.header.record_base,
                },
            });
        }
        seg.check_complete(i + 1 == n)?;
        stats.segments += 1;
        for r in &seg.scan.records {
            let h = &r.header;
            if !upto.includes(h) {
                continue;
            }
            if h.kind.changes_data() || h.kind == Kind::Resize {
                // A RESIZE sets the copy's size (`length` = the new size).
                let applied = if h.kind == Kind::Resize {
                    image.set_len(h.length)
                } else {
                    apply_record(image, h, r.payload(&seg.bytes))
                };
                applied.map_err(|source| JournalError::Apply {
                    path: image_path.to_path_buf(),
                    seq: h.seq,
                    kind: h.kind.name(),
                    offset: h.offset,
                    length: h.length,
                    source,
                })?;
                stats.records_applied += 1;
                if h.kind == Kind::Write {
                    stats.bytes_written += h.length;
                }
            }
            stats.last_seq = stats.last_seq.max(h.seq);
        }
        expected_base += seg.scan.records.len() as u64;
        prev = Some(path);
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A local segment is read only as a regular file with one name, through
    /// no link below `<state>/vms` (the VM's user owns that tree).
    #[test]
    fn local_segments_are_opened_through_no_link() {
        let d = tempfile::tempdir().unwrap();
        let u = "0b5c6a3e-1d2f-4a5b-8c9d-0e1f2a3b4c5d";
        let dir = journal_dir(d.path(), u, "vda");
        std::fs::create_dir_all(&dir).unwrap();
        let seg = dir.join(segment_file_name(1));
        std::fs::write(&seg, b"segment").unwrap();
        let mut s = String::new();
        std::io::Read::read_to_string(&mut open_local_segment(&seg).unwrap(), &mut s).unwrap();
        assert_eq!(s, "segment");
        // A link at the segment.
        let secret = d.path().join("secret");
        std::fs::write(&secret, b"root only").unwrap();
        let linked = dir.join(segment_file_name(2));
        std::os::unix::fs::symlink(&secret, &linked).unwrap();
        let e = open_local_segment(&linked).err().unwrap();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        // A hard link (another file's second name).
        let hard = dir.join(segment_file_name(3));
        std::fs::hard_link(&secret, &hard).unwrap();
        let e = open_local_segment(&hard).err().unwrap();
        assert!(e.to_string().contains("hard links"), "{e}");
        // A link at a directory on the way.
        let elsewhere = d.path().join("elsewhere");
        std::fs::create_dir_all(elsewhere.join("journal")).unwrap();
        std::fs::write(elsewhere.join("journal").join(segment_file_name(1)), b"x").unwrap();
        let vm = crate::layout::StateDir::new(d.path()).vm(u);
        std::os::unix::fs::symlink(&elsewhere, vm.path().join("vdb")).unwrap();
        let via = journal_dir(d.path(), u, "vdb").join(segment_file_name(1));
        assert!(open_local_segment(&via).is_err());
        // Missing: "not found", which callers skip (trimmed meanwhile).
        assert!(open_local_segment(&dir.join(segment_file_name(9)))
            .err()
            .unwrap()
            .is_not_found());
    }

    #[test]
    fn names() {
        assert_eq!(segment_file_name(42), "00000000000000000042.seg");
        assert_eq!(
            parse_segment_file_name("00000000000000000042.seg"),
            Some(42)
        );
        assert_eq!(parse_segment_file_name("42.seg"), None);
        assert_eq!(parse_segment_file_name("0000000000000000004x.seg"), None);
    }
}
