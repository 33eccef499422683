//! `cdpctl export`: a point served read-only over NBD, from the repository
//! alone, equals the reference copy taken at that point (by seq, by time, by
//! mark); a qcow2 overlay on top of it runs a "VM" without changing it;
//! writes are refused; a corrupt object gives EIO, never wrong bytes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use cdp_tests::fixture::{cdpctl, config, qemu_io};
use cdp_tests::nbd::{self, Client};
use cdp_tests::{
    bin, qemu_img_compare, read_at, require_tool, run, run_ok, wait_child, Daemon, STOP_TIMEOUT,
};

const MIB: u64 = 1 << 20;
const DISK: u64 = 16 * MIB;

fn global(c: &mut Command, d: &Daemon, cfg: &Path) {
    c.arg("--state-dir")
        .arg(&d.state_dir)
        .arg("--run-dir")
        .arg(&d.run_dir)
        .arg("--config")
        .arg(cfg);
}

/// The common phase of writes, plus one write across several segment
/// frames' worth of data. Everything lands in the first 8 MiB of the disk.
fn phase(i: u64) -> Vec<String> {
    let mut v = cdp_tests::fixture::phase(i);
    v.insert(12, format!("write -P {} {} 1536k", 200 + i, (i % 3) * MIB));
    v
}

struct Snapshot {
    copy: PathBuf,
    seq: u64,
    time: String,
    mark: String,
}

/// A repository holding a baseline and three phases of writes, with a
/// reference copy of the image at each; the host's local state deleted.
fn repository(seed: u64) -> (Daemon, PathBuf, PathBuf, Vec<Snapshot>) {
    let mut d = Daemon::builder()
        .disk_random("vda", DISK, seed)
        .args(["--segment-age", "30ms"])
        .start();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d, &repo);
    cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);
    let mut snaps = Vec::new();
    for i in 0..3 {
        qemu_io(&d, "vda", &phase(i));
        let mark = format!("phase-{i}");
        cdpctl(&d, &cfg, &["mark", &d.vm_uuid, &mark]);
        let seq = d.status_json()["last_seq"].as_u64().unwrap();
        let copy = d.work_dir().join(format!("vda-ref-{i}.img"));
        std::fs::copy(d.image("vda"), &copy).unwrap();
        let time = humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();
        snaps.push(Snapshot {
            copy,
            seq,
            time,
            mark,
        });
        std::thread::sleep(Duration::from_millis(5));
    }
    d.term();
    run_ok(
        Command::new(bin("cdp-shipper"))
            .args(["run", "--once", "--vm-uuid", &d.vm_uuid])
            .arg("--state-dir")
            .arg(&d.state_dir)
            .arg("--run-dir")
            .arg(&d.run_dir)
            .arg("--config")
            .arg(&cfg),
    );
    // The host's state is gone: only the repository is left.
    std::fs::remove_dir_all(&d.state_dir).unwrap();
    std::fs::create_dir_all(&d.state_dir).unwrap();
    (d, cfg, repo, snaps)
}

/// A running `cdpctl export`.
struct Export {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl Export {
    /// Start `cdpctl export VM --disk vda --at AT EXTRA…` on a socket of its
    /// own and wait for READY (written to its stdout, given as --ready-fd 1).
    fn start(d: &Daemon, cfg: &Path, name: &str, at: &str, extra: &[&str]) -> Export {
        let socket = d.work_dir().join(format!("{name}.sock"));
        let log = d.work_dir().join(format!("{name}.log"));
        let mut c = Command::new(bin("cdpctl"));
        c.args(["export", &d.vm_uuid, "--disk", "vda", "--at", at])
            .arg("--socket")
            .arg(&socket)
            .args(["--ready-fd", "1"])
            .args(extra);
        global(&mut c, d, cfg);
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let e = Export {
            child: Some(child),
            socket,
            log,
        };
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) if l.trim_end() == "READY" => {}
            other => panic!(
                "cdpctl export did not say READY ({other:?}):\n{}",
                e.stderr()
            ),
        }
        assert!(e.socket.exists());
        e
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///vda?socket={}", self.socket.display())
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM: a clean exit that removes the socket. Returns its stderr.
    fn stop(mut self) -> String {
        let child = self.child.take().unwrap();
        run_ok(Command::new("kill").args(["-TERM", &child.id().to_string()]));
        let st = wait_child(child, STOP_TIMEOUT).expect("cdpctl export did not stop");
        let log = self.stderr();
        assert!(st.success(), "cdpctl export exited with {st}:\n{log}");
        assert!(!self.socket.exists(), "the socket was left behind");
        log
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            if std::thread::panicking() {
                eprintln!("--- cdpctl export stderr ---\n{}", self.stderr());
            }
        }
    }
}

