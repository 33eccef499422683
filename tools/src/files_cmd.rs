//! `cdpctl files VM --at POINT ls|get PATH`: one file back from a point,
//! without a full restore (issue 15).
//!
//! The point is served as a read-only NBD export (the image of `cdpctl
//! export`, `cdp_repo::export::PointImage`) on a Unix socket in a private
//! directory, for the duration of the command only, and libguestfs's
//! `guestfish --ro` reads the disk through it. The disk's filesystem is
//! hostile content (docs/DESIGN.md, "Trust boundaries"): it is parsed only
//! by the kernel of libguestfs's appliance, a small VM, never mounted on this
//! host. Nothing read from the disk is written into guestfish's command
//! stream unless it passed a strict check, and every argument is quoted so
//! that guestfish's host-side commands (`!`, `<!`) cannot be reached.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cdp_core::nbd::server::{self, Limits, Server};
use cdp_core::time::now_ns;
use cdp_repo::export::PointImage;
use cdp_repo::restore::Point;
use cdp_repo::store::Store;
use clap::{Args, Subcommand};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::Pid;

use crate::restore_cmd::{candidate_repos, prepare, resolve_vm, with_fallback, Prepared, RepoArgs};
use crate::Ctx;

#[derive(Args)]
pub struct FilesArgs {
    /// VM name or UUID.
    pub vm: String,
    /// The point: RFC 3339 time, "10 minutes ago", seq:N, mark:LABEL or latest.
    #[arg(long)]
    pub at: String,
    /// The disk (target name, e.g. vda); needed only when the VM has several.
    #[arg(long)]
    pub disk: Option<String>,
    /// The filesystem to read, as libguestfs names it (e.g. /dev/sda1);
    /// needed only when the disk holds several.
    #[arg(long)]
    pub fs: Option<String>,
    /// Give up on libguestfs after this long (e.g. 90s, 10m): its appliance
    /// is killed and its temporary files removed, as on ^C.
    #[arg(long, default_value = "10m", value_parser = parse_timeout)]
    pub timeout: Duration,
    /// Memory for decompressed chunks and journal data, in MiB.
    #[arg(long, default_value_t = cdp_repo::export::DEFAULT_CACHE_BYTES >> 20)]
    pub cache_mib: u64,
    #[command(flatten)]
    pub repo: RepoArgs,
    #[command(subcommand)]
    pub op: FilesOp,
}

