//! The cdpd supervisor (docs/DESIGN.md, "Processes"): a small process that
//! cdp-qemu starts before it becomes QEMU, which starts cdpd and starts it
//! again when it dies while QEMU runs.
//!
//! QEMU cannot fork (libvirt's `-sandbox …,spawn=deny`), so it cannot restart
//! cdpd itself; its NBD client waits `reconnect-delay` seconds
//! ([`crate::argv::RECONNECT_DELAY`]) for the socket to come back. The
//! supervisor is QEMU's child (it gets SIGTERM when QEMU ends, through
//! PR_SET_PDEATHSIG) and cdpd is the supervisor's (cdpd stops cleanly when
//! the supervisor ends, the same way). A restarted cdpd recovers the journal
//! before it listens, as every cdpd start does, and records the previous
//! session as a crash.
//!
//! Command line (internal, never libvirt's): `cdp-qemu --supervise
//! --ready-fd W --args-fd R`. cdpd's argv comes NUL-separated on `R` (so the
//! supervisor's own command line names no VM: tools that look for a VM's
//! cdpd by its arguments find cdpd only). The first cdpd's `READY` or
//! `ERROR …` is relayed on `W`; a cdpd that cannot start the first time is
//! not restarted (the VM start fails, as before).
//!
//! Restarts are bounded: a cdpd that dies within [`STABLE`] of its start
//! is a rapid failure; after [`MAX_RAPID`] rapid failures in a row the
//! supervisor gives up and says so on stderr (the VM's log). It then stays
//! alive, QEMU's child, until QEMU ends (reminding the log once an hour):
//! exited, it would be a zombie under QEMU for the VM's whole life.
//!
//! The per-VM shipper is the supervisor's child too (its argv follows
//! cdpd's on `R`, after an empty argument): QEMU never waits for a child, so
//! a shipper forked by cdp-qemu before the exec stayed a zombie under QEMU
//! once it died. The supervisor starts it after the first READY (with
//! `--follow-pid` itself), reaps it, and starts it again when it dies while
//! QEMU runs ([`shipper_backoff`]: 1 s, doubling to a minute), saying so in
//! the VM's log. When QEMU ends the supervisor exits and the shipper, which
//! follows it, ships what is sealed and exits on its own.

use std::cell::RefCell;
use std::ffi::OsString;
use std::io::Read;
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::{getppid, Pid};
use thiserror::Error;

use crate::launch::{close_inherited, keep_across_exec, READY_TIMEOUT};

/// The first option of the supervisor's command line.
pub const FLAG: &str = "--supervise";

/// A cdpd that ran at least this long before dying was not a rapid failure.
pub const STABLE: Duration = Duration::from_secs(30);

/// Rapid failures in a row after which the supervisor stops restarting.
pub const MAX_RAPID: usize = 5;

/// The wait before restart number `n` (1-based) of a run of rapid failures:
/// at once, then 0.5 s, 1 s, 2 s, 4 s. All of them together stay well under
/// QEMU's reconnect delay.
pub fn backoff(n: usize) -> Duration {
    match n {
        0 | 1 => Duration::ZERO,
        n => Duration::from_millis(500 << (n - 2).min(3)),
    }
}

