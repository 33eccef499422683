//! The planner on synthetic histories: GAPs a resync heals (or does not),
//! and RESIZE. Disks of one-byte chunks whose every byte remembers the seq
//! of the record that wrote it, as in retention's model.

use cdp_core::journal::extents::Source;
use cdp_core::journal::format::{IndexEntry, Kind, FLAG_RESYNC};
use proptest::prelude::*;

use super::*;
use crate::format as rf;
use crate::restore::history::{Resyncs, SegLoc};

/// A record: kind, offset, length (the new size for RESIZE), flags.
type Rec = (Kind, u64, u64, u8);

fn entries(recs: &[Rec]) -> Vec<IndexEntry> {
    recs.iter()
        .enumerate()
        .map(|(i, &(kind, offset, length, flags))| IndexEntry {
            seq: i as u64 + 1,
            ts_ns: (i as u64 + 1) * 1000,
            offset,
            length,
            payload_pos: (i as u64 + 1) * 1_000_000,
            kind,
            flags,
        })
        .collect()
}

/// A baseline of `size` bytes, byte i written by "seq 1000 + i".
fn baseline(s0: u64, s1: u64, size: u64) -> (String, Baseline) {
    (
        rf::baseline_key("vm", "vda", s1, s0),
        Baseline {
            vm_uuid: "vm".into(),
            disk: "vda".into(),
            size,
            chunk_size: 1,
            s0,
            s1,
            started_ns: 0,
            finished_ns: 0,
            chunks: (0..size).map(|i| Some((1000 + i).to_string())).collect(),
        },
    )
}

fn history(recs: &[Rec], baselines: Vec<(String, Baseline)>, resyncs: Resyncs) -> History {
    let entries = entries(recs);
    History {
        vm: "vm".into(),
        disk: "vda".into(),
        baselines,
        segments: vec![SegRef {
            first_seq: 1,
            last_seq: entries.last().map_or(0, |e| e.seq),
            record_base: 0,
            entries,
            loc: SegLoc::Repo {
                frames: Vec::new(),
                object_size: 0,
            },
        }],
        breaks: Vec::new(),
        orphans: Vec::new(),
        retention: None,
        resyncs,
    }
}

fn resyncs(gaps: &[u64], resynced: &[(u64, u64)]) -> Resyncs {
    Resyncs {
        gaps: gaps.iter().copied().collect(),
        resynced: resynced.to_vec(),
        since: Default::default(),
    }
}

/// The bytes a plan gives: the writing seq, 0 for zeros.
fn content(p: &Plan) -> Vec<u64> {
    (0..p.size)
        .map(|i| match p.extents.overlapping(i, i + 1).first() {
            Some((_, _, Source::Journal { pos, .. })) => pos / 1_000_000,
            Some((_, _, Source::Zero)) => 0,
            None => {
                assert!(
                    i < p.baseline.size,
                    "byte {i} beyond the baseline uncovered"
                );
                1000 + i
            }
        })
        .collect()
}

/// What the disk holds at `seq` by the rules: records clamped by the size
/// in force, a shrink drops the tail, a grow adds zeros.
fn truth(recs: &[Rec], base_size: u64, seq: u64) -> Vec<u64> {
    let mut d: Vec<u64> = (0..base_size).map(|i| 1000 + i).collect();
    for (i, &(kind, off, len, _)) in recs.iter().enumerate().take(seq as usize) {
        let s = i as u64 + 1;
        let size = d.len() as u64;
        match kind {
            Kind::Write | Kind::Zero => {
                for b in off..(off + len).min(size) {
                    d[b as usize] = if kind == Kind::Write { s } else { 0 };
                }
            }
            Kind::Resize => d.resize(len as usize, 0),
            _ => {}
        }
    }
    d
}

fn w(off: u64, len: u64) -> Rec {
    (Kind::Write, off, len, 0)
}
fn rw(off: u64, len: u64) -> Rec {
    (Kind::Write, off, len, FLAG_RESYNC)
}
fn gap() -> Rec {
    (Kind::Gap, 0, 0, 0)
}
fn resynced() -> Rec {
    (Kind::Resynced, 0, 0, 0)
}
fn resize(n: u64) -> Rec {
    (Kind::Resize, 0, n, 0)
}

