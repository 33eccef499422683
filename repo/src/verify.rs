//! `cdpctl verify`: can every point of a VM be rebuilt from the repository,
//! and is every object intact?
//!
//! The quick check reads what a restore plans from: LISTs of each disk's
//! `journal/` and `baselines/` (sizes come with them), every `.idx` object
//! and baseline, and one LIST of `cdp/v1/chunks/` (no HEAD per object). It
//! finds segments without their index and the reverse, indexes that do not
//! decode or do not match their name, segment objects whose size is not the
//! one their index gives (a truncated object), breaks in the record chain,
//! baselines that do not decode, chunks a baseline names that are not
//! there, GAP records.
//!
//! `--deep` also fetches every segment object (size and BLAKE3 against its
//! index, every zstd frame decompressed, every record's CRC checked by
//! scanning the raw segment, every record against its index entry) and
//! every chunk a baseline names (decompressed and checked against its name).
//!
//! Each problem names the object, what is wrong with it, and which points it
//! makes unrestorable. Those follow restore's own rules (the newest baseline
//! whose chain reaches the point is the one used, see
//! [`crate::restore::plan`]): the points restore would refuse or fail on,
//! which an intact repository would have rebuilt. A corrupt record makes
//! every later point of the baselines that need it count as unrestorable,
//! although a restore whose every byte from that record was overwritten
//! later would still succeed.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use cdp_core::journal::format::{self as jf, IndexEntry, Kind as RecKind, RECORD_HEADER_LEN};
use cdp_core::time::fmt_ns;
use futures::StreamExt;
use serde::Serialize;

use crate::format::{self as rf, Baseline, SegmentIndex};
use crate::restore::{self, History, SegLoc, SegRef};
use crate::store::{with_retry, ObjectMeta, RetryPolicy, Store, StoreError};

/// What is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// An object that should be there is not.
    Missing,
    /// An object is there but its content is wrong.
    Corrupt,
    /// An object is shorter (or longer) than its index says.
    Truncated,
    /// Records are missing from a disk's journal.
    Chain,
    /// Points are not restorable for a reason that is no damaged object
    /// (a GAP with no baseline after it, no baseline at all).
    Unrestorable,
}

