//! Retention and compaction of a VM's history in the repository.
//!
//! A policy (`[policy.P.retention]`) keeps every point of the last
//! `any_point`, then one point per `every` of each thinned tier for as long
//! as its `keep` (the state at each multiple of `every` since the epoch,
//! UTC: the last record at or before it), and every mark as long as the
//! coarsest tier reaches (`any_point` when there is no tier): an operator
//! expects a named point to outlive the hourly ones. Marks older than that
//! go with the rest.
//!
//! Points are VM-wide: a sequence number cuts every disk of the VM, so every
//! disk keeps the same points.
//!
//! Two halves:
//! - [`plan`], pure: from each disk's [`History`], the marks, the previous
//!   [`RetentionManifest`] and the policy, the kept points, the exact
//!   ("synthetic") baselines to write, and the objects nothing kept needs.
//! - [`apply`]: does it, in a crash-safe order: (1) synthetic baselines
//!   (chunks first, then the JSON), (2) the new retention manifest, (3) the
//!   journal segments below what is kept (index first, oldest first), (4)
//!   baselines no kept point uses, (5) chunks no baseline of any VM names,
//!   (6) older manifests and expired leases. Stopped at any step, every kept
//!   point still restores: each object deleted is needed by no kept point
//!   once the objects written before it exist.
//!
//! A synthetic baseline is exact at its seq (s0 = s1 = seq). Its content is
//! the previous baseline plus the journal extents up to the seq, as restore
//! plans them: chunks no record touched are the previous baseline's (not
//! read at all); touched chunks are rebuilt in a sparse scratch file and
//! uploaded if the repository lacks them.
//!
//! Leases (see [`crate::lease`]): while an unexpired lease on the VM exists,
//! synthetic baselines and the manifest are written but nothing of the VM
//! is deleted; while any VM has one, no chunk is deleted. The report says
//! what was deferred.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use cdp_core::journal::format::Kind;
use serde::Serialize;
use thiserror::Error;

pub use cdp_core::config::Retention;

use crate::format::{self as rf, Baseline, DiskRetention, KeptPoint, Lease, RetentionManifest};
use crate::lease::{self, LeaseError};
use crate::restore::{self, History, Point, RestoreError, SegLoc};
use crate::store::{with_retry, ObjectMeta, RetryPolicy, Store, StoreError};

#[derive(Debug, Error)]
pub enum RetentionError {
    #[error("VM {vm} disk {disk}: reading its history: {source}")]
    History {
        vm: String,
        disk: String,
        #[source]
        source: RestoreError,
    },
    #[error("VM {vm} disk {disk}: writing the exact baseline at seq {seq}: {source}")]
    Synthesize {
        vm: String,
        disk: String,
        seq: u64,
        #[source]
        source: RestoreError,
    },
    #[error("{op} {key}: {source}")]
    Store {
        op: &'static str,
        key: String,
        #[source]
        source: StoreError,
    },
    #[error("VM {vm}: {source}")]
    Read {
        vm: String,
        #[source]
        source: crate::read::ReadError,
    },
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error("scratch file for a synthetic baseline of VM {vm} disk {disk} at seq {seq}: {source}")]
    Scratch {
        vm: String,
        disk: String,
        seq: u64,
        #[source]
        source: std::io::Error,
    },
}

impl RetentionError {
    /// True if applying the policy again may succeed: the repository was
    /// unreachable or failed on its side (a prune resumes where it stopped).
    pub fn is_transient(&self) -> bool {
        match self {
            RetentionError::History { source, .. } | RetentionError::Synthesize { source, .. } => {
                source.is_transient()
            }
            RetentionError::Store { source, .. } => source.is_transient(),
            RetentionError::Read {
                source: crate::read::ReadError::Store(e),
                ..
            } => e.is_transient(),
            RetentionError::Lease(
                LeaseError::Write { source, .. } | LeaseError::List { source, .. },
            ) => source.is_transient(),
            _ => false,
        }
    }
}

fn store_err<'a>(op: &'static str, key: &'a str) -> impl FnOnce(StoreError) -> RetentionError + 'a {
    move |source| RetentionError::Store {
        op,
        key: key.to_string(),
        source,
    }
}

/// What [`plan`] works from.
pub struct PlanInput<'a> {
    pub vm: &'a str,
    /// Each disk's history in the repository (no local segments).
    pub histories: &'a [History],
    /// MARK records of the VM: (seq, ts, label).
    pub marks: &'a [(u64, u64, String)],
    /// The newest retention manifest, if a prune ran before.
    pub previous: Option<&'a RetentionManifest>,
    pub retention: &'a Retention,
    pub now_ns: u64,
}

