//! The dirty map of a disk (`<state>/vms/<uuid>/<disk>/dirty.map`): the
//! ranges whose writes reached the image but not the journal, while cdpd
//! ran degraded (docs/DESIGN.md, "Write path"; docs/RELIABILITY.md, "A full
//! journal").
//!
//! Layout: a 64-byte header, then one bit per [`GRANULE`] bytes of the disk
//! (bit `i % 8` of byte `i / 8` stands for granule `i`).
//!
//! | at | size | field                                                    |
//! |----|------|----------------------------------------------------------|
//! | 0  | 8    | magic `CDPDIRTY` (`CDPACTLG`: an activity log)           |
//! | 8  | 4    | version (1)                                              |
//! | 12 | 4    | log2 of the granule (16: 64 KiB; activity log 22: 4 MiB) |
//! | 16 | 8    | disk size in bytes                                       |
//! | 24 | 8    | `since_ns`: when the first unjournaled write was taken   |
//! | 32 | 8    | `gap_seq`: seq of the GAP journaled for it, or 0         |
//! | 40 | 4    | CRC-32 of the bitmap                                     |
//! | 44 | 8    | activity log: `synced_seq`, every record of the disk's   |
//! |    |      | journal up to it is durable in the image (0: unknown)    |
//! | 52 | 8    | zero                                                     |
//! | 60 | 4    | CRC-32 of bytes 0..60                                    |
//!
//! Integers are little-endian. The file is preallocated to its full length
//! when opened, so setting a bit on a full filesystem needs no new block.
//! A map whose CRCs, magic, version, granule or disk size do not check out
//! is never trusted ([`MapError::Corrupt`]): the caller falls back to an
//! unbounded GAP (a new baseline).
//!
//! The same file format, with its own magic and a 4 MiB granule
//! ([`MapKind::Activity`]), is a disk's activity log
//! (`<state>/vms/<uuid>/<disk>/activity.log`): the extents that may hold
//! writes not yet durable, resynced after a power loss (docs/RELIABILITY.md,
//! "A power loss").

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

pub const MAGIC: &[u8; 8] = b"CDPDIRTY";
/// The activity log's magic.
pub const ACTIVITY_MAGIC: &[u8; 8] = b"CDPACTLG";
/// log2 of an activity log's extent (4 MiB: DRBD's activity-log extent;
/// a 256 GiB disk's log is 8 KiB, and a cold extent costs one log sync per
/// 4 MiB of newly written disk).
pub const ACTIVITY_SHIFT: u32 = 22;
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 64;
/// log2 of [`GRANULE`].
pub const GRANULE_SHIFT: u32 = 16;
/// Bytes of disk per bit.
pub const GRANULE: u64 = 1 << GRANULE_SHIFT;

/// What a map file is: a dirty map or an activity log (same format, own
/// magic and granule).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    Dirty,
    Activity,
}

impl MapKind {
    pub fn magic(self) -> &'static [u8; 8] {
        match self {
            MapKind::Dirty => MAGIC,
            MapKind::Activity => ACTIVITY_MAGIC,
        }
    }

    /// log2 of the bytes of disk per bit.
    pub fn shift(self) -> u32 {
        match self {
            MapKind::Dirty => GRANULE_SHIFT,
            MapKind::Activity => ACTIVITY_SHIFT,
        }
    }
}

#[derive(Debug, Error)]
pub enum MapError {
    #[error("dirty map {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("dirty map {path} is not usable: {why}")]
    Corrupt { path: PathBuf, why: String },
}

/// The header's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: MapKind,
    pub disk_size: u64,
    pub since_ns: u64,
    pub gap_seq: u64,
    pub bitmap_crc: u32,
    /// An activity log's checkpoint: every record of the disk's journal
    /// with a seq up to this one is durable in the image (0: none known;
    /// zero in a dirty map, and in files of versions before it was kept).
    pub synced_seq: u64,
}

/// The largest bitmap read from a map made for another disk size (to see
/// whether it tracks anything): 16 MiB, a 8 PiB disk's dirty map.
const MAX_OTHER_SIZE_BITMAP: usize = 16 << 20;

/// Bytes of a dirty map's bitmap for a disk of `disk_size` bytes.
pub fn bitmap_len(disk_size: u64) -> usize {
    bitmap_len_of(MapKind::Dirty, disk_size)
}

