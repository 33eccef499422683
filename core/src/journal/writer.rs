//! Appending to a disk's open segment and sealing it.
//!
//! A batch of records is written with one `pwritev` at the segment's end. If
//! the write fails part way (a full disk), the segment is cut back to where
//! the batch began, so a failed batch leaves no trace.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::format::{
    self, IndexEntry, Kind, RecordHeader, SegmentHeader, MAX_SEGMENT_RECORDS, RECORD_HEADER_LEN,
    SEGMENT_HEADER_LEN,
};
use super::{segment_file_name, temp_segment_file_name};

/// Records per `pwritev` call (two iovecs per record, under IOV_MAX = 1024).
const MAX_IOV: usize = 1024;

/// One record to append: what its header says, and its payload (the data
/// of a WRITE, JSON for metadata records, empty otherwise). The sequence
/// number and timestamp are given per batch by [`OpenSegment::append`].
#[derive(Debug, Clone, Copy)]
pub struct Record<'p> {
    pub kind: Kind,
    pub flags: u8,
    pub offset: u64,
    pub length: u64,
    pub payload: &'p [u8],
}

/// The segment records are being appended to.
pub struct OpenSegment {
    pub file: Arc<File>,
    pub path: PathBuf,
    pub first_seq: u64,
    pub record_base: u64,
    /// Where the next record goes.
    pub pos: u64,
    /// Up to where the writer started the segment's writeback
    /// ([`start_writeback`]; where the records begin if it never did).
    pub writeback_from: u64,
    pub index: Vec<IndexEntry>,
    pub first_ts_ns: u64,
    pub last_ts_ns: u64,
    pub last_seq: u64,
    pub opened: Instant,
}

/// What a sealed segment holds, for the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedSegment {
    pub path: PathBuf,
    pub first_seq: u64,
    pub last_seq: u64,
    pub first_ts_ns: u64,
    pub last_ts_ns: u64,
    pub records: u64,
    pub record_base: u64,
    pub size_bytes: u64,
}

impl OpenSegment {
    /// Create `<dir>/<first-seq>.seg` with its header, all of it durable.
    /// Fails if it exists.
    ///
    /// The header is written and synced under a temporary name
    /// ([`temp_segment_file_name`]), which is renamed into place (never
    /// replacing a file) and the directory synced: the name never stands
    /// for a file without a whole header. A failed create (ENOSPC while
    /// writing the header) removes the temporary file and leaves nothing
    /// (docs/RELIABILITY.md, "A full disk while creating a segment").
    pub fn create(
        dir: &Path,
        vm_uuid: [u8; 16],
        first_seq: u64,
        record_base: u64,
        now_ns: u64,
    ) -> io::Result<OpenSegment> {
        let header = SegmentHeader {
            vm_uuid,
            first_seq,
            record_base,
            created_ns: now_ns,
        };
        let seg = Self::place(Self::new_temp(dir, first_seq)?, dir, header, true)?;
        sync_dir(dir)?;
        Ok(seg)
    }

    /// The writer's create (docs/DESIGN.md, "Write path"; issue 13):
    /// [`OpenSegment::create`] with nothing synced, neither the header nor
    /// the name. Both become durable with the first FLUSH round or the
    /// seal, whichever comes first: a FLUSH syncs the file (header
    /// included) and, when the caller says names are unsynced, the
    /// directory ([`sync_dir`], which the caller must call before any
    /// record in the segment is acknowledged as flushed, and before it is
    /// sealed). A killed process loses nothing (header and rename are
    /// done, in the page cache). A power loss before the first FLUSH may
    /// leave the file under its temporary name (recovery removes it), or
    /// under its name with a header of zeros (never written back): recovery
    /// removes such a newest segment after a reboot
    /// ([`super::recovery`]). Either way no FLUSH covered its records, and
    /// the activity log covers their image writes. Keeps two syncs that
    /// wait behind the device's queue (tens of ms under load) off the data
    /// path.
    pub fn create_unsynced(dir: &Path, header: SegmentHeader) -> io::Result<OpenSegment> {
        Self::place(Self::new_temp(dir, header.first_seq)?, dir, header, false)
    }

    /// [`OpenSegment::create_unsynced`] from a file prepared off the data
    /// path ([`SpareSegment::prepare`]): only the header's write and the
    /// rename are left to do, and the appends find their blocks allocated.
    pub fn create_from_spare(
        spare: SpareSegment,
        header: SegmentHeader,
    ) -> io::Result<OpenSegment> {
        let dir = spare.temp.parent().unwrap_or(Path::new(".")).to_path_buf();
        let SpareSegment { file, temp } = spare;
        Self::place((file, temp), &dir, header, false)
    }

