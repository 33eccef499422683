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

/// Read chunk object `file` of `size` bytes (named `hash` by `namer`; the
/// size bounded by [`crate::store::Store::open_local`]) into `out`, which
/// must be exactly the chunk's length, and check `out` against the name.
/// An object that is one zstd frame of stored (raw) blocks only, as an
/// incompressible chunk is, is read with one `preadv` straight into `out`
/// around its 3-byte block headers (then checked to be what they must be):
/// one copy from the page cache, no second copy by the decoder. Any other
/// object, or one that does not hold what its size promised, is read whole
/// and decompressed ([`decompress_chunk_into`]), which then decides. The
/// frame's own checksum is not computed on the direct read: the BLAKE3
/// name, computed over `out` (the very bytes then written), is the check.
pub fn read_chunk_file(
    namer: &rf::ChunkNamer,
    hash: &str,
    file: &std::fs::File,
    size: u64,
    out: &mut [u8],
) -> Result<(), RestoreError> {
    use std::io::Read;
    let read_err = |e: std::io::Error| RestoreError::Corrupt {
        what: rf::chunk_key(hash),
        why: format!("reading: {e}"),
    };
    if read_stored_blocks(file, size, out).map_err(read_err)? && namer.name(out) == hash {
        return Ok(());
    }
    // A file that grew since it was opened: what is past `size` makes
    // the object longer than its frame, which decompression refuses.
    let mut obj = Vec::with_capacity(size as usize);
    (&mut &*file)
        .take(size + 1)
        .read_to_end(&mut obj)
        .map_err(read_err)?;
    decompress_chunk_into(namer, hash, &obj, out)
}

/// The largest block of a zstd frame (and the size of every stored block
/// but the last that zstd writes for incompressible data).
const ZSTD_BLOCK_MAX: usize = crate::zframe::MAX_BLOCK;

/// If the `size`-byte zstd object in `file` is one frame of stored blocks
/// holding exactly `out.len()` bytes (blocks of [`ZSTD_BLOCK_MAX`], the
/// last one shorter or an empty one after them), read their bytes into `out` and say true; false
/// (and `out` in any state) if the object is anything else.
fn read_stored_blocks(file: &std::fs::File, size: u64, out: &mut [u8]) -> std::io::Result<bool> {
    use std::io::IoSliceMut;
    let mut head = [0u8; 18];
    let got = file.read_at(&mut head, 0)?;
    let Some((hdr, checksum)) = frame_header(&head[..got], out.len() as u64) else {
        return Ok(false);
    };
    if out.is_empty() {
        return Ok(false);
    }
    // Each block's bytes, and its 3-byte header; a chunk that ends on a
    // block boundary may have an empty last block after them.
    let blocks = out.len().div_ceil(ZSTD_BLOCK_MAX);
    let full = (hdr + 3 * blocks + out.len() + 4 * checksum as usize) as u64;
    let empty_last = match size {
        s if s == full => false,
        s if s == full + 3 => true,
        _ => return Ok(false),
    };
    let mut heads = vec![[0u8; 3]; blocks + empty_last as usize];
    let mut tail = [0u8; 4];
    let mut iov: Vec<IoSliceMut> = Vec::with_capacity(2 * blocks + 2);
    let mut rest = &mut *out;
    for (i, h) in heads.iter_mut().enumerate() {
        iov.push(IoSliceMut::new(h));
        if i < blocks {
            let (block, more) = rest.split_at_mut(rest.len().min(ZSTD_BLOCK_MAX));
            iov.push(IoSliceMut::new(block));
            rest = more;
        }
    }
    if checksum {
        iov.push(IoSliceMut::new(&mut tail));
    }
    let want = size as usize - hdr;
    let n = nix::sys::uio::preadv(file, &mut iov, hdr as i64).map_err(std::io::Error::from)?;
    if n != want {
        return Ok(false);
    }
    let len = out.len();
    Ok(heads.iter().enumerate().all(|(i, h)| {
        let block = len.saturating_sub(i * ZSTD_BLOCK_MAX).min(ZSTD_BLOCK_MAX);
        *h == crate::zframe::raw_block_header(i + 1 == heads.len(), block)
    }))
}

