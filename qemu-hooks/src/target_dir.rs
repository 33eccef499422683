//! A `file://` target's directory made ready for the VM's QEMU user, who
//! runs the shipper (issue 15; docs/LIBVIRT.md, "The repository's
//! permissions"). Everything the shipper writes is under `<dir>/cdp/`
//! (`cdp/v1/FORMAT`, `cdp/v1/vms/<uuid>/…`, the shared `cdp/v1/chunks/…`),
//! so that is what QEMU's user must be able to write:
//!
//! - `<dir>` missing: created for the user (mode 0750), as the libvirt hook
//!   does at start.
//! - `<dir>` the user cannot write and no `<dir>/cdp`: `<dir>/cdp` is
//!   created for the user (0750); `<dir>` stays as it is (the operator's).
//! - an existing `<dir>/cdp` tree with a directory the user cannot write:
//!   refused, with the exact command that fixes it.
//!
//! Nothing that exists is ever chowned or chmodded: only a directory this
//! code has just made, through the descriptor it opened without following
//! links (`cdp_core::fsat`), never by path. The checks only `fstat`
//! descriptors opened the same way.

use std::path::{Path, PathBuf};

use cdp_core::fsat::{DirFd, FsatError, Kind};

/// What [`prepare`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    /// QEMU's user can write everything the shipper writes; nothing changed.
    Ready,
    /// This directory was created for QEMU's user (mode 0750).
    Created(PathBuf),
    /// QEMU's user cannot write `path`, and it is not ours to change.
    Refused {
        path: PathBuf,
        why: String,
        /// The command (as root) that makes it writable.
        command: String,
    },
}

/// QEMU's user: its ids, its groups and a name for messages.
#[derive(Debug, Clone)]
pub struct QemuUser {
    pub uid: u32,
    pub gid: u32,
    /// Its primary and supplementary groups.
    pub groups: Vec<u32>,
    /// `name (uid N)`, or `uid N` without a name.
    pub label: String,
    /// `name:group` for chown, numeric when unnamed.
    pub chown_spec: String,
}

impl QemuUser {
    pub fn new(owner: (u32, u32)) -> QemuUser {
        use nix::unistd::{Gid, Group, Uid, User};
        let user = User::from_uid(Uid::from_raw(owner.0)).ok().flatten();
        let group = Group::from_gid(Gid::from_raw(owner.1)).ok().flatten();
        let mut groups = vec![owner.1];
        if let Some(u) = &user {
            if let Ok(name) = std::ffi::CString::new(u.name.clone()) {
                if let Ok(gs) = nix::unistd::getgrouplist(&name, Gid::from_raw(owner.1)) {
                    groups.extend(gs.into_iter().map(|g| g.as_raw()));
                }
            }
        }
        let uname = user.as_ref().map(|u| u.name.clone());
        QemuUser {
            uid: owner.0,
            gid: owner.1,
            groups,
            label: match &uname {
                Some(n) => format!("{n} (uid {})", owner.0),
                None => format!("uid {}", owner.0),
            },
            chown_spec: format!(
                "{}:{}",
                uname.unwrap_or_else(|| owner.0.to_string()),
                group.map(|g| g.name).unwrap_or_else(|| owner.1.to_string())
            ),
        }
    }

    /// Can this user create entries in the directory (write and search)?
    pub fn can_write(&self, d: &DirFd) -> Result<bool, FsatError> {
        let st = d.stat()?;
        let m = st.st_mode;
        Ok(if self.uid == 0 {
            true
        } else if st.st_uid == self.uid {
            m & 0o300 == 0o300
        } else if self.groups.contains(&st.st_gid) {
            m & 0o030 == 0o030
        } else {
            m & 0o003 == 0o003
        })
    }
}

