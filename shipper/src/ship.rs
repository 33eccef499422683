//! Shipping one sealed segment: compress it into frames, build its index,
//! upload the segment object, then the index (an index always has its
//! segment). Names are derived from the segment, so a retried or repeated
//! upload writes the same bytes under the same names: a restart duplicates
//! nothing.

use cdp_core::catalog::SegmentRow;
use cdp_core::journal::format::{read_index, SegmentHeader};
use cdp_repo::format::{self as rf, IndexMeta, SegmentIndex};
use cdp_repo::store::{with_retry, RetryPolicy, Store};

use crate::error::{Result, ShipError};
use crate::throttle::Throttle;

pub struct Shipped {
    pub key: String,
    pub object_bytes: u64,
}

/// Build the `.seg.zst` object and its index from a raw sealed segment.
pub fn encode_segment(
    vm: &str,
    disk: &str,
    path: &str,
    raw: &[u8],
) -> Result<(Vec<u8>, SegmentIndex)> {
    let bad = |source| ShipError::Segment {
        path: path.into(),
        source,
    };
    let header = SegmentHeader::decode(raw).map_err(bad)?;
    let Some(entries) = read_index(raw).map_err(bad)? else {
        return Err(ShipError::NotSealed { path: path.into() });
    };
    let (obj, frames) = rf::compress_segment(raw).map_err(ShipError::io("compressing", path))?;
    let meta = IndexMeta {
        vm_uuid: vm.to_string(),
        disk: disk.to_string(),
        first_seq: header.first_seq,
        last_seq: entries.last().map_or(header.first_seq, |e| e.seq),
        record_base: header.record_base,
        records: entries.len() as u64,
        first_ts_ns: entries.first().map_or(0, |e| e.ts_ns),
        last_ts_ns: entries.last().map_or(0, |e| e.ts_ns),
        raw_size: raw.len() as u64,
        object_size: obj.len() as u64,
        object_blake3: blake3::hash(&obj).to_hex().to_string(),
    };
    Ok((
        obj,
        SegmentIndex {
            meta,
            frames,
            entries,
        },
    ))
}

/// Upload one sealed segment and its index to `store` (the target named
/// `target`), each paid for to the target's `throttle` before every try.
pub async fn ship_segment(
    store: &Store,
    target: &str,
    throttle: &Throttle,
    retry: &RetryPolicy,
    vm: &str,
    row: &SegmentRow,
) -> Result<Shipped> {
    let raw = tokio::fs::read(&row.path)
        .await
        .map_err(ShipError::io("reading", &row.path))?;
    let (vm2, disk, path) = (vm.to_string(), row.disk.clone(), row.path.clone());
    let (obj, idx) = tokio::task::spawn_blocking(move || encode_segment(&vm2, &disk, &path, &raw))
        .await
        .map_err(|source| ShipError::Task {
            what: "encoding a segment",
            source,
        })??;
    let m = &idx.meta;
    let seg_key = rf::segment_key(vm, &row.disk, m.first_seq, m.last_seq);
    let idx_key = rf::index_key(vm, &row.disk, m.first_seq, m.last_seq);
    let obj = bytes::Bytes::from(obj);
    let object_bytes = obj.len() as u64;
    with_retry(&seg_key, retry, || async {
        throttle.acquire(object_bytes).await;
        store.put(&seg_key, obj.clone()).await
    })
    .await
    .map_err(ShipError::store(target))?;
    let ib = bytes::Bytes::from(idx.encode());
    with_retry(&idx_key, retry, || async {
        throttle.acquire(ib.len() as u64).await;
        store.put(&idx_key, ib.clone()).await
    })
    .await
    .map_err(ShipError::store(target))?;
    Ok(Shipped {
        key: seg_key,
        object_bytes,
    })
}
