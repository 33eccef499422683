//! End to end with a real guest booting through cdp-qemu (TCG): capture
//! from the first I/O of boot, shipping, restore at the guest's markers; and
//! a cdpd killed under a writing guest pauses its I/O and loses nothing.

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cdp_tests::guest::wait_until;
use cdp_tests::{bin, require_tool, run, run_ok};

const MIB: u64 = 1 << 20;

struct Vm {
    dir: tempfile::TempDir,
    disk: PathBuf,
    cfg: PathBuf,
    dom: PathBuf,
    repo: PathBuf,
    uuid: &'static str,
}

fn setup(with_target: bool, uuid: &'static str) -> Vm {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disk = d.join("guest.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let repo = d.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = d.join("cdp.toml");
    let mut c = format!(
        "[paths]\nstate_dir = \"{0}/state\"\nrun_dir = \"{0}/run\"\n[policy.default]\nsegment_age = \"200ms\"\n",
        d.display()
    );
    if with_target {
        c.push_str("targets = [\"primary\"]\n");
        c.push_str(&format!(
            "[target.primary]\nurl = \"file://{}\"\n",
            repo.display()
        ));
    }
    std::fs::write(&cfg, c).unwrap();
    let dom = d.join("domain.xml");
    std::fs::write(
        &dom,
        format!(
            r#"<domain type='qemu'>
  <name>e2e</name>
  <uuid>{uuid}</uuid>
  <metadata>
    <cdp:protection xmlns:cdp="urn:cdpd:protection:1"><cdp:disk target="vda"/></cdp:protection>
  </metadata>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>"#,
            disk.display()
        ),
    )
    .unwrap();
    Vm {
        dir,
        disk,
        cfg,
        dom,
        repo,
        uuid,
    }
}

impl Vm {
    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Boot through cdp-qemu; returns the QEMU child (serial on stdout).
    fn boot(&self, append: &str) -> Child {
        let (kernel, initrd) = cdp_tests::guest::build();
        Command::new(bin("cdp-qemu"))
            .arg("--vm-config")
            .arg(&self.dom)
            .arg("--qemu")
            .arg(require_tool("qemu-system-x86_64"))
            .arg("--config")
            .arg(&self.cfg)
            .args(["--", "-name", "guest=e2e,debug-threads=on", "-accel", "tcg"])
            .args(["-machine", "q35", "-m", "256", "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot"])
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .arg("-append")
            .arg(format!("console=ttyS0 quiet panic=-1 {append}"))
            .arg("-blockdev")
            .arg(format!(
                r#"{{"driver":"file","filename":"{}","node-name":"d0-storage","auto-read-only":true,"discard":"unmap"}}"#,
                self.disk.display()
            ))
            .args(["-blockdev", r#"{"node-name":"d0","read-only":false,"driver":"raw","file":"d0-storage"}"#])
            .args(["-device", "virtio-blk-pci,drive=d0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(self.dir.path().join("qemu.log")).unwrap())
            .spawn()
            .unwrap()
    }

    fn cdpctl(&self, args: &[&str]) -> String {
        let out = run(Command::new(bin("cdpctl"))
            .args(args)
            .arg("--config")
            .arg(&self.cfg));
        assert!(
            out.status.success(),
            "cdpctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("qemu.log")).unwrap_or_default()
    }
}

/// Serve the disk once with cdpd (so the host knows the VM), then take the
/// baseline offline, before the first protected boot.
fn prime(vm: &Vm) {
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let wfd = wr.as_raw_fd();
    let mut c = Command::new(bin("cdpd"));
    c.args(["run", "--vm-uuid", vm.uuid, "--vm-name", "e2e"])
        .arg("--disk")
        .arg(format!("vda={}", vm.disk.display()))
        .arg("--config")
        .arg(&vm.cfg)
        .args(["--ready-fd", &wfd.to_string()]);
    // SAFETY: between fork and exec the closure only calls fcntl (async-signal-safe) to
    // clear FD_CLOEXEC on the pipe's write end, so cdpd inherits exactly that descriptor.
    unsafe {
        c.pre_exec(move || {
            libc::fcntl(wfd, libc::F_SETFD, 0);
            Ok(())
        });
    }
    let mut child = c.spawn().unwrap();
    drop(wr);
    let mut line = String::new();
    BufReader::new(std::fs::File::from(rd))
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "READY");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    vm.cdpctl(&["baseline", vm.uuid]);
}

/// Read serial lines until `until`, stamping each marker with the host's time.
fn read_markers(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    until: &str,
) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    for l in lines {
        let l = l.unwrap();
        if let Some(rest) = l.strip_prefix("CDP-MARKER ") {
            let k: u64 = rest.split_whitespace().next().unwrap().parse().unwrap();
            out.push((
                k,
                humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string(),
            ));
        }
        assert!(!l.contains("CDP-ERROR"), "guest: {l}");
        if l.starts_with(until) {
            return out;
        }
    }
    panic!("the guest's console ended before {until}: markers so far {out:?}");
}

/// A child killed when dropped, so a failing test leaves no VM running.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pid_gone(pid: i32) -> bool {
    cdp_core::proc::is_gone(pid)
}

/// Processes whose command line contains all of `words`.
fn pids_with(words: &[&str]) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if words.iter().all(|w| cmd.contains(w)) {
            out.push(pid);
        }
    }
    out
}

