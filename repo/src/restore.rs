//! Restore: a disk as it was at a point, from a baseline plus the journal.
//!
//! Three steps, so that each can be checked (and the plan shown) on its own:
//! 1. [`load_history`]: the disk's baselines and journal segments, from the
//!    repository (LIST + `.idx` objects) and, when the host still has them,
//!    from its local segments (the newest records, not shipped yet).
//! 2. [`plan`]: pick the newest baseline consistent at or before the point,
//!    and build the extent map of the last write to every byte range up to
//!    the point from the segment indexes alone (no payload is read).
//! 3. [`execute`]: emit every byte range of the disk exactly once, as data
//!    or as zeros, to a [`Sink`] (a fresh sparse file, the disk in place, …),
//!    fetching only the chunks and record payloads the map names, in
//!    parallel, checking every checksum on the way.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use cdp_core::journal::extents::{ExtentMap, Source};
use cdp_core::journal::format::{self as jf, IndexEntry, Kind, RecordHeader, RECORD_HEADER_LEN};
use futures::StreamExt;
use thiserror::Error;

use crate::format::{self as rf, Baseline, Frame};
use crate::read::ReadError;
use crate::store::{with_retry, RetryPolicy, Store};

#[derive(Debug, Error)]
pub enum RestoreError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot restore {disk} at {point}: {why}")]
    Impossible {
        disk: String,
        point: String,
        why: String,
    },
    #[error("{what}: {why}")]
    Corrupt { what: String, why: String },
    #[error("bad point {0:?}: use an RFC 3339 time, \"10 minutes ago\", seq:N or mark:LABEL")]
    BadPoint(String),
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

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

/// Where a segment's bytes are.
#[derive(Debug, Clone)]
pub enum SegLoc {
    /// In the repository: `.seg.zst` with this frame table.
    Repo {
        frames: Vec<Frame>,
        object_size: u64,
    },
    /// A segment file on this host.
    Local(PathBuf),
}

#[derive(Debug, Clone)]
pub struct SegRef {
    pub first_seq: u64,
    pub last_seq: u64,
    pub record_base: u64,
    pub entries: Vec<IndexEntry>,
    pub loc: SegLoc,
}

/// Everything known about one disk's history.
#[derive(Debug, Clone)]
pub struct History {
    pub vm: String,
    pub disk: String,
    pub baselines: Vec<(String, Baseline)>,
    /// In replay order, repository and local merged.
    pub segments: Vec<SegRef>,
    /// Index of the first segment after each break in the record chain.
    pub breaks: Vec<usize>,
    /// Repository objects that cannot be used: a segment without its index
    /// or an index without its segment, an index or baseline that does not
    /// decode (`cdpctl verify` says which and why).
    pub orphans: Vec<String>,
    /// The newest retention manifest of the VM: what a prune kept (points
    /// older than the any-point window exist only as exact baselines).
    pub retention: Option<rf::RetentionManifest>,
}

impl History {
    /// What retention did to this disk, if it thinned it.
    pub fn retained(&self) -> Option<(&rf::RetentionManifest, &rf::DiskRetention)> {
        let m = self.retention.as_ref()?;
        Some((m, m.disk(&self.disk)?))
    }

    /// Is every record of this disk after `s0` in the history as far as
    /// retention is concerned: it deleted records only up to its
    /// `journal_from_seq`, and the first segment left follows on from what
    /// it kept?
    pub fn retained_after(&self, s0: u64) -> bool {
        match (self.retained(), self.segments.first()) {
            (Some((_, d)), Some(f)) => s0 >= d.journal_from_seq && f.record_base <= d.record_base,
            (Some((_, d)), None) => s0 >= d.journal_from_seq,
            _ => false,
        }
    }

    /// An exact baseline (s0 = s1 = seq: no record needed) at `seq`.
    pub fn exact_baseline(&self, seq: u64) -> Option<&(String, Baseline)> {
        self.baselines
            .iter()
            .rev()
            .find(|(_, b)| b.s0 == seq && b.s1 == seq)
    }

    /// The points retention kept, oldest first, with the first point of the
    /// any-point window last.
    pub fn kept_points(&self) -> Vec<&rf::KeptPoint> {
        match &self.retention {
            Some(m) => m.points.iter().chain(std::iter::once(&m.window)).collect(),
            None => Vec::new(),
        }
    }

