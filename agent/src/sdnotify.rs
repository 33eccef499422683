//! systemd's notification protocol (sd_notify(3)), written by hand: one
//! datagram per message to `$NOTIFY_SOCKET` (a path, or `@name` for the
//! abstract namespace), and the watchdog period from `$WATCHDOG_USEC`.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; `None` when not started by systemd (or the
    /// variable is unusable).
    pub fn from_env() -> Option<Notifier> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()).to_vec();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name).ok()?
            }
            None => SocketAddr::from_pathname(&path).ok()?,
        };
        let sock = UnixDatagram::unbound().ok()?;
        // Never wait on systemd.
        sock.set_nonblocking(true).ok()?;
        Some(Notifier { sock, addr })
    }

    /// Send `state` (e.g. "READY=1\nSTATUS=…"); errors are for the caller
    /// to ignore or count.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        self.sock.send_to_addr(state.as_bytes(), &self.addr)?;
        Ok(())
    }
}

/// Ping the watchdog at half of `$WATCHDOG_USEC`, when it is set for us
/// (`$WATCHDOG_PID` absent or our pid).
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        if pid.to_str()?.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if usec == 0 {
        return None;
    }
    Some(Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("notify.sock");
        let rx = UnixDatagram::bind(&p).unwrap();
        let n = Notifier {
            sock: UnixDatagram::unbound().unwrap(),
            addr: SocketAddr::from_pathname(&p).unwrap(),
        };
        n.notify("READY=1\nSTATUS=x").unwrap();
        let mut buf = [0u8; 64];
        let k = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"READY=1\nSTATUS=x");
    }
}
