//! Bounded segments (issue 12): a segment's index always fits in one record,
//! whatever the guest writes, and a segment create that fails (a full disk)
//! leaves no segment file behind, so cdpd always starts again.

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cdp_core::journal::format::{
    self, INDEX_ENTRY_LEN, MAX_RECORD_PAYLOAD, MAX_SEGMENT_RECORDS, SEGMENT_HEADER_LEN,
};
use cdp_core::journal::{is_temp_segment_file_name, parse_segment_file_name};
use cdp_tests::fixture::{cdpctl, config, qemu_io, shipper_once_cmd, Tmpfs};
use cdp_tests::nbd::{self, Client};
use cdp_tests::{require_tool, run_ok, Daemon};

const MIB: u64 = 1 << 20;

/// The files of a disk's journal directory: (segment first seq or None, path, length).
fn journal_files(d: &Daemon, disk: &str) -> Vec<(Option<u64>, PathBuf, u64)> {
    let dir = d
        .state_dir
        .join("vms")
        .join(&d.vm_uuid)
        .join(disk)
        .join("journal");
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            let len = e.metadata().unwrap().len();
            (parse_segment_file_name(&name), e.path(), len)
        })
        .collect();
    v.sort();
    v
}

/// Send `n` zero-length WRITEs on one connection, pipelined (a writer thread
/// sends every request while this thread reads the replies), and check every
/// reply succeeded. Returns how long it took.
fn pipelined_empty_writes(socket: &Path, n: u64) -> Duration {
    let (c, _) = Client::open(socket, "vda").unwrap();
    let sock = c.sock.try_clone().unwrap();
    let t0 = Instant::now();
    let sender = std::thread::spawn(move || {
        let mut w = BufWriter::with_capacity(1 << 20, sock);
        for h in 1..=n {
            // Spread over the disk: offset h * 512, length 0.
            let off = (h * 512) % (8 * MIB);
            w.write_all(&nbd::request_header(0, nbd::CMD_WRITE, h, off, 0))
                .unwrap();
        }
        w.flush().unwrap();
    });
    let mut r = std::io::BufReader::with_capacity(1 << 20, &c.sock);
    let mut failed = 0u64;
    for _ in 0..n {
        let rep = nbd::read_reply_from(&mut r).unwrap();
        if rep.error != 0 {
            failed += 1;
        }
    }
    sender.join().unwrap();
    let took = t0.elapsed();
    assert_eq!(failed, 0, "{failed} of {n} zero-length WRITEs failed");
    let mut c = c;
    assert_eq!(c.flush().unwrap(), 0);
    c.disconnect();
    took
}

