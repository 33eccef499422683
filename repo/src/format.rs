//! Repository object names and encodings (`cdp/v1/`), pure code.
//!
//! ```text
//! cdp/v1/FORMAT                                        {"format":"cdp","version":1}
//! cdp/v1/chunks/<hh>/<blake3-hex>                      zstd(chunk), named by the BLAKE3 of the plain chunk
//! cdp/v1/vms/<vm>/vm.json                              name, uuid, disks, sizes
//! cdp/v1/vms/<vm>/config/<ts_ns:020>.xml               each version of the VM definition
//! cdp/v1/vms/<vm>/<disk>/baselines/<s1:020>-<s0:020>.json  chunk list; exact for points >= s1 given the journal after s0
//! cdp/v1/vms/<vm>/<disk>/journal/<first:020>-<last:020>.seg.zst   the sealed segment, as zstd frames
//! cdp/v1/vms/<vm>/<disk>/journal/<first:020>-<last:020>.idx       its index (small)
//! ```
//!
//! Every name lists in replay order. Objects are immutable: a name is written
//! once (vm.json is the one exception: rewritten when the disk set changes).
//! The `.idx` object is uploaded after its `.seg.zst`, so an index always has
//! its segment; restore plans from LIST + the `.idx` objects alone.
//!
//! Segment object: the raw segment file cut into pieces of [`FRAME_RAW`]
//! bytes, each compressed as an independent zstd frame (with zstd's content
//! checksum), concatenated. The index lists where each frame starts, so a
//! record's payload can be fetched with one ranged GET.
//!
//! Index object (`.idx`), little-endian:
//! ```text
//!   0 [8]  magic "CDPIDX01"
//!   8 u32  length J of the JSON metadata
//!  12 [J]  JSON: IndexMeta
//!     ...  frame table: per frame, raw offset u64 | object offset u64
//!     ...  record entries: 48 bytes each (journal::format::IndexEntry)
//!  end-4   u32 CRC32 of everything before
//! ```

use serde::{Deserialize, Serialize};
use thiserror::Error;

use cdp_core::journal::format::{IndexEntry, Kind, INDEX_ENTRY_LEN, RECORD_HEADER_LEN};

pub const ROOT: &str = "cdp/v1";
pub const FORMAT_KEY: &str = "cdp/v1/FORMAT";
pub const FORMAT_VERSION: u32 = 1;
/// Raw bytes of a segment per zstd frame.
pub const FRAME_RAW: usize = 1 << 20;
pub const IDX_MAGIC: [u8; 8] = *b"CDPIDX01";
/// Baseline chunk size (fixed, aligned to disk offsets).
pub const CHUNK_SIZE: u64 = 1 << 20;
pub const ZSTD_LEVEL: i32 = 1;

/// Largest raw segment a repository object may hold (the journal's segment
/// size plus one record, with room to spare). A larger index is refused.
pub const MAX_SEGMENT_RAW: u64 = 4 << 30;
/// Largest disk a baseline may describe (16 TiB: 16 Mi chunks).
pub const MAX_DISK_SIZE: u64 = 16 << 40;

/// What to do about an object that is damaged (or was crafted).
pub const CORRUPT_HINT: &str =
    "run `cdpctl verify --deep` to see what else is damaged; restore from another target";

#[derive(Debug, Error)]
pub enum RepoFormatError {
    #[error("{key}: {what}; {CORRUPT_HINT}")]
    Corrupt { key: String, what: String },
    #[error("{key}: repository format {found:?}, this build reads cdp version {FORMAT_VERSION}: use a matching cdpd")]
    Version { key: String, found: String },
}

