//! The planner against a model: disks of 32 one-byte chunks whose every byte
//! remembers the seq of the record that wrote it. A prune is simulated (the
//! synthetic baselines built the way `apply` builds them: restore's plan of
//! the point, replayed), then every kept point must restore to the same
//! bytes as before, by seq and by time; a point thinned away is refused or
//! still right, never wrong; a second prune at the same time changes
//! nothing; a later prune keeps the promise again.

use std::time::Duration;

use cdp_core::journal::extents::Source;
use cdp_core::journal::format::{IndexEntry, Kind};
use proptest::prelude::*;

use super::*;
use crate::restore::SegRef;

const SIZE: u64 = 32;
const US: u64 = 1000;

#[derive(Debug, Clone)]
struct Rec {
    seq: u64,
    disk: usize,
    kind: Kind,
    offset: u64,
    len: u64,
}

type Content = Vec<Option<u64>>;

fn truth(recs: &[Rec], disk: usize, q: u64) -> Content {
    let mut c = vec![None; SIZE as usize];
    for r in recs.iter().filter(|r| r.disk == disk && r.seq <= q) {
        for i in r.offset..(r.offset + r.len).min(SIZE) {
            c[i as usize] = match r.kind {
                Kind::Write => Some(r.seq),
                Kind::Zero => None,
                _ => c[i as usize],
            };
        }
    }
    c
}

fn baseline(disk: &str, s0: u64, s1: u64, c: &Content) -> (String, Baseline) {
    (
        rf::baseline_key("vm", disk, s1, s0),
        Baseline {
            vm_uuid: "vm".into(),
            disk: disk.into(),
            size: SIZE,
            chunk_size: 1,
            s0,
            s1,
            started_ns: 0,
            finished_ns: 0,
            chunks: c.iter().map(|x| x.map(|s| s.to_string())).collect(),
        },
    )
}

fn breaks(segs: &[SegRef]) -> Vec<usize> {
    let mut b = Vec::new();
    for (i, w) in segs.windows(2).enumerate() {
        if w[1].record_base != w[0].record_base + w[0].entries.len() as u64 {
            b.push(i + 1);
        }
    }
    b
}

fn history(recs: &[Rec], disk: usize, cuts: &[usize], extra: &[(u64, u64)]) -> History {
    let name = format!("vd{}", (b'a' + disk as u8) as char);
    let mine: Vec<&Rec> = recs.iter().filter(|r| r.disk == disk).collect();
    let mut segments = Vec::new();
    let mut base = 0;
    let mut i = 0;
    let mut c = 0;
    while i < mine.len() {
        let n = cuts[c % cuts.len()].min(mine.len() - i);
        c += 1;
        let entries: Vec<IndexEntry> = mine[i..i + n]
            .iter()
            .map(|r| IndexEntry {
                seq: r.seq,
                ts_ns: r.seq * US,
                offset: r.offset,
                length: r.len,
                payload_pos: r.seq * 1_000_000,
                kind: r.kind,
                flags: 0,
            })
            .collect();
        segments.push(SegRef {
            first_seq: entries[0].seq,
            last_seq: entries.last().unwrap().seq,
            record_base: base,
            entries,
            loc: SegLoc::Repo {
                frames: Vec::new(),
                object_size: 0,
            },
        });
        base += n as u64;
        i += n;
    }
    let mut baselines = vec![baseline(&name, 0, 0, &vec![None; SIZE as usize])];
    for &(s0, d) in extra {
        baselines.push(baseline(&name, s0, s0 + d, &truth(recs, disk, s0)));
    }
    baselines.sort_by_key(|(_, b)| (b.s1, b.s0));
    baselines.dedup_by(|a, b| a.0 == b.0);
    History {
        vm: "vm".into(),
        disk: name,
        baselines,
        breaks: breaks(&segments),
        segments,
        orphans: Vec::new(),
        retention: None,
        resyncs: Default::default(),
    }
}

/// The bytes a restore plan gives.
fn content(p: &restore::Plan) -> Content {
    (0..SIZE)
        .map(|i| match p.extents.overlapping(i, i + 1).first() {
            Some((_, _, Source::Journal { pos, .. })) => Some(pos / 1_000_000),
            Some((_, _, Source::Zero)) => None,
            None => p.baseline.chunks[i as usize]
                .as_ref()
                .map(|s| s.parse().unwrap()),
        })
        .collect()
}

fn restore_seq(h: &History, q: u64) -> Option<Content> {
    restore::plan(h, q, &Point::Seq(q))
        .ok()
        .map(|p| content(&p))
}

fn restore_time(h: &History, t: u64) -> Option<Content> {
    let p = Point::TimeNs(t);
    let q = futures::executor::block_on(restore::resolve(h, None, &p)).ok()?;
    restore::plan(h, q, &p).ok().map(|p| content(&p))
}

fn marks_of(hs: &[History]) -> Vec<(u64, u64, String)> {
    let mut m: Vec<_> = hs
        .iter()
        .flat_map(|h| h.entries().map(|(_, e)| *e).collect::<Vec<_>>())
        .filter(|e| e.kind == Kind::Mark)
        .map(|e| (e.seq, e.ts_ns, format!("m{}", e.seq)))
        .collect();
    m.sort();
    m.dedup();
    m
}

