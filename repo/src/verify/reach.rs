//! Can every point be rebuilt? The breaks in each disk's record chain,
//! the points restore can rebuild (by restore's own rules, see
//! [`crate::restore::plan()`]), the points an intact repository would have
//! rebuilt, and which problem makes which of the difference unrestorable.

use cdp_core::journal::format::{IndexEntry, Kind as RecKind};
use cdp_core::time::fmt_ns;

use crate::format::Baseline;
use crate::restore::{self, History, SegRef};
use crate::store::Store;

use super::collect::DiskScanner;
use super::{problem, BaselineInfo, DiskReport, DiskScan, Gap, Kind, Mark, Problem, SeqRange};

impl DiskScanner<'_> {
    /// Where the record chain of `segs` breaks (index of the segment after
    /// each break); a break no object problem explains is a problem.
    pub(super) fn chain_breaks(&mut self, segs: &[SegRef]) -> Vec<usize> {
        let mut breaks = Vec::new();
        for (k, w) in segs.windows(2).enumerate() {
            let (a, b) = (&w[0], &w[1]);
            if b.record_base == a.record_base + a.entries.len() as u64 && b.first_seq > a.last_seq {
                continue;
            }
            breaks.push(k + 1);
            // Explained by an object reported already?
            let explained = self.problems.iter().any(|p: &Problem| {
                p.from_seq
                    .is_some_and(|s| s > a.last_seq && s < b.first_seq)
            });
            if explained {
                continue;
            }
            let what = format!(
                "records missing between seq {} and seq {}: record base {} does not follow {}+{}",
                a.last_seq,
                b.first_seq,
                b.record_base,
                a.record_base,
                a.entries.len()
            );
            self.report(None, Kind::Chain, what, Some(a.last_seq + 1));
        }
        breaks
    }

    /// Are the first records of the journal missing (not thinned away by
    /// retention)?
    pub(super) fn chain_start(&mut self, segs: &[SegRef], baselines: &[(String, Baseline)]) {
        let Some(s) = segs.first() else { return };
        let missing = match self.thinned_to {
            // Retention removed the records up to journal_from_seq; the
            // first segment left must follow on from what it kept.
            Some((_, base)) => s.record_base > base,
            None => s.record_base != 0 && baselines.iter().any(|(_, b)| b.s0 < s.first_seq - 1),
        };
        if missing {
            let what = format!(
                "the first {} records of the journal are not in the repository (the oldest segment begins at seq {})",
                s.record_base, s.first_seq
            );
            self.report(None, Kind::Chain, what, Some(0));
        }
    }
}

// Sets of seqs as sorted, disjoint, inclusive ranges.

fn normalize(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.retain(|r| r.0 <= r.1);
    v.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for r in v {
        match out.last_mut() {
            Some(m) if r.0 <= m.1.saturating_add(1) => m.1 = m.1.max(r.1),
            _ => out.push(r),
        }
    }
    out
}

fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(s, e) in a {
        let mut cur = s;
        let mut done = false;
        for &(bs, be) in b {
            if be < cur || bs > e {
                continue;
            }
            if bs > cur {
                out.push((cur, bs - 1));
            }
            if be >= e {
                done = true;
                break;
            }
            cur = be + 1;
        }
        if !done && cur <= e {
            out.push((cur, e));
        }
    }
    normalize(out)
}

fn intersect(a: &[(u64, u64)], lo: u64, hi: u64) -> Vec<(u64, u64)> {
    a.iter()
        .filter(|r| r.1 >= lo && r.0 <= hi)
        .map(|r| (r.0.max(lo), r.1.min(hi)))
        .collect()
}

/// The range of points one baseline serves, by restore's rules.
fn baseline_range(h: &mut History, i: usize) -> Option<(u64, u64)> {
    let all = std::mem::take(&mut h.baselines);
    h.baselines = vec![all[i].clone()];
    let r = restore::restorable_ranges(h);
    h.baselines = all;
    r.first().copied()
}

/// A disk's report, and its problems with the points each makes
/// unrestorable.
pub(super) async fn finish_disk(store: &Store, mut s: DiskScan) -> (DiskReport, Vec<Problem>) {
    let last_loaded = s.history.last_entry().map(|e| e.seq);
    let last_known = last_loaded.max(s.last_named);
    let actual = rebuildable(&mut s);
    let lost = subtract(&ideal(&s.history, last_loaded, last_known), &actual);
    let (marks, gaps) = special_records(store, &s.history).await;
    let reach = Reach {
        entries: s.history.entries().map(|(_, e)| (e.seq, e.ts_ns)).collect(),
        actual,
        lost,
        marks,
        gaps,
    };
    let mut problems = std::mem::take(&mut s.problems);
    reach.attribute(&s.history.disk, &mut problems);
    problems.extend(reach.newest(&s.history, last_known));
    (reach.report(&s, last_known), problems)
}

