//! Reading what a plan names: raw segment bytes (a local file range, or the
//! frames of a repository object that hold it), whole records with their
//! CRC checked, and baseline chunks checked against their name.

use std::ops::Range;
use std::os::unix::fs::FileExt;

use bytes::Bytes;
use cdp_core::journal::format::{IndexEntry, RecordHeader, RECORD_HEADER_LEN};

use super::history::{SegLoc, SegRef};
use super::{io_err, RestoreError};
use crate::format as rf;
use crate::read::ReadError;
use crate::store::{with_retry, RetryPolicy, Store};

/// Read raw bytes of a segment: a file range, or the frames of the object
/// that hold it (one ranged GET), decompressed.
pub async fn read_raw(
    store: Option<&Store>,
    vm: &str,
    disk: &str,
    seg: &SegRef,
    range: Range<u64>,
) -> Result<Vec<u8>, RestoreError> {
    match &seg.loc {
        SegLoc::Local(path) => {
            let f =
                cdp_core::journal::open_local_segment(path).map_err(|e| RestoreError::Corrupt {
                    what: path.display().to_string(),
                    why: e.to_string(),
                })?;
            let mut buf = vec![0u8; (range.end - range.start) as usize];
            f.read_exact_at(&mut buf, range.start)
                .map_err(io_err(path))?;
            Ok(buf)
        }
        SegLoc::Repo {
            frames,
            object_size,
        } => {
            let key = rf::segment_key(vm, disk, seg.first_seq, seg.last_seq);
            let store = store.ok_or_else(|| RestoreError::Corrupt {
                what: key.clone(),
                why: "segment is only in the repository, and no repository was given".into(),
            })?;
            let first = frames
                .partition_point(|f| f.raw_offset <= range.start)
                .saturating_sub(1);
            let last = frames
                .partition_point(|f| f.raw_offset < range.end)
                .max(first + 1)
                - 1;
            let Some(first_frame) = frames.get(first) else {
                return Err(RestoreError::Corrupt {
                    what: key,
                    why: "the index lists no frames".into(),
                });
            };
            let obj_start = first_frame.object_offset;
            let obj_end = frames
                .get(last + 1)
                .map_or(*object_size, |f| f.object_offset);
            let retry = RetryPolicy::default();
            let obj = with_retry(&key, &retry, || store.get_range(&key, obj_start..obj_end))
                .await
                .map_err(ReadError::from)?;
            let raw =
                rf::decompress_segment(&key, &obj, last + 1 - first).map_err(ReadError::from)?;
            let base = first_frame.raw_offset;
            let (a, b) = ((range.start - base) as usize, (range.end - base) as usize);
            if b > raw.len() {
                return Err(RestoreError::Corrupt {
                    what: key,
                    why: "frames shorter than the index says".into(),
                });
            }
            Ok(raw[a..b].to_vec())
        }
    }
}

/// Read a whole record (header + payload) and check its CRC.
pub async fn read_record(
    store: Option<&Store>,
    vm: &str,
    disk: &str,
    seg: &SegRef,
    e: &IndexEntry,
    payload_len: Option<u64>,
) -> Result<(RecordHeader, Vec<u8>), RestoreError> {
    let hpos = e.payload_pos - RECORD_HEADER_LEN as u64;
    let len = match payload_len {
        Some(n) => n,
        None => {
            let hb = read_raw(store, vm, disk, seg, hpos..e.payload_pos).await?;
            RecordHeader::decode(&hb)
                .map_err(|err| RestoreError::Corrupt {
                    what: format!("{disk} seq {}", e.seq),
                    why: err.to_string(),
                })?
                .payload_len as u64
        }
    };
    let raw = read_raw(store, vm, disk, seg, hpos..e.payload_pos + len).await?;
    check_record(disk, e, &raw).map(|h| (h, raw[RECORD_HEADER_LEN..].to_vec()))
}

/// Check a whole record (header + payload, `raw`) against its CRC and its
/// index entry.
pub fn check_record(disk: &str, e: &IndexEntry, raw: &[u8]) -> Result<RecordHeader, RestoreError> {
    let corrupt = |why: String| RestoreError::Corrupt {
        what: format!("{disk} record seq {}", e.seq),
        why,
    };
    let h = RecordHeader::decode(&raw[..RECORD_HEADER_LEN]).map_err(|x| corrupt(x.to_string()))?;
    h.verify(&raw[..RECORD_HEADER_LEN], &raw[RECORD_HEADER_LEN..])
        .map_err(|x| corrupt(x.to_string()))?;
    if h.seq != e.seq || h.offset != e.offset || h.kind != e.kind {
        return Err(corrupt("record does not match its index entry".into()));
    }
    Ok(h)
}