/// Prune the model as `apply` would; returns the plan.
fn prune(hs: &mut [History], r: &Retention, now: u64) -> RetentionPlan {
    let marks = marks_of(hs);
    let previous = hs[0].retention.clone();
    let p = plan(&PlanInput {
        vm: "vm",
        histories: hs,
        marks: &marks,
        previous: previous.as_ref(),
        retention: r,
        now_ns: now,
    });
    let manifest = p.manifest("vm", now, now, r, previous.as_ref());
    for (h, d) in hs.iter_mut().zip(&p.disks) {
        for &(seq, _) in &d.synthesize {
            let c = restore_seq(h, seq).expect("a point to synthesize restores");
            let b = baseline(&h.disk, seq, seq, &c);
            assert!(h.exact_baseline(seq).is_none());
            h.baselines.push(b);
            h.baselines.sort_by_key(|(_, b)| (b.s1, b.s0));
        }
        h.segments
            .retain(|s| !d.delete_segments.contains(&(s.first_seq, s.last_seq)));
        h.baselines.retain(|(k, _)| !d.delete_baselines.contains(k));
        h.breaks = breaks(&h.segments);
    }
    if let Some(m) = manifest {
        for h in hs.iter_mut() {
            h.retention = Some(m.clone());
        }
    }
    p
}

/// Every point `p` keeps restores as `before` did, by seq and by time;
/// thinned points are refused or right.
fn check(before: &[History], after: &[History], recs: &[Rec], p: &RetentionPlan) {
    let Some(w) = &p.window else { return };
    for (di, (b, a)) in before.iter().zip(after).enumerate() {
        let d = &p.disks[di];
        let Some(keep) = &d.keep else { continue };
        let last = b.last_entry().map_or(0, |e| e.seq);
        let mut kept: Vec<u64> = p
            .points
            .iter()
            .map(|x| x.seq)
            .filter(|&s| s < keep.journal_from_seq)
            .collect();
        kept.extend(keep.journal_from_seq..=last);
        for q in kept {
            let Some(c) = restore_seq(b, q) else { continue };
            assert_eq!(c, truth(recs, di, q), "model: {} at {q}", b.disk);
            assert_eq!(
                restore_seq(a, q),
                Some(c.clone()),
                "{} seq {q} kept (window {}), lost or wrong after the prune: {d:?}",
                a.disk,
                w.seq
            );
        }
        // By time: each kept point's time, each record's time in the window.
        let times: Vec<u64> = p
            .points
            .iter()
            .filter(|x| x.seq < keep.journal_from_seq)
            .map(|x| x.ts_ns)
            .chain(
                recs.iter()
                    .filter(|r| r.seq >= keep.journal_from_seq)
                    .map(|r| r.seq * US),
            )
            .collect();
        for t in times {
            let q = t / US;
            // A time after the disk's newest record (another disk's record)
            // is refused before the prune as after it: capture was running.
            if restore_seq(b, q).is_none() || restore_time(b, t).is_none() {
                continue;
            }
            assert_eq!(
                restore_time(a, t),
                Some(truth(recs, di, q)),
                "{} time {t} lost or wrong",
                a.disk
            );
        }
        // Everything else: refused, or right.
        for q in 1..=last {
            if let Some(c) = restore_seq(a, q) {
                assert_eq!(
                    c,
                    truth(recs, di, q),
                    "{} seq {q} wrong after prune",
                    a.disk
                );
            }
            if let Some(c) = restore_time(a, q * US + US / 2) {
                assert_eq!(c, truth(recs, di, q), "{} time of {q} wrong", a.disk);
            }
        }
    }
}

/// Records, number of disks, segment lengths, extra baselines (s0, s1 - s0).
type Case = (Vec<Rec>, usize, Vec<usize>, Vec<(u64, u64)>);

fn arb_case() -> impl Strategy<Value = Case> {
    (1usize..3, 5u64..60).prop_flat_map(|(ndisks, n)| {
        (
            proptest::collection::vec((0..ndisks, 0u8..10, 0u64..SIZE, 1u64..5), n as usize),
            Just(ndisks),
            proptest::collection::vec(1usize..7, 1..5),
            proptest::collection::vec((1..n, 0u64..3), 0..3),
        )
            .prop_map(|(raw, nd, cuts, extra)| {
                let recs = raw
                    .into_iter()
                    .enumerate()
                    .map(|(i, (disk, k, offset, len))| Rec {
                        seq: i as u64 + 1,
                        disk,
                        kind: match k {
                            0 => Kind::Zero,
                            1 => Kind::Mark,
                            _ => Kind::Write,
                        },
                        offset,
                        len,
                    })
                    .collect();
                (recs, nd, cuts, extra)
            })
    })
}

