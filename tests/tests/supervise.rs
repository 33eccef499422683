//! cdpd comes back by itself (docs/RELIABILITY.md, "cdpd killed while QEMU
//! runs"): a real QEMU started through cdp-qemu, its disk on cdpd's socket;
//! cdpd is SIGKILLed and nobody restarts it by hand. The supervisor cdp-qemu
//! left behind starts a new cdpd within seconds, which recovers the journal
//! and records the killed session as a crash; QEMU's I/O (`qemu-io` through
//! its monitor) works again; when QEMU is killed, the supervisor and cdpd
//! exit and the session ends cleanly. And restarts are bounded: a cdpd that
//! cannot start any more is given up on, and the VM's log says so; the
//! supervisor then stays QEMU's running child (never a zombie) until QEMU ends.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cdp_core::control::Client;
use cdp_core::layout::{RunDir, StateDir};
use cdp_tests::fixture::{write_protected_domain_xml, KillOnDrop, Qmp};
use cdp_tests::guest::wait_until;
use cdp_tests::{bin, require_tool, run_ok};

const MIB: u64 = 1 << 20;

struct Vm {
    dir: tempfile::TempDir,
    uuid: &'static str,
    disk: PathBuf,
    cfg: PathBuf,
}

impl Vm {
    fn new(uuid: &'static str) -> Vm {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let disk = d.join("vda.raw");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(4 * MIB)
            .unwrap();
        let cfg = d.join("cdp.toml");
        std::fs::write(
            &cfg,
            format!(
                "[paths]\nstate_dir = \"{0}/state\"\nrun_dir = \"{0}/run\"\n[policy.default]\nsegment_age = \"200ms\"\n",
                d.display()
            ),
        )
        .unwrap();
        write_protected_domain_xml(&d.join("domain.xml"), "supervised", uuid, &disk);
        Vm {
            dir,
            uuid,
            disk,
            cfg,
        }
    }

    /// Wait for `f`, at most `secs`; on timeout fail with the VM's log.
    fn wait(&self, what: &str, secs: u64, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !f() {
            assert!(
                Instant::now() < deadline,
                "timed out after {secs} s waiting for {what}; the VM's log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn qmp_path(&self) -> PathBuf {
        self.dir.path().join("qmp.sock")
    }

    /// What qemu-io (through QEMU's monitor) printed.
    fn qemu_io_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("qemu-io.log")).unwrap_or_default()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("qemu.log")).unwrap_or_default()
    }

    /// QEMU (paused before its first instruction: only the block layer and
    /// the monitor work; `-machine none` would be taken for a probe),
    /// started through cdp-qemu. Its stderr is "the VM's log".
    fn start(&self) -> KillOnDrop {
        let qemu = Command::new(bin("cdp-qemu"))
            .arg("--vm-config")
            .arg(self.dir.path().join("domain.xml"))
            .arg("--qemu")
            .arg(require_tool("qemu-system-x86_64"))
            .arg("--config")
            .arg(&self.cfg)
            .args(["--", "-name", "guest=supervised", "-S", "-nodefaults"])
            .args([
                "-machine", "q35", "-m", "64", "-accel", "tcg", "-display", "none",
            ])
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                self.qmp_path().display()
            ))
            .arg("-blockdev")
            .arg(format!(
                r#"{{"driver":"file","filename":"{}","node-name":"d0-storage","discard":"unmap"}}"#,
                self.disk.display()
            ))
            .args([
                "-blockdev",
                r#"{"node-name":"d0","read-only":false,"driver":"raw","file":"d0-storage"}"#,
            ])
            .stdin(Stdio::null())
            // HMP's qemu-io prints its results on QEMU's stdout.
            .stdout(std::fs::File::create(self.dir.path().join("qemu-io.log")).unwrap())
            .stderr(std::fs::File::create(self.dir.path().join("qemu.log")).unwrap())
            .spawn()
            .unwrap();
        KillOnDrop(qemu)
    }

    fn control(&self) -> Client {
        Client::new(
            RunDir::new(self.dir.path().join("run"))
                .vm(self.uuid)
                .control_socket(),
        )
        .with_timeout(Duration::from_secs(2))
    }

    /// The pid of the cdpd answering on the control socket, if one does.
    fn cdpd_pid(&self) -> Option<u32> {
        self.control().status().ok().map(|s| s.pid)
    }

    /// (previous_end, end_kind) of each of the VM's sessions, oldest first.
    fn sessions(&self) -> Vec<(String, Option<String>)> {
        let cat = StateDir::new(self.dir.path().join("state"))
            .vm(self.uuid)
            .catalog();
        let db = rusqlite::Connection::open(cat).unwrap();
        let mut st = db
            .prepare("SELECT previous_end, end_kind FROM sessions ORDER BY id")
            .unwrap();
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        rows
    }
}