/// Fetch a chunk and check it against its name.
pub async fn fetch_chunk(store: &Store, hash: &str, len: usize) -> Result<Vec<u8>, RestoreError> {
    let key = rf::chunk_key(hash);
    let retry = RetryPolicy::default();
    let obj: Bytes = with_retry(&key, &retry, || store.get(&key))
        .await
        .map_err(ReadError::from)?;
    // Keyed names in an encrypted repository (docs/REPOSITORY_FORMAT.md, "Encryption").
    let namer = store.chunk_namer().await.map_err(ReadError::from)?;
    Ok(rf::decompress_chunk_named(&namer, hash, &obj, len).map_err(ReadError::from)?)
}

/// Decompress chunk object `obj` (named `hash` by `namer`) into `out`,
/// which must be exactly the chunk's length, and check it against its
/// name. One pass straight into `out` (no stream window in between, so a
/// stored incompressible block is copied once); a frame that holds more
/// than `out` is an error, never more memory.
pub fn decompress_chunk_into(
    namer: &rf::ChunkNamer,
    hash: &str,
    obj: &[u8],
    out: &mut [u8],
) -> Result<(), RestoreError> {
    use std::cell::RefCell;
    thread_local! {
        static DCTX: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { RefCell::new(None) };
    }
    let key = rf::chunk_key(hash);
    let corrupt = |what: String| {
        RestoreError::Read(ReadError::Format(rf::RepoFormatError::Corrupt {
            key: key.clone(),
            what,
        }))
    };
    if out.len() as u64 > rf::CHUNK_SIZE {
        return Err(corrupt(format!(
            "a chunk of {} bytes: chunks are at most {}",
            out.len(),
            rf::CHUNK_SIZE
        )));
    }
    let max = out.len();
    let n = DCTX
        .with(|d| {
            let mut d = d.borrow_mut();
            if d.is_none() {
                *d = Some(zstd::bulk::Decompressor::new()?);
            }
            d.as_mut().expect("just set").decompress_to_buffer(obj, out)
        })
        .map_err(|e| {
            let bomb = |what: String| {
                corrupt(format!(
                    "{what} the {max} bytes it may have: damaged, or a decompression bomb"
                ))
            };
            match zstd::zstd_safe::get_frame_content_size(obj) {
                Ok(Some(n)) if n > max as u64 => bomb(format!("declares {n} bytes, more than")),
                _ if e.to_string().contains("too small") => {
                    bomb("decompresses to more than".into())
                }
                _ => corrupt(format!("decompressing: {e}")),
            }
        })?;
    if n != out.len() {
        return Err(corrupt(format!(
            "chunk is {n} bytes, expected {}",
            out.len()
        )));
    }
    if namer.name(out) != hash {
        return Err(corrupt("content does not match its hash".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_decompresses_into_its_buffer_only_if_it_is_what_its_name_says() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let obj = rf::compress_chunk(&data).unwrap();
        let hash = rf::ChunkNamer::Plain.name(&data);
        let mut out = vec![0u8; data.len()];
        decompress_chunk_into(&rf::ChunkNamer::Plain, &hash, &obj, &mut out).unwrap();
        assert_eq!(out, data);
        // The same bytes under another name, a buffer too short or too
        // long, a damaged object, a keyed namer: all refused.
        let other = rf::ChunkNamer::Plain.name(b"other");
        let plain = rf::ChunkNamer::Plain;
        assert!(decompress_chunk_into(&plain, &other, &obj, &mut out).is_err());
        let mut short = vec![0u8; data.len() - 1];
        assert!(decompress_chunk_into(&plain, &hash, &obj, &mut short).is_err());
        let mut long = vec![0u8; data.len() + 1];
        assert!(decompress_chunk_into(&plain, &hash, &obj, &mut long).is_err());
        let mut bad = obj.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x55;
        assert!(decompress_chunk_into(&plain, &hash, &bad, &mut out).is_err());
        let keyed = rf::ChunkNamer::Keyed([7; 32]);
        assert!(decompress_chunk_into(&keyed, &hash, &obj, &mut out).is_err());
        let mut huge = vec![0u8; rf::CHUNK_SIZE as usize + 1];
        assert!(decompress_chunk_into(&plain, &hash, &obj, &mut huge).is_err());
    }
}