fn why(h: &History, seq: u64) -> String {
    match plan(h, seq, &Point::Seq(seq)) {
        Err(RestoreError::Impossible { why, .. }) => why,
        Err(e) => panic!("seq {seq}: {e}"),
        Ok(_) => panic!("seq {seq} was planned"),
    }
}

/// Records 1-5, the resync GAP at 6, resync records 7-8 (and a guest
/// write), RESYNCED at 9, a write at 10.
fn healed_journal() -> Vec<Rec> {
    vec![
        w(0, 4),
        w(4, 4),
        w(0, 2),
        w(8, 4),
        w(2, 2),
        gap(),
        rw(0, 8),
        w(3, 1),
        resynced(),
        w(12, 4),
    ]
}

#[test]
fn a_resynced_gap_is_restorable_after_the_resync_and_not_inside_the_window() {
    let recs = healed_journal();
    let h = history(&recs, vec![baseline(0, 0, 16)], resyncs(&[6], &[(9, 6)]));
    assert_eq!(restorable_ranges(&h), vec![(1, 5), (9, 10)]);
    for seq in [1, 5, 9, 10] {
        let p = plan(&h, seq, &Point::Seq(seq)).unwrap();
        assert_eq!(content(&p), truth(&recs, 16, seq), "seq {seq}");
    }
    for seq in 6..9 {
        let why = why(&h, seq);
        assert!(
            why.contains("seq 6 is a GAP")
                && why.contains("tracked, not journaled")
                && why.contains("seq 9"),
            "{why}"
        );
    }
    assert!(h.gap_note(6).unwrap().contains("from seq 9 on can"));
}

#[test]
fn a_resync_gap_without_resynced_stays_unrestorable() {
    let recs = &healed_journal()[..8];
    let h = history(recs, vec![baseline(0, 0, 16)], resyncs(&[6], &[]));
    assert_eq!(restorable_ranges(&h), vec![(1, 5)]);
    let why = why(&h, 8);
    assert!(why.contains("no resync has finished"), "{why}");
    // The whole journal: the RESYNCED is there but unreadable (no entry in
    // `resynced`): it heals nothing.
    let h = history(
        &healed_journal(),
        vec![baseline(0, 0, 16)],
        resyncs(&[6], &[]),
    );
    assert_eq!(restorable_ranges(&h), vec![(1, 5)]);
    assert!(plan(&h, 10, &Point::Seq(10)).is_err());
}

#[test]
fn a_resynced_whose_gap_seq_is_after_the_gap_heals_nothing() {
    let h = history(
        &healed_journal(),
        vec![baseline(0, 0, 16)],
        resyncs(&[6], &[(9, 7)]),
    );
    assert_eq!(restorable_ranges(&h), vec![(1, 5)]);
    assert!(why(&h, 10).contains("seq 6 is a GAP"));
}

#[test]
fn a_gap_without_resync_is_not_healed_by_a_resynced() {
    let h = history(
        &healed_journal(),
        vec![baseline(0, 0, 16)],
        resyncs(&[], &[(9, 6)]),
    );
    assert_eq!(restorable_ranges(&h), vec![(1, 5)]);
    let why = why(&h, 10);
    assert!(why.contains("a baseline taken after it is needed"), "{why}");
    assert_eq!(h.gap_note(6), None);
}

#[test]
fn one_resynced_heals_two_gaps() {
    let recs = vec![
        w(0, 4),
        w(4, 4),
        gap(),
        rw(0, 2),
        w(6, 2),
        gap(),
        rw(2, 2),
        w(8, 2),
        resynced(),
        w(1, 1),
    ];
    let h = history(&recs, vec![baseline(0, 0, 16)], resyncs(&[3, 6], &[(9, 3)]));
    assert_eq!(restorable_ranges(&h), vec![(1, 2), (9, 10)]);
    for seq in 3..9 {
        assert!(plan(&h, seq, &Point::Seq(seq)).is_err(), "seq {seq}");
    }
    for seq in [9, 10] {
        let p = plan(&h, seq, &Point::Seq(seq)).unwrap();
        assert_eq!(content(&p), truth(&recs, 16, seq));
    }
    // A RESYNCED for the second GAP only leaves the first unhealed.
    let h = history(&recs, vec![baseline(0, 0, 16)], resyncs(&[3, 6], &[(9, 6)]));
    assert_eq!(restorable_ranges(&h), vec![(1, 2)]);
}

