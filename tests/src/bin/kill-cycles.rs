//! `kill-cycles`: SIGKILL cdpd again and again under a writing NBD client, and check
//! after every recovery that nothing acknowledged-and-flushed was lost and that the
//! journal replayed onto the initial image equals the image.
//!
//! Shared by `benches/kill.sh` (long runs, release build) and
//! `tests/tests/kill_cycles.rs` (a few cycles in CI), so the two cannot drift.
//!
//! One cycle:
//!  1. cdpd is running (its start is the previous cycle's recovery, or the first start).
//!  2. `WRITERS` connections write numbered 4 KiB blocks (block index and a global,
//!     increasing version in every block), `DEPTH` requests in flight each, and send a
//!     FLUSH every `FLUSH_EVERY` writes. Every acknowledged write is recorded; a FLUSH's
//!     success makes the writes acknowledged before it was SENT "flushed".
//!  3. When the acknowledgements reach a random count, the reply thread SIGKILLs cdpd
//!     (mid-stream: requests are in flight).
//!  4. cdpd is started again (the recovery; its start-to-READY time is measured).
//!  5. Every block is read back through the new cdpd: it must hold a valid block whose
//!     version is at least the last flushed, the last acknowledged and the last seen
//!     version of that block (a write sent but never acknowledged may or may not be
//!     there; nothing older may come back), or its original bytes if never written.
//!  6. cdpd is stopped (SIGTERM) and `cdpctl journal replay` of the whole journal onto
//!     a copy of the epoch's initial image must equal the image; cdpd is started again.
//!
//! Every `ROTATE` cycles the journal starts over (a fresh state directory, the image as
//! it is as the new initial image), so that the replay check stays bounded over 1000
//! cycles; the records redone and torn bytes are read from each epoch's SESSION_START
//! records before it is dropped.
//!
//! Environment: `CYCLES` (default 1000), `DISK_MIB` (16), `WRITERS` (2), `DEPTH` (8),
//! `FLUSH_EVERY` (16), `KILL_MIN`/`KILL_MAX` (acknowledgements before the kill: 50/1500),
//! `ROTATE` (25), `SEED` (default: from the clock; printed), `CORRUPT_AT` (self-test: at
//! that cycle, overwrite a flushed block in the image behind cdpd's back after the
//! recovery: the run must then report a lost write and a replay mismatch and fail).
//!
//! Prints one JSON object on stdout (cycles, failures, recovery times, records redone,
//! torn bytes, …) and exits 1 when any check failed.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use cdp_tests::nbd::{read_reply_from, request_header, Client, CMD_FLUSH, CMD_WRITE};
use cdp_tests::{copy_sparse, first_difference, records_of_kind, Daemon};

const BLOCK: usize = 4096;
const MAGIC: u64 = 0x4b49_4c4c_4359_434c; // "KILLCYCL"

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        _ => default,
    }
}

struct Params {
    cycles: u64,
    disk_mib: u64,
    writers: u64,
    depth: usize,
    flush_every: u64,
    kill_min: u64,
    kill_max: u64,
    rotate: u64,
    seed: u64,
    corrupt_at: Option<u64>,
}

impl Params {
    fn from_env() -> Params {
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let p = Params {
            cycles: env_u64("CYCLES", 1000),
            disk_mib: env_u64("DISK_MIB", 16),
            writers: env_u64("WRITERS", 2).max(1),
            depth: env_u64("DEPTH", 8).max(1) as usize,
            flush_every: env_u64("FLUSH_EVERY", 16).max(1),
            kill_min: env_u64("KILL_MIN", 50).max(1),
            kill_max: env_u64("KILL_MAX", 1500),
            rotate: env_u64("ROTATE", 25).max(1),
            seed: env_u64("SEED", clock | 1),
            corrupt_at: std::env::var("CORRUPT_AT")
                .ok()
                .filter(|v| !v.is_empty())
                .map(|v| v.parse().expect("CORRUPT_AT is a cycle number")),
        };
        assert!(p.kill_max >= p.kill_min, "KILL_MAX < KILL_MIN");
        p
    }
}

