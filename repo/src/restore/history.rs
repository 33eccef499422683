//! The repository's history of one disk: its baselines, journal segments
//! (repository and local merged, in replay order), the breaks in the record
//! chain, unusable objects, and the retention manifest that says what a
//! prune kept.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use cdp_core::journal::format::{self as jf, IndexEntry, Kind};

use super::chain;
use super::execute::{tick_with, Tick, Ticker};
use super::read::read_record;
use super::RestoreError;
use crate::format::{self as rf, Baseline, Frame};
use crate::read::ReadError;
use crate::store::Store;

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
    /// What the disk's GAP and RESYNCED records say: which GAPs a resync
    /// heals (read from their payloads when the history is loaded).
    pub resyncs: Resyncs,
}

/// The GAPs a resync heals (docs/REPOSITORY_FORMAT.md, "GAP and
/// RESYNCED"): a GAP whose payload says `"resync": true` at seq G is healed,
/// for every point from seq R on, by a RESYNCED at seq R > G whose `gap_seq`
/// is at most G. Points in [G, R) stay unrestorable. A RESYNCED whose payload
/// cannot be read heals nothing; a GAP whose payload cannot be read is a GAP
/// that needs a new baseline.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resyncs {
    /// Seqs of the GAPs whose payload says `"resync": true`.
    pub gaps: BTreeSet<u64>,
    /// (seq, gap_seq) of every RESYNCED record that reads, by seq.
    pub resynced: Vec<(u64, u64)>,
    /// For a resync GAP whose payload says `since_ns`: when its window
    /// began (the first write not journaled). Records journaled between
    /// then and the GAP (a MARK, a FLUSH, a SESSION_END written while the
    /// journal refused data) lie inside the window too.
    pub since: BTreeMap<u64, u64>,
}

impl Resyncs {
    /// The seq of the RESYNCED that heals the GAP at `gap`, if any: the
    /// first after it whose `gap_seq` is at most `gap`. `None` for a GAP
    /// without `"resync": true` (or one no resync has finished for).
    pub fn healed_by(&self, gap: u64) -> Option<u64> {
        if !self.gaps.contains(&gap) {
            return None;
        }
        self.resynced
            .iter()
            .filter(|&&(r, g)| g <= gap && r > gap)
            .map(|&(r, _)| r)
            .min()
    }
}

/// The largest GAP or RESYNCED payload read (they are a few dozen bytes of
/// JSON): a bigger one is taken as unreadable, never allocated.
const MAX_NOTE_PAYLOAD: u64 = 64 * 1024;

impl History {
    /// Why the GAP at `seq` is not a plain GAP, for an operator: a resync
    /// heals it from a later seq, or will once it finishes. `None` for a GAP
    /// that needs a new baseline.
    pub fn gap_note(&self, seq: u64) -> Option<String> {
        if !self.resyncs.gaps.contains(&seq) {
            return None;
        }
        let ts = self
            .entries()
            .find(|(_, e)| e.seq == seq)
            .map_or_else(|| "?".into(), |(_, e)| cdp_core::time::fmt_ns(e.ts_ns));
        Some(match self.resyncs.healed_by(seq) {
            Some(r) => format!(
                "from {ts} the journal could not take the disk's changes (full or failing): they were tracked, not journaled, until the resync that ended at seq {r}; points from seq {seq} to seq {} cannot be restored, points from seq {r} on can",
                r - 1
            ),
            None => format!(
                "from {ts} the journal could not take the disk's changes (full or failing): they are tracked, not journaled, and no resync has finished since (no RESYNCED record): points from seq {seq} on cannot be restored until cdpd's resync finishes or a baseline is taken after it"
            ),
        })
    }

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

    /// The resync GAP whose window holds a state at `seq` named by a time
    /// `ts_ns` (a time point, or the record's own time): a GAP after `seq`
    /// whose window began (`since_ns`) at or before `ts_ns`. Writes were
    /// then reaching the disk without a record, so the replay up to `seq`
    /// misses them (docs/REPOSITORY_FORMAT.md, "GAP and RESYNCED").
    pub fn unjournaled_window(&self, seq: u64, ts_ns: u64) -> Option<u64> {
        self.resyncs
            .since
            .iter()
            .find(|&(&g, &since)| g > seq && since <= ts_ns)
            .map(|(&g, _)| g)
    }

