//! Journal byte layout: pure encoders and decoders (no I/O).
//!
//! A disk's journal is a directory of segment files named `<first-seq:020>.seg`,
//! so that listing order is replay order. All integers are little-endian.
//!
//! ```text
//! segment header (64 bytes)
//!   0  [8]  magic "CDPJSEG\x01"
//!   8  u32  format version (1)
//!  12  u32  header length (64)
//!  16  [16] VM UUID
//!  32  u64  first seq of the segment
//!  40  u64  record base: records of this disk's journal before this segment
//!  48  u64  created, ns since the Unix epoch
//!  56  u32  reserved (0)
//!  60  u32  CRC32 of bytes 0..60
//!
//! record (48-byte header + payload), repeated
//!   0  u32  magic 0x52504443 ("CDPR")
//!   4  u8   kind   (WRITE 1, ZERO 2, TRIM 3, FLUSH 4, MARK 5,
//!                   SESSION_START 6, SESSION_END 7, GAP 8, RESIZE 9,
//!                   RESYNCED 10, INDEX 127)
//!   5  u8   flags  (FUA 1, NO_HOLE 2, RESYNC 4)
//!   6  u16  reserved (0)
//!   8  u64  seq    (one sequence per VM, across all of its disks)
//!  16  u64  ts_ns  (wall clock, never going backwards)
//!  24  u64  offset (byte offset on the disk)
//!  32  u64  length (bytes of the disk affected)
//!  40  u32  payload length (= length for WRITE; JSON for MARK, SESSION_*, GAP)
//!  44  u32  CRC32 of header bytes 0..44 followed by the payload
//!  48  ...  payload
//!
//! seal (written once, when the segment is closed)
//!   INDEX record: seq = last seq, payload = one 48-byte entry per record:
//!       seq u64 | ts_ns u64 | offset u64 | length u64 | payload position u64 |
//!       kind u8 | flags u8 | 6 bytes zero
//!   trailer (32 bytes)
//!   0  [8]  magic "CDPSEAL1"
//!   8  u64  file position of the INDEX record
//!  16  u64  last seq
//!  24  u32  record count (INDEX excluded)
//!  28  u32  CRC32 of bytes 0..28
//! ```
//!
//! Only the open (newest) segment may end in a torn record; a bad record inside
//! a sealed segment is corruption and is reported, never skipped.

use thiserror::Error;

pub const SEGMENT_MAGIC: [u8; 8] = *b"CDPJSEG\x01";
pub const SEGMENT_VERSION: u32 = 1;
pub const SEGMENT_HEADER_LEN: usize = 64;
pub const RECORD_MAGIC: u32 = 0x5250_4443;
pub const RECORD_HEADER_LEN: usize = 48;
pub const TRAILER_MAGIC: [u8; 8] = *b"CDPSEAL1";
pub const TRAILER_LEN: usize = 32;
pub const INDEX_ENTRY_LEN: usize = 48;
/// Largest payload a record may carry (an NBD write is at most 32 MiB; the
/// index of a full segment stays far below this).
pub const MAX_RECORD_PAYLOAD: u32 = 64 * 1024 * 1024;

/// The most records one segment holds. Its INDEX record carries
/// [`INDEX_ENTRY_LEN`] bytes per record and, like every record, at most
/// [`MAX_RECORD_PAYLOAD`] bytes: 1 Mi records make a 48 MiB index, a quarter
/// under the limit (which would be reached at 1,398,101 records). cdpd switches
/// segments before an append would pass it, whatever the bytes written.
pub const MAX_SEGMENT_RECORDS: usize = 1 << 20;
const _: () = assert!(
    MAX_SEGMENT_RECORDS * INDEX_ENTRY_LEN + MAX_SEGMENT_RECORDS * INDEX_ENTRY_LEN / 4
        <= MAX_RECORD_PAYLOAD as usize
);