/// The disk after phases 1..=k of the guest's default mode.
fn expected(k: u64) -> Vec<u8> {
    let mut v = vec![0u8; 64 * MIB as usize];
    for p in 1..=k {
        v[(p * MIB) as usize..((p + 1) * MIB) as usize].fill(p as u8);
        let o = (16 * MIB + p * 4096) as usize;
        v[o..o + 4096].fill(0xA0 + p as u8);
    }
    v
}

#[test]
fn boots_protected_from_the_first_write_and_restores_at_each_marker() {
    let vm = setup(true, "5d1c8e2a-7b3f-4a6d-9e0c-1f2a3b4c5d6e");
    let uuid = vm.uuid;
    prime(&vm);
    let mut qemu = Guard(vm.boot(""));
    let mut lines = BufReader::new(qemu.0.stdout.take().unwrap()).lines();
    let markers = read_markers(&mut lines, "CDP-DONE");
    assert_eq!(
        markers.iter().map(|m| m.0).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "{}",
        vm.log()
    );
    assert!(qemu.0.wait().unwrap().success(), "{}", vm.log());
    // QEMU is gone: cdpd stops with it, the shipper drains and exits.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pids_with(&[uuid]).into_iter().all(pid_gone) {
        if Instant::now() > deadline {
            let left: Vec<String> = pids_with(&[uuid])
                .into_iter()
                .filter(|p| !pid_gone(*p))
                .map(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                        .unwrap_or_default()
                        .replace('\0', " ")
                })
                .collect();
            panic!("still running after QEMU exited: {left:?}\n{}", vm.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // Capture from boot: the guest's first write is journaled after SESSION_START,
    // before its first marker.
    let url = format!("file://{}", vm.repo.display());
    let store = cdp_repo::store::Store::open(&url, None).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let chain = rt
        .block_on(cdp_repo::read::load_chain(&store, uuid, "vda"))
        .unwrap();
    assert!(chain.problems().is_empty(), "{:?}", chain.problems());
    let entries: Vec<_> = chain
        .segments
        .iter()
        .flat_map(|s| s.entries.clone())
        .collect();
    let starts: Vec<usize> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.kind == cdp_core::journal::Kind::SessionStart)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(starts.len(), 2, "priming run + the boot");
    let first_write = entries[starts[1]..]
        .iter()
        .find(|e| e.kind == cdp_core::journal::Kind::Write)
        .expect("a WRITE after the boot's SESSION_START");
    let m1 = cdp_core::time::parse_time(&markers[0].1, 0).unwrap();
    assert!(
        first_write.ts_ns < m1,
        "first write at {} is not before marker 1",
        first_write.ts_ns
    );
    assert!(entries.last().unwrap().kind == cdp_core::journal::Kind::SessionEnd);
    // The VM definition is in the repository.
    let configs = rt
        .block_on(store.list(&format!("cdp/v1/vms/{uuid}/config/")))
        .unwrap();
    assert_eq!(configs.len(), 1, "{configs:?}");

    // Restore at each marker, from the repository alone.
    std::fs::remove_dir_all(vm.state()).unwrap();
    for (k, t) in &markers {
        let out = vm.dir.path().join(format!("at-{k}.raw"));
        vm.cdpctl(&[
            "restore",
            uuid,
            "--disk",
            "vda",
            "--at",
            t,
            "--output",
            out.to_str().unwrap(),
            "--repo",
            &url,
        ]);
        let got = std::fs::read(&out).unwrap();
        assert!(
            got == expected(*k),
            "restore at marker {k} ({t}) differs from the guest's pattern"
        );
    }
}

