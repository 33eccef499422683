//! The wrapper's processes: decide whether to protect, start cdpd and the
//! shipper, wait for READY, rewrite, and exec QEMU in this same process (so
//! libvirt's PID is QEMU's).
//!
//! libvirt starts QEMU with `-sandbox on,…,spawn=deny`: QEMU can never fork
//! later, so both children are started here, before the exec. They keep
//! nothing libvirt passed (every inherited descriptor is marked close-on-exec
//! in them), while QEMU keeps everything (`-add-fd`, the monitor `fd=`).

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cdp_core::config::{Config, ConfigError};
use cdp_core::layout::{RunDir, StateDir};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use thiserror::Error;

use crate::argv::{self, ArgvError, Redirect};
use crate::domain::{self, Domain, DomainError, Tagged};

/// How long a VM start waits for cdpd to listen.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the wrapper did not become QEMU. Every one fails the VM start; the
/// message is what libvirt shows (`virsh start`), so it says what to do.
#[derive(Debug, Error)]
pub enum LaunchError {
    #[error("{0}: usage: cdp-qemu [--vm-config DOMAIN.xml] [--qemu PATH] [--config cdp.toml] -- QEMU-ARGS…")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("VM definition {path}: {source}")]
    Definition {
        path: PathBuf,
        #[source]
        source: DomainError,
    },
    #[error(
        "VM {name} runs cdp-qemu as its emulator, but its definition is not readable here ({live}: {source}) \
         and the libvirt hook left none in {run_dir}: install the hook (`cdpctl install --libvirt`) and restart libvirtd"
    )]
    Unreadable {
        name: String,
        live: PathBuf,
        run_dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("VM {vm} is not started: {source}")]
    Keys {
        vm: String,
        #[source]
        source: DomainError,
    },
    #[error("VM {vm} is not started: {source}")]
    Argv {
        vm: String,
        #[source]
        source: ArgvError,
    },
    #[error(transparent)]
    Name(#[from] cdp_core::names::NameError),
    #[error("cdpd did not report READY within {READY_TIMEOUT:?}")]
    ReadyTimeout,
    #[error("cdpd failed to start{status}: {message}")]
    CdpdFailed { status: String, message: String },
    #[error("waiting for cdpd: {0}")]
    Wait(#[source] std::io::Error),
    #[error("VM {vm} is not started: its disks cannot be protected: {source}")]
    Unprotected {
        vm: String,
        #[source]
        source: Box<LaunchError>,
    },
    #[error("cannot run {path}: {source}")]
    Exec {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type Result<T, E = LaunchError> = std::result::Result<T, E>;

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> LaunchError + 'a {
    move |source| LaunchError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The wrapper's own options, before `--`.
#[derive(Debug, Default, Clone)]
pub struct Own {
    pub vm_config: Option<PathBuf>,
    pub qemu: Option<PathBuf>,
    pub config: Option<PathBuf>,
}

/// Split `[--vm-config F] [--qemu Q] [--config C] -- QEMU-ARGS…`. When
/// used as libvirt's emulator there are no own options: all are QEMU's.
pub fn split_args(args: &[String]) -> Result<(Own, Vec<String>)> {
    let mut own = Own::default();
    if !args
        .first()
        .is_some_and(|a| matches!(a.as_str(), "--vm-config" | "--qemu" | "--config" | "--"))
    {
        return Ok((own, args.to_vec()));
    }
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| -> Result<PathBuf> {
            it.next()
                .map(PathBuf::from)
                .ok_or_else(|| LaunchError::Usage(format!("{name} needs a value")))
        };
        match a.as_str() {
            "--" => return Ok((own, it.cloned().collect())),
            "--vm-config" => own.vm_config = Some(val("--vm-config")?),
            "--qemu" => own.qemu = Some(val("--qemu")?),
            "--config" => own.config = Some(val("--config")?),
            other => {
                return Err(LaunchError::Usage(format!(
                    "unknown cdp-qemu option {other:?}"
                )))
            }
        }
    }
    Err(LaunchError::Usage(
        "missing `--` before QEMU's arguments".into(),
    ))
}

/// The real QEMU: `--qemu`, else `$CDP_QEMU_BINARY`, else the emulator the
/// domain had before `cdpctl protect` (its CDP keys remember it), else the
/// distribution's.
fn real_qemu(own: &Own, remembered: Option<&str>) -> PathBuf {
    own.qemu
        .clone()
        .or_else(|| std::env::var_os("CDP_QEMU_BINARY").map(PathBuf::from))
        .or_else(|| remembered.map(PathBuf::from))
        .unwrap_or_else(|| "/usr/bin/qemu-system-x86_64".into())
}

/// Where cdpd and cdp-shipper are: next to this binary, or `$CDP_BIN_DIR`.
fn sibling(name: &str) -> PathBuf {
    if let Some(d) = std::env::var_os("CDP_BIN_DIR") {
        return Path::new(&d).join(name);
    }
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Replace this process with QEMU. Only returns on failure.
fn exec_qemu(qemu: &Path, args: &[String]) -> LaunchError {
    LaunchError::Exec {
        source: Command::new(qemu).args(args).exec(),
        path: qemu.to_path_buf(),
    }
}

/// libvirt's live definition: `/run/libvirt/qemu/NAME.xml` (a `<domstatus>`).
/// Only root can read it; QEMU's user gets the copy the hook leaves.
fn libvirt_xml(name: &str) -> PathBuf {
    let dir = std::env::var_os("CDP_LIBVIRT_RUN_DIR").unwrap_or_else(|| "/run/libvirt/qemu".into());
    Path::new(&dir).join(format!("{name}.xml"))
}

/// Where the VM definition is: `--vm-config`; else the copy the libvirt hook
/// left in `<run-dir>/<uuid>/domain.xml`; else libvirt's live file. `None`:
/// not started by libvirt and no definition given, so nothing to protect.
fn find_definition(own: &Own, qargs: &[String], run_dir: &RunDir) -> Result<Option<PathBuf>> {
    if let Some(p) = &own.vm_config {
        return Ok(Some(p.clone()));
    }
    if let Some(u) = argv::vm_uuid(qargs) {
        if cdp_core::names::check_uuid(&u).is_ok() {
            let p = run_dir.vm(&u).definition();
            if p.exists() {
                return Ok(Some(p));
            }
        }
    }
    let Some(name) = argv::vm_name(qargs) else {
        return Ok(None);
    };
    let live = libvirt_xml(&name);
    match std::fs::File::open(&live) {
        Ok(_) => Ok(Some(live)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(LaunchError::Unreadable {
            name,
            live,
            run_dir: run_dir.path().to_path_buf(),
            source,
        }),
    }
}

/// In a child before exec: mark every descriptor but 0–2 and `keep`
/// close-on-exec (the child keeps nothing libvirt passed to QEMU).
pub(crate) fn close_inherited(cmd: &mut Command, keep: &[i32]) {
    let mut keep: Vec<u32> = keep.iter().filter(|k| **k > 2).map(|k| *k as u32).collect();
    keep.sort_unstable();
    // SAFETY: the closure runs between fork and exec, where only
    // async-signal-safe calls are allowed: it makes close_range(2) system
    // calls only, reads a vector built before the fork, allocates nothing
    // and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            const CLOSE_RANGE_CLOEXEC: libc::c_uint = 4;
            let mut lo: u32 = 3;
            for &k in &keep {
                if lo < k {
                    libc::syscall(libc::SYS_close_range, lo, k - 1, CLOSE_RANGE_CLOEXEC);
                }
                lo = k + 1;
            }
            libc::syscall(libc::SYS_close_range, lo, u32::MAX, CLOSE_RANGE_CLOEXEC);
            Ok(())
        });
    }
}

/// In a child before exec: descriptor `fd` (a pipe end) survives the exec.
pub(crate) fn keep_across_exec(cmd: &mut Command, fd: i32) {
    // SAFETY: the closure runs between fork and exec: it makes one fcntl(2)
    // call (async-signal-safe) on a descriptor the parent keeps open until
    // spawn returns, allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            libc::fcntl(fd, libc::F_SETFD, 0);
            Ok(())
        });
    }
}

