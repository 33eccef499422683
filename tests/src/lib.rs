//! End-to-end test harness for cdpd.
//!
//! The integration tests in `tests/tests/*.rs` start the real `cdpd` binary and drive it
//! with real NBD clients (qemu-io, qemu-img, fio, nbdinfo, nbdsh) or with the raw-socket
//! client in [`nbd`]. Nothing here stands in for the daemon.
//!
//! Binaries are looked up in `$CDP_BIN_DIR`, else in the cargo target directory this test
//! binary was built into (`target/debug/deps/test-xxx` → `target/debug`). Build them first
//! with `cargo build --workspace --all-targets` (`scripts/test` does that).
//!
//! Set `CDP_KEEP_TMP=1` to keep every test's temporary directory for inspection.
//!
//! No cdp program a test starts reads the host's `/etc/cdp/cdp.toml`: the first
//! lookup of a binary sets `CDP_CONFIG` (see [`HARNESS_CONFIG`]) in the test's
//! environment, which every child inherits; a test that wants a config passes
//! `--config` or its own `CDP_CONFIG`. Only the libvirt tests, whose programs
//! libvirtd starts as in production, install a host config (and restore it).

pub mod fixture;
pub mod guest;
pub mod libvirt;
pub mod nbd;

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

/// How long `cdpd run` may take to report READY. Generous: a bound for a
/// hung daemon on a loaded machine, never a measure of speed.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an external command (qemu-io, fio, cdpctl, …) may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a stopping daemon may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The config every cdp program started by a test reads unless the test names
/// another: empty, so built-in defaults, and never the host's.
pub const HARNESS_CONFIG: &str = "/dev/null";

/// Point `CDP_CONFIG` at [`HARNESS_CONFIG`] for this test process and every
/// program it starts. Called by [`bin_dir`], so before any cdp program runs;
/// the environment is set once, before the test starts programs or threads
/// that read it.
pub fn isolate_from_host_config() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::env::set_var(cdp_core::config::CONFIG_ENV, HARNESS_CONFIG));
}

/// The directory holding the workspace binaries (`cdpd`, `cdpctl`).
pub fn bin_dir() -> PathBuf {
    isolate_from_host_config();
    let dir = match std::env::var_os("CDP_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().expect("current_exe");
            // target/debug/deps/<test>-<hash>  →  target/debug
            exe.parent()
                .and_then(Path::parent)
                .expect("test binary has no grandparent directory")
                .to_path_buf()
        }
    };
    if !dir.join("cdpd").is_file() {
        panic!(
            "no cdpd binary in {}: run `cargo build --workspace` first \
             (or set CDP_BIN_DIR to the directory holding cdpd and cdpctl)",
            dir.display()
        );
    }
    dir
}

/// Path of a workspace binary (`cdpd`, `cdpctl`, …); panics if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    if !p.is_file() {
        panic!(
            "{} is missing: run `cargo build --workspace` first",
            p.display()
        );
    }
    p
}

/// Debian package that provides an external tool the tests use.
fn package_of(tool: &str) -> &'static str {
    match tool {
        "qemu-io" | "qemu-img" | "qemu-nbd" => "qemu-utils",
        "nbdkit" => "nbdkit",
        "nbdinfo" | "nbdcopy" => "libnbd-bin",
        "nbdsh" => "python3-libnbd",
        "fio" => "fio",
        "cmp" => "diffutils",
        "apparmor_parser" => "apparmor",
        "dpkg-deb" => "dpkg",
        "systemd-analyze" => "systemd",
        "mount" | "umount" => "mount",
        "dash" => "dash",
        _ => "?",
    }
}

/// Finds `name` on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Panics (the test fails, it is not skipped) when an external tool is missing.
pub fn require_tool(name: &str) -> PathBuf {
    match which(name) {
        Some(p) => p,
        None => panic!(
            "required tool `{name}` is not installed: run `bash scripts/install-deps` \
             (or: apt-get install -y --no-install-recommends {})",
            package_of(name)
        ),
    }
}