    /// Why a point retention thinned away cannot be restored, naming the
    /// nearest points kept. `key` orders points: by seq or by time.
    pub fn thinned_why(
        &self,
        below: Option<&rf::KeptPoint>,
        above: Option<&rf::KeptPoint>,
    ) -> String {
        let m = self.retention.as_ref();
        let show =
            |p: &rf::KeptPoint| format!("seq:{} ({})", p.seq, cdp_core::time::fmt_ns(p.ts_ns));
        let mut near = Vec::new();
        if let Some(p) = below {
            near.push(format!("before it {}", show(p)));
        }
        if let Some(p) = above {
            near.push(format!("after it {}", show(p)));
        }
        format!(
            "retention thinned this point away (prune of {}): the nearest kept points are {}; every point from {} on can be restored (`cdpctl points` lists them)",
            m.map_or("?".into(), |m| cdp_core::time::fmt_ns(m.written_ns)),
            if near.is_empty() { "none".to_string() } else { near.join(", ") },
            m.map_or("?".into(), |m| show(&m.window)),
        )
    }

    /// [`History::thinned_why`] for a seq.
    pub fn thinned_seq(&self, seq: u64) -> String {
        let k = self.kept_points();
        let below = k.iter().rev().find(|p| p.seq < seq).copied();
        let above = k.iter().find(|p| p.seq > seq).copied();
        self.thinned_why(below, above)
    }

    /// [`History::thinned_why`] for a time.
    pub fn thinned_time(&self, ts: u64) -> String {
        let k = self.kept_points();
        let below = k.iter().rev().find(|p| p.ts_ns <= ts).copied();
        let above = k.iter().find(|p| p.ts_ns > ts).copied();
        self.thinned_why(below, above)
    }

    pub fn last_entry(&self) -> Option<&IndexEntry> {
        self.segments.iter().rev().find_map(|s| s.entries.last())
    }

    pub fn entries(&self) -> impl Iterator<Item = (usize, &IndexEntry)> {
        self.segments
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.entries.iter().map(move |e| (i, e)))
    }
}

/// Local segments of a disk: sealed ones by their index, the open one by a
/// scan (its torn tail, if any, ignored).
fn local_segments(state_dir: &Path, vm: &str, disk: &str) -> Result<Vec<SegRef>, RestoreError> {
    let dir = cdp_core::journal::journal_dir(state_dir, vm, disk);
    let mut out = Vec::new();
    for (_, path) in cdp_core::journal::list_segments(&dir).map_err(|e| RestoreError::Corrupt {
        what: dir.display().to_string(),
        why: e.to_string(),
    })? {
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            // Trimmed by the shipper meanwhile: the repository has it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&path)(e)),
        };
        let corrupt = |why: String| RestoreError::Corrupt {
            what: path.display().to_string(),
            why,
        };
        let header = jf::SegmentHeader::decode(&bytes).map_err(|e| corrupt(e.to_string()))?;
        let entries = match jf::read_index(&bytes).map_err(|e| corrupt(e.to_string()))? {
            Some(e) => e,
            None => jf::scan_segment(&bytes)
                .map_err(|e| corrupt(e.to_string()))?
                .records
                .iter()
                .map(|r| r.index_entry())
                .collect(),
        };
        let Some(last) = entries.last() else { continue };
        out.push(SegRef {
            first_seq: header.first_seq,
            last_seq: last.seq,
            record_base: header.record_base,
            entries,
            loc: SegLoc::Local(path),
        });
    }
    Ok(out)
}

