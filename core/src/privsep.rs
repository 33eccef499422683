//! Privilege separation (docs/DESIGN.md, "Trust boundaries"): work on one
//! VM's state runs with that VM's identity, the owner of
//! `<state>/vms/<uuid>` (the user its QEMU runs as), never as root.
//!
//! - [`VmIdentity::of`] reads the owner of the VM's state directory through
//!   directory descriptors (no link followed) after checking that `<state>`
//!   and `<state>/vms` cannot be changed by anyone but root (or the caller):
//!   a VM's user cannot swap its directory for another's.
//! - [`VmIdentity::enter`] drops the whole process to that identity (for
//!   a one-shot command that needs nothing of root afterwards).
//! - [`VmIdentity::run`] runs a closure in a forked child with that
//!   identity and returns its (JSON) result: root keeps its privileges for
//!   what needs them (an operator-named restore target, the prune
//!   credential) and never opens the VM's catalog itself.
//! - [`VmIdentity::command`] gives a `Command` that starts with that
//!   identity (cdp-agent runs a VM's adoption that way).
//!
//! When the caller already is the VM's user (cdpd, the shipper, a test
//! running as the state's owner), each of these is a plain call.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::stat::FileStat;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{ForkResult, Gid, Uid};
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use crate::fsat::{DirFd, FsatError};
use crate::layout::StateDir;

#[derive(Debug, Error)]
pub enum PrivsepError {
    #[error(transparent)]
    Fs(#[from] FsatError),
    #[error("{path} can be changed by uid {uid} (mode {mode:o}): it must belong to root (or to the user running this) and not be writable by group or others; fix: chown root:root {path} && chmod 755 {path}")]
    UnsafeDir { path: PathBuf, uid: u32, mode: u32 },
    #[error("{path} belongs to uid {owner}, and this process (uid {me}) is neither root nor that user: run it as root or as uid {owner}")]
    NotPermitted { path: PathBuf, owner: u32, me: u32 },
    #[error("dropping to uid {uid} gid {gid}: {source}")]
    Drop {
        uid: u32,
        gid: u32,
        #[source]
        source: nix::Error,
    },
    #[error("running as uid {uid} for {path}: {op}: {source}")]
    Child {
        path: PathBuf,
        uid: u32,
        op: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("the child working as uid {uid} for {path} died ({status}) without an answer")]
    ChildDied {
        path: PathBuf,
        uid: u32,
        status: String,
    },
    #[error("the child working as uid {uid} for {path} gave no answer within {secs} s (or more than {cap} bytes): killed; a process of uid {uid} may be holding it up (stopped, or a lock held): check `ps -u {uid}`")]
    Stuck {
        path: PathBuf,
        uid: u32,
        secs: u64,
        cap: usize,
    },
    #[error("{path} (as uid {uid}): {message}")]
    Failed {
        path: PathBuf,
        uid: u32,
        message: String,
    },
}

/// The identity a VM's state is worked on with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmIdentity {
    pub uid: u32,
    pub gid: u32,
}

/// As root, the owner of `dir` when it is not root (or `dir` is not a
/// directory, a link included): root then must not open anything in it, but
/// work there as that user ([`VmIdentity`]). `None` when this process is not
/// root or root owns `dir`.
pub fn foreign_owner_as_root(dir: &Path) -> std::io::Result<Option<u32>> {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let m = std::fs::symlink_metadata(dir)?;
    Ok((m.uid() != 0 || !m.is_dir()).then_some(m.uid()))
}

/// `dir` may only be changed by root or by the caller.
fn check_trusted(st: &FileStat, path: &Path) -> Result<(), PrivsepError> {
    let me = nix::unistd::geteuid().as_raw();
    let writable_by_others = st.st_mode & 0o022 != 0;
    if (st.st_uid != 0 && st.st_uid != me) || writable_by_others {
        return Err(PrivsepError::UnsafeDir {
            path: path.to_path_buf(),
            uid: st.st_uid,
            mode: st.st_mode & 0o7777,
        });
    }
    Ok(())
}

