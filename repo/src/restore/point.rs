//! Points of a disk's history: parsing what a user names (`latest`, `seq:N`,
//! `mark:LABEL`, a time) and resolving it to a seq of the [`History`],
//! refusing a point whose state is not certain.

use cdp_core::journal::format::{IndexEntry, Kind};

use super::history::{damaged_in, missing_after, with_damage, History};
use super::read::read_record;
use super::RestoreError;
use crate::store::Store;

/// A point in a VM's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Point {
    Seq(u64),
    TimeNs(u64),
    Mark(String),
    Latest,
}

impl Point {
    pub fn parse(s: &str, now_ns: u64) -> Result<Point, RestoreError> {
        let t = s.trim();
        if let Some(n) = t.strip_prefix("seq:") {
            return n
                .trim()
                .parse()
                .map(Point::Seq)
                .map_err(|_| RestoreError::BadPoint(s.into()));
        }
        if let Some(l) = t.strip_prefix("mark:") {
            if l.is_empty() {
                return Err(RestoreError::BadPoint(s.into()));
            }
            return Ok(Point::Mark(l.to_string()));
        }
        if t == "latest" || t == "now" {
            return Ok(Point::Latest);
        }
        cdp_core::time::parse_time(t, now_ns)
            .map(Point::TimeNs)
            .map_err(|_| RestoreError::BadPoint(s.into()))
    }
}

impl std::fmt::Display for Point {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Point::Seq(n) => write!(f, "seq:{n}"),
            Point::TimeNs(t) => write!(f, "{}", cdp_core::time::fmt_ns(*t)),
            Point::Mark(l) => write!(f, "mark:{l}"),
            Point::Latest => write!(f, "latest"),
        }
    }
}

/// Resolve a point to a sequence number of this disk's history.
pub async fn resolve(h: &History, store: Option<&Store>, p: &Point) -> Result<u64, RestoreError> {
    let last = h.last_entry().ok_or_else(|| {
        let why = format!(
            "the disk has no journal records{}",
            super::history::with_damage(h, 0, u64::MAX)
        );
        impossible(h, p, why)
    })?;
    match p {
        Point::Seq(n) => Ok(*n),
        Point::Latest => unambiguous(h, p, last.seq),
        Point::TimeNs(t) => {
            let seq = match resolve_time(h, p, *t)? {
                // The newest record, for a time after it. (A point retention
                // kept past it has an exact baseline, and its state lasted.)
                seq if *t > last.ts_ns && seq == last.seq => after_newest(h, p, last)?,
                seq => seq,
            };
            outside_windows(h, p, seq, *t)
        }
        Point::Mark(label) => resolve_mark(h, store, p, label).await,
    }
}

/// A time inside the window a later resync GAP announces (from its
/// `since_ns`) names a state no record holds: writes then reached the disk
/// unjournaled, whatever record the time falls after.
fn outside_windows(h: &History, p: &Point, seq: u64, t: u64) -> Result<u64, RestoreError> {
    match h.unjournaled_window(seq, t) {
        Some(g) => Err(impossible(
            h,
            p,
            format!(
                "it lies in the window of the GAP at seq {g}: {}",
                h.gap_note(g)
                    .unwrap_or_else(|| "writes then were not journaled".into())
            ),
        )),
        None => Ok(seq),
    }
}

fn impossible(h: &History, p: &Point, why: String) -> RestoreError {
    RestoreError::Impossible {
        disk: h.disk.clone(),
        point: p.to_string(),
        why,
    }
}

/// A time or "latest" names the newest record up to then: if records after
/// the one found (`seq`) are missing, that may not be the right one.
fn unambiguous(h: &History, p: &Point, seq: u64) -> Result<u64, RestoreError> {
    match missing_after(h, seq) {
        Some(why) => Err(impossible(
            h,
            p,
            format!("{why}, so the state at this point is unknown; seq:{seq} can be restored"),
        )),
        None => Ok(seq),
    }
}

/// A time after the disk's newest record: the state then is that record's
/// only when nothing was written after it, i.e. the record ends a capture
/// session (SESSION_END: the VM stopped cleanly). While capture runs, later
/// writes may not be shipped yet, or (degraded mode, docs/RELIABILITY.md,
/// "A full journal") not journaled at all until a GAP announces them with
/// the time their window began: the newest record is then not the state
/// at that time, and the point is refused. `latest` names no time and
/// still resolves to the newest record.
fn after_newest(h: &History, p: &Point, last: &IndexEntry) -> Result<u64, RestoreError> {
    if last.kind == Kind::SessionEnd {
        return unambiguous(h, p, last.seq);
    }
    let at = cdp_core::time::fmt_ns(last.ts_ns);
    Err(impossible(
        h,
        p,
        format!(
            "{p} is after the newest record of {} in the repository (seq {}, {at}) and capture was still running: later writes may not be shipped yet; restore `latest` (the state at {at}), or wait for the shipper and try again",
            h.disk, last.seq
        ),
    ))
}