/// Load a disk's history from the repository and/or the host's state dir.
pub async fn load_history(
    store: Option<&Store>,
    state_dir: Option<&Path>,
    vm: &str,
    disk: &str,
) -> Result<History, RestoreError> {
    let mut by_first: BTreeMap<u64, SegRef> = BTreeMap::new();
    let mut baselines = Vec::new();
    let mut orphans = Vec::new();
    let mut retention = None;
    if let Some(store) = store {
        let chain = load_repo_chain(store, vm, disk, &mut orphans).await?;
        for s in chain {
            by_first.insert(
                s.meta.first_seq,
                SegRef {
                    first_seq: s.meta.first_seq,
                    last_seq: s.meta.last_seq,
                    record_base: s.meta.record_base,
                    loc: SegLoc::Repo {
                        frames: s.frames,
                        object_size: s.meta.object_size,
                    },
                    entries: s.entries,
                },
            );
        }
        // A baseline that does not decode is left out: restore uses the
        // others, and says so when none is left.
        let list = store
            .list(&rf::baseline_prefix(vm, disk))
            .await
            .map_err(ReadError::from)?;
        for o in list {
            if rf::parse_baseline_name(o.key.rsplit('/').next().unwrap_or("")).is_none() {
                continue;
            }
            let b = store.get(&o.key).await.map_err(ReadError::from)?;
            match serde_json::from_slice::<Baseline>(&b) {
                Ok(bl) => baselines.push((o.key, bl)),
                Err(_) => orphans.push(o.key),
            }
        }
        baselines.sort_by_key(|(_, b): &(String, Baseline)| (b.s1, b.s0));
        retention = load_retention(store, vm).await?;
    }
    if let Some(dir) = state_dir {
        for s in local_segments(dir, vm, disk)? {
            // The same segment in both places: the local copy is cheaper.
            by_first.insert(s.first_seq, s);
        }
    }
    let segments: Vec<SegRef> = by_first.into_values().collect();
    let mut breaks = Vec::new();
    for (i, w) in segments.windows(2).enumerate() {
        if w[1].record_base != w[0].record_base + w[0].entries.len() as u64 {
            breaks.push(i + 1);
        }
    }
    Ok(History {
        vm: vm.to_string(),
        disk: disk.to_string(),
        baselines,
        segments,
        breaks,
        orphans,
        retention,
    })
}

/// The newest retention manifest of a VM that decodes (older ones are
/// left by a prune that was interrupted before removing them).
pub async fn load_retention(
    store: &Store,
    vm: &str,
) -> Result<Option<rf::RetentionManifest>, RestoreError> {
    let mut list = store
        .list(&rf::retention_prefix(vm))
        .await
        .map_err(ReadError::from)?;
    list.sort();
    for o in list.iter().rev().filter(|o| o.key.ends_with(".json")) {
        let b = match store.get(&o.key).await {
            Ok(b) => b,
            Err(crate::store::StoreError::NotFound { .. }) => continue,
            Err(e) => return Err(ReadError::from(e).into()),
        };
        if let Ok(m) = serde_json::from_slice::<rf::RetentionManifest>(&b) {
            if m.vm_uuid == vm {
                return Ok(Some(m));
            }
        }
    }
    Ok(None)
}

/// A disk's journal in the repository, in replay order. Objects that cannot
/// be used (a segment without its index or the reverse, an index that does
/// not decode) go to `unusable`: the record chain breaks there, so no point
/// that needs them is planned.
async fn load_repo_chain(
    store: &Store,
    vm: &str,
    disk: &str,
    unusable: &mut Vec<String>,
) -> Result<Vec<rf::SegmentIndex>, RestoreError> {
    let mut pairs: BTreeMap<(u64, u64), (Option<String>, Option<String>)> = BTreeMap::new();
    for o in store
        .list(&rf::journal_prefix(vm, disk))
        .await
        .map_err(ReadError::from)?
    {
        if let Some((a, b, is_idx)) = rf::parse_journal_name(o.key.rsplit('/').next().unwrap_or(""))
        {
            let e = pairs.entry((a, b)).or_default();
            *(if is_idx { &mut e.1 } else { &mut e.0 }) = Some(o.key);
        }
    }
    let mut out = Vec::new();
    for (_, pair) in pairs {
        match pair {
            (Some(_), Some(idx)) => {
                let b = store.get(&idx).await.map_err(ReadError::from)?;
                match rf::SegmentIndex::decode(&idx, &b) {
                    Ok(i) => out.push(i),
                    Err(_) => unusable.push(idx),
                }
            }
            (Some(k), None) | (None, Some(k)) => unusable.push(k),
            (None, None) => {}
        }
    }
    Ok(out)
}

/// Unusable repository objects of the journal whose seq range meets
/// `lo..=hi` and that no loaded segment stands in for.
fn damaged_in(h: &History, lo: u64, hi: u64) -> Vec<&str> {
    h.orphans
        .iter()
        .filter(|k| {
            let Some((a, b, _)) = rf::parse_journal_name(k.rsplit('/').next().unwrap_or("")) else {
                return false;
            };
            a <= hi
                && b >= lo
                && !h
                    .segments
                    .iter()
                    .any(|s| s.first_seq <= a && s.last_seq >= b)
        })
        .map(String::as_str)
        .collect()
}