/// A range of sequence numbers, with the times of the records there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeqRange {
    pub from_seq: u64,
    pub to_seq: u64,
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub disk: Option<String>,
    /// The object at fault (the missing one, for a missing object).
    pub key: Option<String>,
    pub kind: Kind,
    pub what: String,
    /// The points it makes unrestorable; empty when no restorable point
    /// needs it.
    pub unrestorable: Vec<SeqRange>,
    /// Labels of the marks among those points.
    pub marks: Vec<String>,
    /// Where the damage begins (for attributing unrestorable points).
    #[serde(skip)]
    from_seq: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BaselineInfo {
    pub key: String,
    pub s0: u64,
    pub s1: u64,
    pub chunks: u64,
    pub stored_chunks: u64,
    pub usable: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Mark {
    pub seq: u64,
    pub time: String,
    pub label: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Gap {
    pub seq: u64,
    pub time: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    pub disk: String,
    pub segments: u64,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub baselines: Vec<BaselineInfo>,
    /// The seq ranges that can be restored.
    pub restorable: Vec<SeqRange>,
    /// Ranges an intact repository would restore but this one cannot.
    pub unrestorable: Vec<SeqRange>,
    pub marks: Vec<Mark>,
    pub gaps: Vec<Gap>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Checked {
    pub indexes: u64,
    pub segments: u64,
    pub baselines: u64,
    pub chunks: u64,
    /// Objects fetched whole (`--deep`) and their bytes.
    pub fetched_objects: u64,
    pub fetched_bytes: u64,
    pub definitions: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub vm_uuid: String,
    pub repo: String,
    pub deep: bool,
    pub ok: bool,
    pub disks: Vec<DiskReport>,
    pub problems: Vec<Problem>,
    pub checked: Checked,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The repository cannot be read at all (unreachable, no credentials…):
    /// nothing can be said about its objects.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn problem(disk: Option<&str>, key: Option<String>, kind: Kind, what: String) -> Problem {
    Problem {
        disk: disk.map(str::to_string),
        key,
        kind,
        what,
        unrestorable: Vec::new(),
        marks: Vec::new(),
        from_seq: None,
    }
}

fn last_component(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

/// GET with the default retry policy; a missing object is `Ok(None)`.
async fn get(store: &Store, key: &str) -> Result<Option<bytes::Bytes>, StoreError> {
    let retry = RetryPolicy::default();
    match with_retry(key, &retry, || store.get(key)).await {
        Ok(b) => Ok(Some(b)),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

async fn list(store: &Store, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
    let retry = RetryPolicy::default();
    with_retry(prefix, &retry, || store.list(prefix)).await
}

/// Check a whole VM.
pub async fn verify(store: &Store, vm: &str, deep: bool) -> Result<Report, VerifyError> {
    let mut problems = Vec::new();
    let mut checked = Checked::default();
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
    let vm_json_key = rf::vm_json_key(vm);
    let mut disks: BTreeSet<String> = BTreeSet::new();
    match get(store, &vm_json_key).await? {
        None => problems.push(problem(
            None,
            Some(vm_json_key.clone()),
            Kind::Missing,
            "vm.json is missing: the VM cannot be found by name, nor its disks' paths".into(),
        )),
        Some(b) => match serde_json::from_slice::<rf::VmJson>(&b) {
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
    checked.definitions = list(store, &rf::config_prefix(vm))
        .await?
        .iter()
        .filter(|o| o.key.ends_with(".xml"))
        .count() as u64;
    let prefix = rf::vm_prefix(vm);
    for o in list(store, &prefix).await? {
        let rest = &o.key[prefix.len()..];
        if let Some((disk, tail)) = rest.split_once('/') {
            if tail.starts_with("journal/") || tail.starts_with("baselines/") {
                disks.insert(disk.to_string());
            }
        }
    }
    // Every disk's journal and baselines first, then one LIST of the chunks
    // (a baseline is written after its chunks, so every chunk of a baseline
    // listed before is in the later listing).
    // What retention kept (a thinned journal is not damage).
    let retention = match restore::load_retention(store, vm).await {
        Ok(m) => m,
        Err(restore::RestoreError::Read(crate::read::ReadError::Store(e))) => return Err(e.into()),
        Err(_) => None,
    };
    let mut scans = Vec::new();
    for disk in &disks {
        scans.push(scan_disk(store, vm, disk, deep, &mut checked, retention.as_ref()).await?);
    }
    let mut referenced: BTreeMap<String, (usize, Vec<(usize, usize)>)> = BTreeMap::new();
    for (d, s) in scans.iter().enumerate() {
        for (bi, (_, b)) in s.history.baselines.iter().enumerate() {
            for (ci, c) in b.chunks.iter().enumerate() {
                if let Some(h) = c {
                    let len = b.chunk_size.min(b.size - ci as u64 * b.chunk_size) as usize;
                    referenced
                        .entry(h.clone())
                        .or_insert((len, Vec::new()))
                        .1
                        .push((d, bi));
                }
            }
        }
    }
    checked.chunks = referenced.len() as u64;
    if !referenced.is_empty() {
        let present: HashMap<String, u64> = list(store, rf::CHUNKS_PREFIX)
            .await?
            .into_iter()
            .map(|o| (last_component(&o.key).to_string(), o.size))
            .collect();
        let mut bad: Vec<(String, Kind, String)> = Vec::new();
        for h in referenced.keys() {
            match present.get(h) {
                None => bad.push((h.clone(), Kind::Missing, "chunk missing".into())),
                Some(0) => bad.push((h.clone(), Kind::Truncated, "chunk object is empty".into())),
                Some(_) => {}
            }
        }
        if deep {
            let todo: Vec<(String, usize)> = referenced
                .iter()
                .filter(|(h, _)| present.get(*h).is_some_and(|&n| n > 0))
                .map(|(h, (len, _))| (h.clone(), *len))
                .collect();
            let mut results = futures::stream::iter(todo.into_iter().map(|(h, len)| async move {
                let key = rf::chunk_key(&h);
                let r = match get(store, &key).await {
                    Ok(None) => Err((Kind::Missing, "chunk missing".to_string(), 0)),
                    Ok(Some(obj)) => {
                        let n = obj.len() as u64;
                        match rf::decompress_chunk(&h, &obj, len) {
                            Ok(d) if d.len() == len => Ok(n),
                            Ok(d) => Err((
                                Kind::Corrupt,
                                format!("chunk is {} bytes, its baseline says {len}", d.len()),
                                n,
                            )),
                            Err(e) => Err((Kind::Corrupt, strip_key(&e.to_string(), &key), n)),
                        }
                    }
                    Err(e) => return Err(e),
                };
                Ok((h, r))
            }))
            .buffer_unordered(8);
            while let Some(r) = results.next().await {
                let (h, r) = r?;
                checked.fetched_objects += 1;
                match r {
                    Ok(n) => checked.fetched_bytes += n,
                    Err((kind, what, n)) => {
                        checked.fetched_bytes += n;
                        bad.push((h, kind, what));
                    }
                }
            }
        }
        bad.sort();
        for (h, kind, what) in bad {
            let users = &referenced[&h].1;
            for (d, s) in scans.iter_mut().enumerate() {
                let mine: Vec<usize> = users
                    .iter()
                    .filter(|(dd, _)| *dd == d)
                    .map(|(_, b)| *b)
                    .collect();
                if mine.is_empty() {
                    continue;
                }
                let names: Vec<&str> = mine
                    .iter()
                    .map(|&b| last_component(&s.history.baselines[b].0))
                    .collect();
                let mut p = problem(
                    Some(&s.history.disk),
                    Some(rf::chunk_key(&h)),
                    kind,
                    format!("{what} (named by baseline {})", names.join(", ")),
                );
                p.from_seq = mine.iter().map(|&b| s.history.baselines[b].1.s1).min();
                for b in mine {
                    s.bad_baselines.insert(b);
                }
                s.problems.push(p);
            }
        }
    }
    let mut out_disks = Vec::new();
    for s in scans {
        let (d, p) = finish_disk(store, s).await;
        out_disks.push(d);
        problems.extend(p);
    }
    Ok(Report {
        vm_uuid: vm.to_string(),
        repo: store.url().to_string(),
        deep,
        ok: problems.is_empty(),
        disks: out_disks,
        problems,
        checked,
    })
}

/// Error texts of the format module begin with the key; the problem names
/// it already.
fn strip_key(msg: &str, key: &str) -> String {
    msg.strip_prefix(key)
        .and_then(|m| m.strip_prefix(": "))
        .unwrap_or(msg)
        .to_string()
}

/// What [`scan_disk`] found, before the chunks are checked.
struct DiskScan {
    history: History,
    problems: Vec<Problem>,
    /// Baselines (index into history.baselines) that cannot be used.
    bad_baselines: BTreeSet<usize>,
    /// Records whose bytes cannot be read back (first seq of each stretch).
    bad_records: Vec<u64>,
    /// The newest seq the repository's object names speak of.
    last_named: Option<u64>,
}

/// Is the index consistent with its name, its VM and disk, and itself?
fn check_index(
    i: &SegmentIndex,
    vm: &str,
    disk: &str,
    first: u64,
    last: u64,
) -> Result<(), String> {
    let m = &i.meta;
    if m.vm_uuid != vm || m.disk != disk {
        return Err(format!(
            "index is of VM {} disk {}, not of {vm} {disk}",
            m.vm_uuid, m.disk
        ));
    }
    if m.first_seq != first || m.last_seq != last {
        return Err(format!(
            "index says seq {}-{}, its name {first}-{last}",
            m.first_seq, m.last_seq
        ));
    }
    if i.entries.is_empty() {
        return Err("index has no records".into());
    }
    let seqs_ok = i.entries.windows(2).all(|w| w[0].seq < w[1].seq)
        && i.entries[0].seq >= first
        && i.entries.last().unwrap().seq == last;
    if !seqs_ok {
        return Err("index records are not in seq order within the segment's range".into());
    }
    let pos_ok = i
        .entries
        .windows(2)
        .all(|w| w[0].payload_pos < w[1].payload_pos)
        && i.entries[0].payload_pos >= (jf::SEGMENT_HEADER_LEN + RECORD_HEADER_LEN) as u64
        && i.entries.last().unwrap().payload_pos <= m.raw_size;
    if !pos_ok {
        return Err("index record positions are out of order or outside the segment".into());
    }
    let frames_ok = !i.frames.is_empty()
        && i.frames[0].raw_offset == 0
        && i.frames[0].object_offset == 0
        && i.frames
            .windows(2)
            .all(|w| w[0].raw_offset < w[1].raw_offset && w[0].object_offset < w[1].object_offset)
        && i.frames.last().unwrap().raw_offset < m.raw_size
        && i.frames.last().unwrap().object_offset < m.object_size;
    if !frames_ok {
        return Err("index frame table is inconsistent".into());
    }
    Ok(())
}

/// Where each record ends in the raw segment: where the next one begins
/// (the last one: the end of the segment, conservatively).
fn record_ends(i: &SegmentIndex) -> Vec<u64> {
    let mut ends: Vec<u64> = i
        .entries
        .iter()
        .skip(1)
        .map(|e| e.payload_pos - RECORD_HEADER_LEN as u64)
        .collect();
    ends.push(i.meta.raw_size);
    ends
}

/// The first record (index into entries) that reaches raw offset `from`.
fn first_record_at(i: &SegmentIndex, from: u64) -> usize {
    let ends = record_ends(i);
    ends.partition_point(|&e| e <= from)
}

/// Deep check of one segment object: the index of the first record that
/// cannot be read back from it (`entries.len()` when all can), and what is
/// wrong with the object.
fn check_segment_object(i: &SegmentIndex, obj: &[u8]) -> (usize, Vec<String>) {
    let m = &i.meta;
    let mut wrong = Vec::new();
    if obj.len() as u64 != m.object_size {
        wrong.push(format!(
            "object is {} bytes, its index says {}",
            obj.len(),
            m.object_size
        ));
    }
    if blake3::hash(obj).to_hex().as_str() != m.object_blake3 {
        wrong.push("BLAKE3 does not match its index".into());
    }
    // Frame by frame, up to the first that does not decompress to its size.
    let mut raw = Vec::with_capacity(m.raw_size as usize);
    let mut bad_from: Option<u64> = None;
    for (k, f) in i.frames.iter().enumerate() {
        let (o_end, r_end) = match i.frames.get(k + 1) {
            Some(n) => (n.object_offset, n.raw_offset),
            None => (m.object_size, m.raw_size),
        };
        let piece = obj.get(f.object_offset as usize..(o_end as usize).min(obj.len()));
        let out = piece.and_then(|p| zstd::stream::decode_all(p).ok());
        match out {
            Some(d) if d.len() as u64 == r_end - f.raw_offset => raw.extend_from_slice(&d),
            Some(d) => {
                wrong.push(format!(
                    "frame {k} decompresses to {} bytes, expected {}",
                    d.len(),
                    r_end - f.raw_offset
                ));
                bad_from = Some(f.raw_offset);
                break;
            }
            None => {
                wrong.push(format!(
                    "frame {k} (object bytes {}-{}) does not decompress{}",
                    f.object_offset,
                    o_end,
                    if (obj.len() as u64) < o_end {
                        " (the object ends before it)"
                    } else {
                        ""
                    }
                ));
                bad_from = Some(f.raw_offset);
                break;
            }
        }
    }
    let limit = bad_from.map_or(i.entries.len(), |r| first_record_at(i, r));
    // Every record of what decompressed: CRCs and the index entries.
    let good = match jf::scan_segment(&raw) {
        Err(_) if raw.is_empty() => 0,
        Err(e) => {
            wrong.push(format!("segment header: {e}"));
            0
        }
        Ok(scan) => {
            let n = scan
                .records
                .iter()
                .zip(&i.entries)
                .take_while(|(r, e)| r.index_entry() == **e)
                .count();
            if n < limit {
                let why = match scan.records.get(n) {
                    Some(_) => "does not match its index entry".to_string(),
                    None => match &scan.tail {
                        jf::Tail::Torn { reason, .. } => reason.to_string(),
                        _ => "is not in the segment".to_string(),
                    },
                };
                wrong.push(format!("record seq {} {why}", i.entries[n].seq));
            } else if bad_from.is_none() {
                if !matches!(scan.tail, jf::Tail::Sealed(_)) {
                    wrong.push("segment is not sealed (no valid index record and trailer)".into());
                } else if scan.records.len() != i.entries.len() {
                    wrong.push(format!(
                        "segment holds {} records, its index {}",
                        scan.records.len(),
                        i.entries.len()
                    ));
                }
            }
            n
        }
    };
    (good.min(limit), wrong)
}

async fn scan_disk(
    store: &Store,
    vm: &str,
    disk: &str,
    deep: bool,
    checked: &mut Checked,
    retention: Option<&rf::RetentionManifest>,
) -> Result<DiskScan, VerifyError> {
    let d = Some(disk);
    let thinned_to = retention
        .and_then(|m| m.disk(disk))
        .map(|r| (r.journal_from_seq, r.record_base));
    let mut problems = Vec::new();
    let mut bad_records = Vec::new();
    let mut last_named: Option<u64> = None;
    let mut pairs: BTreeMap<(u64, u64), (Option<ObjectMeta>, Option<ObjectMeta>)> = BTreeMap::new();
    for o in list(store, &rf::journal_prefix(vm, disk)).await? {
        match rf::parse_journal_name(last_component(&o.key)) {
            Some((a, b, is_idx)) => {
                last_named = last_named.max(Some(b));
                let e = pairs.entry((a, b)).or_default();
                *(if is_idx { &mut e.1 } else { &mut e.0 }) = Some(o);
            }
            None => problems.push(problem(
                d,
                Some(o.key.clone()),
                Kind::Corrupt,
                "not a journal object name (<first:020>-<last:020>.seg.zst or .idx)".into(),
            )),
        }
    }
    let mut segments: Vec<(SegmentIndex, u64)> = Vec::new();
    for (&(a, b), (seg, idx)) in &pairs {
        // Half of a segment a prune was deleting when it stopped: below
        // what retention keeps, nothing needs it (the next prune removes it).
        if (seg.is_none() || idx.is_none()) && thinned_to.is_some_and(|(f, _)| b <= f) {
            continue;
        }
        let seg_key = rf::segment_key(vm, disk, a, b);
        let idx_key = rf::index_key(vm, disk, a, b);
        let mut idx_bytes = None;
        if idx.is_some() {
            idx_bytes = get(store, &idx_key).await?;
        } else if seg.is_some() {
            // Perhaps an upload in flight (the segment goes first): look again.
            idx_bytes = get(store, &idx_key).await?;
        }
        let Some(ib) = idx_bytes else {
            if seg.is_some() {
                let mut p = problem(
                    d,
                    Some(idx_key),
                    Kind::Missing,
                    format!(
                        "index missing: the segment {} (seq {a}-{b}) cannot be used without it",
                        last_component(&seg_key)
                    ),
                );
                p.from_seq = Some(a);
                problems.push(p);
            }
            continue;
        };
        checked.indexes += 1;
        let index = match SegmentIndex::decode(&idx_key, &ib)
            .map_err(|e| strip_key(&e.to_string(), &idx_key))
            .and_then(|i| check_index(&i, vm, disk, a, b).map(|_| i))
        {
            Ok(i) => i,
            Err(what) => {
                let what = if (ib.len() as u64) < idx.as_ref().map_or(0, |o| o.size) {
                    format!("{what} (the object is shorter than listed)")
                } else {
                    what
                };
                let mut p = problem(
                    d,
                    Some(idx_key),
                    Kind::Corrupt,
                    format!("{what}: the segment (seq {a}-{b}) cannot be used"),
                );
                p.from_seq = Some(a);
                problems.push(p);
                continue;
            }
        };
        let listed_size = match seg {
            Some(o) => o.size,
            None => match get(store, &seg_key).await? {
                // Listed before the segment was uploaded? (It goes first.)
                Some(b) => b.len() as u64,
                None => {
                    let mut p = problem(
                        d,
                        Some(seg_key),
                        Kind::Missing,
                        format!(
                            "segment object missing (its index {} is there)",
                            last_component(&idx_key)
                        ),
                    );
                    p.from_seq = Some(a);
                    problems.push(p);
                    continue;
                }
            },
        };
        checked.segments += 1;
        let mut first_bad = index.entries.len();
        let mut wrong = Vec::new();
        if listed_size != index.meta.object_size {
            wrong.push(format!(
                "object is {listed_size} bytes, its index says {}",
                index.meta.object_size
            ));
            if listed_size < index.meta.object_size {
                // The frames from the one the object ends in are lost.
                let k = index
                    .frames
                    .iter()
                    .zip(
                        index
                            .frames
                            .iter()
                            .skip(1)
                            .map(|f| f.object_offset)
                            .chain([index.meta.object_size]),
                    )
                    .position(|(_, end)| end > listed_size)
                    .unwrap_or(0);
                first_bad = first_record_at(&index, index.frames[k].raw_offset);
            }
        }
        if deep {
            if let Some(obj) = get(store, &seg_key).await? {
                checked.fetched_objects += 1;
                checked.fetched_bytes += obj.len() as u64;
                let ix = index.clone();
                let (n, w) = tokio::task::spawn_blocking(move || check_segment_object(&ix, &obj))
                    .await
                    .expect("segment check panicked");
                first_bad = first_bad.min(n);
                wrong = w;
            }
        }
        if !wrong.is_empty() {
            let kind = if listed_size < index.meta.object_size {
                Kind::Truncated
            } else {
                Kind::Corrupt
            };
            let tail = if first_bad < index.entries.len() {
                let s = index.entries[first_bad].seq;
                bad_records.push(s);
                format!(": records from seq {s} on cannot be read from it")
            } else {
                ": every record in it still reads back intact".to_string()
            };
            let mut p = problem(
                d,
                Some(seg_key),
                kind,
                format!("{}{tail}", wrong.join("; ")),
            );
            p.from_seq = index.entries.get(first_bad).map(|e| e.seq);
            problems.push(p);
        }
        segments.push((index, listed_size));
    }
    // Baselines.
    let mut baselines = Vec::new();
    for o in list(store, &rf::baseline_prefix(vm, disk)).await? {
        let Some((s1, s0)) = rf::parse_baseline_name(last_component(&o.key)) else {
            problems.push(problem(
                d,
                Some(o.key.clone()),
                Kind::Corrupt,
                "not a baseline name (<s1:020>-<s0:020>.json)".into(),
            ));
            continue;
        };
        checked.baselines += 1;
        let Some(b) = get(store, &o.key).await? else {
            continue; // removed since the listing (pruned)
        };
        let bad = |what: String| {
            let mut p = problem(d, Some(o.key.clone()), Kind::Corrupt, what);
            p.from_seq = Some(s1);
            p
        };
        match serde_json::from_slice::<Baseline>(&b) {
            Err(e) => problems.push(bad(format!("baseline does not decode: {e}"))),
            Ok(bl) => {
                let n = if bl.chunk_size == 0 {
                    u64::MAX
                } else {
                    bl.size.div_ceil(bl.chunk_size)
                };
                if bl.vm_uuid != vm || bl.disk != disk {
                    problems.push(bad(format!(
                        "baseline is of VM {} disk {}",
                        bl.vm_uuid, bl.disk
                    )));
                } else if bl.s1 != s1 || bl.s0 != s0 || bl.s0 > bl.s1 {
                    problems.push(bad(format!(
                        "baseline says s0 {} s1 {}, its name s0 {s0} s1 {s1}",
                        bl.s0, bl.s1
                    )));
                } else if bl.chunks.len() as u64 != n {
                    problems.push(bad(format!(
                        "baseline lists {} chunks, a {}-byte disk has {n}",
                        bl.chunks.len(),
                        bl.size
                    )));
                } else if bl.chunks.iter().flatten().any(|h| {
                    h.len() != 64
                        || !h
                            .bytes()
                            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
                }) {
                    problems.push(bad("baseline names a chunk that is not a BLAKE3 hex".into()));
                } else {
                    baselines.push((o.key, bl));
                }
            }
        }
    }
    baselines.sort_by_key(|(_, b)| (b.s1, b.s0));
    // The history restore would see.
    let segs: Vec<SegRef> = segments
        .into_iter()
        .map(|(i, _)| SegRef {
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
    let mut breaks = Vec::new();
    for (k, w) in segs.windows(2).enumerate() {
        let (a, b) = (&w[0], &w[1]);
        if b.record_base != a.record_base + a.entries.len() as u64 || b.first_seq <= a.last_seq {
            breaks.push(k + 1);
            // Explained by an object reported above?
            let explained = problems.iter().any(|p: &Problem| {
                p.from_seq
                    .is_some_and(|s| s > a.last_seq && s < b.first_seq)
            });
            if explained {
                continue;
            }
            let mut p = problem(
                d,
                None,
                Kind::Chain,
                format!(
                    "records missing between seq {} and seq {}: record base {} does not follow {}+{}",
                    a.last_seq,
                    b.first_seq,
                    b.record_base,
                    a.record_base,
                    a.entries.len()
                ),
            );
            p.from_seq = Some(a.last_seq + 1);
            problems.push(p);
        }
    }
    if let Some(s) = segs.first() {
        let missing = match thinned_to {
            // Retention removed the records up to journal_from_seq; the
            // first segment left must follow on from what it kept.
            Some((_, base)) => s.record_base > base,
            None => s.record_base != 0 && baselines.iter().any(|(_, b)| b.s0 < s.first_seq - 1),
        };
        if missing {
            let mut p = problem(
                d,
                None,
                Kind::Chain,
                format!(
                    "the first {} records of the journal are not in the repository (the oldest segment begins at seq {})",
                    s.record_base, s.first_seq
                ),
            );
            p.from_seq = Some(0);
            problems.push(p);
        }
    }
    Ok(DiskScan {
        history: History {
            vm: vm.to_string(),
            disk: disk.to_string(),
            baselines,
            segments: segs,
            breaks,
            orphans: Vec::new(),
            retention: retention.cloned(),
        },
        problems,
        bad_baselines: BTreeSet::new(),
        bad_records,
        last_named,
    })
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

async fn finish_disk(store: &Store, mut s: DiskScan) -> (DiskReport, Vec<Problem>) {
    let h = &mut s.history;
    let disk = h.disk.clone();
    let d = Some(disk.as_str());
    let last_loaded = h.last_entry().map(|e| e.seq);
    let last_known = last_loaded.max(s.last_named);
    // What restore can rebuild: for each point the newest baseline whose
    // chain reaches it is used; it fails if that baseline is damaged or a
    // record it needs cannot be read.
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
    let actual = normalize(actual);
    // What an intact repository would rebuild: no breaks, every baseline
    // and record good, up to the newest seq any object name speaks of.
    let ideal = {
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
    };
    let lost = subtract(&ideal, &actual);
    // Times and marks, for the report.
    let entries: Vec<(u64, u64)> = h.entries().map(|(_, e)| (e.seq, e.ts_ns)).collect();
    let ts_of = |seq: u64| {
        let i = entries.partition_point(|&(s, _)| s <= seq);
        if i == 0 {
            "?".to_string()
        } else {
            fmt_ns(entries[i - 1].1)
        }
    };
    let range = |(a, b): (u64, u64)| SeqRange {
        from_seq: a,
        to_seq: b,
        from: ts_of(a),
        to: ts_of(b),
    };
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
            gaps.push(Gap {
                seq: e.seq,
                time: fmt_ns(e.ts_ns),
                reason: text("reason"),
            });
        }
    }
    let marks_in = |rs: &[(u64, u64)]| -> Vec<String> {
        marks
            .iter()
            .filter(|m| rs.iter().any(|r| m.seq >= r.0 && m.seq <= r.1))
            .map(|m| m.label.clone())
            .collect()
    };
    // Each problem: the unrestorable stretch that begins where it does,
    // up to the next restorable point.
    let mut problems = std::mem::take(&mut s.problems);
    let mut attributed: Vec<(u64, u64)> = Vec::new();
    for p in problems.iter_mut() {
        let Some(from) = p.from_seq else { continue };
        let until = actual
            .iter()
            .find(|r| r.1 >= from)
            .map_or(u64::MAX, |r| r.0.max(from));
        if until == from {
            continue;
        }
        let rs = intersect(&lost, from, until - 1);
        p.marks = marks_in(&rs);
        attributed.extend(rs.iter().copied());
        p.unrestorable = rs.into_iter().map(range).collect();
    }
    for r in subtract(&lost, &normalize(attributed)) {
        let mut p = problem(
            d,
            None,
            Kind::Chain,
            "points an intact repository would restore cannot be restored".into(),
        );
        p.marks = marks_in(&[r]);
        p.unrestorable = vec![range(r)];
        problems.push(p);
    }
    // The newest records must be restorable.
    if let Some(last) = last_known {
        let covered = actual.iter().any(|r| r.0 <= last && last <= r.1)
            || lost.iter().any(|r| r.0 <= last && last <= r.1);
        if !covered {
            let gap_after = |s0: u64| gaps.iter().rev().find(|g| g.seq > s0).map(|g| g.seq);
            let newest = h.baselines.iter().map(|(_, b)| b.s0).max();
            let why = match newest {
                None => "no baseline of this disk is in the repository: take one with `cdpctl baseline`".to_string(),
                Some(s0) => match gap_after(s0) {
                    Some(g) => format!(
                        "GAP at seq {g} (capture was interrupted) and no baseline after it: the shipper takes one by itself, or run `cdpctl baseline`"
                    ),
                    None => "no baseline is consistent by then".to_string(),
                },
            };
            let from = actual.last().map_or(1, |r| r.1 + 1);
            let rs = vec![(from, last)];
            let mut p = problem(
                d,
                None,
                Kind::Unrestorable,
                format!("the newest records cannot be restored: {why}"),
            );
            p.marks = marks_in(&rs);
            p.unrestorable = rs.into_iter().map(range).collect();
            problems.push(p);
        }
    }
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
    let report = DiskReport {
        disk: disk.clone(),
        segments: h.segments.len() as u64,
        records: entries.len() as u64,
        first_seq: entries.first().map(|e| e.0),
        last_seq: last_known,
        baselines,
        restorable: actual.iter().copied().map(range).collect(),
        unrestorable: lost.iter().copied().map(range).collect(),
        marks,
        gaps,
    };
    (report, problems)
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
