//! Start-up recovery of a disk's journal.
//!
//! Sealed segments are checked by their header and trailer (cheap). Every
//! unsealed segment (the one that was open when the last run ended) is
//! scanned: a torn tail is cut off, its records are re-applied to the image
//! (redo: the journal is written ahead of the image, so the image may lack
//! the last records, never the reverse), and it is sealed. Redo is
//! idempotent: records are applied in order over an image that already has
//! some of them.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::journal::dirty::DirtyMap;
use crate::journal::format::{
    self, Kind, SegmentHeader, Tail, Trailer, SEGMENT_HEADER_LEN, TRAILER_LEN,
};
use crate::journal::writer::{OpenSegment, SealedSegment};
use crate::journal::{self, JournalError, LoadedSegment};

#[derive(Debug, Error)]
pub enum RecoveryError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("{path}: belongs to VM {found}, not {expected}: move it away")]
    WrongVm {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("recovering {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What recovery found in one disk's journal.
#[derive(Debug, Default, Clone)]
pub struct Recovered {
    pub last_seq: u64,
    pub last_ts_ns: u64,
    /// Record base of the next segment.
    pub next_base: u64,
    /// Did the journal end with SESSION_END (or hold no records)?
    pub ended_clean: bool,
    pub had_records: bool,
    /// Bytes cut off a torn tail.
    pub torn_bytes: u64,
    /// Records re-applied to the image.
    pub redone: u64,
    /// Records not redone: their range is in the dirty map (resynced).
    pub skipped: u64,
    /// Sealed segments with records redone (after a reboot, past the
    /// checkpoint).
    pub redone_sealed: u64,
    /// Segments sealed by recovery (for the catalog).
    pub sealed: Vec<SealedSegment>,
    /// Empty unsealed segments removed (including aborted creates).
    pub removed: Vec<u64>,
    /// Files removed as aborted segment creates: a segment file too short to
    /// hold a record (0 bytes, or a torn header), or a temporary file of a
    /// create that never completed. Each is also logged on stderr.
    pub aborted_creates: Vec<PathBuf>,
    /// Breaks in the chain of record bases (a segment missing in the middle).
    pub chain_breaks: Vec<String>,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> RecoveryError + '_ {
    move |source| RecoveryError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Read a sealed segment's header and trailer without reading its records.
fn read_sealed_bounds(path: &Path) -> Result<Option<(SegmentHeader, Trailer, u64)>, RecoveryError> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).map_err(io_err(path))?;
    let len = f.metadata().map_err(io_err(path))?.len();
    if len < (SEGMENT_HEADER_LEN + TRAILER_LEN) as u64 {
        return Ok(None);
    }
    let mut hb = [0u8; SEGMENT_HEADER_LEN];
    f.read_exact_at(&mut hb, 0).map_err(io_err(path))?;
    let Ok(h) = SegmentHeader::decode(&hb) else {
        return Ok(None);
    };
    // Trailer::find wants the whole tail in a slice that is at least a
    // minimal segment long; give it header + trailer bytes.
    let mut tail = vec![0u8; SEGMENT_HEADER_LEN + format::RECORD_HEADER_LEN + TRAILER_LEN];
    let off = len.saturating_sub(tail.len() as u64);
    let n = (len - off) as usize;
    let at = tail.len() - n;
    f.read_exact_at(&mut tail[at..], off)
        .map_err(io_err(path))?;
    Ok(Trailer::find(&tail).map(|t| (h, t, len)))
}

/// Read the last record of a sealed segment from its index (for the clock).
fn last_record(path: &Path) -> Result<Option<format::IndexEntry>, RecoveryError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io_err(path))?;
    let idx = format::read_index(&bytes).map_err(|source| JournalError::Format {
        path: path.to_path_buf(),
        pos: 0,
        source,
    })?;
    Ok(idx.and_then(|v| v.last().copied()))
}