fn with_damage(h: &History, lo: u64, hi: u64) -> String {
    let d = damaged_in(h, lo, hi);
    if d.is_empty() {
        String::new()
    } else {
        format!(
            " (unusable in the repository: {}; run `cdpctl verify`)",
            d.join(", ")
        )
    }
}

/// Are records known to be missing right after record `p` (before the next
/// record the history has)? Then no point between `p` and that next record
/// can be rebuilt exactly: its records may be among the missing ones.
fn missing_after(h: &History, p: u64) -> Option<String> {
    let i = h.segments.partition_point(|s| s.first_seq <= p);
    if i == 0 || p < h.segments[i - 1].last_seq {
        return None;
    }
    let last = h.segments[i - 1].last_seq;
    match h.segments.get(i) {
        Some(next) if h.breaks.contains(&i) => Some(format!(
            "the journal records between seq {last} and seq {} are missing{}",
            next.first_seq,
            with_damage(h, last + 1, next.first_seq - 1)
        )),
        Some(_) => None,
        None => {
            let d = damaged_in(h, last + 1, u64::MAX);
            (!d.is_empty()).then(|| {
                format!(
                    "the journal after seq {last} is damaged ({}; run `cdpctl verify`)",
                    d.join(", ")
                )
            })
        }
    }
}

/// Read raw bytes of a segment: a file range, or the frames of the object
/// that hold it (one ranged GET), decompressed.
pub async fn read_raw(
    store: Option<&Store>,
    vm: &str,
    disk: &str,
    seg: &SegRef,
    range: Range<u64>,
) -> Result<Vec<u8>, RestoreError> {
    match &seg.loc {
        SegLoc::Local(path) => {
            let f = File::open(path).map_err(io_err(path))?;
            let mut buf = vec![0u8; (range.end - range.start) as usize];
            f.read_exact_at(&mut buf, range.start)
                .map_err(io_err(path))?;
            Ok(buf)
        }
        SegLoc::Repo {
            frames,
            object_size,
        } => {
            let key = rf::segment_key(vm, disk, seg.first_seq, seg.last_seq);
            let store = store.ok_or_else(|| RestoreError::Corrupt {
                what: key.clone(),
                why: "segment is only in the repository, and no repository was given".into(),
            })?;
            let first = frames
                .partition_point(|f| f.raw_offset <= range.start)
                .saturating_sub(1);
            let last = frames
                .partition_point(|f| f.raw_offset < range.end)
                .max(first + 1)
                - 1;
            let obj_start = frames[first].object_offset;
            let obj_end = frames
                .get(last + 1)
                .map_or(*object_size, |f| f.object_offset);
            let retry = RetryPolicy::default();
            let obj = with_retry(&key, &retry, || store.get_range(&key, obj_start..obj_end))
                .await
                .map_err(ReadError::from)?;
            let raw = rf::decompress_segment(&key, &obj).map_err(ReadError::from)?;
            let base = frames[first].raw_offset;
            let (a, b) = ((range.start - base) as usize, (range.end - base) as usize);
            if b > raw.len() {
                return Err(RestoreError::Corrupt {
                    what: key,
                    why: "frames shorter than the index says".into(),
                });
            }
            Ok(raw[a..b].to_vec())
        }
    }
}

/// Read a whole record (header + payload) and check its CRC.
pub async fn read_record(
    store: Option<&Store>,
    vm: &str,
    disk: &str,
    seg: &SegRef,
    e: &IndexEntry,
    payload_len: Option<u64>,
) -> Result<(RecordHeader, Vec<u8>), RestoreError> {
    let hpos = e.payload_pos - RECORD_HEADER_LEN as u64;
    let len = match payload_len {
        Some(n) => n,
        None => {
            let hb = read_raw(store, vm, disk, seg, hpos..e.payload_pos).await?;
            RecordHeader::decode(&hb)
                .map_err(|err| RestoreError::Corrupt {
                    what: format!("{disk} seq {}", e.seq),
                    why: err.to_string(),
                })?
                .payload_len as u64
        }
    };
    let raw = read_raw(store, vm, disk, seg, hpos..e.payload_pos + len).await?;
    check_record(disk, e, &raw).map(|h| (h, raw[RECORD_HEADER_LEN..].to_vec()))
}

