//! Listing and loading what the repository holds of a VM: the format
//! marker, vm.json, the disks, and each disk's journal objects and
//! baselines, into the [`History`] restore would see.

use std::collections::{BTreeMap, BTreeSet};

use crate::format::{self as rf, Baseline, SegmentIndex};
use crate::restore::{chain, tick_with, History, SegLoc, SegRef, Tick, Ticker};
use crate::store::{ObjectMeta, Store};

use super::{
    check, get, last_component, list, problem, strip_key, Checked, DiskScan, Kind, Problem,
    VerifyError,
};

/// The repository format marker: missing or not ours is a problem.
pub(super) async fn format_marker(
    store: &Store,
    problems: &mut Vec<Problem>,
) -> Result<(), VerifyError> {
    match get(store, rf::FORMAT_KEY).await? {
        None => problems.push(problem(
            None,
            Some(rf::FORMAT_KEY.into()),
            Kind::Missing,
            "the repository format marker is missing".into(),
        )),
        Some(b) => {
            if let Err(e) = rf::check_format_marker(&b) {
                problems.push(problem(
                    None,
                    Some(rf::FORMAT_KEY.into()),
                    Kind::Corrupt,
                    e.to_string(),
                ));
            }
        }
    }
    Ok(())
}

/// The disks vm.json names (none when it is missing or not this VM's).
pub(super) async fn vm_json_disks(
    store: &Store,
    vm: &str,
    problems: &mut Vec<Problem>,
) -> Result<BTreeSet<String>, VerifyError> {
    let (vm_json_key, found) = match crate::read::latest_vm_json(store, vm).await {
        Ok(Some((k, b))) => (k, Some(b)),
        Ok(None) => (rf::vm_json_key(vm), None),
        Err(crate::read::ReadError::Store(e)) => return Err(e.into()),
        Err(e) => {
            problems.push(problem(
                None,
                Some(rf::vm_json_key(vm)),
                Kind::Corrupt,
                e.to_string(),
            ));
            return Ok(BTreeSet::new());
        }
    };
    let mut disks = BTreeSet::new();
    match found {
        None => problems.push(problem(
            None,
            Some(vm_json_key.clone()),
            Kind::Missing,
            "vm.json is missing: the VM cannot be found by name, nor its disks' paths".into(),
        )),
        Some(b) => match rf::VmJson::decode(&vm_json_key, &b) {
            Ok(j) if j.uuid == vm => disks.extend(j.disks.into_iter().map(|d| d.name)),
            Ok(j) => problems.push(problem(
                None,
                Some(vm_json_key.clone()),
                Kind::Corrupt,
                format!("vm.json names VM {}, not {vm}", j.uuid),
            )),
            Err(e) => problems.push(problem(
                None,
                Some(vm_json_key.clone()),
                Kind::Corrupt,
                format!("vm.json does not decode: {e}"),
            )),
        },
    }
    Ok(disks)
}

/// The disks that have a journal or baselines in the repository.
pub(super) async fn listed_disks(store: &Store, vm: &str) -> Result<BTreeSet<String>, VerifyError> {
    let prefix = rf::vm_prefix(vm);
    let mut disks = BTreeSet::new();
    for o in list(store, &prefix).await? {
        let rest = &o.key[prefix.len()..];
        if let Some((disk, tail)) = rest.split_once('/') {
            if tail.starts_with("journal/") || tail.starts_with("baselines/") {
                disks.insert(disk.to_string());
            }
        }
    }
    Ok(disks)
}

/// A journal object pair by its name's seq range: (segment, index).
type Pairs = BTreeMap<(u64, u64), (Option<ObjectMeta>, Option<ObjectMeta>)>;

/// The scan of one disk, step by step: what it has found so far.
pub(super) struct DiskScanner<'a> {
    pub(super) store: &'a Store,
    pub(super) vm: &'a str,
    pub(super) disk: &'a str,
    pub(super) deep: bool,
    pub(super) checked: &'a mut Checked,
    pub(super) retention: Option<&'a rf::RetentionManifest>,
    /// What retention kept of this disk's journal: (journal_from_seq,
    /// record_base).
    pub(super) thinned_to: Option<(u64, u64)>,
    pub(super) problems: Vec<Problem>,
    /// Records whose bytes cannot be read back (first seq of each stretch).
    pub(super) bad_records: Vec<u64>,
    /// The newest seq the repository's object names speak of.
    pub(super) last_named: Option<u64>,
    /// Where the bytes of the segment objects checked are reported.
    pub(super) tick: Option<Ticker>,
}