#[test]
fn export_of_each_point_equals_its_reference_copy_with_the_host_gone() {
    let (d, cfg, repo, snaps) = repository(31);
    let url = format!("file://{}", repo.display());
    for (i, s) in snaps.iter().enumerate() {
        for (how, at) in [
            ("seq", format!("seq:{}", s.seq)),
            ("time", s.time.clone()),
            ("mark", format!("mark:{}", s.mark)),
        ] {
            // By the policy's target, and by --repo.
            let extra: &[&str] = if how == "time" {
                &["--repo", &url]
            } else {
                &[]
            };
            let e = Export::start(&d, &cfg, &format!("x-{i}-{how}"), &at, extra);
            qemu_img_compare(s.copy.as_os_str(), e.uri().as_ref());
            let log = e.stop();
            assert!(
                log.contains("serving vda at") && log.contains("nbd+unix:///vda?socket="),
                "{log}"
            );
        }
    }
    // Several clients at once, through the same cache.
    let e = Export::start(&d, &cfg, "many", &format!("mark:{}", snaps[1].mark), &[]);
    let uri = e.uri();
    let ts: Vec<_> = (0..4)
        .map(|_| {
            let (a, b) = (snaps[1].copy.clone(), uri.clone());
            std::thread::spawn(move || qemu_img_compare(a.as_os_str(), b.as_ref()))
        })
        .collect();
    for t in ts {
        t.join().unwrap();
    }
    // The socket is the owner's only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&e.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    e.stop();

    // A point that cannot be rebuilt is refused, saying why, before any socket.
    let past = format!("seq:{}", snaps.last().unwrap().seq + 1_000_000);
    for (at, why) in [
        ("mark:nope", "no mark \"nope\""),
        (past.as_str(), "after the newest record"),
    ] {
        let sock = d.work_dir().join("refused.sock");
        let mut c = Command::new(bin("cdpctl"));
        c.args(["export", &d.vm_uuid, "--disk", "vda", "--at", at])
            .arg("--socket")
            .arg(&sock);
        global(&mut c, &d, &cfg);
        let out = run(&mut c);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{at}: {err}");
        if at == past {
            // Names the nearest restorable point: the newest, before it.
            assert!(
                err.contains("nearest restorable: seq:") && err.trim_end().ends_with(") before"),
                "{at}: {err}"
            );
        }
        assert!(!sock.exists());
    }
}

