//! Where the image takes writes in place: a write there allocates nothing,
//! so it cannot fail for want of space, and cdpd answers it once it is
//! journaled, before its image write (docs/DESIGN.md, "Write path", step 5).
//!
//! Per disk, under the disk lock ([`super::JournalState::inplace`]): a block
//! device everywhere; a regular file on ext2/3/4 ([`Overwrite::WhereAllocated`])
//! where one bit per granule (64 KiB; larger for disks over 4 TiB, so that
//! the map stays within 8 MiB) says every block of it is allocated: from the
//! image's allocated runs at start (written, preallocated or delayed
//! extents: [`allocated_runs`]), then from each WRITE applied, for the
//! granules it covered whole. A ZERO or TRIM (which may punch holes) clears
//! every granule it touches. Anything else (read-only, btrfs, XFS, ...):
//! nowhere. The map errs only on the side of "not known".
//!
//! A granule filled by writes smaller than it (4 KiB writes into a sparse
//! image) is found by a rescan of the image's allocated runs, made on the
//! sealer's pass (off the data path, without the disk lock) at most every
//! [`RESCAN_EVERY`] once such a write came, and merged only if no ZERO or
//! TRIM came meanwhile.

use std::fs::File;
use std::time::{Duration, Instant};

use cdp_core::image::{allocated_runs, Image, Overwrite};

/// The smallest granule: 64 KiB.
const MIN_GRANULE_SHIFT: u32 = 16;
/// The most granules a map holds (8 MiB of bits).
const MAX_GRANULES: u64 = 1 << 26;
/// The most extents read at start (an image fragmented further is
/// mapped up to there: the rest counts as not allocated).
const MAX_EXTENTS: usize = 1 << 20;
/// The most extents a rescan reads (256 per `ioctl`: a few ms).
const MAX_RESCAN_EXTENTS: usize = 1 << 16;
/// The least time between two rescans.
pub const RESCAN_EVERY: Duration = Duration::from_secs(60);

pub struct InPlace {
    mode: Overwrite,
    size: u64,
    shift: u32,
    bits: Vec<u64>,
    /// A WRITE touched a granule not known allocated without covering it
    /// whole since the last rescan began.
    partial: bool,
    /// ZERO and TRIM requests so far: a rescan counts only if none came
    /// while it ran.
    punches: u64,
    rescanned: Option<Instant>,
}

impl InPlace {
    /// The map of an image (its extents are read: at start, off the data
    /// path).
    pub fn open(image: &Image) -> InPlace {
        let mut m = InPlace::with(image.overwrites(), image.size);
        m.scan(&image.file, MAX_EXTENTS);
        m
    }

    fn scan(&mut self, file: &File, max_extents: usize) {
        if self.mode == Overwrite::WhereAllocated {
            allocated_runs(file, self.size, max_extents, |a, b| self.set_inside(a, b));
        }
    }

    fn with(mode: Overwrite, size: u64) -> InPlace {
        let mut shift = MIN_GRANULE_SHIFT;
        while size.div_ceil(1 << shift) > MAX_GRANULES {
            shift += 1;
        }
        let bits = match mode {
            Overwrite::WhereAllocated => vec![0; size.div_ceil(1 << shift).div_ceil(64) as usize],
            _ => Vec::new(),
        };
        InPlace {
            mode,
            size,
            shift,
            bits,
            partial: false,
            punches: 0,
            rescanned: None,
        }
    }

    /// Writes allocate nowhere (as on a block device): for tests.
    #[cfg(test)]
    pub fn always(size: u64) -> InPlace {
        InPlace::with(Overwrite::Always, size)
    }

    /// Does the image take writes in place anywhere (a block device, or a
    /// file on ext2/3/4 open for writing)?
    pub fn enabled(&self) -> bool {
        self.mode != Overwrite::Never
    }

    /// Can a write of `len` bytes at `off` allocate nothing?
    pub fn covers(&self, off: u64, len: u64) -> bool {
        match self.mode {
            Overwrite::Always => true,
            Overwrite::Never => false,
            Overwrite::WhereAllocated => len == 0 || self.granules(off, len).all(|g| self.get(g)),
        }
    }

    /// A WRITE of `len` bytes at `off` reached the image: every granule it
    /// covered whole is allocated now.
    pub fn written(&mut self, off: u64, len: u64) {
        if self.mode == Overwrite::WhereAllocated {
            self.set_inside(off, off.saturating_add(len));
            self.partial |= !self.covers(off, len);
        }
    }

    /// A ZERO or TRIM of `len` bytes at `off`: every granule it touches may
    /// hold a hole now.
    pub fn punched(&mut self, off: u64, len: u64) {
        if self.mode == Overwrite::WhereAllocated && len > 0 {
            self.punches += 1;
            for g in self.granules(off, len) {
                if let Some(w) = self.bits.get_mut((g / 64) as usize) {
                    *w &= !(1 << (g % 64));
                }
            }
        }
    }

    /// Is a rescan due (a partial write since the last one, which was at
    /// least [`RESCAN_EVERY`] ago)? Then the map to fill without the lock
    /// ([`InPlace::fill`]), then [`InPlace::merge`] under it.
    pub fn rescan_due(&mut self, now: Instant) -> Option<InPlace> {
        if !self.partial || self.rescanned.is_some_and(|t| now < t + RESCAN_EVERY) {
            return None;
        }
        self.partial = false;
        self.rescanned = Some(now);
        let mut m = InPlace::with(self.mode, self.size);
        m.punches = self.punches;
        Some(m)
    }

    /// Read the image's extents into a map from [`InPlace::rescan_due`].
    pub fn fill(&mut self, file: &File) {
        self.scan(file, MAX_RESCAN_EXTENTS);
    }

