//! The host layout: every path under the state and run directories is
//! built here, and nowhere else (docs/DESIGN.md, "Host layout").
//!
//! ```text
//! <state>/                                   root-owned, 0755
//! <state>/vms/                               root-owned, 0755
//! <state>/vms/<uuid>/                         one VM's state, owned by its QEMU user (0700)
//! <state>/vms/<uuid>/catalog.sqlite           the VM's catalog (SQLite, WAL)
//! <state>/vms/<uuid>.images                   root's copy of the VM's image paths (the hook, 0644)
//! <state>/vms/<uuid>/domain.xml               the definition (cdp-qemu at start; cdp-agent's watch after) (0600)
//! <state>/vms/<uuid>/shipper.lock             flock held by the VM's shipper (or cdp-agent)
//! <state>/vms/<uuid>/<disk>/journal/          one disk's journal segments
//! <state>/vms/<uuid>/<disk>/journal/<seq>.seg a segment, named by its first record's seq
//! <state>/vms/<uuid>/<disk>/dirty.map          ranges changed but not journaled (degraded mode)
//! <state>/vms/<uuid>/<disk>/activity.log       ranges that may hold unsynced writes
//!
//! <run>/agent.sock                            cdp-agent's notification socket (datagram)
//! <run>/<uuid>/                               one VM's sockets (0700)
//! <run>/<uuid>/<disk>.sock                    the disk's NBD socket (0600)
//! <run>/<uuid>/control.sock                   cdpd's control socket (0600)
//! <run>/<uuid>/domain.xml                     the definition the libvirt hook left for cdp-qemu
//! ```
//!
//! The types are cheap path wrappers. Names given to them (VM uuids, disk
//! targets) must have passed [`crate::names`]: a name read from the catalog
//! or a repository is checked before it reaches a path here.

use std::io;
use std::path::{Path, PathBuf};

/// File name of a VM's catalog inside its state directory (and of the
/// host catalog of versions before 0.3, read once to import a VM's rows).
const CATALOG: &str = "catalog.sqlite";
pub(crate) const VMS: &str = "vms";
const JOURNAL: &str = "journal";
const DIRTY_MAP: &str = "dirty.map";
const ACTIVITY_LOG: &str = "activity.log";
const SHIPPER_LOCK: &str = "shipper.lock";
const IMAGES_SUFFIX: &str = ".images";
const DEFINITION: &str = "domain.xml";
const CONTROL_SOCKET: &str = "control.sock";
const AGENT_SOCKET: &str = "agent.sock";

/// `<state>`: `/var/lib/cdp` by default.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StateDir(PathBuf);

/// `<state>/vms/<uuid>`: one VM's journals, lock and saved definition.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VmStateDir(PathBuf);

/// `<run>`: `/run/cdp` by default.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RunDir(PathBuf);

/// `<run>/<uuid>`: one VM's sockets and the hook's copy of its definition.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VmRunDir(PathBuf);

impl StateDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StateDir(path.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `<state>/catalog.sqlite`: the host catalog shared by every VM before
    /// catalogs were per VM. Only read (as the VM's user) to import that
    /// VM's rows into its own catalog once.
    pub fn legacy_catalog(&self) -> PathBuf {
        self.0.join(CATALOG)
    }

    /// The VMs that have a catalog here, sorted by uuid (only names that
    /// are UUIDs; listing only: nothing is opened).
    pub fn vms_with_catalog(&self) -> io::Result<Vec<String>> {
        let mut v = entries_holding(&self.vms(), CATALOG)?;
        v.retain(|u| crate::names::check_uuid(u).is_ok());
        Ok(v)
    }

    /// `<state>/vms`
    pub fn vms(&self) -> PathBuf {
        self.0.join(VMS)
    }

    /// `<state>/vms/<uuid>.images`: the image path of each protected disk,
    /// from libvirt's definition, written by the hook (root) where QEMU's
    /// user cannot write (`cdp_core::image::root_images`).
    pub fn vm_images(&self, vm_uuid: &str) -> PathBuf {
        self.vms().join(format!("{vm_uuid}{IMAGES_SUFFIX}"))
    }

    /// `<state>/vms/<uuid>`
    pub fn vm(&self, vm_uuid: &str) -> VmStateDir {
        VmStateDir(self.vms().join(vm_uuid))
    }

    /// `<state>/vms/<uuid>/<disk>/journal`
    pub fn journal(&self, vm_uuid: &str, disk: &str) -> PathBuf {
        self.vm(vm_uuid).journal(disk)
    }
}

impl VmStateDir {
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `<state>/vms/<uuid>/<disk>/journal`
    pub fn journal(&self, disk: &str) -> PathBuf {
        self.0.join(disk).join(JOURNAL)
    }

    /// `<state>/vms/<uuid>/<disk>/dirty.map`: the ranges changed while the
    /// journal could not take their records (docs/RELIABILITY.md, "A full
    /// journal").
    pub fn dirty_map(&self, disk: &str) -> PathBuf {
        self.0.join(disk).join(DIRTY_MAP)
    }

    /// `<state>/vms/<uuid>/<disk>/activity.log`: the ranges that may hold
    /// writes not yet synced, resynced after a power loss.
    pub fn activity_log(&self, disk: &str) -> PathBuf {
        self.0.join(disk).join(ACTIVITY_LOG)
    }

    /// `<state>/vms/<uuid>/catalog.sqlite`
    pub fn catalog(&self) -> PathBuf {
        self.0.join(CATALOG)
    }