#[test]
fn a_killed_cdpd_pauses_guest_io_and_loses_nothing() {
    let vm = setup(false, "7e2d9f3b-8c4a-4b5e-8f1d-2a3b4c5d6e7f");
    let uuid = vm.uuid;
    let mut qemu = Guard(vm.boot("cdp.wait"));
    let mut lines = BufReader::new(qemu.0.stdout.take().unwrap()).lines();
    let _ = read_markers(&mut lines, "CDP-MARKER 2");
    let cdpd = pids_with(&["cdpd", "run", uuid]);
    assert_eq!(cdpd.len(), 1, "{cdpd:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(cdpd[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Nobody restarts it by hand: the supervisor cdp-qemu left under QEMU does
    // (docs/RELIABILITY.md, "cdpd killed while QEMU runs").
    let killed = cdpd[0];
    wait_until("the killed cdpd to be gone", 10, || {
        cdp_core::proc::is_gone(killed)
    });
    // The guest goes on writing through QEMU's reconnect.
    let more = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        read_markers(&mut lines, "CDP-MARKER 6")
    }))
    .unwrap_or_else(|_| {
        panic!(
            "guest failed after the cdpd restart; QEMU said:\n{}",
            vm.log()
        )
    });
    assert!(
        more.len() >= 3,
        "guest I/O did not resume: {more:?}\n{}",
        vm.log()
    );
    let again: Vec<i32> = pids_with(&["cdpd", "run", uuid])
        .into_iter()
        .filter(|p| !pid_gone(*p))
        .collect();
    assert_eq!(
        again.len(),
        1,
        "one restarted cdpd: {again:?}\n{}",
        vm.log()
    );
    assert_ne!(again[0], killed);
    qemu.0.kill().unwrap();
    qemu.0.wait().unwrap();
    // QEMU gone: the supervisor stops the restarted cdpd cleanly.
    wait_until("the restarted cdpd to stop after QEMU", 30, || {
        pid_gone(again[0])
    });
    // The journal is complete: replayed onto the initial (zero) disk it equals the image.
    let copy = vm.dir.path().join("replayed.raw");
    std::fs::File::create(&copy)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    run_ok(
        Command::new(bin("cdpctl"))
            .args([
                "journal",
                "replay",
                "--vm-uuid",
                uuid,
                "--disk",
                "vda",
                "--onto",
            ])
            .arg(&copy)
            .arg("--config")
            .arg(&vm.cfg),
    );
    assert!(
        std::fs::read(&copy).unwrap() == std::fs::read(&vm.disk).unwrap(),
        "replay differs from the image"
    );
    let j = run_ok(
        Command::new(bin("cdpctl"))
            .args(["journal", "inspect", "--vm-uuid", uuid, "--json"])
            .arg("--config")
            .arg(&vm.cfg),
    );
    let j: serde_json::Value = serde_json::from_slice(&j.stdout).unwrap();
    let starts: Vec<_> = j["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "SESSION_START")
        .collect();
    assert_eq!(starts.len(), 2);
    assert_eq!(starts[1]["info"]["previous_end"], "crash");
}
