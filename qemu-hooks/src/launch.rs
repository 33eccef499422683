//! The wrapper's processes: decide whether to protect, start cdpd and the
//! shipper, wait for READY, rewrite, and exec QEMU in this same process (so
//! libvirt's PID is QEMU's).
//!
//! libvirt starts QEMU with `-sandbox on,…,spawn=deny`: QEMU can never fork
//! later, so both children are started here, before the exec. They keep
//! nothing libvirt passed (every inherited descriptor is marked close-on-exec
//! in them), while QEMU keeps everything (`-add-fd`, the monitor `fd=`).

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::argv::{self, Redirect};
use crate::domain;

/// How long a VM start waits for cdpd to listen.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

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
                .with_context(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--" => return Ok((own, it.cloned().collect())),
            "--vm-config" => own.vm_config = Some(val("--vm-config")?),
            "--qemu" => own.qemu = Some(val("--qemu")?),
            "--config" => own.config = Some(val("--config")?),
            other => bail!("unknown cdp-qemu option {other:?}: usage: cdp-qemu [--vm-config DOMAIN.xml] [--qemu PATH] [--config cdp.toml] -- QEMU-ARGS…"),
        }
    }
    bail!("cdp-qemu: missing `--` before QEMU's arguments")
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
fn exec_qemu(qemu: &Path, args: &[String]) -> anyhow::Error {
    let e = Command::new(qemu).args(args).exec();
    anyhow::anyhow!("cannot run {}: {e}", qemu.display())
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
fn find_definition(own: &Own, qargs: &[String], run_dir: &Path) -> Result<Option<PathBuf>> {
    if let Some(p) = &own.vm_config {
        return Ok(Some(p.clone()));
    }
    if let Some(u) = argv::vm_uuid(qargs) {
        if cdp_core::names::check_uuid(&u).is_ok() {
            let p = crate::hook::definition_path(run_dir, &u);
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
        Err(e) => bail!(
            "VM {name} runs cdp-qemu as its emulator, but its definition is not readable here ({}: {e}) and the libvirt hook left none in {}: install the hook (`cdpctl install --libvirt`) and restart libvirtd",
            live.display(),
            run_dir.display()
        ),
    }
}

/// In a child before exec: mark every descriptor but `keep` close-on-exec,
/// and stop on the parent's death is left to the child itself.
fn close_inherited(cmd: &mut Command, keep: Option<i32>) {
    // SAFETY: only close_range(2), async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            const CLOSE_RANGE_CLOEXEC: libc::c_uint = 4;
            let ranges: [(u32, u32); 2] = match keep {
                Some(k) => [(3, (k as u32).saturating_sub(1)), (k as u32 + 1, u32::MAX)],
                None => [(3, u32::MAX), (1, 0)],
            };
            for (lo, hi) in ranges {
                if lo <= hi {
                    libc::syscall(libc::SYS_close_range, lo, hi, CLOSE_RANGE_CLOEXEC);
                }
            }
            Ok(())
        });
    }
}

fn stop(children: &mut [Child]) {
    for c in children.iter_mut() {
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    }
    for c in children.iter_mut() {
        let _ = c.wait();
    }
}

/// Wait for `READY` (or `ERROR …`, or EOF) on the ready pipe, bounded.
fn wait_ready(rd: OwnedFd, child: &mut Child) -> Result<()> {
    let mut f = std::fs::File::from(rd);
    let fd = f.as_raw_fd();
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut buf = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("cdpd did not report READY within {READY_TIMEOUT:?}");
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let n = unsafe { libc::poll(&mut p, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            bail!("waiting for cdpd: {e}");
        }
        if n == 0 {
            continue;
        }
        let mut chunk = [0u8; 512];
        let r = f.read(&mut chunk)?;
        buf.extend_from_slice(&chunk[..r]);
        let text = String::from_utf8_lossy(&buf);
        if text.starts_with("READY") {
            return Ok(());
        }
        if r == 0 || text.contains('\n') {
            let status = child.try_wait().ok().flatten();
            bail!(
                "cdpd failed to start{}: {}",
                status.map(|s| format!(" ({s})")).unwrap_or_default(),
                text.trim().trim_start_matches("ERROR ").trim()
            );
        }
    }
}

/// The whole wrapper. Returns only on failure (the caller prints it and
/// exits non-zero, so libvirt shows the message and the VM does not start).
pub fn run(args: &[String]) -> anyhow::Error {
    match prepare(args) {
        Ok((qemu, final_args)) => exec_qemu(&qemu, &final_args),
        Err(e) => e,
    }
}

