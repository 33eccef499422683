//! Where restored bytes go: a fresh sparse file (raw, or the raw file
//! behind a qcow2 conversion), written through the page cache
//! ([`FreshFile`]), or the disk in place.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use super::aligned::AlignedBuf;

/// Where restored bytes go. Every byte of the disk is given exactly once.
pub trait Sink: Send + Sync {
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()>;
    fn zero(&self, offset: u64, len: u64) -> std::io::Result<()>;
    /// Write `bufs` one after the other from `offset` (consecutive ranges
    /// of the disk, each given once). By default one [`Sink::write`] each.
    fn write_gathered(&self, offset: u64, bufs: &[AlignedBuf]) -> std::io::Result<()> {
        let mut at = offset;
        for b in bufs {
            self.write(at, b)?;
            at += b.len() as u64;
        }
        Ok(())
    }
}

/// A new sparse file: zeros are holes, nothing to write.
pub struct FreshFile(pub File);

impl Sink for FreshFile {
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        write_back_soon(&self.0, offset, data)
    }
    fn zero(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
        Ok(())
    }
}

/// A buffered write; a large one is written back at once.
fn write_back_soon(file: &File, offset: u64, data: &[u8]) -> std::io::Result<()> {
    file.write_all_at(data, offset)?;
    if data.len() >= 1 << 18 {
        // Start writing large pieces back now, so the disk works while
        // the rest is fetched and the final sync has little left to do.
        // nix has no sync_file_range. The result is ignored: this is a
        // hint, and the final fsync reports any write error.
        // SAFETY: the fd is owned by `file` and open for the whole
        // call; sync_file_range takes no pointers, only integers.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                offset as libc::off64_t,
                data.len() as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
    }
    Ok(())
}

/// An existing disk: only ranges that differ are written.
pub struct InPlace {
    pub file: File,
    pub changed: std::sync::atomic::AtomicU64,
}

impl Sink for InPlace {
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut cur = vec![0u8; data.len()];
        self.file.read_exact_at(&mut cur, offset)?;
        if cur != data {
            self.file.write_all_at(data, offset)?;
            self.changed
                .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }
    fn zero(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let mut done = 0;
        let mut cur = vec![0u8; (len as usize).min(1 << 20)];
        while done < len {
            let n = (len - done).min(cur.len() as u64) as usize;
            self.file.read_exact_at(&mut cur[..n], offset + done)?;
            if cur[..n].iter().any(|&b| b != 0) {
                cdp_core::journal::zero_range(&self.file, offset + done, n as u64, false)?;
                self.changed
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            }
            done += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A new file of `size` bytes at `path` (read and write).
    fn new_file(path: &std::path::Path, size: usize) -> File {
        let _ = std::fs::remove_file(path);
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .unwrap();
        f.set_len(size as u64).unwrap();
        f
    }

    /// Give every byte of a `size`-byte disk once, in pieces cut at `cuts`,
    /// in a shuffled order, from memory shifted by `shift` bytes; the file
    /// must then hold exactly the disk.
    fn write_pieces(dir: &std::path::Path, size: usize, cuts: &[usize], order: u64, shift: usize) {
        let disk: Vec<u8> = (0..size).map(|i| (i * 7 + i / 4096) as u8 | 1).collect();
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c % size).collect();
        bounds.extend([0, size]);
        bounds.sort_unstable();
        bounds.dedup();
        let mut pieces: Vec<(usize, usize)> = bounds.windows(2).map(|w| (w[0], w[1])).collect();
        let n = pieces.len();
        for i in 0..n {
            pieces.swap(i, (order as usize).wrapping_mul(i + 31) % n);
        }
        let path = dir.join("out.raw");
        let f = new_file(&path, size);
        let sink = FreshFile(f.try_clone().unwrap());
        for (s, e) in pieces {
            // From memory at any alignment, as journal payloads are.
            let mut mem = vec![0u8; e - s + shift];
            mem[shift..].copy_from_slice(&disk[s..e]);
            sink.write(s as u64, &mem[shift..]).unwrap();
        }
        f.sync_all().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), disk);
    }

    #[test]
    fn whole_chunks_aligned_and_not() {
        let d = tempfile::tempdir().unwrap();
        let mb = 1 << 20;
        write_pieces(d.path(), 3 * mb, &[mb, 2 * mb], 5, 0);
        write_pieces(d.path(), 3 * mb, &[mb, 2 * mb], 5, 3);
        write_pieces(
            d.path(),
            3 * mb + 512,
            &[512, mb + 100, 2 * mb - 4096],
            7,
            1,
        );
    }

    /// Runs given to `write_gathered`, aligned or not, with a short tail:
    /// the file holds exactly the bytes given, once.
    #[test]
    fn gathered_runs_give_the_disk() {
        let mb = 1 << 20;
        let size = 12 * mb + 8192;
        let disk: Vec<u8> = (0..size).map(|i| (i * 13 + i / 4096) as u8 | 1).collect();
        // (offset, lengths of the buffers): a run of 5 MiB, one of 2 MiB,
        // one starting unaligned, one with a short tail.
        let runs: [(usize, &[usize]); 4] = [
            (0, &[mb; 5]),
            (5 * mb, &[mb, mb]),
            (7 * mb, &[100]),
            (7 * mb + 100, &[mb - 100, mb, mb, mb, mb, 4096]),
        ];
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("g");
        let f = new_file(&path, size);
        let sink = FreshFile(f.try_clone().unwrap());
        let mut written = 0;
        for (at, lens) in runs {
            let mut pos = at;
            let bufs: Vec<AlignedBuf> = lens
                .iter()
                .map(|&n| {
                    let mut b = AlignedBuf::take(n);
                    b.copy_from_slice(&disk[pos..pos + n]);
                    pos += n;
                    b
                })
                .collect();
            sink.write_gathered(at as u64, &bufs).unwrap();
            written = pos;
        }
        assert_eq!(written, size - 4096);
        sink.write((size - 4096) as u64, &disk[size - 4096..])
            .unwrap();
        f.sync_all().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), disk);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn any_pieces_give_the_disk(size in 1usize..(3 << 20),
                                    cuts in proptest::collection::vec(0usize..(3 << 20), 0..12),
                                    order in any::<u64>(), shift in 0usize..4097) {
            let d = tempfile::tempdir().unwrap();
            write_pieces(d.path(), size, &cuts, order, shift);
        }
    }
}
