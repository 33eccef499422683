//! The plan of a restore: which baseline, and the extent map of the last
//! write to every byte range up to the point, from the segment indexes
//! alone. Also which seq ranges of a disk can be planned at all.

use cdp_core::journal::extents::{ExtentMap, Source};
use cdp_core::journal::format::Kind;

use super::history::{missing_after, with_damage, History, SegRef};
use super::point::Point;
use super::RestoreError;
use crate::format::Baseline;

/// What a restore will do.
#[derive(Debug, Clone)]
pub struct Plan {
    pub vm: String,
    pub disk: String,
    pub size: u64,
    pub point_seq: u64,
    pub baseline_key: String,
    pub baseline: Baseline,
    pub extents: ExtentMap,
    pub segments: Vec<SegRef>,
    pub records: u64,
}

/// Choose the baseline and build the extent map for `seq`.
pub fn plan(h: &History, seq: u64, point: &Point) -> Result<Plan, RestoreError> {
    // A point retention kept has a baseline exactly at it.
    if let Some((key, b)) = h.exact_baseline(seq) {
        return Ok(build(h, key, b, seq));
    }
    let r = plan_inner(h, seq, point);
    match (&r, h.retained()) {
        (Err(RestoreError::Impossible { .. }), Some((_, d))) if seq < d.journal_from_seq => {
            Err(RestoreError::Impossible {
                disk: h.disk.clone(),
                point: point.to_string(),
                why: h.thinned_seq(seq),
            })
        }
        _ => r,
    }
}

fn plan_inner(h: &History, seq: u64, point: &Point) -> Result<Plan, RestoreError> {
    let impossible = |why: String| RestoreError::Impossible {
        disk: h.disk.clone(),
        point: point.to_string(),
        why,
    };
    let last = h.last_entry().map_or(0, |e| e.seq);
    if seq > last {
        return Err(impossible(format!(
            "it is after the newest record of this disk (seq {last}{}){}",
            h.last_entry()
                .map(|e| format!(", {}", cdp_core::time::fmt_ns(e.ts_ns)))
                .unwrap_or_default(),
            with_damage(h, last + 1, u64::MAX)
        )));
    }
    // The newest record at or before the point: are records missing between
    // it and the point?
    if let Some(p) = h.entries().map(|(_, e)| e.seq).filter(|&s| s <= seq).max() {
        if p < seq {
            if let Some(why) = missing_after(h, p) {
                return Err(impossible(why));
            }
        }
    }
    if h.baselines.is_empty() {
        let unreadable: Vec<&str> = h
            .orphans
            .iter()
            .filter(|k| k.contains("/baselines/"))
            .map(String::as_str)
            .collect();
        return Err(impossible(if unreadable.is_empty() {
            "the repository has no baseline of this disk: take one with `cdpctl baseline`".into()
        } else {
            format!(
                "no usable baseline of this disk: {} cannot be read (run `cdpctl verify`)",
                unreadable.join(", ")
            )
        }));
    }
    let mut why_not = Vec::new();
    for (key, b) in h.baselines.iter().rev() {
        if b.s1 > seq {
            why_not.push(format!(
                "baseline {key} is consistent only from seq {}",
                b.s1
            ));
            continue;
        }
        match covered(h, b.s0, seq) {
            Ok(()) => return Ok(build(h, key, b, seq)),
            Err(w) => why_not.push(format!("baseline {key}: {w}")),
        }
    }
    Err(impossible(why_not.join("; ")))
}

/// Does segment `k`, the first with records after `s0`, follow on from
/// `s0`: no record between them missing (the journal's very first
/// segment, one that begins right after `s0`, or the first left after what
/// retention removed; else no break before it)?
fn follows_on(h: &History, k: usize, s0: u64) -> bool {
    if k == 0 {
        h.segments[0].record_base == 0 || h.segments[0].first_seq <= s0 + 1 || h.retained_after(s0)
    } else {
        !h.breaks.contains(&k)
    }
}

/// Is every record of (s0, seq] present, with no GAP among them?
fn covered(h: &History, s0: u64, seq: u64) -> Result<(), String> {
    let k = h.segments.iter().position(|s| s.last_seq > s0);
    let Some(k) = k else {
        return Ok(()); // nothing written after the baseline's scan began
    };
    if !follows_on(h, k, s0) {
        return Err(format!(
            "journal records between seq {s0} and seq {} are missing{}",
            h.segments[k].first_seq,
            with_damage(h, s0 + 1, h.segments[k].first_seq - 1)
        ));
    }
    for &b in &h.breaks {
        if b > k && h.segments[b - 1].last_seq < seq {
            let (lo, hi) = (h.segments[b - 1].last_seq, h.segments[b].first_seq);
            return Err(format!(
                "journal records between seq {lo} and seq {hi} are missing{}",
                with_damage(h, lo + 1, hi - 1)
            ));
        }
    }
    for s in &h.segments[k..] {
        for e in &s.entries {
            if e.seq > s0 && e.seq <= seq && e.kind == Kind::Gap {
                match h.resyncs.healed_by(e.seq) {
                    Some(r) if r <= seq => continue,
                    _ => return Err(gap_why(h, e.seq)),
                }
            }
        }
    }
    // A record journaled inside a window that a later GAP announces (a MARK
    // or FLUSH while the journal refused data): the replay misses writes.
    if let Some(g) = h.ts_at(seq).and_then(|t| h.unjournaled_window(seq, t)) {
        return Err(gap_why(h, g));
    }
    Ok(())
}