/// What to do to one disk.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct DiskPlan {
    pub disk: String,
    /// What the manifest will say of this disk; None: the disk is left as it
    /// is (its window start cannot be rebuilt, or it has no journal).
    pub keep: Option<DiskRetention>,
    /// Exact baselines to write: (seq, ts), oldest first.
    pub synthesize: Vec<(u64, u64)>,
    /// Kept points this disk cannot be rebuilt at (before its first
    /// baseline, behind a GAP): nothing is written for them.
    pub unrestorable: Vec<u64>,
    /// Journal segments to delete: (first, last), oldest first.
    pub delete_segments: Vec<(u64, u64)>,
    /// Halves of segments (an index or a segment alone) below what is kept.
    pub delete_orphans: Vec<String>,
    /// Baselines no kept point uses.
    pub delete_baselines: Vec<String>,
}

/// The outcome of [`plan`].
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct RetentionPlan {
    /// The first point of the any-point window; None: nothing is older than
    /// the window, nothing to do.
    pub window: Option<KeptPoint>,
    /// Points kept before the window, oldest first.
    pub points: Vec<KeptPoint>,
    pub disks: Vec<DiskPlan>,
}

impl RetentionPlan {
    /// The manifest that records this plan.
    pub fn manifest(
        &self,
        vm: &str,
        written_ns: u64,
        input_now_ns: u64,
        retention: &Retention,
        previous: Option<&RetentionManifest>,
    ) -> Option<RetentionManifest> {
        let window = self.window.clone()?;
        let disks = self
            .disks
            .iter()
            .filter_map(|d| {
                d.keep
                    .clone()
                    .or_else(|| previous.and_then(|p| p.disk(&d.disk).cloned()))
            })
            .collect();
        Some(RetentionManifest {
            vm_uuid: vm.to_string(),
            written_ns,
            now_ns: input_now_ns,
            any_point_ns: retention.any_point.as_nanos() as u64,
            thin: retention
                .thin
                .iter()
                .map(|(e, k)| (e.as_nanos() as u64, k.as_nanos() as u64))
                .collect(),
            window,
            points: self.points.clone(),
            disks,
        })
    }

    /// Does `new` say what `previous` says (its time of writing aside)?
    pub fn same_manifest(previous: Option<&RetentionManifest>, new: &RetentionManifest) -> bool {
        previous.is_some_and(|p| {
            p.window == new.window && p.points == new.points && p.disks == new.disks
        })
    }

    /// Does it change the repository (beyond a manifest equal to `previous`)?
    pub fn changes(&self, previous: Option<&RetentionManifest>, new: &RetentionManifest) -> bool {
        !Self::same_manifest(previous, new)
            || self.disks.iter().any(|d| {
                !d.synthesize.is_empty()
                    || !d.delete_segments.is_empty()
                    || !d.delete_orphans.is_empty()
                    || !d.delete_baselines.is_empty()
            })
    }
}

/// A state of the VM known to the planner: the state right after `seq`,
/// which lasted from `ts` until `until` (None: the newest, or unknown).
#[derive(Debug, Clone, Default)]
struct State {
    ts: u64,
    until: Option<u64>,
    marks: Vec<String>,
}

fn fmt_dur(ns: u64) -> String {
    humantime::format_duration(std::time::Duration::from_nanos(ns)).to_string()
}

/// Decide what to keep, write and delete. Pure.
pub fn plan(input: &PlanInput) -> RetentionPlan {
    let states = known_states(input);
    let now = input.now_ns;
    let cutoff = now.saturating_sub(input.retention.any_point.as_nanos() as u64);
    let Some(w) = window_start(&states, cutoff) else {
        return RetentionPlan {
            window: None,
            points: Vec::new(),
            disks: input
                .histories
                .iter()
                .map(|h| DiskPlan {
                    disk: h.disk.clone(),
                    ..Default::default()
                })
                .collect(),
        };
    };
    let point = |seq: u64, why: Vec<String>| {
        let s = &states[&seq];
        let mut marks = s.marks.clone();
        marks.sort();
        KeptPoint {
            seq,
            ts_ns: s.ts,
            until_ns: s.until,
            marks,
            why,
        }
    };
    let points: Vec<KeptPoint> = thinned_points(input, &states, w)
        .into_iter()
        .map(|(seq, mut why)| {
            why.dedup();
            point(seq, why)
        })
        .collect();
    let window = point(w, vec!["window".into()]);
    let disks = input
        .histories
        .iter()
        .map(|h| plan_disk(input.vm, h, &window, &points))
        .collect();
    RetentionPlan {
        window: Some(window),
        points,
        disks,
    }
}

