//! Small process helpers: liveness, the parent-death signal and the
//! `--ready-fd` start-up report (docs/DESIGN.md, "Start-up contract").

use std::io::{self, Write};
use std::os::fd::{FromRawFd, RawFd};

/// Has process `pid` exited? A zombie counts as exited: its parent may never
/// reap it (a child of QEMU after QEMU died, under an init that does not reap).
pub fn is_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // "pid (comm) S …": the state follows the last ')'.
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X"),
    }
}

/// Ask the kernel for SIGTERM when the parent exits (PR_SET_PDEATHSIG). If
/// the parent is already gone, signal ourselves now.
pub fn die_with_parent() -> io::Result<()> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::{getpid, getppid};
    let parent = getppid();
    nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
    if parent.as_raw() == 1 || getppid() != parent {
        kill(getpid(), Signal::SIGTERM)?;
    }
    Ok(())
}

/// Tell the parent we are ready (or why not) on the `--ready-fd` pipe: one
/// line, `READY` or `ERROR <reason>`, then the pipe is closed.
///
/// `fd` must be the write end the parent passed on the command line; it is
/// consumed (closed) here, so call this once.
pub fn notify_ready(fd: RawFd, msg: &str) {
    // SAFETY: the parent handed us `fd` (`--ready-fd`) for this one report;
    // nothing else in the process owns or uses it, and it is closed when
    // the File drops.
    let mut pipe = unsafe { std::fs::File::from_raw_fd(fd) };
    // The parent may have died: nothing to report to then.
    let _ = pipe.write_all(format!("{msg}\n").as_bytes());
}

#[cfg(test)]
mod tests {
    #[test]
    fn self_is_alive_and_a_reaped_child_is_gone() {
        assert!(!super::is_gone(std::process::id() as i32));
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id() as i32;
        // Exited but not reaped yet: a zombie, gone for our purposes.
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(super::is_gone(pid));
        c.wait().unwrap();
        assert!(super::is_gone(pid));
    }

    #[test]
    fn notify_ready_writes_one_line_and_closes() {
        use std::io::Read;
        use std::os::fd::IntoRawFd;
        let (r, w) = nix::unistd::pipe().unwrap();
        super::notify_ready(w.into_raw_fd(), "ERROR no disk");
        let mut s = String::new();
        std::fs::File::from(r).read_to_string(&mut s).unwrap();
        assert_eq!(s, "ERROR no disk\n");
    }
}