/// Issue 12, item 5: 1.5 M zero-length WRITEs made one segment whose index
/// passed the 64 MiB record limit: it could never be sealed readably,
/// shipped or replayed, and the VM's shipping stopped. Segments now switch
/// on their record count too. (A 1 GiB `segment_size` so that the bytes
/// written alone never switch: only the record bound can.)
#[test]
fn a_million_and_a_half_empty_writes_roll_segments_that_ship_and_replay() {
    let mut d = Daemon::builder()
        .disk_random("vda", 8 * MIB, 71)
        .args(["--segment-size", "1GiB", "--segment-age", "1h"])
        .start();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d, &repo);
    cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);
    let n = 1_500_000u64;
    let took = pipelined_empty_writes(&d.socket("vda"), n);
    eprintln!("{n} zero-length WRITEs in {took:?}");
    // A few real bytes after them, so that the replay has something to show.
    let qemu_io = require_tool("qemu-io");
    run_ok(
        Command::new(&qemu_io)
            .args(["-f", "raw", "-t", "writeback", "-c", "write -P 0x5a 1M 64k"])
            .arg(d.uri("vda")),
    );
    d.term();

    let segs: Vec<_> = journal_files(&d, "vda")
        .into_iter()
        .filter(|f| f.0.is_some())
        .collect();
    let mut total = 0u64;
    for (_, path, _) in &segs {
        let bytes = std::fs::read(path).unwrap();
        let index = format::read_index(&bytes)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .unwrap_or_else(|| panic!("{} is not sealed", path.display()));
        assert!(
            index.len() <= MAX_SEGMENT_RECORDS
                && index.len() * INDEX_ENTRY_LEN <= MAX_RECORD_PAYLOAD as usize,
            "{}: {} records, an index of {} bytes",
            path.display(),
            index.len(),
            index.len() * INDEX_ENTRY_LEN
        );
        total += index.len() as u64;
    }
    assert!(
        segs.len() >= 2 && total > n,
        "{n} records should have rolled segments: {} segments, {total} records",
        segs.len()
    );

    // `cdpctl journal replay` of the local journal equals the image (before
    // shipping: the shipper trims what every target holds).
    d.check_replay_invariant("vda");

    // The shipper ships them all, and the repository alone gives the image back.
    run_ok(&mut shipper_once_cmd(&d, &cfg));
    let shipped = std::fs::read_dir(repo.join("cdp/v1/vms").join(&d.vm_uuid).join("vda/journal"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".seg.zst")
        })
        .count();
    assert!(
        shipped >= segs.len(),
        "{shipped} shipped of {} segments",
        segs.len()
    );
    cdp_tests::fixture::assert_repo_restores_image(&d, &cfg, &repo, "vda");
}

/// No segment file without room for a record, and no temporary file of a
/// create: what a failed create must never leave.
fn assert_no_aborted_create(d: &Daemon, when: &str) {
    for (seq, path, len) in journal_files(d, "vda") {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !is_temp_segment_file_name(&name),
            "{when}: a create's temporary file is left: {}",
            path.display()
        );
        if seq.is_some() {
            assert!(
                len >= SEGMENT_HEADER_LEN as u64,
                "{when}: {} has {len} bytes, not even a header",
                path.display()
            );
            let mut hb = [0u8; SEGMENT_HEADER_LEN];
            std::fs::File::open(&path)
                .unwrap()
                .read_exact(&mut hb)
                .unwrap();
            format::SegmentHeader::decode(&hb)
                .unwrap_or_else(|e| panic!("{when}: {}: {e}", path.display()));
        }
    }
}

/// Issue 12, item 1: ENOSPC while creating a segment left a 0-byte segment
/// file, after which cdpd refused to start ("bad segment magic"). With a
/// 512-byte `segment_size` every 512-byte WRITE fills its segment (one tmpfs
/// page, sealed in place), so once the filesystem is full the next WRITE's
/// segment create is what hits ENOSPC. The guest never sees it: cdpd runs
/// degraded from then on (docs/RELIABILITY.md, "A full journal").
#[test]
fn enospc_while_creating_a_segment_leaves_no_segment_and_cdpd_restarts() {
    let mut d = Daemon::builder()
        .disk_random("vda", 8 * MIB, 72)
        .args(["--segment-size", "512", "--segment-age", "1h"])
        .prepare();
    let fs = Tmpfs::mount(&d.state_dir, "1M");
    d.start();
    let (mut c, _) = Client::open(&d.socket("vda"), "vda").unwrap();
    let mut ok = 0u64;
    let mut degraded = false;
    for i in 0..8000u64 {
        let e = c.write(i * 512, &[(i % 251) as u8 + 1; 512], 0).unwrap();
        assert_eq!(
            e, 0,
            "WRITE {i}: error {e}: a full journal must not fail the guest"
        );
        ok += 1;
        if i % 100 == 99 && d.status_json()["disks"][0]["journal_mode"] == "degraded" {
            degraded = true;
            break;
        }
    }
    assert!(
        ok > 10 && degraded,
        "the journal's 1 MiB filesystem should fill: {ok} writes ok, never degraded"
    );
    d.assert_alive("after ENOSPC at segment creates");
    assert!(d.log().contains("No space left"), "{}", d.log());
    assert_no_aborted_create(&d, "while full");
    let log = d.log();
    drop(c);

    // Killed while still full (a crash: recovery has it all to do).
    d.kill9();
    assert_no_aborted_create(&d, "after a crash while full");
    // Room again: cdpd starts (recovery finds nothing to refuse), and writes
    // go through.
    fs.resize("64M");
    d.start();
    let (mut c, _) = Client::open(&d.socket("vda"), "vda").unwrap();
    for i in 0..20u64 {
        assert_eq!(c.write(i * 4096, &[0xc3; 4096], 0).unwrap(), 0);
    }
    assert_eq!(c.flush().unwrap(), 0);
    c.disconnect();
    d.term();
    d.start();
    // The writes of the degraded window are journaled again once there is
    // room (the sealer's next pass): only then does the journal replay to
    // the image (docs/RELIABILITY.md, "A full journal").
    cdp_tests::guest::wait_until("the degraded window resynced", 60, || {
        let s = &d.status_json()["disks"][0];
        s["journal_mode"] == "normal" && s["dirty_bytes"] == 0
    });
    d.term();
    assert_no_aborted_create(&d, "at the end");
    assert!(
        !d.log().contains("bad segment magic"),
        "{log}\n---\n{}",
        d.log()
    );
    d.check_replay_invariant("vda");
}