impl<'a> DiskScanner<'a> {
    pub(super) fn new(
        store: &'a Store,
        vm: &'a str,
        disk: &'a str,
        deep: bool,
        checked: &'a mut Checked,
        retention: Option<&'a rf::RetentionManifest>,
    ) -> Self {
        let thinned_to = retention
            .and_then(|m| m.disk(disk))
            .map(|r| (r.journal_from_seq, r.record_base));
        DiskScanner {
            store,
            vm,
            disk,
            deep,
            checked,
            retention,
            thinned_to,
            problems: Vec::new(),
            bad_records: Vec::new(),
            last_named: None,
            tick: None,
        }
    }

    /// A problem of this disk, about `key`, from `from_seq` on.
    pub(super) fn report(
        &mut self,
        key: Option<String>,
        kind: Kind,
        what: String,
        from_seq: Option<u64>,
    ) {
        let mut p = problem(Some(self.disk), key, kind, what);
        p.from_seq = from_seq;
        self.problems.push(p);
    }

    /// Every journal segment and baseline of the disk, checked, and the
    /// history restore would build from those that can be used.
    pub(super) async fn scan(mut self) -> Result<DiskScan, VerifyError> {
        let pairs = self.list_journal().await?;
        let listed = |seg: &Option<ObjectMeta>| seg.as_ref().map_or(0, |o| o.size);
        let found = pairs.values().map(|(seg, _)| listed(seg)).sum();
        tick_with(self.tick.as_ref(), Tick::Found(found));
        let mut loaded: Vec<(SegmentIndex, String)> = Vec::new();
        let mut damaged = Vec::new();
        for ((a, b), (seg, idx)) in pairs {
            let size = listed(&seg);
            let index = self.load_segment(a, b, seg, idx).await?;
            tick_with(self.tick.as_ref(), Tick::Done(size));
            match index {
                Some(i) => loaded.push(i),
                None => damaged.push((a, b)),
            }
        }
        let (segments, chain_notes) = self.check_links(loaded, &damaged);
        let baselines = self.load_baselines().await?;
        // The history restore would see.
        let segs: Vec<SegRef> = segments
            .into_iter()
            .map(|i| SegRef {
                first_seq: i.meta.first_seq,
                last_seq: i.meta.last_seq,
                record_base: i.meta.record_base,
                loc: SegLoc::Repo {
                    frames: i.frames,
                    object_size: i.meta.object_size,
                },
                entries: i.entries,
            })
            .collect();
        let breaks = self.chain_breaks(&segs);
        self.chain_start(&segs, &baselines);
        // Which GAPs a resync heals: restore's own rule needs their payloads.
        let resyncs =
            match crate::restore::load_resyncs(Some(self.store), self.vm, self.disk, &segs).await {
                Ok(r) => r,
                Err(crate::restore::RestoreError::Read(crate::read::ReadError::Store(e))) => {
                    return Err(e.into())
                }
                Err(_) => Default::default(),
            };
        Ok(DiskScan {
            history: History {
                vm: self.vm.to_string(),
                disk: self.disk.to_string(),
                baselines,
                segments: segs,
                breaks,
                orphans: Vec::new(),
                retention: self.retention.cloned(),
                resyncs,
            },
            problems: self.problems,
            bad_baselines: BTreeSet::new(),
            bad_records: self.bad_records,
            last_named: self.last_named,
            chain_notes,
        })
    }