impl VmIdentity {
    /// The owner of `<state>/vms/<uuid>` (`vm_uuid` must have passed
    /// `cdp_core::names`). `<state>` and `<state>/vms` must belong to root
    /// or to the caller and be writable by nobody else.
    pub fn of(state: &StateDir, vm_uuid: &str) -> Result<VmIdentity, PrivsepError> {
        let state_fd = DirFd::open(state.path())?;
        check_trusted(&state_fd.stat()?, state.path())?;
        let vms = state_fd.open_at(crate::layout::VMS)?;
        check_trusted(&vms.stat()?, vms.path())?;
        Self::owner_of(&vms.open_at(vm_uuid)?)
    }

    /// The owner of `<run>/<uuid>` (the VM's run directory, where its cdpd's
    /// sockets are), under the same rule as [`VmIdentity::of`]: `<run>` must
    /// belong to root or to the caller and be writable by nobody else.
    pub fn of_run(run: &crate::layout::RunDir, vm_uuid: &str) -> Result<VmIdentity, PrivsepError> {
        let run_fd = DirFd::open(run.path())?;
        check_trusted(&run_fd.stat()?, run.path())?;
        Self::owner_of(&run_fd.open_at(vm_uuid)?)
    }

    /// The owner of `vm`, when this process is root or that owner.
    fn owner_of(vm: &DirFd) -> Result<VmIdentity, PrivsepError> {
        let (uid, gid) = vm.owner()?;
        let me = nix::unistd::geteuid().as_raw();
        if me != 0 && me != uid {
            return Err(PrivsepError::NotPermitted {
                path: vm.path().to_path_buf(),
                owner: uid,
                me,
            });
        }
        Ok(VmIdentity { uid, gid })
    }

    /// Is this process already this identity (nothing to drop)?
    pub fn is_current(&self) -> bool {
        nix::unistd::geteuid().as_raw() == self.uid
    }

    /// Drop this process to the identity, for good (groups, gid, uid).
    pub fn enter(&self) -> Result<(), PrivsepError> {
        if self.is_current() {
            return Ok(());
        }
        let err = |source| PrivsepError::Drop {
            uid: self.uid,
            gid: self.gid,
            source,
        };
        let gid = Gid::from_raw(self.gid);
        let uid = Uid::from_raw(self.uid);
        nix::unistd::setgroups(&[gid]).map_err(err)?;
        nix::unistd::setresgid(gid, gid, gid).map_err(err)?;
        nix::unistd::setresuid(uid, uid, uid).map_err(err)?;
        Ok(())
    }