/// The wait before starting a shipper again after its `n`th (1-based)
/// death in a row within [`STABLE`] of its start: 1 s, doubling, at most a
/// minute. A shipper never gives up (its targets' failures are its own
/// business, retried inside it), so neither does its restart.
pub fn shipper_backoff(n: u32) -> Duration {
    Duration::from_secs(1u64 << n.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

/// How often a supervisor that gave up on cdpd says so again in the VM's log.
const GAVE_UP_REMINDER: Duration = Duration::from_secs(3600);

/// How long a stopping cdpd has to end its session before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(120);

#[derive(Debug, Error)]
pub enum SuperviseError {
    #[error("usage: cdp-qemu {FLAG} --ready-fd W --args-fd R ({0})")]
    Usage(String),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl SuperviseError {
    fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> SuperviseError {
        move |source| SuperviseError::Io { what, source }
    }
}

/// How a wait for cdpd (READY, or its exit) ended.
enum Event {
    Ready,
    Failed(String),
    /// QEMU has gone (or we were told to stop).
    Stop,
}

struct Supervisor {
    /// cdpd's program and arguments (without `--ready-fd`/`--die-with-parent`).
    argv: Vec<OsString>,
    signals: SignalFd,
    /// QEMU: our parent when we started.
    qemu: Pid,
    /// The shipper, when the VM's policy has targets.
    shipper: RefCell<Option<ShipperSlot>>,
}

/// The per-VM shipper: our child, reaped and started again when it dies.
struct ShipperSlot {
    /// Its program and arguments (without `--follow-pid`).
    argv: Vec<OsString>,
    child: Option<Child>,
    /// When to start it (again); `None` while it runs or before READY.
    start_at: Option<Instant>,
    started: Instant,
    /// Deaths in a row, each within [`STABLE`] of its start.
    rapid: u32,
}

impl ShipperSlot {
    fn spawn(&self) -> std::io::Result<Child> {
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .args(["--follow-pid", &std::process::id().to_string()])
            .stdin(Stdio::null());
        close_inherited(&mut cmd, &[]);
        unblock_signals(&mut cmd);
        cmd.spawn()
    }

    /// Reap a shipper that exited and schedule its restart; start one whose
    /// time has come.
    fn tend(&mut self) {
        if let Some(c) = &mut self.child {
            let Ok(Some(status)) = c.try_wait() else {
                return;
            };
            self.rapid = if self.started.elapsed() < STABLE {
                self.rapid + 1
            } else {
                1
            };
            let wait = shipper_backoff(self.rapid);
            say(&format!(
                "cdp-shipper (pid {}) exited ({status}) while QEMU runs; starting it again in {wait:?} \
                 (cdp-agent ships the journal meanwhile)",
                c.id()
            ));
            self.child = None;
            self.start_at = Some(Instant::now() + wait);
        }
        if self.start_at.is_none_or(|t| Instant::now() < t) {
            return;
        }
        self.started = Instant::now();
        match self.spawn() {
            Ok(c) => {
                say(&format!("cdp-shipper started (pid {})", c.id()));
                self.start_at = None;
                self.child = Some(c);
            }
            Err(e) => {
                self.rapid += 1;
                let wait = shipper_backoff(self.rapid);
                say(&format!(
                    "cdp-shipper did not start ({e}); trying again in {wait:?} \
                     (cdp-agent ships the journal meanwhile)"
                ));
                self.start_at = Some(Instant::now() + wait);
            }
        }
    }
}

fn say(msg: &str) {
    // stderr is QEMU's, so libvirt's VM log.
    eprintln!("cdp-qemu supervisor (pid {}): {msg}", std::process::id());
}

fn status_text(s: Option<ExitStatus>) -> String {
    match s {
        Some(s) => s.to_string(),
        None => "status unknown".into(),
    }
}

impl Supervisor {
    /// Has QEMU gone? The parent-death signal is the main way to learn it;
    /// this catches a parent that died before the signal was set.
    fn qemu_gone(&self) -> bool {
        getppid() != self.qemu || cdp_core::proc::is_gone(self.qemu.as_raw())
    }

    /// Read pending signals: true when one asks us to stop. Every wake-up
    /// of the supervisor passes here, so the shipper is tended here too.
    fn stop_requested(&self) -> bool {
        if let Some(s) = self.shipper.borrow_mut().as_mut() {
            s.tend();
        }
        let mut stop = false;
        while let Ok(Some(info)) = self.signals.read_signal() {
            if info.ssi_signo != Signal::SIGCHLD as u32 {
                stop = true;
            }
        }
        stop || self.qemu_gone()
    }

    /// Start cdpd with a fresh ready pipe.
    fn spawn(&self) -> Result<(Child, OwnedFd), SuperviseError> {
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| SuperviseError::io("creating a ready pipe")(e.into()))?;
        let wfd = std::os::fd::AsRawFd::as_raw_fd(&wr);
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .args(["--ready-fd", &wfd.to_string(), "--die-with-parent"])
            .stdin(Stdio::null());
        close_inherited(&mut cmd, &[wfd]);
        keep_across_exec(&mut cmd, wfd);
        unblock_signals(&mut cmd);
        let child = cmd.spawn().map_err(SuperviseError::io("starting cdpd"))?;
        drop(wr);
        Ok((child, rd))
    }

    /// Wait for cdpd's READY line, its failure, or a stop request.
    fn wait_ready(&self, rd: OwnedFd, child: &mut Child) -> Event {
        let mut f = std::fs::File::from(rd);
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut buf = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Event::Failed(format!(
                    "cdpd did not report READY within {READY_TIMEOUT:?}"
                ));
            }
            let timeout =
                PollTimeout::try_from(left.min(Duration::from_secs(1))).unwrap_or(PollTimeout::MAX);
            let mut fds = [
                PollFd::new(f.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, timeout) {
                Err(nix::errno::Errno::EINTR) | Ok(0) => {}
                Err(e) => return Event::Failed(format!("waiting for cdpd: {e}")),
                Ok(_) => {}
            }
            if self.stop_requested() {
                return Event::Stop;
            }
            let readable = fds[0]
                .revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP));
            if !readable {
                continue;
            }
            let mut chunk = [0u8; 512];
            let r = match f.read(&mut chunk) {
                Ok(r) => r,
                Err(e) => return Event::Failed(format!("waiting for cdpd: {e}")),
            };
            buf.extend_from_slice(&chunk[..r]);
            let text = String::from_utf8_lossy(&buf);
            if text.starts_with("READY") {
                return Event::Ready;
            }
            if r == 0 || text.contains('\n') {
                let text = text.trim().trim_start_matches("ERROR").trim();
                let text = if text.is_empty() {
                    format!("cdpd exited ({})", status_text(child.wait().ok()))
                } else {
                    text.to_string()
                };
                return Event::Failed(text);
            }
        }
    }

    /// Until cdpd exits (Some(status)) or we are asked to stop (None).
    fn watch(&self, child: &mut Child) -> Option<ExitStatus> {
        loop {
            if self.stop_requested() {
                return None;
            }
            if let Ok(Some(s)) = child.try_wait() {
                return Some(s);
            }
            let mut fds = [PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
            let _ = poll(&mut fds, PollTimeout::from(1000u16));
        }
    }

    /// Sleep `d`, unless asked to stop (then false). Wakes at least once a
    /// second, so a shipper's restart is not held up by a long pause.
    fn pause(&self, d: Duration) -> bool {
        let until = Instant::now() + d;
        loop {
            if self.stop_requested() {
                return false;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            let mut fds = [PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
            let t =
                PollTimeout::try_from(left.min(Duration::from_secs(1))).unwrap_or(PollTimeout::MAX);
            let _ = poll(&mut fds, t);
        }
    }

    /// The restart loop, once the first cdpd is ready. Returns when QEMU
    /// has gone (cdpd stopped cleanly) or after giving up.
    fn run(&self, first: Child) -> i32 {
        let mut child = Some(first);
        let mut started = Instant::now();
        let mut rapid = 0usize;
        loop {
            let (pid, status) = match &mut child {
                Some(c) => match self.watch(c) {
                    Some(s) => (c.id().to_string(), s.to_string()),
                    None => {
                        stop_child(c);
                        return 0;
                    }
                },
                None => ("none".into(), "not started".into()),
            };
            rapid = if started.elapsed() < STABLE {
                rapid + 1
            } else {
                1
            };
            if rapid > MAX_RAPID {
                say(&format!(
                    "cdpd (pid {pid}) exited ({status}); it failed {MAX_RAPID} times in a row within {STABLE:?} \
                     of starting, so it is not restarted again: the VM's protected disks get I/O errors \
                     after QEMU's reconnect delay ({} s); see cdpd's messages above",
                    crate::argv::RECONNECT_DELAY
                ));
                self.outlive_qemu_after_giving_up();
                return 1;
            }
            let wait = backoff(rapid);
            say(&format!(
                "cdpd (pid {pid}) exited ({status}) while QEMU runs; restarting it in {wait:?} \
                 (rapid failure {rapid} of at most {MAX_RAPID})"
            ));
            if !self.pause(wait) {
                return 0;
            }
            started = Instant::now();
            child = match self.restart() {
                Ok(c) => c,
                Err(()) => return 0,
            };
        }
    }

    /// After giving up: stay QEMU's child until QEMU ends, so that the
    /// process tree still shows the supervisor (a process that exited here
    /// would stay a zombie under QEMU, which never waits for a child), the
    /// shipper (which follows us) goes on shipping what is sealed, and the
    /// VM's log says once an hour that its disks are not served.
    fn outlive_qemu_after_giving_up(&self) {
        let since = Instant::now();
        say(&format!(
            "waiting for QEMU (pid {}) to end; destroy or restart the VM once cdpd can start again",
            self.qemu
        ));
        while self.pause(GAVE_UP_REMINDER) {
            say(&format!(
                "cdpd is still not running ({} min since giving up): the VM's protected disks \
                 get I/O errors; destroy or restart the VM once cdpd can start again",
                since.elapsed().as_secs() / 60
            ));
        }
    }

    /// Start cdpd again and wait until it serves. `Ok(None)`: it could not
    /// be started; `Err(())`: QEMU went away meanwhile (cdpd stopped).
    fn restart(&self) -> Result<Option<Child>, ()> {
        let (mut next, rd) = match self.spawn() {
            Ok(c) => c,
            Err(e) => {
                say(&format!("{e}"));
                return Ok(None);
            }
        };
        match self.wait_ready(rd, &mut next) {
            Event::Ready => say(&format!(
                "cdpd restarted (pid {}): the journal is recovered and the disks are served again",
                next.id()
            )),
            Event::Failed(m) => {
                say(&format!("the restarted cdpd did not start: {m}"));
                // Make sure it is gone; its status counts as a failure.
                stop_child(&mut next);
            }
            Event::Stop => {
                stop_child(&mut next);
                return Err(());
            }
        }
        Ok(Some(next))
    }
}

/// SIGTERM cdpd and wait for it to end its session (bounded).
fn stop_child(child: &mut Child) {
    let pid = Pid::from_raw(child.id() as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    say(&format!(
        "cdpd (pid {pid}) did not stop within {STOP_GRACE:?}; killing it"
    ));
    let _ = child.kill();
    let _ = child.wait();
}

fn handled() -> SigSet {
    let mut s = SigSet::empty();
    for sig in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGCHLD,
    ] {
        s.add(sig);
    }
    s
}

/// cdpd must not inherit the supervisor's blocked signals.
fn unblock_signals(cmd: &mut Command) {
    let set = handled();
    // SAFETY: the closure runs between fork and exec: it makes one
    // sigprocmask(2) call (async-signal-safe) with a set built before the
    // fork, allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::signal::sigprocmask(
                nix::sys::signal::SigmaskHow::SIG_UNBLOCK,
                Some(&set),
                None,
            )
            .map_err(std::io::Error::from)
        });
    }
}

