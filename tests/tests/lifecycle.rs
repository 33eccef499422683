//! How cdpd's life ends: with its parent (cdp-qemu forks cdpd, then becomes
//! QEMU; when QEMU exits, capture must stop cleanly).

use std::io::BufRead;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use cdp_tests::{bin, Daemon};

/// Wait for a process that is not our child to exit (pidfd + poll).
fn wait_gone(pid: i32, timeout_ms: i32) -> bool {
    // SAFETY: pidfd_open takes two integers and returns a new descriptor (or -1).
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        // ESRCH: already gone. Anything else means this check cannot be made.
        assert_eq!(
            e.raw_os_error(),
            Some(libc::ESRCH),
            "pidfd_open({pid}): {e}"
        );
        return true;
    }
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes the one pollfd `p`, a live local.
    let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    // SAFETY: `fd` came from pidfd_open above and is closed once, here.
    unsafe { libc::close(fd) };
    n == 1
}

#[test]
fn stops_cleanly_when_its_parent_dies() {
    let mut d = Daemon::with_disk(1 << 20);
    d.term();
    // A parent shell that starts cdpd and waits; we kill the shell.
    let cmd = d.command(-1);
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .filter(|a| a != "--ready-fd" && a != "-1")
        .collect();
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let wfd = wr.as_raw_fd();
    let script = format!(
        "'{}' {} --die-with-parent --ready-fd {wfd} 2>>'{}' & echo $! ; wait",
        bin("cdpd").display(),
        args.iter()
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(" "),
        d.log_path.display()
    );
    let mut sh = Command::new("bash");
    sh.arg("-c").arg(&script).stdout(Stdio::piped());
    // SAFETY: only fcntl between fork and exec: the shell (and cdpd) inherit the pipe.
    unsafe {
        sh.pre_exec(move || {
            if libc::fcntl(wfd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut sh = sh.spawn().unwrap();
    drop(wr);
    let mut line = String::new();
    std::io::BufReader::new(sh.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pid: i32 = line.trim().parse().unwrap();
    // Wait until it serves (READY on its ready fd), then kill the parent.
    let mut ready = String::new();
    std::io::BufReader::new(std::fs::File::from(rd))
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "READY", "{}", d.log());
    let ctl = d.run_dir.join(&d.vm_uuid).join("control.sock");
    sh.kill().unwrap();
    sh.wait().unwrap();
    assert!(
        wait_gone(pid, 20_000),
        "cdpd outlived its parent by 20 s\n{}",
        d.log()
    );
    let recs = d.journal_records();
    let last = recs.last().unwrap();
    assert_eq!(last["kind"], "SESSION_END", "{last}\n{}", d.log());
    assert!(!ctl.exists(), "control socket left behind");
}

#[test]
fn stops_even_when_its_sockets_were_removed() {
    let mut d = Daemon::with_disk(1 << 20);
    // Someone cleaned the run directory under it (a test's tempdir, a tmpfiles rule).
    std::fs::remove_dir_all(d.run_dir.join(&d.vm_uuid)).unwrap();
    d.term();
    let recs = d.journal_records();
    assert_eq!(recs.last().unwrap()["kind"], "SESSION_END");
}