/// Check a whole record (header + payload, `raw`) against its CRC and its
/// index entry.
pub fn check_record(disk: &str, e: &IndexEntry, raw: &[u8]) -> Result<RecordHeader, RestoreError> {
    let corrupt = |why: String| RestoreError::Corrupt {
        what: format!("{disk} record seq {}", e.seq),
        why,
    };
    let h = RecordHeader::decode(&raw[..RECORD_HEADER_LEN]).map_err(|x| corrupt(x.to_string()))?;
    h.verify(&raw[..RECORD_HEADER_LEN], &raw[RECORD_HEADER_LEN..])
        .map_err(|x| corrupt(x.to_string()))?;
    if h.seq != e.seq || h.offset != e.offset || h.kind != e.kind {
        return Err(corrupt("record does not match its index entry".into()));
    }
    Ok(h)
}

/// Resolve a point to a sequence number of this disk's history.
pub async fn resolve(h: &History, store: Option<&Store>, p: &Point) -> Result<u64, RestoreError> {
    let impossible = |why: String| RestoreError::Impossible {
        disk: h.disk.clone(),
        point: p.to_string(),
        why,
    };
    let last = h
        .last_entry()
        .ok_or_else(|| impossible("the disk has no journal records".into()))?;
    // A time or "latest" names the newest record up to then: if records
    // after the one found are missing, that may not be the right one.
    let unambiguous = |seq: u64| match missing_after(h, seq) {
        Some(why) => Err(impossible(format!(
            "{why}, so the state at this point is unknown; seq:{seq} can be restored"
        ))),
        None => Ok(seq),
    };
    match p {
        Point::Seq(n) => Ok(*n),
        Point::Latest => unambiguous(last.seq),
        Point::TimeNs(t) => {
            let j = h
                .entries()
                .filter(|(_, e)| e.ts_ns <= *t)
                .map(|(_, e)| e.seq)
                .max();
            let Some((m, d)) = h.retained() else {
                return j
                    .ok_or_else(|| {
                        impossible("it is before the first record of the journal".into())
                    })
                    .and_then(unambiguous);
            };
            if *t >= d.from_ts_ns {
                // Every record of the disk after journal_from_seq is here.
                return match j {
                    Some(j) if j > d.journal_from_seq => unambiguous(j),
                    _ => Ok(d.journal_from_seq),
                };
            }
            // Older than what retention keeps whole: a kept point whose
            // state lasted until after `t`, or a record still here.
            let kept = m
                .points
                .iter()
                .chain(std::iter::once(&m.window))
                .filter(|p| p.ts_ns <= *t && p.until_ns.is_some_and(|u| *t < u))
                .map(|p| p.seq)
                .max();
            match j.max(kept) {
                Some(s) => Ok(s),
                None => Err(impossible(h.thinned_time(*t))),
            }
        }
        Point::Mark(label) => {
            let marks: Vec<(usize, IndexEntry)> = h
                .entries()
                .filter(|(_, e)| e.kind == Kind::Mark)
                .map(|(i, e)| (i, *e))
                .collect();
            // Newest first. A mark record that cannot be read, or records
            // lost after the mark found, may hide a newer mark of the same
            // label: then the point is not certain, and is refused.
            let mut unreadable: Vec<String> = Vec::new();
            for (i, e) in marks.into_iter().rev() {
                let payload =
                    match read_record(store, &h.vm, &h.disk, &h.segments[i], &e, None).await {
                        Ok((_, p)) => p,
                        Err(err) => {
                            unreadable.push(format!(
                                "the mark record at seq {} cannot be read ({err})",
                                e.seq
                            ));
                            continue;
                        }
                    };
                let v: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
                if v["label"] == label.as_str() {
                    let mut why = unreadable;
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
                    return Err(impossible(format!(
                        "mark {label:?} is at seq {}, but {}, where a newer mark {label:?} may be lost (run `cdpctl verify`); if seq {} is the one, restore at seq:{}",
                        e.seq,
                        why.join("; "),
                        e.seq,
                        e.seq
                    )));
                }
            }
            // Older than the journal kept: a point retention kept for it.
            if let Some(p) = h
                .kept_points()
                .into_iter()
                .rev()
                .find(|p| p.marks.contains(label))
            {
                return Ok(p.seq);
            }
            unreadable.extend(
                Some(with_damage(h, 0, u64::MAX))
                    .filter(|d| !d.is_empty())
                    .map(|d| d.trim_start().to_string()),
            );
            Err(impossible(format!(
                "no mark {label:?} in the journal{}",
                if unreadable.is_empty() {
                    String::new()
                } else {
                    format!(" that can be read: {}", unreadable.join("; "))
                }
            )))
        }
    }
}

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