fn parse_fd(it: &mut std::slice::Iter<'_, String>, name: &str) -> Result<RawFd, SuperviseError> {
    it.next()
        .and_then(|v| v.parse::<RawFd>().ok())
        .filter(|fd| *fd > 2)
        .ok_or_else(|| SuperviseError::Usage(format!("{name} needs a descriptor number above 2")))
}

/// Take over a descriptor named on our command line.
fn own_fd(fd: RawFd) -> Result<OwnedFd, SuperviseError> {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD)
        .map_err(|e| SuperviseError::io("a descriptor from cdp-qemu")(e.into()))?;
    // SAFETY: cdp-qemu passed `fd` on our command line for us alone (it kept
    // it across the exec and closes its own copy); it is open (checked just
    // above) and nothing else in this process refers to it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// cdpd's argv and, after an empty argument, the shipper's (if any), each
/// argument NUL-terminated on `fd` until EOF.
fn read_argv(fd: OwnedFd) -> Result<(Vec<OsString>, Vec<OsString>), SuperviseError> {
    let mut s = Vec::new();
    std::fs::File::from(fd)
        .read_to_end(&mut s)
        .map_err(SuperviseError::io("reading cdpd's arguments"))?;
    split_argv(&s)
}

fn split_argv(s: &[u8]) -> Result<(Vec<OsString>, Vec<OsString>), SuperviseError> {
    let s = s.strip_suffix(&[0]).unwrap_or(s);
    let mut parts = s.split(|b| *b == 0);
    let take = |parts: &mut dyn Iterator<Item = &[u8]>| -> Vec<OsString> {
        parts
            .take_while(|a| !a.is_empty())
            .map(|a| OsString::from_vec(a.to_vec()))
            .collect()
    };
    let cdpd = take(&mut parts);
    let shipper = take(&mut parts);
    if cdpd.is_empty() {
        return Err(SuperviseError::Usage("no cdpd command on --args-fd".into()));
    }
    Ok((cdpd, shipper))
}