/// Runs a command and returns its output; panics with stdout/stderr if it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    if !out.status.success() {
        panic!(
            "command failed ({}): {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            cmd,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Runs a command with stdin closed and returns its output.
///
/// A command still running after [`COMMAND_TIMEOUT`] is killed and the test fails, so a
/// hung daemon cannot hang the test run.
pub fn run(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    }
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    let status = match wait_child(child, COMMAND_TIMEOUT) {
        Some(st) => st,
        None => panic!(
            "{cmd:?} did not finish within {COMMAND_TIMEOUT:?}; killed\n--- stderr ---\n{}",
            String::from_utf8_lossy(&err.join().unwrap_or_default())
        ),
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Waits for a child to exit, at most `timeout`; on timeout kills it (SIGKILL), reaps it
/// and returns None.
pub fn wait_child(mut child: Child, timeout: Duration) -> Option<ExitStatus> {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    match rx.recv_timeout(timeout) {
        Ok(st) => Some(st.expect("wait")),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = rx.recv();
            None
        }
    }
}

/// Parses JSON that may be preceded by warning lines (fio): from the first `{`.
pub fn parse_json_lenient(text: &str) -> Value {
    let start = text
        .find('{')
        .unwrap_or_else(|| panic!("no JSON object in output:\n{text}"));
    serde_json::from_str(&text[start..])
        .unwrap_or_else(|e| panic!("bad JSON ({e}) in output:\n{text}"))
}

/// Deterministic pseudo-random bytes (xorshift64*), for image contents and patterns.
pub fn fill_pseudo_random(seed: u64, buf: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// Compares two files byte for byte; returns a description of the first difference.
pub fn first_difference(a: &Path, b: &Path) -> Option<String> {
    let fa = File::open(a).unwrap_or_else(|e| panic!("open {}: {e}", a.display()));
    let fb = File::open(b).unwrap_or_else(|e| panic!("open {}: {e}", b.display()));
    let (la, lb) = (fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
    if la != lb {
        return Some(format!(
            "sizes differ: {} is {la} bytes, {} is {lb} bytes",
            a.display(),
            b.display()
        ));
    }
    const CHUNK: usize = 1 << 20;
    let mut ba = vec![0u8; CHUNK];
    let mut bb = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < la {
        let n = CHUNK.min((la - off) as usize);
        fa.read_exact_at(&mut ba[..n], off).unwrap();
        fb.read_exact_at(&mut bb[..n], off).unwrap();
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap();
            let at = off + i as u64;
            let mut end = i;
            while end < n && ba[end] != bb[end] {
                end += 1;
            }
            return Some(format!(
                "{} and {} differ at byte {at} (0x{at:x}): {:#04x} vs {:#04x} \
                 (first differing run is {} bytes long within this MiB)",
                a.display(),
                b.display(),
                ba[i],
                bb[i],
                end - i
            ));
        }
        off += n as u64;
    }
    None
}

/// Asserts two files are identical byte for byte.
pub fn assert_files_equal(a: &Path, b: &Path) {
    if let Some(d) = first_difference(a, b) {
        panic!("files differ: {d}");
    }
}

/// `qemu-img compare` (raw vs raw, force-share); the second argument may be an NBD URI.
pub fn qemu_img_compare(a: &OsStr, b: &OsStr) {
    require_tool("qemu-img");
    let out = run(Command::new("qemu-img")
        .args(["compare", "-U", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b));
    if !out.status.success() {
        panic!(
            "qemu-img compare {:?} {:?} failed ({}):\n{}{}",
            a,
            b,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Images are identical"),
        "qemu-img compare {a:?} {b:?}: {text}"
    );
}

/// One disk given to the daemon.
#[derive(Clone, Debug)]
pub struct Disk {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    /// A copy of the image as it was before cdpd first started.
    pub initial: PathBuf,
}

/// How to create a disk image for a test.
#[derive(Clone, Debug)]
enum Content {
    /// Sparse, all zeros.
    Zero,
    /// Deterministic pseudo-random data everywhere (so that replayed zeroes and trims matter).
    Random(u64),
}

/// Builder for [`Daemon`].
pub struct DaemonBuilder {
    vm_name: String,
    disks: Vec<(String, u64, Content)>,
    extra: Vec<OsString>,
    user: Option<(u32, u32)>,
    host: Option<(PathBuf, PathBuf)>,
}

impl DaemonBuilder {
    /// Adds a sparse, zero-filled raw disk.
    pub fn disk(mut self, name: &str, size: u64) -> Self {
        self.disks.push((name.to_string(), size, Content::Zero));
        self
    }

    /// Adds a raw disk filled with pseudo-random data derived from `seed`.
    pub fn disk_random(mut self, name: &str, size: u64, seed: u64) -> Self {
        self.disks
            .push((name.to_string(), size, Content::Random(seed)));
        self
    }

    /// Sets the VM name (default `test-vm`).
    pub fn vm_name(mut self, name: &str) -> Self {
        self.vm_name = name.to_string();
        self
    }

    /// Extra arguments for `cdpd run` (e.g. `--segment-age 200ms`).
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.extra.extend(args.into_iter().map(Into::into));
        self
    }

    /// Runs cdpd as `uid`:`gid` (the VM's QEMU user), as the libvirt hook
    /// lays a VM out: `<state>`, `<state>/vms` and `<run>` stay root's (0755);
    /// `<state>/vms/<uuid>`, `<run>/<uuid>` and the images directory are
    /// created for that user (0700), each image is its own (0600), and the
    /// test's directory is opened (0755) so that it can reach them. Needs
    /// root. Without it cdpd runs as the test does, and nothing is chowned.
    pub fn as_user(mut self, uid: u32, gid: u32) -> Self {
        self.user = Some((uid, gid));
        self
    }

    /// Uses `state` and `run` as the state and run directories (shared by
    /// several daemons, as on one host) instead of this daemon's own; they
    /// are created root-owned, mode 0755, when missing.
    pub fn host_dirs(mut self, state: &Path, run: &Path) -> Self {
        self.host = Some((state.to_path_buf(), run.to_path_buf()));
        self
    }

    /// Creates the images and state, then starts cdpd and waits for READY.
    pub fn start(self) -> Daemon {
        let mut d = self.prepare();
        d.start();
        d
    }

    /// Creates the temporary directory, images and their initial copies; does not start cdpd.
    pub fn prepare(self) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("cdp-test-")
            .tempdir_in(
                std::env::var_os("CDP_TEST_TMPDIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(std::env::temp_dir),
            )
            .expect("tempdir");
        let root = dir.path().to_path_buf();
        for sub in ["images", "initial", "work"] {
            fs::create_dir_all(root.join(sub)).unwrap();
        }
        let mut disks = Vec::new();
        for (name, size, content) in self.disks {
            let path = root.join("images").join(format!("{name}.img"));
            let initial = root.join("initial").join(format!("{name}.img"));
            let f = File::create(&path).unwrap();
            f.set_len(size).unwrap();
            if let Content::Random(seed) = content {
                let mut buf = vec![0u8; 1 << 20];
                let mut off = 0u64;
                while off < size {
                    let n = buf.len().min((size - off) as usize);
                    fill_pseudo_random(seed ^ off, &mut buf[..n]);
                    f.write_all_at(&buf[..n], off).unwrap();
                    off += n as u64;
                }
            }
            drop(f);
            copy_sparse(&path, &initial);
            disks.push(Disk {
                name,
                path,
                size,
                initial,
            });
        }
        assert!(!disks.is_empty(), "a daemon needs at least one disk");
        let log_path = root.join("cdpd.log");
        let (state_dir, run_dir) = self
            .host
            .clone()
            .unwrap_or_else(|| (root.join("state"), root.join("run")));
        for d in [&state_dir, &run_dir] {
            fs::create_dir_all(d).unwrap();
        }
        let vm_uuid = uuid::Uuid::new_v4().to_string();
        if let Some((uid, gid)) = self.user {
            lay_out_for_user(&root, &state_dir, &run_dir, &vm_uuid, &disks, (uid, gid));
        }
        Daemon {
            vm_uuid,
            vm_name: self.vm_name,
            disks,
            extra: self.extra,
            user: self.user,
            state_dir,
            run_dir,
            log_path,
            child: None,
            starts: 0,
            dir: Some(dir),
            root,
        }
    }
}

/// What the libvirt hook and libvirt's DAC driver leave for a VM whose
/// cdpd runs as `owner` (see [`DaemonBuilder::as_user`]).
fn lay_out_for_user(
    root: &Path,
    state_dir: &Path,
    run_dir: &Path,
    vm_uuid: &str,
    disks: &[Disk],
    owner: (u32, u32),
) {
    use std::os::unix::fs::PermissionsExt;
    assert!(
        nix::unistd::geteuid().is_root(),
        "a daemon run as uid {} is set up by root: run this test as root",
        owner.0
    );
    let mode = |p: &Path, m: u32| {
        fs::set_permissions(p, fs::Permissions::from_mode(m))
            .unwrap_or_else(|e| panic!("chmod {:o} {}: {e}", m, p.display()))
    };
    let own = |p: &Path| {
        std::os::unix::fs::chown(p, Some(owner.0), Some(owner.1))
            .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()))
    };
    mode(root, 0o755);
    let vms = state_dir.join("vms");
    fs::create_dir_all(&vms).unwrap();
    for shared in [state_dir, &vms, run_dir] {
        mode(shared, 0o755);
    }
    let images = root.join("images");
    for dir in [vms.join(vm_uuid), run_dir.join(vm_uuid), images] {
        fs::create_dir_all(&dir).unwrap();
        own(&dir);
        mode(&dir, 0o700);
    }
    for d in disks {
        own(&d.path);
        mode(&d.path, 0o600);
    }
}

/// Copies a file, keeping holes where the source is all zeros (so scratch images stay small).
pub fn copy_sparse(from: &Path, to: &Path) {
    let src = File::open(from).unwrap_or_else(|e| panic!("open {}: {e}", from.display()));
    let len = src.metadata().unwrap().len();
    let dst = File::create(to).unwrap_or_else(|e| panic!("create {}: {e}", to.display()));
    dst.set_len(len).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let n = buf.len().min((len - off) as usize);
        src.read_exact_at(&mut buf[..n], off).unwrap();
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_all_at(&buf[..n], off).unwrap();
        }
        off += n as u64;
    }
}