/// Is every record of (s0, seq] present, with no GAP among them?
fn covered(h: &History, s0: u64, seq: u64) -> Result<(), String> {
    let k = h.segments.iter().position(|s| s.last_seq > s0);
    let Some(k) = k else {
        return Ok(()); // nothing written after the baseline's scan began
    };
    let start_ok = if k == 0 {
        h.segments[0].record_base == 0 || h.segments[0].first_seq <= s0 + 1 || h.retained_after(s0)
    } else {
        !h.breaks.contains(&k)
    };
    if !start_ok {
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
                return Err(format!(
                    "seq {} is a GAP (capture was interrupted: the image may differ from the journal there); a baseline taken after it is needed",
                    e.seq
                ));
            }
        }
    }
    Ok(())
}

fn build(h: &History, key: &str, b: &Baseline, seq: u64) -> Plan {
    let mut m = ExtentMap::new();
    let mut records = 0;
    for (i, s) in h.segments.iter().enumerate() {
        if s.last_seq <= b.s0 || s.first_seq > seq {
            continue;
        }
        for e in &s.entries {
            if e.seq <= b.s0 || e.seq > seq {
                continue;
            }
            let end = (e.offset + e.length).min(b.size);
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
                _ => continue,
            }
            records += 1;
        }
    }
    Plan {
        vm: h.vm.clone(),
        disk: h.disk.clone(),
        size: b.size,
        point_seq: seq,
        baseline_key: key.to_string(),
        baseline: b.clone(),
        extents: m,
        segments: h.segments.clone(),
        records,
    }
}

/// Where restored bytes go. Every byte of the disk is given exactly once.
pub trait Sink: Send + Sync {
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()>;
    fn zero(&self, offset: u64, len: u64) -> std::io::Result<()>;
}

/// A new sparse file: zeros are holes, nothing to write.
pub struct FreshFile(pub File);

