//! Where the image takes writes in place: a write there allocates nothing,
//! so it cannot fail for want of space, and cdpd answers it once it is
//! journaled, before its image write (docs/DESIGN.md, "Write path", step 5).
//!
//! Per disk, under the disk lock ([`super::JournalState::inplace`]): a block
//! device everywhere; a regular file on ext2/3/4 ([`Overwrite::WhereAllocated`])
//! where one bit per granule (64 KiB; larger for disks over 4 TiB, so that
//! the map stays within 8 MiB) says every block of it is allocated: from the
//! image's data runs at start, then from each WRITE applied, for the
//! granules it covered whole. A ZERO or TRIM (which may punch holes) clears
//! every granule it touches. Anything else (read-only, btrfs, XFS, ...):
//! nowhere. The map errs only on the side of "not known": a granule partly
//! written after start stays unmarked until cdpd starts again.

use std::fs::File;

use cdp_core::image::{data_runs, overwrites, Overwrite};

/// The smallest granule: 64 KiB.
const MIN_GRANULE_SHIFT: u32 = 16;
/// The most granules a map holds (8 MiB of bits).
const MAX_GRANULES: u64 = 1 << 26;
/// The most data runs read at start (an image fragmented further is
/// mapped up to there: the rest counts as not allocated).
const MAX_RUNS: usize = 1 << 20;

pub struct InPlace {
    mode: Overwrite,
    size: u64,
    shift: u32,
    bits: Vec<u64>,
}

impl InPlace {
    /// The map of an image of `size` bytes (its data runs are read: at
    /// start, off the data path).
    pub fn open(file: &File, size: u64) -> InPlace {
        let mut m = InPlace::with(overwrites(file), size);
        if m.mode == Overwrite::WhereAllocated {
            data_runs(file, size, MAX_RUNS, |a, b| m.set_inside(a, b));
        }
        m
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
        }
    }

    /// A ZERO or TRIM of `len` bytes at `off`: every granule it touches may
    /// hold a hole now.
    pub fn punched(&mut self, off: u64, len: u64) {
        if self.mode == Overwrite::WhereAllocated && len > 0 {
            for g in self.granules(off, len) {
                self.bits[(g / 64) as usize] &= !(1 << (g % 64));
            }
        }
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