fn stop(children: &mut [Child]) {
    for c in children.iter_mut() {
        let _ = kill(nix::unistd::Pid::from_raw(c.id() as i32), Signal::SIGTERM);
    }
    for c in children.iter_mut() {
        let _ = c.wait();
    }
}

/// Wait for `READY` (or `ERROR …`, or EOF) on the ready pipe, bounded.
fn wait_ready(rd: OwnedFd, child: &mut Child) -> Result<()> {
    let mut f = std::fs::File::from(rd);
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut buf = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(LaunchError::ReadyTimeout);
        }
        let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Err(nix::errno::Errno::EINTR) | Ok(0) => continue,
            Err(e) => return Err(LaunchError::Wait(e.into())),
            Ok(_) => {}
        }
        let mut chunk = [0u8; 512];
        let r = f.read(&mut chunk).map_err(LaunchError::Wait)?;
        buf.extend_from_slice(&chunk[..r]);
        let text = String::from_utf8_lossy(&buf);
        if text.starts_with("READY") {
            return Ok(());
        }
        if r == 0 || text.contains('\n') {
            let status = child.try_wait().ok().flatten();
            return Err(LaunchError::CdpdFailed {
                status: status.map(|s| format!(" ({s})")).unwrap_or_default(),
                message: text.trim().trim_start_matches("ERROR ").trim().to_string(),
            });
        }
    }
}