    /// A new temporary file for the segment starting at `first_seq`.
    fn new_temp(dir: &Path, first_seq: u64) -> io::Result<(File, PathBuf)> {
        let temp = dir.join(temp_segment_file_name(first_seq));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        Ok((file, temp))
    }

    /// Write the header into the temporary file, sync it if `sync_header`,
    /// and rename it into place; on failure remove the temporary file.
    fn place(
        (file, temp): (File, PathBuf),
        dir: &Path,
        header: SegmentHeader,
        sync_header: bool,
    ) -> io::Result<OpenSegment> {
        let path = dir.join(segment_file_name(header.first_seq));
        let placed = file
            .write_all_at(&header.encode(), 0)
            .and_then(|()| {
                if sync_header {
                    file.sync_data()
                } else {
                    Ok(())
                }
            })
            .and_then(|()| rename_noreplace(&temp, &path));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&temp);
            return Err(e);
        }
        Ok(OpenSegment {
            file: Arc::new(file),
            path,
            first_seq: header.first_seq,
            record_base: header.record_base,
            pos: SEGMENT_HEADER_LEN as u64,
            writeback_from: SEGMENT_HEADER_LEN as u64,
            index: Vec::with_capacity(1024),
            first_ts_ns: 0,
            last_ts_ns: 0,
            last_seq: 0,
            opened: Instant::now(),
        })
    }

    /// Would `n` more records take the index past [`MAX_SEGMENT_RECORDS`]?
    /// One compare, made before every append: the segment is switched first.
    pub fn is_full_for(&self, n: usize) -> bool {
        self.index.len() + n > MAX_SEGMENT_RECORDS
    }

    pub fn records(&self) -> usize {
        self.index.len()
    }

    /// Append `records` with sequence numbers `first_seq`, `first_seq + 1`, …,
    /// all stamped `ts_ns`. Each record's header is encoded (CRC included)
    /// and its index entry built in the same pass, then the records go out
    /// with one `pwritev` per [`MAX_IOV`]/2 records. On error the segment is
    /// cut back to its previous end and nothing of the batch stays, in the
    /// file or in the index.
    pub fn append<'p>(
        &mut self,
        first_seq: u64,
        ts_ns: u64,
        records: impl IntoIterator<Item = Record<'p>>,
    ) -> io::Result<()> {
        let before = (
            self.pos,
            self.index.len(),
            self.first_ts_ns,
            self.last_ts_ns,
            self.last_seq,
        );
        let r = self.append_inner(first_seq, ts_ns, records.into_iter());
        if r.is_err() {
            // Best effort: a failed truncate leaves a torn tail that the next
            // recovery cuts off anyway.
            let _ = self.file.set_len(before.0);
            self.pos = before.0;
            self.index.truncate(before.1);
            (self.first_ts_ns, self.last_ts_ns, self.last_seq) = (before.2, before.3, before.4);
        }
        r
    }

    fn append_inner<'p>(
        &mut self,
        first_seq: u64,
        ts_ns: u64,
        mut records: impl Iterator<Item = Record<'p>>,
    ) -> io::Result<()> {
        let mut at = (first_seq, self.pos);
        // Most batches hold a few records: a first chunk whose arrays cost
        // next to nothing to set up (a 512-record chunk's are 40 KiB, set
        // up per call: measurable per 4 KiB write); a large batch goes on
        // in chunks of MAX_IOV / 2 records.
        let mut more = self.append_chunk::<16, 32>(&mut records, ts_ns, &mut at)?;
        while more {
            more = self.append_chunk::<{ MAX_IOV / 2 }, MAX_IOV>(&mut records, ts_ns, &mut at)?;
        }
        let (seq, pos) = at;
        if seq > first_seq {
            if self.first_ts_ns == 0 {
                self.first_ts_ns = ts_ns;
            }
            self.last_ts_ns = ts_ns;
            self.last_seq = seq - 1;
        }
        self.pos = pos;
        Ok(())
    }

    /// Encode up to `H` records (`V` = 2 × `H` iovecs) and write them with
    /// one `pwritev` at `at.1`; `at` moves past them. True when `H` were
    /// taken (the iterator may hold more).
    fn append_chunk<'p, const H: usize, const V: usize>(
        &mut self,
        records: &mut impl Iterator<Item = Record<'p>>,
        ts_ns: u64,
        at: &mut (u64, u64),
    ) -> io::Result<bool> {
        let (mut seq, pos) = *at;
        // Headers and iovecs of one pwritev, on the stack: no allocation.
        let mut headers = [[0u8; RECORD_HEADER_LEN]; H];
        let mut iov = [IoSlice::new(&[]); V];
        let mut n_iov = 0;
        let mut total = 0u64;
        let mut taken = 0;
        for hb in headers.iter_mut() {
            let Some(rec) = records.next() else {
                break;
            };
            taken += 1;
            let h = RecordHeader {
                kind: rec.kind,
                flags: rec.flags,
                seq,
                ts_ns,
                offset: rec.offset,
                length: rec.length,
                payload_len: rec.payload.len() as u32,
                crc: 0,
            };
            h.encode_unsealed(hb);
            format::seal_crc(hb, rec.payload);
            self.index
                .push(h.index_entry(pos + total + RECORD_HEADER_LEN as u64));
            iov[n_iov] = IoSlice::new(&hb[..]);
            n_iov += 1;
            if !rec.payload.is_empty() {
                iov[n_iov] = IoSlice::new(rec.payload);
                n_iov += 1;
            }
            total += (RECORD_HEADER_LEN + rec.payload.len()) as u64;
            seq += 1;
        }
        if n_iov > 0 {
            pwritev_all(&self.file, &mut iov[..n_iov], pos)?;
        }
        *at = (seq, pos + total);
        Ok(taken == H)
    }

    /// Write the INDEX record and trailer, and make the segment durable.
    pub fn seal(&self, now_ns: u64) -> io::Result<SealedSegment> {
        let seal = format::encode_seal(&self.index, self.pos, self.last_seq, now_ns);
        self.file.write_all_at(&seal, self.pos)?;
        release_past_end(&self.file, self.pos + seal.len() as u64);
        self.file.sync_data()?;
        Ok(SealedSegment {
            path: self.path.clone(),
            first_seq: self.first_seq,
            last_seq: self.last_seq,
            first_ts_ns: self.first_ts_ns,
            last_ts_ns: self.last_ts_ns,
            records: self.index.len() as u64,
            record_base: self.record_base,
            size_bytes: self.pos + seal.len() as u64,
        })
    }
}

