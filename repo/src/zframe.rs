//! zstd frames of raw blocks (RFC 8878, "Zstandard Frames"): what the
//! shipper stores for a piece of a segment that does not compress
//! (docs/REPOSITORY_FORMAT.md, "Segment object"). Every zstd decoder reads
//! them like any other frame, content checksum included; writing one costs a
//! copy and an XXH64 instead of a compression pass that saves nothing.
//! Restore reads such frames (and zstd's own frames of raw blocks) straight
//! into its buffer (`restore::read::read_stored_blocks`), with the same
//! constants and block header. Pure code.

/// zstd's frame magic number.
pub const MAGIC: u32 = 0xFD2F_B528;
/// The largest block of a frame (`Block_Maximum_Size`).
pub const MAX_BLOCK: usize = 128 << 10;
/// Frame header descriptor: `Frame_Content_Size_flag` 2 (a 4-byte content
/// size), `Single_Segment_flag` (no window descriptor: the window is the
/// content), `Content_Checksum_flag`, no dictionary.
const DESCRIPTOR: u8 = 0b1010_0100;

/// The largest piece a raw frame holds here (its content size is 4 bytes).
pub const MAX_RAW: usize = u32::MAX as usize;

/// The 3-byte header of a raw block of `len` bytes (`Block_Header`:
/// `Last_Block` in bit 0, `Block_Type` 0 = Raw in bits 1-2, `Block_Size`
/// from bit 3).
pub fn raw_block_header(last: bool, len: usize) -> [u8; 3] {
    let h = u32::from(last) | ((len as u32) << 3);
    let b = h.to_le_bytes();
    [b[0], b[1], b[2]]
}

/// The length of the raw frame of `n` bytes.
pub fn raw_frame_len(n: usize) -> usize {
    let blocks = n.div_ceil(MAX_BLOCK).max(1);
    4 + 1 + 4 + 3 * blocks + n + 4
}

/// Append the zstd frame holding `data` in raw blocks to `out`: magic,
/// header (content size, checksum flag), blocks of at most 128 KiB, the low
/// 32 bits of the content's XXH64. `data` is at most [`MAX_RAW`] bytes.
pub fn raw_frame(data: &[u8], out: &mut Vec<u8>) {
    assert!(data.len() <= MAX_RAW, "a raw frame holds at most 4 GiB");
    out.reserve(raw_frame_len(data.len()));
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.push(DESCRIPTOR);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    let blocks = data.len().div_ceil(MAX_BLOCK).max(1);
    for i in 0..blocks {
        let block = &data[(i * MAX_BLOCK).min(data.len())..((i + 1) * MAX_BLOCK).min(data.len())];
        out.extend_from_slice(&raw_block_header(i + 1 == blocks, block.len()));
        out.extend_from_slice(block);
    }
    let sum = xxhash_rust::xxh64::xxh64(data, 0) as u32;
    out.extend_from_slice(&sum.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        raw_frame(data, &mut out);
        assert_eq!(out.len(), raw_frame_len(data.len()));
        out
    }

    /// zstd reads back exactly the bytes, at the block boundaries too, and
    /// the frame says its content size.
    #[test]
    fn zstd_reads_raw_frames_back() {
        for n in [
            0,
            1,
            4095,
            MAX_BLOCK - 1,
            MAX_BLOCK,
            MAX_BLOCK + 1,
            1 << 20,
            3 * MAX_BLOCK + 7,
        ] {
            let data: Vec<u8> = (0..n).map(|i| (i * 7 + i / 251) as u8).collect();
            let f = frame(&data);
            assert_eq!(
                zstd::zstd_safe::get_frame_content_size(&f).unwrap(),
                Some(n as u64)
            );
            assert_eq!(zstd::bulk::decompress(&f, n).unwrap(), data, "{n} bytes");
            assert_eq!(zstd::stream::decode_all(&f[..]).unwrap(), data, "{n} bytes");
        }
    }

    /// The content checksum is zstd's: a flipped payload byte or checksum
    /// byte fails decoding.
    #[test]
    fn a_damaged_raw_frame_fails_its_checksum() {
        let data = vec![0x5au8; 300_000];
        let good = frame(&data);
        for at in [9 + 3 + 10, good.len() - 2] {
            let mut bad = good.clone();
            bad[at] ^= 1;
            assert!(zstd::stream::decode_all(&bad[..]).is_err(), "byte {at}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_bytes_round_trip(data in proptest::collection::vec(any::<u8>(), 0..300_000)) {
            let f = frame(&data);
            prop_assert_eq!(zstd::stream::decode_all(&f[..]).unwrap(), data);
        }
    }
}
