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

use crate::adopt::{self, Adoption};
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
    let mut cmd = id.command(&opts.exe);
    cmd.arg(ADOPT_VM)
        .arg(uuid)
        .arg("--state-dir")
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

/// Child side (`cdp-agent adopt-vm <uuid>`, already running as the VM's
/// user): open the VM's catalog and adopt it.
pub async fn adopt_vm(opts: &Options, uuid: &str, stop: watch::Receiver<bool>) -> ChildReport {
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