/// A file made ready for the next segment off the data path: created under
/// a temporary name (`.<0:020>.seg.tmp`: sequence 0 starts no segment, and
/// recovery removes every temporary file), its name durable, its blocks
/// allocated (beyond its end: it stays empty until a header is written).
pub struct SpareSegment {
    file: File,
    temp: PathBuf,
}

impl SpareSegment {
    /// Prepare a spare in `dir` with `room` bytes allocated (best effort:
    /// without room, e.g. on a full disk or a filesystem without
    /// `fallocate`, it is still a spare).
    pub fn prepare(dir: &Path, room: u64) -> io::Result<SpareSegment> {
        use nix::fcntl::{fallocate, FallocateFlags};
        use std::os::fd::AsRawFd;
        let temp = dir.join(temp_segment_file_name(0));
        match std::fs::remove_file(&temp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        let spare = SpareSegment { file, temp };
        let _ = fallocate(
            spare.file.as_raw_fd(),
            FallocateFlags::FALLOC_FL_KEEP_SIZE,
            0,
            room.min(i64::MAX as u64) as libc::off_t,
        );
        sync_dir(dir).inspect_err(|_| spare.discard())?;
        Ok(spare)
    }

    /// Remove the spare (at stop, or when it is not wanted any more).
    pub fn discard(&self) {
        let _ = std::fs::remove_file(&self.temp);
    }
}

/// Start the device writing `file`'s dirty pages from `offset` on, `len`
/// bytes (0: to the end) (`sync_file_range(SYNC_FILE_RANGE_WRITE)`: it
/// queues the pages' writeback and returns, waiting only while the
/// device's queue is full). Durability is unchanged: only a sync makes
/// anything durable. Best effort: a failure is the next sync's to report.
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (
        libc::off64_t::try_from(offset),
        libc::off64_t::try_from(len),
    ) else {
        return;
    };
    // SAFETY: sync_file_range(2) takes a descriptor (open for the whole
    // call: `file` is borrowed) and plain integers; it touches no memory of
    // this process.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Drop the pages of the sealed segment at `path` from the page cache
/// (`posix_fadvise(POSIX_FADV_DONTNEED)`; its seal made them clean, so they
/// are freed at once) for the next records to reuse (docs/DESIGN.md, "Write
/// path", step 6). Opened as [`crate::fsat::DirFd::open_file`] does: never
/// through a link, a regular file only. Best effort; true when the segment
/// was there to drop (not trimmed meanwhile).
pub fn drop_cached(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return false;
    };
    let Ok(file) = crate::fsat::DirFd::open(dir).and_then(|d| d.open_file(name)) else {
        return false;
    };
    nix::fcntl::posix_fadvise(
        file.as_raw_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .is_ok()
}

/// Make the names in a journal directory durable (after
/// [`OpenSegment::create_unsynced`]).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Give back blocks allocated past `end`, the file's size (a segment made
/// from a [`SpareSegment`] has room for a whole segment; one sealed early
/// by age uses less): a truncate to the same size frees them (punching
/// past the end does not, on ext4). Best effort.
fn release_past_end(f: &File, end: u64) {
    use std::os::unix::fs::MetadataExt;
    let Ok(alloc) = f.metadata().map(|m| m.blocks() * 512) else {
        return;
    };
    if alloc > end.next_multiple_of(1 << 20) {
        let _ = f.set_len(end);
    }
}

/// Rename `from` to `to`, failing with `AlreadyExists` if `to` exists.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use nix::errno::Errno;
    use nix::fcntl::{renameat2, RenameFlags};
    match renameat2(None, from, None, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        // A filesystem without RENAME_NOREPLACE: a link fails if `to` exists.
        Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {
            std::fs::hard_link(from, to)?;
            std::fs::remove_file(from)
        }
        Err(e) => Err(e.into()),
    }
}

