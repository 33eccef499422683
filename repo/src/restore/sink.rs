//! Where restored bytes go: a fresh sparse file (raw, or the raw file
//! behind a qcow2 conversion), written through the page cache
//! ([`FreshFile`]) or around it ([`DirectFile`]), or the disk in place.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};

use super::aligned::{align, AlignedBuf, Split};

/// Where restored bytes go. Every byte of the disk is given exactly once.
pub trait Sink: Send + Sync {
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()>;
    fn zero(&self, offset: u64, len: u64) -> std::io::Result<()>;
    /// Told once, before any write, the sorted disjoint ranges that will be
    /// written with data (not zeros). A hint: nothing by default.
    fn will_write(&self, _ranges: &[(u64, u64)]) {}
    /// True if the sink would rather be given whole aligned chunks in disk
    /// order, gathered into runs, by one writer ([`Sink::write_gathered`])
    /// than pieces from many threads at once.
    fn gathers(&self) -> bool {
        false
    }
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

/// A new sparse file written with `O_DIRECT` where it can be: the aligned
/// part of every write goes straight to the device (no copy into the page
/// cache, no writeback by the kernel's flusher, little left for the final
/// `fsync`); the unaligned heads and tails, and everything on a filesystem
/// that refuses `O_DIRECT` (tmpfs, some FUSE), go through the page cache as
/// in [`FreshFile`]. Zeros are holes. The caller still `fsync`s the file:
/// that makes the buffered parts and the new blocks' metadata durable.
pub struct DirectFile {
    file: File,
    direct: Option<File>,
    /// Cleared when the filesystem refuses a direct write (`EINVAL`): from
    /// then on every write is buffered.
    direct_ok: AtomicBool,
}

impl DirectFile {
    /// Writes to `file`, and to a second descriptor of the same file opened
    /// with `O_DIRECT` if the filesystem allows it.
    pub fn new(file: File) -> DirectFile {
        let direct = reopen_direct(&file);
        DirectFile {
            direct_ok: AtomicBool::new(direct.is_some()),
            file,
            direct,
        }
    }

    /// True while aligned writes go around the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some() && self.direct_ok.load(Ordering::Relaxed)
    }

