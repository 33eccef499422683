//! The image helper of a disk: one persistent thread that writes a large
//! batch's changes to the image while the connection thread appends the same
//! batch to the journal, and syncs the image while the sync thread syncs the
//! journal files (docs/DESIGN.md, "Write path"; issue 13).
//!
//! An apply job is handed over and waited for under the disk lock the
//! connection thread holds, so the image's write order stays the sequence
//! order. Writing the image before the record is in the journal file is
//! safe: both are in the page cache until a FLUSH, the activity log covered
//! the extents before either write (a power loss), and an append that fails
//! enters degraded mode, whose dirty map covers the batch's writes, before
//! the batch is answered. No reply leaves before both writes are done.
//!
//! The thread is started at the first job, lives as long as the disk and
//! takes one job at a time: a caller that finds it busy does the work
//! itself. A job borrows the caller's disk, batch and buffer; the caller's
//! [`Pending`] waits for the job to end before those borrows end, on every
//! path (its `Drop` waits too).

use std::io;
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use cdp_core::nbd::proto::errno;

use super::batch::Batch;
use super::Disk;

/// Below this many WRITE payload bytes a batch is applied inline: handing
/// it over costs a wake-up (tens of µs) that a small batch does not repay.
pub(crate) const OVERLAP_MIN_BYTES: u64 = 256 << 10;

/// The helper of one disk (not started until first used).
#[derive(Default)]
pub(crate) struct Applier {
    /// `None` inside: the thread could not be started; everything inline.
    shared: OnceLock<Option<Arc<Shared>>>,
}

struct Shared {
    slot: Mutex<Slot>,
    posted: Condvar,
    done: Condvar,
}

#[derive(Default)]
struct Slot {
    job: Option<Job>,
    /// The job ended; its results are below.
    finished: bool,
    stop: bool,
    /// An apply job's failed requests: (index in the batch, NBD error).
    errors: Vec<(usize, u32)>,
    /// A sync job's failure.
    sync_err: Option<io::Error>,
}

#[derive(Clone, Copy)]
enum Job {
    Apply {
        disk: *const Disk,
        batch: *const Batch,
        buf: *const u8,
        len: usize,
    },
    SyncImage {
        disk: *const Disk,
    },
}

// SAFETY: a job's pointers are borrows of the thread that posted it, held by
// its `Pending` (which cannot outlive them) until the job is finished; the
// helper only reads through them (`Disk` and `Batch` are `Sync`), and only
// between taking the job and marking it finished.
unsafe impl Send for Job {}

/// A job handed to the helper; waits for it when dropped.
pub(crate) struct Pending<'a> {
    shared: &'a Shared,
    waited: bool,
    _borrows: PhantomData<(&'a Disk, &'a Batch, &'a [u8])>,
}

/// What an apply job found: the failed requests.
pub(crate) type ApplyErrors = Vec<(usize, u32)>;

impl Applier {
    /// Hand the image writes of `batch` to the helper, or `None` (do them
    /// inline) if it is busy or cannot be started.
    pub fn start_apply<'a>(
        &'a self,
        disk: &'a Disk,
        batch: &'a Batch,
        buf: &'a [u8],
    ) -> Option<Pending<'a>> {
        self.post(
            disk,
            Job::Apply {
                disk,
                batch,
                buf: buf.as_ptr(),
                len: buf.len(),
            },
        )
    }

    /// Hand the image's `fdatasync` to the helper, or `None`.
    pub fn start_sync<'a>(&'a self, disk: &'a Disk) -> Option<Pending<'a>> {
        self.post(disk, Job::SyncImage { disk })
    }

    fn post<'a>(&'a self, disk: &Disk, job: Job) -> Option<Pending<'a>> {
        let shared = self.shared.get_or_init(|| spawn(&disk.name)).as_deref()?;
        let mut s = shared.slot.try_lock().ok()?;
        if s.job.is_some() || s.finished {
            return None;
        }
        s.job = Some(job);
        drop(s);
        shared.posted.notify_one();
        Some(Pending {
            shared,
            waited: false,
            _borrows: PhantomData,
        })
    }
}

impl Drop for Applier {
    fn drop(&mut self) {
        if let Some(Some(shared)) = self.shared.get() {
            lock(&shared.slot).stop = true;
            shared.posted.notify_one();
        }
    }
}