/// Known states: the journal's records (VM-wide; below the previous window
/// start only the previous manifest's points are known, the records left
/// there are not all of the VM's), then the previous manifest's points with
/// the validity they were given; each with the marks made at it.
fn known_states(input: &PlanInput) -> BTreeMap<u64, State> {
    let prev_w = input.previous.map(|m| m.window.seq);
    let mut states: BTreeMap<u64, State> = BTreeMap::new();
    for h in input.histories {
        for (_, e) in h.entries() {
            if prev_w.is_some_and(|w| e.seq <= w) {
                continue;
            }
            states.entry(e.seq).or_insert(State {
                ts: e.ts_ns,
                ..Default::default()
            });
        }
    }
    // Each record's state lasts until the next record.
    let seqs: Vec<u64> = states.keys().copied().collect();
    for w in seqs.windows(2) {
        let next_ts = states[&w[1]].ts;
        states.get_mut(&w[0]).unwrap().until = Some(next_ts);
    }
    if let Some(m) = input.previous {
        let first_journal_ts = states.values().next().map(|s| s.ts);
        for p in m.points.iter().chain(std::iter::once(&m.window)) {
            let until = if p.seq == m.window.seq {
                // Every record after the window start is in the journal.
                first_journal_ts.or(p.until_ns)
            } else {
                p.until_ns
            };
            states.insert(
                p.seq,
                State {
                    ts: p.ts_ns,
                    until,
                    marks: p.marks.clone(),
                },
            );
        }
    }
    for (seq, _, label) in input.marks {
        if let Some(s) = states.get_mut(seq) {
            if !s.marks.contains(label) {
                s.marks.push(label.clone());
            }
        }
    }
    states
}

/// The window's first point: the state at the cutoff.
fn window_start(states: &BTreeMap<u64, State>, cutoff: u64) -> Option<u64> {
    let valid_at = |s: &State, t: u64| s.ts <= t && s.until.is_none_or(|u| t < u);
    match states.range(..).rev().find(|(_, s)| s.ts <= cutoff) {
        None => None,
        Some((&seq, s)) if valid_at(s, cutoff) => Some(seq),
        // The state at the cutoff was thinned away before: the window
        // begins at the next state known.
        Some((&seq, _)) => states.range(seq + 1..).next().map(|(&q, _)| q),
    }
}

/// The points kept before the window (`w`) by the thinned tiers and the
/// marks, each with why.
fn thinned_points(
    input: &PlanInput,
    states: &BTreeMap<u64, State>,
    w: u64,
) -> BTreeMap<u64, Vec<String>> {
    let now = input.now_ns;
    let wts = states[&w].ts;
    let reach = input
        .retention
        .thin
        .iter()
        .map(|(_, k)| k.as_nanos() as u64)
        .chain(std::iter::once(input.retention.any_point.as_nanos() as u64))
        .max()
        .unwrap_or(0);
    let mut kept: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (&seq, s) in states.range(..w) {
        // The times this state was the VM's state, within [lo, wts).
        let end = s.until.unwrap_or(u64::MAX).min(wts);
        for (every, keep) in &input.retention.thin {
            let (every, keep) = (every.as_nanos() as u64, keep.as_nanos() as u64);
            let a = s.ts.max(now.saturating_sub(keep));
            if a >= end {
                continue;
            }
            // A multiple of `every` in [a, end)?
            let b = a.div_ceil(every).saturating_mul(every);
            if b < end {
                kept.entry(seq)
                    .or_default()
                    .push(format!("every {}", fmt_dur(every)));
            }
        }
        if !s.marks.is_empty() && s.ts >= now.saturating_sub(reach) {
            kept.entry(seq).or_default().push("mark".into());
        }
    }
    kept
}