/// The supervisor: QEMU's child whose command line is `cdp-qemu --supervise …`.
fn supervisor_of(qemu: u32) -> Option<i32> {
    let children =
        std::fs::read_to_string(format!("/proc/{qemu}/task/{qemu}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("--supervise"))
                .unwrap_or(false)
        })
}

fn sigkill(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

fn read_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    cdp_tests::read_at(path, off, len)
}

#[test]
fn a_killed_cdpd_is_restarted_and_qemus_io_goes_on() {
    let vm = Vm::new("3c9a1f0e-5b2d-4e8f-9a7c-6d5e4f3a2b1c");
    let mut qemu = vm.start();
    vm.wait("cdpd to serve", 60, || vm.cdpd_pid().is_some());
    let first = vm.cdpd_pid().unwrap();
    let mut qmp = Qmp::connect(&vm.qmp_path());
    qmp.qemu_io("write -P 0x11 0 64k");
    qmp.qemu_io("flush");
    assert_eq!(read_at(&vm.disk, 0, 65536), vec![0x11; 65536]);

    // SIGKILL cdpd; nobody restarts it by hand.
    sigkill(first as i32);
    let killed_at = Instant::now();
    wait_until("the killed cdpd to be gone", 60, || {
        cdp_core::proc::is_gone(first as i32)
    });
    // The promise is "within QEMU's reconnect delay" (60 s): a loaded
    // machine may take seconds, an idle one well under one.
    vm.wait("a new cdpd serving the control socket", 60, || {
        vm.cdpd_pid().is_some_and(|p| p != first)
    });
    let second = vm.cdpd_pid().unwrap();
    let sup = supervisor_of(qemu.0.id()).expect("no supervisor under QEMU");
    assert!(
        killed_at.elapsed() < Duration::from_secs(60),
        "restart took {:?}, past QEMU's reconnect delay",
        killed_at.elapsed()
    );
    // QEMU's I/O goes on through the reconnected NBD client, to the image.
    qmp.qemu_io("write -P 0x22 64k 64k");
    qmp.qemu_io("flush");
    assert_eq!(read_at(&vm.disk, 65536, 65536), vec![0x22; 65536]);
    qmp.qemu_io("read -P 0x11 0 64k");
    qmp.qemu_io("read -P 0x22 64k 64k");
    assert!(
        qemu.0.try_wait().unwrap().is_none(),
        "QEMU died: {}",
        vm.log()
    );

    // The catalog: the restarted cdpd recovered the journal and recorded the
    // killed session as a crash.
    // qemu-io saw every request succeed (no "failed", no I/O error).
    let io = vm.qemu_io_log();
    assert_eq!(io.matches("wrote 65536/65536 bytes").count(), 2, "{io}");
    assert_eq!(io.matches("read 65536/65536 bytes").count(), 2, "{io}");
    assert!(!io.contains("fail") && !io.contains("error"), "{io}");

    let s = vm.sessions();
    assert_eq!(s.len(), 2, "{s:?}");
    assert_eq!(s[0].1.as_deref(), Some("crash"), "{s:?}");
    assert_eq!(s[1].0, "crash", "{s:?}");
    let log = vm.log();
    assert!(log.contains("restarting it"), "{log}");
    assert!(log.contains("previous run: crash"), "{log}");

    // QEMU goes away (killed, as libvirt's destroy does): the supervisor and
    // cdpd exit, and the session ends cleanly.
    qemu.0.kill().unwrap();
    qemu.0.wait().unwrap();
    vm.wait("the supervisor and cdpd to exit after QEMU", 60, || {
        cdp_core::proc::is_gone(sup) && cdp_core::proc::is_gone(second as i32)
    });
    let s = vm.sessions();
    assert_eq!(s.len(), 2, "{s:?}");
    assert_eq!(s[1].1.as_deref(), Some("clean"), "{s:?}\n{}", vm.log());

    // Nothing was lost: the journal replayed onto a zero disk is the image.
    let copy = vm.dir.path().join("replayed.raw");
    std::fs::File::create(&copy)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    run_ok(
        Command::new(bin("cdpctl"))
            .args([
                "journal",
                "replay",
                "--vm-uuid",
                vm.uuid,
                "--disk",
                "vda",
                "--onto",
            ])
            .arg(&copy)
            .arg("--config")
            .arg(&vm.cfg),
    );
    cdp_tests::assert_files_equal(&copy, &vm.disk);
}