impl Pending<'_> {
    fn wait_slot(&mut self) -> MutexGuard<'_, Slot> {
        self.waited = true;
        let mut s = lock(&self.shared.slot);
        while !s.finished {
            s = self.shared.done.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.finished = false;
        s
    }

    /// Wait for an apply job: the requests whose image write failed.
    pub fn wait_apply(mut self) -> ApplyErrors {
        std::mem::take(&mut self.wait_slot().errors)
    }

    /// Wait for a sync job.
    pub fn wait_sync(mut self) -> io::Result<()> {
        match self.wait_slot().sync_err.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.waited {
            drop(self.wait_slot());
        }
    }
}

fn lock(m: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn spawn(disk: &str) -> Option<Arc<Shared>> {
    let shared = Arc::new(Shared {
        slot: Mutex::new(Slot::default()),
        posted: Condvar::new(),
        done: Condvar::new(),
    });
    let s = shared.clone();
    std::thread::Builder::new()
        .name(format!("image-{disk}"))
        .spawn(move || run(&s))
        .ok()
        .map(|_| shared)
}

/// The helper's loop: one job at a time until the disk is dropped.
fn run(shared: &Shared) {
    let mut s = lock(&shared.slot);
    loop {
        if s.stop {
            return;
        }
        let Some(job) = s.job else {
            s = shared.posted.wait(s).unwrap_or_else(|e| e.into_inner());
            continue;
        };
        let mut errors = std::mem::take(&mut s.errors);
        errors.clear();
        drop(s);
        let mut sync_err = None;
        // SAFETY: see `impl Send for Job`: the poster's `Pending` keeps
        // these borrows alive until `finished` is set below.
        let ran = catch_unwind(AssertUnwindSafe(|| unsafe {
            match job {
                Job::Apply {
                    disk,
                    batch,
                    buf,
                    len,
                } => {
                    let buf = std::slice::from_raw_parts(buf, len);
                    super::apply_reqs(&*disk, &(*batch).reqs, buf, &mut errors);
                }
                Job::SyncImage { disk } => sync_err = (*disk).image.sync_data().err(),
            }
        }));
        if ran.is_err() {
            // Nothing known about the image: every request of the job failed.
            match job {
                Job::Apply { batch, .. } => {
                    // SAFETY: as above, still before `finished`.
                    let n = unsafe { (*batch).reqs.len() };
                    errors = (0..n).map(|i| (i, errno::EIO)).collect();
                }
                Job::SyncImage { .. } => sync_err = Some(io::Error::other("image sync panicked")),
            }
        }
        s = lock(&shared.slot);
        s.job = None;
        s.errors = errors;
        s.sync_err = sync_err;
        s.finished = true;
        shared.done.notify_one();
    }
}

#[cfg(test)]
impl Applier {
    /// Has the helper thread been started?
    fn started(&self) -> bool {
        matches!(self.shared.get(), Some(Some(_)))
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Duration;

    use cdp_core::catalog::Catalog;
    use cdp_core::config::JournalSettings;
    use cdp_core::image::Image;
    use cdp_core::journal::{self, Upto};
    use cdp_core::layout::StateDir;
    use cdp_core::nbd::proto::{self, Request, Verdict};

    use super::super::batch::{Batch, Req};
    use super::super::{DiskSetup, Vm, VmSetup};
    use super::OVERLAP_MIN_BYTES;

    const UUID: &str = "6d0b3a5e-7c4e-4b8e-9d51-2f0c5b8a1e01";
    const SIZE: u64 = 4 << 20;

    fn vm(dir: &std::path::Path, writable: bool) -> Arc<Vm> {
        vm_with(dir, writable, JournalSettings::default().segment_size)
    }

    fn vm_with(dir: &std::path::Path, writable: bool, segment_size: u64) -> Arc<Vm> {
        let settings = JournalSettings {
            segment_size,
            segment_age: Duration::from_secs(3600),
            ..JournalSettings::default()
        };
        vm_opts(dir, writable, settings, false)
    }

    /// A VM of one disk whose image is written whole (7s) or `sparse` (no
    /// block allocated).
    fn vm_opts(
        dir: &std::path::Path,
        writable: bool,
        settings: JournalSettings,
        sparse: bool,
    ) -> Arc<Vm> {
        let img = dir.join("disk.raw");
        if sparse {
            File::create(&img).unwrap().set_len(SIZE).unwrap();
        } else {
            std::fs::write(&img, vec![7u8; SIZE as usize]).unwrap();
        }
        let file = File::options()
            .read(true)
            .write(writable)
            .open(&img)
            .unwrap();
        let state_dir = dir.join("state");
        let journal_dir = StateDir::new(&state_dir).journal(UUID, "vda");
        std::fs::create_dir_all(&journal_dir).unwrap();
        let catalog = Catalog::open(&state_dir, UUID).unwrap();
        catalog.upsert_vm(UUID, "test").unwrap();
        catalog.upsert_disk(UUID, "vda", &img, SIZE).unwrap();
        let (vm, _rxs) = Vm::new(VmSetup {
            uuid: uuid::Uuid::parse_str(UUID).unwrap(),
            name: "test".into(),
            disks: vec![DiskSetup {
                name: "vda".into(),
                path: img.clone(),
                image: Image {
                    file,
                    size: SIZE,
                    block_device: false,
                },
                journal_dir,
                next_base: 0,
                last_seq: 0,
            }],
            settings,
            catalog,
            state_dir,
            run_dir: dir.join("run"),
            last_seq: 0,
            last_ts: 0,
        });
        vm
    }

    /// A batch of `(kind, offset, data or length)`, payloads laid out in `buf`.
    fn batch(reqs: &[(u16, u64, usize)], buf: &mut Vec<u8>) -> Batch {
        let mut b = Batch::default();
        for (i, &(kind, offset, len)) in reqs.iter().enumerate() {
            let at = buf.len();
            if kind == proto::CMD_WRITE {
                buf.extend((0..len).map(|j| (i * 31 + j % 249) as u8));
            }
            let r = Request {
                flags: 0,
                kind,
                cookie: i as u64,
                offset,
                len: len as u32,
            };
            b.reqs.push(Req::new(&r, Verdict::Ok, at));
        }
        b
    }

    /// A batch past the threshold goes to the helper thread while it is
    /// journaled; a smaller one does not start it. The image equals the
    /// journal replayed, and every request keeps its own result.
    #[test]
    fn a_large_batch_is_applied_on_the_helper_and_replays_to_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let vm = vm(dir.path(), true);
        let disk = &vm.disks[0];
        let mut buf = Vec::new();
        let mut small = batch(&[(proto::CMD_WRITE, 0, 4096)], &mut buf);
        vm.journal_and_apply(disk, &mut small, &buf);
        assert!(!disk.applier.started(), "a small batch is applied inline");

        let big = OVERLAP_MIN_BYTES as usize;
        let mut buf = Vec::new();
        let mut b = batch(
            &[
                (proto::CMD_WRITE, 8192, big),
                (proto::CMD_FLUSH, 0, 0),
                (proto::CMD_WRITE_ZEROES, 2 << 20, 65536),
                (proto::CMD_WRITE, 3 << 20, 4096),
            ],
            &mut buf,
        );
        vm.journal_and_apply(disk, &mut b, &buf);
        assert!(disk.applier.started(), "the large batch went to the helper");
        assert!(b.reqs.iter().all(|r| r.result == 0), "{:?}", b.reqs);
        let image = std::fs::read(&disk.path).unwrap();
        assert!(image[8192..8192 + big] == buf[..big]);
        assert!(image[2 << 20..(2 << 20) + 65536].iter().all(|&x| x == 0));
        assert!(image[3 << 20..(3 << 20) + 4096] == buf[big..]);

        // The journal replayed onto the initial image gives the image.
        vm.seal_pass(true);
        let copy = dir.path().join("replayed.raw");
        std::fs::write(&copy, vec![7u8; SIZE as usize]).unwrap();
        let f = File::options().read(true).write(true).open(&copy).unwrap();
        let state = dir.path().join("state");
        let stats = journal::replay_disk(&state, UUID, "vda", &f, &copy, Upto::All).unwrap();
        assert_eq!(stats.records_applied, 4);
        assert!(std::fs::read(&copy).unwrap() == image);
        // A checkpoint syncs the image on the helper.
        super::super::make_durable(disk, true).unwrap();
    }

    /// On a read-only image every change of a large batch fails on the
    /// helper, and each failure lands in its own request (the FLUSH
    /// between them does not fail).
    #[test]
    fn failures_on_the_helper_reach_their_requests() {
        let dir = tempfile::tempdir().unwrap();
        let vm = vm(dir.path(), false);
        let disk = &vm.disks[0];
        let mut buf = Vec::new();
        let mut b = batch(
            &[
                (proto::CMD_WRITE, 0, OVERLAP_MIN_BYTES as usize),
                (proto::CMD_FLUSH, 0, 0),
                (proto::CMD_WRITE, 1 << 20, 4096),
            ],
            &mut buf,
        );
        vm.journal_and_apply(disk, &mut b, &buf);
        assert!(disk.applier.started());
        let results: Vec<u32> = b.reqs.iter().map(|r| r.result).collect();
        assert!(
            results[0] != 0 && results[1] == 0 && results[2] != 0,
            "{results:?}"
        );
        assert!(std::fs::read(&disk.path).unwrap().iter().all(|&x| x == 7));
        // The new segment's name waits for the next FLUSH (or seal).
        assert!(disk.lock_journal().names_unsynced());
        super::super::make_durable(disk, false).unwrap();
        assert!(!disk.lock_journal().names_unsynced());
    }

    /// A new segment's name is made durable by the sealer's next pass while
    /// the segment is open, not at its seal: the seal of a segment whose
    /// name is durable syncs the directory no more, even when its successor
    /// (created after the switch) is not synced yet.
    #[test]
    fn a_segment_name_is_synced_while_open_and_its_seal_does_not_sync_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let vm = vm_with(dir.path(), true, 64 << 10);
        let disk = &vm.disks[0];
        let write = |i: u64| {
            let mut buf = Vec::new();
            let mut b = batch(&[(proto::CMD_WRITE, i * (40 << 10), 40 << 10)], &mut buf);
            vm.journal_and_apply(disk, &mut b, &buf);
            assert_eq!(b.reqs[0].result, 0);
        };
        let syncs = || disk.stats.name_syncs.load(Ordering::Relaxed);
        write(0);
        assert!(disk.lock_journal().names_unsynced());
        vm.seal_pass(false);
        assert!(!disk.lock_journal().names_unsynced(), "synced while open");
        assert_eq!(syncs(), 1);
        // The second write fills the segment, the third opens the next one:
        // the first one's seal needs no sync, the successor's name gets one.
        write(1);
        write(2);
        assert!(disk.lock_journal().names_unsynced());
        vm.seal_pass(false);
        assert_eq!(
            vm.catalog.lock().unwrap().segments(UUID).unwrap().len(),
            1,
            "the full segment is sealed"
        );
        assert_eq!(syncs(), 2, "one sync for the successor, none for the seal");
        assert!(!disk.lock_journal().names_unsynced());
        vm.seal_pass(true);
        assert_eq!(syncs(), 2, "every name was durable already");
    }

    /// A segment sealed by age starts the image's writeback when the image
    /// is sparse (its writeback may allocate blocks, which every sync on
    /// the file system would wait for), not when every block is allocated.
    #[test]
    fn a_seal_by_age_starts_the_writeback_of_a_sparse_image_only() {
        for sparse in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let settings = JournalSettings {
                segment_size: 64 << 10,
                segment_age: Duration::from_millis(1),
                ..JournalSettings::default()
            };
            let vm = vm_opts(dir.path(), true, settings, sparse);
            let disk = &vm.disks[0];
            let write = |i: u64, len: usize| {
                let mut buf = Vec::new();
                let mut b = batch(&[(proto::CMD_WRITE, i * (40 << 10), len)], &mut buf);
                vm.journal_and_apply(disk, &mut b, &buf);
                assert_eq!(b.reqs[0].result, 0);
            };
            let kicks = || disk.stats.image_writebacks.load(Ordering::Relaxed);
            // The second write switches the first segment out full; the
            // third joins it in the next, which ages.
            write(0, 40 << 10);
            write(1, 40 << 10);
            write(2, 4096);
            std::thread::sleep(Duration::from_millis(5));
            let sealed = || vm.catalog.lock().unwrap().segments(UUID).unwrap().len();
            vm.seal_pass(false);
            assert_eq!(sealed(), 2, "the full one and the aged one");
            assert_eq!(kicks(), u64::from(sparse), "sparse: {sparse}");
        }
    }

    /// The sealer leaves at most `journal_cache` bytes of the newest sealed
    /// segments in the page cache and drops the pages of older ones (which
    /// pages stay cached is checked on the real cdpd, in
    /// `tests/tests/segments.rs`); a segment trimmed before its turn is not
    /// counted; the journal replays the same.
    #[test]
    fn the_journal_cache_drops_older_segments_and_counts_only_those_still_there() {
        let dir = tempfile::tempdir().unwrap();
        let settings = JournalSettings {
            segment_size: 256 << 10,
            segment_age: Duration::from_secs(3600),
            journal_cache: 400 << 10,
            ..JournalSettings::default()
        };
        let vm = vm_opts(dir.path(), true, settings, false);
        let disk = &vm.disks[0];
        // Each write fills a segment, which is switched out after it.
        for i in 0..4u64 {
            let mut buf = Vec::new();
            let mut b = batch(&[(proto::CMD_WRITE, i * (300 << 10), 300 << 10)], &mut buf);
            vm.journal_and_apply(disk, &mut b, &buf);
            assert_eq!(b.reqs[0].result, 0);
        }
        vm.seal_pass(false);
        let segs = vm.catalog.lock().unwrap().segments(UUID).unwrap();
        assert_eq!(segs.len(), 4);
        assert_eq!(disk.stats.segments_uncached.load(Ordering::Relaxed), 3);
        let newest = disk
            .journal_dir
            .join(journal::segment_file_name(segs[3].first_seq));
        let copy = dir.path().join("copy.raw");
        let f = File::create(&copy).unwrap();
        f.set_len(SIZE).unwrap();
        let state = dir.path().join("state");
        journal::replay_disk(&state, UUID, "vda", &f, &copy, Upto::All).unwrap();
        let img = std::fs::read(&disk.path).unwrap();
        let got = std::fs::read(&copy).unwrap();
        assert!(got[..1200 << 10] == img[..1200 << 10]);
        // A segment trimmed (by a shipper) before its turn is not counted.
        std::fs::remove_file(&newest).unwrap();
        let mut buf = Vec::new();
        let mut b = batch(&[(proto::CMD_WRITE, 0, 300 << 10)], &mut buf);
        vm.journal_and_apply(disk, &mut b, &buf);
        vm.seal_pass(true);
        assert_eq!(disk.stats.segments_uncached.load(Ordering::Relaxed), 3);
    }

    /// Once a segment fills up while the disk is busy, the sealer prepares
    /// the file of the one after; the next switch takes it (the segment
    /// names follow the records, no temporary file is seen as a segment),
    /// and a stop removes a spare left unused.
    #[test]
    fn the_sealer_prepares_the_next_segment_and_a_stop_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let vm = vm_with(dir.path(), true, 64 << 10);
        let disk = &vm.disks[0];
        let jdir = disk.journal_dir.clone();
        let write = |i: u64| {
            let mut buf = Vec::new();
            let mut b = batch(&[(proto::CMD_WRITE, i * (40 << 10), 40 << 10)], &mut buf);
            vm.journal_and_apply(disk, &mut b, &buf);
            assert_eq!(b.reqs[0].result, 0);
        };
        let spare = || disk.lock_journal().spare.is_some();
        // Two writes fill a segment; the third opens the next.
        write(0);
        write(1);
        write(2);
        vm.seal_pass(false);
        assert!(spare(), "a segment filled up while the next one is open");
        write(3);
        write(4);
        assert!(!spare(), "the switch took the spare");
        vm.seal_pass(false);
        assert!(spare());
        vm.seal_pass(true);
        assert!(!spare());
        let mut names: Vec<String> = std::fs::read_dir(&jdir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(
            names
                .iter()
                .all(|n| journal::parse_segment_file_name(n).is_some()),
            "{names:?}"
        );
        let copy = dir.path().join("replayed.raw");
        std::fs::write(&copy, vec![7u8; SIZE as usize]).unwrap();
        let f = File::options().read(true).write(true).open(&copy).unwrap();
        let state = dir.path().join("state");
        let stats = journal::replay_disk(&state, UUID, "vda", &f, &copy, Upto::All).unwrap();
        assert_eq!(stats.records_applied, 5);
        assert!(std::fs::read(&copy).unwrap() == std::fs::read(&disk.path).unwrap());
    }
}
