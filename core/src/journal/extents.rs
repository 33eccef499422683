//! The extent map of a restore: for every byte range of a disk, which record
//! wrote it last up to a point. Built from segment indexes alone (no payload
//! is read), so its cost grows with the number of records, and the bytes a
//! restore reads grow only with the set of ranges touched.

use std::collections::BTreeMap;

/// Where the bytes of an extent come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Zeros (ZERO or TRIM).
    Zero,
    /// A WRITE's payload: segment number (caller's), and the payload
    /// position in the raw segment of the extent's first byte.
    Journal { segment: u32, pos: u64 },
}

/// Non-overlapping extents: start → (end, source).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtentMap {
    map: BTreeMap<u64, (u64, Source)>,
}

impl ExtentMap {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Record that [start, end) now comes from `src`, replacing whatever
    /// covered it (later records win).
    pub fn set(&mut self, start: u64, end: u64, src: Source) {
        if start >= end {
            return;
        }
        // Split an extent that begins before `start` and reaches into it.
        if let Some((&s, &(e, old))) = self.map.range(..start).next_back() {
            if e > start {
                self.map.insert(s, (start, old));
                if e > end {
                    self.map.insert(end, (e, shift(old, end - s)));
                }
            }
        }
        // Remove or trim extents that begin inside [start, end).
        let inside: Vec<u64> = self.map.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            let (e, old) = self.map.remove(&s).unwrap();
            if e > end {
                self.map.insert(end, (e, shift(old, end - s)));
            }
        }
        self.map.insert(start, (end, src));
    }

    /// Drop everything at or beyond `size` (a disk shrunk to it).
    pub fn truncate(&mut self, size: u64) {
        let beyond: Vec<u64> = self.map.range(size..).map(|(&s, _)| s).collect();
        for s in beyond {
            self.map.remove(&s);
        }
        if let Some((_, (e, _))) = self.map.range_mut(..size).next_back() {
            *e = (*e).min(size);
        }
    }

    /// Extents in disk order: (start, end, source).
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, Source)> + '_ {
        self.map.iter().map(|(&s, &(e, src))| (s, e, src))
    }

    /// The extents overlapping [start, end), clipped to it, in order.
    pub fn overlapping(&self, start: u64, end: u64) -> Vec<(u64, u64, Source)> {
        let mut out = Vec::new();
        if let Some((&s, &(e, src))) = self.map.range(..start).next_back() {
            if e > start {
                out.push((start, e.min(end), shift(src, start - s)));
            }
        }
        for (&s, &(e, src)) in self.map.range(start..end) {
            out.push((s, e.min(end), src));
        }
        out
    }

    /// The parts of [start, end) no extent covers, in order.
    pub fn uncovered(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = start;
        for (s, e, _) in self.overlapping(start, end) {
            if s > at {
                out.push((at, s));
            }
            at = e;
        }
        if at < end {
            out.push((at, end));
        }
        out
    }

    /// Total bytes covered.
    pub fn covered(&self) -> u64 {
        self.map.iter().map(|(s, (e, _))| e - s).sum()
    }
}

fn shift(src: Source, by: u64) -> Source {
    match src {
        Source::Zero => Source::Zero,
        Source::Journal { segment, pos } => Source::Journal {
            segment,
            pos: pos + by,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Apply writes to a byte array naively and through the extent map;
    /// both must give the same bytes.
    fn check(ops: &[(u64, u64, bool)], size: u64) {
        let mut naive = vec![0xffu8; size as usize];
        let mut m = ExtentMap::new();
        // Payload of op i at byte j is (i * 31 + j) as u8; "pos" encodes (i, j0).
        for (i, &(off, len, zero)) in ops.iter().enumerate() {
            let end = (off + len).min(size);
            for b in off..end {
                naive[b as usize] = if zero {
                    0
                } else {
                    (i as u64 * 31 + (b - off)) as u8
                };
            }
            let src = if zero {
                Source::Zero
            } else {
                Source::Journal {
                    segment: i as u32,
                    pos: 0,
                }
            };
            m.set(off, end, src);
        }
        let mut rebuilt = vec![0xffu8; size as usize];
        let mut last_end = 0;
        for (s, e, src) in m.iter() {
            assert!(s >= last_end, "overlap");
            last_end = e;
            for b in s..e {
                rebuilt[b as usize] = match src {
                    Source::Zero => 0,
                    Source::Journal { segment, pos } => {
                        let (off, _, _) = ops[segment as usize];
                        let j = pos + (b - s);
                        assert_eq!(off + j, b, "position drifted");
                        (segment as u64 * 31 + j) as u8
                    }
                };
            }
        }
        assert_eq!(naive, rebuilt);
    }

    #[test]
    fn overlapping_and_uncovered() {
        let mut m = ExtentMap::new();
        m.set(
            10,
            20,
            Source::Journal {
                segment: 0,
                pos: 100,
            },
        );
        m.set(30, 40, Source::Zero);
        assert_eq!(
            m.overlapping(15, 35),
            vec![
                (
                    15,
                    20,
                    Source::Journal {
                        segment: 0,
                        pos: 105
                    }
                ),
                (30, 35, Source::Zero)
            ]
        );
        assert_eq!(m.uncovered(0, 50), vec![(0, 10), (20, 30), (40, 50)]);
        assert_eq!(m.uncovered(12, 18), vec![]);
        assert_eq!(m.uncovered(20, 30), vec![(20, 30)]);
    }

    #[test]
    fn truncate_drops_and_cuts_what_lies_beyond() {
        let mut m = ExtentMap::new();
        m.set(0, 10, Source::Zero);
        m.set(10, 20, Source::Journal { segment: 1, pos: 7 });
        m.set(25, 30, Source::Zero);
        m.truncate(15);
        assert_eq!(
            m.iter().collect::<Vec<_>>(),
            vec![
                (0, 10, Source::Zero),
                (10, 15, Source::Journal { segment: 1, pos: 7 })
            ]
        );
        m.truncate(10);
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![(0, 10, Source::Zero)]);
        m.truncate(0);
        assert!(m.is_empty());
    }

    #[test]
    fn cases() {
        check(&[(0, 10, false), (5, 10, false), (2, 3, true)], 32);
        check(&[(10, 10, false), (0, 32, false)], 32);
        check(&[(0, 32, false), (10, 2, false), (11, 1, true)], 32);
    }

    proptest! {
        #[test]
        fn matches_naive_replay(ops in proptest::collection::vec((0u64..200, 1u64..60, any::<bool>()), 1..40)) {
            check(&ops, 256);
        }
    }
}