/// The supervisor's whole life; returns its exit code. `args` follow [`FLAG`].
pub fn main(args: &[String]) -> i32 {
    match setup(args) {
        Ok((sup, ready)) => first_start(&sup, ready),
        Err(e) => {
            say(&format!("error: {e}"));
            1
        }
    }
}

fn setup(args: &[String]) -> Result<(Supervisor, std::fs::File), SuperviseError> {
    let (mut ready, mut argv_fd) = (None, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--ready-fd" => ready = Some(parse_fd(&mut it, a)?),
            "--args-fd" => argv_fd = Some(parse_fd(&mut it, a)?),
            other => return Err(SuperviseError::Usage(format!("unknown option {other:?}"))),
        }
    }
    let ready =
        own_fd(ready.ok_or_else(|| SuperviseError::Usage("--ready-fd is required".into()))?)?;
    let argv_fd =
        own_fd(argv_fd.ok_or_else(|| SuperviseError::Usage("--args-fd is required".into()))?)?;
    // Our descriptors are ours alone: none leaks into cdpd.
    for fd in [&ready, &argv_fd] {
        let _ = nix::fcntl::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(fd),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
    }
    let qemu = getppid();
    // Block first, so a SIGTERM from QEMU's death is queued, never lost.
    let mask = handled();
    mask.thread_block()
        .map_err(|e| SuperviseError::io("blocking signals")(e.into()))?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| SuperviseError::io("creating a signalfd")(e.into()))?;
    cdp_core::proc::die_with_parent()
        .map_err(SuperviseError::io("setting the parent-death signal"))?;
    let (argv, shipper) = read_argv(argv_fd)?;
    let shipper = (!shipper.is_empty()).then(|| ShipperSlot {
        argv: shipper,
        child: None,
        start_at: None,
        started: Instant::now(),
        rapid: 0,
    });
    Ok((
        Supervisor {
            argv,
            signals,
            qemu,
            shipper: RefCell::new(shipper),
        },
        std::fs::File::from(ready),
    ))
}

