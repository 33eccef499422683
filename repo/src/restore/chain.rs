//! The chain of a disk's segment indexes (docs/REPOSITORY_FORMAT.md,
//! "Chain of indexes"): each index names the BLAKE3 of the previous
//! segment's index object, which names the BLAKE3 of its segment object.
//! A segment is *vouched for* when the next segment's index names its
//! index exactly. Pure code over the indexes of one disk, in name order.
//!
//! What it tells: segments nothing valid vouches for although the chain
//! was recorded there (deleted, reordered or replaced history: restore and
//! verify use none of them), whether the oldest segment follows on from
//! something the repository no longer holds, and where the chain begins
//! (segments shipped before the chain existed are not covered). The newest
//! segment is vouched for by nothing in the repository: its deletion or
//! replacement shows only against the catalog or another target.

use std::collections::BTreeMap;

use crate::format::ChainLink;

/// One segment of the disk, as its index says and as its bytes hash.
#[derive(Debug, Clone, Copy)]
pub struct Linked<'a> {
    pub first_seq: u64,
    pub last_seq: u64,
    pub record_base: u64,
    pub records: u64,
    /// What its index says of the previous segment.
    pub prev: Option<&'a ChainLink>,
    /// BLAKE3 hex of its whole `.idx` object.
    pub index_blake3: &'a str,
}

/// What the chain says about a disk's segments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainCheck {
    /// Segments (positions) that must not be used, and why.
    pub suspect: BTreeMap<usize, String>,
    /// (first_seq, last_seq) of segments whose successor is damaged: no
    /// index vouches for them, and no link contradicts them.
    pub unvouched: Vec<(u64, u64)>,
    /// The oldest segment names a predecessor that is not in the
    /// repository (and not removed by retention): why.
    pub start_missing: Option<String>,
    /// The first seq of the first segment the chain covers (the one the
    /// first link names): segments before it were written before the chain
    /// existed. `None` when no index carries a link.
    pub recorded_from: Option<u64>,
    /// (first_seq, last_seq) of the newest segment of each chain (the last
    /// segment, and the last one before a new history began): nothing in
    /// the repository vouches for it.
    pub heads: Vec<(u64, u64)>,
}

fn names(l: &ChainLink, s: &Linked<'_>) -> bool {
    l.index_blake3 == s.index_blake3 && l.first_seq == s.first_seq && l.last_seq == s.last_seq
}