/// Recover one disk's journal onto its image.
pub fn recover_disk(
    dir: &Path,
    vm_uuid: &uuid::Uuid,
    image: &File,
    image_path: &Path,
) -> Result<Recovered, RecoveryError> {
    recover_disk_skipping(dir, vm_uuid, image, image_path, None, false, None)
}

/// [`recover_disk`], redoing no record whose range touches a set bit of
/// `dirty` (the disk's valid dirty map). `rebooted`: the host may have lost
/// power since the journal was written (the boot id changed, or is not
/// known); then a newest segment whose header is all zeros is a create
/// that no FLUSH or seal made durable ([`OpenSegment::create_unsynced`]):
/// it is removed, and the journal counts as not ended cleanly, so the
/// power-loss resync covers what its records wrote.
///
/// `synced`: the disk's checkpoint (the activity log's
/// [`crate::journal::dirty::Header::synced_seq`]): every record up to it is
/// durable in the image, and a FLUSH made the later ones durable in the
/// journal only (docs/RELIABILITY.md, "A power loss"). After a reboot, the
/// records after it are redone from the sealed segments too, in order;
/// without one (a log of an earlier version, or none), only the unsealed
/// segments are.
pub fn recover_disk_skipping(
    dir: &Path,
    vm_uuid: &uuid::Uuid,
    image: &File,
    image_path: &Path,
    dirty: Option<&DirtyMap>,
    rebooted: bool,
    synced: Option<u64>,
) -> Result<Recovered, RecoveryError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let segs = journal::list_segments(dir)?;
    let mut r = Recovered {
        ended_clean: true,
        ..Default::default()
    };
    let mut expected_base: Option<u64> = None;
    let mut last_kind: Option<Kind> = None;
    // A sealed segment whose last record we have not read yet.
    let mut last_sealed: Option<PathBuf> = None;
    remove_temp_segments(dir, &mut r)?;
    let lost_create = rebooted && remove_unsynced_creates(&segs, &mut r)?;
    for (first, path) in &segs {
        if r.removed.contains(first) {
            continue;
        }
        if remove_aborted_create(path, *first, &mut r)? {
            continue;
        }
        if let Some((h, t, len)) = read_sealed_bounds(path)? {
            check_vm(path, &h, vm_uuid)?;
            chain(
                &mut r,
                &mut expected_base,
                path,
                h.record_base,
                t.records as u64,
            );
            if t.records > 0 {
                r.had_records = true;
                r.last_seq = r.last_seq.max(t.last_seq);
                last_sealed = Some(path.clone());
                last_kind = None;
            }
            if let Some(after) = synced.filter(|&s| rebooted && t.last_seq > s) {
                // Records a FLUSH made durable in the journal only: the
                // image may have lost them with the page cache.
                let seg = LoadedSegment::load(path)?;
                redo(&seg, after, (image, image_path), dirty, &mut r)?;
                r.redone_sealed += 1;
            }
            let _ = len;
            continue;
        }
        // Unsealed: scan it, cut a torn tail, redo, seal.
        let seg = LoadedSegment::load(path)?;
        check_vm(path, &seg.scan.header, vm_uuid)?;
        let valid_len = match &seg.scan.tail {
            Tail::Torn { valid_len, .. } => *valid_len,
            _ => seg.bytes.len() as u64,
        };
        r.torn_bytes += seg.bytes.len() as u64 - valid_len;
        if seg.scan.records.is_empty() {
            std::fs::remove_file(path).map_err(io_err(path))?;
            r.removed.push(seg.scan.header.first_seq);
            continue;
        }
        chain(
            &mut r,
            &mut expected_base,
            path,
            seg.scan.header.record_base,
            seg.scan.records.len() as u64,
        );
        last_kind = redo(&seg, 0, (image, image_path), dirty, &mut r)?.or(last_kind);
        last_sealed = None;
        r.had_records = true;
        // Seal it where the valid records end.
        let f = File::options()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        f.set_len(valid_len).map_err(io_err(path))?;
        let open = OpenSegment {
            file: std::sync::Arc::new(f),
            path: path.clone(),
            first_seq: seg.scan.header.first_seq,
            record_base: seg.scan.header.record_base,
            pos: valid_len,
            writeback_from: valid_len,
            index: seg.scan.records.iter().map(|f| f.index_entry()).collect(),
            first_ts_ns: seg.scan.records[0].header.ts_ns,
            last_ts_ns: seg.scan.records.last().unwrap().header.ts_ns,
            last_seq: seg.scan.records.last().unwrap().header.seq,
            opened: std::time::Instant::now(),
        };
        r.sealed
            .push(open.seal(crate::time::now_ns()).map_err(io_err(path))?);
    }
    if let Some(p) = last_sealed {
        if let Some(e) = last_record(&p)? {
            r.last_ts_ns = r.last_ts_ns.max(e.ts_ns);
            last_kind = Some(e.kind);
        }
    }
    image.sync_data().map_err(io_err(image_path))?;
    r.next_base = expected_base.unwrap_or(0);
    r.ended_clean = !r.had_records || last_kind == Some(Kind::SessionEnd);
    if lost_create {
        // Records were written after whatever the journal now ends with.
        r.had_records = true;
        r.ended_clean = false;
    }
    Ok(r)
}