fn corrupt(key: &str, what: impl Into<String>) -> RepoFormatError {
    RepoFormatError::Corrupt {
        key: key.to_string(),
        what: what.into(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FormatMarker {
    pub format: String,
    pub version: u32,
}

pub fn format_marker() -> Vec<u8> {
    serde_json::to_vec(&FormatMarker {
        format: "cdp".into(),
        version: FORMAT_VERSION,
    })
    .unwrap()
}

pub fn check_format_marker(bytes: &[u8]) -> Result<(), RepoFormatError> {
    match serde_json::from_slice::<FormatMarker>(bytes) {
        Ok(m) if m.format == "cdp" && m.version == FORMAT_VERSION => Ok(()),
        Ok(m) => Err(RepoFormatError::Version {
            key: FORMAT_KEY.into(),
            found: format!("{} {}", m.format, m.version),
        }),
        Err(_) => Err(RepoFormatError::Version {
            key: FORMAT_KEY.into(),
            found: String::from_utf8_lossy(&bytes[..bytes.len().min(64)]).into_owned(),
        }),
    }
}

pub fn vm_prefix(vm: &str) -> String {
    format!("{ROOT}/vms/{vm}/")
}

pub fn vm_json_key(vm: &str) -> String {
    format!("{ROOT}/vms/{vm}/vm.json")
}

/// A later version of `vm.json` (objects are never rewritten): the newest
/// name under [`vm_json_versions_prefix`] is the current one. `.` is not in
/// any disk name, so this never looks like a disk's directory.
pub fn vm_json_version_key(vm: &str, ts_ns: u64) -> String {
    format!("{ROOT}/vms/{vm}/vm.json.d/{ts_ns:020}.json")
}

pub fn vm_json_versions_prefix(vm: &str) -> String {
    format!("{ROOT}/vms/{vm}/vm.json.d/")
}

pub fn config_key(vm: &str, ts_ns: u64) -> String {
    format!("{ROOT}/vms/{vm}/config/{ts_ns:020}.xml")
}

pub fn config_prefix(vm: &str) -> String {
    format!("{ROOT}/vms/{vm}/config/")
}

pub fn journal_prefix(vm: &str, disk: &str) -> String {
    format!("{ROOT}/vms/{vm}/{disk}/journal/")
}

pub fn segment_key(vm: &str, disk: &str, first: u64, last: u64) -> String {
    format!("{}{first:020}-{last:020}.seg.zst", journal_prefix(vm, disk))
}

pub fn index_key(vm: &str, disk: &str, first: u64, last: u64) -> String {
    format!("{}{first:020}-{last:020}.idx", journal_prefix(vm, disk))
}

/// Parse `<first>-<last>.idx` or `.seg.zst` (the last path component).
pub fn parse_journal_name(name: &str) -> Option<(u64, u64, bool)> {
    let (stem, is_idx) = if let Some(s) = name.strip_suffix(".idx") {
        (s, true)
    } else {
        (name.strip_suffix(".seg.zst")?, false)
    };
    let (a, b) = stem.split_once('-')?;
    if a.len() != 20 || b.len() != 20 {
        return None;
    }
    Some((a.parse().ok()?, b.parse().ok()?, is_idx))
}

pub fn baseline_prefix(vm: &str, disk: &str) -> String {
    format!("{ROOT}/vms/{vm}/{disk}/baselines/")
}

pub fn baseline_key(vm: &str, disk: &str, s1: u64, s0: u64) -> String {
    format!("{}{s1:020}-{s0:020}.json", baseline_prefix(vm, disk))
}

pub fn parse_baseline_name(name: &str) -> Option<(u64, u64)> {
    let (a, b) = name.strip_suffix(".json")?.split_once('-')?;
    if a.len() != 20 || b.len() != 20 {
        return None;
    }
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// The key of a chunk. `hash_hex` should be 64 lowercase hex digits (see
/// [`is_chunk_hash`]); anything else gives a key the store refuses, never a
/// panic.
pub fn chunk_key(hash_hex: &str) -> String {
    let dir = hash_hex.get(..2).unwrap_or("");
    format!("{ROOT}/chunks/{dir}/{hash_hex}")
}

/// Whether `s` is a chunk's name: a BLAKE3 hash as 64 lowercase hex digits.
pub fn is_chunk_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The most bytes a GET of `key` may return: a bound per kind of object,
/// from the format's own limits (a chunk is 1 MiB before compression, a
/// frame 1 MiB, a segment at most [`MAX_SEGMENT_RAW`], a baseline lists at
/// most [`MAX_DISK_SIZE`] / [`CHUNK_SIZE`] chunks), so a hostile or damaged
/// repository cannot make a reader allocate without bound.
pub fn object_cap(key: &str) -> u64 {
    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    let name = key.rsplit('/').next().unwrap_or(key);
    if key == FORMAT_KEY {
        4 * KIB
    } else if key.starts_with(CHUNKS_PREFIX) {
        // zstd's worst case for 1 MiB is 1 MiB + 4 KiB and a header.
        2 * MIB
    } else if name.ends_with(".seg.zst") {
        // Incompressible frames grow by at most 1/128.
        MAX_SEGMENT_RAW + MAX_SEGMENT_RAW / 128
    } else if name.ends_with(".idx") {
        // One 48-byte entry per record of at least 512 bytes, and the frame table.
        MAX_SEGMENT_RAW / 512 * 48 + MAX_SEGMENT_RAW / FRAME_RAW as u64 * 16 + MIB
    } else if key.contains("/baselines/") {
        // 16 Mi chunk names of 64 hex digits, quoted, with commas.
        MAX_DISK_SIZE / CHUNK_SIZE * 68 + MIB
    } else if key.contains("/retention/") {
        64 * MIB
    } else if key.contains("/leases/") {
        64 * KIB
    } else if name == "vm.json" || key.contains("/vm.json.d/") {
        MIB
    } else if key.contains("/config/") {
        16 * MIB
    } else {
        64 * MIB
    }
}

/// Parse a repository JSON object, naming it in the error.
pub fn parse_json<T: serde::de::DeserializeOwned>(
    key: &str,
    b: &[u8],
) -> Result<T, RepoFormatError> {
    serde_json::from_slice(b)
        .map_err(|e| corrupt(key, format!("not a valid object of its kind: {e}")))
}

pub const CHUNKS_PREFIX: &str = "cdp/v1/chunks/";

pub fn retention_prefix(vm: &str) -> String {
    format!("{ROOT}/vms/{vm}/retention/")
}

/// A retention manifest, named by the time the prune that wrote it began.
pub fn retention_key(vm: &str, written_ns: u64) -> String {
    format!("{}{written_ns:020}.json", retention_prefix(vm))
}

pub fn lease_prefix(vm: &str) -> String {
    format!("{ROOT}/vms/{vm}/leases/")
}

pub fn lease_key(vm: &str, id: &str) -> String {
    format!("{}{id}.json", lease_prefix(vm))
}

/// A lease (`vms/<vm>/leases/<id>.json`): a reader (restore, export, a
/// baseline being taken) that needs the VM's objects to stay. Retention
/// defers every deletion for the VM (and of chunks, repository-wide) while
/// an unexpired lease exists. Rewritten to extend it; deleted at the end.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Lease {
    /// What holds it: "cdpctl restore", "cdpctl export", "baseline".
    pub holder: String,
    pub host: String,
    pub pid: u32,
    pub created_ns: u64,
    /// Ignored after this time (a holder that died without removing it).
    pub expires_ns: u64,
    /// What it reads, for people ("vda at seq:42").
    #[serde(default)]
    pub what: String,
}

/// A point retention keeps, older than the any-point window: the VM's state
/// right after record `seq`, which lasted from `ts_ns` until `until_ns`
/// (the time of the next record of the VM; absent when unknown).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeptPoint {
    pub seq: u64,
    pub ts_ns: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ns: Option<u64>,
    /// Labels of the marks at this seq.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub marks: Vec<String>,
    /// Why it is kept: "window", "every 1h", "mark".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub why: Vec<String>,
}

/// What retention did to one disk's journal.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskRetention {
    pub disk: String,
    /// Every record of this disk after this seq is kept (an exact baseline
    /// holds the state at it); records up to it may be deleted.
    pub journal_from_seq: u64,
    /// The time of the record at `journal_from_seq`: every time from it on
    /// can be restored.
    pub from_ts_ns: u64,
    /// The record base of the first segment kept after `journal_from_seq`
    /// (a first segment with a larger base means records were lost).
    pub record_base: u64,
}

/// A retention manifest (`vms/<vm>/retention/<ts:020>.json`): what the
/// newest prune kept. Readers use the newest one that decodes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RetentionManifest {
    pub vm_uuid: String,
    /// When the prune began, and the time it applied the policy at.
    pub written_ns: u64,
    pub now_ns: u64,
    /// The policy: any-point window, and (every, keep) tiers, in ns.
    pub any_point_ns: u64,
    pub thin: Vec<(u64, u64)>,
    /// The first point of the any-point window: every point from it on is
    /// restorable.
    pub window: KeptPoint,
    /// The discrete points kept before the window, oldest first.
    pub points: Vec<KeptPoint>,
    pub disks: Vec<DiskRetention>,
}

