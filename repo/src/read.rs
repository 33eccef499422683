//! Reading a repository: the journal of a disk as a chain of segment
//! indexes, baselines, segment payloads. Planning needs only LIST calls and
//! the small `.idx` objects.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::format::{self as rf, Baseline, RepoFormatError, SegmentIndex};
use crate::store::{Store, StoreError};

#[derive(Debug, Error)]
pub enum ReadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Format(#[from] RepoFormatError),
    #[error("{key}: {what}")]
    Bad { key: String, what: String },
}

/// A hole or inconsistency in a disk's journal chain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChainProblem {
    pub disk: String,
    pub what: String,
}

/// The journal of one disk in the repository, in replay order.
#[derive(Debug, Clone)]
pub struct Chain {
    pub disk: String,
    pub segments: Vec<SegmentIndex>,
    /// Segment objects listed without their index (an upload cut short, or
    /// a deleted index).
    pub orphans: Vec<String>,
    /// Index objects listed without their segment object.
    pub missing_segments: Vec<String>,
}

impl Chain {
    /// Problems in the chain: record bases that do not follow on, missing
    /// objects, sequence numbers going backwards.
    pub fn problems(&self) -> Vec<ChainProblem> {
        let mut out = Vec::new();
        let p = |what: String| ChainProblem {
            disk: self.disk.clone(),
            what,
        };
        for w in self.segments.windows(2) {
            let (a, b) = (&w[0].meta, &w[1].meta);
            if b.record_base != a.record_base + a.records {
                out.push(p(format!(
                    "records missing between seq {} and seq {}: record base {} follows {}+{}",
                    a.last_seq, b.first_seq, b.record_base, a.record_base, a.records
                )));
            }
            if b.first_seq <= a.last_seq {
                out.push(p(format!(
                    "segments overlap: {}-{} then {}-{}",
                    a.first_seq, a.last_seq, b.first_seq, b.last_seq
                )));
            }
        }
        for k in &self.missing_segments {
            out.push(p(format!("segment object missing for index {k}")));
        }
        out
    }
}

fn last_component(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

/// List and load a disk's journal chain.
pub async fn load_chain(store: &Store, vm: &str, disk: &str) -> Result<Chain, ReadError> {
    let list = store.list(&rf::journal_prefix(vm, disk)).await?;
    let mut by_range: BTreeMap<(u64, u64), (Option<String>, Option<String>)> = BTreeMap::new();
    for o in &list {
        if let Some((a, b, is_idx)) = rf::parse_journal_name(last_component(&o.key)) {
            let e = by_range.entry((a, b)).or_default();
            if is_idx {
                e.1 = Some(o.key.clone());
            } else {
                e.0 = Some(o.key.clone());
            }
        }
    }
    let mut chain = Chain {
        disk: disk.to_string(),
        segments: Vec::new(),
        orphans: Vec::new(),
        missing_segments: Vec::new(),
    };
    for (_, (seg, idx)) in by_range {
        match (seg, idx) {
            (Some(_), Some(idx)) => {
                let b = store.get(&idx).await?;
                chain.segments.push(SegmentIndex::decode(&idx, &b)?);
            }
            (Some(seg), None) => chain.orphans.push(seg),
            (None, Some(idx)) => chain.missing_segments.push(idx),
            (None, None) => {}
        }
    }
    Ok(chain)
}

/// The disks with a journal or baselines in the repository.
pub async fn list_disks(store: &Store, vm: &str) -> Result<Vec<String>, ReadError> {
    let prefix = rf::vm_prefix(vm);
    let list = store.list(&prefix).await?;
    let mut disks: Vec<String> = list
        .iter()
        .filter_map(|o| {
            let rest = o.key.strip_prefix(&prefix)?;
            let (disk, tail) = rest.split_once('/')?;
            (tail.starts_with("journal/") || tail.starts_with("baselines/"))
                .then(|| disk.to_string())
        })
        .collect();
    disks.sort();
    disks.dedup();
    Ok(disks)
}

/// Every baseline of a disk, oldest first.
pub async fn load_baselines(
    store: &Store,
    vm: &str,
    disk: &str,
) -> Result<Vec<(String, Baseline)>, ReadError> {
    let list = store.list(&rf::baseline_prefix(vm, disk)).await?;
    let mut out = Vec::new();
    for o in list {
        if rf::parse_baseline_name(last_component(&o.key)).is_none() {
            continue;
        }
        let b = store.get(&o.key).await?;
        let bl: Baseline = serde_json::from_slice(&b).map_err(|e| ReadError::Bad {
            key: o.key.clone(),
            what: format!("baseline: {e}"),
        })?;
        out.push((o.key, bl));
    }
    out.sort_by_key(|(_, b)| (b.s1, b.s0));
    Ok(out)
}

/// Fetch a whole segment object, check it against its index, and return the
/// raw segment bytes.
pub async fn fetch_segment(
    store: &Store,
    vm: &str,
    idx: &SegmentIndex,
) -> Result<Vec<u8>, ReadError> {
    let m = &idx.meta;
    let key = rf::segment_key(vm, &m.disk, m.first_seq, m.last_seq);
    let obj = store.get(&key).await?;
    if obj.len() as u64 != m.object_size || blake3::hash(&obj).to_hex().as_str() != m.object_blake3
    {
        return Err(ReadError::Bad {
            key,
            what: format!(
                "segment object does not match its index ({} bytes, expected {}; checksum mismatch)",
                obj.len(),
                m.object_size
            ),
        });
    }
    let raw = rf::decompress_segment(&key, &obj)?;
    if raw.len() as u64 != m.raw_size {
        return Err(ReadError::Bad {
            key,
            what: "decompressed size does not match the index".into(),
        });
    }
    Ok(raw)
}
