//! One writer for a fresh output file ([`OrderedFile`]): verified buffers
//! are handed over (owned, no copy) and written by one thread, the
//! baseline's chunks in disk order, so the file is written front to back as
//! `cp` writes it. Before, every blocking-pool thread that had verified a
//! chunk wrote it itself: up to 18 threads queued on the file's lock, with
//! single writes stalled for up to 1.3 s (BENCHMARKS.md, "Restore").
//!
//! Decompressing, hashing and checking stay parallel; only the writes are
//! serial. The queue is bounded: a producer waits while [`QUEUE`] pieces
//! wait for the writer, so memory stays capped whatever the disk's speed.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;
use thiserror::Error;

use super::sink::Sink;

/// Pieces (each at most a chunk, 1 MiB) that may wait in the queue; the
/// writer holds at most as many again while it writes them.
pub const QUEUE: usize = 16;
/// Pieces that follow on on the disk are written with one `pwritev` of at
/// most this many bytes (and at most [`MAX_IOV`] pieces).
const GATHER: u64 = 8 << 20;
const MAX_IOV: usize = 256;
/// Writeback of the ordered pieces is started a window of this many bytes
/// at a time, in disk order: large requests for the device, and few calls.
/// (Per 1 MiB piece on the one writer, a `sync_file_range` waiting for room
/// in the device's queue held the writer up to 0.45 s under load.)
const WINDOW: u64 = 16 << 20;
/// A piece given with `write_owned` at least this large has its writeback
/// started at once.
const WRITE_BACK_SOON: u64 = 1 << 18;