fn quote(p: &Path) -> String {
    let s = p.display().to_string();
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+:@".contains(&b))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A directory made by us for `user`, through its descriptor.
fn make_for(parent: &DirFd, name: &str, user: &QemuUser) -> Result<bool, FsatError> {
    if !parent.mkdir_at(name, 0o750)? {
        return Ok(false);
    }
    let d = parent.open_at(name)?;
    d.chown((user.uid, user.gid))?;
    d.chmod(0o750)?;
    Ok(true)
}

/// Make the `file://` target `dir` ready for `user`'s shipper of VM `uuid`,
/// or say why not and what to run. `create`: whether to create what is
/// missing (root only); without it, a missing directory is refused with the
/// command that creates it.
pub fn prepare(
    dir: &Path,
    uuid: &str,
    user: &QemuUser,
    create: bool,
) -> Result<Prepared, FsatError> {
    let install = |p: &Path| {
        format!(
            "install -d -o {} -g {} -m 0750 {}",
            user.uid,
            user.gid,
            quote(p)
        )
    };
    let (Some(parent), Some(leaf)) = (
        dir.parent().filter(|p| !p.as_os_str().is_empty()),
        dir.file_name().and_then(|n| n.to_str()),
    ) else {
        return Ok(Prepared::Ready);
    };
    let top = match DirFd::open(dir) {
        Ok(d) => d,
        Err(e) if e.is_not_found() => {
            if !create {
                return Ok(Prepared::Refused {
                    path: dir.to_path_buf(),
                    why: "does not exist".into(),
                    command: install(dir),
                });
            }
            std::fs::create_dir_all(parent).map_err(|source| FsatError::Io {
                path: parent.to_path_buf(),
                op: "mkdir",
                source,
            })?;
            make_for(&DirFd::open(parent)?, leaf, user)?;
            return Ok(Prepared::Created(dir.to_path_buf()));
        }
        Err(e) => return Err(e),
    };
    let cdp = dir.join("cdp");
    let tree = match top.open_at("cdp") {
        Ok(d) => d,
        Err(e) if e.is_not_found() => {
            if user.can_write(&top)? {
                return Ok(Prepared::Ready);
            }
            if !create {
                return Ok(Prepared::Refused {
                    path: dir.to_path_buf(),
                    why: format!("is not writable by {}", user.label),
                    command: install(&cdp),
                });
            }
            make_for(&top, "cdp", user)?;
            return Ok(Prepared::Created(cdp));
        }
        Err(e) => return Err(e),
    };
    match unwritable_in(&tree, uuid, user)? {
        None => Ok(Prepared::Ready),
        Some(p) => Ok(Prepared::Refused {
            why: format!("is not writable by {}", user.label),
            path: p,
            command: format!("chown -R {} {}", user.chown_spec, quote(&cdp)),
        }),
    }
}

/// The first directory of the `cdp/` tree the shipper writes into that
/// `user` cannot write: `cdp`, `cdp/v1`, `cdp/v1/vms`, `cdp/v1/vms/<uuid>`,
/// `cdp/v1/chunks` and its fan-out directories, those that exist.
fn unwritable_in(cdp: &DirFd, uuid: &str, user: &QemuUser) -> Result<Option<PathBuf>, FsatError> {
    let open = |d: &DirFd, name: &std::ffi::OsStr| -> Result<Option<DirFd>, FsatError> {
        match d.open_at(name) {
            Ok(x) => Ok(Some(x)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    };
    if !user.can_write(cdp)? {
        return Ok(Some(cdp.path().to_path_buf()));
    }
    let mut check = vec![];
    if let Some(v1) = open(cdp, "v1".as_ref())? {
        if let Some(vms) = open(&v1, "vms".as_ref())? {
            if let Some(vm) = open(&vms, uuid.as_ref())? {
                check.push(vm);
            }
            check.push(vms);
        }
        if let Some(chunks) = open(&v1, "chunks".as_ref())? {
            for e in chunks.entries()? {
                if e.kind == Kind::Dir {
                    if let Some(fan) = open(&chunks, &e.name)? {
                        check.push(fan);
                    }
                }
            }
            check.push(chunks);
        }
        check.push(v1);
    }
    for d in check.iter().rev() {
        if !user.can_write(d)? {
            return Ok(Some(d.path().to_path_buf()));
        }
    }
    Ok(None)
}