/// Start the first cdpd, relay its READY (or its error) to cdp-qemu, then
/// supervise it.
fn first_start(sup: &Supervisor, mut ready: std::fs::File) -> i32 {
    use std::io::Write;
    let (mut child, rd) = match sup.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(ready, "ERROR {e}");
            return 1;
        }
    };
    match sup.wait_ready(rd, &mut child) {
        Event::Ready => {
            let _ = writeln!(ready, "READY");
            drop(ready);
            // The shipper follows us: it starts once cdpd serves.
            if let Some(s) = sup.shipper.borrow_mut().as_mut() {
                s.start_at = Some(Instant::now());
                s.tend();
            }
            sup.run(child)
        }
        Event::Failed(m) => {
            let _ = writeln!(ready, "ERROR {m}");
            stop_child(&mut child);
            1
        }
        Event::Stop => {
            stop_child(&mut child);
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shippers_argv_follows_cdpds_after_an_empty_argument() {
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let (c, s) = split_argv(b"cdpd\0run\0\0cdp-shipper\0run\0").unwrap();
        assert_eq!((c, s), (os(&["cdpd", "run"]), os(&["cdp-shipper", "run"])));
        let (c, s) = split_argv(b"cdpd\0run\0").unwrap();
        assert_eq!((c, s), (os(&["cdpd", "run"]), vec![]));
        assert!(split_argv(b"").is_err());
        assert_eq!(shipper_backoff(1), Duration::from_secs(1));
        assert_eq!(shipper_backoff(3), Duration::from_secs(4));
        assert_eq!(shipper_backoff(40), Duration::from_secs(60));
    }

    #[test]
    fn backoff_is_bounded_and_fits_the_reconnect_delay() {
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(2), Duration::from_millis(500));
        assert_eq!(backoff(5), Duration::from_secs(4));
        assert_eq!(backoff(50), Duration::from_secs(4));
        let total: Duration = (1..=MAX_RAPID).map(backoff).sum();
        assert!(total < Duration::from_secs(crate::argv::RECONNECT_DELAY / 2));
    }
}