/// The whole wrapper. Returns only on failure (the caller prints it and
/// exits non-zero, so libvirt shows the message and the VM does not start).
pub fn run(args: &[String]) -> LaunchError {
    match prepare(args) {
        Ok((qemu, final_args)) => exec_qemu(&qemu, &final_args),
        Err(e) => e,
    }
}

/// What to exec: QEMU and its arguments, rewritten (and the capture started)
/// for a protected VM, untouched otherwise.
fn prepare(args: &[String]) -> Result<(PathBuf, Vec<String>)> {
    let (own, qargs) = split_args(args)?;
    if argv::is_probe(&qargs) {
        return Ok((real_qemu(&own, None), qargs));
    }
    let config = Config::load(own.config.as_deref())?;
    let run_dir = RunDir::new(config.run_dir(None));
    let Some(xml_path) = find_definition(&own, &qargs, &run_dir)? else {
        return Ok((real_qemu(&own, None), qargs));
    };
    let text = std::fs::read_to_string(&xml_path)
        .map_err(io_err("reading the VM definition", &xml_path))?;
    let dom = domain::parse(&text).map_err(|source| LaunchError::Definition {
        path: xml_path.clone(),
        source,
    })?;
    let qemu = real_qemu(
        &own,
        dom.protection.as_ref().and_then(|p| p.emulator.as_deref()),
    );
    let Some(protection) = &dom.protection else {
        return Ok((qemu, qargs));
    };
    let tagged = dom.tagged(&config).map_err(|source| LaunchError::Keys {
        vm: dom.name.clone(),
        source,
    })?;
    // Not honoured, said in the VM's log (libvirt's qemu/<name>.log is
    // this process's stderr); the VM still starts (docs/LIBVIRT.md,
    // "Per-disk policy"). `cdpctl status` says it too.
    for u in protection.unhonoured_policies() {
        eprintln!("cdp-qemu: warning: {}: {u}", dom.name);
    }
    let vm = Vm {
        uuid: cdp_core::names::check_uuid(&dom.uuid)?
            .hyphenated()
            .to_string(),
        policy: protection.policy.clone(),
        dom: &dom,
        tagged: &tagged,
        state: StateDir::new(config.state_dir(None)),
        run: run_dir,
        config: &config,
    };
    let redirects: Vec<Redirect> = tagged
        .iter()
        .map(|t| Redirect {
            target: t.target.clone(),
            path: t.path.clone(),
            socket: vm
                .run
                .vm(&vm.uuid)
                .disk_socket(&t.target)
                .display()
                .to_string(),
        })
        .collect();
    // Rewrite first: an argv we cannot rewrite must fail before anything starts.
    let final_args = argv::rewrite(&qargs, &redirects).map_err(|source| LaunchError::Argv {
        vm: dom.name.clone(),
        source,
    })?;
    start_capture(&vm)?;
    Ok((qemu, final_args))
}

/// A protected VM about to start.
struct Vm<'a> {
    uuid: String,
    policy: String,
    dom: &'a Domain,
    tagged: &'a [Tagged],
    state: StateDir,
    run: RunDir,
    config: &'a Config,
}

/// Save the definition, start cdpd (through its supervisor) and wait until
/// it serves every disk; the supervisor then starts the shipper. Both are
/// the supervisor's children, so they are reaped (QEMU, after the exec,
/// never waits for a child) (docs/DESIGN.md, "Processes").
fn start_capture(vm: &Vm) -> Result<()> {
    let saved_xml = save_definition(vm)?;
    let has_targets = vm
        .config
        .policy
        .get(&vm.policy)
        .is_some_and(|p| !p.targets.is_empty());
    let shipper = if has_targets {
        shipper_argv(vm, &saved_xml)
    } else {
        eprintln!(
            "cdp-qemu: warning: policy {:?} has no targets: the journal stays on this host",
            vm.policy
        );
        Vec::new()
    };
    let (mut sup, rd) = start_supervisor(vm, &shipper)?;
    if let Err(e) = wait_ready(rd, &mut sup) {
        stop(&mut [sup]);
        return Err(LaunchError::Unprotected {
            vm: vm.dom.name.clone(),
            source: Box::new(e),
        });
    }
    // The supervisor is QEMU's child after the exec; it ends with it.
    std::mem::forget(sup);
    Ok(())
}