/// Pages of `path` in the page cache (`mincore` of a mapping, which faults
/// nothing in).
fn resident_pages(path: &Path) -> usize {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    let mut vec = vec![0u8; len.div_ceil(4096)];
    // SAFETY: a read-only shared mapping of a file open for the call, never
    // read through; mincore fills `vec`, one byte per page of the mapping
    // (sized above); the mapping is removed before returning.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(addr, libc::MAP_FAILED);
        assert_eq!(libc::mincore(addr, len, vec.as_mut_ptr()), 0);
        libc::munmap(addr, len);
    }
    vec.iter().filter(|&&b| b & 1 != 0).count()
}

/// S-152: `cdpd --journal-cache` bounds how much of a disk's sealed journal
/// stays in the page cache. 8 MiB written through qemu-io into 1 MiB
/// segments with a 2 MiB cache: after a clean stop (which seals the last
/// segment), the older segments have no page cached, the newest ones do,
/// and nothing was lost (the export reads back what was written).
#[test]
fn journal_cache_drops_older_sealed_segments_from_the_page_cache() {
    let mut d = Daemon::builder()
        .disk("vda", 16 * MIB)
        .args([
            "--segment-size",
            "1MiB",
            "--segment-age",
            "1h",
            "--journal-cache",
            "2MiB",
        ])
        .start();
    if nix::sys::statfs::statfs(&d.state_dir)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
    {
        eprintln!("state on tmpfs, which keeps its pages: nothing to check");
        return;
    }
    let cmds: Vec<String> = (0..16u64)
        .map(|i| format!("write -P {} {} 512k", i + 1, i * 512 * 1024))
        .collect();
    qemu_io(&d, "vda", &cmds);
    d.term();
    let segs: Vec<_> = journal_files(&d, "vda")
        .into_iter()
        .filter_map(|(seq, p, len)| seq.map(|_| (p, len)))
        .collect();
    assert!(segs.len() >= 6, "8 MiB in 1 MiB segments: {segs:?}");
    let resident: Vec<usize> = segs.iter().map(|(p, _)| resident_pages(p)).collect();
    // The newest segments holding at most 2 MiB keep their pages; every
    // older one has none.
    let mut newer = 0u64;
    let mut kept = 0;
    for ((p, len), &r) in segs.iter().zip(&resident).rev() {
        newer += len;
        if newer <= 2 * MIB {
            kept += 1;
            continue;
        }
        assert_eq!(r, 0, "{}: {r} pages cached ({resident:?})", p.display());
    }
    assert!(kept >= 1, "{resident:?}");
    assert!(
        resident[resident.len() - 1] > 0,
        "the newest stays cached: {resident:?}"
    );
    d.start();
    let cmds: Vec<String> = (0..16u64)
        .map(|i| format!("read -P {} {} 512k", i + 1, i * 512 * 1024))
        .collect();
    qemu_io(&d, "vda", &cmds);
}

