//! A VM's adoption runs in a child process with the VM's identity
//! (docs/DESIGN.md, "Trust boundaries"): the owner of
//! `<state>/vms/<uuid>`, the user its QEMU runs as. Everything in that
//! tree (its catalog, journal, lock) is written by that user and is hostile
//! input to root; root (the agent) only lists the VMs, starts
//! `cdp-agent adopt-vm <uuid>` with the VM's uid and gid, and reads the
//! child's JSON report. Whatever the VM's files say, the child can do
//! nothing its QEMU could not.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use cdp_core::catalog::Catalog;
use cdp_core::layout::StateDir;
use cdp_core::privsep::VmIdentity;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;

use crate::adopt::{self, Adoption, RootImages};
use crate::{Options, VmFailure};

/// The hidden subcommand the child runs.
pub const ADOPT_VM: &str = "adopt-vm";

/// What the child tells the agent (one JSON line on its stdout).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChildReport {
    pub vm_uuid: String,
    pub vm: String,
    pub policy: Option<String>,
    pub adoption: Option<Adoption>,
    pub failure: Option<ChildFailure>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChildFailure {
    pub kind: String,
    pub message: String,
    pub transient: bool,
}

impl ChildReport {
    fn failed(vm_uuid: &str, kind: &str, message: String) -> ChildReport {
        ChildReport {
            vm_uuid: vm_uuid.to_string(),
            vm: String::new(),
            policy: None,
            adoption: None,
            failure: Some(ChildFailure {
                kind: kind.to_string(),
                message,
                transient: false,
            }),
        }
    }

    /// The failure as the agent reports it (kinds are those of
    /// `cdp_errors_total`; anything else counts as "ship").
    pub fn vm_failure(&self) -> Option<VmFailure> {
        let f = self.failure.as_ref()?;
        let kind = crate::metrics::ERROR_KINDS
            .iter()
            .find(|k| **k == f.kind)
            .copied()
            .unwrap_or("ship");
        Some(VmFailure {
            vm_uuid: self.vm_uuid.clone(),
            vm: self.vm.clone(),
            kind,
            message: f.message.clone(),
            transient: f.transient,
        })
    }
}

/// Parent side: adopt `uuid` in a child with the VM's identity. SIGTERM
/// (`stop`) is passed on to the child, which abandons its pass.
pub async fn adopt_in_child(
    opts: &Options,
    uuid: &str,
    stop: &mut watch::Receiver<bool>,
) -> ChildReport {
    let state = StateDir::new(&opts.state_dir);
    let id = match VmIdentity::of(&state, uuid) {
        Ok(id) => id,
        Err(e) => return ChildReport::failed(uuid, "lock", e.to_string()),
    };
    // The images libvirt names (root's copy, never the catalog's paths),
    // opened here and handed down: the child can recover a journal onto them
    // after libvirt gave them back to root, and onto nothing else.
    let images = match open_root_images(&state, uuid) {
        Ok(v) => v,
        Err(e) => return ChildReport::failed(uuid, "recovery", e),
    };
    let mut cmd = id.command(&opts.exe);
    cmd.arg(ADOPT_VM).arg(uuid);
    if !images.is_empty() {
        let arg: std::collections::BTreeMap<&str, (i32, &PathBuf)> = images
            .iter()
            .map(|(d, (f, p))| (d.as_str(), (f.as_raw_fd(), p)))
            .collect();
        cmd.arg("--root-images")
            .arg(serde_json::to_string(&arg).unwrap_or_default());
        let fds: Vec<i32> = arg.values().map(|(fd, _)| *fd).collect();
        // SAFETY: between fork and exec only fcntl(2), async-signal-safe,
        // clearing close-on-exec on descriptors this process owns.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &fds {
                    nix::fcntl::fcntl(
                        *fd,
                        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                    )?;
                }
                Ok(())
            });
        }
    }
    cmd.arg("--state-dir")
        .arg(&opts.state_dir)
        .arg("--run-dir")
        .arg(&opts.run_dir)
        .arg("--boot-id-file")
        .arg(&opts.boot_id_file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(c) = &opts.config_path {
        cmd.arg("--config").arg(c);
    }
    let child = match tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("starting {} as uid {}: {e}", opts.exe.display(), id.uid);
            return ChildReport::failed(uuid, "lock", msg);
        }
    };
    drop(images);
    let pid = child.id();
    let out = child.wait_with_output();
    tokio::pin!(out);
    let out = loop {
        tokio::select! {
            r = &mut out => break r,
            _ = stop.changed() => {
                if let Some(pid) = pid {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                }
            }
        }
    };
    match out {
        Ok(o) => match serde_json::from_slice::<ChildReport>(&o.stdout) {
            Ok(r) if r.vm_uuid == uuid => r,
            _ => ChildReport::failed(
                uuid,
                "ship",
                format!(
                    "the child adopting as uid {} ended ({}) without a report",
                    id.uid, o.status
                ),
            ),
        },
        Err(e) => ChildReport::failed(uuid, "ship", format!("waiting for the child: {e}")),
    }
}

