//! The definition watch (issue 14, "Whole-VM restore"; docs/AGENT.md,
//! "Definition watch"): a definition changed while the VM runs (`virsh
//! attach-device --config`, `virsh edit`, `virsh setmem --config`) reaches
//! the repository without waiting for the next start.
//!
//! Every scan, root asks libvirtd (trusted) which domains run and, for each
//! running VM with a catalog here, its persistent definition (`virsh dumpxml
//! --inactive --security-info`) and its live one (for the CDP keys it was
//! started with). The persistent definition goes to
//! `<state>/vms/<uuid>/domain.xml` when it differs from what is there, and
//! the VM's shipper stores it as a new version at its next pass.
//!
//! Root never touches the VM's state by path (docs/DESIGN.md, "Trust
//! boundaries"): the compare-and-write runs in a child with the VM's
//! identity ([`crate::child::store_definition_in_child`]), through a
//! directory fd: a new file created exclusively without following links,
//! mode 0600, renamed over `domain.xml` (a link planted there is replaced,
//! never written through). The child writes only while the VM's cdpd
//! answers: cdp-qemu saves the start-time copy before it starts cdpd, so the
//! two never race.
//!
//! Why the persistent definition: a restore defines a VM from it, and it is
//! what libvirt boots next; the live one carries one run's state (domain
//! id, aliases, the dynamic labels and ports) and misses `--config`-only
//! changes until the next boot. `--security-info` keeps what a VM needs to
//! work when defined again (a VNC password): the file is 0600 like the
//! start-time copy.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use cdp_core::fsat::DirFd;
use cdp_core::layout::StateDir;
use serde::{Deserialize, Serialize};

/// The libvirt connection the watch asks (the one `cdpctl protect` edits
/// by default).
pub const LIBVIRT_URI: &str = "qemu:///system";

/// The longest a `virsh` call may take (a hung libvirtd must not hold the
/// agent's loop).
const VIRSH_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest saved definition read back to compare (libvirt's are far
/// smaller; a larger file is replaced).
const MAX_DEFINITION: u64 = 16 << 20;

/// What the child did with a definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stored {
    /// `domain.xml` already held exactly this.
    Unchanged,
    /// `domain.xml` now holds it (it differed, was missing, or was not a
    /// regular file: a link or a FIFO is replaced, never followed).
    Written,
    /// The VM's cdpd does not answer (starting or stopping): nothing done.
    NotServed,
}

/// Child side (already the VM's user): write `xml` as the VM's
/// `domain.xml` when it differs, only while its cdpd answers.
pub fn store_definition(
    state_dir: &Path,
    run_dir: &Path,
    uuid: &str,
    xml: &[u8],
) -> Result<Stored, String> {
    if crate::adopt::cdpd_answers(run_dir, uuid).is_none() {
        return Ok(Stored::NotServed);
    }
    let vm = StateDir::new(state_dir).vm(uuid);
    let dir = DirFd::open(vm.path()).map_err(|e| e.to_string())?;
    let def = vm.definition();
    let name = def
        .file_name()
        .ok_or_else(|| format!("{}: no file name", def.display()))?;
    write_if_changed(&dir, name, xml)
}

/// Compare `name` in `dir` with `xml`; when it differs, write `xml` to a
/// new file (`O_CREAT|O_EXCL|O_NOFOLLOW`, 0600), sync it and rename it over
/// `name`.
pub fn write_if_changed(dir: &DirFd, name: &std::ffi::OsStr, xml: &[u8]) -> Result<Stored, String> {
    let path = dir.path().join(name);
    let io = |op: &str, e: std::io::Error| format!("{}: {op}: {e}", path.display());
    // A link, a FIFO or anything but a regular file is not "the same":
    // it is replaced below (open_file never follows a link).
    if let Ok(f) = dir.open_file(name) {
        let mut old = Vec::new();
        f.take(MAX_DEFINITION)
            .read_to_end(&mut old)
            .map_err(|e| io("reading", e))?;
        if old == xml {
            return Ok(Stored::Unchanged);
        }
    }
    let mut tmp = name.to_os_string();
    tmp.push(".tmp");
    dir.remove_at(&tmp).map_err(|e| e.to_string())?;
    let mut f = dir.create_file(&tmp, 0o600).map_err(|e| e.to_string())?;
    f.write_all(xml).map_err(|e| io("writing", e))?;
    f.sync_all().map_err(|e| io("syncing", e))?;
    drop(f);
    dir.rename_at(&tmp, name).map_err(|e| e.to_string())?;
    Ok(Stored::Written)
}