    /// The chain of indexes (docs/REPOSITORY_FORMAT.md, "Chain of
    /// indexes"): each segment nothing vouches for although the chain was
    /// recorded is a problem and is left out (as restore leaves it out);
    /// a first segment that follows on from a missing one is a problem.
    /// Returns the segments kept and what the chain covers, for people.
    fn check_links(
        &mut self,
        loaded: Vec<(SegmentIndex, String)>,
        damaged: &[(u64, u64)],
    ) -> (Vec<SegmentIndex>, Vec<String>) {
        let linked: Vec<chain::Linked<'_>> = loaded
            .iter()
            .map(|(i, h)| chain::Linked {
                first_seq: i.meta.first_seq,
                last_seq: i.meta.last_seq,
                record_base: i.meta.record_base,
                records: i.meta.records,
                prev: i.meta.prev.as_ref(),
                index_blake3: h,
            })
            .collect();
        let c = chain::check(&linked, self.thinned_to.map(|(f, _)| f), damaged);
        let mut notes = Vec::new();
        match (c.recorded_from, loaded.first()) {
            (_, None) => {}
            (None, Some(_)) => notes.push(
                "chain of indexes not recorded (indexes written before it carry no link): deleted or replaced segments show only as record-chain breaks".to_string(),
            ),
            (Some(f), Some((first, _))) if f > first.meta.first_seq => notes.push(format!(
                "chain of indexes not recorded before seq {f} (indexes written before it carry no link)"
            )),
            _ => {}
        }
        for (a, b) in &c.unvouched {
            notes.push(format!(
                "seq {a}-{b} is vouched for by no index: the segment after it is damaged (reported above)"
            ));
        }
        for (a, b) in &c.heads {
            notes.push(format!(
                "chain head not anchored: nothing in the repository vouches for the newest segment of the chain (seq {a}-{b}); its deletion or replacement shows only against the host's catalog or another target"
            ));
        }
        if let Some(why) = c.start_missing.clone() {
            self.report(None, Kind::Chain, why, None);
        }
        let mut kept = Vec::with_capacity(loaded.len());
        for (k, (i, _)) in loaded.into_iter().enumerate() {
            match c.suspect.get(&k) {
                Some(why) => {
                    let key = rf::index_key(self.vm, self.disk, i.meta.first_seq, i.meta.last_seq);
                    let what = format!(
                        "{why}: the segment (seq {}-{}) cannot be used",
                        i.meta.first_seq, i.meta.last_seq
                    );
                    self.report(Some(key), Kind::Chain, what, Some(i.meta.first_seq));
                }
                None => kept.push(i),
            }
        }
        (kept, notes)
    }

    /// The disk's journal objects, paired by name; a name that is not a
    /// journal object's is a problem.
    async fn list_journal(&mut self) -> Result<Pairs, VerifyError> {
        let mut pairs = Pairs::new();
        for o in list(self.store, &rf::journal_prefix(self.vm, self.disk)).await? {
            match rf::parse_journal_name(last_component(&o.key)) {
                Some((a, b, is_idx)) => {
                    self.last_named = self.last_named.max(Some(b));
                    let e = pairs.entry((a, b)).or_default();
                    *(if is_idx { &mut e.1 } else { &mut e.0 }) = Some(o);
                }
                None => self.report(
                    Some(o.key.clone()),
                    Kind::Corrupt,
                    "not a journal object name (<first:020>-<last:020>.seg.zst or .idx)".into(),
                    None,
                ),
            }
        }
        Ok(pairs)
    }

    /// One segment (seq `a`-`b`): its index loaded and checked, the object
    /// checked against it. `None` when it cannot be used.
    async fn load_segment(
        &mut self,
        a: u64,
        b: u64,
        seg: Option<ObjectMeta>,
        idx: Option<ObjectMeta>,
    ) -> Result<Option<(SegmentIndex, String)>, VerifyError> {
        // Half of a segment a prune was deleting when it stopped: below
        // what retention keeps, nothing needs it (the next prune removes it).
        if (seg.is_none() || idx.is_none()) && self.thinned_to.is_some_and(|(f, _)| b <= f) {
            return Ok(None);
        }
        let Some(index) = self.load_index(a, b, seg.as_ref(), idx.as_ref()).await? else {
            return Ok(None);
        };
        let Some(listed_size) = self.segment_size(a, b, seg.as_ref()).await? else {
            return Ok(None);
        };
        self.checked.segments += 1;
        self.check_segment(&index.0, listed_size).await?;
        Ok(Some(index))
    }