impl RetentionManifest {
    pub fn disk(&self, disk: &str) -> Option<&DiskRetention> {
        self.disks.iter().find(|d| d.disk == disk)
    }
}

/// What `vm.json` says.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmJson {
    pub uuid: String,
    pub name: String,
    pub disks: Vec<VmDisk>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmDisk {
    pub name: String,
    pub size: u64,
    pub source_path: String,
}

/// A baseline: the disk's content as chunks, and the seq range it is
/// consistent from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Baseline {
    pub vm_uuid: String,
    pub disk: String,
    pub size: u64,
    pub chunk_size: u64,
    /// Every record with seq > s0 must be replayed on top.
    pub s0: u64,
    /// The baseline is exact for any point at or after s1.
    pub s1: u64,
    pub started_ns: u64,
    pub finished_ns: u64,
    /// BLAKE3 hex of each chunk; None for a chunk that reads as zeros.
    pub chunks: Vec<Option<String>>,
}

impl Baseline {
    /// Parse a baseline object and check it is consistent with itself (the
    /// chunk list covers the size in chunks of at most [`CHUNK_SIZE`], every
    /// chunk named by a hash), so readers can index with its values.
    pub fn decode(key: &str, b: &[u8]) -> Result<Baseline, RepoFormatError> {
        let bl: Baseline = parse_json(key, b)?;
        bl.validate().map_err(|what| corrupt(key, what))?;
        Ok(bl)
    }