/// Pages of `path` that are dirty (`cachestat(2)`, Linux 6.5: written, and
/// their writeback not yet started).
fn dirty_pages(path: &Path) -> u64 {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct CacheStat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    const SYS_CACHESTAT: libc::c_long = 451;
    let f = std::fs::File::open(path).unwrap();
    let range = Range { off: 0, len: 0 };
    let mut cs = CacheStat::default();
    // SAFETY: cachestat(2) reads `range` and fills `cs`, both live for the
    // call and laid out as the kernel's structs; the descriptor is open.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            f.as_raw_fd(),
            &range as *const Range,
            &mut cs as *mut CacheStat,
            0u32,
        )
    };
    assert_eq!(
        r,
        0,
        "cachestat: {} (this test needs Linux 6.5 or later)",
        std::io::Error::last_os_error()
    );
    cs.nr_dirty
}

/// S-154: while the guest flushes, cdpd starts the journal's writeback as it
/// appends (every MiB), so that its next FLUSH finds little left to write;
/// while it does not, the writeback is left to the kernel (a burst is taken
/// into the page cache). The real cdpd, 1 MiB WRITEs over NBD, the open
/// segment's dirty pages counted by `cachestat(2)`: 8 MiB written before
/// any FLUSH start no writeback (status `journal_writebacks`), 8 MiB
/// written after one leave at most a window's pages dirty (without the
/// writeback, all 2048 of them).
#[test]
fn the_journal_is_written_back_as_it_is_appended_while_the_guest_flushes() {
    let mut d = Daemon::builder()
        .disk("vda", 32 * MIB)
        .args(["--segment-size", "64MiB", "--segment-age", "1h"])
        .start();
    let (mut c, _) = Client::open(&d.socket("vda"), "vda").unwrap();
    let writebacks = || {
        d.status_json()["disks"][0]["journal_writebacks"]
            .as_u64()
            .unwrap()
    };
    let write = |c: &mut Client, at: u64| {
        for i in at..at + 8 {
            assert_eq!(
                c.write(i * MIB, &vec![i as u8 + 1; MIB as usize], 0)
                    .unwrap(),
                0
            );
        }
    };
    write(&mut c, 0);
    let segs = journal_files(&d, "vda");
    let (_, seg, _) = segs.last().expect("the open segment");
    let before = dirty_pages(seg);
    assert_eq!(writebacks(), 0, "no FLUSH yet");
    assert_eq!(c.flush().unwrap(), 0);
    let synced = dirty_pages(seg);
    write(&mut c, 8);
    assert!(
        synced == 0,
        "the FLUSH synced the segment: {synced} pages dirty"
    );
    // Dirty since the last writeback started: less than a window (256 pages)
    // and a record's header. A WRITE answered once journaled (an image that
    // takes writes in place) may get its reply before its writeback starts,
    // so the count is awaited; without the writeback it stays at 2048 until
    // the kernel's flusher writes the pages (30 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = dirty_pages(seg);
    while after > 257 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        after = dirty_pages(seg);
    }
    assert!(
        after <= 257,
        "8 MiB appended after a FLUSH: {after} pages dirty (before the FLUSH: {before})"
    );
    let n = writebacks();
    assert!(n >= 7, "a writeback per MiB after the FLUSH: {n}");
    c.disconnect();
    let cmds: Vec<String> = (0..16u64)
        .map(|i| format!("read -P {} {} 1M", i + 1, i * MIB))
        .collect();
    qemu_io(&d, "vda", &cmds);
    d.term();
    d.check_replay_invariant("vda");
}
