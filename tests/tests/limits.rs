//! cdpd's resource limits and peer check, against the real binary (issue 11,
//! "Bounded everything"): a READ flood keeps its memory bounded, a client
//! that does not read its replies cannot hold SIGTERM, connections are
//! capped, a silent handshake is dropped, the control socket serves clients
//! concurrently, and a peer of another uid is refused.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cdp_tests::nbd::*;
use cdp_tests::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// The largest READ cdpd accepts.
const BIG: u32 = 32 << 20;
/// READs in the flood: 48 × 32 MiB = 1.5 GiB of replies, from 1.3 KB of requests.
const FLOOD: u64 = 48;
/// cdpd's resident memory must stay under this whatever a client sends.
const RSS_LIMIT_KB: u64 = 256 * 1024;
/// NBD connections cdpd serves at once per disk (cdpd::limits::Limits).
const MAX_CONNS: usize = 16;
const NOBODY: u32 = 65534;

/// A value in kB from /proc/<pid>/status (VmHWM, VmRSS).
fn proc_status_kb(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// Offset of the i-th READ of the flood.
fn flood_offset(i: u64) -> u64 {
    (i % 32) * MIB
}

/// Send `FLOOD` READs of 32 MiB in one write.
fn send_flood(c: &mut Client) {
    let mut reqs = Vec::new();
    for i in 0..FLOOD {
        reqs.extend_from_slice(&request_header(0, CMD_READ, 1000 + i, flood_offset(i), BIG));
    }
    assert_eq!(reqs.len(), 28 * FLOOD as usize);
    c.sock.write_all(&reqs).unwrap();
}

/// Watch cdpd's memory high-water mark for `time`; panics as soon as it
/// passes the limit. Returns the last VmHWM, in kB.
fn watch_rss(d: &mut Daemon, time: Duration) -> u64 {
    let t = Instant::now();
    loop {
        let hwm = proc_status_kb(d.pid(), "VmHWM");
        if hwm >= RSS_LIMIT_KB {
            d.fail(&format!(
                "cdpd's VmHWM reached {} MiB (limit {} MiB) under a flood",
                hwm / 1024,
                RSS_LIMIT_KB / 1024
            ));
        }
        if t.elapsed() >= time {
            return hwm;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_read_flood_keeps_rss_bounded_and_every_reply_is_right() {
    let mut d = Daemon::builder().disk_random("vda", 64 * MIB, 21).start();
    let image = read_file(&d.image("vda"));
    let (mut c, _) = Client::open(&d.socket("vda"), "vda").unwrap();
    let before = proc_status_kb(d.pid(), "VmHWM");
    send_flood(&mut c);
    // Replies unread for a while: cdpd must not buffer them all.
    let during = watch_rss(&mut d, Duration::from_secs(5));
    eprintln!(
        "cdpd VmHWM: {} MiB before the flood, {} MiB after 5 s of it unread (VmRSS {} MiB)",
        before / 1024,
        during / 1024,
        proc_status_kb(d.pid(), "VmRSS") / 1024
    );
    let mut data = vec![0u8; BIG as usize];
    for i in 0..FLOOD {
        let r = c.read_reply().unwrap_or_else(|e| panic!("reply {i}: {e}"));
        assert_eq!((r.handle, r.error), (1000 + i, 0), "reply {i}");
        c.sock.read_exact(&mut data).unwrap();
        let off = flood_offset(i) as usize;
        assert!(
            data == image[off..off + BIG as usize],
            "reply {i}: data differs from the image at {off}"
        );
    }
    let after = watch_rss(&mut d, Duration::ZERO);
    eprintln!(
        "cdpd VmHWM after every reply was read: {} MiB",
        after / 1024
    );
    c.disconnect();
    let (mut c2, _) = Client::open(&d.socket("vda"), "vda").unwrap();
    assert_eq!(c2.read(0, 4096).unwrap().unwrap(), image[..4096]);
    d.assert_alive("after the READ flood");
}

#[test]
fn a_read_flood_on_every_connection_keeps_rss_bounded() {
    let mut d = Daemon::builder().disk_random("vda", 64 * MIB, 26).start();
    let before = proc_status_kb(d.pid(), "VmHWM");
    // As many connections as cdpd serves, each asking for 1.5 GiB.
    let mut clients: Vec<Client> = (0..MAX_CONNS)
        .map(|_| Client::open(&d.socket("vda"), "vda").unwrap().0)
        .collect();
    for c in &mut clients {
        send_flood(c);
    }
    let during = watch_rss(&mut d, Duration::from_secs(5));
    eprintln!(
        "cdpd VmHWM: {} MiB before, {} MiB after 5 s of {MAX_CONNS} floods unread",
        before / 1024,
        during / 1024
    );
    // The clients go away without reading: cdpd serves the next one.
    drop(clients);
    let t = Instant::now();
    let mut c = loop {
        match Client::open(&d.socket("vda"), "vda") {
            Ok((c, _)) => break c,
            Err(e) if t.elapsed() > Duration::from_secs(20) => {
                d.fail(&format!("not served after the floods ended: {e}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    assert_eq!(
        c.read(0, 4096).unwrap().unwrap(),
        read_at(&d.image("vda"), 0, 4096)
    );
    watch_rss(&mut d, Duration::ZERO);
}

#[test]
fn a_client_that_does_not_take_its_replies_is_dropped_after_the_write_timeout() {
    let mut d = Daemon::builder()
        .disk_random("vda", 64 * MIB, 25)
        .args(["--write-timeout", "1s"])
        .start();
    let (mut c, _) = Client::open(&d.socket("vda"), "vda").unwrap();
    send_flood(&mut c);
    std::thread::sleep(Duration::from_secs(4));
    // What cdpd wrote before it gave up is there; then the stream ends.
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    let ended = loop {
        match c.sock.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got += n as u64,
            Err(e) => break e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    };
    let all = FLOOD * (16 + u64::from(BIG));
    assert!(
        ended && got < all,
        "the connection was not dropped: {got} of {all} reply bytes, ended {ended}"
    );
    let (mut c2, _) = Client::open(&d.socket("vda"), "vda").unwrap();
    assert_eq!(
        c2.read(0, 4096).unwrap().unwrap(),
        read_at(&d.image("vda"), 0, 4096)
    );
    d.assert_alive("after dropping a client that did not read");
}

#[test]
fn sigterm_stops_cdpd_while_a_client_does_not_read_its_replies() {
    let mut d = Daemon::builder()
        .disk_random("vda", 64 * MIB, 22)
        .disk("vdb", 16 * MIB)
        .start();
    let (mut c, _) = Client::open(&d.socket("vda"), "vda").unwrap();
    assert_eq!(c.write(0, &[7u8; 4096], 0).unwrap(), 0);
    send_flood(&mut c);
    // A control client that says nothing, too.
    let _ctl = UnixStream::connect(d.run_dir.join(&d.vm_uuid).join("control.sock")).unwrap();
    // Let cdpd fill the socket and block writing.
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = d.wait_exit(Duration::from_secs(10));
    let took = t.elapsed();
    assert!(
        status.is_some(),
        "cdpd did not exit within 10 s of SIGTERM while a client held its replies\n{}",
        d.log()
    );
    assert!(status.unwrap().success(), "{status:?}\n{}", d.log());
    eprintln!("cdpd stopped {took:?} after SIGTERM");
    let records = d.journal_records();
    for disk in ["vda", "vdb"] {
        let mut mine: Vec<&Value> = records_of(&records, disk);
        mine.sort_by_key(|r| r["seq"].as_u64().unwrap_or(0));
        assert_eq!(
            mine.last().map(|r| r["kind"].clone()),
            Some(Value::from("SESSION_END")),
            "{disk}: no SESSION_END after SIGTERM: {:#?}",
            &mine[mine.len().saturating_sub(3)..]
        );
    }
    drop(c);
}

/// Let `nobody` reach the sockets by DAC (the directories traversable, the
/// sockets 0666), so that only cdpd's own check stands in the way.
fn open_sockets_to_everyone(d: &Daemon) {
    let dir = d.run_dir.join(&d.vm_uuid);
    for p in [d.root.as_path(), d.run_dir.as_path(), dir.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    for s in ["vda.sock", "control.sock"] {
        std::fs::set_permissions(dir.join(s), std::fs::Permissions::from_mode(0o666)).unwrap();
    }
}

/// As uid `nobody`: connect to `socket`, send `send`, and return how many
/// bytes came back before cdpd closed, or enough to tell it answered.
fn bytes_answered_to_nobody(socket: &Path, send: &str) -> usize {
    // Not a per-user shim (pyenv under /root): nobody must be able to run it.
    let python = Path::new("/usr/bin/python3");
    assert!(
        python.exists(),
        "this test needs /usr/bin/python3 (apt-get install python3)"
    );
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(15)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("connect failed:", e)
    sys.exit(2)
data = b""
try:
    if sys.argv[2]:
        s.sendall(sys.argv[2].encode() + b"\n")
    while len(data) < 18 and b"\n" not in data:
        b = s.recv(4096)
        if not b:
            break
        data += b
except OSError:
    pass
print(len(data))
"#;
    let out = run(Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(socket)
        .arg(send)
        .uid(NOBODY)
        // (std drops the supplementary groups when root sets a uid.)
        .gid(NOBODY));
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "the client as nobody failed ({}): {text} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text.parse()
        .unwrap_or_else(|_| panic!("unexpected output {text:?}"))
}

#[test]
fn a_peer_of_another_uid_is_refused_and_the_legitimate_client_keeps_working() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test connects as nobody: run it as root"
    );
    let mut d = Daemon::builder().disk_random("vda", 16 * MIB, 23).start();
    let (mut c, _) = Client::open(&d.socket("vda"), "vda").unwrap();
    open_sockets_to_everyone(&d);
    let ctl = d.run_dir.join(&d.vm_uuid).join("control.sock");
    for attempt in 0..3 {
        assert_eq!(
            bytes_answered_to_nobody(&d.socket("vda"), ""),
            0,
            "attempt {attempt}: cdpd greeted an NBD client of uid nobody"
        );
        assert_eq!(
            bytes_answered_to_nobody(&ctl, r#"{"cmd":"status"}"#),
            0,
            "attempt {attempt}: cdpd answered a control client of uid nobody"
        );
    }
    let r = c.read(4096, 4096).unwrap();
    assert_eq!(r.unwrap(), read_at(&d.image("vda"), 4096, 4096));
    assert_eq!(c.write(0, &[9u8; 4096], 0).unwrap(), 0);
    let status = d.status_json();
    let errors = status["disks"][0]["protocol_errors"].as_u64().unwrap();
    assert!(
        errors >= 3,
        "refused peers not counted: protocol_errors {errors}"
    );
    let log = d.log();
    for socket in ["disk vda's NBD socket", "the control socket"] {
        let logged = log
            .lines()
            .filter(|l| {
                l.contains(&format!(
                    "refused a connection to {socket} from uid {NOBODY}"
                ))
            })
            .count();
        assert_eq!(
            logged, 1,
            "a refused peer is logged once a minute, not per connection:\n{log}"
        );
    }
    c.disconnect();
    d.assert_alive("after refusing nobody");
}

#[test]
fn connections_over_the_cap_are_closed_and_the_others_keep_working() {
    let mut d = Daemon::builder().disk_random("vda", 16 * MIB, 24).start();
    let mut clients: Vec<Client> = (0..MAX_CONNS)
        .map(|i| {
            Client::open(&d.socket("vda"), "vda")
                .unwrap_or_else(|e| panic!("client {i}: {e}"))
                .0
        })
        .collect();
    for extra in 0..3 {
        let r = Client::connect(&d.socket("vda"));
        assert!(
            r.is_err(),
            "connection {} over the cap of {MAX_CONNS} was served",
            extra + 1
        );
    }
    let expect = read_at(&d.image("vda"), 0, 4096);
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.read(0, 4096).unwrap().unwrap(), expect, "client {i}");
    }
    // One leaves: a new one is served again.
    clients.pop().unwrap().disconnect();
    let t = Instant::now();
    let mut c = loop {
        match Client::open(&d.socket("vda"), "vda") {
            Ok((c, _)) => break c,
            Err(e) if t.elapsed() > Duration::from_secs(10) => {
                d.fail(&format!("no room after a client left: {e}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    assert_eq!(c.read(0, 4096).unwrap().unwrap(), expect);
    d.assert_alive("after the cap");
}

#[test]
fn a_client_silent_in_the_handshake_is_dropped() {
    let mut d = Daemon::builder()
        .disk("vda", 16 * MIB)
        .args(["--handshake-timeout", "1s"])
        .start();
    let mut s = UnixStream::connect(d.socket("vda")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    let t = Instant::now();
    // Say nothing: cdpd must close.
    let mut b = [0u8; 16];
    let closed = match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(
        closed,
        "cdpd kept a silent client for {:?} (handshake timeout 1 s)",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let (mut c, _) = Client::open(&d.socket("vda"), "vda").unwrap();
    assert_eq!(c.read(0, 512).unwrap().unwrap(), vec![0u8; 512]);
    d.assert_alive("after a silent client");
}

#[test]
fn a_client_trickling_its_handshake_is_dropped_at_the_handshake_deadline() {
    let mut d = Daemon::builder()
        .disk("vda", 16 * MIB)
        .args(["--handshake-timeout", "1s"])
        .start();
    let mut s = UnixStream::connect(d.socket("vda")).unwrap();
    let t = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    // Client flags, then NBD_OPT_GO "vda": one byte every 250 ms, each
    // well within the timeout, the whole (29 bytes, 7 s) far beyond it.
    let mut bytes = (FLAG_FIXED_NEWSTYLE as u32 | 2).to_be_bytes().to_vec();
    bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
    bytes.extend_from_slice(&OPT_GO.to_be_bytes());
    bytes.extend_from_slice(&9u32.to_be_bytes());
    bytes.extend_from_slice(b"\0\0\0\x03vda\0\0");
    let mut dropped_after = None;
    for b in bytes {
        std::thread::sleep(Duration::from_millis(250));
        if s.write_all(&[b]).is_err() {
            dropped_after = Some(t.elapsed());
            break;
        }
    }
    let dropped_after = dropped_after.unwrap_or_else(|| {
        d.fail(&format!(
            "cdpd still took handshake bytes {:?} after the connection (handshake timeout 1 s)",
            t.elapsed()
        ))
    });
    assert!(
        dropped_after < Duration::from_secs(4),
        "dropped only after {dropped_after:?}"
    );
    d.assert_alive("after a trickling client");
}

#[test]
fn the_control_socket_answers_while_another_client_is_silent() {
    let d = Daemon::builder().disk("vda", 16 * MIB).start();
    let ctl = d.run_dir.join(&d.vm_uuid).join("control.sock");
    let _silent = UnixStream::connect(&ctl).unwrap();
    let mut half = UnixStream::connect(&ctl).unwrap();
    half.write_all(br#"{"cmd":"sta"#).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let status = d.status_json();
    assert_eq!(status["disks"][0]["disk"], "vda", "{status}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "status took {:?} behind silent control clients",
        t.elapsed()
    );
}

/// A WRITE of the largest payload cdpd accepts, from connection `i` to its
/// own 32 MiB of the disk; every byte but the last is sent at once.
fn stalled_big_write(c: &mut Client, i: u64) -> std::io::Result<Vec<u8>> {
    let mut payload = vec![0u8; BIG as usize];
    fill_pseudo_random(100 + i, &mut payload);
    c.sock.write_all(&request_header(
        0,
        CMD_WRITE,
        500 + i,
        i * u64::from(BIG),
        BIG,
    ))?;
    c.sock.write_all(&payload[..BIG as usize - 1])?;
    Ok(payload)
}

#[test]
fn a_write_flood_on_every_connection_keeps_rss_bounded_and_every_write_lands() {
    let disk = MAX_CONNS as u64 * u64::from(BIG);
    let mut d = Daemon::builder().disk("vda", disk).start();
    let before = proc_status_kb(d.pid(), "VmHWM");
    // Every connection sends a 32 MiB WRITE but its last byte, then stalls
    // (a slow sender): 512 MiB sized by clients, which cdpd must not hold.
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = std::sync::Arc::new(std::sync::Mutex::new(go_rx));
    let writers: Vec<_> = (0..MAX_CONNS as u64)
        .map(|i| {
            let (mut c, _) = Client::open(&d.socket("vda"), "vda").unwrap();
            let go = go_rx.clone();
            std::thread::spawn(move || {
                let payload = stalled_big_write(&mut c, i).unwrap();
                let _ = go.lock().unwrap().recv();
                c.sock.write_all(&payload[BIG as usize - 1..]).unwrap();
                let r = c.read_reply().unwrap();
                assert_eq!((r.handle, r.error), (500 + i, 0), "write {i}");
                (payload, c)
            })
        })
        .collect();
    let during = watch_rss(&mut d, Duration::from_secs(4));
    eprintln!(
        "cdpd VmHWM: {} MiB before, {} MiB after 4 s of {MAX_CONNS} stalled 32 MiB WRITEs",
        before / 1024,
        during / 1024
    );
    for _ in 0..MAX_CONNS {
        go_tx.send(()).unwrap();
    }
    let t = Instant::now();
    let mut done = Vec::new();
    for w in writers {
        while !w.is_finished() {
            watch_rss(&mut d, Duration::from_millis(100));
            if t.elapsed() > Duration::from_secs(120) {
                d.fail("the WRITEs were not answered within 120 s");
            }
        }
        done.push(w.join().expect("a writer failed"));
    }
    let after = watch_rss(&mut d, Duration::ZERO);
    eprintln!(
        "cdpd VmHWM after every WRITE was answered: {} MiB ({:?})",
        after / 1024,
        t.elapsed()
    );
    for (i, (payload, c)) in done.into_iter().enumerate() {
        c.disconnect();
        let got = read_at(&d.image("vda"), i as u64 * u64::from(BIG), BIG as usize);
        assert!(got == payload, "write {i} did not land in the image");
    }
    d.assert_alive("after the WRITE flood");
}

#[test]
fn sigterm_stops_cdpd_while_big_writes_stall_and_others_wait_for_memory() {
    let mut d = Daemon::builder()
        .disk("vda", MAX_CONNS as u64 * u64::from(BIG))
        .start();
    let writers: Vec<_> = (0..MAX_CONNS as u64)
        .map(|i| {
            let (mut c, _) = Client::open(&d.socket("vda"), "vda").unwrap();
            std::thread::spawn(move || {
                // Blocks while cdpd does not read; fails once it is gone.
                let _ = stalled_big_write(&mut c, i);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = d.wait_exit(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "cdpd did not stop cleanly within 10 s of SIGTERM while WRITEs stalled: {status:?}\n{}",
        d.log()
    );
    eprintln!("cdpd stopped {:?} after SIGTERM", t.elapsed());
    for w in writers {
        w.join().unwrap();
    }
}

#[test]
fn a_control_client_dripping_its_request_is_dropped_at_the_deadline() {
    let mut d = Daemon::builder()
        .disk("vda", 16 * MIB)
        .args(["--control-timeout", "1s"])
        .start();
    let ctl = d.run_dir.join(&d.vm_uuid).join("control.sock");
    let mut s = UnixStream::connect(&ctl).unwrap();
    let t = Instant::now();
    // One byte every 250 ms: each well within the timeout, the whole
    // request (17 bytes, over 4 s) far beyond it.
    let mut dropped_after = None;
    for b in b"{\"cmd\":\"status\"}\n" {
        std::thread::sleep(Duration::from_millis(250));
        if s.write_all(&[*b]).is_err() {
            dropped_after = Some(t.elapsed());
            break;
        }
    }
    let dropped_after = dropped_after.unwrap_or_else(|| {
        d.fail(&format!(
            "cdpd still took control request bytes {:?} after the connection (control timeout 1 s)",
            t.elapsed()
        ))
    });
    assert!(
        dropped_after < Duration::from_secs(3),
        "dropped only after {dropped_after:?}"
    );
    assert_eq!(d.status_json()["disks"][0]["disk"], "vda");
    d.assert_alive("after a dripping control client");
}
