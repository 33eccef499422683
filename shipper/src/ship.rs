//! Shipping one sealed segment: compress it into frames, build its index,
//! upload the segment object, then the index (an index always has its
//! segment). Names are derived from the segment, so a retried or repeated
//! upload writes the same bytes under the same names: a restart duplicates
//! nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cdp_core::catalog::{Catalog, SegmentRow};
use cdp_core::journal::format::{read_index, SegmentHeader};
use cdp_repo::format::{self as rf, ChainLink, IndexMeta, SegmentIndex};
use cdp_repo::store::{with_retry, RetryPolicy, Store};

use crate::error::{Result, ShipError};
use crate::throttle::Throttle;

pub struct Shipped {
    pub key: String,
    pub object_bytes: u64,
}

/// Build the `.seg.zst` object and its index from a raw sealed segment;
/// `prev` is what the index says of the disk's previous segment
/// ([`chain_link`]).
pub fn encode_segment(
    vm: &str,
    disk: &str,
    path: &str,
    raw: &[u8],
    prev: Option<ChainLink>,
) -> Result<(Vec<u8>, SegmentIndex)> {
    let bad = |source| ShipError::Segment {
        path: path.into(),
        source,
    };
    let header = SegmentHeader::decode(raw).map_err(bad)?;
    let Some(entries) = read_index(raw).map_err(bad)? else {
        return Err(ShipError::NotSealed { path: path.into() });
    };
    let (obj, frames) = compress_parallel(raw).map_err(ShipError::io("compressing", path))?;
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
        prev,
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

/// [`rf::compress_segment`] on every core: the segment cut into one piece
/// per core at frame boundaries, the pieces compressed at once and joined
/// (frames are independent, so the object and its frame table are the
/// same bytes as one thread's). Compression was most of a shipper's time.
fn compress_parallel(raw: &[u8]) -> std::io::Result<(Vec<u8>, Vec<rf::Frame>)> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let frames = raw.len().div_ceil(rf::FRAME_RAW);
    let per = frames.div_ceil(cores.min(frames).max(1)).max(1) * rf::FRAME_RAW;
    if cores < 2 || raw.len() <= per {
        return rf::compress_segment(raw);
    }
    let parts = std::thread::scope(|s| {
        let hs: Vec<_> = raw
            .chunks(per)
            .map(|piece| s.spawn(move || rf::compress_segment(piece)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("compressing thread panicked"))
            .collect::<std::io::Result<Vec<_>>>()
    })?;
    let mut obj = Vec::with_capacity(parts.iter().map(|p| p.0.len()).sum());
    let mut table = Vec::with_capacity(frames);
    for (i, (o, fs)) in parts.into_iter().enumerate() {
        let (raw_base, obj_base) = ((i * per) as u64, obj.len() as u64);
        table.extend(fs.into_iter().map(|f| rf::Frame {
            raw_offset: f.raw_offset + raw_base,
            object_offset: f.object_offset + obj_base,
        }));
        obj.extend_from_slice(&o);
    }
    Ok((obj, table))
}

/// Upload one sealed segment and its index to `store` (the target named
/// `target`), each paid for to the target's `throttle` before every try.
/// The index links to the disk's previous segment ([`chain_link`]); its
/// hash is recorded in `catalog` before anything is uploaded, so the next
/// segment links to it on every target.
pub async fn ship_segment(
    store: &Store,
    target: &str,
    throttle: &Throttle,
    retry: &RetryPolicy,
    vm: &str,
    row: &SegmentRow,
    catalog: &Mutex<Catalog>,
) -> Result<Shipped> {
    let (obj, ib) = encode_linked(catalog, vm, row).await?;
    let seg_key = rf::segment_key(vm, &row.disk, row.first_seq, row.last_seq);
    let idx_key = rf::index_key(vm, &row.disk, row.first_seq, row.last_seq);
    let obj = bytes::Bytes::from(obj);
    let object_bytes = obj.len() as u64;
    with_retry(&seg_key, retry, || async {
        throttle.acquire(object_bytes).await;
        store.put(&seg_key, obj.clone()).await
    })
    .await
    .map_err(ShipError::store(target))?;
    let ib = bytes::Bytes::from(ib);
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

/// Encode segment `row` with its link to the disk's previous segment and
/// record its index's hash; the object and the index bytes. One segment
/// of a disk at a time (the next one needs this one's hash): the uploads
/// stay parallel.
async fn encode_linked(
    catalog: &Mutex<Catalog>,
    vm: &str,
    row: &SegmentRow,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let lock = disk_lock(vm, &row.disk);
    let _one_at_a_time = lock.lock().await;
    let prev = chain_link(catalog, vm, row).await?;
    let (obj, idx) = encode_file(vm, row, prev).await?;
    let ib = idx.encode();
    let hash = rf::index_blake3(&ib);
    let recorded = {
        let c = catalog.lock().unwrap();
        c.set_segment_index_hash(vm, &row.disk, row.first_seq, &hash)?;
        c.segment_index_hash(vm, &row.disk, row.first_seq)?
    };
    match recorded {
        Some(recorded) if recorded != hash => Err(ShipError::ChainMismatch {
            path: row.path.clone().into(),
            built: hash,
            recorded,
        }),
        _ => Ok((obj, ib)),
    }
}

/// Read and encode a sealed segment file.
async fn encode_file(
    vm: &str,
    row: &SegmentRow,
    prev: Option<ChainLink>,
) -> Result<(Vec<u8>, SegmentIndex)> {
    let raw = tokio::fs::read(&row.path)
        .await
        .map_err(ShipError::io("reading", &row.path))?;
    let (vm2, disk, path) = (vm.to_string(), row.disk.clone(), row.path.clone());
    tokio::task::spawn_blocking(move || encode_segment(&vm2, &disk, &path, &raw, prev))
        .await
        .map_err(|source| ShipError::Task {
            what: "encoding a segment",
            source,
        })?
}

/// The lock that makes a disk's segments encode one at a time.
fn disk_lock(vm: &str, disk: &str) -> Arc<tokio::sync::Mutex<()>> {
    type Locks = Mutex<HashMap<(String, String), Arc<tokio::sync::Mutex<()>>>>;
    static LOCKS: OnceLock<Locks> = OnceLock::new();
    let mut m = LOCKS.get_or_init(Default::default).lock().unwrap();
    m.entry((vm.to_string(), disk.to_string()))
        .or_default()
        .clone()
}

/// What segment `row`'s index says of the disk's previous segment
/// (docs/REPOSITORY_FORMAT.md, "Chain of indexes"), the same for every
/// target and after a restart: the previous segment's index hash as the
/// catalog recorded it when that index was first built. Nothing when
/// `row` reached a target before the chain existed (its index there has
/// no link), when it is the disk's first segment, or when the previous
/// one left the host before the chain existed. A previous segment still
/// on the host whose hash is not recorded yet (it is being shipped at the
/// same time, or was shipped before the chain existed) is encoded here to
/// learn it, and recorded.
pub async fn chain_link(
    catalog: &Mutex<Catalog>,
    vm: &str,
    row: &SegmentRow,
) -> Result<Option<ChainLink>> {
    let link = |p: &SegmentRow, h: String| ChainLink {
        first_seq: p.first_seq,
        last_seq: p.last_seq,
        index_blake3: h,
    };
    // Walk back to a segment whose link is known, then build forward.
    let mut pending: Vec<SegmentRow> = Vec::new();
    let mut cur = row.first_seq;
    let mut known = loop {
        let c = catalog.lock().unwrap();
        let before_chain = c.segment_index_hash(vm, &row.disk, cur)?.is_none()
            && c.shipped_anywhere(vm, &row.disk, cur)?;
        if before_chain {
            break None;
        }
        match c.previous_segment(vm, &row.disk, cur)? {
            None | Some((_, false, None)) => break None,
            Some((p, _, Some(h))) => break Some(link(&p, h)),
            Some((p, true, None)) => {
                cur = p.first_seq;
                pending.push(p);
            }
        }
    };
    for p in pending.into_iter().rev() {
        let (_, idx) = encode_file(vm, &p, known).await?;
        let hash = rf::index_blake3(&idx.encode());
        let c = catalog.lock().unwrap();
        c.set_segment_index_hash(vm, &p.disk, p.first_seq, &hash)?;
        let h = c
            .segment_index_hash(vm, &p.disk, p.first_seq)?
            .unwrap_or(hash);
        known = Some(link(&p, h));
    }
    Ok(known)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_compression_gives_the_bytes_and_frames_of_one_thread() {
        for len in [
            0,
            1,
            rf::FRAME_RAW,
            3 * rf::FRAME_RAW + 17,
            8 * rf::FRAME_RAW,
        ] {
            let raw: Vec<u8> = (0..len)
                .map(|i| (i * 7 % 251) as u8 ^ (i >> 12) as u8)
                .collect();
            let one = rf::compress_segment(&raw).unwrap();
            let par = compress_parallel(&raw).unwrap();
            assert!(one.0 == par.0, "object bytes differ at {len}");
            let f = |v: &[rf::Frame]| -> Vec<(u64, u64)> {
                v.iter().map(|f| (f.raw_offset, f.object_offset)).collect()
            };
            assert_eq!(f(&one.1), f(&par.1), "frame table at {len}");
        }
    }
}