/// What restore can rebuild: for each point the newest baseline whose chain
/// reaches it is used; it fails if that baseline is damaged or a record it
/// needs cannot be read.
fn rebuildable(s: &mut DiskScan) -> Vec<(u64, u64)> {
    let h = &mut s.history;
    let mut claimed: Vec<(u64, u64)> = Vec::new();
    let mut actual = Vec::new();
    for bi in (0..h.baselines.len()).rev() {
        let Some(r) = baseline_range(h, bi) else {
            continue;
        };
        let own = subtract(&[r], &claimed);
        claimed = normalize([claimed, vec![r]].concat());
        if s.bad_baselines.contains(&bi) {
            continue;
        }
        let s0 = h.baselines[bi].1.s0;
        let cut = s.bad_records.iter().filter(|&&c| c > s0).min().copied();
        for (a, e) in own {
            actual.push((a, cut.map_or(e, |c| e.min(c - 1))));
        }
    }
    normalize(actual)
}

/// What an intact repository would rebuild: no breaks, every baseline and
/// record good, up to the newest seq any object name speaks of; of the
/// points retention thinned, only those it kept.
fn ideal(h: &History, last_loaded: Option<u64>, last_known: Option<u64>) -> Vec<(u64, u64)> {
    let mut ih = h.clone();
    ih.breaks.clear();
    if let Some(f) = ih.segments.first_mut() {
        f.record_base = 0;
    }
    let mut r = restore::restorable_ranges(&ih);
    if let (Some(ll), Some(lk)) = (last_loaded, last_known) {
        for x in r.iter_mut() {
            if x.1 == ll {
                x.1 = lk;
            }
        }
    }
    let r = normalize(r);
    // Retention keeps only its points and every point from
    // journal_from_seq on.
    match h.retained() {
        Some((m, dr)) => {
            let keep = normalize(
                m.points
                    .iter()
                    .map(|p| (p.seq, p.seq))
                    .chain([(dr.journal_from_seq, u64::MAX)])
                    .collect(),
            );
            subtract(&r, &subtract(&r, &keep))
        }
        None => r,
    }
}

/// The MARK and GAP records of a disk, with their label or reason (a
/// record that cannot be read says so).
async fn special_records(store: &Store, h: &History) -> (Vec<Mark>, Vec<Gap>) {
    let mut marks = Vec::new();
    let mut gaps = Vec::new();
    let special: Vec<(usize, IndexEntry)> = h
        .entries()
        .filter(|(_, e)| matches!(e.kind, RecKind::Mark | RecKind::Gap))
        .map(|(i, e)| (i, *e))
        .collect();
    for (i, e) in special {
        let payload = restore::read_record(Some(store), &h.vm, &h.disk, &h.segments[i], &e, None)
            .await
            .ok()
            .and_then(|(_, p)| serde_json::from_slice::<serde_json::Value>(&p).ok())
            .unwrap_or_default();
        let text = |k: &str| {
            payload[k].as_str().map_or_else(
                || format!("? (seq {}: record unreadable)", e.seq),
                str::to_string,
            )
        };
        if e.kind == RecKind::Mark {
            marks.push(Mark {
                seq: e.seq,
                time: fmt_ns(e.ts_ns),
                label: text("label"),
            });
        } else {
            let reason = match h.gap_note(e.seq) {
                Some(note) => format!("{} ({note})", text("reason")),
                None => text("reason"),
            };
            gaps.push(Gap {
                seq: e.seq,
                time: fmt_ns(e.ts_ns),
                reason,
            });
        }
    }
    (marks, gaps)
}

/// What can be rebuilt of a disk and what is lost.
struct Reach {
    /// (seq, time) of every record, in order.
    entries: Vec<(u64, u64)>,
    /// The ranges restore can rebuild.
    actual: Vec<(u64, u64)>,
    /// The ranges an intact repository would rebuild but this one cannot.
    lost: Vec<(u64, u64)>,
    marks: Vec<Mark>,
    gaps: Vec<Gap>,
}

impl Reach {
    fn ts_of(&self, seq: u64) -> String {
        let i = self.entries.partition_point(|&(s, _)| s <= seq);
        if i == 0 {
            "?".to_string()
        } else {
            fmt_ns(self.entries[i - 1].1)
        }
    }

    fn range(&self, (a, b): (u64, u64)) -> SeqRange {
        SeqRange {
            from_seq: a,
            to_seq: b,
            from: self.ts_of(a),
            to: self.ts_of(b),
        }
    }

    fn marks_in(&self, rs: &[(u64, u64)]) -> Vec<String> {
        self.marks
            .iter()
            .filter(|m| rs.iter().any(|r| m.seq >= r.0 && m.seq <= r.1))
            .map(|m| m.label.clone())
            .collect()
    }