/// How a running VM's CDP keys compare between its persistent definition
/// and the one it runs with (docs/AGENT.md, "Definition watch").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keys {
    /// Same keys (or the live definition has none to compare with).
    Consistent,
    /// The persistent definition has no CDP keys any more: the running VM
    /// stays captured until it stops, its next start is not.
    Removed,
    /// The keys differ: they apply from the next start.
    Changed(String),
    /// The emulator is no longer cdp-qemu: the next start is not captured.
    NotCdpQemu(String),
    /// libvirt's persistent definition did not parse.
    Unreadable(String),
}

impl Keys {
    /// The line for the log and the status, `None` when consistent.
    pub fn warning(&self, vm: &str, uuid: &str) -> Option<String> {
        let what = match self {
            Keys::Consistent => return None,
            Keys::Removed => "its definition in libvirt has no CDP keys any more (virsh edit?): it stays captured until it stops, its next start is NOT protected; nothing was unprotected: to keep it protected, run `cdpctl protect` again".to_string(),
            Keys::Changed(how) => format!("its CDP keys changed in libvirt ({how}): they apply from its next start"),
            Keys::NotCdpQemu(e) => format!("its definition in libvirt runs emulator {e}, not cdp-qemu: its next start is NOT captured; run `cdpctl protect` again to keep it protected"),
            Keys::Unreadable(e) => format!("its definition in libvirt could not be read for its CDP keys: {e}"),
        };
        Some(format!("VM {vm} ({uuid}): {what}"))
    }
}

/// Compare the CDP keys of the persistent definition with the live one's.
pub fn check_keys(persistent: &str, live: &str) -> Keys {
    use cdp_hooks::domain::parse;
    let p = match parse(persistent) {
        Ok(d) => d,
        Err(e) => return Keys::Unreadable(e.to_string()),
    };
    let Some(pk) = &p.protection else {
        return Keys::Removed;
    };
    let emulator = p.emulator.clone().unwrap_or_default();
    if Path::new(&emulator).file_name() != Some(std::ffi::OsStr::new("cdp-qemu")) {
        return Keys::NotCdpQemu(emulator);
    }
    let Some(lk) = parse(live).ok().and_then(|d| d.protection) else {
        return Keys::Consistent;
    };
    let mut how = Vec::new();
    if pk.policy != lk.policy {
        how.push(format!("policy {:?} → {:?}", lk.policy, pk.policy));
    }
    let disks = |k: &cdp_hooks::domain::Protection| -> Vec<String> {
        k.disks
            .iter()
            .map(|(t, p)| match p {
                Some(p) => format!("{t} (policy {p})"),
                None => t.clone(),
            })
            .collect()
    };
    let (was, now) = (disks(&lk), disks(pk));
    if was != now {
        how.push(format!("disks [{}] → [{}]", was.join(", "), now.join(", ")));
    }
    if how.is_empty() {
        Keys::Consistent
    } else {
        Keys::Changed(how.join("; "))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("virsh -c {LIBVIRT_URI} {args}: {source}")]
    Spawn {
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("virsh -c {LIBVIRT_URI} {args}: no answer within {VIRSH_TIMEOUT:?}")]
    Timeout { args: String },
    #[error("virsh -c {LIBVIRT_URI} {args}: {status}: {stderr}")]
    Failed {
        args: String,
        status: String,
        stderr: String,
    },
}