/// xorshift64*: the kill points and block choices (reproducible from SEED).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Block `b` at version `v`: magic, b, v, then words derived from all three.
fn pattern(b: u64, v: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(BLOCK);
    for w in 0..(BLOCK / 8) as u64 {
        let word = match w {
            0 => MAGIC,
            1 => b,
            2 => v,
            _ => (b << 40 ^ v << 12 ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        };
        out.extend_from_slice(&word.to_le_bytes());
    }
    out
}

/// The version a block holds: Some(0) for its original bytes, Some(v) for a valid
/// `pattern(b, v)`, None for anything else (torn or foreign data).
fn decode(b: u64, data: &[u8], original: &[u8]) -> Option<u64> {
    let word = |i: usize| u64::from_le_bytes(data[i * 8..i * 8 + 8].try_into().unwrap());
    if word(0) == MAGIC && word(1) == b && data == pattern(b, word(2)).as_slice() {
        return Some(word(2));
    }
    (data == original).then_some(0)
}

/// One request in flight on one connection.
enum Op {
    Write(u64, u64),
    /// The (block, version) writes acknowledged before this FLUSH was sent.
    Flush(Vec<(u64, u64)>),
}

#[derive(Default)]
struct Conn {
    ops: HashMap<u64, Op>,
    acked_since_flush: Vec<(u64, u64)>,
    writes: u64,
    next_handle: u64,
}

/// What the client knows about every block, across cycles.
struct Track {
    sent: Vec<u64>,
    acked: Vec<u64>,
    flushed: Vec<u64>,
    /// The version read back at the last check (nothing older may return).
    seen: Vec<u64>,
    in_flight: Vec<bool>,
    next_version: u64,
    conns: Vec<Conn>,
    rng: Rng,
    acks: u64,
    writes_ok: u64,
    flushes_ok: u64,
    io_errors: u64,
}

impl Track {
    fn new(blocks: usize, writers: usize, seed: u64) -> Track {
        Track {
            sent: vec![0; blocks],
            acked: vec![0; blocks],
            flushed: vec![0; blocks],
            seen: vec![0; blocks],
            in_flight: vec![false; blocks],
            next_version: 1,
            conns: (0..writers).map(|_| Conn::default()).collect(),
            rng: Rng(seed),
            acks: 0,
            writes_ok: 0,
            flushes_ok: 0,
            io_errors: 0,
        }
    }

    /// The next request of connection `c` (it owns blocks `b % writers == c`): a FLUSH
    /// every `flush_every` writes, else a write to a random block of its own not in flight.
    fn next_request(&mut self, c: usize, flush_every: u64) -> (u64, Option<(u64, u64)>) {
        let writers = self.conns.len() as u64;
        let per_conn = self.sent.len() as u64 / writers;
        let conn = &mut self.conns[c];
        let handle = conn.next_handle;
        conn.next_handle += 1;
        if conn.writes > 0 && conn.writes.is_multiple_of(flush_every) {
            conn.writes += 1;
            let covered = std::mem::take(&mut conn.acked_since_flush);
            conn.ops.insert(handle, Op::Flush(covered));
            return (handle, None);
        }
        conn.writes += 1;
        let b = loop {
            let b = self.rng.below(per_conn) * writers + c as u64;
            if !self.in_flight[b as usize] {
                break b;
            }
        };
        let v = self.next_version;
        self.next_version += 1;
        self.sent[b as usize] = v;
        self.in_flight[b as usize] = true;
        self.conns[c].ops.insert(handle, Op::Write(b, v));
        (handle, Some((b, v)))
    }

    /// A reply on connection `c`; returns the acknowledgement count so far.
    fn reply(&mut self, c: usize, handle: u64, error: u32) -> u64 {
        match self.conns[c].ops.remove(&handle) {
            Some(Op::Write(b, v)) => {
                self.in_flight[b as usize] = false;
                if error == 0 {
                    self.writes_ok += 1;
                    let a = &mut self.acked[b as usize];
                    *a = (*a).max(v);
                    self.conns[c].acked_since_flush.push((b, v));
                } else {
                    self.io_errors += 1;
                }
            }
            Some(Op::Flush(covered)) => {
                if error == 0 {
                    self.flushes_ok += 1;
                    for (b, v) in covered {
                        let f = &mut self.flushed[b as usize];
                        *f = (*f).max(v);
                    }
                } else {
                    self.io_errors += 1;
                }
            }
            None => panic!("reply for unknown handle {handle} on connection {c}"),
        }
        self.acks += 1;
        self.acks
    }

    /// After a kill: nothing is in flight any more, unflushed acknowledgements are
    /// forgotten by the connections (their FLUSH can no longer come).
    fn connections_gone(&mut self) {
        self.in_flight.iter_mut().for_each(|f| *f = false);
        for c in &mut self.conns {
            c.ops.clear();
            c.acked_since_flush.clear();
            c.writes = 0;
        }
    }
}

/// One connection: a sender thread keeps `depth` requests in flight; this thread reads
/// replies until cdpd dies, and SIGKILLs it when the acknowledgements reach `kill_at`.
fn writer(
    socket: PathBuf,
    c: usize,
    track: Arc<Mutex<Track>>,
    p: (usize, u64, u64),
    pid: u32,
    killed: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let (depth, flush_every, kill_at) = p;
    std::thread::spawn(move || {
        let (client, _) = Client::open(&socket, "vda").expect("connect a writer");
        let mut wsock = client.sock.try_clone().unwrap();
        let mut rsock = client.sock.try_clone().unwrap();
        let (slot_tx, slot_rx) = mpsc::sync_channel::<()>(depth);
        let t2 = track.clone();
        let sender = std::thread::spawn(move || loop {
            if slot_tx.send(()).is_err() {
                return;
            }
            let (handle, write) = t2.lock().unwrap().next_request(c, flush_every);
            let msg = match write {
                Some((b, v)) => {
                    let mut m =
                        request_header(0, CMD_WRITE, handle, b * BLOCK as u64, BLOCK as u32)
                            .to_vec();
                    m.extend_from_slice(&pattern(b, v));
                    m
                }
                None => request_header(0, CMD_FLUSH, handle, 0, 0).to_vec(),
            };
            if wsock.write_all(&msg).is_err() {
                return;
            }
        });
        while let Ok(r) = read_reply_from(&mut rsock) {
            let acks = track.lock().unwrap().reply(c, r.handle, r.error);
            if acks >= kill_at && !killed.swap(true, Ordering::SeqCst) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            if slot_rx.recv().is_err() {
                break;
            }
        }
        drop(slot_rx);
        let _ = client.sock.shutdown(std::net::Shutdown::Both);
        let _ = sender.join();
    })
}

#[derive(Default)]
struct Summary {
    cycles: u64,
    failures: u64,
    lost_flushed_writes: u64,
    lost_acknowledged_writes: u64,
    went_back: u64,
    garbage_blocks: u64,
    replay_mismatches: u64,
    guest_io_errors: u64,
    not_killed_by_sigkill: u64,
    recovery_ms_mean: f64,
    recovery_ms_max: f64,
    records_redone: u64,
    torn_bytes: u64,
    writes_acknowledged: u64,
    flushes_acknowledged: u64,
    epochs: u64,
    seed: u64,
    disk_mib: u64,
    seconds: f64,
}

impl Summary {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "cycles": self.cycles,
            "failures": self.failures,
            "lost_flushed_writes": self.lost_flushed_writes,
            "lost_acknowledged_writes": self.lost_acknowledged_writes,
            "went_back": self.went_back,
            "garbage_blocks": self.garbage_blocks,
            "replay_mismatches": self.replay_mismatches,
            "guest_io_errors": self.guest_io_errors,
            "not_killed_by_sigkill": self.not_killed_by_sigkill,
            "recovery_ms_mean": (self.recovery_ms_mean * 10.0).round() / 10.0,
            "recovery_ms_max": (self.recovery_ms_max * 10.0).round() / 10.0,
            "records_redone": self.records_redone,
            "torn_bytes": self.torn_bytes,
            "writes_acknowledged": self.writes_acknowledged,
            "flushes_acknowledged": self.flushes_acknowledged,
            "epochs": self.epochs,
            "seed": self.seed,
            "disk_mib": self.disk_mib,
            "seconds": (self.seconds * 10.0).round() / 10.0,
        })
    }
}