    /// Each problem: the unrestorable stretch that begins where it does, up
    /// to the next restorable point. Lost points no problem explains are a
    /// problem of their own.
    fn attribute(&self, disk: &str, problems: &mut Vec<Problem>) {
        let mut attributed: Vec<(u64, u64)> = Vec::new();
        for p in problems.iter_mut() {
            let Some(from) = p.from_seq else { continue };
            let until = self
                .actual
                .iter()
                .find(|r| r.1 >= from)
                .map_or(u64::MAX, |r| r.0.max(from));
            if until == from {
                continue;
            }
            let rs = intersect(&self.lost, from, until - 1);
            p.marks = self.marks_in(&rs);
            attributed.extend(rs.iter().copied());
            p.unrestorable = rs.into_iter().map(|r| self.range(r)).collect();
        }
        for r in subtract(&self.lost, &normalize(attributed)) {
            let mut p = problem(
                Some(disk),
                None,
                Kind::Chain,
                "points an intact repository would restore cannot be restored".into(),
            );
            p.marks = self.marks_in(&[r]);
            p.unrestorable = vec![self.range(r)];
            problems.push(p);
        }
    }

    /// The newest records must be restorable: a problem when they are not
    /// (and no damage explains it).
    fn newest(&self, h: &History, last_known: Option<u64>) -> Option<Problem> {
        let last = last_known?;
        let covered = self.actual.iter().any(|r| r.0 <= last && last <= r.1)
            || self.lost.iter().any(|r| r.0 <= last && last <= r.1);
        if covered {
            return None;
        }
        // The newest GAP after s0 that no resync has healed by `last`.
        let gap_after = |s0: u64| {
            self.gaps
                .iter()
                .rev()
                .filter(|g| h.resyncs.healed_by(g.seq).is_none_or(|r| r > last))
                .find(|g| g.seq > s0)
                .map(|g| g.seq)
        };
        let newest = h.baselines.iter().map(|(_, b)| b.s0).max();
        let why = match newest {
            None => "no baseline of this disk is in the repository: take one with `cdpctl baseline`".to_string(),
            Some(s0) => match gap_after(s0) {
                Some(g) => match h.gap_note(g) {
                    Some(note) => format!("GAP at seq {g}: {note}"),
                    None => format!(
                        "GAP at seq {g} (capture was interrupted) and no baseline after it: the shipper takes one by itself, or run `cdpctl baseline`"
                    ),
                },
                None => "no baseline is consistent by then".to_string(),
            },
        };
        let from = self.actual.last().map_or(1, |r| r.1 + 1);
        let rs = vec![(from, last)];
        let mut p = problem(
            Some(&h.disk),
            None,
            Kind::Unrestorable,
            format!("the newest records cannot be restored: {why}"),
        );
        p.marks = self.marks_in(&rs);
        p.unrestorable = rs.into_iter().map(|r| self.range(r)).collect();
        Some(p)
    }

    fn report(self, s: &DiskScan, last_known: Option<u64>) -> DiskReport {
        let h = &s.history;
        let baselines = h
            .baselines
            .iter()
            .enumerate()
            .map(|(i, (k, b))| BaselineInfo {
                key: k.clone(),
                s0: b.s0,
                s1: b.s1,
                chunks: b.chunks.len() as u64,
                stored_chunks: b.chunks.iter().flatten().count() as u64,
                usable: !s.bad_baselines.contains(&i),
            })
            .collect();
        DiskReport {
            disk: h.disk.clone(),
            segments: h.segments.len() as u64,
            records: self.entries.len() as u64,
            first_seq: self.entries.first().map(|e| e.0),
            last_seq: last_known,
            baselines,
            restorable: self.actual.iter().map(|&r| self.range(r)).collect(),
            unrestorable: self.lost.iter().map(|&r| self.range(r)).collect(),
            marks: self.marks,
            gaps: self.gaps,
            chain: s.chain_notes.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_sets() {
        assert_eq!(
            normalize(vec![(5, 9), (1, 3), (4, 4), (20, 19)]),
            vec![(1, 9)]
        );
        assert_eq!(
            subtract(&[(1, 100)], &[(10, 19), (50, 200)]),
            vec![(1, 9), (20, 49)]
        );
        assert_eq!(subtract(&[(1, 10)], &[(1, 10)]), vec![]);
        assert_eq!(
            subtract(&[(1, 10), (20, 30)], &[(5, 25)]),
            vec![(1, 4), (26, 30)]
        );
        assert_eq!(
            intersect(&[(1, 10), (20, 30)], 5, 22),
            vec![(5, 10), (20, 22)]
        );
    }
}