/// `pwritev` until every byte is written.
fn pwritev_all(f: &File, iov: &mut [IoSlice<'_>], mut pos: u64) -> io::Result<()> {
    let mut iov: &mut [IoSlice<'_>] = iov;
    while !iov.is_empty() {
        let n = match nix::sys::uio::pwritev(f, iov, pos as libc::off_t) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwritev wrote nothing",
            ));
        }
        pos += n as u64;
        IoSlice::advance_slices(&mut iov, n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(offset: u64, p: &[u8]) -> Record<'_> {
        Record {
            kind: Kind::Write,
            flags: 0,
            offset,
            length: p.len() as u64,
            payload: p,
        }
    }

    #[test]
    fn append_seal_scan() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = OpenSegment::create(dir.path(), [3; 16], 10, 0, 1).unwrap();
        let payloads: Vec<Vec<u8>> = (0..1500).map(|i| vec![i as u8; 100 + i % 7]).collect();
        // More records than one pwritev takes, then a batch with records
        // without payload in between.
        seg.append(
            10,
            1000,
            payloads[..1200]
                .iter()
                .enumerate()
                .map(|(i, p)| write(i as u64 * 512, p)),
        )
        .unwrap();
        let zero = Record {
            kind: Kind::Zero,
            flags: format::FLAG_NO_HOLE,
            offset: 4096,
            length: 8192,
            payload: &[],
        };
        let batch = payloads[1200..]
            .iter()
            .enumerate()
            .flat_map(|(i, p)| [write((1200 + i) as u64 * 512, p), zero]);
        seg.append(1210, 2000, batch).unwrap();
        assert_eq!(seg.records(), 1800);
        assert_eq!(seg.last_seq, 1809);
        assert_eq!((seg.first_ts_ns, seg.last_ts_ns), (1000, 2000));
        let sealed = seg.seal(5000).unwrap();
        assert_eq!(sealed.records, 1800);
        assert_eq!(sealed.last_seq, 1809);
        let bytes = std::fs::read(&seg.path).unwrap();
        let scan = format::scan_segment(&bytes).unwrap();
        assert!(matches!(scan.tail, format::Tail::Sealed(_)));
        assert_eq!(scan.records.len(), 1800);
        assert_eq!(scan.records[1199].payload(&bytes), &payloads[1199][..]);
        assert_eq!(scan.records[1799].header.kind, Kind::Zero);
        assert_eq!(scan.records[1798].payload(&bytes), &payloads[1499][..]);
        let scanned: Vec<IndexEntry> = scan.records.iter().map(|r| r.index_entry()).collect();
        assert_eq!(
            scanned, seg.index,
            "index built while encoding = index of the bytes"
        );
        let index = format::read_index(&bytes).unwrap().unwrap();
        assert_eq!(index, seg.index);
    }

    /// Batches at and around the chunk sizes (16, then 512 records per
    /// `pwritev`) come back whole and in order.
    #[test]
    fn batches_at_chunk_boundaries_are_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = OpenSegment::create(dir.path(), [3; 16], 1, 0, 1).unwrap();
        let mut seq = 1;
        let mut want = Vec::new();
        for n in [1usize, 15, 16, 17, 528, 529, 1040] {
            let ps: Vec<Vec<u8>> = (0..n)
                .map(|i| vec![(seq as usize + i) as u8; 1 + i % 5])
                .collect();
            seg.append(
                seq,
                seq,
                ps.iter().enumerate().map(|(i, p)| write(i as u64, p)),
            )
            .unwrap();
            seq += n as u64;
            want.extend(ps);
        }
        assert_eq!(seg.last_seq, seq - 1);
        seg.seal(9).unwrap();
        let bytes = std::fs::read(&seg.path).unwrap();
        let scan = format::scan_segment(&bytes).unwrap();
        assert_eq!(scan.records.len(), want.len());
        for (i, (r, p)) in scan.records.iter().zip(&want).enumerate() {
            assert_eq!((r.header.seq, r.payload(&bytes)), (i as u64 + 1, &p[..]));
        }
    }

    /// A create that fails after its file was made (here: the name is
    /// taken; on a full disk: the header write) leaves no file behind, and
    /// never touches the segment of that name.
    #[test]
    fn a_failed_create_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = OpenSegment::create(dir.path(), [3; 16], 1, 0, 1).unwrap();
        seg.append(1, 10, [write(0, &[1; 512])]).unwrap();
        let before = std::fs::read(&seg.path).unwrap();
        let err = OpenSegment::create(dir.path(), [3; 16], 1, 0, 2)
            .err()
            .unwrap();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&seg.path).unwrap(), before);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from(segment_file_name(1))]);
        // A new segment's file is never seen without its whole header.
        let next = OpenSegment::create(dir.path(), [3; 16], 2, 1, 3).unwrap();
        let bytes = std::fs::read(&next.path).unwrap();
        assert_eq!(bytes.len(), SEGMENT_HEADER_LEN);
        assert_eq!(SegmentHeader::decode(&bytes).unwrap().first_seq, 2);
    }

    /// A segment made from a spare: the spare's temporary name is gone,
    /// the segment reads back like any other, and the room allocated past
    /// its end is given back at the seal.
    #[test]
    fn a_segment_from_a_spare_is_a_segment_without_its_spare_room() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let spare = SpareSegment::prepare(dir.path(), 8 << 20).unwrap();
        let temp = dir.path().join(temp_segment_file_name(0));
        assert_eq!(std::fs::metadata(&temp).unwrap().len(), 0);
        let mut seg = OpenSegment::create_from_spare(
            spare,
            SegmentHeader {
                vm_uuid: [3; 16],
                first_seq: 5,
                record_base: 2,
                created_ns: 1,
            },
        )
        .unwrap();
        assert!(!temp.exists());
        assert_eq!(seg.path, dir.path().join(segment_file_name(5)));
        seg.append(5, 10, [write(0, &[7; 4096])]).unwrap();
        let sealed = seg.seal(20).unwrap();
        let meta = std::fs::metadata(&seg.path).unwrap();
        assert_eq!(meta.len(), sealed.size_bytes);
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "{} bytes still allocated",
            meta.blocks() * 512
        );
        let bytes = std::fs::read(&seg.path).unwrap();
        let scan = format::scan_segment(&bytes).unwrap();
        assert_eq!((scan.header.first_seq, scan.header.record_base), (5, 2));
        assert!(matches!(scan.tail, format::Tail::Sealed(_)));
        assert_eq!(scan.records[0].payload(&bytes), &[7; 4096][..]);
    }

    #[test]
    fn a_failed_append_leaves_no_trace() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = OpenSegment::create(dir.path(), [3; 16], 1, 0, 1).unwrap();
        seg.append(1, 10, [write(0, &[1; 512])]).unwrap();
        let (pos, records) = (seg.pos, seg.records());
        // A descriptor that cannot write: pwritev fails with EBADF.
        let writable = std::mem::replace(&mut seg.file, Arc::new(File::open(&seg.path).unwrap()));
        let err = seg
            .append(2, 20, [write(512, &[2; 512]), write(1024, &[3; 512])])
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
        assert_eq!(
            (seg.pos, seg.records(), seg.last_seq, seg.last_ts_ns),
            (pos, records, 1, 10)
        );
        seg.file = writable;
        seg.append(2, 30, [write(512, &[4; 512])]).unwrap();
        seg.seal(40).unwrap();
        let bytes = std::fs::read(&seg.path).unwrap();
        let scan = format::scan_segment(&bytes).unwrap();
        let seqs: Vec<u64> = scan.records.iter().map(|r| r.header.seq).collect();
        assert_eq!(seqs, [1, 2]);
        assert_eq!(scan.records[1].payload(&bytes), &[4; 512][..]);
    }
}