/// Bytes of bitmap of a `kind` map for a disk of `disk_size` bytes.
pub fn bitmap_len_of(kind: MapKind, disk_size: u64) -> usize {
    disk_size.div_ceil(1 << kind.shift()).div_ceil(8) as usize
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap())
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(self.kind.magic());
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.kind.shift().to_le_bytes());
        b[16..24].copy_from_slice(&self.disk_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.since_ns.to_le_bytes());
        b[32..40].copy_from_slice(&self.gap_seq.to_le_bytes());
        b[40..44].copy_from_slice(&self.bitmap_crc.to_le_bytes());
        b[44..52].copy_from_slice(&self.synced_seq.to_le_bytes());
        let crc = crc32fast::hash(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// The header of a `kind` map, or why it is not one.
    pub fn decode(kind: MapKind, b: &[u8]) -> Result<Header, String> {
        if b.len() < HEADER_LEN {
            return Err(format!("{} bytes, shorter than a header", b.len()));
        }
        if &b[0..8] != kind.magic() {
            return Err("bad magic".into());
        }
        if le32(&b[60..64]) != crc32fast::hash(&b[0..60]) {
            return Err("header CRC mismatch".into());
        }
        let (version, shift) = (le32(&b[8..12]), le32(&b[12..16]));
        if version != VERSION || shift != kind.shift() {
            return Err(format!("version {version}, granule shift {shift}: unknown"));
        }
        Ok(Header {
            kind,
            disk_size: le64(&b[16..24]),
            since_ns: le64(&b[24..32]),
            gap_seq: le64(&b[32..40]),
            bitmap_crc: le32(&b[40..44]),
            synced_seq: le64(&b[44..52]),
        })
    }
}

/// What [`DirtyMap::open`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// No map, or an empty one: nothing to resync.
    Clean,
    /// Bits set by an earlier run: their ranges must be resynced.
    Dirty,
    /// A map that cannot be trusted (it was replaced by an empty one): what
    /// it tracked is unknown.
    Corrupt(String),
}

/// A disk's dirty map: the bitmap in memory, every change written through
/// to the file (made durable by [`DirtyMap::sync`]).
pub struct DirtyMap {
    pub file: Arc<File>,
    pub path: PathBuf,
    header: Header,
    bits: Vec<u8>,
    /// Granules set.
    count: u64,
    /// Bits were marked since the header (its bitmap CRC) was written.
    stale: bool,
}

impl DirtyMap {
    /// Open (or create) the map of a disk of `disk_size` bytes, preallocated
    /// to its full length. A map that does not check out is reported as
    /// [`Found::Corrupt`] and replaced by an empty one.
    pub fn open(path: &Path, disk_size: u64) -> Result<(DirtyMap, Found), MapError> {
        DirtyMap::open_kind(path, MapKind::Dirty, disk_size)
    }

    /// [`DirtyMap::open`] for a map of `kind` (a dirty map or an activity
    /// log).
    pub fn open_kind(
        path: &Path,
        kind: MapKind,
        disk_size: u64,
    ) -> Result<(DirtyMap, Found), MapError> {
        let ioe = |source| MapError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(ioe)?;
        let len = file.metadata().map_err(ioe)?.len();
        let mut map = DirtyMap::empty(file, path, kind, disk_size);
        let found = if len == 0 {
            Found::Clean
        } else {
            match map.load(len) {
                Ok(()) if map.count == 0 => Found::Clean,
                Ok(()) => Found::Dirty,
                Err(why) => {
                    map.bits.fill(0);
                    map.count = 0;
                    map.header.since_ns = 0;
                    map.header.gap_seq = 0;
                    map.header.synced_seq = 0;
                    map.header.bitmap_crc = crc32fast::hash(&map.bits);
                    Found::Corrupt(why)
                }
            }
        };
        if found != Found::Dirty {
            map.file
                .set_len((HEADER_LEN + map.bits.len()) as u64)
                .map_err(ioe)?;
            map.write_all().map_err(ioe)?;
        }
        map.preallocate().map_err(ioe)?;
        Ok((map, found))
    }