/// A running (or stopped) `cdpd run` with its own temporary state, run and image directories.
pub struct Daemon {
    pub vm_uuid: String,
    pub vm_name: String,
    pub disks: Vec<Disk>,
    /// Extra `cdpd run` arguments; may be changed between stops and [`Daemon::start`].
    pub extra: Vec<OsString>,
    /// The uid and gid cdpd runs as ([`DaemonBuilder::as_user`]); None: the test's.
    pub user: Option<(u32, u32)>,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    /// cdpd's stdout and stderr, across restarts.
    pub log_path: PathBuf,
    /// Temporary directory root (images/, initial/, state/, run/, work/).
    pub root: PathBuf,
    child: Option<Child>,
    starts: u32,
    dir: Option<tempfile::TempDir>,
}

impl Daemon {
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder {
            vm_name: "test-vm".to_string(),
            disks: Vec::new(),
            extra: Vec::new(),
            user: None,
            host: None,
        }
    }

    /// A daemon serving one zero-filled disk `vda` of `size` bytes.
    pub fn with_disk(size: u64) -> Daemon {
        Daemon::builder().disk("vda", size).start()
    }

    /// The VM's catalog: `<state>/vms/<uuid>/catalog.sqlite`.
    pub fn catalog_path(&self) -> PathBuf {
        self.state_dir
            .join("vms")
            .join(&self.vm_uuid)
            .join("catalog.sqlite")
    }

    /// The disk called `name`.
    pub fn disk(&self, name: &str) -> &Disk {
        self.disks
            .iter()
            .find(|d| d.name == name)
            .unwrap_or_else(|| panic!("no disk {name}"))
    }

    /// Path of the image file of `disk`.
    pub fn image(&self, disk: &str) -> PathBuf {
        self.disk(disk).path.clone()
    }

    /// A scratch directory for the test's own files.
    pub fn work_dir(&self) -> PathBuf {
        self.root.join("work")
    }

    /// The NBD unix socket of `disk`.
    pub fn socket(&self, disk: &str) -> PathBuf {
        self.run_dir
            .join(&self.vm_uuid)
            .join(format!("{disk}.sock"))
    }

    /// `nbd+unix:///<disk>?socket=<path>`.
    pub fn uri(&self, disk: &str) -> String {
        format!("nbd+unix:///{disk}?socket={}", self.socket(disk).display())
    }

    /// PID of the running daemon.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("cdpd is not running").id()
    }

    /// The full `cdpd run` command line for the current settings.
    pub fn command(&self, ready_fd: i32) -> Command {
        let mut cmd = Command::new(bin("cdpd"));
        cmd.arg("run")
            .arg("--vm-uuid")
            .arg(&self.vm_uuid)
            .arg("--vm-name")
            .arg(&self.vm_name);
        for d in &self.disks {
            let mut spec = OsString::from(format!("{}=", d.name));
            spec.push(&d.path);
            cmd.arg("--disk").arg(spec);
        }
        cmd.arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .arg("--ready-fd")
            .arg(ready_fd.to_string())
            .args(&self.extra);
        cmd
    }

    /// Starts cdpd and waits until it writes `READY` to its ready fd.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "cdpd is already running");
        let (rd, wr): (OwnedFd, OwnedFd) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe2");
        let wfd = wr.as_raw_fd();
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        writeln!(log, "===== cdpd start #{} =====", self.starts).unwrap();
        let mut cmd = self.command(wfd);
        if let Some((uid, gid)) = self.user {
            // (std drops the supplementary groups when root sets a uid.)
            cmd.uid(uid).gid(gid);
            writeln!(log, "as uid {uid}, gid {gid}:").unwrap();
        }
        writeln!(log, "{cmd:?}").unwrap();
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        // SAFETY: only fcntl (async-signal-safe) between fork and exec: clear FD_CLOEXEC on
        // the pipe's write end in the child, so cdpd inherits exactly that descriptor.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(wfd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        drop(wr);
        self.child = Some(child);

        // Read the ready pipe on a helper thread so that the wait has a timeout.
        let (tx, rx) = mpsc::channel::<Option<String>>();
        let file = File::from(rd);
        std::thread::spawn(move || {
            let mut r = BufReader::new(file);
            loop {
                let mut line = String::new();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(None);
                        return;
                    }
                    Ok(_) => {
                        if tx.send(Some(line)).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        match rx.recv_timeout(READY_TIMEOUT) {
            Ok(Some(line)) if line.trim_end() == "READY" => {}
            Ok(Some(line)) => {
                // Anything else on the ready fd is a contract violation.
                self.fail(&format!(
                    "cdpd wrote {line:?} to its ready fd instead of READY"
                ));
            }
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.wait_exit(Duration::from_secs(5));
                self.fail(&format!(
                    "cdpd closed its ready fd without writing READY (exit status: {status:?})"
                ));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.fail(&format!(
                    "cdpd did not write READY within {READY_TIMEOUT:?}"
                ));
            }
        }
        for d in &self.disks {
            let s = self.socket(&d.name);
            assert!(
                s.exists(),
                "cdpd reported READY but {} does not exist",
                s.display()
            );
        }
    }

    /// Kills the daemon (if running) and panics with `msg` and cdpd's log.
    pub fn fail(&mut self, msg: &str) -> ! {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        panic!("{msg}\n{}", self.log_tail());
    }

    /// cdpd's log (stdout+stderr) so far, for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(200);
        format!(
            "--- cdpd log ({}) ---\n{}\n--- end of cdpd log ---",
            self.log_path.display(),
            lines[from..].join("\n")
        )
    }

    /// Waits for the daemon to exit (at most `timeout`, then SIGKILL and None).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_child(self.child.take()?, timeout)
    }

    /// True while the daemon process has not exited.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(c) => c.try_wait().expect("try_wait").is_none(),
        }
    }

    /// Panics (with cdpd's log) unless the daemon is still running.
    pub fn assert_alive(&mut self, context: &str) {
        if let Some(c) = self.child.as_mut() {
            if let Some(st) = c.try_wait().expect("try_wait") {
                self.child = None;
                panic!("cdpd exited ({st}) {context}\n{}", self.log_tail());
            }
        } else {
            panic!("cdpd is not running ({context})");
        }
    }

    /// Sends SIGTERM, waits, and asserts a clean exit (status 0).
    pub fn term(&mut self) {
        let pid = self.pid();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("kill -TERM");
        match self.wait_exit(STOP_TIMEOUT) {
            Some(st) if st.success() => {}
            Some(st) => panic!("cdpd exited with {st} after SIGTERM\n{}", self.log_tail()),
            None => self.fail(&format!(
                "cdpd did not exit within {STOP_TIMEOUT:?} of SIGTERM"
            )),
        }
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops cleanly (SIGTERM) and starts again with the same arguments.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.term();
        }
        self.start();
    }

    /// Runs `cdpctl ARGS` (stdin closed) and returns its output, whatever the status.
    pub fn cdpctl<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run(Command::new(bin("cdpctl")).args(args))
    }

    /// Runs `cdpctl ARGS`, panics on failure, returns stdout.
    pub fn cdpctl_ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.cdpctl(&args);
        if !out.status.success() {
            panic!(
                "cdpctl {:?} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}\n{}",
                args,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log_tail()
            );
        }
        String::from_utf8(out.stdout).expect("cdpctl output is not UTF-8")
    }

    /// `cdpctl status --vm-uuid U --run-dir R --json`.
    pub fn status_json(&self) -> Value {
        let out = self.cdpctl_ok([
            OsStr::new("status"),
            OsStr::new("--vm-uuid"),
            OsStr::new(&self.vm_uuid),
            OsStr::new("--run-dir"),
            self.run_dir.as_os_str(),
            OsStr::new("--json"),
        ]);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("cdpctl status: bad JSON ({e}):\n{out}"))
    }

    /// `cdpctl journal inspect --vm-uuid U --state-dir D --json`, parsed.
    pub fn journal_json(&self) -> Value {
        let out = self.cdpctl_ok([
            OsStr::new("journal"),
            OsStr::new("inspect"),
            OsStr::new("--vm-uuid"),
            OsStr::new(&self.vm_uuid),
            OsStr::new("--state-dir"),
            self.state_dir.as_os_str(),
            OsStr::new("--json"),
        ]);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("cdpctl journal inspect: bad JSON ({e}):\n{out}"))
    }

    /// The journal's records (all disks), in the order cdpctl lists them.
    pub fn journal_records(&self) -> Vec<Value> {
        let j = self.journal_json();
        j["records"]
            .as_array()
            .unwrap_or_else(|| panic!("journal inspect JSON has no records array: {j}"))
            .clone()
    }

    /// `cdpctl journal replay --vm-uuid U --disk DISK --onto ONTO --state-dir D [--upto UPTO]`.
    pub fn replay(&self, disk: &str, onto: &Path, upto: Option<&str>) {
        let mut args: Vec<OsString> = vec![
            "journal".into(),
            "replay".into(),
            "--vm-uuid".into(),
            self.vm_uuid.clone().into(),
            "--disk".into(),
            disk.into(),
            "--onto".into(),
            onto.into(),
            "--state-dir".into(),
            self.state_dir.clone().into(),
        ];
        if let Some(u) = upto {
            args.push("--upto".into());
            args.push(u.into());
        }
        self.cdpctl_ok(args);
    }

    /// The central invariant, checked with cdpd stopped: a copy of the initial image with
    /// the disk's journal replayed onto it equals the image byte for byte. Returns the path
    /// of the replayed copy.
    pub fn check_replay_invariant(&self, disk: &str) -> PathBuf {
        assert!(
            self.child.is_none(),
            "stop cdpd before checking the replay invariant"
        );
        let d = self.disk(disk);
        let copy = self.work_dir().join(format!("{disk}.replayed.img"));
        copy_sparse(&d.initial, &copy);
        self.replay(disk, &copy, None);
        if let Some(diff) = first_difference(&copy, &d.path) {
            panic!(
                "replay invariant broken for {disk}: initial image + journal replay != image: {diff}\n\
                 (test directory {}; set CDP_KEEP_TMP=1 to keep it after the test)",
                self.root.display()
            );
        }
        copy
    }

    /// Keeps the temporary directory after the test (for debugging).
    pub fn keep(&mut self) -> PathBuf {
        if let Some(d) = self.dir.take() {
            let _ = d.keep();
        }
        self.root.clone()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        let keep = std::env::var_os("CDP_KEEP_TMP").is_some_and(|v| !v.is_empty() && v != "0");
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
            eprintln!("test directory: {}", self.root.display());
        }
        if keep {
            self.keep();
            eprintln!("kept test directory {}", self.root.display());
        }
    }
}

/// Records of one disk from a `journal inspect` listing.
pub fn records_of<'a>(records: &'a [Value], disk: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["disk"] == disk).collect()
}

/// Records of a given kind.
pub fn records_of_kind<'a>(records: &'a [Value], kind: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["kind"] == kind).collect()
}

/// Reads `len` bytes of a file at `off`.
pub fn read_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, off).unwrap();
    buf
}

/// Reads a whole (small) file.
pub fn read_file(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(path).unwrap().read_to_end(&mut v).unwrap();
    v
}