#[derive(Subcommand)]
pub enum FilesOp {
    /// List a directory of the disk's filesystem (names; --json: a list).
    Ls {
        /// Absolute path inside the disk's filesystem.
        #[arg(default_value = "/")]
        path: String,
    },
    /// Copy one file out byte for byte: to stdout, or to a new file.
    Get {
        /// Absolute path inside the disk's filesystem.
        path: String,
        /// Write to this file (created; never overwritten) instead of stdout.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
}

impl FilesOp {
    fn path(&self) -> &str {
        match self {
            FilesOp::Ls { path } | FilesOp::Get { path, .. } => path,
        }
    }
}

/// Said when guestfish is not on PATH: what is missing and how to get it.
const NOT_INSTALLED: &str = "cdpctl files needs libguestfs's guestfish, which is not installed \
(no guestfish on PATH). Install it: `apt-get install --no-install-recommends guestfish` \
(Debian, Ubuntu) or `dnf install guestfish` (Fedora, RHEL). libguestfs reads the disk \
inside a small VM of its own, never mounting it on this host. Without it, `cdpctl export` \
serves the point over NBD for any NBD client, and `cdpctl restore` writes it to a file.";

/// The line guestfish echoes after the filesystem list (never a device name).
const END: &str = "@@cdpctl-files-end@@";

pub fn run(ctx: &Ctx, a: &FilesArgs) -> Result<()> {
    // Before anything is read: a host without libguestfs says so at once.
    let fish = find_guestfish()?;
    if let Some(d) = &a.disk {
        cdp_core::names::check_disk(d)?;
    }
    let path = guest_path(a.op.path())?;
    if let FilesOp::Get { out: Some(o), .. } = &a.op {
        if o.symlink_metadata().is_ok() {
            bail!(
                "{} exists: cdpctl files never overwrites a file",
                o.display()
            );
        }
    }
    let point = Point::parse(&a.at, now_ns())?;
    let candidates = candidate_repos(ctx, &a.repo)?;
    // Before the runtime's threads start, so that they inherit the mask.
    let watch = Watchdog::start()?;
    let rt = tokio::runtime::Runtime::new()?;
    let point_ref = &point;
    let (store, _used, (disk, lease, prep)) =
        rt.block_on(with_fallback(candidates, |store| async move {
            let vm = resolve_vm(ctx, &store, &a.vm).await?;
            let disk = pick_disk(ctx, a, &store, &vm).await?;
            // Retention deletes nothing of the VM while the files are read.
            let lease = cdp_repo::lease::acquire(
                &store,
                &vm,
                "cdpctl files",
                &format!("{disk} at {point_ref}"),
                cdp_repo::lease::DEFAULT_TTL,
            )
            .await?;
            match prepare(ctx, &a.repo, &disk, &store, &vm, point_ref).await {
                Ok(p) => Ok((disk, lease, p)),
                Err(e) => {
                    lease.release().await;
                    Err(e)
                }
            }
        }))?;
    let dir = tempfile::Builder::new()
        .prefix("cdpctl-files.")
        .tempdir()
        .context("creating a private directory for the export's socket")?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
    // libguestfs's own temporary files (the appliance's overlay) go inside
    // it too, so that removing it leaves nothing of a killed appliance.
    std::fs::create_dir(dir.path().join("tmp"))?;
    watch.arm(dir.path(), a.timeout);
    eprintln!(
        "cdpctl: {disk} at {point} (seq {}): starting libguestfs's appliance (about 30 s without KVM)",
        prep.seq
    );
    let r = with_export(&rt, store, &disk, prep, a.cache_mib, dir.path(), |socket| {
        session(&fish, socket, &disk, a, &path, (dir.path(), &watch))
    });
    let r = watch.finish(r);
    rt.block_on(lease.release());
    // Connections still open end with the process; do not wait for them.
    rt.shutdown_background();
    let found = r?;
    output(ctx, a, &path, &found)
}

/// guestfish on PATH, or why not.
fn find_guestfish() -> Result<PathBuf> {
    let paths = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&paths)
        .map(|d| d.join("guestfish"))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
        .ok_or_else(|| anyhow::anyhow!(NOT_INSTALLED))
}

/// The path inside the guest's filesystem: absolute, without control
/// characters (it is given to guestfish quoted, byte by byte).
fn guest_path(p: &str) -> Result<String> {
    if !p.starts_with('/') {
        bail!("{p:?}: give an absolute path inside the disk's filesystem (starting with /)");
    }
    if p.chars().any(char::is_control) {
        bail!("{p:?}: a path with control characters is refused");
    }
    Ok(p.to_string())
}

/// `--disk`, else the VM's only disk (in the repository or this host's journal).
async fn pick_disk(ctx: &Ctx, a: &FilesArgs, store: &Store, vm: &str) -> Result<String> {
    if let Some(d) = &a.disk {
        return Ok(d.clone());
    }
    let mut disks = cdp_repo::read::list_disks(store, vm).await?;
    if !a.repo.no_local {
        disks.extend(cdp_core::journal::list_disks(&ctx.state_dir, vm).unwrap_or_default());
    }
    disks.sort();
    disks.dedup();
    match disks.len() {
        0 => bail!("VM {vm} has no disk in {} (nor on this host)", store.url()),
        1 => Ok(disks.remove(0)),
        _ => bail!(
            "VM {vm} has several disks ({}): choose one with --disk",
            disks.join(", ")
        ),
    }
}