#[test]
fn the_export_is_read_only_and_survives_misbehaving_clients() {
    let (d, cfg, _repo, snaps) = repository(32);
    let s = &snaps[2];
    let e = Export::start(&d, &cfg, "ro", &format!("seq:{}", s.seq), &[]);

    // nbdinfo sees a read-only export of the disk's size.
    let out = run_ok(
        Command::new(require_tool("nbdinfo"))
            .arg("--json")
            .arg(e.uri()),
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ex = &info["exports"][0];
    assert_eq!(ex["is_read_only"], true, "{info}");
    assert_eq!(ex["export-size"], DISK, "{info}");
    assert_eq!(ex["export-name"], "vda", "{info}");

    // Raw protocol: reads answer, every kind of write is refused with EPERM,
    // FLUSH is a no-op, anything else EINVAL.
    let (mut c, info) = Client::open(&e.socket, "").unwrap();
    assert_eq!(info.size, DISK);
    assert_ne!(info.transmission_flags & 2, 0, "NBD_FLAG_READ_ONLY");
    assert_eq!(c.write(4096, &[1u8; 4096], 0).unwrap(), nbd::EPERM);
    for kind in [nbd::CMD_TRIM, nbd::CMD_WRITE_ZEROES] {
        assert_eq!(c.request(0, kind, 0, 4096, &[]).unwrap().error, nbd::EPERM);
    }
    assert_eq!(c.flush().unwrap(), 0);
    assert_eq!(c.request(0, 5, 0, 4096, &[]).unwrap().error, nbd::EINVAL);
    assert_eq!(c.read(DISK - 512, 1024).unwrap(), Err(nbd::EINVAL));
    for (off, len) in [
        (0, 4096u32),
        (MIB - 100, 300),
        (3 * MIB, 2 << 20),
        (DISK - 4096, 4096),
    ] {
        let got = c.read(off, len).unwrap().unwrap();
        assert_eq!(
            got,
            read_at(&s.copy, off, len as usize),
            "read at {off}+{len}"
        );
    }
    // Pipelined reads are all answered (in any order).
    let mut want = std::collections::HashMap::new();
    for k in 0..64u64 {
        let off = (k * 997 * 4096) % (DISK - 65536);
        let h = c.send_request(0, nbd::CMD_READ, off, 65536, &[]).unwrap();
        want.insert(h, off);
    }
    while !want.is_empty() {
        let r = c.read_reply().unwrap();
        assert_eq!(r.error, 0);
        let off = want.remove(&r.handle).expect("a reply for a request sent");
        let mut data = vec![0u8; 65536];
        std::io::Read::read_exact(&mut c.sock, &mut data).unwrap();
        assert_eq!(data, read_at(&s.copy, off, 65536));
    }
    c.disconnect();
    // An unknown export name is refused.
    let mut c = Client::connect_newstyle(&e.socket).unwrap();
    assert!(c.go("vdb").is_err());
    assert_eq!(c.list().unwrap(), vec!["vda".to_string()]);
    // Garbage, a huge write, a client that vanishes mid-request: each ends
    // its own connection only.
    let (mut c, _) = Client::open(&e.socket, "vda").unwrap();
    std::io::Write::write_all(&mut c.sock, &[0xffu8; 28]).unwrap();
    assert!(c.expect_closed());
    let (mut c, _) = Client::open(&e.socket, "vda").unwrap();
    let r = c.request(0, nbd::CMD_WRITE, 0, 64 << 20, &[]).unwrap();
    assert_eq!(r.error, nbd::EOVERFLOW);
    assert!(c.expect_closed());
    let (mut c, _) = Client::open(&e.socket, "vda").unwrap();
    c.send_request(0, nbd::CMD_READ, 0, 32 << 20, &[]).unwrap();
    drop(c);
    let mut c = Client::connect(&e.socket).unwrap();
    std::io::Write::write_all(&mut c.sock, &[0, 0, 0, 1, 0x49]).unwrap();
    drop(c);
    // qemu-io cannot open it for writing.
    let out = run(Command::new(require_tool("qemu-io"))
        .args(["-f", "raw", "-c", "write 0 4k"])
        .arg(e.uri()));
    assert!(
        !out.status.success() || String::from_utf8_lossy(&out.stdout).contains("not permitted"),
        "{out:?}"
    );
    // Still serving, still the same bytes.
    qemu_img_compare(s.copy.as_os_str(), e.uri().as_ref());
    e.stop();
}

#[test]
fn a_qcow2_overlay_on_the_export_is_writable_and_the_export_stays_unchanged() {
    let (d, cfg, _repo, snaps) = repository(33);
    let s = &snaps[1];
    let e = Export::start(&d, &cfg, "vm", &format!("mark:{}", s.mark), &[]);
    let overlay = d.work_dir().join("overlay.qcow2");
    run_ok(
        Command::new(require_tool("qemu-img"))
            .args(["create", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(e.uri())
            .arg(&overlay),
    );
    // The "VM" writes and reads back through the overlay.
    run_ok(
        Command::new(require_tool("qemu-io"))
            .args(["-f", "qcow2"])
            .args(["-c", "write -P 0xab 1M 64k"])
            .args(["-c", "write -z 5M 8k"])
            .args(["-c", "read -P 0xab 1M 64k"])
            .args(["-c", "read -P 0 5M 8k"])
            .arg(&overlay),
    );
    let flat = d.work_dir().join("overlay.raw");
    run_ok(
        Command::new(require_tool("qemu-img"))
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(&overlay)
            .arg(&flat),
    );
    let mut want = std::fs::read(&s.copy).unwrap();
    want[MIB as usize..(MIB + 65536) as usize].fill(0xab);
    want[(5 * MIB) as usize..(5 * MIB + 8192) as usize].fill(0);
    assert!(std::fs::read(&flat).unwrap() == want, "overlay contents");
    // The export itself did not change.
    qemu_img_compare(s.copy.as_os_str(), e.uri().as_ref());
    e.stop();
}

#[test]
fn corrupt_objects_give_eio_never_wrong_bytes() {
    let (d, cfg, repo, snaps) = repository(34);
    let s = &snaps[2];
    let at = format!("seq:{}", s.seq);
    // The baseline chunk of 12 MiB..13 MiB: no journal record touches it.
    let vm_dir = repo.join("cdp/v1/vms").join(&d.vm_uuid).join("vda");
    let bl = std::fs::read_dir(vm_dir.join("baselines"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let bl: serde_json::Value = serde_json::from_slice(&std::fs::read(bl).unwrap()).unwrap();
    let hash = bl["chunks"][12].as_str().unwrap().to_string();
    let chunk = repo.join("cdp/v1/chunks").join(&hash[..2]).join(&hash);
    flip_middle_byte(&chunk);

    let e = Export::start(&d, &cfg, "bad-chunk", &at, &[]);
    let (mut c, _) = Client::open(&e.socket, "vda").unwrap();
    for _ in 0..2 {
        assert_eq!(c.read(12 * MIB + 4096, 4096).unwrap(), Err(nbd::EIO));
        assert_eq!(c.read(13 * MIB - 512, 1024).unwrap(), Err(nbd::EIO));
    }
    for (off, len) in [(0, 65536u32), (11 * MIB, 4096), (13 * MIB, 1 << 20)] {
        let got = c.read(off, len).unwrap().unwrap();
        assert_eq!(got, read_at(&s.copy, off, len as usize), "read at {off}");
    }
    c.disconnect();
    let out = run(Command::new("qemu-img")
        .args(["compare", "-U", "-f", "raw", "-F", "raw"])
        .arg(&s.copy)
        .arg(e.uri()));
    assert!(
        !out.status.success(),
        "a compare through a corrupt chunk succeeded"
    );
    let log = e.stop();
    assert!(
        log.contains("content does not match its hash") || log.contains("decompressing"),
        "{log}"
    );

    // Every journal segment corrupt: reads of journal data fail, and every
    // read that succeeds gives the right bytes.
    for f in std::fs::read_dir(vm_dir.join("journal")).unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_some_and(|x| x == "zst") {
            flip_middle_byte(&p);
        }
    }
    let e = Export::start(&d, &cfg, "bad-segments", &at, &[]);
    let (mut c, _) = Client::open(&e.socket, "vda").unwrap();
    let mut failed = 0;
    for off in (0..DISK).step_by(64 << 10) {
        match c.read(off, 64 << 10).unwrap() {
            Ok(data) => assert!(
                data == read_at(&s.copy, off, 64 << 10),
                "wrong bytes at {off}"
            ),
            Err(err) => {
                assert_eq!(err, nbd::EIO);
                failed += 1;
            }
        }
    }
    assert!(failed > 0, "no read failed with every segment corrupt");
    c.disconnect();
    e.stop();
}

fn flip_middle_byte(p: &Path) {
    let mut b = std::fs::read(p).unwrap();
    let i = b.len() / 2;
    b[i] ^= 0x5a;
    std::fs::write(p, b).unwrap();
}

#[test]
fn unshipped_local_records_are_served_even_after_the_files_are_trimmed() {
    let mut d = Daemon::builder()
        .disk_random("vda", DISK, 35)
        .args(["--segment-age", "30ms"])
        .start();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d, &repo);
    cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);
    qemu_io(&d, "vda", &phase(0));
    run_ok(
        Command::new(bin("cdp-shipper"))
            .args(["run", "--once", "--vm-uuid", &d.vm_uuid])
            .arg("--state-dir")
            .arg(&d.state_dir)
            .arg("--run-dir")
            .arg(&d.run_dir)
            .arg("--config")
            .arg(&cfg),
    );
    // Newer records, on this host only.
    qemu_io(&d, "vda", &phase(1));
    cdpctl(&d, &cfg, &["mark", &d.vm_uuid, "local"]);
    let copy = d.work_dir().join("ref.img");
    std::fs::copy(d.image("vda"), &copy).unwrap();
    qemu_io(&d, "vda", &phase(2));
    d.term();
    let e = Export::start(&d, &cfg, "local", "mark:local", &[]);
    // The shipper trims the local segments while the export runs.
    std::fs::remove_dir_all(d.state_dir.join("vms")).unwrap();
    qemu_img_compare(copy.as_os_str(), e.uri().as_ref());
    e.stop();
}

/// Run `cdpctl export` on `socket` expecting it to fail at once; returns
/// (its --ready-fd report, its stderr).
fn export_refused(d: &Daemon, cfg: &Path, socket: &Path) -> (String, String) {
    let mut c = Command::new(bin("cdpctl"));
    c.args(["export", &d.vm_uuid, "--disk", "vda", "--at", "latest"])
        .arg("--socket")
        .arg(socket)
        .args(["--ready-fd", "1"]);
    global(&mut c, d, cfg);
    let out = run(&mut c);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(!out.status.success(), "export started:\n{stderr}");
    (stdout, stderr)
}

#[test]
fn the_socket_replaces_a_stale_one_but_never_a_live_server_or_a_file() {
    let (d, cfg, _repo, snaps) = repository(34);

    // A file that is not a socket is left alone, and the start fails saying so
    // (on stderr and through --ready-fd).
    let file = d.work_dir().join("plain.sock");
    std::fs::write(&file, b"keep me").unwrap();
    let (ready, err) = export_refused(&d, &cfg, &file);
    assert!(err.contains("exists and is not a socket"), "{err}");
    assert!(ready.starts_with("ERROR "), "{ready:?}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    // A stale socket (its server gone) is replaced.
    let stale = d.work_dir().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let e = Export::start(&d, &cfg, "stale", "latest", &[]);
    assert_eq!(e.socket, stale);

    // A live one is not taken over: the second start fails, the first
    // still serves the same bytes.
    let (_, err) = export_refused(&d, &cfg, &e.socket);
    assert!(err.contains("already served by another process"), "{err}");
    qemu_img_compare(snaps[2].copy.as_os_str(), e.uri().as_ref());
    e.stop();
}
