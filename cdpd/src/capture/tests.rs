//! The capture pipeline in process: a [`Vm`] over a temporary state
//! directory, a connection's transmission phase over a socket pair, raw NBD
//! requests in, replies out, then the journal replayed onto a copy of the
//! initial image must give the image (docs/DESIGN.md, "Write path").

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cdp_core::catalog::Catalog;
use cdp_core::config::JournalSettings;
use cdp_core::image::Image;
use cdp_core::journal::{self, Kind, Upto};
use cdp_core::layout::StateDir;
use cdp_core::nbd::proto::{self, Request, CMD_FLAG_FUA};

use super::{DiskSetup, SyncJob, Vm, VmSetup};

const DISK_SIZE: u64 = 1 << 20;
const UUID: &str = "6d0b3a5e-7c4e-4b8e-9d51-2f0c5b8a1e01";

struct Rig {
    dir: tempfile::TempDir,
    vm: Arc<Vm>,
    sync_rx: Option<Receiver<SyncJob>>,
    sync: Option<JoinHandle<()>>,
    initial: Vec<u8>,
}

impl Rig {
    /// A VM with one disk `vda` of [`DISK_SIZE`] bytes (a pattern, so that
    /// zeroing shows), opened read-only when `read_only_image`.
    fn new(segment_size: u64, read_only_image: bool) -> Rig {
        Rig::sized(segment_size, read_only_image, DISK_SIZE)
    }

    fn sized(segment_size: u64, read_only_image: bool, disk_size: u64) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let initial: Vec<u8> = (0..disk_size).map(|i| (i % 251) as u8).collect();
        let img_path = dir.path().join("disk.raw");
        std::fs::write(&img_path, &initial).unwrap();
        let file = File::options()
            .read(true)
            .write(!read_only_image)
            .open(&img_path)
            .unwrap();
        let state_dir = dir.path().join("state");
        std::fs::create_dir(&state_dir).unwrap();
        let uuid = uuid::Uuid::parse_str(UUID).unwrap();
        let journal_dir = StateDir::new(&state_dir).journal(UUID, "vda");
        std::fs::create_dir_all(&journal_dir).unwrap();
        let catalog = Catalog::open(&state_dir, UUID).unwrap();
        catalog.upsert_vm(UUID, "test").unwrap();
        catalog
            .upsert_disk(UUID, "vda", &img_path, disk_size)
            .unwrap();
        let (vm, mut rxs) = Vm::new(VmSetup {
            uuid,
            name: "test".into(),
            disks: vec![DiskSetup {
                name: "vda".into(),
                path: img_path,
                image: Image {
                    file,
                    size: disk_size,
                    block_device: false,
                },
                journal_dir,
                next_base: 0,
                last_seq: 0,
            }],
            settings: JournalSettings {
                segment_size,
                segment_age: Duration::from_secs(3600),
                ..JournalSettings::default()
            },
            catalog,
            state_dir: state_dir.clone(),
            run_dir: dir.path().join("run"),
            last_seq: 0,
            last_ts: 0,
        });
        Rig {
            dir,
            vm,
            sync_rx: rxs.pop(),
            sync: None,
            initial,
        }
    }

    fn start_sync(&mut self) {
        let rx = self.sync_rx.take().expect("sync thread started once");
        let disk = self.vm.disks[0].clone();
        self.sync = Some(std::thread::spawn(move || Vm::sync_loop(&disk, rx)));
    }

    /// Serve the transmission phase on one end of a socket pair, after the
    /// client wrote `first` to the other end (so that it is all read in one
    /// go, as one batch). Returns the client's end.
    fn connect(&self, first: &[u8]) -> (UnixStream, JoinHandle<()>) {
        let (client, server) = UnixStream::pair().unwrap();
        (&client).write_all(first).unwrap();
        let vm = self.vm.clone();
        let h = std::thread::spawn(move || {
            let disk = vm.disks[0].clone();
            let wr = server.try_clone().unwrap();
            super::conn::transmit(&vm, &disk, server, wr, Duration::from_secs(30)).unwrap();
        });
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        (client, h)
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn image(&self) -> Vec<u8> {
        std::fs::read(&self.vm.disks[0].path).unwrap()
    }

    /// Seal everything, replay the journal onto the initial image, compare.
    fn check_invariant(&self) -> journal::ReplayStats {
        self.vm.seal_pass(true);
        let copy = self.dir.path().join("replayed.raw");
        std::fs::write(&copy, &self.initial).unwrap();
        let f = File::options().read(true).write(true).open(&copy).unwrap();
        let stats =
            journal::replay_disk(&self.state_dir(), UUID, "vda", &f, &copy, Upto::All).unwrap();
        assert!(
            std::fs::read(&copy).unwrap() == self.image(),
            "image != initial image + journal replayed in order"
        );
        stats
    }

    /// Every record of the journal, in order: (seq, ts, kind, offset, length).
    fn records(&self) -> Vec<(u64, u64, Kind, u64, u64)> {
        let dir = StateDir::new(self.state_dir()).journal(UUID, "vda");
        let mut out = Vec::new();
        for (_, p) in journal::list_segments(&dir).unwrap() {
            let seg = journal::LoadedSegment::load(&p).unwrap();
            for r in &seg.scan.records {
                let h = &r.header;
                out.push((h.seq, h.ts_ns, h.kind, h.offset, h.length));
            }
        }
        out
    }
}