/// Serve the point read-only on `<dir>/nbd.sock` while `f` runs.
fn with_export<T>(
    rt: &tokio::runtime::Runtime,
    store: Store,
    disk: &str,
    prep: Prepared,
    cache_mib: u64,
    dir: &Path,
    f: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    let image = Arc::new(PointImage::new(
        prep.plan,
        Some(store),
        rt.handle().clone(),
        cache_mib.max(1) << 20,
    )?);
    let server = Server::new(disk, image, Limits::default());
    let socket = dir.join("nbd.sock");
    // The directory is ours, mode 0700: nobody else reaches the socket.
    let listener = Arc::new(
        UnixListener::bind(&socket)
            .with_context(|| format!("{}: binding the socket", socket.display()))?,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let accept = {
        let (server, listener, stop) = (server.clone(), listener.clone(), stop.clone());
        std::thread::Builder::new()
            .name("files-accept".into())
            .spawn(move || server.accept_until(&listener, &stop))?
    };
    let r = f(&socket);
    stop.store(true, Ordering::Release);
    if server::wake(&listener).is_ok() {
        let _ = accept.join();
    }
    r
}

/// What the guestfish session found: the directory's names, or the file
/// downloaded into the private directory.
enum Found {
    Names(Vec<Vec<u8>>),
    File(PathBuf),
}

/// A running `guestfish --ro` reading commands from its stdin.
struct Fish {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Fish {
    /// `tcg`: the appliance under TCG (libguestfs's direct backend), for a
    /// host whose /dev/kvm does not work.
    fn start(
        fish: &Path,
        socket: &Path,
        disk: &str,
        tcg: bool,
        (dir, watch): (&Path, &Watchdog),
    ) -> Result<Fish> {
        let uri = format!("nbd:///{disk}?socket={}", socket.display());
        let mut cmd = Command::new(fish);
        // A process group of its own (the watchdog signals the group), and
        // libguestfs's temporary files in our private directory.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.env("LIBGUESTFS_TMPDIR", dir.join("tmp"));
        if let Some(why) = watch.fired() {
            bail!("{why}");
        }
        if tcg {
            cmd.env("LIBGUESTFS_BACKEND", "direct")
                .env("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg");
        }
        let mut child = cmd
            .args(["--ro", "--no-progress-bars", "--format=raw", "-a"])
            .arg(&uri)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", fish.display()))?;
        watch.started(child.id() as i32);
        let mut err = child.stderr.take().expect("piped");
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Ok(Fish {
            stdin: child.stdin.take(),
            stdout: BufReader::new(child.stdout.take().expect("piped")),
            stderr: Some(stderr),
            child,
        })
    }

    /// Send command lines (each argument already [`quote`]d).
    fn send(&mut self, lines: &[String]) -> Result<()> {
        let w = self.stdin.as_mut().expect("open until finish");
        for l in lines {
            // A closed pipe: guestfish ended; finish() says why.
            if w.write_all(l.as_bytes())
                .and_then(|()| w.write_all(b"\n"))
                .is_err()
            {
                break;
            }
        }
        let _ = w.flush();
        Ok(())
    }

    /// stdout lines until [`END`]; None when guestfish ended first.
    fn read_until_end(&mut self) -> Option<Vec<String>> {
        let mut lines = Vec::new();
        loop {
            let mut l = String::new();
            match self.stdout.read_line(&mut l) {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            let l = l.trim_end_matches('\n').to_string();
            if l == END {
                return Some(lines);
            }
            lines.push(l);
        }
    }

    /// Close its stdin, wait for it: an error naming what guestfish said
    /// when it failed.
    fn finish(mut self) -> Result<()> {
        drop(self.stdin.take());
        let mut rest = Vec::new();
        let _ = self.stdout.read_to_end(&mut rest);
        let status = self.child.wait()?;
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        if status.success() {
            return Ok(());
        }
        bail!("libguestfs failed ({status}):\n{}", stderr.trim_end())
    }
}

/// Start the appliance and list the disk's filesystems: the session and the
/// list. Where the appliance does not start with KVM (a nested /dev/kvm
/// that fails) and TCG was not asked for, tried once more under TCG.
fn launch(
    fish: &Path,
    socket: &Path,
    disk: &str,
    priv_: (&Path, &Watchdog),
) -> Result<(Fish, Vec<String>)> {
    let forced = std::env::var("LIBGUESTFS_BACKEND_SETTINGS")
        .is_ok_and(|v| v.split(':').any(|s| s == "force_tcg"));
    let mut tcg = false;
    loop {
        let mut f = Fish::start(fish, socket, disk, tcg, priv_)?;
        f.send(&[
            "run".into(),
            "list-filesystems".into(),
            format!("echo {END}"),
        ])?;
        if let Some(list) = f.read_until_end() {
            return Ok((f, list));
        }
        let err = match f.finish() {
            Ok(()) => anyhow::anyhow!("guestfish ended before listing the filesystems"),
            Err(e) => e,
        };
        let kvm_failed = format!("{err:#}").contains("qemu-system");
        if let Some(why) = priv_.1.fired() {
            bail!("{why}");
        }
        if tcg || forced || !kvm_failed || !Path::new("/dev/kvm").exists() {
            let text = format!("{err:#}");
            bail!("{text}{}", appliance_hint(&text));
        }
        eprintln!(
            "cdpctl: libguestfs's appliance did not start with KVM; trying again under TCG \
             (slower; LIBGUESTFS_BACKEND_SETTINGS=force_tcg skips this attempt)"
        );
        tcg = true;
    }
}

/// Run the session: start the appliance, choose the filesystem, mount it
/// read-only, list or download `path` into `dir`.
fn session(
    fish: &Path,
    socket: &Path,
    disk: &str,
    a: &FilesArgs,
    path: &str,
    priv_: (&Path, &Watchdog),
) -> Result<Found> {
    let dir = priv_.0;
    let (mut f, list) = launch(fish, socket, disk, priv_)?;
    let dev = match choose_fs(&list, a.fs.as_deref(), disk) {
        Ok(d) => d,
        Err(e) => {
            let _ = f.finish();
            return Err(e);
        }
    };
    let host = dir.join("found");
    let host_q = quote(
        host.to_str()
            .context("the private directory's path is not UTF-8")?,
    );
    let op = match &a.op {
        FilesOp::Ls { .. } => format!("ls0 {} {host_q}", quote(path)),
        FilesOp::Get { .. } => format!("download {} {host_q}", quote(path)),
    };
    f.send(&[format!("mount-ro {} /", quote(&dev)), op, "exit".into()])?;
    f.finish()
        .with_context(|| format!("reading {path} from {dev} of {disk}"))?;
    match &a.op {
        FilesOp::Ls { .. } => {
            let b = std::fs::read(&host).with_context(|| format!("{}", host.display()))?;
            Ok(Found::Names(
                b.split(|&c| c == 0)
                    .filter(|n| !n.is_empty())
                    .map(<[u8]>::to_vec)
                    .collect(),
            ))
        }
        FilesOp::Get { .. } => Ok(Found::File(host)),
    }
}

/// The filesystem to mount: `--fs` (one of those libguestfs found), else the
/// only one that is not swap or unknown. The list comes from the disk
/// (hostile): a device name is used only when it is a plain /dev path.
fn choose_fs(list: &[String], want: Option<&str>, disk: &str) -> Result<String> {
    let found: Vec<(&str, &str)> = list
        .iter()
        .filter_map(|l| l.split_once(": "))
        .filter(|(dev, _)| plain_device(dev))
        .collect();
    let names = || {
        found
            .iter()
            .map(|(d, t)| format!("{d} ({t})"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(w) = want {
        return match found.iter().find(|(d, _)| *d == w) {
            Some((d, _)) => Ok(d.to_string()),
            None => bail!("{disk} has no filesystem {w}: it has {}", names()),
        };
    }
    let usable: Vec<&str> = found
        .iter()
        .filter(|(_, t)| !matches!(*t, "swap" | "unknown" | ""))
        .map(|(d, _)| *d)
        .collect();
    match usable.as_slice() {
        [one] => Ok(one.to_string()),
        [] if found.is_empty() => bail!("libguestfs finds no filesystem on {disk} at this point"),
        [] => bail!("no filesystem libguestfs can mount on {disk}: {}", names()),
        _ => bail!(
            "{disk} holds several filesystems: choose one with --fs ({})",
            names()
        ),
    }
}

/// /dev/ followed by letters, digits and `/_.+-` only.
fn plain_device(d: &str) -> bool {
    d.strip_prefix("/dev/").is_some_and(|rest| {
        !rest.is_empty()
            && !rest.contains("..")
            && rest
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"/_.+-".contains(&c))
    })
}

/// One guestfish argument: double-quoted, every byte but letters, digits
/// and `/._-` written as \xHH, so that no character of it is taken as
/// syntax (quotes, spaces, `!`, `#`, line ends).
fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || b"/._-".contains(&c) {
            q.push(c as char);
        } else {
            q.push_str(&format!("\\x{c:02x}"));
        }
    }
    q.push('"');
    q
}

/// What to do when libguestfs's appliance cannot start here.
fn appliance_hint(stderr: &str) -> String {
    let mut hints = Vec::new();
    let has_kernel = std::fs::read_dir("/boot")
        .map(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz"))
        })
        .unwrap_or(false);
    if stderr.contains("supermin") && std::env::var_os("SUPERMIN_KERNEL").is_none() && !has_kernel {
        hints.push(
            "libguestfs builds its appliance from this host's kernel and /boot has none: \
             install linux-image-amd64, or set SUPERMIN_KERNEL and SUPERMIN_MODULES to an \
             unpacked kernel (a container)",
        );
    }
    if stderr.contains("kvm") || stderr.contains("KVM") || stderr.contains("qemu-system") {
        hints.push(
            "where /dev/kvm does not work (nested virtualisation), run with \
             LIBGUESTFS_BACKEND=direct LIBGUESTFS_BACKEND_SETTINGS=force_tcg",
        );
    }
    hints.push("`libguestfs-test-tool` (package libguestfs-tools) shows what fails");
    format!("\n(hint: {})", hints.join("; "))
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    match cdp_core::config::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("a timeout of zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// Stops a guestfish run that outlives `--timeout`, or on SIGINT/SIGTERM:
/// guestfish's process group and the appliance (its QEMU, in a group of
/// its own, found by our private directory on its command line) are
/// killed, and the main thread's session ends with the reason. Before the
/// session (reading the repository) a signal ends cdpctl at once.
struct Watchdog {
    shared: Arc<Watched>,
    thread: Option<std::thread::JoinHandle<()>>,
    signals: SigSet,
}

#[derive(Default)]
struct Watched {
    /// guestfish's pid (= its process group), 0 when none was started.
    pgid: AtomicI32,
    /// The private directory and the deadline, once the session starts.
    armed: Mutex<Option<(PathBuf, Instant, Duration)>>,
    fired: Mutex<Option<String>>,
    done: AtomicBool,
}

impl Watchdog {
    fn start() -> Result<Watchdog> {
        let mut signals = SigSet::empty();
        signals.add(Signal::SIGINT);
        signals.add(Signal::SIGTERM);
        signals
            .thread_block()
            .context("blocking SIGINT and SIGTERM")?;
        let fd =
            SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC).context("creating a signalfd")?;
        let shared = Arc::new(Watched::default());
        let w = shared.clone();
        let thread = std::thread::Builder::new()
            .name("files-watchdog".into())
            .spawn(move || w.watch(fd))?;
        Ok(Watchdog {
            shared,
            thread: Some(thread),
            signals,
        })
    }

    fn arm(&self, dir: &Path, timeout: Duration) {
        *self.shared.armed.lock().unwrap() = Some((dir.to_path_buf(), Instant::now(), timeout));
    }

    fn started(&self, pid: i32) {
        self.shared.pgid.store(pid, Ordering::SeqCst);
        // Fired between the check before the spawn and now: this one too.
        if self.fired().is_some() {
            self.shared.kill_all();
        }
    }

    fn fired(&self) -> Option<String> {
        self.shared.fired.lock().unwrap().clone()
    }

    /// The session's result, or why it was stopped; the watchdog ends and
    /// ^C works as usual again.
    fn finish<T>(mut self, r: Result<T>) -> Result<T> {
        self.shared.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let fired = self.fired();
        let _ = self.signals.thread_unblock();
        match fired {
            Some(why) => Err(match r {
                Ok(_) => anyhow::anyhow!("{why}"),
                Err(e) => e.context(why),
            }),
            None => r,
        }
    }
}

impl Watched {
    fn watch(&self, signals: SignalFd) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        while !self.done.load(Ordering::SeqCst) {
            let mut fds = [PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
            let got = poll(&mut fds, PollTimeout::from(200u16)).unwrap_or(0) > 0;
            let sig = if got {
                signals.read_signal().ok().flatten()
            } else {
                None
            };
            let armed = self.armed.lock().unwrap().clone();
            let why = match (sig, &armed) {
                (Some(s), None) => {
                    // Nothing of ours to clean up yet.
                    eprintln!("cdpctl: interrupted ({})", signal_name(s.ssi_signo));
                    std::process::exit(130);
                }
                (Some(s), Some(_)) => format!(
                    "interrupted ({}): libguestfs's appliance was stopped and its \
                     temporary files removed",
                    signal_name(s.ssi_signo)
                ),
                (None, Some((_, since, t))) if since.elapsed() >= *t => format!(
                    "libguestfs did not finish within {t:?} (--timeout): its appliance was \
                     killed and its temporary files removed"
                ),
                _ => continue,
            };
            if self.fired.lock().unwrap().is_none() {
                *self.fired.lock().unwrap() = Some(why);
                self.kill_all();
            }
        }
    }

    /// guestfish's group (TERM, then KILL), then any process whose command
    /// line names our private directory (the appliance's QEMU), and the
    /// libguestfs socket directories those named.
    fn kill_all(&self) {
        let pgid = self.pgid.load(Ordering::SeqCst);
        if pgid > 0 {
            let group = Pid::from_raw(-pgid);
            let _ = kill(group, Signal::SIGTERM);
            let until = Instant::now() + Duration::from_secs(2);
            while Instant::now() < until && kill(group, None).is_ok() {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = kill(group, Signal::SIGKILL);
        }
        let Some((dir, _, _)) = self.armed.lock().unwrap().clone() else {
            return;
        };
        for (pid, cmdline) in processes_naming(&dir) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            for sockdir in libguestfs_sockdirs(&cmdline) {
                if ours_dir(&sockdir) {
                    let _ = std::fs::remove_dir_all(sockdir);
                }
            }
        }
    }
}

fn signal_name(n: u32) -> &'static str {
    Signal::try_from(n as i32).map_or("a signal", Signal::as_str)
}

/// Processes other than us, of our own uid, whose command line contains
/// `dir`. Anyone can run a process naming our private directory (its path
/// is on the appliance's command line): only ours are killed, and only
/// their command lines name socket directories to remove.
fn processes_naming(dir: &Path) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let uid = nix::unistd::geteuid().as_raw();
    let needle = dir.to_string_lossy().into_owned();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| *p != me)
        .filter(|p| real_uid(*p) == Some(uid))
        .filter_map(|p| {
            let c = std::fs::read(format!("/proc/{p}/cmdline")).ok()?;
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            c.contains(&needle).then_some((p, c))
        })
        .collect()
}

