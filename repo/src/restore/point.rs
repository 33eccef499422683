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
        Point::TimeNs(t) => resolve_time(h, p, *t),
        Point::Mark(label) => resolve_mark(h, store, p, label).await,
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
