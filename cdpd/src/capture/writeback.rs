//! The journal's writeback starter of a disk: one thread, started at the
//! first use, that asks the device to write each window of the open segment
//! the writer appended (docs/DESIGN.md, "Write path"; issue 13).
//!
//! `sync_file_range(SYNC_FILE_RANGE_WRITE)` waits while the device's queue
//! is full: on the writer's thread that wait held up the guest's writes
//! whenever the disk was busy (p99 latency of a 1 MiB write over a second on
//! a shared disk). Here it waits on its own thread. A window that finds the
//! queue of windows full is not started (the flusher or the seal's
//! `fdatasync` writes it): the writer never waits.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, OnceLock};

use cdp_core::journal::writer::start_writeback;

/// Windows waiting for the thread; more are dropped (see the module doc).
const QUEUE: usize = 16;

type Window = (Arc<File>, u64, u64);

/// The starter of one disk (not started until first used).
#[derive(Default)]
pub(crate) struct Writeback {
    /// `None` inside: the thread could not be started; windows are left to
    /// the flusher and the seal.
    tx: OnceLock<Option<Mutex<SyncSender<Window>>>>,
    /// Windows started by the thread.
    done: Arc<AtomicU64>,
}

impl Writeback {
    /// Have the device start writing `len` bytes of `file` at `offset`,
    /// without waiting for anything. Best effort.
    pub fn start(&self, disk: &str, window: Window) {
        let tx = self
            .tx
            .get_or_init(|| spawn(disk, self.done.clone()).map(Mutex::new));
        if let Some(tx) = tx {
            // Called under the disk lock: the mutex is never contended.
            let _ = tx.lock().unwrap().try_send(window);
        }
    }
}

fn spawn(disk: &str, done: Arc<AtomicU64>) -> Option<SyncSender<Window>> {
    let (tx, rx) = sync_channel(QUEUE);
    std::thread::Builder::new()
        .name(format!("cdpd-wb-{disk}"))
        .spawn(move || run(rx, &done))
        .ok()?;
    Some(tx)
}

/// Ends when the disk (the sender) is gone.
fn run(rx: Receiver<Window>, done: &AtomicU64) {
    for (file, offset, len) in rx {
        start_writeback(&file, offset, len);
        done.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::{Duration, Instant};

    /// Windows are started on the disk's own thread, the caller returning
    /// at once, and the file's bytes are unchanged.
    #[test]
    fn windows_are_started_on_the_disks_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg");
        let mut f = File::create(&path).unwrap();
        let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 253) as u8).collect();
        f.write_all(&data).unwrap();
        let f = Arc::new(f);
        let wb = Writeback::default();
        let n = 4u64;
        let w = data.len() as u64 / n;
        for i in 0..n {
            wb.start("vdq", (f.clone(), i * w, w));
        }
        let t = Instant::now();
        while wb.done.load(Ordering::Relaxed) < n {
            assert!(t.elapsed() < Duration::from_secs(30), "windows not started");
            std::thread::sleep(Duration::from_millis(2));
        }
        let on_thread = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
            .any(|c| c.trim() == "cdpd-wb-vdq");
        assert!(on_thread, "a thread of the disk's name started them");
        drop(wb);
        assert!(std::fs::read(&path).unwrap() == data);
    }
}