/// The real uid of process `pid` (`/proc/PID/status`; the owner of
/// `/proc/PID` is root for any non-dumpable process, so it is not used).
fn real_uid(pid: i32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    line.split_whitespace().next()?.parse().ok()
}

/// A directory (not a link) that we own: only such a socket directory is
/// removed. Another user cannot swap it afterwards (/tmp is sticky).
fn ours_dir(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    p.symlink_metadata()
        .is_ok_and(|m| m.is_dir() && m.uid() == nix::unistd::geteuid().as_raw())
}

/// `/tmp/libguestfsXXXXXX` directories (libguestfs's sockets, made for
/// root in /tmp whatever LIBGUESTFS_TMPDIR says) named in a command line.
fn libguestfs_sockdirs(cmdline: &str) -> Vec<PathBuf> {
    const PREFIX: &str = "/tmp/libguestfs";
    let mut v = Vec::new();
    let mut rest = cmdline;
    while let Some(i) = rest.find(PREFIX) {
        let tail = &rest[i + PREFIX.len()..];
        let suffix: String = tail
            .chars()
            .take_while(char::is_ascii_alphanumeric)
            .collect();
        if suffix.len() == 6 && tail[6..].starts_with(['/', ' ', ',', ':']) {
            let p = PathBuf::from(format!("{PREFIX}{suffix}"));
            if !v.contains(&p) {
                v.push(p);
            }
        }
        rest = tail;
    }
    v
}