pub const FLAG_FUA: u8 = 1;
pub const FLAG_NO_HOLE: u8 = 2;
/// A WRITE or ZERO that journals what the image holds in a range whose
/// changes were not journaled (a resync after a GAP that a RESYNCED record
/// heals). Replayed like any other record.
pub const FLAG_RESYNC: u8 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Kind {
    Write = 1,
    Zero = 2,
    Trim = 3,
    Flush = 4,
    Mark = 5,
    SessionStart = 6,
    SessionEnd = 7,
    Gap = 8,
    /// The disk's size changed: `length` = the new size; payload JSON
    /// `{"old_size": n, "new_size": m}`. A restore at or after it has the new
    /// size (a shrink drops what lay beyond it).
    Resize = 9,
    /// Every range changed since the GAP at `gap_seq` (payload JSON
    /// `{"gap_seq": g, "extents": n, "bytes": b}`) has been journaled again
    /// as it is on the image (records flagged [`FLAG_RESYNC`]): from this
    /// record on, the replay equals the image again. It heals every GAP of
    /// the disk in `[gap_seq, this seq)` whose payload says `"resync": true`.
    Resynced = 10,
    Index = 127,
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Write,
            2 => Kind::Zero,
            3 => Kind::Trim,
            4 => Kind::Flush,
            5 => Kind::Mark,
            6 => Kind::SessionStart,
            7 => Kind::SessionEnd,
            8 => Kind::Gap,
            9 => Kind::Resize,
            10 => Kind::Resynced,
            127 => Kind::Index,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Write => "WRITE",
            Kind::Zero => "ZERO",
            Kind::Trim => "TRIM",
            Kind::Flush => "FLUSH",
            Kind::Mark => "MARK",
            Kind::SessionStart => "SESSION_START",
            Kind::SessionEnd => "SESSION_END",
            Kind::Gap => "GAP",
            Kind::Resize => "RESIZE",
            Kind::Resynced => "RESYNCED",
            Kind::Index => "INDEX",
        }
    }

    /// Does this record change the disk's bytes?
    pub fn changes_data(self) -> bool {
        matches!(self, Kind::Write | Kind::Zero | Kind::Trim)
    }
}

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("bad segment magic")]
    BadSegmentMagic,
    #[error("unsupported segment format version {0} (this build reads version {SEGMENT_VERSION})")]
    UnsupportedVersion(u32),
    #[error("segment header checksum mismatch")]
    SegmentHeaderCrc,
    #[error("bad record magic {0:#010x}")]
    BadRecordMagic(u32),
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error("record payload length {0} over the limit")]
    PayloadTooLong(u32),
    #[error(
        "record payload length {payload_len} does not match length {length} of a {kind} record"
    )]
    LengthMismatch {
        kind: &'static str,
        length: u64,
        payload_len: u32,
    },
    #[error("record checksum mismatch")]
    RecordCrc,
    #[error("bad seal trailer")]
    BadTrailer,
    #[error("bad segment index")]
    BadIndex,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub vm_uuid: [u8; 16],
    pub first_seq: u64,
    pub record_base: u64,
    pub created_ns: u64,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(SEGMENT_HEADER_LEN as u32).to_le_bytes());
        b[16..32].copy_from_slice(&self.vm_uuid);
        b[32..40].copy_from_slice(&self.first_seq.to_le_bytes());
        b[40..48].copy_from_slice(&self.record_base.to_le_bytes());
        b[48..56].copy_from_slice(&self.created_ns.to_le_bytes());
        let crc = crc32fast::hash(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<SegmentHeader, FormatError> {
        if b.len() < SEGMENT_HEADER_LEN || b[0..8] != SEGMENT_MAGIC {
            return Err(FormatError::BadSegmentMagic);
        }
        let version = le32(&b[8..12]);
        if version != SEGMENT_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        if le32(&b[60..64]) != crc32fast::hash(&b[0..60]) {
            return Err(FormatError::SegmentHeaderCrc);
        }
        Ok(SegmentHeader {
            vm_uuid: b[16..32].try_into().unwrap(),
            first_seq: le64(&b[32..40]),
            record_base: le64(&b[40..48]),
            created_ns: le64(&b[48..56]),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: Kind,
    pub flags: u8,
    pub seq: u64,
    pub ts_ns: u64,
    pub offset: u64,
    pub length: u64,
    pub payload_len: u32,
    pub crc: u32,
}

impl RecordHeader {
    /// Encode the header with the CRC field zero; see [`seal_crc`].
    pub fn encode_unsealed(&self, b: &mut [u8; RECORD_HEADER_LEN]) {
        b[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        b[4] = self.kind as u8;
        b[5] = self.flags;
        b[6..8].copy_from_slice(&[0, 0]);
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.ts_ns.to_le_bytes());
        b[24..32].copy_from_slice(&self.offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.length.to_le_bytes());
        b[40..44].copy_from_slice(&self.payload_len.to_le_bytes());
        b[44..48].copy_from_slice(&[0, 0, 0, 0]);
    }

    /// Encode the header with its CRC over header and payload.
    pub fn encode(&self, payload: &[u8]) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        self.encode_unsealed(&mut b);
        seal_crc(&mut b, payload);
        b
    }

    /// Decode and check the syntax of a header. The CRC is checked by
    /// [`RecordHeader::verify`] once the payload is at hand.
    pub fn decode(b: &[u8]) -> Result<RecordHeader, FormatError> {
        let magic = le32(&b[0..4]);
        if magic != RECORD_MAGIC {
            return Err(FormatError::BadRecordMagic(magic));
        }
        let kind = Kind::from_u8(b[4]).ok_or(FormatError::UnknownKind(b[4]))?;
        let h = RecordHeader {
            kind,
            flags: b[5],
            seq: le64(&b[8..16]),
            ts_ns: le64(&b[16..24]),
            offset: le64(&b[24..32]),
            length: le64(&b[32..40]),
            payload_len: le32(&b[40..44]),
            crc: le32(&b[44..48]),
        };
        if h.payload_len > MAX_RECORD_PAYLOAD {
            return Err(FormatError::PayloadTooLong(h.payload_len));
        }
        if kind == Kind::Write && h.length != h.payload_len as u64 {
            return Err(FormatError::LengthMismatch {
                kind: kind.name(),
                length: h.length,
                payload_len: h.payload_len,
            });
        }
        if matches!(kind, Kind::Zero | Kind::Trim) && h.payload_len != 0 {
            return Err(FormatError::LengthMismatch {
                kind: kind.name(),
                length: h.length,
                payload_len: h.payload_len,
            });
        }
        Ok(h)
    }

    /// The index entry of this record, whose payload is at `payload_pos`.
    pub fn index_entry(&self, payload_pos: u64) -> IndexEntry {
        IndexEntry {
            seq: self.seq,
            ts_ns: self.ts_ns,
            offset: self.offset,
            length: self.length,
            payload_pos,
            kind: self.kind,
            flags: self.flags,
        }
    }

    /// Check the record's CRC against its header bytes and payload.
    pub fn verify(&self, header_bytes: &[u8], payload: &[u8]) -> Result<(), FormatError> {
        let mut h = crc32fast::Hasher::new();
        h.update(&header_bytes[0..44]);
        h.update(payload);
        if h.finalize() == self.crc {
            Ok(())
        } else {
            Err(FormatError::RecordCrc)
        }
    }
}

/// Fill in the CRC of an encoded header: CRC32 of bytes 0..44, then the payload.
#[inline]
pub fn seal_crc(b: &mut [u8; RECORD_HEADER_LEN], payload: &[u8]) {
    let mut h = crc32fast::Hasher::new();
    h.update(&b[0..44]);
    h.update(payload);
    b[44..48].copy_from_slice(&h.finalize().to_le_bytes());
}

/// One entry of a sealed segment's index: where a record is and what it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub seq: u64,
    pub ts_ns: u64,
    pub offset: u64,
    pub length: u64,
    /// File position of the record's payload (header position + 48).
    pub payload_pos: u64,
    pub kind: Kind,
    pub flags: u8,
}

impl IndexEntry {
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.ts_ns.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.length.to_le_bytes());
        out.extend_from_slice(&self.payload_pos.to_le_bytes());
        out.push(self.kind as u8);
        out.push(self.flags);
        out.extend_from_slice(&[0u8; 6]);
    }

    pub fn decode(b: &[u8]) -> Result<IndexEntry, FormatError> {
        if b.len() != INDEX_ENTRY_LEN {
            return Err(FormatError::BadIndex);
        }
        Ok(IndexEntry {
            seq: le64(&b[0..8]),
            ts_ns: le64(&b[8..16]),
            offset: le64(&b[16..24]),
            length: le64(&b[24..32]),
            payload_pos: le64(&b[32..40]),
            kind: Kind::from_u8(b[40]).ok_or(FormatError::BadIndex)?,
            flags: b[41],
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    pub index_pos: u64,
    pub last_seq: u64,
    pub records: u32,
}

impl Trailer {
    pub fn encode(&self) -> [u8; TRAILER_LEN] {
        let mut b = [0u8; TRAILER_LEN];
        b[0..8].copy_from_slice(&TRAILER_MAGIC);
        b[8..16].copy_from_slice(&self.index_pos.to_le_bytes());
        b[16..24].copy_from_slice(&self.last_seq.to_le_bytes());
        b[24..28].copy_from_slice(&self.records.to_le_bytes());
        let crc = crc32fast::hash(&b[0..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode the trailer at the end of `seg`, if the segment has one.
    pub fn find(seg: &[u8]) -> Option<Trailer> {
        if seg.len() < SEGMENT_HEADER_LEN + RECORD_HEADER_LEN + TRAILER_LEN {
            return None;
        }
        let b = &seg[seg.len() - TRAILER_LEN..];
        if b[0..8] != TRAILER_MAGIC || le32(&b[28..32]) != crc32fast::hash(&b[0..28]) {
            return None;
        }
        Some(Trailer {
            index_pos: le64(&b[8..16]),
            last_seq: le64(&b[16..24]),
            records: le32(&b[24..28]),
        })
    }
}

/// Encode the seal of a segment: the INDEX record followed by the trailer.
pub fn encode_seal(entries: &[IndexEntry], index_pos: u64, last_seq: u64, ts_ns: u64) -> Vec<u8> {
    let payload_len = entries.len() * INDEX_ENTRY_LEN;
    let mut out = Vec::with_capacity(RECORD_HEADER_LEN + payload_len + TRAILER_LEN);
    out.resize(RECORD_HEADER_LEN, 0);
    for e in entries {
        e.encode_into(&mut out);
    }
    let hdr = RecordHeader {
        kind: Kind::Index,
        flags: 0,
        seq: last_seq,
        ts_ns,
        offset: 0,
        length: 0,
        payload_len: payload_len as u32,
        crc: 0,
    }
    .encode(&out[RECORD_HEADER_LEN..]);
    out[..RECORD_HEADER_LEN].copy_from_slice(&hdr);
    out.extend_from_slice(
        &Trailer {
            index_pos,
            last_seq,
            records: entries.len() as u32,
        }
        .encode(),
    );
    out
}

/// A record found in a segment: its header and where its payload lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub header: RecordHeader,
    /// File position of the record header.
    pub pos: u64,
}

impl Found {
    pub fn payload_pos(&self) -> u64 {
        self.pos + RECORD_HEADER_LEN as u64
    }

    pub fn payload<'a>(&self, seg: &'a [u8]) -> &'a [u8] {
        let p = self.payload_pos() as usize;
        &seg[p..p + self.header.payload_len as usize]
    }

    pub fn index_entry(&self) -> IndexEntry {
        self.header.index_entry(self.payload_pos())
    }
}

/// How a scanned segment ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    /// Sealed: the INDEX record and trailer are present and consistent.
    Sealed(Trailer),
    /// Ends exactly after the last record, without a seal (an open segment).
    Open,
    /// Bytes from `valid_len` on do not form a valid record.
    Torn { valid_len: u64, reason: FormatError },
}

/// The result of scanning a whole segment.
#[derive(Debug, Clone)]
pub struct Scan {
    pub header: SegmentHeader,
    pub records: Vec<Found>,
    pub tail: Tail,
}

impl Scan {
    pub fn last_seq(&self) -> Option<u64> {
        self.records.last().map(|r| r.header.seq)
    }
}

/// Scan every record of a segment held in memory, checking every CRC.
pub fn scan_segment(seg: &[u8]) -> Result<Scan, FormatError> {
    let header = SegmentHeader::decode(seg)?;
    let mut records = Vec::new();
    let mut pos = SEGMENT_HEADER_LEN;
    let tail = loop {
        if pos == seg.len() {
            break Tail::Open;
        }
        let torn = |reason| Tail::Torn {
            valid_len: pos as u64,
            reason,
        };
        if seg.len() - pos < RECORD_HEADER_LEN {
            break torn(FormatError::BadRecordMagic(0));
        }
        let hb = &seg[pos..pos + RECORD_HEADER_LEN];
        let h = match RecordHeader::decode(hb) {
            Ok(h) => h,
            Err(e) => break torn(e),
        };
        let end = pos + RECORD_HEADER_LEN + h.payload_len as usize;
        if end > seg.len() {
            break torn(FormatError::RecordCrc);
        }
        if let Err(e) = h.verify(hb, &seg[pos + RECORD_HEADER_LEN..end]) {
            break torn(e);
        }
        if h.kind == Kind::Index {
            match Trailer::find(seg) {
                Some(t)
                    if t.index_pos == pos as u64
                        && end + TRAILER_LEN == seg.len()
                        && t.records as usize == records.len()
                        && h.payload_len as usize == records.len() * INDEX_ENTRY_LEN =>
                {
                    break Tail::Sealed(t)
                }
                _ => break torn(FormatError::BadTrailer),
            }
        }
        records.push(Found {
            header: h,
            pos: pos as u64,
        });
        pos = end;
    };
    Ok(Scan {
        header,
        records,
        tail,
    })
}

/// Read the index of a sealed segment from its trailer, without scanning
/// the records. Returns `None` when the segment is not sealed.
pub fn read_index(seg: &[u8]) -> Result<Option<Vec<IndexEntry>>, FormatError> {
    let Some(t) = Trailer::find(seg) else {
        return Ok(None);
    };
    let p = t.index_pos as usize;
    if p < SEGMENT_HEADER_LEN || p + RECORD_HEADER_LEN > seg.len() - TRAILER_LEN {
        return Err(FormatError::BadIndex);
    }
    let hb = &seg[p..p + RECORD_HEADER_LEN];
    let h = RecordHeader::decode(hb)?;
    let end = p + RECORD_HEADER_LEN + h.payload_len as usize;
    if h.kind != Kind::Index || end + TRAILER_LEN != seg.len() {
        return Err(FormatError::BadIndex);
    }
    let payload = &seg[p + RECORD_HEADER_LEN..end];
    h.verify(hb, payload)?;
    if payload.len() != t.records as usize * INDEX_ENTRY_LEN {
        return Err(FormatError::BadIndex);
    }
    payload
        .chunks_exact(INDEX_ENTRY_LEN)
        .map(IndexEntry::decode)
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

#[inline]
fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().unwrap())
}