/// Why the writer failed.
#[derive(Debug, Error)]
pub enum WriterError {
    #[error("writing {len} bytes at offset {offset}: {source}")]
    Write {
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    /// The writer met an error earlier (the first one is what
    /// [`Sink::finish`] reports) or was finished already.
    #[error("the output's writer has stopped")]
    Stopped,
    /// Ordered job `next` was never handed over, so it and the jobs after
    /// it were not written: the restore failed elsewhere, or lost a piece.
    #[error("ordered job {next} was never handed over: job {next} onwards not written")]
    Unwritten { next: u64 },
    #[error("the output's writer thread panicked")]
    Panicked,
}

impl WriterError {
    fn into_io(self) -> io::Error {
        let kind = match &self {
            WriterError::Write { source, .. } => source.kind(),
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }

    /// The writer error inside `e`, if it is one.
    pub fn of(e: &io::Error) -> Option<&WriterError> {
        e.get_ref().and_then(|x| x.downcast_ref::<WriterError>())
    }
}

/// Where the writer puts bytes: the output file, or a test's recorder.
pub trait Target: Send + 'static {
    /// Write all of `bufs`, one after the other, from `offset`.
    fn write_at(&mut self, offset: u64, bufs: &[&[u8]]) -> io::Result<()>;
    /// A hint: what was written of `offset..offset + len` may be written
    /// back to the device now.
    fn write_back(&mut self, offset: u64, len: u64) {
        let _ = (offset, len);
    }
}

impl Target for File {
    fn write_at(&mut self, offset: u64, bufs: &[&[u8]]) -> io::Result<()> {
        write_all_vectored_at(self, offset, bufs)
    }
    fn write_back(&mut self, offset: u64, len: u64) {
        start_write_back(self, offset, len)
    }
}

/// Start writeback of `offset..offset + len` of `file`, not waiting for it.
fn start_write_back(file: &File, offset: u64, len: u64) {
    // nix has no sync_file_range. The result is ignored: this is a hint,
    // and the final fsync reports any write error.
    // SAFETY: the fd is owned by `file` and open for the whole call;
    // sync_file_range takes no pointers, only integers.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

/// The output file, its writeback started by a thread of its own: starting
/// writeback allocates the blocks and builds the device's requests, and
/// may wait for room in the device's queue; the writer meanwhile copies
/// the next pieces into the page cache.
pub struct FileTarget {
    file: File,
    hints: Option<std::sync::mpsc::Sender<(u64, u64)>>,
    thread: Option<JoinHandle<()>>,
}

impl FileTarget {
    pub fn new(file: File) -> io::Result<FileTarget> {
        let (tx, rx) = std::sync::mpsc::channel::<(u64, u64)>();
        let f = file.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("restore-writeback".into())
            .spawn(move || {
                for (offset, len) in rx {
                    start_write_back(&f, offset, len);
                }
            })?;
        Ok(FileTarget {
            file,
            hints: Some(tx),
            thread: Some(thread),
        })
    }
}

impl Target for FileTarget {
    fn write_at(&mut self, offset: u64, bufs: &[&[u8]]) -> io::Result<()> {
        write_all_vectored_at(&self.file, offset, bufs)
    }
    fn write_back(&mut self, offset: u64, len: u64) {
        if let Some(tx) = &self.hints {
            let _ = tx.send((offset, len));
        }
    }
}

impl Drop for FileTarget {
    fn drop(&mut self) {
        drop(self.hints.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `pwritev` until all of `bufs` is written (short writes and `EINTR`
/// resumed where they stopped).
fn write_all_vectored_at(f: &File, mut offset: u64, bufs: &[&[u8]]) -> io::Result<()> {
    let (mut i, mut skip) = (0, 0);
    while i < bufs.len() {
        if skip == bufs[i].len() {
            (i, skip) = (i + 1, 0);
            continue;
        }
        let iov: Vec<IoSlice> = std::iter::once(&bufs[i][skip..])
            .chain(bufs[i + 1..].iter().copied())
            .take(MAX_IOV)
            .map(IoSlice::new)
            .collect();
        let mut n = match nix::sys::uio::pwritev(f, &iov, offset as libc::off_t) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        offset += n as u64;
        while n > 0 {
            let left = bufs[i].len() - skip;
            if n >= left {
                (i, skip, n) = (i + 1, 0, n - left);
            } else {
                (skip, n) = (skip + n, 0);
            }
        }
    }
    Ok(())
}

enum Msg {
    /// Written as soon as the writer has it.
    Now(u64, Bytes),
    /// Ordered job `.0`'s pieces: written once jobs 0 to `.0 - 1` are.
    Ordered(u64, Vec<(u64, Bytes)>),
}

/// A fresh file (sized, all holes: zeros are not written) written by one
/// thread. Pieces given with [`Sink::write_ordered`] are written in the
/// order of their jobs (the baseline's chunks, in disk order); the others
/// as they come. [`Sink::finish`] waits for every piece and reports the
/// first write error.
pub struct OrderedFile {
    tx: Mutex<Option<SyncSender<Msg>>>,
    thread: Mutex<Option<JoinHandle<Result<(), WriterError>>>>,
    failed: Arc<AtomicBool>,
}

impl OrderedFile {
    pub fn new(file: File) -> io::Result<OrderedFile> {
        OrderedFile::with_target(FileTarget::new(file)?)
    }

    pub fn with_target<T: Target>(target: T) -> io::Result<OrderedFile> {
        let (tx, rx) = sync_channel(QUEUE);
        let failed = Arc::new(AtomicBool::new(false));
        let f = failed.clone();
        let thread = std::thread::Builder::new()
            .name("restore-writer".into())
            .spawn(move || run(target, rx, &f))?;
        Ok(OrderedFile {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            failed,
        })
    }

    fn send(&self, m: Msg) -> io::Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(WriterError::Stopped.into_io());
        }
        // A clone, so that no lock is held while the queue is full.
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
        tx.ok_or(WriterError::Stopped)
            .and_then(|tx| tx.send(m).map_err(|_| WriterError::Stopped))
            .map_err(WriterError::into_io)
    }

    fn stop(&self) -> Result<(), WriterError> {
        drop(self.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        match thread {
            Some(t) => t.join().unwrap_or(Err(WriterError::Panicked)),
            None => Ok(()),
        }
    }
}

impl Sink for OrderedFile {
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.send(Msg::Now(offset, Bytes::copy_from_slice(data)))
    }
    fn zero(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn write_owned(&self, offset: u64, data: Bytes) -> io::Result<()> {
        self.send(Msg::Now(offset, data))
    }
    fn write_ordered(&self, job: u64, pieces: Vec<(u64, Bytes)>) -> io::Result<()> {
        self.send(Msg::Ordered(job, pieces))
    }
    fn finish(&self) -> io::Result<()> {
        self.stop().map_err(WriterError::into_io)
    }
}

impl Drop for OrderedFile {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The writer thread: until every sender is gone, take what is queued (at
/// most [`QUEUE`] messages a round), write the pieces that may be written
/// (ordered jobs only once their predecessors are), in gathered runs.
/// After an error it keeps taking (so no producer waits forever) and
/// writes nothing more.
fn run<T: Target>(
    mut target: T,
    rx: Receiver<Msg>,
    failed: &AtomicBool,
) -> Result<(), WriterError> {
    let mut waiting: BTreeMap<u64, Vec<(u64, Bytes)>> = BTreeMap::new();
    let mut next = 0u64;
    let mut error = None;
    // The ordered pieces written since writeback was last started.
    let mut unhinted: Option<(u64, u64)> = None;
    while let Ok(first) = rx.recv() {
        let (mut now, mut ordered) = (Vec::new(), Vec::new());
        let mut take = |m: Msg| match m {
            Msg::Now(offset, data) => now.push((offset, data)),
            Msg::Ordered(job, pieces) => {
                waiting.insert(job, pieces);
                while let Some(p) = waiting.remove(&next) {
                    ordered.extend(p);
                    next += 1;
                }
            }
        };
        take(first);
        for m in rx.try_iter().take(QUEUE - 1) {
            take(m);
        }
        if error.is_some() {
            continue;
        }
        let r = write_batch(&mut target, &now).and_then(|()| {
            for (offset, data) in &now {
                if data.len() as u64 >= WRITE_BACK_SOON {
                    target.write_back(*offset, data.len() as u64);
                }
            }
            write_batch(&mut target, &ordered)
        });
        if let Err(e) = r {
            failed.store(true, Ordering::Release);
            error = Some(e);
            continue;
        }
        // Ordered pieces ascend: writeback of the span they were written
        // in, a window at a time (large requests, in disk order).
        if let (Some(a), Some(b)) = (ordered.first(), ordered.last()) {
            let end = b.0 + b.1.len() as u64;
            let start = unhinted.map_or(a.0, |u| u.0);
            unhinted = Some((start, end));
            if end - start >= WINDOW {
                target.write_back(start, end - start);
                unhinted = None;
            }
        }
    }
    if let (None, Some((start, end))) = (&error, unhinted) {
        target.write_back(start, end - start);
    }
    match error {
        Some(e) => Err(e),
        None if !waiting.is_empty() => Err(WriterError::Unwritten { next }),
        None => Ok(()),
    }
}

/// Write `batch` in its order, pieces that follow on on the disk gathered
/// into one write (at most [`GATHER`] bytes, [`MAX_IOV`] pieces).
fn write_batch<T: Target>(target: &mut T, batch: &[(u64, Bytes)]) -> Result<(), WriterError> {
    let mut i = 0;
    while i < batch.len() {
        let start = batch[i].0;
        let mut end = start + batch[i].1.len() as u64;
        let mut j = i + 1;
        while j < batch.len()
            && j - i < MAX_IOV
            && batch[j].0 == end
            && end + batch[j].1.len() as u64 - start <= GATHER
        {
            end += batch[j].1.len() as u64;
            j += 1;
        }
        let bufs: Vec<&[u8]> = batch[i..j].iter().map(|(_, b)| &b[..]).collect();
        target
            .write_at(start, &bufs)
            .map_err(|source| WriterError::Write {
                offset: start,
                len: end - start,
                source,
            })?;
        i = j;
    }
    Ok(())
}

#[cfg(test)]
#[path = "writer_tests.rs"]
mod tests;