/// Print the listing, or copy the file out.
fn output(ctx: &Ctx, a: &FilesArgs, path: &str, found: &Found) -> Result<()> {
    match (found, &a.op) {
        (Found::Names(names), _) => {
            let mut names: Vec<String> = names
                .iter()
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .collect();
            names.sort();
            if ctx.json {
                return crate::print_json(&serde_json::json!({ "path": path, "names": names }));
            }
            let mut out = std::io::stdout().lock();
            for n in names {
                // Names come from the disk: no terminal escape reaches the screen.
                writeln!(out, "{}", n.escape_debug())?;
            }
            Ok(())
        }
        (Found::File(from), FilesOp::Get { out, .. }) => {
            let mut src =
                std::fs::File::open(from).with_context(|| format!("{}", from.display()))?;
            let n = match out {
                Some(o) => {
                    let mut dst = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(o)
                        .with_context(|| format!("creating {}", o.display()))?;
                    let n = std::io::copy(&mut src, &mut dst)?;
                    dst.sync_all()?;
                    n
                }
                None => {
                    let mut stdout = std::io::stdout().lock();
                    let n = std::io::copy(&mut src, &mut stdout)?;
                    stdout.flush()?;
                    n
                }
            };
            eprintln!("cdpctl: {path}: {n} bytes");
            Ok(())
        }
        (Found::File(_), FilesOp::Ls { .. }) => unreachable!("ls lists names"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_leaves_no_syntax() {
        assert_eq!(quote("/etc/hosts"), "\"/etc/hosts\"");
        assert_eq!(quote("/a b\"!\n#"), "\"/a\\x20b\\x22\\x21\\x0a\\x23\"");
        assert_eq!(quote("/é"), "\"/\\xc3\\xa9\"");
    }

    #[test]
    fn devices_from_the_disk_are_checked() {
        assert!(plain_device("/dev/sda1"));
        assert!(plain_device("/dev/vg0/root-lv"));
        assert!(!plain_device("/dev/sda\n!sh"));
        assert!(!plain_device("/dev/../etc"));
        assert!(!plain_device("sda"));
        assert!(!plain_device("/dev/"));
    }

    #[test]
    fn the_only_usable_filesystem_is_chosen() {
        let l = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            choose_fs(&l(&["/dev/sda1: swap", "/dev/sda2: ext4"]), None, "vda").unwrap(),
            "/dev/sda2"
        );
        assert!(
            choose_fs(&l(&["/dev/sda1: xfs", "/dev/sda2: ext4"]), None, "vda")
                .unwrap_err()
                .to_string()
                .contains("--fs")
        );
        assert_eq!(
            choose_fs(
                &l(&["/dev/sda1: xfs", "/dev/sda2: ext4"]),
                Some("/dev/sda1"),
                "vda"
            )
            .unwrap(),
            "/dev/sda1"
        );
        assert!(choose_fs(&l(&["/dev/sda: unknown"]), None, "vda").is_err());
        assert!(choose_fs(&l(&["/dev/sda\u{1b}: ext4"]), None, "vda").is_err());
    }

    #[test]
    fn libguestfs_socket_dirs_are_found_in_a_command_line() {
        assert_eq!(
            libguestfs_sockdirs(
                "qemu -chardev socket,path=/tmp/libguestfsAb12Cd/guestfsd.sock,id=c \
                 -serial unix:/tmp/libguestfsAb12Cd/console.sock /tmp/libguestfsXY"
            ),
            vec![PathBuf::from("/tmp/libguestfsAb12Cd")]
        );
        assert!(libguestfs_sockdirs("/tmp/libguestfs../etc/x").is_empty());
        assert!(parse_timeout("0s").is_err());
        assert_eq!(parse_timeout("90s").unwrap(), Duration::from_secs(90));
    }

    /// A process of another user naming our private directory is neither
    /// killed nor believed; a socket directory another user owns, or a
    /// link, is not removed.
    #[test]
    fn only_our_own_processes_and_directories_are_touched() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let needle = dir.path().join("tmp");
        let spawn = |uid: Option<u32>| {
            let mut c = Command::new("sleep");
            c.arg0(&needle).arg("30");
            if let Some(u) = uid {
                c.uid(u).gid(u);
            }
            c.spawn().unwrap()
        };
        let root = nix::unistd::geteuid().is_root();
        if !root {
            eprintln!("not root: another user's process and directory are not tried");
        }
        let mut mine = spawn(None);
        let mut other = root.then(|| spawn(Some(65534)));
        std::thread::sleep(Duration::from_millis(200));
        let found: Vec<i32> = processes_naming(dir.path()).iter().map(|p| p.0).collect();
        let _ = mine.kill();
        let _ = mine.wait();
        if let Some(o) = other.as_mut() {
            let _ = o.kill();
            let _ = o.wait();
        }
        assert!(found.contains(&(mine.id() as i32)), "{found:?}");
        if let Some(o) = &other {
            assert!(!found.contains(&(o.id() as i32)), "{found:?}");
        }

        let d = dir.path().join("d");
        std::fs::create_dir(&d).unwrap();
        assert!(ours_dir(&d));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        assert!(!ours_dir(&link));
        if root {
            std::os::unix::fs::chown(&d, Some(65534), Some(65534)).unwrap();
            assert!(!ours_dir(&d));
        }
    }

    #[test]
    fn paths_must_be_absolute_and_plain() {
        assert!(guest_path("/etc/hosts").is_ok());
        assert!(guest_path("etc/hosts").is_err());
        assert!(guest_path("/etc\n/hosts").is_err());
    }
}