/// The length of a zstd frame header at the start of `b`, and whether the
/// frame ends in a content checksum, if it is a frame of this format
/// without a dictionary whose declared size (if any) is `len`.
fn frame_header(b: &[u8], len: u64) -> Option<(usize, bool)> {
    if b.len() < 6 || b[..4] != crate::zframe::MAGIC.to_le_bytes() {
        return None;
    }
    let fhd = b[4];
    let (fcs_flag, single, checksum, dict) =
        (fhd >> 6, fhd >> 5 & 1 == 1, fhd >> 2 & 1 == 1, fhd & 3);
    // Reserved bit set, or a dictionary: not ours.
    if fhd & 8 != 0 || dict != 0 {
        return None;
    }
    let fcs_len = match fcs_flag {
        0 => single as usize,
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let at = 5 + !single as usize;
    let hdr = at + fcs_len;
    if b.len() < hdr {
        return None;
    }
    if fcs_len > 0 {
        let mut v = [0u8; 8];
        v[..fcs_len].copy_from_slice(&b[at..hdr]);
        let declared = u64::from_le_bytes(v) + if fcs_len == 2 { 256 } else { 0 };
        if declared != len {
            return None;
        }
    }
    Some((hdr, checksum))
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

    /// [`read_chunk_file`] with the file's size, as `Store::open_local`
    /// gives it.
    fn read_chunk(
        namer: &rf::ChunkNamer,
        hash: &str,
        f: &std::fs::File,
        out: &mut [u8],
    ) -> Result<(), RestoreError> {
        read_chunk_file(namer, hash, f, f.metadata().unwrap().len(), out)
    }

    /// `data` as a chunk object in a file of a temporary directory.
    fn chunk_file(d: &tempfile::TempDir, obj: &[u8]) -> std::fs::File {
        let path = d.path().join("chunk");
        std::fs::write(&path, obj).unwrap();
        std::fs::File::open(&path).unwrap()
    }

    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// An incompressible chunk, as the shipper writes it, is read by the
    /// direct path (stored blocks read into the buffer), at every length
    /// around the block size; what it reads is the chunk.
    #[test]
    fn stored_blocks_are_read_straight_into_the_buffer() {
        let d = tempfile::tempdir().unwrap();
        let k = ZSTD_BLOCK_MAX;
        for len in [
            1,
            4096,
            k - 1,
            k,
            k + 1,
            3 * k + 17,
            rf::CHUNK_SIZE as usize,
        ] {
            let data = random(len, len as u64);
            let obj = rf::compress_chunk(&data).unwrap();
            let f = chunk_file(&d, &obj);
            let mut out = vec![0u8; len];
            assert!(
                read_stored_blocks(&f, obj.len() as u64, &mut out).unwrap(),
                "{len} bytes: not read directly"
            );
            assert_eq!(out, data, "{len} bytes");
            // The shipper's raw frames ([`crate::zframe`]) read the same way.
            let mut raw = Vec::new();
            crate::zframe::raw_frame(&data, &mut raw);
            let g = chunk_file(&d, &raw);
            out.fill(0);
            assert!(
                read_stored_blocks(&g, raw.len() as u64, &mut out).unwrap(),
                "{len} bytes: a raw frame not read directly"
            );
            assert_eq!(out, data, "{len} bytes of a raw frame");
            let f = chunk_file(&d, &obj);
            let hash = rf::ChunkNamer::Plain.name(&data);
            out.fill(0);
            read_chunk(&rf::ChunkNamer::Plain, &hash, &f, &mut out).unwrap();
            assert_eq!(out, data);
        }
    }

    /// Anything else goes the general way and is restored or refused as
    /// before: a compressible chunk, a damaged block header, a damaged
    /// byte of a stored block, the wrong name, the wrong length.
    #[test]
    fn other_chunk_objects_are_decompressed_and_checked() {
        let d = tempfile::tempdir().unwrap();
        let plain = rf::ChunkNamer::Plain;
        let len = 3 * ZSTD_BLOCK_MAX + 100;
        // Compressible: not stored blocks, decompressed.
        let text: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let obj = rf::compress_chunk(&text).unwrap();
        let f = chunk_file(&d, &obj);
        let mut out = vec![0u8; len];
        assert!(!read_stored_blocks(&f, obj.len() as u64, &mut out).unwrap());
        read_chunk(&plain, &plain.name(&text), &f, &mut out).unwrap();
        assert_eq!(out, text);
        // Incompressible, then damaged.
        let data = random(len, 7);
        let hash = plain.name(&data);
        let obj = rf::compress_chunk(&data).unwrap();
        let (hdr, _) = frame_header(&obj, len as u64).unwrap();
        // The second block's header says "compressed".
        let mut bad = obj.clone();
        bad[hdr + 3 + ZSTD_BLOCK_MAX] |= 4;
        let f = chunk_file(&d, &bad);
        assert!(!read_stored_blocks(&f, bad.len() as u64, &mut out).unwrap());
        assert!(read_chunk(&plain, &hash, &f, &mut out).is_err());
        // A byte of a stored block changed: read directly, refused by name.
        let mut bad = obj.clone();
        bad[hdr + 3 + 5] ^= 1;
        let f = chunk_file(&d, &bad);
        assert!(read_stored_blocks(&f, bad.len() as u64, &mut out).unwrap());
        assert!(read_chunk(&plain, &hash, &f, &mut out).is_err());
        // The right object under another name, or into a buffer of
        // another length, or with a byte more at its end: refused.
        let f = chunk_file(&d, &obj);
        assert!(read_chunk(&plain, &plain.name(b"x"), &f, &mut out).is_err());
        let mut short = vec![0u8; len - 1];
        assert!(read_chunk(&plain, &hash, &f, &mut short).is_err());
        let mut longer = obj.clone();
        longer.push(0);
        let f = chunk_file(&d, &longer);
        assert!(!read_stored_blocks(&f, longer.len() as u64, &mut out).unwrap());
        assert!(read_chunk(&plain, &hash, &f, &mut out).is_err());
        read_chunk(&plain, &hash, &chunk_file(&d, &obj), &mut out).unwrap();
        assert_eq!(out, data);
    }
}
