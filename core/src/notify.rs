//! Waking cdp-agent: the libvirt hook (or anything else) tells the agent that
//! a VM stopped and its journal may need adopting.
//!
//! Contract: the agent binds the unix datagram socket `<run-dir>/agent.sock`
//! (mode 0600); a notification is one datagram `adopt <vm-uuid>\n`. Sending
//! never blocks: a full queue, an absent or a dead agent is an error the
//! caller may ignore, because the agent also scans every `scan_interval`, so
//! a lost notification only delays adoption.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

/// `<run-dir>/agent.sock` (see [`crate::layout`]).
pub fn agent_socket(run_dir: &Path) -> PathBuf {
    crate::layout::RunDir::new(run_dir).agent_socket()
}

/// The datagram that asks the agent to adopt `vm_uuid`.
pub fn adopt_message(vm_uuid: &str) -> String {
    format!("adopt {vm_uuid}\n")
}

/// Parse a datagram the agent received: the VM UUID of `adopt <uuid>\n`.
pub fn parse_message(msg: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(msg).ok()?;
    let uuid = s.strip_suffix('\n').unwrap_or(s).strip_prefix("adopt ")?;
    crate::names::check_uuid(uuid).ok()?;
    Some(uuid)
}

/// Ask the agent listening on `<run-dir>/agent.sock` to adopt `vm_uuid`
/// now. Never blocks; fails when no agent listens (ENOENT, ECONNREFUSED) or
/// its queue is full (EAGAIN).
pub fn notify_agent(run_dir: &Path, vm_uuid: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    sock.set_nonblocking(true)?;
    let msg = adopt_message(vm_uuid);
    let n = sock.send_to(msg.as_bytes(), agent_socket(run_dir))?;
    if n != msg.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short datagram to the agent",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_roundtrip_and_send() {
        let u = "0b5c6a3e-1d2f-4a5b-8c9d-0e1f2a3b4c5d";
        assert_eq!(parse_message(adopt_message(u).as_bytes()), Some(u));
        assert_eq!(parse_message(b"adopt ../../etc\n"), None);
        assert_eq!(parse_message(b"stop x\n"), None);

        let dir = tempfile::tempdir().unwrap();
        // No agent: an error at once, never a wait.
        assert!(notify_agent(dir.path(), u).is_err());
        let rx = UnixDatagram::bind(agent_socket(dir.path())).unwrap();
        notify_agent(dir.path(), u).unwrap();
        let mut buf = [0u8; 128];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(parse_message(&buf[..n]), Some(u));
        // A full queue fails instead of blocking.
        let mut sent = 0;
        let full = loop {
            match notify_agent(dir.path(), u) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
            assert!(sent < 1_000_000, "the queue never filled");
        };
        assert_eq!(full.kind(), io::ErrorKind::WouldBlock, "{full}");
    }
}