/// Step 5: every block read back through cdpd; returns the number of bad blocks.
fn check_blocks(d: &Daemon, track: &mut Track, original: &[u8], s: &mut Summary) -> u64 {
    let (mut client, _) = Client::open(&d.socket("vda"), "vda").expect("connect the checker");
    let blocks = track.sent.len();
    let chunk = 256usize; // 1 MiB reads
    let mut bad = 0;
    for first in (0..blocks).step_by(chunk) {
        let n = chunk.min(blocks - first);
        let data = client
            .read((first * BLOCK) as u64, (n * BLOCK) as u32)
            .expect("read through cdpd")
            .unwrap_or_else(|e| panic!("cdpd answered a read with error {e}"));
        for i in 0..n {
            let b = first + i;
            let got = &data[i * BLOCK..(i + 1) * BLOCK];
            let orig = &original[b * BLOCK..(b + 1) * BLOCK];
            let (fl, ak, seen) = (track.flushed[b], track.acked[b], track.seen[b]);
            let problem = match decode(b as u64, got, orig) {
                None => Some(("garbage", &mut s.garbage_blocks)),
                Some(v) if v < fl => Some(("lost flushed write", &mut s.lost_flushed_writes)),
                Some(v) if v < ak => {
                    Some(("lost acknowledged write", &mut s.lost_acknowledged_writes))
                }
                Some(v) if v < seen => Some(("older than already read", &mut s.went_back)),
                Some(v) => {
                    track.seen[b] = v;
                    None
                }
            };
            if let Some((what, counter)) = problem {
                *counter += 1;
                bad += 1;
                if bad <= 10 {
                    eprintln!(
                        "kill-cycles: block {b}: {what} (holds {:?}; sent {}, acknowledged {ak}, \
                         flushed {fl}, read before {seen})",
                        decode(b as u64, got, orig),
                        track.sent[b]
                    );
                }
            }
        }
    }
    client.disconnect();
    bad
}

