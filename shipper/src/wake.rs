//! What wakes an idle shipper: a change in its VM's state directory
//! (`<state>/vms/<uuid>`, docs/DESIGN.md "Host layout"), seen by inotify.
//! cdpd sealing a segment commits to the catalog there (its WAL file is
//! written), the agent replaces the saved definition there: either wakes
//! the shipper at once, where it used to look every `--poll`. The journal
//! files are one directory further down: their writes are not seen.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;

/// The inotify descriptor, for tokio's reactor.
struct Fd(Inotify);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// A watch on one directory's entries: written, created, renamed into it.
pub struct StateWatch {
    fd: AsyncFd<Fd>,
}

impl StateWatch {
    /// Watch `dir` (not its subdirectories). Needs a tokio runtime. A
    /// symlink in its place is not followed (the tree is the VM's), and
    /// anything but a directory is refused.
    pub fn new(dir: &Path) -> io::Result<StateWatch> {
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        ino.add_watch(
            dir,
            AddWatchFlags::IN_DONT_FOLLOW
                | AddWatchFlags::IN_ONLYDIR
                | AddWatchFlags::IN_MODIFY
                | AddWatchFlags::IN_CREATE
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_CLOSE_WRITE,
        )?;
        // SAFETY: `Fd` owns the inotify descriptor (an `OwnedFd` inside
        // `Inotify`), never closes or replaces it, and returns that same
        // descriptor from every `as_raw_fd`; the `AsyncFd` owns the `Fd`
        // for its whole life, so the descriptor stays open and the same.
        let fd = unsafe { AsyncFd::register(Fd(ino)) }.map_err(|e| e.into_parts().1)?;
        Ok(StateWatch { fd })
    }

    /// Wait until something in the directory changed since the last call
    /// (every event queued meanwhile is taken at once).
    pub async fn changed(&self) -> io::Result<()> {
        loop {
            let mut ready = self.fd.readable().await?;
            let mut any = false;
            loop {
                match ready.get_inner().0.read_events() {
                    Ok(events) => any |= !events.is_empty(),
                    Err(Errno::EAGAIN) => {
                        ready.clear_ready();
                        break;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if any {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A write into the directory wakes the watch; one in a subdirectory
    /// (where the journals are) does not.
    #[tokio::test]
    async fn a_write_in_the_directory_wakes_it_not_one_below() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("vda")).unwrap();
        let w = StateWatch::new(dir.path()).unwrap();
        std::fs::write(dir.path().join("vda").join("seg"), b"x").unwrap();
        let quiet = tokio::time::timeout(Duration::from_millis(200), w.changed()).await;
        assert!(quiet.is_err(), "woken by a write one level down");
        std::fs::write(dir.path().join("catalog.sqlite-wal"), b"x").unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("not woken by a write in the directory")
            .unwrap();
    }

    /// A symlink in the directory's place is not followed, and a file is
    /// not a directory: no watch (the shipper then polls).
    #[test]
    fn a_symlink_or_a_file_is_not_watched() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let _g = rt.enter();
        std::fs::create_dir(dir.path().join("real")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("link")).unwrap();
        std::fs::write(dir.path().join("file"), b"x").unwrap();
        assert!(StateWatch::new(&dir.path().join("real")).is_ok());
        assert!(StateWatch::new(&dir.path().join("link")).is_err());
        assert!(StateWatch::new(&dir.path().join("file")).is_err());
    }
}