    /// Write the aligned `data` at `offset` with `O_DIRECT`; on `EINVAL`
    /// (the filesystem or device refuses it) the rest goes through the page
    /// cache, and so does every later write.
    fn write_direct(&self, direct: &File, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut done = 0;
        while done < data.len() {
            match direct.write_at(&data[done..], offset + done as u64) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.direct_ok.store(false, Ordering::Relaxed);
                    return write_back_soon(&self.file, offset + done as u64, &data[done..]);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Smaller aligned pieces (a journal record's few blocks) go through the
/// page cache: a direct write waits for the device, and thousands of small
/// ones cost more than copying them.
const DIRECT_MIN: usize = 128 << 10;

/// Gathered runs smaller than this go through the page cache: a direct
/// write waits for the device, and a run of a few journal records (broken
/// where another segment holds the next block) is written faster by the
/// flusher, which merges neighbouring runs into large requests.
const DIRECT_RUN_MIN: usize = 4 << 20;

/// `file` opened again, write-only, with `O_DIRECT` (through
/// `/proc/self/fd`, so the same inode whatever happened to its name since);
/// None where that is refused.
fn reopen_direct(file: &File) -> Option<File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let d = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .ok()?;
    let (a, b) = (file.metadata().ok()?, d.metadata().ok()?);
    (a.dev() == b.dev() && a.ino() == b.ino()).then_some(d)
}

impl Sink for DirectFile {
    /// Allocates the ranges (unwritten extents) before any write: a direct
    /// write into a hole holds the inode's lock exclusively until the
    /// device answers (ext4), so parallel writers would queue one at a
    /// time; over allocated blocks they share it and the device gets them
    /// all at once. Only what is written is allocated: zeros stay holes. A
    /// filesystem without fallocate just writes.
    fn will_write(&self, ranges: &[(u64, u64)]) {
        let Some(direct) = &self.direct else { return };
        for &(s, e) in ranges {
            let r = nix::fcntl::fallocate(
                direct.as_raw_fd(),
                nix::fcntl::FallocateFlags::empty(),
                s as libc::off_t,
                (e - s) as libc::off_t,
            );
            if r.is_err() {
                return;
            }
        }
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let a = align();
        let s = Split::of(offset, data.len(), a);
        let direct = match &self.direct {
            Some(d) if s.mid >= DIRECT_MIN && self.direct_ok.load(Ordering::Relaxed) => d,
            _ => return write_back_soon(&self.file, offset, data),
        };
        let (head, rest) = data.split_at(s.head);
        let (mid, tail) = rest.split_at(s.mid);
        let mid_at = offset + s.head as u64;
        if !head.is_empty() {
            self.file.write_all_at(head, offset)?;
        }
        if !tail.is_empty() {
            self.file.write_all_at(tail, mid_at + s.mid as u64)?;
        }
        if (mid.as_ptr() as usize).is_multiple_of(a) {
            return self.write_direct(direct, mid_at, mid);
        }
        // Memory not aligned (a journal record's payload): through a
        // pooled aligned buffer.
        for (i, piece) in mid.chunks(super::aligned::POOL_LEN).enumerate() {
            let mut buf = AlignedBuf::take(piece.len());
            buf.copy_from_slice(piece);
            let at = mid_at + (i * super::aligned::POOL_LEN) as u64;
            self.write_direct(direct, at, &buf)?;
        }
        Ok(())
    }
    fn zero(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
        Ok(())
    }
    /// Whole chunks, gathered, go to the device in one request of several
    /// MiB (this disk serves 1 MiB direct writes much worse than 4 MiB
    /// ones: BENCHMARKS.md, "Restore").
    fn gathers(&self) -> bool {
        self.is_direct()
    }
    /// One `pwritev` of all of `bufs` on the `O_DIRECT` descriptor when
    /// they are all aligned (memory, length, offset) and at least
    /// [`DIRECT_RUN_MIN`] bytes, else through the page cache; `EINVAL`
    /// turns direct writes off as in [`Sink::write`].
    fn write_gathered(&self, offset: u64, bufs: &[AlignedBuf]) -> std::io::Result<()> {
        let a = align();
        let aligned = offset.is_multiple_of(a as u64)
            && bufs
                .iter()
                .all(|b| b.len().is_multiple_of(a) && (b.as_ptr() as usize).is_multiple_of(a));
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let direct = match &self.direct {
            Some(d)
                if aligned && total >= DIRECT_RUN_MIN && self.direct_ok.load(Ordering::Relaxed) =>
            {
                d
            }
            _ => {
                let mut at = offset;
                for b in bufs {
                    write_back_soon(&self.file, at, b)?;
                    at += b.len() as u64;
                }
                return Ok(());
            }
        };
        let mut slices: Vec<std::io::IoSlice> =
            bufs.iter().map(|b| std::io::IoSlice::new(b)).collect();
        let mut rest = &mut slices[..];
        let mut at = offset;
        while !rest.is_empty() {
            match nix::sys::uio::pwritev(direct, rest, at as libc::off_t) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    at += n as u64;
                    std::io::IoSlice::advance_slices(&mut rest, n);
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EINVAL) => {
                    self.direct_ok.store(false, Ordering::Relaxed);
                    for s in rest.iter() {
                        write_back_soon(&self.file, at, s)?;
                        at += s.len() as u64;
                    }
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
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
        let _ = std::fs::remove_file(&path);
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        f.set_len(size as u64).unwrap();
        let sink = DirectFile::new(f.try_clone().unwrap());
        for (s, e) in pieces {
            // From memory at any alignment, as journal payloads are.
            let mut mem = vec![0u8; e - s + shift];
            mem[shift..].copy_from_slice(&disk[s..e]);
            sink.write(s as u64, &mem[shift..]).unwrap();
        }
        f.sync_all().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), disk);
    }

    fn dirs() -> Vec<tempfile::TempDir> {
        // The build's filesystem (O_DIRECT on ext4, xfs, …) and tmpfs,
        // where it is refused or emulated: both must give the same bytes.
        let mut v = vec![tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap()];
        if std::path::Path::new("/dev/shm").is_dir() {
            v.push(tempfile::tempdir_in("/dev/shm").unwrap());
        }
        v
    }

    #[test]
    fn whole_chunks_aligned_and_not() {
        for d in dirs() {
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
    }

    /// Runs given to `write_gathered`, large (direct where allowed) and
    /// small (buffered), aligned or not, through both sinks: the file holds
    /// exactly the bytes given, once.
    #[test]
    fn gathered_runs_give_the_disk() {
        let mb = 1 << 20;
        let size = 12 * mb + 8192;
        let disk: Vec<u8> = (0..size).map(|i| (i * 13 + i / 4096) as u8 | 1).collect();
        // (offset, lengths of the buffers): a run of 5 MiB (direct), one of
        // 2 MiB (buffered), one starting unaligned, one with a short tail.
        let runs: [(usize, &[usize]); 4] = [
            (0, &[mb; 5]),
            (5 * mb, &[mb, mb]),
            (7 * mb, &[100]),
            (7 * mb + 100, &[mb - 100, mb, mb, mb, mb, 4096]),
        ];
        for d in dirs() {
            for direct in [true, false] {
                let path = d.path().join(format!("g{direct}"));
                let f = File::options()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .unwrap();
                f.set_len(size as u64).unwrap();
                let sink: Box<dyn Sink> = if direct {
                    Box::new(DirectFile::new(f.try_clone().unwrap()))
                } else {
                    Box::new(FreshFile(f.try_clone().unwrap()))
                };
                sink.will_write(&[(0, size as u64)]);
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
                assert_eq!(std::fs::read(&path).unwrap(), disk, "direct {direct}");
            }
        }
    }

    #[test]
    fn direct_where_the_filesystem_takes_it() {
        let d = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let f = File::create(d.path().join("f")).unwrap();
        f.set_len(1 << 20).unwrap();
        let sink = DirectFile::new(f);
        sink.write(4096, &AlignedBuf::take(256 << 10)).unwrap();
        // The test's own filesystem may refuse O_DIRECT; if it takes the
        // open, an aligned write must not have switched it off.
        assert_eq!(sink.is_direct(), sink.direct.is_some());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn any_pieces_give_the_disk(size in 1usize..(3 << 20),
                                    cuts in proptest::collection::vec(0usize..(3 << 20), 0..12),
                                    order in any::<u64>(), shift in 0usize..4097) {
            for d in dirs() {
                write_pieces(d.path(), size, &cuts, order, shift);
            }
        }
    }
}