/// Step 6, with cdpd stopped: initial image + whole journal == image.
fn replay_matches(d: &Daemon, cycle: u64) -> bool {
    let disk = d.disk("vda");
    let copy = d.work_dir().join("replayed.img");
    copy_sparse(&disk.initial, &copy);
    d.replay("vda", &copy, None);
    let diff = first_difference(&copy, &disk.path);
    let _ = std::fs::remove_file(&copy);
    match diff {
        None => true,
        Some(diff) => {
            eprintln!(
                "kill-cycles: cycle {cycle}: initial image + journal replay != image: {diff}"
            );
            false
        }
    }
}

/// The records redone and torn bytes every start of this epoch reported.
fn recovery_counts(d: &Daemon) -> (u64, u64) {
    let records = d.journal_records();
    records_of_kind(&records, "SESSION_START")
        .iter()
        .fold((0, 0), |(r, t), s| {
            (
                r + s["info"]["redone_records"].as_u64().unwrap_or(0),
                t + s["info"]["torn_bytes"].as_u64().unwrap_or(0),
            )
        })
}

/// A new journal: a fresh state directory, the image as it is now as the initial image.
fn rotate(d: &mut Daemon, s: &mut Summary) {
    let epoch = s.epochs + 1;
    let (redone, torn) = recovery_counts(d);
    s.records_redone += redone;
    s.torn_bytes += torn;
    let old_state = d.state_dir.clone();
    let old_initial = d.disks[0].initial.clone();
    let initial = d.root.join("initial").join(format!("vda.epoch{epoch}.img"));
    copy_sparse(&d.disks[0].path, &initial);
    d.disks[0].initial = initial;
    d.state_dir = d.root.join(format!("state.epoch{epoch}"));
    std::fs::create_dir_all(&d.state_dir).unwrap();
    std::fs::remove_dir_all(&old_state).unwrap();
    if epoch > 2 {
        std::fs::remove_file(old_initial).unwrap();
    }
    s.epochs += 1;
}

/// Self-test: put a flushed block's original bytes back into the image behind cdpd.
fn corrupt_a_flushed_block(d: &Daemon, track: &Track, original: &[u8]) {
    let b = (0..track.flushed.len())
        .max_by_key(|&b| track.flushed[b])
        .filter(|&b| track.flushed[b] > 0)
        .expect("self-test: no block was flushed before the kill");
    let img = std::fs::OpenOptions::new()
        .write(true)
        .open(d.image("vda"))
        .unwrap();
    img.write_all_at(&original[b * BLOCK..(b + 1) * BLOCK], (b * BLOCK) as u64)
        .unwrap();
    eprintln!(
        "kill-cycles: self-test: block {b} (flushed version {}) overwritten",
        track.flushed[b]
    );
}