/// Root opens, read-write, the image of each disk the hook's
/// `<state>/vms/<uuid>.images` names (a disk whose image cannot be opened
/// is left out: the child then opens what it can itself).
fn open_root_images(state: &StateDir, uuid: &str) -> Result<RootImages, String> {
    let mut out = RootImages::new();
    if !nix::unistd::geteuid().is_root() {
        return Ok(out);
    }
    let Some(map) = cdp_core::image::root_images(state, uuid).map_err(|e| e.to_string())? else {
        return Ok(out);
    };
    for (disk, path) in map {
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .custom_flags(libc_cloexec())
            .open(&path);
        if let Ok(f) = f {
            out.insert(disk, (f, path));
        }
    }
    Ok(out)
}

fn libc_cloexec() -> i32 {
    nix::fcntl::OFlag::O_CLOEXEC.bits()
}

/// The descriptors `--root-images` names (`{"disk": [fd, "path"]}`), taken
/// over by this process.
pub fn take_root_images(arg: Option<&str>) -> Result<RootImages, String> {
    let mut out = RootImages::new();
    let Some(arg) = arg else { return Ok(out) };
    let map: std::collections::BTreeMap<String, (i32, PathBuf)> =
        serde_json::from_str(arg).map_err(|e| format!("--root-images: {e}"))?;
    for (disk, (fd, path)) in map {
        if fd < 3 || nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_err() {
            return Err(format!("--root-images: {fd} is not an open descriptor"));
        }
        // SAFETY: the agent passed this descriptor down for us to own; it
        // is open (checked) and nothing else in this process uses it.
        let f = unsafe { std::fs::File::from_raw_fd(fd) };
        out.insert(disk, (f, path));
    }
    Ok(out)
}

/// Child side (`cdp-agent adopt-vm <uuid>`, already running as the VM's
/// user): open the VM's catalog and adopt it.
pub async fn adopt_vm(
    opts: &Options,
    uuid: &str,
    root_images: RootImages,
    stop: watch::Receiver<bool>,
) -> ChildReport {
    let cat = match Catalog::open(&opts.state_dir, uuid) {
        Ok(c) => c,
        Err(e) => return ChildReport::failed(uuid, "catalog", e.to_string()),
    };
    let row = match cat.vms() {
        Ok(v) => v.into_iter().find(|r| r.uuid == uuid),
        Err(e) => return ChildReport::failed(uuid, "catalog", e.to_string()),
    };
    let Some(row) = row else {
        let msg = format!(
            "the VM's catalog {} has no row for it",
            cat.path().display()
        );
        return ChildReport::failed(uuid, "catalog", msg);
    };
    let mut report = ChildReport {
        vm_uuid: uuid.to_string(),
        vm: row.name.clone(),
        policy: row.policy.clone(),
        adoption: None,
        failure: None,
    };
    let dirs = adopt::Dirs {
        state_dir: opts.state_dir.clone(),
        run_dir: opts.run_dir.clone(),
        boot_id_file: opts.boot_id_file.clone(),
        root_images: Arc::new(root_images),
    };
    let catalog = Arc::new(Mutex::new(cat));
    let mut stop = stop;
    match adopt::adopt(&catalog, &opts.config, &dirs, &row, &mut stop).await {
        Ok(a) => report.adoption = Some(a),
        Err(e) => {
            report.failure = Some(ChildFailure {
                kind: e.kind().to_string(),
                message: e.to_string(),
                transient: e.is_transient(),
            })
        }
    }
    report
}

/// The program the agent starts its children from.
pub fn own_exe() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("cdp-agent"))
}

/// Parent side of the definition watch ([`crate::definition_watch`]): write `xml`
/// (libvirt's persistent definition, read by root from libvirtd) as the
/// VM's `<state>/vms/<uuid>/domain.xml` when it differs, in a forked child
/// with the VM's identity: root never opens anything in the VM's tree.
pub async fn store_definition_in_child(
    opts: &Options,
    uuid: &str,
    xml: Vec<u8>,
) -> Result<crate::definition_watch::Stored, String> {
    let state = StateDir::new(&opts.state_dir);
    let id = VmIdentity::of(&state, uuid).map_err(|e| e.to_string())?;
    let (state_dir, run_dir) = (opts.state_dir.clone(), opts.run_dir.clone());
    let uuid = uuid.to_string();
    tokio::task::spawn_blocking(move || {
        let what = state.vm(&uuid).definition();
        id.run(&what, || {
            crate::definition_watch::store_definition(&state_dir, &run_dir, &uuid, &xml)
        })
        .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| format!("the definition watch's task: {e}"))?
}