    /// A command that starts with this identity (and no other group).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
        let mut c = std::process::Command::new(program);
        if !self.is_current() {
            c.uid(self.uid).gid(self.gid);
        }
        c
    }

    /// Run `f` with this identity and return its result. As another user,
    /// `f` runs in a forked child that drops to the identity first and
    /// sends its result back as JSON; `f` must not depend on other threads
    /// (the child has only the calling thread) and must not print (another
    /// thread may hold the stdio locks at the fork). Calls are serialized
    /// within a process. `what` names the work in errors.
    pub fn run<T, F>(&self, what: &Path, f: F) -> Result<T, PrivsepError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Result<T, String>,
    {
        self.run_within(what, CHILD_DEADLINE, f)
    }

    /// [`VmIdentity::run`] with its own deadline: a child that has not
    /// answered by then is killed ([`PrivsepError::Stuck`]).
    pub fn run_within<T, F>(&self, what: &Path, limit: Duration, f: F) -> Result<T, PrivsepError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Result<T, String>,
    {
        // One at a time in a process: a fork never happens while another
        // thread is inside SQLite (the child could inherit a held lock).
        static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_current() {
            return f().map_err(|message| PrivsepError::Failed {
                path: what.to_path_buf(),
                uid: self.uid,
                message,
            });
        }
        let child_err = |op, source| PrivsepError::Child {
            path: what.to_path_buf(),
            uid: self.uid,
            op,
            source,
        };
        let (rx, tx) = nix::unistd::pipe().map_err(|e| child_err("pipe", e))?;
        // SAFETY: the child only drops privileges, runs `f` (single-threaded
        // work: the catalog, the journal), writes to the pipe and calls
        // `_exit`, never returning into the caller's stack or running its
        // destructors.
        match unsafe { nix::unistd::fork() }.map_err(|e| child_err("fork", e))? {
            ForkResult::Child => {
                drop(rx);
                let out: Result<T, String> =
                    self.enter().map_err(|e| e.to_string()).and_then(|()| f());
                let mut w = std::fs::File::from(tx);
                let ok = serde_json::to_vec(&out)
                    .ok()
                    .is_some_and(|b| w.write_all(&b).is_ok());
                // SAFETY: `_exit` ends the child without unwinding or
                // running the parent's atexit handlers.
                unsafe { libc::_exit(if ok { 0 } else { 1 }) }
            }
            ForkResult::Parent { child } => {
                drop(tx);
                let mut buf = Vec::new();
                let read = read_answer(rx, &mut buf, Instant::now() + limit);
                if matches!(read, Answer::Stuck) {
                    // The child runs as the VM's user, who may stop it (a
                    // signal is theirs to send) or hold a lock it waits on:
                    // never let that hold up root's work for other VMs.
                    let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                    let _ = waitpid(child, None);
                    return Err(PrivsepError::Stuck {
                        path: what.to_path_buf(),
                        uid: self.uid,
                        secs: limit.as_secs(),
                        cap: ANSWER_CAP,
                    });
                }
                let read: std::io::Result<()> = match read {
                    Answer::Done => Ok(()),
                    _ => Err(std::io::ErrorKind::Other.into()),
                };
                let status = waitpid(child, None).map_err(|e| child_err("waitpid", e))?;
                let died = || PrivsepError::ChildDied {
                    path: what.to_path_buf(),
                    uid: self.uid,
                    status: format!("{status:?}"),
                };
                if read.is_err() || !matches!(status, WaitStatus::Exited(_, 0)) {
                    return Err(died());
                }
                let out: Result<T, String> = serde_json::from_slice(&buf).map_err(|_| died())?;
                out.map_err(|message| PrivsepError::Failed {
                    path: what.to_path_buf(),
                    uid: self.uid,
                    message,
                })
            }
        }
    }
}

/// How long a child of [`VmIdentity::run`] may take (catalog reads and
/// writes, a control request, storing a definition: work of milliseconds
/// to seconds).
pub const CHILD_DEADLINE: Duration = Duration::from_secs(120);
/// The largest answer a child may send back.
pub const ANSWER_CAP: usize = 64 << 20;

enum Answer {
    Done,
    Failed,
    Stuck,
}