/// Check the chain of `segs` (one disk, in replay order). `pruned_to`:
/// retention's `journal_from_seq` for the disk (a link from the oldest
/// segment to one at or below it names a segment retention deleted).
/// `damaged`: seq ranges of segments the repository lists but that cannot
/// be used (an object missing or corrupt, reported as such): a segment
/// whose successor is one of those is vouched for by nothing, but is not
/// suspect (damage is not evidence of an edit; `cdpctl verify` reports it).
pub fn check(segs: &[Linked<'_>], pruned_to: Option<u64>, damaged: &[(u64, u64)]) -> ChainCheck {
    let mut out = ChainCheck::default();
    let mut started = false;
    for (i, s) in segs.iter().enumerate() {
        let here = format!("the index of seq {}-{}", s.first_seq, s.last_seq);
        match s.prev {
            Some(l) => {
                if !started {
                    // The segment before is the first one the chain covers
                    // (this link vouches for it).
                    out.recorded_from = Some(segs[i.saturating_sub(1)].first_seq);
                    started = true;
                }
                if i == 0 {
                    if pruned_to.is_none_or(|f| l.last_seq > f) {
                        out.start_missing = Some(format!(
                            "{here} follows seq {}-{}, which is not in the repository: older history was deleted",
                            l.first_seq, l.last_seq
                        ));
                    }
                    continue;
                }
                let p = &segs[i - 1];
                if names(l, p) {
                    continue;
                }
                if damaged.contains(&(l.first_seq, l.last_seq)) && l.first_seq > p.last_seq {
                    out.unvouched.push((p.first_seq, p.last_seq));
                    continue;
                }
                let why = match segs.iter().position(|o| names(l, o)) {
                    Some(_) => format!(
                        "{here} names seq {}-{} as the segment before it: the segments are out of order",
                        l.first_seq, l.last_seq
                    ),
                    None if l.first_seq > p.last_seq => format!(
                        "{here} names seq {}-{} as the segment before it, which is not in the repository: a segment was deleted, nothing vouches for seq {}-{}",
                        l.first_seq, l.last_seq, p.first_seq, p.last_seq
                    ),
                    None => format!(
                        "{here} names another index of seq {}-{} (BLAKE3 {}…) than the one stored: seq {}-{} was replaced or rewritten",
                        l.first_seq,
                        l.last_seq,
                        l.index_blake3.get(..16).unwrap_or(""),
                        p.first_seq,
                        p.last_seq
                    ),
                };
                out.suspect.entry(i - 1).or_insert(why);
            }
            None if started && i > 0 => {
                let p = &segs[i - 1];
                if s.record_base != p.record_base + p.records {
                    // A new history (a lost state directory, another
                    // host): the record chain breaks here too, and the
                    // segment before is the head of the older chain.
                    out.heads.push((p.first_seq, p.last_seq));
                    continue;
                }
                let why = format!(
                    "{here} carries no link to the segment before it although the chain was recorded from seq {}: a rewritten index",
                    out.recorded_from.unwrap_or(0)
                );
                out.suspect.entry(i - 1).or_insert_with(|| why.clone());
                out.suspect.entry(i).or_insert(why);
            }
            None => {}
        }
    }
    if let Some(s) = segs.last() {
        if started {
            out.heads.push((s.first_seq, s.last_seq));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A chain of `n` segments of 10 records each, linked from `linked_from`
    /// on; hashes are made up per segment.
    struct Fixture {
        links: Vec<Option<ChainLink>>,
        hashes: Vec<String>,
        seqs: Vec<(u64, u64, u64)>,
    }

    fn fixture(n: usize, linked_from: usize) -> Fixture {
        let hashes: Vec<String> = (0..n).map(|i| format!("{:064x}", i + 1000)).collect();
        let seqs: Vec<(u64, u64, u64)> = (0..n as u64)
            .map(|i| (i * 10 + 1, i * 10 + 10, i * 10))
            .collect();
        let links = (0..n)
            .map(|i| {
                (i >= linked_from && i > 0).then(|| ChainLink {
                    first_seq: seqs[i - 1].0,
                    last_seq: seqs[i - 1].1,
                    index_blake3: hashes[i - 1].clone(),
                })
            })
            .collect();
        Fixture {
            links,
            hashes,
            seqs,
        }
    }

    impl Fixture {
        fn linked(&self, order: &[usize]) -> Vec<Linked<'_>> {
            order
                .iter()
                .map(|&i| Linked {
                    first_seq: self.seqs[i].0,
                    last_seq: self.seqs[i].1,
                    record_base: self.seqs[i].2,
                    records: 10,
                    prev: self.links[i].as_ref(),
                    index_blake3: &self.hashes[i],
                })
                .collect()
        }
    }

    #[test]
    fn an_intact_chain_has_no_suspect_and_one_head() {
        let f = fixture(5, 0);
        let c = check(&f.linked(&[0, 1, 2, 3, 4]), None, &[]);
        assert!(c.suspect.is_empty() && c.start_missing.is_none(), "{c:?}");
        assert_eq!(c.recorded_from, Some(1));
        assert_eq!(c.heads, vec![(41, 50)]);
    }

    #[test]
    fn old_indexes_without_links_are_not_recorded_not_suspect() {
        let f = fixture(5, 3);
        let c = check(&f.linked(&[0, 1, 2, 3, 4]), None, &[]);
        assert!(c.suspect.is_empty(), "{c:?}");
        assert_eq!(c.recorded_from, Some(21));
        let none = fixture(3, 9);
        let c = check(&none.linked(&[0, 1, 2]), None, &[]);
        assert_eq!(c, ChainCheck::default());
    }

    #[test]
    fn a_deleted_middle_segment_makes_the_one_before_it_suspect() {
        let f = fixture(5, 0);
        let c = check(&f.linked(&[0, 1, 3, 4]), None, &[]);
        assert_eq!(c.suspect.keys().copied().collect::<Vec<_>>(), vec![1]);
        assert!(c.suspect[&1].contains("seq 21-30"), "{c:?}");
        assert!(c.suspect[&1].contains("deleted"), "{c:?}");
    }

    #[test]
    fn a_damaged_successor_leaves_a_segment_unvouched_not_suspect() {
        let f = fixture(5, 0);
        let c = check(&f.linked(&[0, 1, 3, 4]), None, &[(21, 30)]);
        assert!(c.suspect.is_empty(), "{c:?}");
        assert_eq!(c.unvouched, vec![(11, 20)]);
    }

    #[test]
    fn swapped_segments_are_out_of_order() {
        let f = fixture(5, 0);
        let c = check(&f.linked(&[0, 2, 1, 3, 4]), None, &[]);
        assert!(
            c.suspect.contains_key(&0) && c.suspect.contains_key(&1),
            "{c:?}"
        );
        assert!(c.suspect.values().any(|w| w.contains("out of order")));
    }

    #[test]
    fn a_replaced_segment_is_suspect() {
        let mut f = fixture(5, 0);
        f.hashes[2] = "ee".repeat(32);
        let c = check(&f.linked(&[0, 1, 2, 3, 4]), None, &[]);
        assert_eq!(c.suspect.keys().copied().collect::<Vec<_>>(), vec![2]);
        assert!(c.suspect[&2].contains("replaced"), "{c:?}");
    }

    #[test]
    fn a_stripped_link_is_suspect_unless_a_new_history_begins() {
        let mut f = fixture(5, 0);
        f.links[3] = None;
        let c = check(&f.linked(&[0, 1, 2, 3, 4]), None, &[]);
        assert_eq!(c.suspect.keys().copied().collect::<Vec<_>>(), vec![2, 3]);
        // A new history: its record base starts again.
        f.seqs[3].2 = 0;
        f.seqs[4].2 = 10;
        let c = check(&f.linked(&[0, 1, 2, 3, 4]), None, &[]);
        assert!(c.suspect.is_empty(), "{c:?}");
        assert_eq!(c.heads, vec![(21, 30), (41, 50)]);
    }

    #[test]
    fn deleted_oldest_history_is_reported_unless_pruned() {
        let f = fixture(5, 0);
        let segs = f.linked(&[2, 3, 4]);
        assert!(check(&segs, None, &[]).start_missing.is_some());
        assert!(check(&segs, Some(19), &[]).start_missing.is_some());
        assert!(check(&segs, Some(20), &[]).start_missing.is_none());
        assert!(check(&segs, Some(20), &[]).suspect.is_empty());
    }

    proptest! {
        /// Any edit of an intact chain that drops, reorders or replaces a
        /// segment is caught, except what nothing in the repository can
        /// show (the newest segments deleted, the newest left replaced);
        /// no edit is never flagged.
        #[test]
        fn any_edit_before_the_head_is_caught(
            n in 2usize..12,
            ops in proptest::collection::vec((0u8..3, 0usize..12, 0usize..12), 0..4),
        ) {
            let mut f = fixture(n, 0);
            let mut order: Vec<usize> = (0..n).collect();
            for (op, a, b) in ops {
                let len = order.len();
                if len < 2 {
                    break;
                }
                let (a, b) = (a % len, b % len);
                match op {
                    0 if a + 1 < len => { order.remove(a); }
                    1 if a != b => order.swap(a, b),
                    2 if order[a] + 1 < n => f.hashes[order[a]] = format!("{:064x}", 7_000 + a),
                    _ => {}
                }
            }
            // What cannot be seen: the newest segments gone, the newest
            // one left replaced (nothing after it vouches for it).
            let len = order.len();
            let intact = order == (0..len).collect::<Vec<_>>()
                && order[..len - 1].iter().all(|&i| f.hashes[i] == format!("{:064x}", i + 1000));
            let c = check(&f.linked(&order), None, &[]);
            let flagged = !c.suspect.is_empty() || c.start_missing.is_some();
            prop_assert_eq!(flagged, !intact, "order {:?} {:?}", order, c);
        }
    }
}