#[test]
fn restarts_are_bounded_and_giving_up_is_logged() {
    let vm = Vm::new("4d0b2e1f-6c3e-4f90-8b8d-7e6f5a4b3c2d");
    let mut qemu = vm.start();
    vm.wait("cdpd to serve", 60, || vm.cdpd_pid().is_some());
    let first = vm.cdpd_pid().unwrap();
    // QEMU is up, connected to cdpd.
    let mut qmp = Qmp::connect(&vm.qmp_path());
    qmp.qemu_io("write -P 0x33 0 4k");
    let sup = supervisor_of(qemu.0.id()).expect("no supervisor under QEMU");
    // Every restart now fails at once: the image is gone.
    std::fs::rename(&vm.disk, vm.dir.path().join("moved.raw")).unwrap();
    sigkill(first as i32);
    vm.wait("the supervisor to give up", 60, || {
        vm.log().contains("not restarted again")
    });
    // Having given up, the supervisor stays alive under QEMU (an exited one
    // would be a zombie there: QEMU never waits for a child) and says why.
    vm.wait("the supervisor to say it waits for QEMU", 60, || {
        vm.log().contains("waiting for QEMU")
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        supervisor_of(qemu.0.id()),
        Some(sup),
        "no supervisor under QEMU any more: {}",
        vm.log()
    );
    assert!(
        running(sup),
        "the supervisor is not running (state {:?}) after giving up: {}",
        process_state(sup),
        vm.log()
    );
    let log = vm.log();
    // "… (rapid failure N of at most M)": M restarts, then none.
    let max: usize = log
        .split("of at most ")
        .nth(1)
        .and_then(|t| t.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no restart bound in the log: {log}"));
    assert!((1..=10).contains(&max), "{log}");
    let restarts = log.matches("restarting it in").count();
    assert_eq!(
        restarts, max,
        "one restart per rapid failure, then none: {log}"
    );
    assert!(vm.cdpd_pid().is_none());
    // QEMU itself is untouched by all this.
    assert!(qemu.0.try_wait().unwrap().is_none(), "QEMU died: {log}");
    // When QEMU ends, so does the supervisor.
    qemu.0.kill().unwrap();
    qemu.0.wait().unwrap();
    vm.wait("the supervisor to exit after QEMU", 60, || {
        cdp_core::proc::is_gone(sup)
    });
}

/// The state letter of /proc/PID/stat (R, S, Z, …), None when there is no
/// such process.
fn process_state(pid: i32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Alive and not a zombie: unlike `cdp_core::proc::is_gone`, a process that
/// exited but was never reaped is not running.
fn running(pid: i32) -> bool {
    process_state(pid).is_some_and(|c| c != 'Z' && c != 'X')
}