fn request(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    proto::encode_request(&Request {
        flags,
        kind,
        cookie,
        offset,
        len,
    })
    .to_vec()
}

fn write_req(cookie: u64, flags: u16, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut b = request(proto::CMD_WRITE, flags, cookie, offset, data.len() as u32);
    b.extend_from_slice(data);
    b
}

/// Read one simple reply: (error, cookie).
fn reply(s: &mut UnixStream) -> (u32, u64) {
    let mut b = [0u8; proto::SIMPLE_REPLY_LEN];
    s.read_exact(&mut b).unwrap();
    assert_eq!(
        u32::from_be_bytes(b[0..4].try_into().unwrap()),
        proto::SIMPLE_REPLY_MAGIC
    );
    (
        u32::from_be_bytes(b[4..8].try_into().unwrap()),
        u64::from_be_bytes(b[8..16].try_into().unwrap()),
    )
}

fn read_data(s: &mut UnixStream, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    s.read_exact(&mut b).unwrap();
    b
}

fn disconnect(mut s: UnixStream, h: JoinHandle<()>) {
    s.write_all(&request(proto::CMD_DISC, 0, 0, 0, 0)).unwrap();
    h.join().unwrap();
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(20), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn several_requests_in_one_read_are_one_batch_answered_in_order() {
    let mut rig = Rig::new(64 << 20, false);
    rig.start_sync();
    let mut wire = Vec::new();
    for i in 0..6u64 {
        wire.extend(write_req(i, 0, i * 4096, &[i as u8 + 1; 4096]));
    }
    wire.extend(request(proto::CMD_WRITE_ZEROES, 0, 6, 8192, 4096));
    wire.extend(request(proto::CMD_READ, 0, 7, 4096, 8192));
    // Refused by validation, answered in its place, not journaled.
    wire.extend(request(proto::CMD_READ, 0, 8, DISK_SIZE, 512));
    let (mut c, h) = rig.connect(&wire);

    for i in 0..7 {
        assert_eq!(reply(&mut c), (0, i));
    }
    assert_eq!(reply(&mut c), (0, 7));
    let data = read_data(&mut c, 8192);
    assert!(
        data[..4096] == [2; 4096],
        "the read sees the batch's writes"
    );
    assert!(data[4096..] == [0; 4096], "and its zeroing, in order");
    assert_eq!(reply(&mut c), (proto::errno::EINVAL, 8));
    disconnect(c, h);

    let recs = rig.records();
    assert_eq!(recs.len(), 7, "{recs:?}");
    // One batch: consecutive sequence numbers, one timestamp.
    let (seq0, ts0) = (recs[0].0, recs[0].1);
    for (i, r) in recs.iter().enumerate() {
        assert_eq!((r.0, r.1), (seq0 + i as u64, ts0), "{recs:?}");
    }
    assert_eq!((recs[6].2, recs[6].3, recs[6].4), (Kind::Zero, 8192, 4096));
    let st = &rig.vm.disks[0].stats;
    assert_eq!(
        st.write_requests.load(std::sync::atomic::Ordering::Relaxed),
        6
    );
    assert_eq!(st.in_flight.load(std::sync::atomic::Ordering::Relaxed), 0);
    rig.check_invariant();
}

#[test]
fn flush_and_fua_wait_for_the_sync_thread_and_may_be_answered_out_of_order() {
    let mut rig = Rig::new(64 << 20, false);
    let mut wire = write_req(1, CMD_FLAG_FUA, 0, &[7; 4096]);
    wire.extend(request(proto::CMD_FLUSH, 0, 2, 0, 0));
    wire.extend(request(proto::CMD_READ, 0, 3, 0, 512));
    wire.extend(write_req(4, 0, 4096, &[8; 512]));
    let (mut c, h) = rig.connect(&wire);

    // What needs no durability is answered at once, ahead of the FUA write
    // and the FLUSH that came before it; the plain WRITE once journaled,
    // ahead of the READ too (the rig's image, every block written, takes
    // writes in place).
    assert_eq!(reply(&mut c), (0, 4));
    assert_eq!(reply(&mut c), (0, 3));
    assert!(read_data(&mut c, 512) == [7; 512]);
    let disk = rig.vm.disks[0].clone();
    let in_flight = || {
        disk.stats
            .in_flight
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    wait_until("two requests waiting for the sync thread", || {
        in_flight() == 2
    });
    // Nothing else comes until the sync thread has run.
    c.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let early = c.read(&mut b);
    assert!(
        matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a reply came before the group commit: {early:?}"
    );
    c.set_nonblocking(false).unwrap();

    rig.start_sync();
    let mut late = [reply(&mut c), reply(&mut c)];
    late.sort();
    assert_eq!(late, [(0, 1), (0, 2)]);
    assert_eq!(
        disk.stats
            .flushes
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "both answered by one group commit"
    );
    assert_eq!(in_flight(), 0);
    disconnect(c, h);
    let kinds: Vec<Kind> = rig.records().iter().map(|r| r.2).collect();
    assert_eq!(kinds, [Kind::Write, Kind::Flush, Kind::Write]);
    rig.check_invariant();
}

#[test]
fn a_failed_image_write_is_an_error_to_the_client_and_journaled_as_the_image_is() {
    // The image cannot be written (opened read-only): the journal append
    // succeeds, the image write fails.
    let mut rig = Rig::new(64 << 20, true);
    rig.start_sync();
    let mut wire = write_req(1, 0, 0, &[9; 4096]);
    wire.extend(write_req(2, CMD_FLAG_FUA, 8192, &[10; 512]));
    wire.extend(request(proto::CMD_READ, 0, 3, 0, 4096));
    let (mut c, h) = rig.connect(&wire);

    let (err1, cookie1) = reply(&mut c);
    assert_eq!(cookie1, 1);
    assert_ne!(err1, 0, "the client is told the write failed");
    let (err2, cookie2) = reply(&mut c);
    assert_eq!(cookie2, 2);
    assert_ne!(
        err2, 0,
        "a failed FUA write is answered at once, with its error"
    );
    assert_eq!(reply(&mut c), (0, 3));
    assert!(read_data(&mut c, 4096) == rig.initial[..4096]);
    disconnect(c, h);

    // Each failed WRITE is followed by a WRITE of what the image holds.
    let recs = rig.records();
    let kinds: Vec<(Kind, u64)> = recs.iter().map(|r| (r.2, r.3)).collect();
    assert_eq!(
        kinds,
        [
            (Kind::Write, 0),
            (Kind::Write, 8192),
            (Kind::Write, 0),
            (Kind::Write, 8192)
        ]
    );
    assert!(rig.image() == rig.initial);
    let stats = rig.check_invariant();
    assert_eq!(stats.records_applied, 4);
    assert!(
        rig.vm.disks[0]
            .stats
            .errors
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}

/// A failed ZERO over 3 MiB and a bit is resynced in pieces of at most
/// 1 MiB (never a buffer the size of the request: a ZERO may cover 4 GiB),
/// and the journal still replays to the image.
#[test]
fn a_failed_large_zero_is_resynced_in_bounded_pieces() {
    let len = (3 << 20) + 4096;
    let mut rig = Rig::sized(64 << 20, true, 4 << 20);
    rig.start_sync();
    let wire = request(proto::CMD_WRITE_ZEROES, 0, 1, 4096, len as u32);
    let (mut c, h) = rig.connect(&wire);
    let (err, cookie) = reply(&mut c);
    assert_eq!(cookie, 1);
    assert_ne!(err, 0, "the client is told the zeroing failed");
    disconnect(c, h);
    let recs = rig.records();
    let (first, resync) = recs.split_first().unwrap();
    assert_eq!((first.2, first.3), (Kind::Zero, 4096));
    let pieces: Vec<(Kind, u64, u64)> = resync.iter().map(|r| (r.2, r.3, r.4)).collect();
    assert_eq!(
        pieces,
        [
            (Kind::Write, 4096, 1 << 20),
            (Kind::Write, 4096 + (1 << 20), 1 << 20),
            (Kind::Write, 4096 + (2 << 20), 1 << 20),
            (Kind::Write, 4096 + (3 << 20), 4096),
        ]
    );
    assert!(rig.image() == rig.initial);
    rig.check_invariant();
}

#[test]
fn a_batch_that_fills_the_segment_switches_to_the_next_one() {
    // 64 KiB segments; one batch of three 32 KiB writes goes over the size
    // in its middle: the batch stays in one segment, the next batch starts
    // a new segment that continues the chain.
    let mut rig = Rig::new(64 << 10, false);
    rig.start_sync();
    let mut wire = Vec::new();
    for i in 0..3u64 {
        wire.extend(write_req(i, 0, i * 32768, &[0x30 + i as u8; 32768]));
    }
    let (mut c, h) = rig.connect(&wire);
    for i in 0..3 {
        assert_eq!(reply(&mut c), (0, i));
    }
    {
        let st = rig.vm.disks[0].lock_journal();
        assert!(st.open.is_none(), "switched out after the batch");
        assert_eq!(st.to_seal.len(), 1);
        assert_eq!(st.to_seal[0].records(), 3);
        assert_eq!(st.next_base, 3);
    }
    c.write_all(&write_req(3, CMD_FLAG_FUA, 4096, &[0x40; 4096]))
        .unwrap();
    assert_eq!(reply(&mut c), (0, 3));
    {
        let st = rig.vm.disks[0].lock_journal();
        let open = st.open.as_ref().expect("a new open segment");
        assert_eq!((open.record_base, open.first_seq), (3, 4));
        assert_eq!(
            st.unsynced.len(),
            1,
            "the switched-out segment waits for the sealer"
        );
    }
    disconnect(c, h);
    let stats = rig.check_invariant();
    assert_eq!((stats.segments, stats.records_applied), (2, 4));
    let sealed = rig.vm.catalog.lock().unwrap().segments(UUID).unwrap();
    assert_eq!(sealed.len(), 2);
}

#[test]
fn a_flush_after_the_sync_thread_is_gone_is_answered_with_an_error() {
    let mut rig = Rig::new(64 << 20, false);
    // Dropping the receiver ends the "sync thread" before anything is sent.
    drop(rig.sync_rx.take());
    let (mut c, h) = rig.connect(&request(proto::CMD_FLUSH, 0, 5, 0, 0));
    assert_eq!(reply(&mut c), (proto::errno::ESHUTDOWN, 5));
    disconnect(c, h);
}

#[test]
fn writes_larger_than_the_window_are_read_alone_and_give_their_budget_back() {
    use super::conn::WINDOW;
    let size = 16u64 << 20;
    let mut rig = Rig::sized(64 << 20, false, size);
    rig.start_sync();
    // Small and large WRITEs in one stream; one large by a single byte.
    let lens = [
        4096,
        3 << 20,
        512,
        WINDOW - proto::REQUEST_LEN + 1,
        8192,
        5 << 20,
    ];
    let mut wire = Vec::new();
    let mut expect = rig.initial.clone();
    let mut off = 0usize;
    for (i, len) in lens.iter().enumerate() {
        let data: Vec<u8> = (0..*len).map(|j| (j * 7 + i) as u8).collect();
        wire.extend(write_req(i as u64, 0, off as u64, &data));
        expect[off..off + len].copy_from_slice(&data);
        off += len + 4096;
    }
    wire.extend(request(proto::CMD_READ, 0, 99, 0, off as u32));
    let (mut c, h) = rig.connect(&[]);
    let mut w = c.try_clone().unwrap();
    let sender = std::thread::spawn(move || w.write_all(&wire).unwrap());
    for i in 0..lens.len() as u64 {
        assert_eq!(reply(&mut c), (0, i));
    }
    assert_eq!(reply(&mut c), (0, 99));
    assert!(read_data(&mut c, off) == expect[..off], "read back differs");
    sender.join().unwrap();
    disconnect(c, h);
    assert_eq!(rig.vm.budget.used(), 0, "budget not given back");
    assert!(rig.image() == expect);
    rig.check_invariant();
}

#[test]
fn a_large_write_stalled_past_the_payload_timeout_ends_the_connection_and_frees_its_budget() {
    let rig = Rig::sized(64 << 20, false, 16 << 20);
    let (mut client, server) = UnixStream::pair().unwrap();
    let vm = rig.vm.clone();
    let h = std::thread::spawn(move || {
        let disk = vm.disks[0].clone();
        let wr = server.try_clone().unwrap();
        super::conn::transmit(&vm, &disk, server, wr, Duration::from_millis(300))
    });
    let len = 4u32 << 20;
    client
        .write_all(&request(proto::CMD_WRITE, 0, 1, 0, len))
        .unwrap();
    client.write_all(&vec![5u8; 3 << 20]).unwrap();
    wait_until("budget taken for the large WRITE", || {
        rig.vm.budget.used() > 0
    });
    let t = Instant::now();
    // Then nothing more: a byte short of a request, forever.
    wait_until("the connection ends", || h.is_finished());
    let r = h.join().unwrap();
    assert!(
        r.is_err(),
        "a stalled WRITE ended the connection without error"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(rig.vm.budget.used(), 0, "budget not given back");
    assert!(rig.records().is_empty(), "a partial WRITE was journaled");
}

fn mode(rig: &Rig) -> super::degraded::Mode {
    rig.vm.disks[0].lock_journal().deg.mode
}

/// Run the sealer's degraded-mode passes until the disk journals normally.
fn resync(rig: &Rig) {
    let mut buf = Vec::new();
    wait_until("the resync ends", || {
        rig.vm.degraded_pass(&mut buf);
        mode(rig) == super::degraded::Mode::Normal
    });
}

/// A failed sync of the journal poisons it (docs/RELIABILITY.md, "A full
/// journal"): the ranges of the records not yet sealed are marked dirty and
/// the disk runs degraded (guest writes still succeed), then only those
/// ranges are journaled again, and the invariant holds.
#[test]
fn a_poisoned_journal_marks_its_unsealed_ranges_and_resyncs_them() {
    use super::degraded::Mode;
    use std::sync::atomic::Ordering::Relaxed;
    let mut rig = Rig::new(64 << 20, false);
    rig.start_sync();
    let mut wire = write_req(1, 0, 0, &[1; 4096]);
    wire.extend(write_req(2, 0, 200_000, &[2; 512]));
    let (mut c, h) = rig.connect(&wire);
    assert_eq!((reply(&mut c), reply(&mut c)), ((0, 1), (0, 2)));
    let disk = rig.vm.disks[0].clone();
    super::degraded::poison(&disk, &std::io::Error::from_raw_os_error(5));
    assert_eq!(mode(&rig), Mode::Degraded);
    assert_eq!(
        disk.lock_journal().deg.dirty_bytes(),
        2 << 16,
        "granules 0 and 3"
    );
    let journaled = rig.records().len();
    // Degraded: taken, not journaled, and a FLUSH succeeds (image and map).
    c.write_all(&write_req(3, 0, 8192, &[3; 4096])).unwrap();
    c.write_all(&request(proto::CMD_FLUSH, 0, 4, 0, 0)).unwrap();
    assert_eq!((reply(&mut c), reply(&mut c)), ((0, 3), (0, 4)));
    assert_eq!(rig.records().len(), journaled);

    resync(&rig);
    assert_eq!(disk.stats.resync_bytes_read.load(Relaxed), 2 << 16);
    assert_eq!(disk.stats.resyncs_done.load(Relaxed), 1);
    disconnect(c, h);
    let kinds: Vec<Kind> = rig.records().iter().map(|r| r.2).collect();
    assert!(
        kinds.contains(&Kind::Gap) && kinds.contains(&Kind::Resynced),
        "{kinds:?}"
    );
    rig.check_invariant();
}

/// The room used up (journal_max or the free-space floor): the batch that
/// used it is journaled, the next ones are not, none fails.
#[test]
fn the_room_used_up_degrades_without_failing_a_write() {
    use super::degraded::Mode;
    let mut rig = Rig::new(64 << 20, false);
    rig.start_sync();
    rig.vm.disks[0].lock_journal().deg.room = 1000;
    let (mut c, h) = rig.connect(&write_req(1, 0, 0, &[1; 4096]));
    assert_eq!(reply(&mut c), (0, 1));
    assert_eq!(mode(&rig), Mode::Degraded);
    c.write_all(&write_req(2, CMD_FLAG_FUA, 1 << 19, &[2; 4096]))
        .unwrap();
    assert_eq!(reply(&mut c), (0, 2));
    assert_eq!(rig.vm.disks[0].lock_journal().deg.dirty_bytes(), 1 << 16);
    resync(&rig);
    disconnect(c, h);
    rig.check_invariant();
}

/// A failed sync of the image poisons too (docs/RELIABILITY.md, "A failed
/// sync"): the activity log's extents, every write not covered by a
/// successful sync round, are marked dirty and resynced.
#[test]
fn a_failed_image_sync_marks_the_activity_log_extents_and_resyncs_them() {
    use super::degraded::Mode;
    use std::sync::atomic::Ordering::Relaxed;
    let mut rig = Rig::new(64 << 20, false);
    rig.start_sync();
    let (mut c, h) = rig.connect(&write_req(1, 0, 4096, &[7; 4096]));
    assert_eq!(reply(&mut c), (0, 1));
    let disk = rig.vm.disks[0].clone();
    assert_eq!(disk.lock_journal().al.count(), 1, "logged before the image");
    super::degraded::poison_image(&disk, &std::io::Error::from_raw_os_error(5));
    assert_eq!(mode(&rig), Mode::Degraded);
    assert_eq!(
        disk.lock_journal().deg.dirty_bytes(),
        DISK_SIZE,
        "the log's one extent, clipped to the disk"
    );
    c.write_all(&request(proto::CMD_FLUSH, 0, 2, 0, 0)).unwrap();
    assert_eq!(reply(&mut c), (0, 2));
    resync(&rig);
    assert_eq!(disk.stats.resync_bytes_read.load(Relaxed), DISK_SIZE);
    disconnect(c, h);
    rig.check_invariant();
}

/// A FLUSH makes the journal durable, not the image (no checkpoint: the
/// activity log keeps its extent, the checkpoint stays); a checkpoint the
/// sealer asks for once due syncs the image, forgets the extents written
/// before it began, and records its seq in the activity log's header and
/// then in the catalog (docs/DESIGN.md, "Write path").
#[test]
fn a_flush_syncs_the_journal_and_a_checkpoint_the_image() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut rig = Rig::new(64 << 20, false);
    rig.start_sync();
    let disk = rig.vm.disks[0].clone();
    let mut wire = write_req(1, 0, 4096, &[7; 4096]);
    wire.extend(request(proto::CMD_FLUSH, 0, 2, 0, 0));
    let (mut c, h) = rig.connect(&wire);
    assert_eq!(reply(&mut c), (0, 1));
    assert_eq!(reply(&mut c), (0, 2));
    assert_eq!(disk.stats.flushes.load(Relaxed), 1);
    assert_eq!(disk.stats.checkpoints.load(Relaxed), 0, "the FLUSH");
    assert_eq!(disk.synced_seq.load(Relaxed), 0);
    let log = StateDir::new(rig.state_dir()).vm(UUID).activity_log("vda");
    assert_eq!(
        cdp_core::journal::dirty::DirtyMap::read_synced_seq(&log),
        None
    );
    // Not due yet: the sealer asks for nothing.
    rig.vm.seal_pass(false);
    assert!(!disk.lock_journal().ck.asked);
    // Due (as if the interval had passed): asked, made, then published.
    let last = disk.lock_journal().last_seq;
    disk.lock_journal().ck.at = Instant::now() - rig.vm.settings.checkpoint_interval;
    let next = rig.vm.seal_pass(false);
    // Asked, or done already: the sealer does not spin until it is done.
    assert!(next >= Duration::from_millis(100), "{next:?}");
    let until = Instant::now() + Duration::from_secs(20);
    while disk.synced_seq.load(Relaxed) < last {
        assert!(Instant::now() < until, "no checkpoint");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(disk.stats.checkpoints.load(Relaxed), 1);
    assert_eq!(
        disk.stats.flushes.load(Relaxed),
        1,
        "a checkpoint is no FLUSH"
    );
    assert_eq!(
        cdp_core::journal::dirty::DirtyMap::read_synced_seq(&log),
        Some(last)
    );
    let cat = || {
        rig.vm
            .catalog
            .lock()
            .unwrap()
            .image_synced(UUID, "vda")
            .unwrap()
    };
    // Published by the pass that asked, if done by then, or the next one.
    rig.vm.seal_pass(false);
    assert_eq!(cat(), Some(last));
    assert!(!disk.lock_journal().ck.asked);
    disconnect(c, h);
    rig.check_invariant();
}

/// A deterministic pseudo-random stream (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// An offset from `pick` for a change of `len` bytes that overlaps no READ
/// sent within the last 4 MiB of the wire (`at` is the wire's length now).
/// Requests in flight together have no order in NBD: a READ and a later
/// WRITE that land in one batch run changes first (docs/DESIGN.md, "Write
/// path"), so the test keeps them apart; a READ still sees every change
/// sent before it.
fn free_of(reads: &[(usize, u64, u64)], at: usize, len: u64, mut pick: impl FnMut() -> u64) -> u64 {
    loop {
        let off = pick();
        let clash = reads
            .iter()
            .rev()
            .take_while(|r| at - r.0 < 4 << 20)
            .any(|&(_, o, l)| off < o + l && o < off + len);
        if !clash {
            return off;
        }
    }
}

/// Large WRITEs are journaled on the connection's executor while the next
/// requests are read: a long stream of 256 KiB–1 MiB WRITEs mixed with
/// small ones, READs of what was just written, ZEROes and FLUSHes, sent in
/// pieces of random size (so a batch's last request is cut anywhere) while
/// the replies are read. Every reply comes in request order (FLUSHes may
/// come later), every READ sees every write sent before it (and, kept
/// apart by [`free_of`], none sent after it), and the image is the journal
/// replayed, across segment switches.
#[test]
fn large_writes_are_journaled_while_the_next_are_read_in_order() {
    const SIZE: u64 = 8 << 20;
    let mut rig = Rig::sized(3 << 20, false, SIZE);
    rig.start_sync();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut model = rig.initial.clone();
    let mut wire = Vec::new();
    // (cookie, the data its READ must return); FLUSH cookies apart.
    let mut expect: Vec<(u64, Option<Vec<u8>>)> = Vec::new();
    let mut flushes = Vec::new();
    // (wire position, offset, length) of the READs sent.
    let mut recent_reads: Vec<(usize, u64, u64)> = Vec::new();
    for cookie in 0..400u64 {
        let sector = 512u64;
        match rng.below(10) {
            0..=5 => {
                let len = if rng.below(4) == 0 {
                    4096
                } else {
                    (256 << 10) + rng.below(768 << 10) / sector * sector
                };
                let off = free_of(&recent_reads, wire.len(), len, || {
                    rng.below((SIZE - len) / sector) * sector
                });
                let fill = (cookie % 250 + 1) as u8;
                let data: Vec<u8> = (0..len).map(|i| fill ^ (i % 7) as u8).collect();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
                wire.extend(write_req(cookie, 0, off, &data));
                expect.push((cookie, None));
            }
            6 | 7 => {
                let len = 4096 * (1 + rng.below(16));
                let off = rng.below((SIZE - len) / sector) * sector;
                let want = model[off as usize..(off + len) as usize].to_vec();
                recent_reads.push((wire.len(), off, len));
                wire.extend(request(proto::CMD_READ, 0, cookie, off, len as u32));
                expect.push((cookie, Some(want)));
            }
            8 => {
                let len = 4096 * (1 + rng.below(64));
                let off = free_of(&recent_reads, wire.len(), len, || {
                    rng.below((SIZE - len) / sector) * sector
                });
                model[off as usize..(off + len) as usize].fill(0);
                wire.extend(request(proto::CMD_WRITE_ZEROES, 0, cookie, off, len as u32));
                expect.push((cookie, None));
            }
            _ => {
                wire.extend(request(proto::CMD_FLUSH, 0, cookie, 0, 0));
                flushes.push(cookie);
            }
        }
    }
    let (mut c, h) = rig.connect(&[]);
    let mut writer = c.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut rng = Rng(7);
        let mut at = 0;
        while at < wire.len() {
            let n = (1 + rng.below(300 << 10) as usize).min(wire.len() - at);
            writer.write_all(&wire[at..at + n]).unwrap();
            at += n;
        }
    });
    // Every request is answered once; READs in order, each seeing every
    // write sent before it. A plain WRITE may be answered ahead of a READ
    // sent before it in the same batch (answered once journaled: the rig's
    // image takes writes in place until the first WRITE_ZEROES).
    let mut flushed = Vec::new();
    let mut due: std::collections::HashMap<u64, Option<Vec<u8>>> = expect.into_iter().collect();
    let mut last_read = None;
    while !due.is_empty() || flushed.len() < flushes.len() {
        let (err, cookie) = reply(&mut c);
        assert_eq!(err, 0, "request {cookie} failed");
        if flushes.contains(&cookie) {
            flushed.push(cookie);
            continue;
        }
        let data = due
            .remove(&cookie)
            .unwrap_or_else(|| panic!("reply {cookie} not due"));
        if let Some(data) = data {
            assert!(last_read < Some(cookie), "READs out of order");
            last_read = Some(cookie);
            assert!(
                read_data(&mut c, data.len()) == *data,
                "READ {cookie} does not see the writes sent before it"
            );
        }
    }
    sender.join().unwrap();
    disconnect(c, h);
    assert!(rig.image() == model, "image != the writes in order");
    let handed = rig.vm.disks[0]
        .stats
        .pipelined_batches
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(handed >= 50, "only {handed} batches ran on the executor");
    let stats = rig.check_invariant();
    assert!(stats.segments >= 3, "{stats:?}");
}

fn early_acks(rig: &Rig) -> u64 {
    rig.vm.disks[0]
        .stats
        .early_acks
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// A plain WRITE is answered once journaled where the image takes writes
/// in place (every block of its 64 KiB granules allocated): the rig's
/// image has every block written. A TRIM, which may punch a hole there,
/// stops that for the granules it touched until a WRITE covers them whole
/// again (docs/DESIGN.md, "Write path", step 5).
#[test]
fn writes_are_answered_early_where_the_image_is_allocated() {
    const G: u64 = 64 << 10;
    let rig = Rig::new(64 << 20, false);
    let (mut c, h) = rig.connect(&write_req(1, 0, 0, &[1; 4096]));
    assert_eq!(reply(&mut c), (0, 1));
    assert_eq!(early_acks(&rig), 1);
    c.write_all(&request(proto::CMD_TRIM, 0, 2, G, G as u32))
        .unwrap();
    assert_eq!(reply(&mut c), (0, 2));
    c.write_all(&write_req(3, 0, G + 4096, &[3; 4096])).unwrap();
    assert_eq!(reply(&mut c), (0, 3));
    assert_eq!(
        early_acks(&rig),
        1,
        "into the trimmed granule: after its image write"
    );
    c.write_all(&write_req(4, 0, 2 * G, &[4; 4096])).unwrap();
    assert_eq!(reply(&mut c), (0, 4));
    assert_eq!(early_acks(&rig), 2, "the next granule is untouched");
    // The trimmed granule written whole: in place again.
    c.write_all(&write_req(5, 0, G, &[5; G as usize])).unwrap();
    assert_eq!(reply(&mut c), (0, 5));
    assert_eq!(early_acks(&rig), 2);
    c.write_all(&write_req(6, 0, G + 8192, &[6; 4096])).unwrap();
    assert_eq!(reply(&mut c), (0, 6));
    assert_eq!(early_acks(&rig), 3);
    // Every write is read back.
    c.write_all(&request(proto::CMD_READ, 0, 7, 0, 3 * G as u32))
        .unwrap();
    assert_eq!(reply(&mut c), (0, 7));
    let back = read_data(&mut c, 3 * G as usize);
    let mut want = rig.initial[..3 * G as usize].to_vec();
    want[..4096].fill(1);
    want[G as usize..2 * G as usize].fill(5);
    want[G as usize + 8192..G as usize + 12288].fill(6);
    want[2 * G as usize..2 * G as usize + 4096].fill(4);
    assert!(back == want);
    disconnect(c, h);
    let st = rig.vm.status();
    assert!(st.disks[0].writes_in_place);
    assert_eq!(st.disks[0].early_acks, 3);
    assert!(!st.disks[0].image_failed);
    rig.check_invariant();
}

/// An image write that fails after its WRITE was answered: the guest was
/// told it succeeded, so no later request may see the image without it.
/// Every request fails with EIO from then on, the journal holds the write
/// and then what the image holds, and status says so (docs/RELIABILITY.md,
/// "A failed image write").
#[test]
fn an_image_write_failing_after_its_answer_fails_every_later_request() {
    // Opened read-only, the image fails every write; told it takes writes
    // in place, cdpd answers before it finds out.
    let mut rig = Rig::new(64 << 20, true);
    rig.start_sync();
    let disk = rig.vm.disks[0].clone();
    assert!(!disk.lock_journal().inplace.enabled());
    disk.lock_journal().inplace = super::inplace::InPlace::always(DISK_SIZE);
    let (mut c, h) = rig.connect(&write_req(1, 0, 0, &[9; 4096]));
    assert_eq!(reply(&mut c), (0, 1), "answered once journaled");
    c.write_all(&request(proto::CMD_READ, 0, 2, 0, 4096))
        .unwrap();
    assert_eq!(reply(&mut c).0, proto::errno::EIO, "no stale read");
    c.write_all(&write_req(3, 0, 8192, &[3; 512])).unwrap();
    assert_eq!(reply(&mut c), (proto::errno::EIO, 3));
    c.write_all(&request(proto::CMD_FLUSH, 0, 4, 0, 0)).unwrap();
    assert_eq!(reply(&mut c), (proto::errno::EIO, 4));
    disconnect(c, h);
    let st = rig.vm.status();
    assert!(st.disks[0].image_failed);
    // The journal: the answered WRITE, then the image's bytes there.
    let recs = rig.records();
    let kinds: Vec<(Kind, u64)> = recs.iter().map(|r| (r.2, r.3)).collect();
    assert_eq!(kinds, [(Kind::Write, 0), (Kind::Write, 0)]);
    rig.check_invariant();
}