#[inline]
fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn seg_with(records: &[(Kind, u64, Vec<u8>)]) -> (Vec<u8>, Vec<IndexEntry>) {
        let mut seg = SegmentHeader {
            vm_uuid: [7; 16],
            first_seq: 1,
            record_base: 0,
            created_ns: 5,
        }
        .encode()
        .to_vec();
        let mut index = Vec::new();
        for (i, (kind, off, payload)) in records.iter().enumerate() {
            let h = RecordHeader {
                kind: *kind,
                flags: 0,
                seq: i as u64 + 1,
                ts_ns: 100 + i as u64,
                offset: *off,
                length: if *kind == Kind::Write {
                    payload.len() as u64
                } else {
                    4096
                },
                payload_len: payload.len() as u32,
                crc: 0,
            };
            let pos = seg.len() as u64;
            seg.extend_from_slice(&h.encode(payload));
            seg.extend_from_slice(payload);
            index.push(
                Found {
                    header: RecordHeader { crc: 0, ..h },
                    pos,
                }
                .index_entry(),
            );
        }
        (seg, index)
    }

    #[test]
    fn open_then_sealed() {
        let (mut seg, index) = seg_with(&[
            (Kind::Write, 0, vec![1; 512]),
            (Kind::Zero, 4096, vec![]),
            (Kind::Flush, 0, vec![]),
        ]);
        let s = scan_segment(&seg).unwrap();
        assert_eq!(s.tail, Tail::Open);
        assert_eq!(s.records.len(), 3);
        assert_eq!(s.records[0].payload(&seg), &[1u8; 512][..]);
        let pos = seg.len() as u64;
        seg.extend_from_slice(&encode_seal(&index, pos, 3, 9));
        let s = scan_segment(&seg).unwrap();
        assert!(matches!(s.tail, Tail::Sealed(t) if t.last_seq == 3 && t.records == 3));
        assert_eq!(read_index(&seg).unwrap().unwrap(), index);
    }

    #[test]
    fn torn_tail_is_found() {
        let (seg, _) = seg_with(&[
            (Kind::Write, 0, vec![1; 512]),
            (Kind::Write, 512, vec![2; 512]),
        ]);
        let first_end = (SEGMENT_HEADER_LEN + RECORD_HEADER_LEN + 512) as u64;
        for cut in [seg.len() - 1, seg.len() - 300, first_end as usize + 10] {
            let s = scan_segment(&seg[..cut]).unwrap();
            assert_eq!(s.records.len(), 1);
            assert!(matches!(s.tail, Tail::Torn { valid_len, .. } if valid_len == first_end));
        }
        let mut flipped = seg.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let s = scan_segment(&flipped).unwrap();
        assert!(matches!(
            s.tail,
            Tail::Torn {
                reason: FormatError::RecordCrc,
                ..
            }
        ));
    }

    #[test]
    fn header_checks() {
        let h = SegmentHeader {
            vm_uuid: [1; 16],
            first_seq: 42,
            record_base: 7,
            created_ns: 9,
        };
        let mut b = h.encode();
        assert_eq!(SegmentHeader::decode(&b).unwrap(), h);
        b[8] = 2;
        assert_eq!(
            SegmentHeader::decode(&b),
            Err(FormatError::UnsupportedVersion(2))
        );
        let mut b = h.encode();
        b[33] ^= 1;
        assert_eq!(
            SegmentHeader::decode(&b),
            Err(FormatError::SegmentHeaderCrc)
        );
    }

    proptest! {
        #[test]
        fn scan_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut seg = SegmentHeader { vm_uuid: [0; 16], first_seq: 1, record_base: 0, created_ns: 0 }.encode().to_vec();
            seg.extend_from_slice(&bytes);
            let _ = scan_segment(&seg);
            let _ = read_index(&seg);
            let _ = scan_segment(&bytes);
        }

        /// Any prefix of a valid segment scans to a prefix of its records.
        #[test]
        fn prefixes_scan_to_prefixes(sizes in proptest::collection::vec(0usize..3000, 1..6), cut_frac in 0.0f64..1.0) {
            let recs: Vec<_> = sizes.iter().enumerate().map(|(i, n)| (Kind::Write, i as u64 * 4096, vec![i as u8; *n])).collect();
            let (seg, _) = seg_with(&recs);
            let cut = SEGMENT_HEADER_LEN + ((seg.len() - SEGMENT_HEADER_LEN) as f64 * cut_frac) as usize;
            let s = scan_segment(&seg[..cut]).unwrap();
            for (i, r) in s.records.iter().enumerate() {
                prop_assert_eq!(r.header.seq, i as u64 + 1);
                prop_assert_eq!(r.payload(&seg), &recs[i].2[..]);
            }
            match s.tail {
                Tail::Open => prop_assert!(cut == seg.len() || s.records.iter().all(|r| r.payload_pos() as usize + r.header.payload_len as usize <= cut)),
                Tail::Torn { valid_len, .. } => prop_assert!(valid_len as usize <= cut),
                Tail::Sealed(_) => prop_assert!(false, "a prefix is never sealed"),
            }
        }

        /// Flipping any one byte of a record is detected.
        #[test]
        fn any_bit_flip_is_detected(n in 1usize..2000, at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let (mut seg, _) = seg_with(&[(Kind::Write, 0, vec![0x5a; n])]);
            let i = SEGMENT_HEADER_LEN + at.index(seg.len() - SEGMENT_HEADER_LEN);
            seg[i] ^= 1 << bit;
            let s = scan_segment(&seg).unwrap();
            prop_assert!(s.records.is_empty());
        }
    }
}