/// Redo the data records of a segment with a seq after `after` onto the
/// image (skipping those a dirty map covers), counting them into `r`. The
/// kind of its last record.
fn redo(
    seg: &LoadedSegment,
    after: u64,
    (image, image_path): (&File, &Path),
    dirty: Option<&DirtyMap>,
    r: &mut Recovered,
) -> Result<Option<Kind>, RecoveryError> {
    let mut last_kind = None;
    for rec in &seg.scan.records {
        let h = &rec.header;
        if h.seq <= after {
            continue;
        }
        if h.kind.changes_data() && dirty.is_some_and(|m| m.intersects(h.offset, h.length)) {
            r.skipped += 1;
        } else if h.kind.changes_data() {
            journal::apply_record(image, h, rec.payload(&seg.bytes)).map_err(|source| {
                JournalError::Apply {
                    path: image_path.to_path_buf(),
                    seq: h.seq,
                    kind: h.kind.name(),
                    offset: h.offset,
                    length: h.length,
                    source,
                }
            })?;
            r.redone += 1;
        }
        r.last_seq = r.last_seq.max(h.seq);
        r.last_ts_ns = r.last_ts_ns.max(h.ts_ns);
        last_kind = Some(h.kind);
    }
    Ok(last_kind)
}

/// A segment file too short to hold a record (0 bytes, or no whole valid
/// header) is what a create that failed or was cut short by a crash left:
/// it is removed and said so, wherever it is in the journal. Older cdpd
/// versions left such files when the disk was full; this code's creates
/// leave none (see [`OpenSegment::create`]). A file with room for a record is
/// never removed here.
fn remove_aborted_create(
    path: &Path,
    first: u64,
    r: &mut Recovered,
) -> Result<bool, RecoveryError> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).map_err(io_err(path))?;
    let len = f.metadata().map_err(io_err(path))?.len();
    if len > SEGMENT_HEADER_LEN as u64 {
        return Ok(false);
    }
    if len == SEGMENT_HEADER_LEN as u64 {
        let mut hb = [0u8; SEGMENT_HEADER_LEN];
        f.read_exact_at(&mut hb, 0).map_err(io_err(path))?;
        if SegmentHeader::decode(&hb).is_ok() {
            // A whole header and no record: the empty-segment path below.
            return Ok(false);
        }
    }
    std::fs::remove_file(path).map_err(io_err(path))?;
    eprintln!(
        "cdp: recovery: removed {} ({len} bytes, no record): a segment create that did not complete (full disk or crash)",
        path.display()
    );
    r.removed.push(first);
    r.aborted_creates.push(path.to_path_buf());
    Ok(true)
}