/// Read the child's answer from `rx` until EOF, the deadline or the cap.
fn read_answer(rx: OwnedFd, buf: &mut Vec<u8>, deadline: Instant) -> Answer {
    use std::os::fd::AsRawFd;
    let mut f = std::fs::File::from(rx);
    let mut chunk = [0u8; 64 << 10];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Answer::Stuck;
        }
        let ms = left.as_millis().clamp(1, 60_000) as libc::c_int;
        let mut pfd = libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd on the stack for the call's
        // duration, and its fd stays open (owned by `f`).
        match unsafe { libc::poll(&mut pfd, 1, ms) } {
            0 => continue,
            n if n < 0 => {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Answer::Failed;
            }
            _ => {}
        }
        match f.read(&mut chunk) {
            Ok(0) => return Answer::Done,
            Ok(n) if buf.len() + n > ANSWER_CAP => return Answer::Stuck,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return Answer::Failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const VM: &str = "0b5c6a3e-1d2f-4a5b-8c9d-0e1f2a3b4c5d";

    fn state(owner: Option<(u32, u32)>) -> (tempfile::TempDir, StateDir) {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let s = StateDir::new(d.path());
        std::fs::create_dir_all(s.vm(VM).path()).unwrap();
        if let Some((u, g)) = owner {
            std::os::unix::fs::chown(s.vm(VM).path(), Some(u), Some(g)).unwrap();
        }
        (d, s)
    }

    #[test]
    fn identity_is_the_vm_dir_owner_and_run_drops_to_it() {
        if !nix::unistd::geteuid().is_root() {
            return; // needs root to own a directory as another uid
        }
        let (_d, s) = state(Some((65534, 65534)));
        let id = VmIdentity::of(&s, VM).unwrap();
        assert_eq!(
            id,
            VmIdentity {
                uid: 65534,
                gid: 65534
            }
        );
        let ids: (u32, u32, Vec<u32>) = id
            .run(s.path(), || {
                Ok((
                    nix::unistd::geteuid().as_raw(),
                    nix::unistd::getegid().as_raw(),
                    nix::unistd::getgroups()
                        .unwrap()
                        .iter()
                        .map(|g| g.as_raw())
                        .collect(),
                ))
            })
            .unwrap();
        assert_eq!(ids, (65534, 65534, vec![65534]));
        // The parent kept root.
        assert!(nix::unistd::geteuid().is_root());
        // An error in the child comes back as text.
        let e = id
            .run::<(), _>(s.path(), || Err("no such thing".into()))
            .unwrap_err();
        assert!(e.to_string().contains("no such thing"), "{e}");
        // The child cannot read a root-only file.
        let secret = s.path().join("secret");
        std::fs::write(&secret, "x").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let r = id.run(s.path(), || {
            std::fs::read(&secret).map_err(|e| e.to_string())
        });
        assert!(r.unwrap_err().to_string().contains("Permission denied"));
    }

    #[test]
    fn a_child_held_up_by_the_vms_user_is_killed_at_the_deadline() {
        if !nix::unistd::geteuid().is_root() {
            return; // needs root to drop to another uid
        }
        let (_d, s) = state(Some((65534, 65534)));
        let id = VmIdentity::of(&s, VM).unwrap();
        let t = Instant::now();
        // The VM's user may stop the child (it runs as that user): here it
        // stops itself.
        let r = id.run_within::<(), _>(s.path(), Duration::from_millis(500), || {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
            Ok(())
        });
        let e = r.unwrap_err();
        assert!(matches!(e, PrivsepError::Stuck { uid: 65534, .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
        // An answer over the cap is refused too.
        let r = id.run_within(s.path(), Duration::from_secs(60), || {
            Ok("x".repeat(ANSWER_CAP))
        });
        assert!(matches!(r, Err(PrivsepError::Stuck { .. })), "{r:?}");
        // And the next call works.
        let v: u32 = id.run(s.path(), || Ok(7)).unwrap();
        assert_eq!(v, 7);
    }

    #[test]
    fn a_state_dir_others_can_change_is_refused() {
        let (_d, s) = state(None);
        std::fs::set_permissions(s.vms(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = VmIdentity::of(&s, VM).unwrap_err();
        assert!(matches!(e, PrivsepError::UnsafeDir { .. }), "{e}");
        assert!(e.to_string().contains("chmod 755"), "{e}");
    }

    #[test]
    fn a_linked_vm_dir_is_refused() {
        let (_d, s) = state(None);
        let elsewhere = s.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let link = s.vm("1b5c6a3e-1d2f-4a5b-8c9d-0e1f2a3b4c5d");
        std::os::unix::fs::symlink(&elsewhere, link.path()).unwrap();
        let e = VmIdentity::of(&s, "1b5c6a3e-1d2f-4a5b-8c9d-0e1f2a3b4c5d").unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
    }
}
