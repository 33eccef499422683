//! Whole baseline chunks, decoded and checked, gathered in disk order into
//! runs of [`RUN_LEN`] bytes that [`WRITERS`] writers give to a sink that asks for
//! it ([`Sink::gathers`]: [`super::DirectFile`]). The device then gets a
//! few large requests instead of many 1 MiB ones from a dozen threads
//! contending on the file's lock.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::aligned::AlignedBuf;
use super::execute::Progress;
use super::sink::Sink;

/// The bytes of one run: written with one `pwritev`, split by the block
/// layer into requests of the device's largest size (`max_sectors_kb`, 4 MiB
/// here), two of them in flight at once.
pub const RUN_LEN: u64 = 8 << 20;

/// Runs waiting for a writer, beyond the ones being written: the decoding
/// threads keep going while the device is busy.
const QUEUED: usize = 2;

/// Writers, each with one run (two device requests) in flight: the device
/// always has a request queued, also between one run and the next, and
/// holds its own against other processes' writeback.
const WRITERS: usize = 2;

/// Consecutive pieces of the disk, from `start`.
struct Run {
    start: u64,
    len: u64,
    bufs: Vec<AlignedBuf>,
}

/// The gathering side (the task that receives decoded chunks in disk order)
/// and its [`WRITERS`] writers, threads of the blocking pool.
pub struct Gather {
    tx: Option<mpsc::Sender<Run>>,
    run: Option<Run>,
    writers: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Gather {
    /// Start the writers for `sink`; `progress` is told of every byte once
    /// it is written.
    pub fn start(sink: Arc<dyn Sink>, progress: Option<Progress>) -> Gather {
        let (tx, rx) = mpsc::channel::<Run>(QUEUED);
        let rx = Arc::new(std::sync::Mutex::new(rx));
        let writers = (0..WRITERS)
            .map(|_| {
                let (rx, sink, progress) = (rx.clone(), sink.clone(), progress.clone());
                tokio::task::spawn_blocking(move || loop {
                    // One writer waits for the next run while the other writes.
                    let next = rx.lock().unwrap_or_else(|p| p.into_inner()).blocking_recv();
                    let Some(run) = next else { return Ok(()) };
                    if let Err(e) = sink.write_gathered(run.start, &run.bufs) {
                        // The senders see the channel closed and stop.
                        rx.lock().unwrap_or_else(|p| p.into_inner()).close();
                        return Err(e);
                    }
                    if let Some(p) = &progress {
                        p(run.len)
                    }
                })
            })
            .collect();
        Gather {
            tx: Some(tx),
            run: None,
            writers,
        }
    }

    /// Add `buf`, the disk's bytes at `offset`: appended to the current run
    /// if it follows on, else the run is sent and a new one begun. False if
    /// a writer has stopped (a write failed: [`Gather::finish`] says why).
    pub async fn push(&mut self, offset: u64, buf: AlignedBuf) -> bool {
        let len = buf.len() as u64;
        match &mut self.run {
            Some(r) if r.start + r.len == offset && r.len + len <= RUN_LEN => {
                r.len += len;
                r.bufs.push(buf);
            }
            _ => {
                let new = Run {
                    start: offset,
                    len,
                    bufs: vec![buf],
                };
                if let Some(full) = self.run.replace(new) {
                    if !self.send(full).await {
                        return false;
                    }
                }
            }
        }
        match &self.run {
            Some(r) if r.len >= RUN_LEN => {
                let full = self.run.take().expect("just matched");
                self.send(full).await
            }
            _ => true,
        }
    }

    async fn send(&mut self, run: Run) -> bool {
        match &self.tx {
            Some(tx) => tx.send(run).await.is_ok(),
            None => false,
        }
    }

    /// Send what is gathered, wait for the writers to write everything, and
    /// return its first error.
    pub async fn finish(mut self) -> std::io::Result<()> {
        if let Some(run) = self.run.take() {
            // If a writer has stopped, its error is below.
            let _ = self.send(run).await;
        }
        drop(self.tx.take());
        let mut first = Ok(());
        for w in self.writers.drain(..) {
            let r = w.await.expect("restore writer panicked");
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records gathered runs; fails every write at or after `fail_at`.
    struct Runs {
        got: Mutex<Vec<(u64, Vec<u8>)>>,
        fail_at: u64,
    }

    impl Sink for Runs {
        fn write(&self, _offset: u64, _data: &[u8]) -> std::io::Result<()> {
            unreachable!("gathered chunks come through write_gathered")
        }
        fn zero(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn write_gathered(&self, offset: u64, bufs: &[AlignedBuf]) -> std::io::Result<()> {
            if offset >= self.fail_at {
                return Err(std::io::Error::other("disk full"));
            }
            let data = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            self.got.lock().unwrap().push((offset, data));
            Ok(())
        }
    }

    fn chunk(i: u64) -> AlignedBuf {
        let mut b = AlignedBuf::take(1 << 20);
        b.fill(i as u8 + 1);
        b
    }

    /// Chunks 0..20 but 12 (covered by the journal): runs of at most
    /// RUN_LEN, broken at the gap, every chunk once with its bytes, and
    /// progress told of every byte.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunks_become_runs_and_are_all_written() {
        let sink = Arc::new(Runs {
            got: Mutex::new(Vec::new()),
            fail_at: u64::MAX,
        });
        let told = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let t = told.clone();
        let progress: Progress = Arc::new(move |n| {
            t.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        });
        let mut g = Gather::start(sink.clone(), Some(progress));
        let mb = 1u64 << 20;
        for i in (0..20).filter(|&i| i != 12) {
            assert!(g.push(i * mb, chunk(i)).await);
        }
        g.finish().await.unwrap();
        let mut got = sink.got.lock().unwrap().clone();
        got.sort_by_key(|r| r.0);
        let runs: Vec<(u64, u64)> = got.iter().map(|r| (r.0, r.1.len() as u64)).collect();
        assert_eq!(runs, vec![(0, 8 * mb), (8 * mb, 4 * mb), (13 * mb, 7 * mb)]);
        for (at, data) in &got {
            for (k, c) in data.chunks(mb as usize).enumerate() {
                let i = at / mb + k as u64;
                assert!(c.iter().all(|&b| b == i as u8 + 1), "chunk {i}");
            }
        }
        assert_eq!(told.load(std::sync::atomic::Ordering::Relaxed), 19 * mb);
    }

    /// A failed write stops the gathering and finish() reports it: a
    /// restore never ends Ok with chunks not written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_write_is_reported() {
        let mb = 1u64 << 20;
        let sink = Arc::new(Runs {
            got: Mutex::new(Vec::new()),
            fail_at: 8 * mb,
        });
        let mut g = Gather::start(sink, None);
        for i in 0..64 {
            if !g.push(i * mb, chunk(i)).await {
                break;
            }
        }
        let e = g.finish().await.unwrap_err();
        assert_eq!(e.to_string(), "disk full");
    }
}
