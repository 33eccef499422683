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