    /// `<state>/vms/<uuid>/shipper.lock`
    pub fn shipper_lock(&self) -> PathBuf {
        self.0.join(SHIPPER_LOCK)
    }

    /// `<state>/vms/<uuid>/domain.xml`: the definition cdp-qemu saved at start, replaced
    /// by cdp-agent's definition watch (docs/AGENT.md) when libvirt's changes.
    pub fn definition(&self) -> PathBuf {
        self.0.join(DEFINITION)
    }

    /// The disks that have a journal directory, sorted.
    pub fn journal_disks(&self) -> io::Result<Vec<String>> {
        entries_holding(&self.0, JOURNAL)
    }
}

impl RunDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        RunDir(path.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `<run>/agent.sock`
    pub fn agent_socket(&self) -> PathBuf {
        self.0.join(AGENT_SOCKET)
    }

    /// `<run>/<uuid>`
    pub fn vm(&self, vm_uuid: &str) -> VmRunDir {
        VmRunDir(self.0.join(vm_uuid))
    }

    /// The VMs whose cdpd has a control socket here (running or left
    /// behind by a killed one), sorted by uuid.
    pub fn vms_with_control_socket(&self) -> io::Result<Vec<String>> {
        entries_holding(&self.0, CONTROL_SOCKET)
    }
}

/// The names of the entries of `dir` that hold `name`, sorted; none when
/// `dir` does not exist. Listing only: nothing is opened.
fn entries_holding(dir: &Path, name: &str) -> io::Result<Vec<String>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent?;
        if ent.path().join(name).exists() {
            if let Some(n) = ent.file_name().to_str() {
                out.push(n.to_string());
            }
        }
    }
    out.sort();
    Ok(out)
}

impl VmRunDir {
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `<run>/<uuid>/<disk>.sock`
    pub fn disk_socket(&self, disk: &str) -> PathBuf {
        self.0.join(format!("{disk}.sock"))
    }

    /// `<run>/<uuid>/control.sock`
    pub fn control_socket(&self) -> PathBuf {
        self.0.join(CONTROL_SOCKET)
    }

    /// `<run>/<uuid>/domain.xml`: the definition the hook left for cdp-qemu.
    pub fn definition(&self) -> PathBuf {
        self.0.join(DEFINITION)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: &str = "6f0c8c3e-8f5e-4c51-9a38-2a4c0f0b9d11";

    #[test]
    fn paths_match_the_documented_layout() {
        let s = StateDir::new("/var/lib/cdp");
        assert_eq!(
            s.vm(U).catalog(),
            PathBuf::from(format!("/var/lib/cdp/vms/{U}/catalog.sqlite"))
        );
        assert_eq!(s.legacy_catalog(), Path::new("/var/lib/cdp/catalog.sqlite"));
        assert_eq!(
            s.vm_images(U),
            PathBuf::from(format!("/var/lib/cdp/vms/{U}.images"))
        );
        assert_eq!(
            s.journal(U, "vda"),
            PathBuf::from(format!("/var/lib/cdp/vms/{U}/vda/journal"))
        );
        assert_eq!(
            s.vm(U).shipper_lock(),
            PathBuf::from(format!("/var/lib/cdp/vms/{U}/shipper.lock"))
        );
        assert_eq!(
            s.vm(U).definition(),
            PathBuf::from(format!("/var/lib/cdp/vms/{U}/domain.xml"))
        );
        assert_eq!(
            s.vm(U).dirty_map("vda"),
            PathBuf::from(format!("/var/lib/cdp/vms/{U}/vda/dirty.map"))
        );
        assert_eq!(
            s.vm(U).activity_log("vda"),
            PathBuf::from(format!("/var/lib/cdp/vms/{U}/vda/activity.log"))
        );
        let r = RunDir::new("/run/cdp");
        assert_eq!(r.agent_socket(), Path::new("/run/cdp/agent.sock"));
        assert_eq!(
            r.vm(U).disk_socket("vdb"),
            PathBuf::from(format!("/run/cdp/{U}/vdb.sock"))
        );
        assert_eq!(
            r.vm(U).control_socket(),
            PathBuf::from(format!("/run/cdp/{U}/control.sock"))
        );
    }

    #[test]
    fn listings_find_only_what_they_name() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::new(d.path().join("state"));
        assert!(s.vm(U).journal_disks().unwrap().is_empty());
        std::fs::create_dir_all(s.journal(U, "vdb")).unwrap();
        std::fs::create_dir_all(s.journal(U, "vda")).unwrap();
        std::fs::create_dir_all(s.vm(U).path().join("notadisk")).unwrap();
        assert_eq!(s.vm(U).journal_disks().unwrap(), ["vda", "vdb"]);
        assert!(s.vms_with_catalog().unwrap().is_empty());
        std::fs::write(s.vm(U).catalog(), b"").unwrap();
        std::fs::create_dir_all(s.vm("not-a-uuid").path()).unwrap();
        std::fs::write(s.vm("not-a-uuid").catalog(), b"").unwrap();
        assert_eq!(s.vms_with_catalog().unwrap(), [U]);

        let r = RunDir::new(d.path().join("run"));
        assert!(r.vms_with_control_socket().unwrap().is_empty());
        std::fs::create_dir_all(r.vm(U).path()).unwrap();
        std::fs::create_dir_all(r.vm("other").path()).unwrap();
        std::fs::write(r.vm(U).control_socket(), b"").unwrap();
        assert_eq!(r.vms_with_control_socket().unwrap(), [U]);
    }
}