/// After a power loss: the first segment with room for records but a
/// header of zeros, and every segment after it, when none of them is
/// sealed. Such a header was never written back: the segment was created
/// without a sync (see [`OpenSegment::create_unsynced`]) and no FLUSH or
/// seal synced it, which every FLUSH since its create would have done (it
/// syncs every unsealed segment file); so no record in it or in a later
/// segment was acknowledged as durable. They are removed, and said so.
/// A header that is not all zeros, or a sealed segment after it, is never
/// taken for this (corruption: refused further on). True when removed.
fn remove_unsynced_creates(
    segs: &[(u64, PathBuf)],
    r: &mut Recovered,
) -> Result<bool, RecoveryError> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let mut from = None;
    for (i, (_, path)) in segs.iter().enumerate() {
        // Not through a link: the tree is the VM's (its user may be root's
        // only neighbour here).
        let f = File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(io_err(path))?;
        let len = f.metadata().map_err(io_err(path))?.len();
        if len <= SEGMENT_HEADER_LEN as u64 {
            continue;
        }
        let mut hb = [0u8; SEGMENT_HEADER_LEN];
        f.read_exact_at(&mut hb, 0).map_err(io_err(path))?;
        if hb.iter().all(|&b| b == 0) {
            from = Some(i);
            break;
        }
    }
    let Some(from) = from else {
        return Ok(false);
    };
    for (_, path) in &segs[from + 1..] {
        if read_sealed_bounds(path)?.is_some() {
            return Ok(false);
        }
    }
    for (first, path) in &segs[from..] {
        std::fs::remove_file(path).map_err(io_err(path))?;
        eprintln!(
            "cdp: recovery: removed {}: created after the last FLUSH before the power loss, its header never reached the disk (no record in it was acknowledged as durable; the activity log's extents are resynced)",
            path.display()
        );
        r.removed.push(*first);
        r.aborted_creates.push(path.clone());
    }
    Ok(true)
}

/// Remove the temporary files of segment creates that never completed
/// (`.<seq>.seg.tmp`): none of them was ever a segment.
fn remove_temp_segments(dir: &Path, r: &mut Recovered) -> Result<(), RecoveryError> {
    for ent in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let ent = ent.map_err(io_err(dir))?;
        let name = ent.file_name();
        if !name
            .to_str()
            .is_some_and(journal::is_temp_segment_file_name)
        {
            continue;
        }
        let path = ent.path();
        std::fs::remove_file(&path).map_err(io_err(&path))?;
        eprintln!(
            "cdp: recovery: removed {}: a segment create that did not complete (crash)",
            path.display()
        );
        r.aborted_creates.push(path);
    }
    Ok(())
}

fn check_vm(path: &Path, h: &SegmentHeader, vm: &uuid::Uuid) -> Result<(), RecoveryError> {
    if h.vm_uuid != *vm.as_bytes() {
        return Err(RecoveryError::WrongVm {
            path: path.to_path_buf(),
            expected: vm.to_string(),
            found: uuid::Uuid::from_bytes(h.vm_uuid).to_string(),
        });
    }
    Ok(())
}