    /// The first seq inside the window of the resync GAP at `gap`: the
    /// first record written at or after its `since_ns` (the GAP itself
    /// when nothing was journaled meanwhile).
    pub fn window_start(&self, gap: u64) -> u64 {
        let Some(&since) = self.resyncs.since.get(&gap) else {
            return gap;
        };
        self.entries()
            .map(|(_, e)| e)
            .find(|e| e.seq < gap && e.ts_ns >= since)
            .map_or(gap, |e| e.seq)
    }

    /// The time of the newest record at or before `seq`.
    pub fn ts_at(&self, seq: u64) -> Option<u64> {
        self.entries()
            .map(|(_, e)| e)
            .filter(|e| e.seq <= seq)
            .last()
            .map(|e| e.ts_ns)
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
        // Never through a link in the VM's tree (root may be reading).
        let bytes = match cdp_core::journal::open_local_segment(&path).and_then(|mut f| {
            let mut b = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut b)
                .map_err(|e| cdp_core::journal::JournalError::io(&path, e))?;
            Ok(b)
        }) {
            Ok(b) => b,
            // Trimmed by the shipper meanwhile: the repository has it.
            Err(e) if e.is_not_found() => continue,
            Err(e) => {
                return Err(RestoreError::Corrupt {
                    what: path.display().to_string(),
                    why: e.to_string(),
                })
            }
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
    load_history_with(store, state_dir, vm, disk, None).await
}

/// [`load_history`], reporting the bytes of the repository's indexes and
/// baselines it reads (their listed sizes) to `tick`.
pub async fn load_history_with(
    store: Option<&Store>,
    state_dir: Option<&Path>,
    vm: &str,
    disk: &str,
    tick: Option<&Ticker>,
) -> Result<History, RestoreError> {
    let mut by_first: BTreeMap<u64, SegRef> = BTreeMap::new();
    let mut baselines = Vec::new();
    let mut orphans = Vec::new();
    let mut retention = None;
    if let Some(store) = store {
        let chain = load_repo_chain(store, vm, disk, &mut orphans, tick).await?;
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
        let named = |o: &crate::store::ObjectMeta| {
            rf::parse_baseline_name(o.key.rsplit('/').next().unwrap_or("")).is_some()
        };
        let found = list.iter().filter(|o| named(o)).map(|o| o.size).sum();
        tick_with(tick, Tick::Found(found));
        for o in list {
            if !named(&o) {
                continue;
            }
            let b = store.get(&o.key).await.map_err(ReadError::from)?;
            tick_with(tick, Tick::Done(o.size));
            match Baseline::decode(&o.key, &b) {
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
    let resyncs = load_resyncs(store, vm, disk, &segments).await?;
    Ok(History {
        vm: vm.to_string(),
        disk: disk.to_string(),
        baselines,
        segments,
        breaks,
        orphans,
        retention,
        resyncs,
    })
}

/// Read the payloads of a disk's GAP and RESYNCED records (tiny JSON, and
/// rare) into the [`Resyncs`] they make. A record that cannot be read or
/// does not decode counts as a plain GAP / heals nothing; only an
/// unreachable repository is an error (trying again may succeed).
pub async fn load_resyncs(
    store: Option<&Store>,
    vm: &str,
    disk: &str,
    segments: &[SegRef],
) -> Result<Resyncs, RestoreError> {
    let mut out = Resyncs::default();
    for seg in segments {
        for e in seg
            .entries
            .iter()
            .filter(|e| matches!(e.kind, Kind::Gap | Kind::Resynced))
        {
            let Some(v) = read_note(store, vm, disk, seg, e).await? else {
                continue;
            };
            match e.kind {
                Kind::Gap if v["resync"] == serde_json::Value::Bool(true) => {
                    out.gaps.insert(e.seq);
                    if let Some(t) = v["since_ns"].as_u64() {
                        out.since.insert(e.seq, t);
                    }
                }
                Kind::Resynced => {
                    if let Some(g) = v["gap_seq"].as_u64() {
                        out.resynced.push((e.seq, g));
                    }
                }
                _ => {}
            }
        }
    }
    out.resynced.sort();
    Ok(out)
}

/// The JSON payload of a small record; `None` when it cannot be read, is
/// too long or is not JSON.
async fn read_note(
    store: Option<&Store>,
    vm: &str,
    disk: &str,
    seg: &SegRef,
    e: &IndexEntry,
) -> Result<Option<serde_json::Value>, RestoreError> {
    let hpos = e.payload_pos - jf::RECORD_HEADER_LEN as u64;
    let header = match super::read::read_raw(store, vm, disk, seg, hpos..e.payload_pos).await {
        Ok(b) => jf::RecordHeader::decode(&b).ok(),
        Err(err) if err.is_transient() => return Err(err),
        Err(_) => None,
    };
    let Some(h) = header.filter(|h| u64::from(h.payload_len) <= MAX_NOTE_PAYLOAD) else {
        return Ok(None);
    };
    match read_record(store, vm, disk, seg, e, Some(u64::from(h.payload_len))).await {
        Ok((_, p)) => Ok(serde_json::from_slice(&p).ok()),
        Err(err) if err.is_transient() => Err(err),
        Err(_) => Ok(None),
    }
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
        if let Ok(m) = rf::RetentionManifest::decode(&o.key, &b) {
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
    tick: Option<&Ticker>,
) -> Result<Vec<rf::SegmentIndex>, RestoreError> {
    type Pair = (Option<String>, Option<(String, u64)>);
    let mut pairs: BTreeMap<(u64, u64), Pair> = BTreeMap::new();
    for o in store
        .list(&rf::journal_prefix(vm, disk))
        .await
        .map_err(ReadError::from)?
    {
        if let Some((a, b, is_idx)) = rf::parse_journal_name(o.key.rsplit('/').next().unwrap_or(""))
        {
            let e = pairs.entry((a, b)).or_default();
            if is_idx {
                e.1 = Some((o.key, o.size));
            } else {
                e.0 = Some(o.key);
            }
        }
    }
    // The indexes read: those with their segment.
    let found = pairs
        .values()
        .filter_map(|p| p.0.as_ref().and(p.1.as_ref()))
        .map(|(_, n)| n)
        .sum();
    tick_with(tick, Tick::Found(found));
    let mut out = Vec::new();
    for (_, pair) in pairs {
        match pair {
            (Some(_), Some((idx, size))) => {
                let b = store.get(&idx).await.map_err(ReadError::from)?;
                tick_with(tick, Tick::Done(size));
                match rf::SegmentIndex::decode(&idx, &b) {
                    Ok(i) => out.push((i, rf::index_blake3(&b), idx)),
                    Err(_) => unusable.push(idx),
                }
            }
            (Some(k), None) | (None, Some((k, _))) => unusable.push(k),
            (None, None) => {}
        }
    }
    let pruned_to = load_retention(store, vm)
        .await?
        .and_then(|m| m.disk(disk).map(|d| d.journal_from_seq));
    Ok(drop_unvouched(out, pruned_to, unusable))
}

/// The segments the chain of indexes vouches for (docs/REPOSITORY_FORMAT.md,
/// "Chain of indexes"): one whose successor names another index (deleted,
/// reordered or replaced history) goes to `unusable` like a damaged
/// object, so no point is planned through it.
fn drop_unvouched(
    segs: Vec<(rf::SegmentIndex, String, String)>,
    pruned_to: Option<u64>,
    unusable: &mut Vec<String>,
) -> Vec<rf::SegmentIndex> {
    let linked: Vec<chain::Linked<'_>> = segs
        .iter()
        .map(|(i, h, _)| chain::Linked {
            first_seq: i.meta.first_seq,
            last_seq: i.meta.last_seq,
            record_base: i.meta.record_base,
            records: i.meta.records,
            prev: i.meta.prev.as_ref(),
            index_blake3: h,
        })
        .collect();
    let damaged: Vec<(u64, u64)> = unusable
        .iter()
        .filter_map(|k| rf::parse_journal_name(k.rsplit('/').next().unwrap_or("")))
        .map(|(a, b, _)| (a, b))
        .collect();
    let c = chain::check(&linked, pruned_to, &damaged);
    let mut out = Vec::with_capacity(segs.len());
    for (k, (i, _, key)) in segs.into_iter().enumerate() {
        if c.suspect.contains_key(&k) {
            unusable.push(key);
        } else {
            out.push(i);
        }
    }
    out
}

/// Unusable repository objects of the journal whose seq range meets
/// `lo..=hi` and that no loaded segment stands in for.
pub(crate) fn damaged_in(h: &History, lo: u64, hi: u64) -> Vec<&str> {
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

pub(crate) fn with_damage(h: &History, lo: u64, hi: u64) -> String {
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
pub(crate) fn missing_after(h: &History, p: u64) -> Option<String> {
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

/// Labels of the MARK records of a disk: (seq, ts, label).
pub async fn marks(
    h: &History,
    store: Option<&Store>,
) -> Result<Vec<(u64, u64, String)>, RestoreError> {
    texts_of(h, store, Kind::Mark, "label").await
}

/// A MARK record of a disk, with whether the guest was quiesced for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkRecord {
    pub seq: u64,
    pub ts_ns: u64,
    pub label: String,
    /// The payload says `"quiesced": true` (docs/JOURNAL_FORMAT.md,
    /// "Record kinds"); marks of earlier versions are crash-consistent.
    pub quiesced: bool,
}

/// The MARK records of a disk, oldest first ("?" for a payload that names
/// no label, as [`marks`]).
pub async fn mark_records(
    h: &History,
    store: Option<&Store>,
) -> Result<Vec<MarkRecord>, RestoreError> {
    let records: Vec<(usize, IndexEntry)> = h
        .entries()
        .filter(|(_, e)| e.kind == Kind::Mark)
        .map(|(i, e)| (i, *e))
        .collect();
    let mut out = Vec::new();
    for (i, e) in records {
        let (_, payload) = read_record(store, &h.vm, &h.disk, &h.segments[i], &e, None).await?;
        let m = cdp_core::journal::MarkPayload::parse(&payload);
        out.push(MarkRecord {
            seq: e.seq,
            ts_ns: e.ts_ns,
            label: m.as_ref().map_or("?", |m| m.label.as_str()).to_string(),
            quiesced: m.is_some_and(|m| m.quiesced),
        });
    }
    Ok(out)
}

/// GAP records of a disk: (seq, ts, reason). The reason of a GAP a resync
/// heals (or will) says which points it leaves unrestorable
/// ([`History::gap_note`]).
pub async fn gaps(
    h: &History,
    store: Option<&Store>,
) -> Result<Vec<(u64, u64, String)>, RestoreError> {
    let mut out = texts_of(h, store, Kind::Gap, "reason").await?;
    for (seq, _, reason) in out.iter_mut() {
        if let Some(n) = h.gap_note(*seq) {
            *reason = format!("{reason} ({n})");
        }
    }
    Ok(out)
}

/// The records of `kind` with the string `field` of their JSON payload
/// ("?" when it has none): (seq, ts, text).
async fn texts_of(
    h: &History,
    store: Option<&Store>,
    kind: Kind,
    field: &str,
) -> Result<Vec<(u64, u64, String)>, RestoreError> {
    let records: Vec<(usize, IndexEntry)> = h
        .entries()
        .filter(|(_, e)| e.kind == kind)
        .map(|(i, e)| (i, *e))
        .collect();
    let mut out = Vec::new();
    for (i, e) in records {
        let (_, payload) = read_record(store, &h.vm, &h.disk, &h.segments[i], &e, None).await?;
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
        out.push((e.seq, e.ts_ns, v[field].as_str().unwrap_or("?").to_string()));
    }
    Ok(out)
}