fn prepare(args: &[String]) -> Result<(PathBuf, Vec<String>)> {
    let (own, qargs) = split_args(args)?;
    if argv::is_probe(&qargs) {
        return Ok((real_qemu(&own, None), qargs));
    }
    let config = cdp_core::config::Config::load(own.config.as_deref())?;
    let Some(xml_path) = find_definition(&own, &qargs, &config.run_dir(None))? else {
        return Ok((real_qemu(&own, None), qargs));
    };
    let text = std::fs::read_to_string(&xml_path)
        .with_context(|| format!("reading the VM definition {}", xml_path.display()))?;
    let dom =
        domain::parse(&text).with_context(|| format!("VM definition {}", xml_path.display()))?;
    let qemu = real_qemu(
        &own,
        dom.protection.as_ref().and_then(|p| p.emulator.as_deref()),
    );
    if dom.protection.is_none() {
        return Ok((qemu, qargs));
    }
    let tagged = dom
        .tagged(&config)
        .with_context(|| format!("VM {} is not started", dom.name))?;
    let uuid = cdp_core::names::check_uuid(&dom.uuid)?
        .hyphenated()
        .to_string();
    let state_dir = config.state_dir(None);
    let run_dir = config.run_dir(None);
    let policy = dom.protection.as_ref().unwrap().policy.clone();
    let redirects: Vec<Redirect> = tagged
        .iter()
        .map(|t| Redirect {
            target: t.target.clone(),
            path: t.path.clone(),
            socket: cdp_core::layout::RunDir::new(&run_dir)
                .vm(&uuid)
                .disk_socket(&t.target)
                .display()
                .to_string(),
        })
        .collect();
    // Rewrite first: an argv we cannot rewrite must fail before anything starts.
    let final_args = argv::rewrite(&qargs, &redirects)
        .with_context(|| format!("VM {} is not started", dom.name))?;

    // The definition cdpd was started with, for the shipper to store.
    let vm_state = state_dir.join("vms").join(&uuid);
    std::fs::create_dir_all(&vm_state)
        .with_context(|| format!("creating {}", vm_state.display()))?;
    let saved_xml = vm_state.join("domain.xml");
    // 0600: a definition can hold secrets (VNC passwords, …).
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::remove_file(&saved_xml);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&saved_xml)
            .and_then(|mut f| f.write_all(dom.xml.as_bytes()))
            .with_context(|| format!("writing {}", saved_xml.display()))?;
    }

    let (rd, wr) = pipe()?;
    let mut cdpd = Command::new(sibling("cdpd"));
    cdpd.arg("run")
        .args([
            "--vm-uuid",
            &uuid,
            "--vm-name",
            &dom.name,
            "--policy",
            &policy,
        ])
        .arg("--state-dir")
        .arg(&state_dir)
        .arg("--run-dir")
        .arg(&run_dir)
        .args([
            "--ready-fd",
            &wr.as_raw_fd().to_string(),
            "--die-with-parent",
        ])
        .stdin(Stdio::null());
    if let Some(c) = &config.source {
        cdpd.arg("--config").arg(c);
    }
    for t in &tagged {
        cdpd.arg("--disk").arg(format!("{}={}", t.target, t.path));
    }
    close_inherited(&mut cdpd, Some(wr.as_raw_fd()));
    let wfd = wr.as_raw_fd();
    // SAFETY: fcntl only: the ready pipe's write end survives exec in cdpd.
    unsafe {
        cdpd.pre_exec(move || {
            libc::fcntl(wfd, libc::F_SETFD, 0);
            Ok(())
        });
    }
    let mut children = Vec::new();
    let mut cdpd_child = cdpd
        .spawn()
        .with_context(|| format!("starting {}", sibling("cdpd").display()))?;
    drop(wr);
    if let Err(e) = wait_ready(rd, &mut cdpd_child) {
        children.push(cdpd_child);
        stop(&mut children);
        return Err(e.context(format!(
            "VM {} is not started: its disks cannot be protected",
            dom.name
        )));
    }
    let cdpd_pid = cdpd_child.id();
    children.push(cdpd_child);

    if config
        .policy
        .get(&policy)
        .is_some_and(|p| !p.targets.is_empty())
    {
        let mut ship = Command::new(sibling("cdp-shipper"));
        ship.arg("run")
            .args(["--vm-uuid", &uuid, "--policy", &policy])
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--run-dir")
            .arg(&run_dir)
            .arg("--vm-config")
            .arg(&saved_xml)
            .args(["--follow-pid", &cdpd_pid.to_string()])
            .stdin(Stdio::null());
        if let Some(c) = &config.source {
            ship.arg("--config").arg(c);
        }
        close_inherited(&mut ship, None);
        match ship.spawn() {
            Ok(c) => children.push(c),
            Err(e) => {
                // Capture runs; the journal waits for cdp-agent or a restart.
                eprintln!("cdp-qemu: warning: cdp-shipper did not start: {e}");
            }
        }
    } else {
        eprintln!(
            "cdp-qemu: warning: policy {policy:?} has no targets: the journal stays on this host"
        );
    }
    // The children are QEMU's after the exec; they end with it.
    std::mem::forget(children);
    Ok((qemu, final_args))
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
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