fn arb_retention() -> impl Strategy<Value = Retention> {
    (
        1u64..20,
        proptest::collection::vec((1u64..8, 1u64..20), 0..3),
    )
        .prop_map(|(any, tiers)| {
            let mut thin = Vec::new();
            let mut reach = any;
            let mut every = 0;
            for (e, k) in tiers {
                every = if every == 0 { e } else { every * (1 + e % 3) };
                reach += k;
                thin.push((
                    Duration::from_nanos(every * US),
                    Duration::from_nanos(reach * US),
                ));
            }
            Retention {
                any_point: Duration::from_nanos(any * US),
                thin,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn kept_points_restore_and_nothing_needed_is_deleted(
        (recs, nd, cuts, extra) in arb_case(),
        r in arb_retention(),
        now_extra in 0u64..30,
        later in 1u64..40,
    ) {
        let n = recs.len() as u64;
        let before: Vec<History> = (0..nd).map(|d| history(&recs, d, &cuts, &extra)).collect();
        let mut after = before.clone();
        let now = (n + now_extra) * US;
        let p = prune(&mut after, &r, now);
        check(&before, &after, &recs, &p);
        // Same time again: nothing to do.
        let mut again = after.clone();
        let p2 = prune(&mut again, &r, now);
        if let Some(m) = p2.manifest("vm", now, now, &r, after[0].retention.as_ref()) {
            prop_assert!(!p2.changes(after[0].retention.as_ref(), &m), "second prune changes: {p2:?}");
        }
        // Later: the promise holds again, against the original history.
        let now3 = now + later * US;
        let p3 = prune(&mut again, &r, now3);
        let mut fresh = before.clone();
        let p3_direct = prune(&mut fresh, &r, now3);
        // Whatever a direct prune keeps at now3 that the first prune also
        // kept, the twice-pruned history still restores.
        let survived: Vec<u64> = p.points.iter().map(|x| x.seq).chain(p.window.iter().map(|w| w.seq)).collect();
        let mut p3c = p3.clone();
        p3c.points.retain(|x| survived.contains(&x.seq) || p.window.as_ref().is_some_and(|w| x.seq >= w.seq));
        check(&before, &again, &recs, &p3c);
        let _ = p3_direct;
    }
}

#[test]
fn tiers_keep_the_state_at_each_boundary_and_marks_within_reach() {
    // One disk, a record every 1 µs from seq 1 to 40; now = 40 µs.
    let recs: Vec<Rec> = (1..=40)
        .map(|s| Rec {
            seq: s,
            disk: 0,
            kind: if s == 7 || s == 25 {
                Kind::Mark
            } else {
                Kind::Write
            },
            offset: s % SIZE,
            len: 1,
        })
        .collect();
    let before = vec![history(&recs, 0, &[4], &[])];
    let r = Retention {
        any_point: Duration::from_nanos(5 * US),
        thin: vec![(Duration::from_nanos(10 * US), Duration::from_nanos(25 * US))],
    };
    let mut after = before.clone();
    let p = prune(&mut after, &r, 40 * US);
    let w = p.window.clone().unwrap();
    assert_eq!(w.seq, 35);
    let seqs: Vec<u64> = p.points.iter().map(|x| x.seq).collect();
    // Boundaries 20 and 30 (15 is the reach), the mark at 25; not the mark at 7.
    assert_eq!(seqs, vec![20, 25, 30]);
    assert_eq!(p.points[1].marks, vec!["m25".to_string()]);
    let d = &p.disks[0];
    assert_eq!(
        d.synthesize,
        vec![(20, 20 * US), (25, 25 * US), (30, 30 * US), (35, 35 * US)]
    );
    assert_eq!(d.keep.as_ref().unwrap().journal_from_seq, 35);
    // Segments of 4 records: 1-4 … 33-36; those ending at or before 35 go.
    assert_eq!(d.delete_segments.len(), 8);
    assert_eq!(d.delete_baselines.len(), 1);
    check(&before, &after, &recs, &p);
    // A thinned-away point is refused, naming the kept ones around it.
    let e = restore::plan(&after[0], 22, &Point::Seq(22))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("retention") && e.contains("seq:20") && e.contains("seq:25"),
        "{e}"
    );
    let e = futures::executor::block_on(restore::resolve(&after[0], None, &Point::TimeNs(12 * US)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("retention") && e.contains("seq:20"), "{e}");
    // The mark older than the reach is gone; the kept one resolves.
    let m = futures::executor::block_on(restore::resolve(
        &after[0],
        None,
        &Point::Mark("m25".into()),
    ));
    assert_eq!(m.unwrap(), 25);
    assert!(restore::restorable_ranges(&after[0]).contains(&(20, 20)));
}

#[test]
fn no_retention_window_reached_changes_nothing() {
    let recs: Vec<Rec> = (1..=10)
        .map(|s| Rec {
            seq: s,
            disk: 0,
            kind: Kind::Write,
            offset: s,
            len: 2,
        })
        .collect();
    let before = vec![history(&recs, 0, &[3], &[])];
    let r = Retention {
        any_point: Duration::from_nanos(50 * US),
        thin: vec![],
    };
    let mut after = before.clone();
    let p = prune(&mut after, &r, 20 * US);
    assert!(p.window.is_none());
    assert!(p
        .disks
        .iter()
        .all(|d| d.delete_segments.is_empty() && d.synthesize.is_empty()));
}