/// Why a point at or after the GAP at `seq` (and before what heals it, if
/// anything does) cannot be rebuilt from a baseline older than the GAP.
fn gap_why(h: &History, seq: u64) -> String {
    match h.gap_note(seq) {
        Some(note) => format!("seq {seq} is a GAP: {note}"),
        None => format!(
            "seq {seq} is a GAP (capture was interrupted: the image may differ from the journal there); a baseline taken after it is needed"
        ),
    }
}

fn build(h: &History, key: &str, b: &Baseline, seq: u64) -> Plan {
    let mut m = ExtentMap::new();
    let mut records = 0;
    // The disk's size as each record was written: the baseline's, changed
    // by every RESIZE since (docs/REPOSITORY_FORMAT.md, "RESIZE").
    let mut size = b.size;
    for (i, s) in h.segments.iter().enumerate() {
        if s.last_seq <= b.s0 || s.first_seq > seq {
            continue;
        }
        for e in &s.entries {
            if e.seq <= b.s0 || e.seq > seq {
                continue;
            }
            let end = e.offset.saturating_add(e.length).min(size);
            match e.kind {
                Kind::Write => m.set(
                    e.offset,
                    end,
                    Source::Journal {
                        segment: i as u32,
                        pos: e.payload_pos,
                    },
                ),
                Kind::Zero | Kind::Trim => m.set(e.offset, end, Source::Zero),
                Kind::Resize => {
                    // What a shrink drops reads as zeros if the disk grows
                    // again; a grown tail reads as zeros until written.
                    let new = e.length;
                    m.set(size.min(new), size.max(new), Source::Zero);
                    size = new;
                }
                _ => continue,
            }
            records += 1;
        }
    }
    m.truncate(size);
    Plan {
        vm: h.vm.clone(),
        disk: h.disk.clone(),
        size,
        point_seq: seq,
        baseline_key: key.to_string(),
        baseline: b.clone(),
        extents: m,
        segments: h.segments.clone(),
        records,
    }
}

/// The seq ranges of a disk that can be restored exactly: for each baseline,
/// from its s1 up to the record before the first GAP or missing stretch
/// after its s0, skipping the stretch [G, R) of each GAP at G that a
/// RESYNCED at R heals. Merged, in order.
pub fn restorable_ranges(h: &History) -> Vec<(u64, u64)> {
    let Some(last) = h.last_entry().map(|e| e.seq) else {
        return Vec::new();
    };
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (_, b) in &h.baselines {
        // An exact baseline needs no record for its own point.
        if b.s0 == b.s1 && b.s1 >= 1 {
            ranges.push((b.s1, b.s1));
        }
        let mut start = b.s1.max(1);
        let mut end = last;
        if let Some(k) = h.segments.iter().position(|s| s.last_seq > b.s0) {
            if !follows_on(h, k, b.s0) {
                continue;
            }
            if let Some(&br) = h.breaks.iter().find(|&&br| br > k) {
                end = end.min(h.segments[br - 1].last_seq);
            }
            let gaps = h.segments[k..]
                .iter()
                .flat_map(|s| s.entries.iter())
                .filter(|e| e.seq > b.s0 && e.kind == Kind::Gap);
            for g in gaps {
                if g.seq > end {
                    break;
                }
                // The window may begin before the GAP (records journaled
                // while the journal refused data).
                let from = h.window_start(g.seq).max(b.s0 + 1);
                match h.resyncs.healed_by(g.seq) {
                    Some(r) => {
                        if start < from {
                            ranges.push((start, from - 1));
                        }
                        start = start.max(r);
                    }
                    None => {
                        end = end.min(from - 1);
                        break;
                    }
                }
            }
        }
        if start <= end {
            ranges.push((start, end));
        }
    }
    ranges.sort();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for r in ranges {
        match merged.last_mut() {
            Some(m) if r.0 <= m.1 + 1 => m.1 = m.1.max(r.1),
            _ => merged.push(r),
        }
    }
    merged
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