    /// Take what a rescan found, unless a ZERO or TRIM came since it began
    /// (it may have punched what the scan saw allocated). True if taken.
    pub fn merge(&mut self, found: InPlace) -> bool {
        if found.punches != self.punches || found.bits.len() != self.bits.len() {
            self.partial = true;
            return false;
        }
        for (w, f) in self.bits.iter_mut().zip(found.bits) {
            *w |= f;
        }
        true
    }

    /// The granules a range touches (within the disk).
    fn granules(&self, off: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        let last = off.saturating_add(len - 1).min(self.size.saturating_sub(1));
        (off >> self.shift)..=(last >> self.shift)
    }

    fn get(&self, g: u64) -> bool {
        self.bits
            .get((g / 64) as usize)
            .is_some_and(|w| w & (1 << (g % 64)) != 0)
    }

    /// Mark the granules wholly inside `[start, end)`: the disk's last
    /// granule ends at the disk's end.
    fn set_inside(&mut self, start: u64, end: u64) {
        let end = end.min(self.size);
        let first = start.div_ceil(1 << self.shift);
        let mut stop = end >> self.shift;
        if end == self.size && !end.is_multiple_of(1 << self.shift) && start <= stop << self.shift {
            stop += 1;
        }
        for g in first..stop {
            if let Some(w) = self.bits.get_mut((g / 64) as usize) {
                *w |= 1 << (g % 64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const G: u64 = 64 << 10;

    #[test]
    fn whole_granules_are_marked_and_punches_clear_what_they_touch() {
        // 10 granules and a half one at the end.
        let size = 10 * G + G / 2;
        let mut m = InPlace::with(Overwrite::WhereAllocated, size);
        assert!(!m.covers(0, 4096));
        m.written(G / 2, G); // covers no granule whole
        assert!(!m.covers(G / 2, 4096) && !m.covers(G, 4096));
        m.written(0, 3 * G);
        assert!(m.covers(0, 3 * G) && !m.covers(2 * G, G + 1));
        // The half granule at the end is whole when written to the end.
        m.written(10 * G, G / 2);
        assert!(m.covers(10 * G, G / 2));
        m.punched(G + 5, 1);
        assert!(m.covers(0, G) && !m.covers(G, 1) && m.covers(2 * G, G));
        assert!(m.covers(5, 0), "an empty write allocates nothing");
        assert!(InPlace::always(size).covers(0, size));
        assert!(!InPlace::with(Overwrite::Never, size).covers(0, 1));
    }

    /// A granule filled by small writes is found by a rescan, at most
    /// every RESCAN_EVERY; a punch while the rescan ran voids it.
    #[test]
    fn a_rescan_finds_granules_filled_by_small_writes() {
        use std::os::unix::fs::FileExt;
        let d = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(d.path().join("img"))
            .unwrap();
        f.set_len(4 * G).unwrap();
        let image = Image {
            file: f,
            size: 4 * G,
            block_device: false,
        };
        let f = &image.file;
        let mut m = InPlace::open(&image);
        assert_eq!(m.mode, Overwrite::WhereAllocated, "needs ext4");
        let t0 = Instant::now();
        assert!(m.rescan_due(t0).is_none(), "no partial write yet");
        for i in 0..16 {
            f.write_all_at(&[1; 4096], G + i * 4096).unwrap();
            m.written(G + i * 4096, 4096);
        }
        assert!(!m.covers(G, 4096), "no write covered the granule whole");
        let mut r = m.rescan_due(t0).expect("partial writes came");
        r.fill(f);
        assert!(m.merge(r));
        assert!(m.covers(G, G) && !m.covers(0, 1) && !m.covers(2 * G, 1));
        // Another partial write: not before RESCAN_EVERY.
        f.write_all_at(&[1; 4096], 2 * G).unwrap();
        m.written(2 * G, 4096);
        assert!(m.rescan_due(t0 + RESCAN_EVERY / 2).is_none());
        let mut r = m.rescan_due(t0 + RESCAN_EVERY).expect("due again");
        r.fill(f);
        m.punched(3 * G, 4096);
        assert!(!m.merge(r), "a punch while it ran");
        assert!(!m.covers(2 * G, 1));
        assert!(m.rescan_due(t0 + 2 * RESCAN_EVERY).is_some(), "tried again");
    }

    #[test]
    fn big_disks_get_bigger_granules() {
        let m = InPlace::with(Overwrite::WhereAllocated, 16 << 40);
        assert!(m.bits.len() as u64 * 64 <= MAX_GRANULES);
        assert_eq!(m.shift, 18);
    }

    proptest! {
        /// Whatever was written and punched, a range is covered only if
        /// every byte of it was written after the last punch touching it
        /// (the map never says "allocated" of a byte that may not be).
        #[test]
        fn covered_only_where_written_since_the_last_punch(
            ops in proptest::collection::vec((any::<bool>(), 0u64..40, 1u64..12), 1..40),
            probe in (0u64..40, 1u64..8),
        ) {
            let unit = G / 4;
            let size = 40 * unit;
            let mut m = InPlace::with(Overwrite::WhereAllocated, size);
            let mut allocated = [false; 40];
            for (write, at, n) in ops {
                let n = n.min(40 - at);
                if n == 0 {
                    continue;
                }
                if write {
                    m.written(at * unit, n * unit);
                    allocated[at as usize..(at + n) as usize].fill(true);
                } else {
                    m.punched(at * unit, n * unit);
                    allocated[at as usize..(at + n) as usize].fill(false);
                }
            }
            let (at, n) = (probe.0, probe.1.min(40 - probe.0));
            if n > 0 && m.covers(at * unit, n * unit) {
                prop_assert!(allocated[at as usize..(at + n) as usize].iter().all(|&a| a));
            }
        }
    }
}