fn plan_disk(vm: &str, h: &History, window: &KeptPoint, points: &[KeptPoint]) -> DiskPlan {
    let mut d = DiskPlan {
        disk: h.disk.clone(),
        ..Default::default()
    };
    let Some(last) = h.last_entry().copied() else {
        return d;
    };
    // An idle disk's window begins at its own newest record: nothing after
    // it is assumed.
    let (a, a_ts) = if last.seq < window.seq {
        (last.seq, last.ts_ns)
    } else {
        (window.seq, window.ts_ns)
    };
    if let Some((_, prev)) = h.retained() {
        if a < prev.journal_from_seq {
            // The policy now reaches further back than a prune kept:
            // nothing more to remove.
            return d;
        }
    }
    let reachable = |seq: u64| {
        h.exact_baseline(seq).is_some() || restore::plan(h, seq, &Point::Seq(seq)).is_ok()
    };
    if !reachable(a) {
        d.unrestorable.push(a);
        return d;
    }
    let mut keep_baselines: BTreeSet<String> = BTreeSet::new();
    let mut want = |seq: u64, ts: u64, d: &mut DiskPlan| match h.exact_baseline(seq) {
        Some((k, _)) => {
            keep_baselines.insert(k.clone());
        }
        None if reachable(seq) => d.synthesize.push((seq, ts)),
        None => d.unrestorable.push(seq),
    };
    for p in points.iter().filter(|p| p.seq < a) {
        want(p.seq, p.ts_ns, &mut d);
    }
    want(a, a_ts, &mut d);
    // Segments: everything after `a` stays, and the disk's newest segment.
    let n = h.segments.len();
    let kept_from = h
        .segments
        .iter()
        .position(|s| s.last_seq > a)
        .unwrap_or(n.saturating_sub(1));
    for s in &h.segments[..kept_from] {
        if matches!(s.loc, SegLoc::Repo { .. }) {
            d.delete_segments.push((s.first_seq, s.last_seq));
        }
    }
    let record_base = h.segments.get(kept_from).map_or(0, |s| s.record_base);
    let kept_first = h.segments.get(kept_from).map(|s| s.first_seq);
    for k in &h.orphans {
        let name = k.rsplit('/').next().unwrap_or("");
        if let Some((_, b, _)) = rf::parse_journal_name(name) {
            if b <= a && kept_first.is_none_or(|f| b < f) {
                d.delete_orphans.push(k.clone());
            }
        }
    }
    for (k, b) in &h.baselines {
        if b.s0 < a && !keep_baselines.contains(k) {
            d.delete_baselines.push(k.clone());
        }
    }
    let _ = vm;
    d.keep = Some(DiskRetention {
        disk: h.disk.clone(),
        journal_from_seq: a,
        from_ts_ns: a_ts,
        record_base,
    });
    d
}

/// What a prune did (or, dry run, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub vm_uuid: String,
    pub dry_run: bool,
    /// The time the policy was applied at.
    pub now: String,
    /// The first point of the any-point window (none: all of the history is
    /// inside the window).
    pub window_from_seq: Option<u64>,
    pub window_from: Option<String>,
    /// Points kept before the window.
    pub kept_points: u64,
    pub points: Vec<KeptPoint>,
    /// Exact baselines written (dry run: to write).
    pub synthetic_baselines: u64,
    pub chunks_uploaded: u64,
    pub bytes_uploaded: u64,
    pub segments_deleted: u64,
    pub baselines_deleted: u64,
    pub chunks_deleted: u64,
    /// Segment halves left by an interrupted prune, older manifests,
    /// expired leases.
    pub other_deleted: u64,
    pub bytes_freed: u64,
    /// An unexpired lease held the deletions back.
    pub deferred_by_lease: bool,
    /// Objects not deleted because of a lease.
    pub deferred_objects: u64,
    pub leases: Vec<Lease>,
    /// Objects left for the next prune (`max_deletions` reached).
    pub left_for_next_prune: u64,
    /// Kept points a disk cannot be rebuilt at: (disk, seq).
    pub unrestorable: Vec<(String, u64)>,
    /// The manifest written, if any.
    pub manifest: Option<String>,
    /// Dry run: every object the prune would delete, in its order.
    pub would_delete: Vec<String>,
}