fn chain(r: &mut Recovered, expected: &mut Option<u64>, path: &Path, base: u64, records: u64) {
    if let Some(e) = *expected {
        if e != base {
            r.chain_breaks.push(format!(
                "{}: record base {base}, expected {e} (segments missing before it)",
                path.display()
            ));
        }
    }
    *expected = Some(base + records);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::writer::Record;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    const VM: [u8; 16] = [7; 16];

    fn write(offset: u64, p: &[u8]) -> Record<'_> {
        Record {
            kind: Kind::Write,
            flags: 0,
            offset,
            length: p.len() as u64,
            payload: p,
        }
    }

    fn meta(kind: Kind) -> Record<'static> {
        Record {
            kind,
            flags: 0,
            offset: 0,
            length: 0,
            payload: b"{}",
        }
    }

    fn image(dir: &Path) -> (File, PathBuf) {
        let path = dir.join("disk.raw");
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        f.set_len(64 * 1024).unwrap();
        (f, path)
    }

    fn read(f: &File, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        f.read_exact_at(&mut b, offset).unwrap();
        b
    }

    #[test]
    fn an_unsealed_segment_is_redone_its_torn_tail_cut_and_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let jdir = dir.path().join("journal");
        std::fs::create_dir(&jdir).unwrap();
        let (img, img_path) = image(dir.path());
        // Journaled, never applied (a crash between the journal write and
        // the image write), then half a record (a crash inside the write).
        let mut seg = OpenSegment::create(&jdir, VM, 1, 0, 1).unwrap();
        seg.append(1, 100, [write(0, &[0xaa; 4096]), write(8192, &[0xbb; 512])])
            .unwrap();
        let torn = vec![0x43u8; 30];
        File::options()
            .append(true)
            .open(&seg.path)
            .unwrap()
            .write_all(&torn)
            .unwrap();
        let uuid = uuid::Uuid::from_bytes(VM);

        let r = recover_disk(&jdir, &uuid, &img, &img_path).unwrap();
        assert_eq!(r.torn_bytes, torn.len() as u64);
        assert_eq!(r.redone, 2);
        assert_eq!((r.last_seq, r.last_ts_ns, r.next_base), (2, 100, 2));
        assert!(r.had_records && !r.ended_clean, "no SESSION_END: not clean");
        assert_eq!(r.sealed.len(), 1);
        assert_eq!(r.sealed[0].records, 2);
        assert_eq!(read(&img, 0, 4096), vec![0xaa; 4096]);
        assert_eq!(read(&img, 8192, 512), vec![0xbb; 512]);
        let loaded = LoadedSegment::load(&seg.path).unwrap();
        assert!(matches!(loaded.scan.tail, Tail::Sealed(_)));

        // A second recovery finds only sealed segments: nothing to redo.
        let again = recover_disk(&jdir, &uuid, &img, &img_path).unwrap();
        assert_eq!(
            (again.redone, again.torn_bytes, again.sealed.len()),
            (0, 0, 0)
        );
        assert_eq!(
            (again.last_seq, again.last_ts_ns, again.next_base),
            (2, 100, 2)
        );
    }

    /// After a reboot, the records of sealed segments after the checkpoint
    /// are redone in order (a FLUSH made them durable in the journal only),
    /// none before it (the image has them, and a later overwrite of theirs
    /// may be in a segment trimmed already); on the same boot, or without a
    /// checkpoint, sealed segments are not redone.
    #[test]
    fn sealed_segments_past_the_checkpoint_are_redone_after_a_reboot() {
        let dir = tempfile::tempdir().unwrap();
        let jdir = dir.path().join("journal");
        std::fs::create_dir(&jdir).unwrap();
        let (img, img_path) = image(dir.path());
        let uuid = uuid::Uuid::from_bytes(VM);
        let mut a = OpenSegment::create(&jdir, VM, 1, 0, 1).unwrap();
        a.append(1, 10, [write(0, &[1; 512]), write(4096, &[2; 512])])
            .unwrap();
        a.seal(11).unwrap();
        let mut b = OpenSegment::create(&jdir, VM, 3, 2, 20).unwrap();
        b.append(3, 20, [write(8192, &[3; 512]), meta(Kind::SessionEnd)])
            .unwrap();
        b.seal(21).unwrap();
        // The image has seq 1 as a later overwrite left it (its record was
        // trimmed), and lost seqs 2 and 3 with the page cache.
        img.write_all_at(&[9; 512], 0).unwrap();
        let run = |rebooted, synced| {
            recover_disk_skipping(&jdir, &uuid, &img, &img_path, None, rebooted, synced).unwrap()
        };
        let r = run(false, Some(1));
        assert_eq!((r.redone, r.redone_sealed), (0, 0), "same boot");
        let r = run(true, None);
        assert_eq!((r.redone, r.redone_sealed), (0, 0), "no checkpoint");
        assert_eq!(read(&img, 4096, 512), vec![0; 512]);
        let r = run(true, Some(1));
        assert_eq!((r.redone, r.redone_sealed), (2, 2));
        assert!(r.ended_clean, "a clean end stays clean");
        assert_eq!(read(&img, 0, 512), vec![9; 512], "seq 1 not redone");
        assert_eq!(read(&img, 4096, 512), vec![2; 512]);
        assert_eq!(read(&img, 8192, 512), vec![3; 512]);
        let r = run(true, Some(4));
        assert_eq!((r.redone, r.redone_sealed), (0, 0), "all synced");
    }

    #[test]
    fn a_missing_segment_is_a_chain_break() {
        let dir = tempfile::tempdir().unwrap();
        let jdir = dir.path().join("journal");
        std::fs::create_dir(&jdir).unwrap();
        let (img, img_path) = image(dir.path());
        let mut a = OpenSegment::create(&jdir, VM, 1, 0, 1).unwrap();
        a.append(1, 10, [write(0, &[1; 512]), write(512, &[2; 512])])
            .unwrap();
        a.seal(11).unwrap();
        // Records 2..5 were in a segment that is gone.
        let mut c = OpenSegment::create(&jdir, VM, 7, 5, 20).unwrap();
        c.append(7, 20, [write(0, &[3; 512]), meta(Kind::SessionEnd)])
            .unwrap();
        c.seal(21).unwrap();

        let r = recover_disk(&jdir, &uuid::Uuid::from_bytes(VM), &img, &img_path).unwrap();
        assert_eq!(r.chain_breaks.len(), 1, "{:?}", r.chain_breaks);
        assert!(r.chain_breaks[0].contains("record base 5, expected 2"));
        assert_eq!((r.next_base, r.last_seq, r.last_ts_ns), (7, 8, 20));
        assert!(r.ended_clean, "the journal ends with SESSION_END");
        assert_eq!(r.redone, 0, "sealed segments are not redone");
    }

    #[test]
    fn empty_and_headless_unsealed_segments_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let jdir = dir.path().join("journal");
        std::fs::create_dir(&jdir).unwrap();
        let (img, img_path) = image(dir.path());
        let empty = OpenSegment::create(&jdir, VM, 1, 0, 1).unwrap();
        // The newest segment's header was torn by a crash.
        let headless = jdir.join(journal::segment_file_name(2));
        std::fs::write(&headless, b"CDPJ").unwrap();

        let r = recover_disk(&jdir, &uuid::Uuid::from_bytes(VM), &img, &img_path).unwrap();
        assert_eq!(r.removed, [1, 2]);
        assert_eq!(r.aborted_creates, std::slice::from_ref(&headless));
        assert!(!empty.path.exists() && !headless.exists());
        assert!(r.ended_clean && !r.had_records);
        assert_eq!(r.next_base, 0);
    }

    /// ENOSPC while creating a segment left a 0-byte file (cdpd before
    /// issue 12), after which start-up refused ("bad segment magic"): a file
    /// with no room for a record is an aborted create, removed and said so,
    /// as the last segment or between two others; the records around it are
    /// all kept.
    #[test]
    fn a_zero_byte_or_torn_header_segment_is_an_aborted_create() {
        let dir = tempfile::tempdir().unwrap();
        let jdir = dir.path().join("journal");
        std::fs::create_dir(&jdir).unwrap();
        let (img, img_path) = image(dir.path());
        let mut a = OpenSegment::create(&jdir, VM, 1, 0, 1).unwrap();
        a.append(1, 10, [write(0, &[1; 512]), write(512, &[2; 512])])
            .unwrap();
        a.seal(11).unwrap();
        // Between two segments: a 0-byte file (its seqs were never used).
        let middle = jdir.join(journal::segment_file_name(3));
        File::create(&middle).unwrap();
        let mut b = OpenSegment::create(&jdir, VM, 4, 2, 20).unwrap();
        b.append(4, 20, [write(1024, &[3; 512])]).unwrap();
        // The last segment: 0 bytes; and a temporary file of a create
        // interrupted by a crash.
        let last = jdir.join(journal::segment_file_name(5));
        File::create(&last).unwrap();
        let temp = jdir.join(journal::temp_segment_file_name(6));
        std::fs::write(&temp, [0u8; 10]).unwrap();

        let r = recover_disk(&jdir, &uuid::Uuid::from_bytes(VM), &img, &img_path).unwrap();
        assert!(!middle.exists() && !last.exists() && !temp.exists());
        let mut aborted = r.aborted_creates.clone();
        aborted.sort();
        assert_eq!(aborted, [temp, middle, last]);
        assert_eq!(r.removed, [3, 5]);
        assert!(r.chain_breaks.is_empty(), "{:?}", r.chain_breaks);
        assert_eq!((r.last_seq, r.next_base, r.redone), (4, 3, 1));
        assert!(
            a.path.exists() && b.path.exists(),
            "segments with records stay"
        );
        assert_eq!(read(&img, 1024, 512), vec![3; 512]);
        // A start after it finds a clean journal.
        let again = recover_disk(&jdir, &uuid::Uuid::from_bytes(VM), &img, &img_path).unwrap();
        assert!(again.aborted_creates.is_empty() && again.removed.is_empty());
        assert_eq!((again.last_seq, again.next_base), (4, 3));
    }

    /// After a power loss, segments from the first whose header is all
    /// zeros (created unsynced, lost before any FLUSH or seal) are removed
    /// and the journal counts as not ended cleanly; their records are not
    /// redone. On the same boot (no power loss) such a header is refused,
    /// and so is one followed by a sealed segment, or a garbage header.
    #[test]
    fn segments_from_an_unsynced_create_lost_in_a_power_loss_are_removed() {
        let setup = |d: &Path, zero: &[u8], later_sealed: bool| {
            let jdir = d.join("journal");
            std::fs::create_dir(&jdir).unwrap();
            let mut a = OpenSegment::create(&jdir, VM, 1, 0, 1).unwrap();
            a.append(1, 10, [write(0, &[1; 512]), meta(Kind::SessionEnd)])
                .unwrap();
            a.seal(11).unwrap();
            let h = |first_seq, record_base| SegmentHeader {
                vm_uuid: VM,
                first_seq,
                record_base,
                created_ns: 12,
            };
            let mut b = OpenSegment::create_unsynced(&jdir, h(3, 2)).unwrap();
            b.append(3, 13, [write(4096, &[2; 512])]).unwrap();
            let mut c = OpenSegment::create_unsynced(&jdir, h(4, 3)).unwrap();
            c.append(4, 14, [write(8192, &[3; 512])]).unwrap();
            if later_sealed {
                c.seal(15).unwrap();
            }
            b.file.write_all_at(zero, 0).unwrap();
            (jdir, b.path, c.path)
        };
        let zeros = [0u8; SEGMENT_HEADER_LEN];

        let d = tempfile::tempdir().unwrap();
        let (jdir, b, c) = setup(d.path(), &zeros, false);
        let (img, img_path) = image(d.path());
        let uuid = uuid::Uuid::from_bytes(VM);
        let err =
            recover_disk_skipping(&jdir, &uuid, &img, &img_path, None, false, None).unwrap_err();
        assert!(
            err.to_string().contains("magic"),
            "same boot: refused: {err}"
        );
        let r = recover_disk_skipping(&jdir, &uuid, &img, &img_path, None, true, None).unwrap();
        assert!(!b.exists() && !c.exists());
        assert_eq!(r.removed, vec![3, 4]);
        assert_eq!(r.aborted_creates, vec![b, c]);
        assert!(!r.ended_clean, "records were lost after the SESSION_END");
        assert!(r.had_records);
        assert_eq!(r.last_seq, 2);
        assert_eq!(r.redone, 0);
        assert_eq!(read(&img, 4096, 512), vec![0; 512], "not redone");

        let d = tempfile::tempdir().unwrap();
        let (jdir, b, _) = setup(d.path(), &zeros, true);
        let (img, img_path) = image(d.path());
        assert!(recover_disk_skipping(&jdir, &uuid, &img, &img_path, None, true, None).is_err());
        assert!(b.exists(), "a sealed segment after it: corruption, refused");

        let d = tempfile::tempdir().unwrap();
        let (jdir, b, _) = setup(d.path(), b"XXXX", false);
        let (img, img_path) = image(d.path());
        assert!(recover_disk_skipping(&jdir, &uuid, &img, &img_path, None, true, None).is_err());
        assert!(b.exists(), "a garbage header: refused");
    }

    /// A last segment with room for records but no valid header is not an
    /// aborted create: recovery refuses rather than drop what it may hold.
    #[test]
    fn a_long_segment_with_a_bad_header_is_never_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let jdir = dir.path().join("journal");
        std::fs::create_dir(&jdir).unwrap();
        let (img, img_path) = image(dir.path());
        let mut seg = OpenSegment::create(&jdir, VM, 1, 0, 1).unwrap();
        seg.append(1, 10, [write(0, &[1; 512])]).unwrap();
        seg.file.write_all_at(b"XXXX", 0).unwrap();
        let err = recover_disk(&jdir, &uuid::Uuid::from_bytes(VM), &img, &img_path).unwrap_err();
        assert!(err.to_string().contains("magic"), "{err}");
        assert!(seg.path.exists());
    }

    #[test]
    fn another_vms_segment_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let jdir = dir.path().join("journal");
        std::fs::create_dir(&jdir).unwrap();
        let (img, img_path) = image(dir.path());
        let mut seg = OpenSegment::create(&jdir, [9; 16], 1, 0, 1).unwrap();
        seg.append(1, 10, [write(0, &[1; 512])]).unwrap();
        let err = recover_disk(&jdir, &uuid::Uuid::from_bytes(VM), &img, &img_path).unwrap_err();
        assert!(matches!(err, RecoveryError::WrongVm { .. }), "{err}");
        assert_eq!(read(&img, 0, 512), vec![0; 512], "nothing applied");
    }

    /// A record under a set bit of a valid dirty map is not redone: the
    /// image holds newer, unjournaled data there (degraded mode), which the
    /// resync journals; redo would put the older record back under it.
    #[test]
    fn redo_skips_records_in_the_dirty_map() {
        use crate::journal::dirty::{self, MapKind};
        let dir = tempfile::tempdir().unwrap();
        let jdir = dir.path().join("journal");
        std::fs::create_dir(&jdir).unwrap();
        let (img, img_path) = image(dir.path());
        let g = dirty::GRANULE;
        img.set_len(4 * g).unwrap();
        let mut seg = OpenSegment::create(&jdir, VM, 1, 0, 1).unwrap();
        // Journaled and applied, then overwritten in degraded mode (the
        // image has 0xdd at 0, its range dirty); in the third granule
        // journaled, never applied, not dirty.
        seg.append(
            1,
            100,
            [write(0, &[0xaa; 4096]), write(2 * g, &[0xbb; 512])],
        )
        .unwrap();
        img.write_all_at(&[0xdd; 4096], 0).unwrap();
        let map_path = dir.path().join("dirty.map");
        let size = 4 * g;
        let (mut m, _) = DirtyMap::open(&map_path, size).unwrap();
        m.set(0, 4096).unwrap();
        drop(m);
        let map = DirtyMap::read_only(&map_path, MapKind::Dirty, size)
            .unwrap()
            .unwrap();
        let uuid = uuid::Uuid::from_bytes(VM);
        let r =
            recover_disk_skipping(&jdir, &uuid, &img, &img_path, Some(&map), false, None).unwrap();
        assert_eq!((r.redone, r.skipped), (1, 1));
        assert_eq!(read(&img, 0, 4096), vec![0xdd; 4096], "newer data kept");
        assert_eq!(read(&img, 2 * g, 512), vec![0xbb; 512], "redone");
    }
}
