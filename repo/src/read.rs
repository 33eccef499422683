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

impl ReadError {
    /// True if reading again may succeed: the storage was unreachable or
    /// failed on its side. An object that does not decode stays so.
    pub fn is_transient(&self) -> bool {
        matches!(self, ReadError::Store(e) if e.is_transient())
    }
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

/// The VM's current `vm.json`: the newest version under `vm.json.d/`, else
/// the first one (`vm.json`); its key and bytes, `None` when there is none.
pub async fn latest_vm_json(
    store: &Store,
    vm: &str,
) -> Result<Option<(String, bytes::Bytes)>, ReadError> {
    let versions = store.list(&rf::vm_json_versions_prefix(vm)).await?;
    let newest = versions
        .iter()
        .filter(|o| o.key.ends_with(".json"))
        .map(|o| o.key.clone())
        .max();
    let key = newest.unwrap_or_else(|| rf::vm_json_key(vm));
    match store.get(&key).await {
        Ok(b) => Ok(Some((key, b))),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
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
        let bl = Baseline::decode(&o.key, &b)?;
        out.push((o.key, bl));
    }
    out.sort_by_key(|(_, b)| (b.s1, b.s0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::IndexMeta;
    use bytes::Bytes;

    const VM: &str = "u-1";

    fn index(first: u64, last: u64, record_base: u64, records: u64) -> SegmentIndex {
        SegmentIndex {
            meta: IndexMeta {
                vm_uuid: VM.into(),
                disk: "vda".into(),
                first_seq: first,
                last_seq: last,
                record_base,
                records,
                first_ts_ns: first,
                last_ts_ns: last,
                raw_size: 0,
                object_size: 0,
                object_blake3: "0".repeat(64),
                prev: None,
            },
            frames: Vec::new(),
            entries: Vec::new(),
        }
    }

    fn chain(segments: Vec<SegmentIndex>, missing: &[&str]) -> Chain {
        Chain {
            disk: "vda".into(),
            segments,
            orphans: Vec::new(),
            missing_segments: missing.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn store() -> (tempfile::TempDir, Store) {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(&format!("file://{}", d.path().display()), None).unwrap();
        (d, s)
    }

    async fn put(s: &Store, key: &str, b: &[u8]) {
        s.put(key, Bytes::copy_from_slice(b)).await.unwrap();
    }

    #[test]
    fn a_chain_that_follows_on_has_no_problems() {
        let c = chain(vec![index(1, 3, 0, 3), index(4, 9, 3, 6)], &[]);
        assert_eq!(c.problems(), vec![]);
    }

    #[test]
    fn gaps_overlaps_and_missing_objects_are_problems() {
        let c = chain(
            vec![index(1, 3, 0, 3), index(5, 9, 4, 5), index(9, 12, 9, 4)],
            &["k.idx"],
        );
        let what: Vec<String> = c.problems().into_iter().map(|p| p.what).collect();
        assert_eq!(what.len(), 3, "{what:?}");
        assert!(
            what[0].contains("records missing between seq 3 and seq 5"),
            "{what:?}"
        );
        assert!(
            what[1].contains("segments overlap: 5-9 then 9-12"),
            "{what:?}"
        );
        assert!(
            what[2].contains("segment object missing for index k.idx"),
            "{what:?}"
        );
    }

    #[tokio::test]
    async fn load_chain_pairs_segments_with_their_indexes() {
        let (_d, s) = store();
        for (a, b, base) in [(10, 19, 5), (1, 9, 0)] {
            put(&s, &rf::segment_key(VM, "vda", a, b), b"seg").await;
            let idx = index(a, b, base, 0).encode();
            put(&s, &rf::index_key(VM, "vda", a, b), &idx).await;
        }
        // A segment without its index, an index without its segment.
        put(&s, &rf::segment_key(VM, "vda", 20, 29), b"seg").await;
        let lone = rf::index_key(VM, "vda", 30, 39);
        put(&s, &lone, &index(30, 39, 20, 0).encode()).await;
        // Another disk's journal is not this one's.
        put(&s, &rf::segment_key(VM, "vdb", 1, 2), b"seg").await;

        let c = load_chain(&s, VM, "vda").await.unwrap();
        let seqs: Vec<_> = c
            .segments
            .iter()
            .map(|i| (i.meta.first_seq, i.meta.last_seq))
            .collect();
        assert_eq!(seqs, vec![(1, 9), (10, 19)], "replay order");
        assert_eq!(c.orphans, vec![rf::segment_key(VM, "vda", 20, 29)]);
        assert_eq!(c.missing_segments, vec![lone]);
        assert!(load_chain(&s, VM, "vdc").await.unwrap().segments.is_empty());
    }

    #[tokio::test]
    async fn load_chain_fails_on_a_corrupt_index() {
        let (_d, s) = store();
        put(&s, &rf::segment_key(VM, "vda", 1, 2), b"seg").await;
        let mut idx = index(1, 2, 0, 0).encode();
        let n = idx.len();
        idx[n / 2] ^= 0xff;
        put(&s, &rf::index_key(VM, "vda", 1, 2), &idx).await;
        let e = load_chain(&s, VM, "vda").await.unwrap_err();
        assert!(matches!(e, ReadError::Format(_)), "{e}");
        assert!(!e.is_transient());
    }

    /// Objects are never rewritten: vm.json is the first version, the
    /// newest vm.json.d/<ts>.json the current one; neither looks like a disk.
    #[tokio::test]
    async fn the_newest_vm_json_version_is_current() {
        let (_d, s) = store();
        assert!(latest_vm_json(&s, VM).await.unwrap().is_none());
        put(&s, &rf::vm_json_key(VM), b"first").await;
        let (k, b) = latest_vm_json(&s, VM).await.unwrap().unwrap();
        assert_eq!((k, &b[..]), (rf::vm_json_key(VM), &b"first"[..]));
        put(&s, &rf::vm_json_version_key(VM, 20), b"third").await;
        put(&s, &rf::vm_json_version_key(VM, 10), b"second").await;
        let (k, b) = latest_vm_json(&s, VM).await.unwrap().unwrap();
        assert_eq!(
            (k, &b[..]),
            (rf::vm_json_version_key(VM, 20), &b"third"[..])
        );
        assert!(list_disks(&s, VM).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn list_disks_names_disks_with_a_journal_or_baselines() {
        let (_d, s) = store();
        put(&s, &rf::segment_key(VM, "vdb", 1, 2), b"x").await;
        put(&s, &rf::segment_key(VM, "vdb", 3, 4), b"x").await;
        put(&s, &rf::baseline_key(VM, "vda", 5, 4), b"{}").await;
        put(&s, &rf::vm_json_key(VM), b"{}").await;
        put(&s, &rf::lease_key(VM, "h-1-2"), b"{}").await;
        put(&s, &rf::config_key(VM, 7), b"<domain/>").await;
        put(&s, &rf::segment_key("u-2", "vdc", 1, 2), b"x").await;
        assert_eq!(list_disks(&s, VM).await.unwrap(), vec!["vda", "vdb"]);
        assert!(list_disks(&s, "u-3").await.unwrap().is_empty());
    }

    fn baseline(s0: u64, s1: u64) -> Baseline {
        Baseline {
            vm_uuid: VM.into(),
            disk: "vda".into(),
            size: 4096,
            chunk_size: 4096,
            s0,
            s1,
            started_ns: 1,
            finished_ns: 2,
            chunks: vec![None],
        }
    }

    #[tokio::test]
    async fn load_baselines_sorts_by_consistency_and_skips_other_names() {
        let (_d, s) = store();
        for (s1, s0) in [(30, 20), (10, 5), (30, 25)] {
            let key = rf::baseline_key(VM, "vda", s1, s0);
            put(&s, &key, &serde_json::to_vec(&baseline(s0, s1)).unwrap()).await;
        }
        let stray = format!("{}notes.txt", rf::baseline_prefix(VM, "vda"));
        put(&s, &stray, b"not a baseline").await;
        let got = load_baselines(&s, VM, "vda").await.unwrap();
        let order: Vec<_> = got.iter().map(|(_, b)| (b.s1, b.s0)).collect();
        assert_eq!(order, vec![(10, 5), (30, 20), (30, 25)]);
        assert_eq!(got[0].0, rf::baseline_key(VM, "vda", 10, 5));
    }

    #[tokio::test]
    async fn a_baseline_that_does_not_decode_is_an_error_naming_its_key() {
        let (_d, s) = store();
        let key = rf::baseline_key(VM, "vda", 10, 5);
        put(&s, &key, b"{\"size\": ").await;
        match load_baselines(&s, VM, "vda").await {
            Err(ReadError::Format(rf::RepoFormatError::Corrupt { key: k, what })) => {
                assert_eq!(k, key);
                assert!(what.contains("not a valid object"), "{what}");
            }
            other => panic!("{other:?}"),
        }
    }
}