/// Root asks libvirtd (trusted: root talking to root's daemon).
async fn virsh(args: &[&str]) -> Result<String, WatchError> {
    let shown = args.join(" ");
    let child = tokio::process::Command::new("virsh")
        .arg("-c")
        .arg(LIBVIRT_URI)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| WatchError::Spawn {
            args: shown.clone(),
            source,
        })?;
    let out = match tokio::time::timeout(VIRSH_TIMEOUT, child.wait_with_output()).await {
        Ok(r) => r.map_err(|source| WatchError::Spawn {
            args: shown.clone(),
            source,
        })?,
        Err(_) => return Err(WatchError::Timeout { args: shown }),
    };
    if !out.status.success() {
        return Err(WatchError::Failed {
            args: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The UUIDs of the domains libvirt runs (active: running or paused).
pub async fn running_uuids() -> Result<BTreeSet<String>, WatchError> {
    let out = virsh(&["list", "--uuid"]).await?;
    Ok(out
        .lines()
        .map(str::trim)
        .filter(|l| cdp_core::names::check_uuid(l).is_ok())
        .map(str::to_string)
        .collect())
}

/// A running VM's persistent definition (what a restore defines) and its
/// live one (the keys it was started with).
pub async fn definitions(uuid: &str) -> Result<(String, String), WatchError> {
    let persistent = virsh(&["dumpxml", "--inactive", "--security-info", uuid]).await?;
    let live = virsh(&["dumpxml", uuid]).await?;
    Ok((persistent, live))
}

/// What one pass of the watch did.
#[derive(Debug, Clone, Default)]
pub struct WatchReport {
    /// VMs whose new definition was written for their shipper.
    pub stored: Vec<String>,
    /// Lines about CDP keys that no longer match (log and status).
    pub warnings: Vec<String>,
    pub failed: usize,
}

impl WatchReport {
    /// What the systemd status line adds ("" when nothing to say).
    pub fn status(&self) -> String {
        let mut s = String::new();
        if !self.stored.is_empty() {
            s.push_str(&format!("; {} new definition(s) stored", self.stored.len()));
        }
        if self.failed > 0 {
            s.push_str(&format!("; {} definition(s) not watched", self.failed));
        }
        for w in &self.warnings {
            s.push_str("; ");
            s.push_str(w);
        }
        s
    }
}

impl crate::Agent {
    /// One pass of the definition watch over the VMs with a catalog that
    /// libvirt runs. Errors are logged once per change; nothing here stops
    /// a scan.
    pub async fn watch_definitions(&mut self) -> WatchReport {
        let mut report = WatchReport::default();
        let vms = match self.vms() {
            Ok(v) if !v.is_empty() => v,
            _ => return report,
        };
        let running = match running_uuids().await {
            Ok(r) => {
                self.last_error.remove("definition watch");
                r
            }
            Err(e) => {
                let msg = format!("definitions are not watched (captured at VM start only): {e}");
                self.log_error("definition watch", &msg);
                return report;
            }
        };
        for uuid in vms.into_iter().filter(|u| running.contains(u)) {
            if *self.stop.borrow() {
                break;
            }
            self.watch_one(&uuid, &mut report).await;
        }
        report
    }

    async fn watch_one(&mut self, uuid: &str, report: &mut WatchReport) {
        let key = format!("definition {uuid}");
        let (persistent, live) = match definitions(uuid).await {
            Ok(d) => d,
            Err(e) => {
                // Undefined or stopped since the listing: nothing to watch.
                report.failed += 1;
                self.log_error(&key, &format!("VM {uuid}: reading its definition: {e}"));
                return;
            }
        };
        let name = cdp_hooks::domain::parse(&persistent)
            .map(|d| d.name)
            .unwrap_or_else(|_| uuid.to_string());
        let keys_key = format!("definition keys {uuid}");
        match check_keys(&persistent, &live).warning(&name, uuid) {
            Some(w) => {
                self.log_error(&keys_key, &w);
                report.warnings.push(w);
            }
            None => {
                if self.last_error.remove(&keys_key).is_some() {
                    say!("VM {name} ({uuid}): its CDP keys in libvirt match again");
                }
            }
        }
        match crate::child::store_definition_in_child(&self.opts, uuid, persistent.into_bytes())
            .await
        {
            Ok(Stored::Written) => {
                self.last_error.remove(&key);
                say!("VM {name} ({uuid}): its definition changed in libvirt: saved for its shipper, which stores it as a new version");
                report.stored.push(uuid.to_string());
            }
            Ok(_) => {
                self.last_error.remove(&key);
            }
            Err(e) => {
                report.failed += 1;
                self.log_error(
                    &key,
                    &format!("VM {name} ({uuid}): saving its definition: {e}"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xml(emulator: &str, keys: &str) -> String {
        format!(
            r#"<domain type='kvm'>
  <name>web</name>
  <uuid>0b5c6a3e-1d2f-4a5b-8c9d-0e1f2a3b4c5d</uuid>
  <metadata>{keys}</metadata>
  <devices>
    <emulator>{emulator}</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/img/a.raw'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/img/b.raw'/><target dev='vdb' bus='virtio'/></disk>
  </devices>
</domain>"#
        )
    }

    const KEYS: &str = r#"<cdp:protection xmlns:cdp="urn:cdpd:protection:1" policy="default"><cdp:disk target="vda"/></cdp:protection>"#;

    #[test]
    fn keys_are_compared_with_those_the_vm_runs_with() {
        let cdp = "/usr/bin/cdp-qemu";
        let live = xml(cdp, KEYS);
        assert_eq!(check_keys(&live, &live), Keys::Consistent);
        assert_eq!(check_keys(&xml(cdp, ""), &live), Keys::Removed);
        let w = Keys::Removed.warning("web", "u").unwrap();
        assert!(
            w.contains("NOT protected") && w.contains("nothing was unprotected"),
            "{w}"
        );
        assert_eq!(
            check_keys(&xml("/usr/bin/qemu-system-x86_64", KEYS), &live),
            Keys::NotCdpQemu("/usr/bin/qemu-system-x86_64".into())
        );
        let more = KEYS.replace(
            "<cdp:disk target=\"vda\"/>",
            "<cdp:disk target=\"vda\"/><cdp:disk target=\"vdb\"/>",
        );
        match check_keys(&xml(cdp, &more.replace("default", "gold")), &live) {
            Keys::Changed(how) => {
                assert!(how.contains("\"default\" → \"gold\""), "{how}");
                assert!(how.contains("[vda] → [vda, vdb]"), "{how}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(check_keys("<nope", &live), Keys::Unreadable(_)));
        assert_eq!(Keys::Consistent.warning("web", "u"), None);
    }

    #[test]
    fn a_definition_is_written_once_then_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let dir = DirFd::open(d.path()).unwrap();
        let name = std::ffi::OsStr::new("domain.xml");
        assert_eq!(
            write_if_changed(&dir, name, b"v1").unwrap(),
            Stored::Written
        );
        assert_eq!(
            write_if_changed(&dir, name, b"v1").unwrap(),
            Stored::Unchanged
        );
        assert_eq!(
            write_if_changed(&dir, name, b"v2").unwrap(),
            Stored::Written
        );
        let p = d.path().join("domain.xml");
        assert_eq!(std::fs::read(&p).unwrap(), b"v2");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!d.path().join("domain.xml.tmp").exists());
    }

    #[test]
    fn the_status_line_names_stored_definitions_and_warnings() {
        let r = WatchReport {
            stored: vec!["u".into()],
            warnings: vec!["VM web (u): its CDP keys changed".into()],
            failed: 1,
        };
        assert_eq!(
            r.status(),
            "; 1 new definition(s) stored; 1 definition(s) not watched; VM web (u): its CDP keys changed"
        );
        assert_eq!(WatchReport::default().status(), "");
    }

    const VM: &str = "0b5c6a3e-1d2f-4a5b-8c9d-0e1f2a3b4c5d";

    /// A fake cdpd answering `status` on `sock` for as long as the test runs.
    fn fake_cdpd(sock: &Path) {
        use std::io::BufRead;
        let l = std::os::unix::net::UnixListener::bind(sock).unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { return };
                let mut line = String::new();
                let _ = std::io::BufReader::new(&s).read_line(&mut line);
                let reply = cdp_core::control::Reply::status(cdp_core::control::Status {
                    vm_uuid: VM.into(),
                    vm_name: "web".into(),
                    pid: 1,
                    last_seq: 0,
                    segment_size: 1 << 20,
                    segment_age_ms: 1000,
                    disks: Vec::new(),
                });
                let _ = (&s).write_all(reply.to_line().as_bytes());
            }
        });
    }

    /// `<state>` and `<state>/vms` root's (or ours), the VM's state and run
    /// directories owned by `owner`, the VM's cdpd answering when `served`.
    fn host(owner: (u32, u32), served: bool) -> (tempfile::TempDir, crate::Options) {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let (state, run) = (StateDir::new(d.path().join("state")), d.path().join("run"));
        let vm_run = cdp_core::layout::RunDir::new(&run).vm(VM);
        for p in [state.vm(VM).path(), vm_run.path()] {
            std::fs::create_dir_all(p).unwrap();
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700)).unwrap();
            std::os::unix::fs::chown(p, Some(owner.0), Some(owner.1)).unwrap();
        }
        if served {
            let sock = vm_run.control_socket();
            fake_cdpd(&sock);
            std::os::unix::fs::chown(&sock, Some(owner.0), Some(owner.1)).unwrap();
        }
        let opts = crate::Options {
            config: cdp_core::config::Config::default(),
            state_dir: state.path().to_path_buf(),
            run_dir: run,
            once: false,
            boot_id_file: "/proc/sys/kernel/random/boot_id".into(),
            config_path: None,
            exe: crate::child::own_exe(),
        };
        (d, opts)
    }

    /// The attack: QEMU's user replaces its `domain.xml` with a link to a
    /// file outside the state directory (root's, when run as root). The
    /// watch writes the new definition in place of the link, as the VM's
    /// user; the linked file keeps its bytes, owner and mode.
    #[tokio::test]
    async fn a_definition_link_planted_by_the_vms_user_is_replaced_never_written_through() {
        use std::os::unix::fs::MetadataExt;
        let root = nix::unistd::geteuid().is_root();
        // As root the VM is another user's (nobody); otherwise our own.
        let owner = if root {
            (65534, 65534)
        } else {
            (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            )
        };
        let (d, opts) = host(owner, true);
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"root's own file\n").unwrap();
        let before = std::fs::metadata(&victim).unwrap();
        let def = StateDir::new(&opts.state_dir).vm(VM).definition();
        std::os::unix::fs::symlink(&victim, &def).unwrap();
        let xml = b"<domain><name>web</name></domain>\n".to_vec();
        let r = crate::child::store_definition_in_child(&opts, VM, xml.clone()).await;
        assert_eq!(r, Ok(Stored::Written));
        assert_eq!(std::fs::read(&victim).unwrap(), b"root's own file\n");
        let after = std::fs::metadata(&victim).unwrap();
        assert_eq!(
            (after.uid(), after.gid(), after.mode(), after.ino()),
            (before.uid(), before.gid(), before.mode(), before.ino())
        );
        let m = std::fs::symlink_metadata(&def).unwrap();
        assert!(m.file_type().is_file(), "{m:?}");
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o777),
            (owner.0, owner.1, 0o600)
        );
        assert_eq!(std::fs::read(&def).unwrap(), xml);
        // Same again: nothing to do.
        let r = crate::child::store_definition_in_child(&opts, VM, xml).await;
        assert_eq!(r, Ok(Stored::Unchanged));
    }

    /// While the VM's cdpd does not answer (cdp-qemu may be saving the
    /// start-time copy), nothing is written.
    #[tokio::test]
    async fn nothing_is_written_while_cdpd_does_not_answer() {
        let me = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        let (_d, opts) = host(me, false);
        let r = crate::child::store_definition_in_child(&opts, VM, b"x".to_vec()).await;
        assert_eq!(r, Ok(Stored::NotServed));
        assert!(!StateDir::new(&opts.state_dir).vm(VM).definition().exists());
    }

    /// A VM state directory replaced by a link (to a directory of root's)
    /// is refused before anything runs.
    #[tokio::test]
    async fn a_linked_vm_directory_is_refused() {
        let me = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        let (d, opts) = host(me, true);
        let elsewhere = d.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let vm_dir = StateDir::new(&opts.state_dir).vm(VM);
        std::fs::remove_dir(vm_dir.path()).unwrap();
        std::os::unix::fs::symlink(&elsewhere, vm_dir.path()).unwrap();
        let e = crate::child::store_definition_in_child(&opts, VM, b"x".to_vec())
            .await
            .unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    }
}