    fn validate(&self) -> Result<(), String> {
        if self.chunk_size == 0 || self.chunk_size > CHUNK_SIZE {
            return Err(format!(
                "chunk size {} (chunks are at most {CHUNK_SIZE} bytes)",
                self.chunk_size
            ));
        }
        if self.size > MAX_DISK_SIZE {
            return Err(format!(
                "a disk of {} bytes, more than the {MAX_DISK_SIZE} a baseline may describe",
                self.size
            ));
        }
        if self.chunks.len() as u64 != self.size.div_ceil(self.chunk_size) {
            return Err(format!(
                "{} chunks for {} bytes in chunks of {}",
                self.chunks.len(),
                self.size,
                self.chunk_size
            ));
        }
        if let Some(bad) = self.chunks.iter().flatten().find(|h| !is_chunk_hash(h)) {
            return Err(format!(
                "chunk name {:?} is not a BLAKE3 hash",
                bad.get(..70).unwrap_or(bad)
            ));
        }
        Ok(())
    }
}

impl VmJson {
    /// Parse `vm.json`.
    pub fn decode(key: &str, b: &[u8]) -> Result<VmJson, RepoFormatError> {
        parse_json(key, b)
    }
}

impl RetentionManifest {
    /// Parse a retention manifest.
    pub fn decode(key: &str, b: &[u8]) -> Result<RetentionManifest, RepoFormatError> {
        parse_json(key, b)
    }
}