/// Start the supervisor (crate::supervise), which starts cdpd and relays its
/// READY on the returned pipe. cdpd's command line goes to it on a pipe, and
/// after an empty argument the shipper's (none: no shipper).
fn start_supervisor(vm: &Vm, shipper: &[std::ffi::OsString]) -> Result<(Child, OwnedFd)> {
    use std::io::Write;
    let pipe = || {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| io_err("creating a pipe", Path::new("pipe"))(e.into()))
    };
    let (rd, wr) = pipe()?;
    let (args_rd, args_wr) = pipe()?;
    let (wfd, afd) = (wr.as_raw_fd(), args_rd.as_raw_fd());
    let me = std::env::current_exe().unwrap_or_else(|_| sibling("cdp-qemu"));
    let mut cmd = Command::new(&me);
    cmd.arg(crate::supervise::FLAG)
        .args([
            "--ready-fd",
            &wfd.to_string(),
            "--args-fd",
            &afd.to_string(),
        ])
        .stdin(Stdio::null());
    close_inherited(&mut cmd, &[wfd, afd]);
    keep_across_exec(&mut cmd, wfd);
    keep_across_exec(&mut cmd, afd);
    let mut sup = cmd.spawn().map_err(io_err("starting", &me))?;
    drop((wr, args_rd));
    let mut argv = Vec::new();
    for a in cdpd_argv(vm) {
        argv.extend_from_slice(std::os::unix::ffi::OsStrExt::as_bytes(a.as_os_str()));
        argv.push(0);
    }
    if !shipper.is_empty() {
        argv.push(0);
        for a in shipper {
            argv.extend_from_slice(std::os::unix::ffi::OsStrExt::as_bytes(a.as_os_str()));
            argv.push(0);
        }
    }
    if let Err(e) = std::fs::File::from(args_wr).write_all(&argv) {
        stop(&mut [sup]);
        return Err(io_err("passing cdpd's arguments to", &me)(e));
    }
    let _ = sup.try_wait();
    Ok((sup, rd))
}

/// The definition cdpd was started with, for the shipper to store: 0600, a
/// definition can hold secrets (VNC passwords, …).
fn save_definition(vm: &Vm) -> Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = vm.state.vm(&vm.uuid);
    std::fs::create_dir_all(dir.path()).map_err(io_err("creating", dir.path()))?;
    let saved = dir.definition();
    let _ = std::fs::remove_file(&saved);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&saved)
        .and_then(|mut f| f.write_all(vm.dom.xml.as_bytes()))
        .map_err(io_err("writing", &saved))?;
    Ok(saved)
}

/// cdpd's program and arguments; the supervisor adds `--ready-fd` and
/// `--die-with-parent` to each start.
fn cdpd_argv(vm: &Vm) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = vec![sibling("cdpd").into(), "run".into()];
    for (k, v) in [
        ("--vm-uuid", &vm.uuid),
        ("--vm-name", &vm.dom.name),
        ("--policy", &vm.policy),
    ] {
        a.push(k.into());
        a.push(v.into());
    }
    a.push("--state-dir".into());
    a.push(vm.state.path().into());
    a.push("--run-dir".into());
    a.push(vm.run.path().into());
    if let Some(c) = &vm.config.source {
        a.push("--config".into());
        a.push(c.into());
    }
    for t in vm.tagged {
        a.push("--disk".into());
        a.push(format!("{}={}", t.target, t.path).into());
    }
    a
}

/// The shipper's program and arguments; the supervisor adds `--follow-pid`
/// (itself) to each start.
fn shipper_argv(vm: &Vm, saved_xml: &Path) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = vec![sibling("cdp-shipper").into(), "run".into()];
    for (k, v) in [("--vm-uuid", &vm.uuid), ("--policy", &vm.policy)] {
        a.push(k.into());
        a.push(v.into());
    }
    a.push("--state-dir".into());
    a.push(vm.state.path().into());
    a.push("--run-dir".into());
    a.push(vm.run.path().into());
    a.push("--vm-config".into());
    a.push(saved_xml.into());
    if let Some(c) = &vm.config.source {
        a.push("--config".into());
        a.push(c.into());
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn own_options() {
        let (o, q) = split_args(&s(&["-name", "x"])).unwrap();
        assert!(o.vm_config.is_none());
        assert_eq!(q, s(&["-name", "x"]));
        let (o, q) = split_args(&s(&[
            "--vm-config",
            "d.xml",
            "--qemu",
            "/q",
            "--",
            "-name",
            "x",
        ]))
        .unwrap();
        assert_eq!(o.vm_config.unwrap(), PathBuf::from("d.xml"));
        assert_eq!(o.qemu.unwrap(), PathBuf::from("/q"));
        assert_eq!(q, s(&["-name", "x"]));
        assert!(split_args(&s(&["--vm-config", "d.xml", "-name"])).is_err());
    }
}