/// A point of a disk whose journal has been full since `since_ns` (its
/// dirty map says so: degraded mode, docs/RELIABILITY.md, "A full journal"):
/// writes from then on reached the image but not the journal, and no
/// RESYNCED has healed them yet. A time from `since_ns` on, or a record
/// journaled since (a MARK, a SESSION_END while degraded), does not name a
/// state the journal holds: refused. Points before it are left as they
/// are. `seq` is the point resolved.
pub fn refuse_unjournaled(
    h: &History,
    p: &Point,
    seq: u64,
    since_ns: u64,
) -> Result<(), RestoreError> {
    let ts = match p {
        Point::TimeNs(t) => Some(*t),
        _ => h
            .entries()
            .find(|(_, e)| e.seq == seq)
            .map(|(_, e)| e.ts_ns),
    };
    match ts {
        Some(t) if since_ns != 0 && t >= since_ns => Err(impossible(
            h,
            p,
            format!(
                "the journal of {} on this host has been full since {} (degraded mode): writes since then reached the disk but are not journaled yet, so no point from then on can be restored until cdpd's resync finishes (`cdpctl status` shows it); restore a point before {}",
                h.disk,
                cdp_core::time::fmt_ns(since_ns),
                cdp_core::time::fmt_ns(since_ns)
            ),
        )),
        _ => Ok(()),
    }
}

/// The newest record at or before `t`, or, older than what retention keeps
/// whole, the kept point whose state lasted past `t`.
fn resolve_time(h: &History, p: &Point, t: u64) -> Result<u64, RestoreError> {
    let j = h
        .entries()
        .filter(|(_, e)| e.ts_ns <= t)
        .map(|(_, e)| e.seq)
        .max();
    let Some((m, d)) = h.retained() else {
        return j
            .ok_or_else(|| impossible(h, p, "it is before the first record of the journal".into()))
            .and_then(|seq| unambiguous(h, p, seq));
    };
    if t >= d.from_ts_ns {
        // Every record of the disk after journal_from_seq is here.
        return match j {
            Some(j) if j > d.journal_from_seq => unambiguous(h, p, j),
            _ => Ok(d.journal_from_seq),
        };
    }
    // Older than what retention keeps whole: a kept point whose state
    // lasted until after `t`, or a record still here.
    let kept = m
        .points
        .iter()
        .chain(std::iter::once(&m.window))
        .filter(|k| k.ts_ns <= t && k.until_ns.is_some_and(|u| t < u))
        .map(|k| k.seq)
        .max();
    match j.max(kept) {
        Some(s) => Ok(s),
        None => Err(impossible(h, p, h.thinned_time(t))),
    }
}

/// The newest MARK record labelled `label`, or the point retention kept for
/// it. A mark record that cannot be read, or records lost after the mark
/// found, may hide a newer mark of the same label: then the point is not
/// certain, and is refused.
async fn resolve_mark(
    h: &History,
    store: Option<&Store>,
    p: &Point,
    label: &str,
) -> Result<u64, RestoreError> {
    let marks: Vec<(usize, IndexEntry)> = h
        .entries()
        .filter(|(_, e)| e.kind == Kind::Mark)
        .map(|(i, e)| (i, *e))
        .collect();
    // Newest first.
    let mut unreadable: Vec<String> = Vec::new();
    for (i, e) in marks.into_iter().rev() {
        let payload = match read_record(store, &h.vm, &h.disk, &h.segments[i], &e, None).await {
            Ok((_, payload)) => payload,
            Err(err) => {
                unreadable.push(format!(
                    "the mark record at seq {} cannot be read ({err})",
                    e.seq
                ));
                continue;
            }
        };
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
        if v["label"] == label {
            return mark_certain(h, p, label, &e, unreadable);
        }
    }
    // Older than the journal kept: a point retention kept for it.
    if let Some(k) = h
        .kept_points()
        .into_iter()
        .rev()
        .find(|k| k.marks.iter().any(|m| m == label))
    {
        return Ok(k.seq);
    }
    unreadable.extend(
        Some(with_damage(h, 0, u64::MAX))
            .filter(|d| !d.is_empty())
            .map(|d| d.trim_start().to_string()),
    );
    Err(impossible(
        h,
        p,
        format!(
            "no mark {label:?} in the journal{}",
            if unreadable.is_empty() {
                String::new()
            } else {
                format!(" that can be read: {}", unreadable.join("; "))
            }
        ),
    ))
}