impl Lease {
    /// Parse a lease.
    pub fn decode(key: &str, b: &[u8]) -> Result<Lease, RepoFormatError> {
        parse_json(key, b)
    }
}

/// The JSON part of an index object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IndexMeta {
    pub vm_uuid: String,
    pub disk: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub record_base: u64,
    pub records: u64,
    pub first_ts_ns: u64,
    pub last_ts_ns: u64,
    /// Size of the raw segment file.
    pub raw_size: u64,
    /// Size of the `.seg.zst` object.
    pub object_size: u64,
    /// BLAKE3 hex of the `.seg.zst` object.
    pub object_blake3: String,
    /// The previous segment of the same disk (docs/REPOSITORY_FORMAT.md,
    /// "Chain of indexes"): absent in indexes written before the chain
    /// existed, and in the first segment of a disk's history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<ChainLink>,
}

/// What an index says of the segment before it: its seq range and the
/// BLAKE3 of its whole `.idx` object (which names the BLAKE3 of its
/// `.seg.zst`), so deleting, reordering or replacing a segment breaks the
/// link from the one after it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChainLink {
    pub first_seq: u64,
    pub last_seq: u64,
    pub index_blake3: String,
}

/// The BLAKE3 hex of an index object's bytes: what the next index's
/// [`ChainLink::index_blake3`] names.
pub fn index_blake3(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// A frame of a segment object: where its raw bytes begin, and where its
/// compressed bytes begin in the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub raw_offset: u64,
    pub object_offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentIndex {
    pub meta: IndexMeta,
    pub frames: Vec<Frame>,
    pub entries: Vec<IndexEntry>,
}

impl SegmentIndex {
    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(&self.meta).unwrap();
        let mut out = Vec::with_capacity(
            16 + json.len() + self.frames.len() * 16 + self.entries.len() * INDEX_ENTRY_LEN,
        );
        out.extend_from_slice(&IDX_MAGIC);
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        out.extend_from_slice(&(self.frames.len() as u32).to_le_bytes());
        for f in &self.frames {
            out.extend_from_slice(&f.raw_offset.to_le_bytes());
            out.extend_from_slice(&f.object_offset.to_le_bytes());
        }
        for e in &self.entries {
            e.encode_into(&mut out);
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(key: &str, b: &[u8]) -> Result<SegmentIndex, RepoFormatError> {
        if b.len() < 20 || b[..8] != IDX_MAGIC {
            return Err(corrupt(key, "not an index object (bad magic)"));
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32fast::hash(body) != le_u32(crc) {
            return Err(corrupt(key, "index checksum mismatch"));
        }
        let jlen = le_u32(&body[8..12]) as usize;
        let rest = body
            .get(12..)
            .filter(|r| jlen.checked_add(4).is_some_and(|n| r.len() >= n))
            .ok_or_else(|| corrupt(key, "index truncated"))?;
        let meta: IndexMeta = serde_json::from_slice(&rest[..jlen])
            .map_err(|e| corrupt(key, format!("index metadata: {e}")))?;
        let rest = &rest[jlen..];
        let nframes = le_u32(&rest[..4]) as usize;
        let rest = &rest[4..];
        let flen = nframes
            .checked_mul(16)
            .filter(|n| *n <= rest.len())
            .ok_or_else(|| corrupt(key, "frame table truncated"))?;
        let frames = rest[..flen]
            .chunks_exact(16)
            .map(|c| Frame {
                raw_offset: le_u64(&c[..8]),
                object_offset: le_u64(&c[8..]),
            })
            .collect();
        let rest = &rest[flen..];
        if rest.len() % INDEX_ENTRY_LEN != 0
            || (rest.len() / INDEX_ENTRY_LEN) as u64 != meta.records
        {
            return Err(corrupt(key, "record entries do not match the record count"));
        }
        let entries = rest
            .chunks_exact(INDEX_ENTRY_LEN)
            .map(IndexEntry::decode)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| corrupt(key, e.to_string()))?;
        let idx = SegmentIndex {
            meta,
            frames,
            entries,
        };
        idx.validate().map_err(|what| corrupt(key, what))?;
        Ok(idx)
    }

    /// The index is consistent with itself: the frame table describes
    /// [`FRAME_RAW`]-byte frames of a raw segment of at most
    /// [`MAX_SEGMENT_RAW`] bytes inside the object, and every record's
    /// payload lies inside the raw segment. Readers index with these values.
    fn validate(&self) -> Result<(), String> {
        let m = &self.meta;
        if m.raw_size > MAX_SEGMENT_RAW {
            return Err(format!(
                "raw segment of {} bytes, more than the {MAX_SEGMENT_RAW} a segment may have",
                m.raw_size
            ));
        }
        if m.object_size > object_cap(".seg.zst") {
            return Err(format!(
                "segment object of {} bytes is too large",
                m.object_size
            ));
        }
        if !is_chunk_hash(&m.object_blake3) {
            return Err("object_blake3 is not a BLAKE3 hash".into());
        }
        if let Some(l) = &m.prev {
            if !is_chunk_hash(&l.index_blake3)
                || l.first_seq > l.last_seq
                || l.last_seq >= m.first_seq
            {
                return Err(format!(
                    "the link to the previous segment (seq {}-{}) is not a valid link",
                    l.first_seq, l.last_seq
                ));
            }
        }
        if (self.frames.len() as u64) != m.raw_size.div_ceil(FRAME_RAW as u64) {
            return Err(format!(
                "{} frames for a raw segment of {} bytes",
                self.frames.len(),
                m.raw_size
            ));
        }
        let mut prev_end = 0u64;
        for (i, f) in self.frames.iter().enumerate() {
            if f.raw_offset != i as u64 * FRAME_RAW as u64 {
                return Err(format!("frame {i} starts at raw offset {}", f.raw_offset));
            }
            let bad_start = if i == 0 {
                f.object_offset != 0
            } else {
                f.object_offset <= prev_end
            };
            if bad_start || f.object_offset >= m.object_size {
                return Err(format!(
                    "frame {i} starts at object offset {} (object of {} bytes)",
                    f.object_offset, m.object_size
                ));
            }
            prev_end = f.object_offset;
        }
        for e in &self.entries {
            let ok = e.payload_pos >= RECORD_HEADER_LEN as u64
                && e.payload_pos <= m.raw_size
                && e.offset.checked_add(e.length).is_some()
                && (e.kind != Kind::Write
                    || e.payload_pos
                        .checked_add(e.length)
                        .is_some_and(|end| end <= m.raw_size))
                && e.seq >= m.first_seq
                && e.seq <= m.last_seq;
            if !ok {
                return Err(format!("record entry for seq {} is out of bounds", e.seq));
            }
        }
        if m.first_seq > m.last_seq {
            return Err("first_seq after last_seq".into());
        }
        Ok(())
    }
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(b.get(..4).unwrap_or(&[0; 4]));
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b.get(..8).unwrap_or(&[0; 8]));
    u64::from_le_bytes(a)
}

/// Compress a raw segment into independent frames. Returns the object bytes
/// and the frame table.
pub fn compress_segment(raw: &[u8]) -> std::io::Result<(Vec<u8>, Vec<Frame>)> {
    let mut out = Vec::with_capacity(raw.len() / 2);
    let mut frames = Vec::with_capacity(raw.len() / FRAME_RAW + 1);
    for (i, piece) in raw.chunks(FRAME_RAW).enumerate() {
        frames.push(Frame {
            raw_offset: (i * FRAME_RAW) as u64,
            object_offset: out.len() as u64,
        });
        let mut enc = zstd::stream::Encoder::new(&mut out, ZSTD_LEVEL)?;
        enc.include_checksum(true)?;
        std::io::Write::write_all(&mut enc, piece)?;
        enc.finish()?;
    }
    Ok((out, frames))
}

/// Decompress zstd frames (one or several, concatenated) into at most `max`
/// bytes. A first frame that declares a larger content size is refused
/// before anything is decompressed; otherwise the output grows only with
/// what really decompresses and stops one byte past `max` (a decompression
/// bomb costs `max` bytes, not what it would expand to).
pub fn decompress_bounded(key: &str, obj: &[u8], max: usize) -> Result<Vec<u8>, RepoFormatError> {
    use std::io::Read;
    let bomb = |what: String| {
        corrupt(
            key,
            format!("{what} the {max} bytes it may have: damaged, or a decompression bomb"),
        )
    };
    if let Ok(Some(declared)) = zstd::zstd_safe::get_frame_content_size(obj) {
        if declared > max as u64 {
            return Err(bomb(format!("declares {declared} bytes, more than")));
        }
    }
    let dec = zstd::stream::read::Decoder::with_buffer(obj)
        .map_err(|e| corrupt(key, format!("decompressing: {e}")))?;
    let mut out = Vec::with_capacity(max.min(FRAME_RAW));
    dec.take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| corrupt(key, format!("decompressing: {e}")))?;
    if out.len() > max {
        return Err(bomb("decompresses to more than".into()));
    }
    Ok(out)
}