#[test]
fn a_baseline_taken_after_the_gap_serves_points_inside_the_window() {
    let recs = healed_journal();
    let h = history(
        &recs,
        vec![baseline(0, 0, 16), baseline(7, 7, 16)],
        resyncs(&[6], &[]),
    );
    assert_eq!(restorable_ranges(&h), vec![(1, 5), (7, 10)]);
    assert_eq!(plan(&h, 8, &Point::Seq(8)).unwrap().baseline.s0, 7);
}

#[test]
fn resize_grow_then_shrink_then_grow() {
    let recs = vec![
        w(0, 4),
        resize(12),
        w(8, 4),  // past the baseline's size: kept
        w(10, 6), // clamped to 12
        resize(6),
        w(4, 4), // clamped to 6
        resize(10),
        w(9, 1),
    ];
    let h = history(&recs, vec![baseline(0, 0, 8)], Resyncs::default());
    assert_eq!(restorable_ranges(&h), vec![(1, 8)]);
    let sizes: Vec<u64> = (1..=8)
        .map(|s| plan(&h, s, &Point::Seq(s)).unwrap().size)
        .collect();
    assert_eq!(sizes, vec![8, 12, 12, 12, 6, 6, 10, 10]);
    for seq in 1..=8 {
        let p = plan(&h, seq, &Point::Seq(seq)).unwrap();
        assert_eq!(content(&p), truth(&recs, 8, seq), "seq {seq}");
    }
}

fn op() -> impl Strategy<Value = Rec> {
    prop_oneof![
        (0u64..40, 1u64..12).prop_map(|(o, l)| w(o, l)),
        (0u64..40, 1u64..12).prop_map(|(o, l)| (Kind::Zero, o, l, 0)),
        (0u64..40).prop_map(resize),
    ]
}

proptest! {
    /// Every point of a journal of writes, zeros and resizes plans to what
    /// the disk held then, from every baseline before it.
    #[test]
    fn resize_matches_the_model(
        recs in proptest::collection::vec(op(), 1..30),
        base_size in 0u64..40,
    ) {
        let h = history(&recs, vec![baseline(0, 0, base_size)], Resyncs::default());
        for seq in 1..=recs.len() as u64 {
            let p = plan(&h, seq, &Point::Seq(seq)).unwrap();
            let t = truth(&recs, base_size, seq);
            prop_assert_eq!(p.size, t.len() as u64);
            prop_assert_eq!(content(&p), t);
            prop_assert!(p.extents.iter().all(|(_, e, _)| e <= p.size));
        }
    }
}

/// The journal refused data from seq 4's time on, but still took a MARK (4)
/// and a FLUSH (5) before cdpd journaled the GAP (6): those records, and
/// any time from the window's start, name states the replay lacks; seq 3
/// and the points after the RESYNCED (9) do not.
#[test]
fn records_and_times_inside_a_window_before_its_gap_are_refused() {
    let mut recs = healed_journal();
    recs[3] = (Kind::Mark, 0, 0, 0);
    recs[4] = (Kind::Flush, 0, 0, 0);
    let mut rs = resyncs(&[6], &[(9, 6)]);
    rs.since.insert(6, 4000); // seq 4's ts (entries are 1000 ns apart)
    let h = history(&recs, vec![baseline(0, 0, 16)], rs);
    assert_eq!(restorable_ranges(&h), vec![(1, 3), (9, 10)]);
    for seq in [4, 5] {
        let why = why(&h, seq);
        assert!(why.contains("seq 6 is a GAP"), "seq {seq}: {why}");
    }
    for seq in [3, 9, 10] {
        let p = plan(&h, seq, &Point::Seq(seq)).unwrap();
        assert_eq!(content(&p), truth(&recs, 16, seq), "seq {seq}");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let at = |t: u64| rt.block_on(crate::restore::point::resolve(&h, None, &Point::TimeNs(t)));
    assert_eq!(at(3999).unwrap(), 3);
    // (From the GAP on, the time resolves into [6, 9), which plan refuses.)
    for t in [4000, 4500, 5999] {
        let e = at(t).unwrap_err().to_string();
        assert!(e.contains("window of the GAP at seq 6"), "{t}: {e}");
    }
    assert_eq!(at(9000).unwrap(), 9);
}