/// Steps 2–4 of one cycle; returns cdpd's start-to-READY time after the kill.
fn write_and_kill(
    d: &mut Daemon,
    track: &Arc<Mutex<Track>>,
    p: &Params,
    s: &mut Summary,
) -> Duration {
    let kill_at = {
        let mut t = track.lock().unwrap();
        let span = p.kill_max - p.kill_min + 1;
        t.acks + p.kill_min + t.rng.below(span)
    };
    let killed = Arc::new(AtomicBool::new(false));
    let pid = d.pid();
    let writers: Vec<_> = (0..p.writers as usize)
        .map(|c| {
            let params = (p.depth, p.flush_every, kill_at);
            writer(
                d.socket("vda"),
                c,
                track.clone(),
                params,
                pid,
                killed.clone(),
            )
        })
        .collect();
    for w in writers {
        w.join().expect("a writer thread panicked");
    }
    track.lock().unwrap().connections_gone();
    let status = d
        .wait_exit(cdp_tests::STOP_TIMEOUT)
        .expect("cdpd survived SIGKILL");
    if !killed.load(Ordering::SeqCst) || status.signal() != Some(9) {
        eprintln!("kill-cycles: cdpd ended with {status} before the kill");
        s.not_killed_by_sigkill += 1;
    }
    let t0 = Instant::now();
    d.start();
    t0.elapsed()
}

fn main() {
    if std::env::var_os("CDP_BIN_DIR").is_none() {
        let exe = std::env::current_exe().expect("current_exe");
        std::env::set_var("CDP_BIN_DIR", exe.parent().unwrap());
    }
    let p = Params::from_env();
    let size = p.disk_mib << 20;
    let blocks = (size as usize / BLOCK / p.writers as usize) * p.writers as usize;
    let mut d = Daemon::builder().disk_random("vda", size, p.seed).prepare();
    // This is about kills, not space: the journal is never held back by the free-space
    // floor (5% of the filesystem by default, more than a nearly full test machine has),
    // so that every write is journaled and the replay check applies to every cycle.
    cdp_tests::isolate_from_host_config();
    let cfg = d.work_dir().join("cdp.toml");
    std::fs::write(&cfg, "[policy.default]\njournal_min_free = \"0%\"\n").unwrap();
    std::env::set_var(cdp_core::config::CONFIG_ENV, &cfg);
    d.start();
    let original = std::fs::read(&d.disks[0].initial).unwrap();
    let track = Arc::new(Mutex::new(Track::new(blocks, p.writers as usize, p.seed)));
    let mut s = Summary {
        epochs: 1,
        seed: p.seed,
        disk_mib: p.disk_mib,
        ..Summary::default()
    };
    eprintln!(
        "kill-cycles: {} cycles, seed {}, {} MiB disk, cdpd {:?}",
        p.cycles,
        p.seed,
        p.disk_mib,
        d.command(3)
    );
    let started = Instant::now();
    let mut recovery_total = Duration::ZERO;
    for cycle in 1..=p.cycles {
        let rec = write_and_kill(&mut d, &track, &p, &mut s);
        recovery_total += rec;
        s.recovery_ms_max = s.recovery_ms_max.max(rec.as_secs_f64() * 1e3);
        if p.corrupt_at == Some(cycle) {
            corrupt_a_flushed_block(&d, &track.lock().unwrap(), &original);
        }
        let mut bad = check_blocks(&d, &mut track.lock().unwrap(), &original, &mut s);
        d.term();
        if !replay_matches(&d, cycle) {
            s.replay_mismatches += 1;
            bad += 1;
        }
        if cycle == p.cycles {
            let (redone, torn) = recovery_counts(&d);
            s.records_redone += redone;
            s.torn_bytes += torn;
        } else if cycle.is_multiple_of(p.rotate) {
            rotate(&mut d, &mut s);
        }
        s.cycles = cycle;
        s.failures += u64::from(bad > 0);
        if cycle == p.cycles {
            break;
        }
        d.start();
        if cycle.is_multiple_of(10) {
            eprintln!(
                "kill-cycles: {cycle} cycles, {} failed, {:.0} s",
                s.failures,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let t = track.lock().unwrap();
    s.guest_io_errors = t.io_errors;
    s.failures += u64::from(t.io_errors > 0 || s.not_killed_by_sigkill > 0);
    s.writes_acknowledged = t.writes_ok;
    s.flushes_acknowledged = t.flushes_ok;
    s.recovery_ms_mean = recovery_total.as_secs_f64() * 1e3 / s.cycles.max(1) as f64;
    s.seconds = started.elapsed().as_secs_f64();
    println!("{}", s.to_json());
    // process::exit runs no destructors: the daemon's temporary directory goes first.
    drop(d);
    std::process::exit(i32::from(s.failures > 0));
}