/// Decompress `frames` frames of a segment object (or the whole object):
/// at most [`FRAME_RAW`] bytes each.
pub fn decompress_segment(
    key: &str,
    obj: &[u8],
    frames: usize,
) -> Result<Vec<u8>, RepoFormatError> {
    let max = frames
        .checked_mul(FRAME_RAW)
        .filter(|n| *n as u64 <= MAX_SEGMENT_RAW)
        .ok_or_else(|| {
            corrupt(
                key,
                format!("{frames} frames: more than a segment may have"),
            )
        })?;
    decompress_bounded(key, obj, max)
}

pub fn compress_chunk(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len() / 2);
    let mut enc = zstd::stream::Encoder::new(&mut out, ZSTD_LEVEL)?;
    enc.include_checksum(true)?;
    std::io::Write::write_all(&mut enc, data)?;
    enc.finish()?;
    Ok(out)
}

/// How a repository names its chunks: the BLAKE3 of the plain chunk, or in
/// an encrypted repository its keyed BLAKE3, so that names reveal nothing
/// of the content (docs/REPOSITORY_FORMAT.md, "Encryption").
#[derive(Clone, PartialEq, Eq)]
pub enum ChunkNamer {
    Plain,
    Keyed([u8; 32]),
}

impl std::fmt::Debug for ChunkNamer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChunkNamer::Plain => "Plain",
            ChunkNamer::Keyed(_) => "Keyed(..)",
        })
    }
}

