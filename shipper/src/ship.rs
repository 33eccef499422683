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
use crate::pool;
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
) -> Result<(bytes::Bytes, SegmentIndex)> {
    let bad = |source| ShipError::Segment {
        path: path.into(),
        source,
    };
    let header = SegmentHeader::decode(raw).map_err(bad)?;
    let Some(entries) = read_index(raw).map_err(bad)? else {
        return Err(ShipError::NotSealed { path: path.into() });
    };
    let (obj, frames, object_blake3) =
        compress_parallel(raw).map_err(ShipError::io("compressing", path))?;
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
        object_blake3: object_blake3.to_hex().to_string(),
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

/// The zstd level of a segment object's frames. A fast (negative) level:
/// no Huffman coding of literals and a sparser match search. On journal
/// data that hardly compresses (fio's buffers, encrypted or compressed
/// guest files) it keeps level 1's ratio at about 2.4 times its speed; on
/// data that compresses well (binaries, text) its objects are ~5 % larger
/// at 1.6 times the speed (BENCHMARKS.md, "Shipper: throughput and RPO").
/// The format does not depend on it: any zstd frame decodes.
pub const SEGMENT_LEVEL: i32 = -1;

/// A segment's object on every core: the segment cut into [`rf::FRAME_RAW`]
/// frames, each an independent zstd frame with zstd's content checksum
/// (docs/REPOSITORY_FORMAT.md, "Segment objects"), compressed by workers
/// that take the next frame as they finish one (a core busy with other
/// work only takes fewer). This thread joins the frames in order and
/// hashes the object (BLAKE3) as they arrive, while the workers compress
/// the next ones. Returns the object, its frame table and its hash. Every
/// buffer is pooled ([`crate::pool`]): no fresh pages per segment, and the
/// object starts on a page boundary (the `file://` backend writes it with
/// `O_DIRECT`).
fn compress_parallel(raw: &[u8]) -> std::io::Result<(bytes::Bytes, Vec<rf::Frame>, blake3::Hash)> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let n = raw.len().div_ceil(rf::FRAME_RAW);
    let workers = std::thread::available_parallelism()
        .map_or(1, |c| c.get())
        .min(n)
        .max(1);
    let piece = |i: usize| &raw[i * rf::FRAME_RAW..((i + 1) * rf::FRAME_RAW).min(raw.len())];
    let next = AtomicUsize::new(0);
    let (tx, rx) = std::sync::mpsc::channel::<(usize, std::io::Result<Vec<u8>>)>();
    std::thread::scope(|s| {
        for _ in 0..workers {
            let (tx, next) = (tx.clone(), &next);
            s.spawn(move || {
                let mut ctx = None;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let r = compress_frame(&mut ctx, piece(i));
                    let failed = r.is_err();
                    // The receiver gone (it failed): stop.
                    if tx.send((i, r)).is_err() || failed {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut obj = pool::Object::with_capacity(raw.len() + raw.len() / 64 + 4096);
        let mut frames = Vec::with_capacity(n);
        let mut hasher = blake3::Hasher::new();
        let mut early = std::collections::BTreeMap::new();
        for (i, r) in rx {
            early.insert(i, r?);
            while let Some(f) = early.remove(&frames.len()) {
                frames.push(rf::Frame {
                    raw_offset: (frames.len() * rf::FRAME_RAW) as u64,
                    object_offset: obj.len() as u64,
                });
                hasher.update(&f);
                obj.extend_from_slice(&f);
                pool::FRAMES.give(f);
            }
        }
        if frames.len() != n {
            return Err(std::io::Error::other(format!(
                "compressing: {} of {n} frames came back",
                frames.len()
            )));
        }
        Ok((obj.freeze(), frames, hasher.finalize()))
    })
}

/// One frame: a zstd frame of `piece` at [`SEGMENT_LEVEL`] with zstd's
/// content checksum, compressed in one call (the whole frame is in memory:
/// no streaming window to manage); `ctx` is the worker's context, made on
/// its first frame and reused. A piece whose sample does not compress
/// ([`incompressible`]) is stored as a frame of raw blocks
/// ([`cdp_repo::zframe`]): random or already compressed guest data cost
/// the shipper most of its CPU for nothing.
fn compress_frame(
    ctx: &mut Option<zstd::bulk::Compressor<'static>>,
    piece: &[u8],
) -> std::io::Result<Vec<u8>> {
    let c = match ctx {
        Some(c) => c,
        None => {
            let mut c = zstd::bulk::Compressor::new(SEGMENT_LEVEL)?;
            c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;
            ctx.insert(c)
        }
    };
    if incompressible(c, piece)? {
        let mut out = pool::FRAMES.take(cdp_repo::zframe::raw_frame_len(piece.len()));
        cdp_repo::zframe::raw_frame(piece, &mut out);
        return Ok(out);
    }
    let mut out = pool::FRAMES.take(zstd::zstd_safe::compress_bound(piece.len()));
    c.compress_to_buffer(piece, &mut out)?;
    Ok(out)
}

/// Samples of a piece tried before compressing it: this many, each
/// [`SAMPLE`] bytes, spread over the piece.
const SAMPLES: usize = 4;
const SAMPLE: usize = 4096;

/// Does `piece` look incompressible: do [`SAMPLES`] samples of it,
/// compressed together, keep at least 97 % of their size? (A piece smaller
/// than the samples is just compressed.) Costs ~2 % of compressing a
/// 1 MiB piece; a piece that is partly compressible and was judged
/// incompressible is stored a little larger, never wrong.
fn incompressible(c: &mut zstd::bulk::Compressor<'static>, piece: &[u8]) -> std::io::Result<bool> {
    if piece.len() < 4 * SAMPLES * SAMPLE {
        return Ok(false);
    }
    let mut sample = [0u8; SAMPLES * SAMPLE];
    let step = (piece.len() - SAMPLE) / (SAMPLES - 1);
    for (i, dst) in sample.chunks_mut(SAMPLE).enumerate() {
        dst.copy_from_slice(&piece[i * step..i * step + SAMPLE]);
    }
    let mut out = [0u8; SAMPLES * SAMPLE + 512];
    let n = c.compress_to_buffer(&sample[..], &mut out[..])?;
    Ok(n * 100 >= sample.len() * 97)
}

/// Where a segment goes: a target's store, its name, its `rate` and the
/// retry policy.
pub struct Upload<'a> {
    pub store: &'a Store,
    pub target: &'a str,
    pub throttle: &'a Throttle,
    pub retry: &'a RetryPolicy,
}

/// Upload one sealed segment and its index to `to.store`, each paid for to
/// the target's throttle before every try. The index links to the disk's
/// previous segment ([`chain_link`]); its hash is recorded in `catalog`
/// before anything is uploaded, so the next segment links to it on every
/// target. `takers` targets take this segment: the encoded object is kept
/// for the others ([`Encoded`]) instead of being compressed again.
pub async fn ship_segment(
    to: &Upload<'_>,
    vm: &str,
    row: &SegmentRow,
    catalog: &Mutex<Catalog>,
    takers: usize,
) -> Result<Shipped> {
    let (obj, ib) = encode_linked(catalog, vm, row, takers).await?;
    let seg_key = rf::segment_key(vm, &row.disk, row.first_seq, row.last_seq);
    let idx_key = rf::index_key(vm, &row.disk, row.first_seq, row.last_seq);
    let object_bytes = obj.len() as u64;
    with_retry(&seg_key, to.retry, || async {
        to.throttle.acquire(object_bytes).await;
        to.store.put(&seg_key, obj.clone()).await
    })
    .await
    .map_err(ShipError::store(to.target))?;
    with_retry(&idx_key, to.retry, || async {
        to.throttle.acquire(ib.len() as u64).await;
        to.store.put(&idx_key, ib.clone()).await
    })
    .await
    .map_err(ShipError::store(to.target))?;
    Ok(Shipped {
        key: seg_key,
        object_bytes,
    })
}

/// Encode segment `row` with its link to the disk's previous segment and
/// record its index's hash; the object and the index bytes. One segment
/// of a disk at a time (the next one needs this one's hash): the uploads
/// stay parallel. A segment another target just had encoded is taken from
/// [`Encoded`] when its index is the one the catalog recorded.
async fn encode_linked(
    catalog: &Mutex<Catalog>,
    vm: &str,
    row: &SegmentRow,
    takers: usize,
) -> Result<(bytes::Bytes, bytes::Bytes)> {
    let key = (vm.to_string(), row.disk.clone(), row.first_seq);
    let (recorded, hit) = encoded_for(catalog, vm, row, &key)?;
    if let Some(hit) = hit {
        return Ok(hit);
    }
    // Only a first encode needs the disk's lock (it records the hash the
    // next segment links to). Encoding again for a target that lags (its
    // index must be the recorded one) never waits behind the segments
    // another target is encoding for the first time.
    let lock = disk_lock(vm, &row.disk);
    let _one_at_a_time = match recorded {
        Some(_) => None,
        None => {
            let g = lock.lock().await;
            // Another target may have encoded it while this one waited.
            if let (_, Some(hit)) = encoded_for(catalog, vm, row, &key)? {
                return Ok(hit);
            }
            Some(g)
        }
    };
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
        _ => {
            let ib = bytes::Bytes::from(ib);
            Encoded::keep(key, &obj, &ib, takers.saturating_sub(1));
            Ok((obj, ib))
        }
    }
}

/// A segment's object and index bytes.
type Objects = (bytes::Bytes, bytes::Bytes);

/// The index hash the catalog recorded for `row`, and the object and index
/// [`Encoded`] kept for it when that index is the recorded one.
fn encoded_for(
    catalog: &Mutex<Catalog>,
    vm: &str,
    row: &SegmentRow,
    key: &(String, String, u64),
) -> Result<(Option<String>, Option<Objects>)> {
    let recorded = catalog
        .lock()
        .unwrap()
        .segment_index_hash(vm, &row.disk, row.first_seq)?;
    let hit = Encoded::take(key)
        .filter(|(_, ib)| recorded.as_deref() == Some(rf::index_blake3(ib).as_str()));
    Ok((recorded, hit))
}

/// Segments encoded for one target and kept for the others of the policy
/// (a segment's object is the same bytes for every target: compressing it
/// once per target doubled the shipper's CPU with two targets). An entry
/// goes once every other target took it, or when the entries pass
/// [`ENCODED_MAX_BYTES`] (oldest first: a target that lags far behind
/// encodes again).
struct Encoded {
    key: (String, String, u64),
    obj: bytes::Bytes,
    ib: bytes::Bytes,
    left: usize,
}

/// The most bytes [`Encoded`] keeps.
const ENCODED_MAX_BYTES: usize = 256 << 20;

impl Encoded {
    fn all() -> std::sync::MutexGuard<'static, std::collections::VecDeque<Encoded>> {
        static ALL: OnceLock<Mutex<std::collections::VecDeque<Encoded>>> = OnceLock::new();
        ALL.get_or_init(Default::default).lock().unwrap()
    }

    fn keep(key: (String, String, u64), obj: &bytes::Bytes, ib: &bytes::Bytes, left: usize) {
        if left == 0 || obj.len() > ENCODED_MAX_BYTES {
            return;
        }
        let mut all = Self::all();
        all.retain(|e| e.key != key);
        while all.iter().map(|e| e.obj.len()).sum::<usize>() + obj.len() > ENCODED_MAX_BYTES {
            all.pop_front();
        }
        all.push_back(Encoded {
            key,
            obj: obj.clone(),
            ib: ib.clone(),
            left,
        });
    }

    fn take(key: &(String, String, u64)) -> Option<(bytes::Bytes, bytes::Bytes)> {
        let mut all = Self::all();
        let i = all.iter().position(|e| &e.key == key)?;
        all[i].left -= 1;
        let got = (all[i].obj.clone(), all[i].ib.clone());
        if all[i].left == 0 {
            all.remove(i);
        }
        Some(got)
    }
}

/// Read and encode a sealed segment file (into a pooled buffer:
/// [`crate::pool::RAW`]).
async fn encode_file(
    vm: &str,
    row: &SegmentRow,
    prev: Option<ChainLink>,
) -> Result<(bytes::Bytes, SegmentIndex)> {
    let (vm2, disk, path) = (vm.to_string(), row.disk.clone(), row.path.clone());
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut raw = pool::RAW.take(0);
        std::fs::File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut raw))
            .map_err(ShipError::io("reading", &path))?;
        let r = encode_segment(&vm2, &disk, &path, &raw, prev);
        pool::RAW.give(raw);
        r
    })
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

    /// The object decodes to the segment, frame by frame and as a whole;
    /// every frame carries zstd's checksum; the hash is the object's.
    #[test]
    fn parallel_compression_makes_frames_that_decode_to_the_segment() {
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
            let (obj, frames, hash) = compress_parallel(&raw).unwrap();
            assert_eq!(hash, blake3::hash(&obj), "hash at {len}");
            assert_eq!(frames.len(), len.div_ceil(rf::FRAME_RAW));
            if len > 0 {
                let whole = rf::decompress_segment("k", &obj, frames.len()).unwrap();
                assert!(whole == raw, "object at {len}");
            }
            for (i, f) in frames.iter().enumerate() {
                assert_eq!(f.raw_offset, (i * rf::FRAME_RAW) as u64);
                let end = frames
                    .get(i + 1)
                    .map_or(obj.len(), |g| g.object_offset as usize);
                let frame = &obj[f.object_offset as usize..end];
                // Frame header descriptor: the content checksum flag (bit 2).
                assert_eq!(&frame[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
                assert!(frame[4] & 4 != 0, "frame {i} at {len}: no checksum");
                let piece = rf::decompress_segment("k", frame, 1).unwrap();
                let r0 = i * rf::FRAME_RAW;
                assert!(piece[..] == raw[r0..(r0 + rf::FRAME_RAW).min(len)]);
            }
        }
    }

    /// A segment's object starts on a page boundary (so the `file://`
    /// backend writes it with O_DIRECT) and its buffer is reused by the
    /// next segment once dropped (no fresh pages per segment).
    #[test]
    fn objects_are_aligned_and_their_buffers_reused() {
        let raw: Vec<u8> = (0..3 * rf::FRAME_RAW).map(|i| (i % 13) as u8).collect();
        let (obj, _, _) = compress_parallel(&raw).unwrap();
        assert_eq!(obj.as_ptr() as usize % pool::ALIGN, 0);
        let first = obj.as_ptr();
        drop(obj);
        let (obj, _, _) = compress_parallel(&raw).unwrap();
        assert_eq!(obj.as_ptr(), first, "the object's buffer was not reused");
        assert!(!pool::FRAMES.is_empty(), "frame buffers not pooled");
        drop(obj);
        pool::release();
        assert!(pool::OBJECTS.is_empty() && pool::FRAMES.is_empty() && pool::RAW.is_empty());
    }

    /// A piece that does not compress is stored as a frame of raw blocks
    /// (its length is the raw frame's), one that compresses is compressed;
    /// both decode to the segment, and the object's hash is of what is
    /// stored.
    #[test]
    fn incompressible_pieces_are_stored_raw_and_decode() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut noise = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        };
        // Frames 0 and 2 random, 1 and 3 compressible, 4 short and random.
        let raw: Vec<u8> = (0..4 * rf::FRAME_RAW + 70_000)
            .map(|i| match (i / rf::FRAME_RAW) % 2 {
                0 => noise(),
                _ => (i % 61) as u8,
            })
            .collect();
        let (obj, frames, hash) = compress_parallel(&raw).unwrap();
        assert_eq!(hash, blake3::hash(&obj));
        assert!(rf::decompress_segment("k", &obj, frames.len()).unwrap() == raw);
        let len = |i: usize| {
            frames
                .get(i + 1)
                .map_or(obj.len(), |g| g.object_offset as usize)
                - frames[i].object_offset as usize
        };
        let piece = |i: usize| (raw.len() - i * rf::FRAME_RAW).min(rf::FRAME_RAW);
        for i in [0, 2, 4] {
            assert_eq!(
                len(i),
                cdp_repo::zframe::raw_frame_len(piece(i)),
                "frame {i}"
            );
        }
        for i in [1, 3] {
            assert!(len(i) < piece(i) / 10, "frame {i}: {} bytes", len(i));
        }
    }

    /// A damaged frame is refused (its checksum), never decoded into other
    /// bytes.
    #[test]
    fn a_damaged_frame_is_refused() {
        let raw: Vec<u8> = (0..rf::FRAME_RAW as u64)
            .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
            .collect();
        let mut obj = compress_parallel(&raw).unwrap().0.to_vec();
        let mid = obj.len() / 2;
        obj[mid] ^= 1;
        assert!(rf::decompress_segment("k", &obj, 1).is_err());
    }
}