    /// The index of segment `a`-`b`, decoded and consistent, and the
    /// BLAKE3 of its bytes.
    async fn load_index(
        &mut self,
        a: u64,
        b: u64,
        seg: Option<&ObjectMeta>,
        idx: Option<&ObjectMeta>,
    ) -> Result<Option<(SegmentIndex, String)>, VerifyError> {
        let seg_key = rf::segment_key(self.vm, self.disk, a, b);
        let idx_key = rf::index_key(self.vm, self.disk, a, b);
        // With only the segment listed, perhaps an upload in flight (the
        // segment goes first): look again.
        let idx_bytes = if idx.is_some() || seg.is_some() {
            get(self.store, &idx_key).await?
        } else {
            None
        };
        let Some(ib) = idx_bytes else {
            if seg.is_some() {
                let what = format!(
                    "index missing: the segment {} (seq {a}-{b}) cannot be used without it",
                    last_component(&seg_key)
                );
                self.report(Some(idx_key), Kind::Missing, what, Some(a));
            }
            return Ok(None);
        };
        self.checked.indexes += 1;
        match SegmentIndex::decode(&idx_key, &ib)
            .map_err(|e| strip_key(&e.to_string(), &idx_key))
            .and_then(|i| check::index(&i, self.vm, self.disk, a, b).map(|_| i))
        {
            Ok(i) => Ok(Some((i, rf::index_blake3(&ib)))),
            Err(what) => {
                let what = if (ib.len() as u64) < idx.map_or(0, |o| o.size) {
                    format!("{what} (the object is shorter than listed)")
                } else {
                    what
                };
                let what = format!("{what}: the segment (seq {a}-{b}) cannot be used");
                self.report(Some(idx_key), Kind::Corrupt, what, Some(a));
                Ok(None)
            }
        }
    }

    /// The size of segment object `a`-`b`, as listed, or as fetched when
    /// the listing was taken before it was uploaded (it goes first).
    async fn segment_size(
        &mut self,
        a: u64,
        b: u64,
        seg: Option<&ObjectMeta>,
    ) -> Result<Option<u64>, VerifyError> {
        if let Some(o) = seg {
            return Ok(Some(o.size));
        }
        let seg_key = rf::segment_key(self.vm, self.disk, a, b);
        match get(self.store, &seg_key).await? {
            Some(obj) => Ok(Some(obj.len() as u64)),
            None => {
                let idx_key = rf::index_key(self.vm, self.disk, a, b);
                let what = format!(
                    "segment object missing (its index {} is there)",
                    last_component(&idx_key)
                );
                self.report(Some(seg_key), Kind::Missing, what, Some(a));
                Ok(None)
            }
        }
    }

    /// The baselines of the disk that can be used, by (s1, s0).
    async fn load_baselines(&mut self) -> Result<Vec<(String, Baseline)>, VerifyError> {
        let mut baselines = Vec::new();
        for o in list(self.store, &rf::baseline_prefix(self.vm, self.disk)).await? {
            let Some((s1, s0)) = rf::parse_baseline_name(last_component(&o.key)) else {
                self.report(
                    Some(o.key.clone()),
                    Kind::Corrupt,
                    "not a baseline name (<s1:020>-<s0:020>.json)".into(),
                    None,
                );
                continue;
            };
            self.checked.baselines += 1;
            let Some(b) = get(self.store, &o.key).await? else {
                continue; // removed since the listing (pruned)
            };
            let wrong = match Baseline::decode(&o.key, &b) {
                Err(e) => Err(format!("baseline does not decode: {e}")),
                Ok(bl) => check::baseline(&bl, self.vm, self.disk, s0, s1).map(|_| bl),
            };
            match wrong {
                Ok(bl) => baselines.push((o.key, bl)),
                Err(what) => self.report(Some(o.key.clone()), Kind::Corrupt, what, Some(s1)),
            }
        }
        baselines.sort_by_key(|(_, b)| (b.s1, b.s0));
        Ok(baselines)
    }
}