impl ChunkNamer {
    /// The name (64 lowercase hex digits) of a chunk holding `data`.
    pub fn name(&self, data: &[u8]) -> String {
        match self {
            ChunkNamer::Plain => blake3::hash(data),
            ChunkNamer::Keyed(k) => blake3::keyed_hash(k, data),
        }
        .to_hex()
        .to_string()
    }
}

/// Decompress a chunk and check it against its name (the BLAKE3 of the
/// plain data).
pub fn decompress_chunk(
    hash_hex: &str,
    obj: &[u8],
    expect_len: usize,
) -> Result<Vec<u8>, RepoFormatError> {
    decompress_chunk_named(&ChunkNamer::Plain, hash_hex, obj, expect_len)
}

/// Decompress a chunk and check it against its name as `namer` names it.
pub fn decompress_chunk_named(
    namer: &ChunkNamer,
    hash_hex: &str,
    obj: &[u8],
    expect_len: usize,
) -> Result<Vec<u8>, RepoFormatError> {
    let key = chunk_key(hash_hex);
    if expect_len as u64 > CHUNK_SIZE {
        return Err(corrupt(
            &key,
            format!("a chunk of {expect_len} bytes: chunks are at most {CHUNK_SIZE}"),
        ));
    }
    let out = decompress_bounded(&key, obj, expect_len)?;
    if namer.name(&out) != hash_hex {
        return Err(corrupt(&key, "content does not match its hash"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_index(n: usize) -> SegmentIndex {
        SegmentIndex {
            meta: IndexMeta {
                vm_uuid: "u".into(),
                disk: "vda".into(),
                first_seq: 1,
                last_seq: n as u64,
                record_base: 0,
                records: n as u64,
                first_ts_ns: 1,
                last_ts_ns: 2,
                raw_size: 100_000,
                object_size: 50,
                object_blake3: "ab".repeat(32),
                prev: None,
            },
            frames: vec![Frame {
                raw_offset: 0,
                object_offset: 0,
            }],
            entries: (0..n)
                .map(|i| IndexEntry {
                    seq: i as u64 + 1,
                    ts_ns: 5,
                    offset: 4096 * i as u64,
                    length: 4096,
                    payload_pos: 112,
                    kind: Kind::Write,
                    flags: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn index_roundtrip_and_corruption() {
        let idx = sample_index(10);
        let b = idx.encode();
        assert_eq!(SegmentIndex::decode("k", &b).unwrap(), idx);
        for i in [0, 9, 20, b.len() - 1] {
            let mut c = b.clone();
            c[i] ^= 0x40;
            assert!(SegmentIndex::decode("k", &c).is_err(), "flip at {i}");
        }
        assert!(SegmentIndex::decode("k", &b[..b.len() - 10]).is_err());
    }

    #[test]
    fn names_sort_in_replay_order() {
        let a = segment_key("u", "vda", 9, 12);
        let b = segment_key("u", "vda", 13, 100);
        assert!(a < b);
        assert_eq!(
            parse_journal_name(a.rsplit('/').next().unwrap()),
            Some((9, 12, false))
        );
        assert_eq!(
            parse_journal_name("00000000000000000009-00000000000000000012.idx"),
            Some((9, 12, true))
        );
        assert_eq!(parse_journal_name("9-12.idx"), None);
        assert_eq!(
            parse_baseline_name(baseline_key("u", "vda", 5, 3).rsplit('/').next().unwrap()),
            Some((5, 3))
        );
    }

    #[test]
    fn marker() {
        check_format_marker(&format_marker()).unwrap();
        assert!(check_format_marker(br#"{"format":"cdp","version":2}"#).is_err());
        assert!(check_format_marker(b"garbage").is_err());
    }

    #[test]
    fn chunk_roundtrip() {
        let data = vec![7u8; 100_000];
        let h = blake3::hash(&data).to_hex().to_string();
        let c = compress_chunk(&data).unwrap();
        assert_eq!(decompress_chunk(&h, &c, data.len()).unwrap(), data);
        let mut bad = c.clone();
        let n = bad.len();
        bad[n / 2] ^= 1;
        assert!(decompress_chunk(&h, &bad, data.len()).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        #[test]
        fn segment_frames_roundtrip(len in 0usize..(3 * FRAME_RAW), seed: u8) {
            let raw: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed) ^ (i >> 12) as u8).collect();
            let (obj, frames) = compress_segment(&raw).unwrap();
            prop_assert_eq!(frames.len(), len.div_ceil(FRAME_RAW));
            prop_assert_eq!(decompress_segment("k", &obj, frames.len()).unwrap(), raw.clone());
            // Each frame decompresses alone to its piece.
            for (i, f) in frames.iter().enumerate() {
                let end = frames.get(i + 1).map_or(obj.len(), |n| n.object_offset as usize);
                let piece = decompress_segment("k", &obj[f.object_offset as usize..end], 1).unwrap();
                let r0 = f.raw_offset as usize;
                prop_assert_eq!(&piece[..], &raw[r0..(r0 + FRAME_RAW).min(len)]);
            }
        }

        #[test]
        fn index_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = SegmentIndex::decode("k", &bytes);
            let mut b = IDX_MAGIC.to_vec();
            b.extend_from_slice(&bytes);
            let _ = SegmentIndex::decode("k", &b);
        }
    }
}