/// Read a VM's marks, tolerating unreadable records (verify reports them).
async fn read_marks(store: &Store, hs: &[History]) -> Vec<(u64, u64, String)> {
    let mut out = Vec::new();
    for h in hs {
        for (i, e) in h.entries().filter(|(_, e)| e.kind == Kind::Mark) {
            if let Ok((_, p)) =
                restore::read_record(Some(store), &h.vm, &h.disk, &h.segments[i], e, None).await
            {
                let v: serde_json::Value = serde_json::from_slice(&p).unwrap_or_default();
                if let Some(l) = v["label"].as_str() {
                    out.push((e.seq, e.ts_ns, l.to_string()));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Write an exact baseline of `h`'s disk at `seq` and add it to `h`.
/// Returns (chunks uploaded, bytes uploaded).
async fn synthesize(
    store: &Store,
    h: &mut History,
    seq: u64,
    ts: u64,
    have: &mut HashSet<String>,
) -> Result<(u64, u64), RetentionError> {
    let err = |source: RestoreError| RetentionError::Synthesize {
        vm: h.vm.clone(),
        disk: h.disk.clone(),
        seq,
        source,
    };
    let plan = restore::plan(h, seq, &Point::Seq(seq)).map_err(err)?;
    let base = &plan.baseline;
    let cs = base.chunk_size;
    let mut touched = BTreeSet::new();
    for (s, e, _) in plan.extents.iter() {
        for i in s / cs..=(e - 1) / cs {
            touched.insert(i as usize);
        }
    }
    // The disk's size at the point (a RESIZE since the baseline): its last
    // chunk is rebuilt, as every chunk a grown tail adds.
    let mut chunks = base.chunks.clone();
    chunks.resize(plan.size.div_ceil(cs) as usize, None);
    if plan.size != base.size && plan.size > 0 {
        touched.insert(((plan.size - 1) / cs) as usize);
    }
    let (mut up, mut up_bytes) = (0, 0);
    if !touched.is_empty() {
        (up, up_bytes) = rebuild_touched(store, h, &plan, &touched, &mut chunks, have).await?;
    }
    let b = Baseline {
        vm_uuid: h.vm.clone(),
        disk: h.disk.clone(),
        size: plan.size,
        chunk_size: cs,
        s0: seq,
        s1: seq,
        started_ns: ts,
        finished_ns: ts,
        chunks,
    };
    let key = rf::baseline_key(&h.vm, &h.disk, seq, seq);
    let body = Bytes::from(serde_json::to_vec(&b).unwrap());
    let retry = RetryPolicy::default();
    // The one object retention replaces (with the prune credential): an
    // exact baseline of the same point written again (a resumed prune) or
    // one already there at (seq, seq) describe the same disk contents.
    with_retry(&key, &retry, || store.replace(&key, body.clone()))
        .await
        .map_err(store_err("put", &key))?;
    h.baselines.push((key, b));
    h.baselines.sort_by_key(|(_, b)| (b.s1, b.s0));
    Ok((up, up_bytes))
}

/// The chunks of `plan`'s disk that its journal extents touch, rebuilt in a
/// sparse scratch file, named in `chunks` and uploaded if the repository
/// lacks them (`have`). Returns (chunks uploaded, bytes uploaded).
async fn rebuild_touched(
    store: &Store,
    h: &History,
    plan: &restore::Plan,
    touched: &BTreeSet<usize>,
    chunks: &mut [Option<String>],
    have: &mut HashSet<String>,
) -> Result<(u64, u64), RetentionError> {
    let (seq, base, cs) = (plan.point_seq, &plan.baseline, plan.baseline.chunk_size);
    let err = |source: RestoreError| RetentionError::Synthesize {
        vm: h.vm.clone(),
        disk: h.disk.clone(),
        seq,
        source,
    };
    let (mut up, mut up_bytes) = (0, 0);
    let scratch_err = |source: std::io::Error| RetentionError::Scratch {
        vm: h.vm.clone(),
        disk: h.disk.clone(),
        seq,
        source,
    };
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "cdp-synthetic-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(scratch_err)?;
    let _ = std::fs::remove_file(&path);
    file.set_len(plan.size).map_err(scratch_err)?;
    // Only the touched chunks: the others read as holes, unread.
    let mut masked = plan.clone();
    masked.baseline.chunks = (0..base.chunks.len())
        .map(|i| {
            if touched.contains(&i) {
                base.chunks[i].clone()
            } else {
                None
            }
        })
        .collect();
    let sink = Arc::new(restore::FreshFile(file.try_clone().map_err(scratch_err)?));
    restore::execute(&masked, Some(store), sink, None)
        .await
        .map_err(err)?;
    let retry = RetryPolicy::default();
    // Keyed in an encrypted repository (docs/REPOSITORY_FORMAT.md, "Encryption").
    let namer = with_retry("chunk names", &retry, || store.chunk_namer())
        .await
        .map_err(store_err("read", "the repository key"))?;
    for &i in touched {
        let off = i as u64 * cs;
        let len = cs.min(plan.size - off) as usize;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, off).map_err(scratch_err)?;
        if buf.iter().all(|&b| b == 0) {
            chunks[i] = None;
            continue;
        }
        let hash = namer.name(&buf);
        if have.insert(hash.clone()) {
            let body = Bytes::from(rf::compress_chunk(&buf).map_err(scratch_err)?);
            let key = rf::chunk_key(&hash);
            up += 1;
            up_bytes += body.len() as u64;
            with_retry(&key, &retry, || store.put(&key, body.clone()))
                .await
                .map_err(store_err("put", &key))?;
        }
        chunks[i] = Some(hash);
    }
    Ok((up, up_bytes))
}

async fn list(store: &Store, prefix: &str) -> Result<Vec<ObjectMeta>, RetentionError> {
    let retry = RetryPolicy::default();
    with_retry(prefix, &retry, || store.list(prefix))
        .await
        .map_err(store_err("list", prefix))
}

/// Deletes objects in order, unless a lease appears: checks the VM's leases
/// before the first deletion and every few deletions.
struct Deleter<'a> {
    store: &'a Store,
    vm: &'a str,
    sizes: HashMap<String, u64>,
    since_check: u32,
    deferred: bool,
    /// Deletions left (None: no limit).
    budget: Option<u64>,
    report: &'a mut Report,
    progress: Option<restore::Ticker>,
}

impl Deleter<'_> {
    async fn leased(&mut self) -> Result<bool, RetentionError> {
        if self.deferred {
            return Ok(true);
        }
        if self.since_check == 0 {
            let leases = lease::active(self.store, self.vm, cdp_core::time::now_ns()).await?;
            if !leases.is_empty() {
                self.deferred = true;
                self.report.deferred_by_lease = true;
                self.report.leases = leases;
                return Ok(true);
            }
        }
        self.since_check = (self.since_check + 1) % 16;
        Ok(false)
    }

    /// The keys about to be deleted, for the progress: their bytes found.
    fn found<'k>(&self, keys: impl IntoIterator<Item = &'k str>) {
        let n = keys.into_iter().map(|k| self.size(k)).sum();
        restore::tick_with(self.progress.as_ref(), restore::Tick::Found(n));
    }

    fn size(&self, key: &str) -> u64 {
        self.sizes.get(key).copied().unwrap_or(0)
    }

    /// Delete `key`; false when deferred (counted). Its bytes are done for
    /// the progress whatever became of it.
    async fn delete(&mut self, key: &str) -> Result<bool, RetentionError> {
        let r = self.delete_inner(key).await;
        restore::tick_with(self.progress.as_ref(), restore::Tick::Done(self.size(key)));
        r
    }

    async fn delete_inner(&mut self, key: &str) -> Result<bool, RetentionError> {
        if self.report.dry_run {
            self.report.would_delete.push(key.to_string());
            self.report.bytes_freed += self.sizes.get(key).copied().unwrap_or(0);
            return Ok(true);
        }
        if self.leased().await? {
            self.report.deferred_objects += 1;
            return Ok(false);
        }
        match &mut self.budget {
            Some(0) => {
                self.report.left_for_next_prune += 1;
                return Ok(false);
            }
            Some(n) => *n -= 1,
            None => {}
        }
        let retry = RetryPolicy::default();
        with_retry(key, &retry, || self.store.delete(key))
            .await
            .map_err(store_err("delete", key))?;
        self.report.bytes_freed += self.sizes.get(key).copied().unwrap_or(0);
        Ok(true)
    }
}

/// Apply `retention` to VM `vm_uuid`'s history in `store`, as of `now_ns`.
/// `dry_run`: plan and report only, nothing written or deleted.
pub async fn apply(
    store: &Store,
    vm_uuid: &str,
    retention: &Retention,
    now_ns: u64,
    dry_run: bool,
) -> Result<Report, RetentionError> {
    apply_with(
        store,
        vm_uuid,
        retention,
        now_ns,
        dry_run,
        &Options::default(),
    )
    .await
}

/// Knobs of [`apply_with`].
#[derive(Clone, Default)]
pub struct Options {
    /// Delete at most this many objects, the rest at the next prune (a
    /// prune stopped there leaves the repository as a crash there would).
    pub max_deletions: Option<u64>,
    /// Where the bytes of the objects to delete are reported (their listed
    /// sizes): found when chosen, done when deleted (dry run: counted;
    /// deferred or left for the next prune: passed over).
    pub progress: Option<restore::Ticker>,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("max_deletions", &self.max_deletions)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

/// [`apply`] with [`Options`].
pub async fn apply_with(
    store: &Store,
    vm_uuid: &str,
    retention: &Retention,
    now_ns: u64,
    dry_run: bool,
    opts: &Options,
) -> Result<Report, RetentionError> {
    let started_ns = cdp_core::time::now_ns();
    let vm = vm_uuid;
    let mut hs = load_histories(store, vm).await?;
    let previous = hs.first().and_then(|h| h.retention.clone());
    let marks = read_marks(store, &hs).await;
    let p = plan(&PlanInput {
        vm,
        histories: &hs,
        marks: &marks,
        previous: previous.as_ref(),
        retention,
        now_ns,
    });
    let mut report = Report::of_plan(vm, dry_run, now_ns, &p);
    let written_ns = started_ns.max(previous.as_ref().map_or(0, |m| m.written_ns + 1));
    let Some(manifest) = p.manifest(vm, written_ns, now_ns, retention, previous.as_ref()) else {
        return Ok(report);
    };
    // Sizes, for the bytes freed.
    let mut sizes: HashMap<String, u64> = HashMap::new();
    for o in list(store, &rf::vm_prefix(vm)).await? {
        sizes.insert(o.key, o.size);
    }
    // 1. Synthetic baselines.
    write_synthetic(store, &mut hs, &p, &mut report).await?;
    // 2. The manifest, before anything is deleted.
    // An identical manifest is not written again: a prune resumed after a
    // kill goes on deleting instead of only adding manifests.
    let changes = p.changes(previous.as_ref(), &manifest);
    let same = RetentionPlan::same_manifest(previous.as_ref(), &manifest);
    if changes && !same && !dry_run {
        let manifest_key = rf::retention_key(vm, written_ns);
        let body = Bytes::from(serde_json::to_vec_pretty(&manifest).unwrap());
        let retry = RetryPolicy::default();
        with_retry(&manifest_key, &retry, || {
            store.put(&manifest_key, body.clone())
        })
        .await
        .map_err(store_err("put", &manifest_key))?;
        report.manifest = Some(manifest_key);
    }
    let mut del = Deleter {
        store,
        vm,
        sizes,
        since_check: 0,
        deferred: false,
        budget: opts.max_deletions,
        report: &mut report,
        progress: opts.progress.clone(),
    };
    // 3. Journal segments and 4. baselines no kept point uses.
    delete_history(&mut del, &p).await?;
    // 5. Chunks no baseline of any VM names (deferred while any VM has a
    //    lease: a baseline being taken may count on a chunk it found).
    gc_chunks(&mut del, &p).await?;
    // 6. Older manifests, expired leases.
    if !dry_run && !del.deferred {
        delete_stale(&mut del).await?;
    }
    Ok(report)
}

/// The repository history of every disk of VM `vm`.
async fn load_histories(store: &Store, vm: &str) -> Result<Vec<History>, RetentionError> {
    let disks =
        crate::read::list_disks(store, vm)
            .await
            .map_err(|source| RetentionError::Read {
                vm: vm.into(),
                source,
            })?;
    let mut hs = Vec::new();
    for d in &disks {
        let h = restore::load_history(Some(store), None, vm, d)
            .await
            .map_err(|source| RetentionError::History {
                vm: vm.into(),
                disk: d.clone(),
                source,
            })?;
        hs.push(h);
    }
    Ok(hs)
}

impl Report {
    /// What the plan keeps, before anything is done.
    fn of_plan(vm: &str, dry_run: bool, now_ns: u64, p: &RetentionPlan) -> Report {
        let mut report = Report {
            vm_uuid: vm.to_string(),
            dry_run,
            now: cdp_core::time::fmt_ns(now_ns),
            ..Default::default()
        };
        report.window_from_seq = p.window.as_ref().map(|w| w.seq);
        report.window_from = p.window.as_ref().map(|w| cdp_core::time::fmt_ns(w.ts_ns));
        report.kept_points = p.points.len() as u64;
        report.points = p.points.clone();
        for d in &p.disks {
            report
                .unrestorable
                .extend(d.unrestorable.iter().map(|&s| (d.disk.clone(), s)));
        }
        report
    }
}

/// Step 1: the exact baselines the plan asks for (dry run: counted only).
async fn write_synthetic(
    store: &Store,
    hs: &mut [History],
    p: &RetentionPlan,
    report: &mut Report,
) -> Result<(), RetentionError> {
    let mut have: Option<HashSet<String>> = None;
    for (h, d) in hs.iter_mut().zip(&p.disks) {
        for &(seq, ts) in &d.synthesize {
            report.synthetic_baselines += 1;
            if report.dry_run {
                continue;
            }
            if have.is_none() {
                have = Some(
                    list(store, rf::CHUNKS_PREFIX)
                        .await?
                        .into_iter()
                        .filter_map(|o| o.key.rsplit('/').next().map(str::to_string))
                        .collect(),
                );
            }
            let (n, b) = synthesize(store, h, seq, ts, have.as_mut().unwrap()).await?;
            report.chunks_uploaded += n;
            report.bytes_uploaded += b;
        }
    }
    Ok(())
}

/// Steps 3 and 4: journal segments, oldest first, each index before its
/// segment (a segment without its index is ignored by readers), halves of
/// segments left by an interrupted prune; then baselines no kept point
/// uses.
async fn delete_history(del: &mut Deleter<'_>, p: &RetentionPlan) -> Result<(), RetentionError> {
    let vm = del.vm;
    let keys: Vec<String> = p
        .disks
        .iter()
        .flat_map(|d| {
            d.delete_segments
                .iter()
                .flat_map(|&(a, b)| {
                    [
                        rf::index_key(vm, &d.disk, a, b),
                        rf::segment_key(vm, &d.disk, a, b),
                    ]
                })
                .chain(d.delete_orphans.iter().cloned())
                .chain(d.delete_baselines.iter().cloned())
        })
        .collect();
    del.found(keys.iter().map(String::as_str));
    for d in &p.disks {
        for &(a, b) in &d.delete_segments {
            let i = del.delete(&rf::index_key(vm, &d.disk, a, b)).await?;
            let s = del.delete(&rf::segment_key(vm, &d.disk, a, b)).await?;
            if i && s {
                del.report.segments_deleted += 1;
            }
        }
        for k in &d.delete_orphans {
            if del.delete(k).await? {
                del.report.other_deleted += 1;
            }
        }
    }
    for d in &p.disks {
        for k in &d.delete_baselines {
            if del.delete(k).await? {
                del.report.baselines_deleted += 1;
            }
        }
    }
    Ok(())
}

/// Step 6: older manifests (the newest stays) and expired leases.
async fn delete_stale(del: &mut Deleter<'_>) -> Result<(), RetentionError> {
    let (store, vm) = (del.store, del.vm);
    let now = cdp_core::time::now_ns();
    let mut ms: Vec<String> = list(store, &rf::retention_prefix(vm))
        .await?
        .into_iter()
        .map(|o| o.key)
        .collect();
    ms.sort();
    ms.pop(); // the newest stays
    let expired: Vec<String> = lease::list(store, vm)
        .await?
        .into_iter()
        .filter(|(_, l)| l.as_ref().is_some_and(|l| l.expires_ns <= now))
        .map(|(k, _)| k)
        .collect();
    del.found(ms.iter().chain(&expired).map(String::as_str));
    for k in ms {
        if del.delete(&k).await? {
            del.report.other_deleted += 1;
        }
    }
    for k in expired {
        if del.delete(&k).await? {
            del.report.other_deleted += 1;
        }
    }
    Ok(())
}

async fn gc_chunks(del: &mut Deleter<'_>, p: &RetentionPlan) -> Result<(), RetentionError> {
    let store = del.store;
    let all = list(store, &format!("{}/vms/", rf::ROOT)).await?;
    let deleted: HashSet<&str> = p
        .disks
        .iter()
        .flat_map(|d| d.delete_baselines.iter().map(String::as_str))
        .collect();
    let mut referenced: HashSet<String> = HashSet::new();
    let now = cdp_core::time::now_ns();
    let mut other_leases: Vec<Lease> = Vec::new();
    for o in &all {
        let name = o.key.rsplit('/').next().unwrap_or("");
        if o.key.contains("/baselines/") && rf::parse_baseline_name(name).is_some() {
            // In a dry run the baselines to delete are still there.
            if del.report.dry_run && deleted.contains(o.key.as_str()) {
                continue;
            }
            let b = match store.get(&o.key).await {
                Ok(b) => b,
                Err(StoreError::NotFound { .. }) => continue,
                Err(e) => return Err(store_err("get", &o.key)(e)),
            };
            match Baseline::decode(&o.key, &b) {
                Ok(b) => referenced.extend(b.chunks.into_iter().flatten()),
                // A baseline that does not decode may name any chunk.
                Err(_) => return Ok(()),
            }
        } else if o.key.contains("/leases/") && o.key.ends_with(".json") {
            if let Ok(b) = store.get(&o.key).await {
                if let Ok(l) = Lease::decode(&o.key, &b) {
                    if l.expires_ns > now {
                        other_leases.push(l);
                    }
                }
            }
        }
    }
    // Dry run: chunks only the baselines to delete name (the synthetic
    // baselines to write may still name some: an upper bound).
    let chunks = list(store, rf::CHUNKS_PREFIX).await?;
    let mut garbage: Vec<&ObjectMeta> = chunks
        .iter()
        .filter(|o| {
            o.key
                .rsplit('/')
                .next()
                .is_some_and(|h| !referenced.contains(h))
        })
        .collect();
    garbage.sort();
    if garbage.is_empty() {
        return Ok(());
    }
    if !other_leases.is_empty() && !del.report.dry_run {
        del.deferred = true;
        del.report.deferred_by_lease = true;
        del.report.deferred_objects += garbage.len() as u64;
        for l in other_leases {
            if !del.report.leases.contains(&l) {
                del.report.leases.push(l);
            }
        }
        return Ok(());
    }
    for o in &garbage {
        del.sizes.insert(o.key.clone(), o.size);
    }
    del.found(garbage.iter().map(|o| o.key.as_str()));
    for o in garbage {
        if del.delete(&o.key).await? {
            del.report.chunks_deleted += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