/// The mark `label` found at `e`: its seq, unless a newer mark of the same
/// label may be among records that cannot be read (`unreadable`, newer
/// than `e`) or are missing after it.
fn mark_certain(
    h: &History,
    p: &Point,
    label: &str,
    e: &IndexEntry,
    mut why: Vec<String>,
) -> Result<u64, RestoreError> {
    if h.breaks
        .iter()
        .any(|&b| h.segments[b - 1].last_seq >= e.seq)
    {
        why.push("journal records after it are missing".into());
    }
    let d = damaged_in(h, e.seq + 1, u64::MAX);
    if !d.is_empty() {
        why.push(format!("{} cannot be used", d.join(", ")));
    }
    if why.is_empty() {
        return Ok(e.seq);
    }
    Err(impossible(
        h,
        p,
        format!(
            "mark {label:?} is at seq {}, but {}, where a newer mark {label:?} may be lost (run `cdpctl verify`); if seq {} is the one, restore at seq:{}",
            e.seq,
            why.join("; "),
            e.seq,
            e.seq
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restore::history::{SegLoc, SegRef};

    /// A history of one segment: a record of each kind at seq 1, 2, … and
    /// ts 1000, 2000, ….
    fn history(kinds: &[Kind]) -> History {
        let entries: Vec<IndexEntry> = kinds
            .iter()
            .enumerate()
            .map(|(i, &kind)| IndexEntry {
                seq: i as u64 + 1,
                ts_ns: (i as u64 + 1) * 1000,
                offset: 0,
                length: if kind == Kind::Write { 512 } else { 0 },
                payload_pos: (i as u64 + 1) * 1_000_000,
                kind,
                flags: 0,
            })
            .collect();
        History {
            vm: "vm".into(),
            disk: "vda".into(),
            baselines: Vec::new(),
            segments: vec![SegRef {
                first_seq: 1,
                last_seq: entries.len() as u64,
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
            resyncs: Default::default(),
        }
    }

    fn at(h: &History, p: Point) -> Result<u64, String> {
        futures::executor::block_on(resolve(h, None, &p)).map_err(|e| e.to_string())
    }

    #[test]
    fn a_time_after_the_newest_record_is_refused_while_capture_runs() {
        let h = history(&[Kind::SessionStart, Kind::Write, Kind::Write]);
        // Inside the history: the newest record at or before the time.
        assert_eq!(at(&h, Point::TimeNs(2500)), Ok(2));
        assert_eq!(at(&h, Point::TimeNs(3000)), Ok(3));
        // After it: later writes may not be shipped (or journaled) yet.
        let e = at(&h, Point::TimeNs(3001)).unwrap_err();
        assert!(
            e.contains("after the newest record of vda")
                && e.contains("seq 3")
                && e.contains("capture was still running")
                && e.contains("restore `latest`"),
            "{e}"
        );
        // `latest` names no time: still the newest record.
        assert_eq!(at(&h, Point::Latest), Ok(3));
        assert_eq!(at(&h, Point::Seq(3)), Ok(3));
    }

    #[test]
    fn a_time_after_a_clean_stop_is_the_state_it_left() {
        let h = history(&[Kind::SessionStart, Kind::Write, Kind::SessionEnd]);
        assert_eq!(at(&h, Point::TimeNs(3001)), Ok(3));
        assert_eq!(at(&h, Point::TimeNs(u64::MAX)), Ok(3));
        // A new session after it: open again, so refused again.
        let h = history(&[
            Kind::SessionStart,
            Kind::SessionEnd,
            Kind::SessionStart,
            Kind::Write,
        ]);
        assert_eq!(at(&h, Point::TimeNs(2500)), Ok(2));
        assert!(at(&h, Point::TimeNs(9000)).is_err());
    }

    #[test]
    fn points_from_when_the_journal_filled_are_refused() {
        let h = history(&[Kind::SessionStart, Kind::Write, Kind::Mark, Kind::Write]);
        let since = 2500;
        let check = |p: Point| {
            let seq = at(&h, p.clone()).unwrap();
            refuse_unjournaled(&h, &p, seq, since).map_err(|e| e.to_string())
        };
        assert_eq!(check(Point::TimeNs(2400)), Ok(()));
        assert_eq!(check(Point::Seq(2)), Ok(()));
        let e = check(Point::TimeNs(2600)).unwrap_err();
        assert!(e.contains("full since") && e.contains("degraded"), "{e}");
        // A record journaled since (a MARK while degraded): its state lacks
        // the writes taken before it.
        assert!(check(Point::Seq(3)).is_err());
        assert!(check(Point::Latest).is_err());
        // A clean map (since 0) refuses nothing.
        assert!(refuse_unjournaled(&h, &Point::Latest, 4, 0).is_ok());
    }

    #[test]
    fn points() {
        assert_eq!(Point::parse("seq:42", 0).unwrap(), Point::Seq(42));
        assert_eq!(
            Point::parse("mark:before-upgrade", 0).unwrap(),
            Point::Mark("before-upgrade".into())
        );
        assert_eq!(Point::parse("latest", 0).unwrap(), Point::Latest);
        assert!(matches!(
            Point::parse("2026-11-22T10:15:03Z", 0).unwrap(),
            Point::TimeNs(_)
        ));
        assert_eq!(
            Point::parse("10 minutes ago", 1_000_000_000_000).unwrap(),
            Point::TimeNs(1_000_000_000_000 - 600_000_000_000)
        );
        assert!(Point::parse("seq:x", 0).is_err());
        assert!(Point::parse("mark:", 0).is_err());
        assert!(Point::parse("someday", 0).is_err());
    }
}
