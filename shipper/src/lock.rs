//! Who ships a VM: one process at a time.
//!
//! Contract: the process shipping a VM's journal holds an exclusive `flock`
//! on `<state-dir>/vms/<vm-uuid>/shipper.lock`. The VM's own cdp-shipper
//! holds it for its lifetime (waiting, retrying each poll, while someone
//! else has it); cdp-agent takes it without waiting, one VM at a time, only
//! for the passes of an adoption, and skips a VM whose lock is held. The
//! lock goes with the process (a killed holder releases it).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use cdp_core::layout::StateDir;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};
use thiserror::Error;

#[derive(Debug, Error)]
#[error("shipper lock {path}: {source}")]
pub struct LockError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// `<state-dir>/vms/<vm-uuid>/shipper.lock` ([`VmStateDir::shipper_lock`]).
///
/// [`VmStateDir::shipper_lock`]: cdp_core::layout::VmStateDir::shipper_lock
pub fn lock_path(state_dir: &Path, vm_uuid: &str) -> PathBuf {
    StateDir::new(state_dir).vm(vm_uuid).shipper_lock()
}

/// The held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct ShipperLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl ShipperLock {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Take the lock if nobody holds it: `Ok(None)` when somebody does.
pub fn try_lock(state_dir: &Path, vm_uuid: &str) -> Result<Option<ShipperLock>, LockError> {
    let path = lock_path(state_dir, vm_uuid);
    let err = |source| LockError {
        path: path.clone(),
        source,
    };
    let dir = path.parent().expect("lock path has a parent");
    std::fs::create_dir_all(dir).map_err(err)?;
    // Root never opens files in a VM's state directory another user owns:
    // it works there as that user (cdp_core::privsep).
    if let Some(uid) = cdp_core::privsep::foreign_owner_as_root(dir).map_err(err)? {
        return Err(err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("belongs to uid {uid}: root does not work in a VM's state; it runs as the VM's user (cdp_core::privsep)"),
        )));
    }
    // The VM's shipper and the agent's child working for the VM run as the
    // same user (the owner of the VM's state directory): no hand-over, and
    // a link planted at the lock's name is never followed.
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits())
        .open(&path)
        .map_err(err)?;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(Some(ShipperLock { _lock: lock, path })),
            Err((f, Errno::EINTR)) => file = f,
            Err((_, Errno::EWOULDBLOCK)) => return Ok(None),
            Err((_, e)) => return Err(err(e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let u = "0b5c6a3e-1d2f-4a5b-8c9d-0e1f2a3b4c5d";
        let a = try_lock(dir.path(), u).unwrap().expect("free");
        assert_eq!(a.path(), lock_path(dir.path(), u));
        assert!(try_lock(dir.path(), u).unwrap().is_none());
        drop(a);
        assert!(try_lock(dir.path(), u).unwrap().is_some());
    }

    #[test]
    fn a_link_at_the_lock_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let u = "0b5c6a3e-1d2f-4a5b-8c9d-0e1f2a3b4c5d";
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "x").unwrap();
        let p = lock_path(dir.path(), u);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        let e = try_lock(dir.path(), u).unwrap_err();
        assert_eq!(e.source.raw_os_error(), Some(libc_eloop()), "{e}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"x");
    }

    fn libc_eloop() -> i32 {
        nix::errno::Errno::ELOOP as i32
    }
}
