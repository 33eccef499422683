//! Appending to a disk's open segment and sealing it.
//!
//! A batch of records is written with one `pwritev` at the segment's end. If
//! the write fails part way (a full disk), the segment is cut back to where
//! the batch began, so a failed batch leaves no trace.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::format::{self, IndexEntry, SegmentHeader, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use super::segment_file_name;

/// Records per `pwritev` call (two iovecs per record, under IOV_MAX = 1024).
const MAX_IOV: usize = 1024;

/// The segment records are being appended to.
pub struct OpenSegment {
    pub file: Arc<File>,
    pub path: PathBuf,
    pub first_seq: u64,
    pub record_base: u64,
    /// Where the next record goes.
    pub pos: u64,
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
    /// Create `<dir>/<first-seq>.seg` with its header. Fails if it exists.
    pub fn create(
        dir: &Path,
        vm_uuid: [u8; 16],
        first_seq: u64,
        record_base: u64,
        now_ns: u64,
    ) -> io::Result<OpenSegment> {
        let path = dir.join(segment_file_name(first_seq));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let header = SegmentHeader {
            vm_uuid,
            first_seq,
            record_base,
            created_ns: now_ns,
        };
        file.write_all_at(&header.encode(), 0)?;
        Ok(OpenSegment {
            file: Arc::new(file),
            path,
            first_seq,
            record_base,
            pos: SEGMENT_HEADER_LEN as u64,
            index: Vec::with_capacity(1024),
            first_ts_ns: 0,
            last_ts_ns: 0,
            last_seq: 0,
            opened: Instant::now(),
        })
    }

    pub fn records(&self) -> usize {
        self.index.len()
    }

    /// Append records whose headers (with CRCs) are in `headers`, 48 bytes
    /// each, with their payloads in `payloads` (empty for records without
    /// one). On error the segment is cut back to its previous end.
    pub fn append(&mut self, headers: &[u8], payloads: &[&[u8]]) -> io::Result<()> {
        debug_assert_eq!(headers.len(), payloads.len() * RECORD_HEADER_LEN);
        let start = self.pos;
        let index_len = self.index.len();
        let r = self.append_inner(headers, payloads);
        if r.is_err() {
            // Best effort: a failed truncate leaves a torn tail that the next
            // recovery cuts off anyway.
            let _ = self.file.set_len(start);
            self.pos = start;
            self.index.truncate(index_len);
        }
        r
    }

    fn append_inner(&mut self, headers: &[u8], payloads: &[&[u8]]) -> io::Result<()> {
        let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity((payloads.len() * 2).min(MAX_IOV));
        let mut pos = self.pos;
        for (i, chunk) in payloads.chunks(MAX_IOV / 2).enumerate() {
            iov.clear();
            let mut total = 0usize;
            for (j, p) in chunk.iter().enumerate() {
                let k = i * (MAX_IOV / 2) + j;
                let hb = &headers[k * RECORD_HEADER_LEN..(k + 1) * RECORD_HEADER_LEN];
                let h = format::RecordHeader::decode(hb).map_err(io::Error::other)?;
                self.index.push(IndexEntry {
                    seq: h.seq,
                    ts_ns: h.ts_ns,
                    offset: h.offset,
                    length: h.length,
                    payload_pos: pos + total as u64 + RECORD_HEADER_LEN as u64,
                    kind: h.kind,
                    flags: h.flags,
                });
                if self.first_ts_ns == 0 {
                    self.first_ts_ns = h.ts_ns;
                }
                self.last_ts_ns = h.ts_ns;
                self.last_seq = h.seq;
                iov.push(IoSlice::new(hb));
                total += RECORD_HEADER_LEN;
                if !p.is_empty() {
                    iov.push(IoSlice::new(p));
                    total += p.len();
                }
            }
            pwritev_all(&self.file, &mut iov, pos)?;
            pos += total as u64;
        }
        self.pos = pos;
        Ok(())
    }

    /// Write the INDEX record and trailer, and make the segment durable.
    pub fn seal(&self, now_ns: u64) -> io::Result<SealedSegment> {
        let seal = format::encode_seal(&self.index, self.pos, self.last_seq, now_ns);
        self.file.write_all_at(&seal, self.pos)?;
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

/// `pwritev` until every byte is written.
fn pwritev_all(f: &File, iov: &mut [IoSlice<'_>], mut pos: u64) -> io::Result<()> {
    let mut iov: &mut [IoSlice<'_>] = iov;
    while !iov.is_empty() {
        let n = unsafe {
            libc::pwritev(
                f.as_raw_fd(),
                iov.as_ptr() as *const libc::iovec,
                iov.len() as libc::c_int,
                pos as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwritev wrote nothing",
            ));
        }
        pos += n as u64;
        IoSlice::advance_slices(&mut iov, n as usize);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::format::{Kind, RecordHeader};
    use super::*;

    #[test]
    fn append_seal_scan() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = OpenSegment::create(dir.path(), [3; 16], 10, 0, 1).unwrap();
        let mut headers = Vec::new();
        let payloads: Vec<Vec<u8>> = (0..1500).map(|i| vec![i as u8; 100 + i % 7]).collect();
        let mut refs: Vec<&[u8]> = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            let h = RecordHeader {
                kind: Kind::Write,
                flags: 0,
                seq: 10 + i as u64,
                ts_ns: 1000 + i as u64,
                offset: i as u64 * 512,
                length: p.len() as u64,
                payload_len: p.len() as u32,
                crc: 0,
            };
            headers.extend_from_slice(&h.encode(p));
            refs.push(p);
        }
        seg.append(&headers, &refs).unwrap();
        let sealed = seg.seal(5000).unwrap();
        assert_eq!(sealed.records, 1500);
        assert_eq!(sealed.last_seq, 1509);
        let bytes = std::fs::read(&seg.path).unwrap();
        let scan = format::scan_segment(&bytes).unwrap();
        assert!(matches!(scan.tail, format::Tail::Sealed(_)));
        assert_eq!(scan.records.len(), 1500);
        assert_eq!(scan.records[1499].payload(&bytes), &payloads[1499][..]);
        let index = format::read_index(&bytes).unwrap().unwrap();
        assert_eq!(index, seg.index);
    }
}