    fn empty(file: File, path: &Path, kind: MapKind, disk_size: u64) -> DirtyMap {
        let bits = vec![0u8; bitmap_len_of(kind, disk_size)];
        DirtyMap {
            file: Arc::new(file),
            path: path.to_path_buf(),
            header: Header {
                kind,
                disk_size,
                since_ns: 0,
                gap_seq: 0,
                bitmap_crc: crc32fast::hash(&bits),
                synced_seq: 0,
            },
            bits,
            count: 0,
            stale: false,
        }
    }

    /// Read a `kind` map without changing it (recovery, before the capture
    /// opens it): None when there is no file, `Err(why)` when it does not
    /// check out. The map returned is never written to.
    pub fn read_only(
        path: &Path,
        kind: MapKind,
        disk_size: u64,
    ) -> Result<Option<DirtyMap>, String> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("opening: {e}")),
        };
        let len = file.metadata().map_err(|e| format!("reading: {e}"))?.len();
        let mut map = DirtyMap::empty(file, path, kind, disk_size);
        map.load(len)?;
        Ok(Some(map))
    }

    /// The checkpoint ([`Header::synced_seq`]) of the activity log at
    /// `path`, read from its header alone (recovery, before the capture
    /// opens the log; the bitmap may be torn, the header checks on its
    /// own). None: no file, a header that does not check out, or none
    /// recorded.
    pub fn read_synced_seq(path: &Path) -> Option<u64> {
        let mut head = [0u8; HEADER_LEN];
        File::open(path).ok()?.read_exact_at(&mut head, 0).ok()?;
        let h = Header::decode(MapKind::Activity, &head).ok()?;
        (h.synced_seq > 0).then_some(h.synced_seq)
    }

    /// Record `seq` as the checkpoint in the header of the activity log at
    /// `path`, its bitmap left alone, and sync it (recovery, once the
    /// journal is redone onto the synced image). Ok(false): a header that
    /// does not check out, left as it is (it is never trusted).
    pub fn write_synced_seq(path: &Path, seq: u64) -> io::Result<bool> {
        let f = OpenOptions::new().read(true).write(true).open(path)?;
        let mut head = [0u8; HEADER_LEN];
        f.read_exact_at(&mut head, 0)?;
        let Ok(mut h) = Header::decode(MapKind::Activity, &head) else {
            return Ok(false);
        };
        h.synced_seq = seq;
        f.write_all_at(&h.encode(), 0)?;
        f.sync_data()?;
        Ok(true)
    }

    /// Read and check the file into `self` (whose size is the disk's).
    fn load(&mut self, len: u64) -> Result<(), String> {
        let mut head = [0u8; HEADER_LEN];
        if len < HEADER_LEN as u64 {
            return Err("shorter than its header".into());
        }
        self.file
            .read_exact_at(&mut head, 0)
            .map_err(|e| format!("reading: {e}"))?;
        let h = Header::decode(self.header.kind, &head)?;
        let resized = h.disk_size != self.header.disk_size;
        let want = bitmap_len_of(self.header.kind, h.disk_size) as u64;
        // Another size is read only to tell a clean map from one that
        // tracks ranges, and only within what the file holds (its header
        // is the VM user's to write: never an allocation it chooses).
        if (resized && want > self.bits.len().max(MAX_OTHER_SIZE_BITMAP) as u64)
            || len < HEADER_LEN as u64 + want
        {
            return Err(if resized {
                format!(
                    "made for a disk of {} bytes, the disk has {}",
                    h.disk_size, self.header.disk_size
                )
            } else {
                "shorter than its bitmap".into()
            });
        }
        let mut bits = vec![0u8; want as usize];
        self.file
            .read_exact_at(&mut bits, HEADER_LEN as u64)
            .map_err(|e| format!("reading: {e}"))?;
        if crc32fast::hash(&bits) != h.bitmap_crc {
            return Err("bitmap CRC mismatch".into());
        }
        if resized {
            // The disk was resized while nothing ran: a map that tracks
            // nothing is simply made again for the new size; one that
            // tracks ranges is not trusted.
            if bits.iter().all(|&b| b == 0) {
                return Ok(());
            }
            return Err(format!(
                "made for a disk of {} bytes, the disk has {}",
                h.disk_size, self.header.disk_size
            ));
        }
        self.bits.copy_from_slice(&bits);
        self.count = self.bits.iter().map(|b| b.count_ones() as u64).sum();
        self.header = h;
        Ok(())
    }

    fn preallocate(&self) -> io::Result<()> {
        let len = (HEADER_LEN + self.bits.len()) as i64;
        match nix::fcntl::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&*self.file),
            nix::fcntl::FallocateFlags::empty(),
            0,
            len,
        ) {
            Ok(()) => Ok(()),
            // Written in full by write_all already; a filesystem without
            // fallocate keeps those blocks.
            Err(nix::errno::Errno::EOPNOTSUPP) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn write_all(&mut self) -> io::Result<()> {
        self.header.bitmap_crc = crc32fast::hash(&self.bits);
        self.file.write_all_at(&self.bits, HEADER_LEN as u64)?;
        self.file.write_all_at(&self.header.encode(), 0)
    }

    fn write_header(&mut self) -> io::Result<()> {
        self.header.bitmap_crc = crc32fast::hash(&self.bits);
        self.file.write_all_at(&self.header.encode(), 0)?;
        self.stale = false;
        Ok(())
    }

    pub fn header(&self) -> Header {
        self.header
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of disk marked dirty (whole granules; the last one clipped to
    /// the disk's size).
    pub fn dirty_bytes(&self) -> u64 {
        let granule = self.granule();
        let mut b = self.count * granule;
        let last = self.header.disk_size.div_ceil(granule);
        if last > 0 && self.bit(last - 1) {
            b -= last * granule - self.header.disk_size;
        }
        b
    }

    /// Bytes of disk per bit.
    pub fn granule(&self) -> u64 {
        1 << self.header.kind.shift()
    }

    /// Granules set.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Is granule `g` set? (A bit test: the activity log's check of a hot
    /// extent.)
    #[inline]
    pub fn bit(&self, g: u64) -> bool {
        self.bits[(g / 8) as usize] & (1 << (g % 8)) != 0
    }

    /// Does `[offset, offset + length)` touch a set granule?
    pub fn intersects(&self, offset: u64, length: u64) -> bool {
        let (g0, g1) = self.granules(offset, length);
        self.count > 0 && (g0..g1).any(|g| self.bit(g))
    }

    /// Granules [first, end) of a byte range, clipped to the disk.
    pub fn granules(&self, offset: u64, length: u64) -> (u64, u64) {
        let end = offset.saturating_add(length).min(self.header.disk_size);
        if length == 0 || offset >= end {
            return (0, 0);
        }
        let shift = self.header.kind.shift();
        (offset >> shift, end.div_ceil(1 << shift))
    }

    /// Make the map hold exactly the granules `set` (every other bit
    /// cleared) and write it whole; not synced.
    pub fn replace(&mut self, set: impl IntoIterator<Item = u64>) -> io::Result<()> {
        self.bits.fill(0);
        self.count = 0;
        for g in set {
            if !self.bit(g) {
                self.bits[(g / 8) as usize] |= 1 << (g % 8);
                self.count += 1;
            }
        }
        self.write_all()?;
        self.stale = false;
        Ok(())
    }

    /// Mark `[offset, offset + length)` dirty; writes the changed bytes and
    /// the header when a bit changed. Returns whether one did.
    pub fn set(&mut self, offset: u64, length: u64) -> io::Result<bool> {
        let changed = self.mark(offset, length)?;
        self.commit()?;
        Ok(changed)
    }

    /// [`DirtyMap::set`] without the header: the bitmap's CRC is written by
    /// the next [`DirtyMap::commit`] (once per batch of ranges, not per
    /// range: the CRC covers the whole bitmap).
    pub fn mark(&mut self, offset: u64, length: u64) -> io::Result<bool> {
        let (g0, g1) = self.granules(offset, length);
        let changed = self.flip(g0, g1, true)?;
        self.stale |= changed;
        Ok(changed)
    }

    /// Write the header if ranges were marked since it was last written.
    pub fn commit(&mut self) -> io::Result<()> {
        if self.stale {
            self.write_header()?;
        }
        Ok(())
    }

    /// Mark whole granules of `[offset, offset + length)` clean (a range
    /// resynced: callers give granule-aligned ranges).
    pub fn clear(&mut self, offset: u64, length: u64) -> io::Result<bool> {
        let (g0, g1) = self.granules(offset, length);
        self.change(g0, g1, false)
    }

    fn change(&mut self, g0: u64, g1: u64, on: bool) -> io::Result<bool> {
        let changed = self.flip(g0, g1, on)?;
        if changed || self.stale {
            self.write_header()?;
        }
        Ok(changed)
    }

    /// Set or clear granules [g0, g1) and write the bitmap bytes that
    /// changed (not the header).
    fn flip(&mut self, g0: u64, g1: u64, on: bool) -> io::Result<bool> {
        if g0 >= g1 {
            return Ok(false);
        }
        let mut changed = false;
        for g in g0..g1 {
            if self.bit(g) != on {
                self.bits[(g / 8) as usize] ^= 1 << (g % 8);
                changed = true;
                if on {
                    self.count += 1;
                } else {
                    self.count -= 1;
                }
            }
        }
        if changed {
            let (b0, b1) = ((g0 / 8) as usize, (g1 - 1) as usize / 8 + 1);
            self.file
                .write_all_at(&self.bits[b0..b1], (HEADER_LEN + b0) as u64)?;
        }
        Ok(changed)
    }

    /// The first dirty run at or after byte `from`, at most `max` bytes
    /// (granule-aligned start, clipped to the disk), as (offset, length).
    pub fn next_dirty(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        if self.count == 0 {
            return None;
        }
        let granule = self.granule();
        let total = self.header.disk_size.div_ceil(granule);
        let mut g = from / granule;
        // Skip clean bytes whole.
        while g < total {
            if g.is_multiple_of(8) && self.bits[(g / 8) as usize] == 0 {
                g += 8;
                continue;
            }
            if self.bit(g) {
                break;
            }
            g += 1;
        }
        if g >= total {
            return None;
        }
        let start = g * granule;
        let mut end = g + 1;
        while end < total && self.bit(end) && (end - g + 1) * granule <= max.max(granule) {
            end += 1;
        }
        let stop = (end * granule).min(self.header.disk_size);
        Some((start, stop - start))
    }

    /// Record when the first unjournaled write was taken (kept if set).
    pub fn set_since(&mut self, ns: u64) -> io::Result<()> {
        if self.header.since_ns == 0 {
            self.header.since_ns = ns;
            self.write_header()?;
        }
        Ok(())
    }

    /// Record the seq of the GAP journaled for the window (kept if set: a
    /// RESYNCED heals from the first GAP on).
    pub fn set_gap_seq(&mut self, seq: u64) -> io::Result<()> {
        if self.header.gap_seq == 0 {
            self.header.gap_seq = seq;
            self.write_header()?;
        }
        Ok(())
    }

    /// Record the checkpoint ([`Header::synced_seq`]); durable with the
    /// next [`DirtyMap::sync`].
    pub fn set_synced_seq(&mut self, seq: u64) -> io::Result<()> {
        if self.header.synced_seq != seq {
            self.header.synced_seq = seq;
            self.write_header()?;
        }
        Ok(())
    }

    /// Every bit clear, no window (the checkpoint is kept): written and
    /// made durable.
    pub fn reset(&mut self) -> io::Result<()> {
        self.bits.fill(0);
        self.count = 0;
        self.header.since_ns = 0;
        self.header.gap_seq = 0;
        self.write_all()?;
        self.sync()
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn tmp() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dirty.map");
        (d, p)
    }

    #[test]
    fn header_round_trips_and_its_crc_is_checked() {
        let h = Header {
            kind: MapKind::Dirty,
            disk_size: 10 * MIB,
            since_ns: 7,
            gap_seq: 9,
            bitmap_crc: 0xdead,
            synced_seq: 11,
        };
        let mut b = h.encode();
        assert_eq!(Header::decode(MapKind::Dirty, &b).unwrap(), h);
        assert!(
            Header::decode(MapKind::Activity, &b)
                .unwrap_err()
                .contains("magic"),
            "a dirty map is not an activity log"
        );
        b[30] ^= 1;
        assert!(Header::decode(MapKind::Dirty, &b)
            .unwrap_err()
            .contains("CRC"));
        assert!(Header::decode(MapKind::Dirty, &b[..10]).is_err());
    }

    #[test]
    fn bits_are_set_cleared_persisted_and_preallocated() {
        let (_d, p) = tmp();
        let size = 10 * MIB + 5;
        let (mut m, found) = DirtyMap::open(&p, size).unwrap();
        assert_eq!(found, Found::Clean);
        assert_eq!(
            std::fs::metadata(&p).unwrap().len(),
            (HEADER_LEN + bitmap_len(size)) as u64,
            "preallocated to its full length"
        );
        assert!(m.mark(100, 1).unwrap());
        m.commit().unwrap();
        assert!(!m.set(0, 10).unwrap(), "same granule: no change");
        assert!(m.set(3 * MIB, MIB + 1).unwrap());
        assert!(!m.set(0, 0).unwrap());
        assert!(m.set(size - 1, 100).unwrap(), "clipped to the disk");
        assert_eq!(m.dirty_bytes(), GRANULE + MIB + GRANULE + 5);
        m.set_since(42).unwrap();
        m.set_since(43).unwrap();
        m.set_gap_seq(0x77).unwrap();
        assert_eq!(m.next_dirty(0, MIB), Some((0, GRANULE)));
        assert_eq!(m.next_dirty(GRANULE, MIB), Some((3 * MIB, MIB)));
        assert_eq!(m.next_dirty(4 * MIB, MIB), Some((4 * MIB, GRANULE)));
        assert_eq!(m.next_dirty(4 * MIB + GRANULE, MIB), Some((10 * MIB, 5)));
        drop(m);

        let (mut m, found) = DirtyMap::open(&p, size).unwrap();
        assert_eq!(found, Found::Dirty);
        let h = m.header();
        assert_eq!((h.since_ns, h.gap_seq), (42, 0x77));
        assert!(m.clear(0, GRANULE).unwrap());
        assert!(m.clear(3 * MIB, MIB + GRANULE).unwrap());
        assert_eq!(m.next_dirty(0, MIB), Some((10 * MIB, 5)));
        assert!(m.clear(10 * MIB, GRANULE).unwrap());
        assert!(m.is_empty() && m.next_dirty(0, MIB).is_none());
        m.set(MIB, 1).unwrap();
        m.reset().unwrap();
        drop(m);
        let (m, found) = DirtyMap::open(&p, size).unwrap();
        assert_eq!(found, Found::Clean);
        assert_eq!((m.header().since_ns, m.dirty_bytes()), (0, 0));
    }

    #[test]
    fn a_corrupt_map_is_refused_and_replaced() {
        let (_d, p) = tmp();
        let (mut m, _) = DirtyMap::open(&p, 4 * MIB).unwrap();
        m.set(MIB, 1).unwrap();
        drop(m);
        // One bit of the bitmap flipped behind its CRC's back.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0x80], HEADER_LEN as u64).unwrap();
        let (m, found) = DirtyMap::open(&p, 4 * MIB).unwrap();
        assert!(
            matches!(&found, Found::Corrupt(w) if w.contains("bitmap CRC")),
            "{found:?}"
        );
        assert!(m.is_empty());
        // Replaced by a clean map that checks out.
        assert_eq!(DirtyMap::open(&p, 4 * MIB).unwrap().1, Found::Clean);

        // A map made for another disk size that tracks ranges is not
        // trusted either; a clean one is made again for the new size (a
        // resize while nothing ran).
        let (mut m, _) = DirtyMap::open(&p, 4 * MIB).unwrap();
        m.set(0, 1).unwrap();
        drop(m);
        let (_, found) = DirtyMap::open(&p, 8 * MIB).unwrap();
        assert!(matches!(&found, Found::Corrupt(w) if w.contains("disk of")));
        let (m, found) = DirtyMap::open(&p, 8 * MIB).unwrap();
        assert_eq!((found, m.count()), (Found::Clean, 0));
        drop(m);
        let (m, found) = DirtyMap::open(&p, 2 * MIB).unwrap();
        assert_eq!((found, m.header().disk_size), (Found::Clean, 2 * MIB));
        drop(m);
        assert_eq!(
            std::fs::metadata(&p).unwrap().len(),
            (HEADER_LEN + bitmap_len(2 * MIB)) as u64,
            "made again at the new size"
        );

        // Garbage.
        std::fs::write(&p, b"not a map at all").unwrap();
        let (_, found) = DirtyMap::open(&p, 4 * MIB).unwrap();
        assert!(matches!(found, Found::Corrupt(_)), "{found:?}");
    }

    #[test]
    fn an_activity_log_has_4_mib_extents_and_is_read_without_change() {
        let (_d, p) = tmp();
        let size = 64 * MIB + 1;
        assert!(
            DirtyMap::read_only(&p, MapKind::Activity, size)
                .unwrap()
                .is_none(),
            "no file"
        );
        let (mut m, found) = DirtyMap::open_kind(&p, MapKind::Activity, size).unwrap();
        assert_eq!(found, Found::Clean);
        assert_eq!(m.granule(), 4 * MIB);
        assert_eq!(m.granules(4 * MIB - 1, 2), (0, 2));
        m.set(5 * MIB, 1).unwrap();
        m.set(64 * MIB, 1).unwrap();
        assert!(m.bit(1) && !m.bit(0) && m.bit(16));
        assert_eq!(m.dirty_bytes(), 4 * MIB + 1, "the last extent clipped");
        assert!(m.intersects(8 * MIB - 1, 1) && !m.intersects(8 * MIB, 4 * MIB));
        drop(m);
        // A dirty map's code reads it only as what it is.
        assert!(matches!(
            DirtyMap::read_only(&p, MapKind::Dirty, size),
            Err(w) if w.contains("magic")
        ));
        let before = std::fs::read(&p).unwrap();
        let r = DirtyMap::read_only(&p, MapKind::Activity, size)
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.count(), r.next_dirty(0, MIB)),
            (2, Some((4 * MIB, 4 * MIB)))
        );
        assert_eq!(std::fs::read(&p).unwrap(), before, "read-only");
        // Replaced by exactly a set of extents.
        let (mut m, found) = DirtyMap::open_kind(&p, MapKind::Activity, size).unwrap();
        assert_eq!(found, Found::Dirty);
        m.replace([3, 3, 7]).unwrap();
        drop(m);
        let r = DirtyMap::read_only(&p, MapKind::Activity, size)
            .unwrap()
            .unwrap();
        assert!(r.count() == 2 && r.bit(3) && r.bit(7) && !r.bit(1));
        // A corrupt log is refused, never changed by a read.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xff], HEADER_LEN as u64).unwrap();
        assert!(DirtyMap::read_only(&p, MapKind::Activity, size)
            .err()
            .unwrap()
            .contains("CRC"));
    }

    /// An activity log's checkpoint survives a reopen, a reset and a torn
    /// bitmap (its header checks on its own), and is lost with a header
    /// that does not check out or a log found corrupt.
    #[test]
    fn the_checkpoint_is_kept_in_the_activity_logs_header() {
        let (_d, p) = tmp();
        assert_eq!(DirtyMap::read_synced_seq(&p), None, "no file");
        let (mut m, _) = DirtyMap::open_kind(&p, MapKind::Activity, 64 * MIB).unwrap();
        assert_eq!(DirtyMap::read_synced_seq(&p), None, "none recorded");
        m.set(5 * MIB, 1).unwrap();
        m.set_synced_seq(42).unwrap();
        m.sync().unwrap();
        assert_eq!(DirtyMap::read_synced_seq(&p), Some(42));
        drop(m);
        let (mut m, found) = DirtyMap::open_kind(&p, MapKind::Activity, 64 * MIB).unwrap();
        assert_eq!((found, m.header().synced_seq), (Found::Dirty, 42));
        m.reset().unwrap();
        assert_eq!(DirtyMap::read_synced_seq(&p), Some(42), "kept by a reset");
        drop(m);
        let (m, found) = DirtyMap::open_kind(&p, MapKind::Activity, 64 * MIB).unwrap();
        assert_eq!((found, m.header().synced_seq), (Found::Clean, 42));
        drop(m);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xff], HEADER_LEN as u64).unwrap();
        assert_eq!(DirtyMap::read_synced_seq(&p), Some(42), "a torn bitmap");
        assert!(DirtyMap::write_synced_seq(&p, 43).unwrap());
        assert_eq!(DirtyMap::read_synced_seq(&p), Some(43), "the header alone");
        let (m, found) = DirtyMap::open_kind(&p, MapKind::Activity, 64 * MIB).unwrap();
        assert!(matches!(found, Found::Corrupt(_)));
        assert_eq!(m.header().synced_seq, 0, "not trusted once the log is not");
        drop(m);
        f.write_all_at(&[0xff], 45).unwrap();
        assert_eq!(DirtyMap::read_synced_seq(&p), None, "a bad header");
        assert!(!DirtyMap::write_synced_seq(&p, 44).unwrap(), "left alone");
        assert_eq!(DirtyMap::read_synced_seq(&p), None);
    }
}