impl Sink for FreshFile {
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write_all_at(data, offset)?;
        if data.len() >= 1 << 18 {
            // Start writing large pieces back now, so the disk works while
            // the rest is fetched and the final sync has little left to do.
            use std::os::fd::AsRawFd;
            unsafe {
                libc::sync_file_range(
                    self.0.as_raw_fd(),
                    offset as libc::off64_t,
                    data.len() as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
        }
        Ok(())
    }
    fn zero(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
        Ok(())
    }
}

/// An existing disk: only ranges that differ are written.
pub struct InPlace {
    pub file: File,
    pub changed: std::sync::atomic::AtomicU64,
}

impl Sink for InPlace {
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut cur = vec![0u8; data.len()];
        self.file.read_exact_at(&mut cur, offset)?;
        if cur != data {
            self.file.write_all_at(data, offset)?;
            self.changed
                .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }
    fn zero(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let mut done = 0;
        let mut cur = vec![0u8; (len as usize).min(1 << 20)];
        while done < len {
            let n = (len - done).min(cur.len() as u64) as usize;
            self.file.read_exact_at(&mut cur[..n], offset + done)?;
            if cur[..n].iter().any(|&b| b != 0) {
                cdp_core::journal::zero_range(&self.file, offset + done, n as u64, false)?;
                self.changed
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            }
            done += n as u64;
        }
        Ok(())
    }
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct RestoreStats {
    pub bytes: u64,
    pub journal_records: u64,
    pub journal_bytes: u64,
    pub chunks_fetched: u64,
    pub chunk_bytes: u64,
}

pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// Fetch a chunk and check it against its name.
pub async fn fetch_chunk(store: &Store, hash: &str, len: usize) -> Result<Vec<u8>, RestoreError> {
    let key = rf::chunk_key(hash);
    let retry = RetryPolicy::default();
    let obj: Bytes = with_retry(&key, &retry, || store.get(&key))
        .await
        .map_err(ReadError::from)?;
    Ok(rf::decompress_chunk(hash, &obj, len).map_err(ReadError::from)?)
}

/// Run a plan: every byte of the disk once, to `sink`.
pub async fn execute(
    plan: &Plan,
    store: Option<&Store>,
    sink: Arc<dyn Sink>,
    progress: Option<Progress>,
) -> Result<RestoreStats, RestoreError> {
    let mut stats = RestoreStats::default();
    let tick = |n: u64| {
        if let Some(p) = &progress {
            p(n)
        }
    };
    // 1. Journal extents, grouped by segment; each referenced record is read
    //    whole and its CRC checked.
    let mut by_seg: HashMap<u32, Vec<(u64, u64, u64)>> = HashMap::new();
    for (s, e, src) in plan.extents.iter() {
        match src {
            Source::Journal { segment, pos } => {
                by_seg.entry(segment).or_default().push((s, e, pos))
            }
            Source::Zero => {
                sink.zero(s, e - s).map_err(io_err(Path::new(&plan.disk)))?;
                tick(e - s);
            }
        }
    }
    let seg_jobs = by_seg.into_iter().map(|(i, extents)| {
        let seg = &plan.segments[i as usize];
        let sink = sink.clone();
        let progress = progress.clone();
        async move {
            // The records these extents come from, whole.
            let mut recs: Vec<IndexEntry> = Vec::new();
            for &(s, e, pos) in &extents {
                let idx = seg.entries.partition_point(|x| x.payload_pos <= pos) - 1;
                let r = &seg.entries[idx];
                debug_assert!(pos + (e - s) <= r.payload_pos + r.length);
                if recs.last().is_none_or(|l| l.payload_pos != r.payload_pos) {
                    recs.push(*r);
                }
            }
            recs.sort_by_key(|r| r.payload_pos);
            recs.dedup_by_key(|r| r.payload_pos);
            // Runs of records close together, each read with one ranged
            // GET of the frames that hold it: a segment with a few surviving
            // records costs those records' frames, not the whole segment.
            const SPLIT: u64 = 2 * rf::FRAME_RAW as u64;
            let mut bounds: Vec<(u64, u64)> = Vec::new();
            for r in &recs {
                let (a, b) = (
                    r.payload_pos - RECORD_HEADER_LEN as u64,
                    r.payload_pos + r.length,
                );
                match bounds.last_mut() {
                    Some(l) if a < l.1 + SPLIT => l.1 = l.1.max(b),
                    _ => bounds.push((a, b)),
                }
            }
            let runs: Vec<(u64, Vec<u8>)> =
                futures::stream::iter(bounds.into_iter().map(|(lo, hi)| async move {
                    let raw = read_raw(store, &plan.vm, &plan.disk, seg, lo..hi).await?;
                    Ok::<_, RestoreError>((lo, raw))
                }))
                .buffered(4)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<_, _>>()?;
            // Checking and writing run on the blocking pool, beside the
            // chunks.
            let disk = plan.disk.clone();
            tokio::task::spawn_blocking(move || {
                // The run holding raw position `pos`: its start and bytes.
                let at = |pos: u64| {
                    let (lo, raw) = &runs[runs.partition_point(|r| r.0 <= pos) - 1];
                    (*lo, raw)
                };
                for r in &recs {
                    let (lo, raw) = at(r.payload_pos - RECORD_HEADER_LEN as u64);
                    let a = (r.payload_pos - RECORD_HEADER_LEN as u64 - lo) as usize;
                    let b = (r.payload_pos + r.length - lo) as usize;
                    check_record(&disk, r, &raw[a..b])?;
                }
                let mut bytes = 0;
                for &(s, e, pos) in &extents {
                    let (lo, raw) = at(pos);
                    let a = (pos - lo) as usize;
                    sink.write(s, &raw[a..a + (e - s) as usize])
                        .map_err(io_err(Path::new(&disk)))?;
                    bytes += e - s;
                    if let Some(p) = &progress {
                        p(e - s)
                    }
                }
                Ok::<_, RestoreError>((recs.len() as u64, bytes))
            })
            .await
            .expect("restore worker panicked")
        }
    });
    let journal = futures::stream::iter(seg_jobs)
        .buffer_unordered(4)
        .collect::<Vec<_>>();
    // 2. The rest from the baseline's chunks, at the same time (the
    //    ranges are disjoint).
    let b = &plan.baseline;
    let chunk_jobs = (0..b.chunks.len()).map(|i| {
        let sink = sink.clone();
        let tick = &tick;
        let progress = progress.clone();
        async move {
            let start = i as u64 * b.chunk_size;
            let end = (start + b.chunk_size).min(b.size);
            let gaps = plan.extents.uncovered(start, end);
            if gaps.is_empty() {
                return Ok::<_, RestoreError>((0, 0));
            }
            match &b.chunks[i] {
                None => {
                    for (s, e) in gaps {
                        sink.zero(s, e - s).map_err(io_err(Path::new(&plan.disk)))?;
                        tick(e - s);
                    }
                    Ok((0, 0))
                }
                Some(hash) => {
                    let store = store.ok_or_else(|| RestoreError::Corrupt {
                        what: rf::chunk_key(hash),
                        why: "baseline chunks are in the repository, and no repository was given"
                            .into(),
                    })?;
                    let key = rf::chunk_key(hash);
                    let retry = RetryPolicy::default();
                    let obj: Bytes = with_retry(&key, &retry, || store.get(&key))
                        .await
                        .map_err(ReadError::from)?;
                    // Decompressing, hashing and writing run on the blocking
                    // pool: in parallel, off the thread that fetches.
                    let (hash, disk) = (hash.clone(), plan.disk.clone());
                    tokio::task::spawn_blocking(move || {
                        let len = (end - start) as usize;
                        let data =
                            rf::decompress_chunk(&hash, &obj, len).map_err(ReadError::from)?;
                        if data.len() != len {
                            return Err(RestoreError::Corrupt {
                                what: key,
                                why: format!("chunk is {} bytes, expected {len}", data.len()),
                            });
                        }
                        for (s, e) in gaps {
                            sink.write(s, &data[(s - start) as usize..(e - start) as usize])
                                .map_err(io_err(Path::new(&disk)))?;
                            if let Some(p) = &progress {
                                p(e - s)
                            }
                        }
                        Ok((1, end - start))
                    })
                    .await
                    .expect("restore worker panicked")
                }
            }
        }
    });
    let chunks = futures::stream::iter(chunk_jobs)
        .buffered(8)
        .collect::<Vec<_>>();
    let (journal, chunks) = futures::join!(journal, chunks);
    for r in journal {
        let (n, b) = r?;
        stats.journal_records += n;
        stats.journal_bytes += b;
    }
    for r in chunks {
        let (n, bytes) = r?;
        stats.chunks_fetched += n;
        stats.chunk_bytes += bytes;
    }
    stats.bytes = plan.size;
    Ok(stats)
}

/// The seq ranges of a disk that can be restored exactly: for each baseline,
/// from its s1 up to the record before the first GAP or missing stretch
/// after its s0. Merged, in order.
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
        let k = h.segments.iter().position(|s| s.last_seq > b.s0);
        let mut end = last;
        if let Some(k) = k {
            let start_ok = if k == 0 {
                h.segments[0].record_base == 0
                    || h.segments[0].first_seq <= b.s0 + 1
                    || h.retained_after(b.s0)
            } else {
                !h.breaks.contains(&k)
            };
            if !start_ok {
                continue;
            }
            if let Some(&br) = h.breaks.iter().find(|&&br| br > k) {
                end = end.min(h.segments[br - 1].last_seq);
            }
            if let Some(g) = h.segments[k..]
                .iter()
                .flat_map(|s| s.entries.iter())
                .find(|e| e.seq > b.s0 && e.kind == Kind::Gap)
            {
                end = end.min(g.seq.saturating_sub(1));
            }
        }
        let start = b.s1.max(1);
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

/// Labels of the MARK records of a disk: (seq, ts, label).
pub async fn marks(
    h: &History,
    store: Option<&Store>,
) -> Result<Vec<(u64, u64, String)>, RestoreError> {
    let mut out = Vec::new();
    let marks: Vec<(usize, IndexEntry)> = h
        .entries()
        .filter(|(_, e)| e.kind == Kind::Mark)
        .map(|(i, e)| (i, *e))
        .collect();
    for (i, e) in marks {
        let (_, payload) = read_record(store, &h.vm, &h.disk, &h.segments[i], &e, None).await?;
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
        out.push((
            e.seq,
            e.ts_ns,
            v["label"].as_str().unwrap_or("?").to_string(),
        ));
    }
    Ok(out)
}

/// GAP records of a disk: (seq, ts, reason).
pub async fn gaps(
    h: &History,
    store: Option<&Store>,
) -> Result<Vec<(u64, u64, String)>, RestoreError> {
    let mut out = Vec::new();
    let gaps: Vec<(usize, IndexEntry)> = h
        .entries()
        .filter(|(_, e)| e.kind == Kind::Gap)
        .map(|(i, e)| (i, *e))
        .collect();
    for (i, e) in gaps {
        let (_, payload) = read_record(store, &h.vm, &h.disk, &h.segments[i], &e, None).await?;
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
        out.push((
            e.seq,
            e.ts_ns,
            v["reason"].as_str().unwrap_or("?").to_string(),
        ));
    }
    Ok(out)
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
