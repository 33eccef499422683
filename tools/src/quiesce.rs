//! `cdpctl mark --quiesce`: the guest's file systems frozen through the QEMU
//! guest agent, via libvirt (`virsh domfsfreeze` / `virsh domfsthaw`), while
//! cdpd writes the mark (docs/LIBVIRT.md, "Quiesced marks").
//!
//! Whatever happens after a freeze was asked for, a thaw is asked for: a
//! freeze that failed or timed out (the guest may still have frozen after
//! virsh was killed), a mark that failed or timed out, ^C/SIGTERM/SIGHUP
//! (blocked while the guest may be frozen, acted on after the thaw), a panic
//! or an early return ([`Frozen`]'s Drop). Every virsh call is bounded: virsh
//! runs in a process group of its own (a ^C at the terminal does not reach
//! it) and is killed at its deadline.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// How to reach the guest agent, and the bounds of each step.
#[derive(Debug, Clone)]
pub struct Quiesce {
    /// libvirt connection URI.
    pub connect: String,
    /// libvirt domain (name or UUID).
    pub domain: String,
    pub freeze_timeout: Duration,
    pub thaw_timeout: Duration,
}

/// What one bounded virsh run gave.
#[derive(Debug)]
pub enum Virsh {
    Done { ok: bool, out: String, err: String },
    TimedOut,
}

impl Quiesce {
    /// `virsh -c URI ARGS...`, killed after `timeout`.
    fn virsh(&self, args: &[&str], timeout: Duration) -> Result<Virsh> {
        use std::os::unix::process::CommandExt;
        let mut child = Command::new("virsh")
            .arg("-c")
            .arg(&self.connect)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .context("running virsh (is libvirt's client installed?)")?;
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(Virsh::TimedOut);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut out = String::new();
        let mut err = String::new();
        if let Some(mut o) = child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        Ok(Virsh::Done {
            ok: status.success(),
            out,
            err: err.trim().to_string(),
        })
    }

    /// Freeze the guest's file systems. On any failure the thaw has been
    /// asked for already (the guest may have frozen some of them), and the
    /// error says why the freeze failed.
    pub fn freeze(&self) -> Result<Frozen<'_>> {
        let r = self.virsh(&["domfsfreeze", &self.domain], self.freeze_timeout);
        let mut frozen = Frozen {
            q: self,
            thawed: false,
            filesystems: 0,
        };
        let why = match r {
            Ok(Virsh::Done { ok: true, out, .. }) => match froze_count(&out) {
                Some(n) if n > 0 => {
                    frozen.filesystems = n;
                    return Ok(frozen);
                }
                _ => format!("the guest agent froze no file system ({})", out.trim()),
            },
            Ok(Virsh::Done { err, .. }) => format!("virsh domfsfreeze failed: {err}"),
            Ok(Virsh::TimedOut) => format!(
                "virsh domfsfreeze did not answer within {:?}",
                self.freeze_timeout
            ),
            Err(e) => format!("{e:#}"),
        };
        // Thawed here (Drop), whatever the guest did; a thaw's own failure
        // after a failed freeze is expected (no agent) and not reported.
        let thaw = frozen.thaw();
        let thaw_note = match (&thaw, why.contains("did not answer")) {
            (Err(e), true) => format!("; the thaw after it failed too: {e:#}"),
            _ => String::new(),
        };
        bail!(
            "cannot quiesce {}: {why}{thaw_note}. Is qemu-guest-agent running in the guest, with a channel org.qemu.guest_agent.0 in the domain? (docs/LIBVIRT.md, \"Quiesced marks\")",
            self.domain
        )
    }
}

/// "Froze 2 filesystem(s)" → 2.
fn froze_count(out: &str) -> Option<u32> {
    out.split_whitespace()
        .skip_while(|w| *w != "Froze")
        .nth(1)?
        .parse()
        .ok()
}

/// The guest's file systems are (or may be) frozen until this is thawed or
/// dropped.
pub struct Frozen<'a> {
    q: &'a Quiesce,
    thawed: bool,
    pub filesystems: u32,
}

impl Frozen<'_> {
    /// Thaw, bounded, once more if the first attempt fails; the error names
    /// the command an operator runs by hand.
    pub fn thaw(&mut self) -> Result<()> {
        self.thawed = true;
        let mut last = String::new();
        for _ in 0..2 {
            match self
                .q
                .virsh(&["domfsthaw", &self.q.domain], self.q.thaw_timeout)
            {
                Ok(Virsh::Done { ok: true, .. }) => return Ok(()),
                Ok(Virsh::Done { err, .. }) => last = err,
                Ok(Virsh::TimedOut) => last = format!("no answer within {:?}", self.q.thaw_timeout),
                Err(e) => last = format!("{e:#}"),
            }
        }
        bail!(
            "thawing {} failed ({last}): its file systems may still be frozen; run `virsh -c {} domfsthaw {}`",
            self.q.domain,
            self.q.connect,
            self.q.domain
        )
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if !self.thawed {
            if let Err(e) = self.thaw() {
                eprintln!("cdpctl: {e:#}");
            }
        }
    }
}

/// SIGINT, SIGTERM and SIGHUP held back while the guest may be frozen: they
/// are read (not acted on) from a signalfd, and unblocked on drop.
pub struct HeldSignals {
    set: SigSet,
    fd: SignalFd,
}

impl HeldSignals {
    pub fn hold() -> Result<HeldSignals> {
        let mut set = SigSet::empty();
        for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            set.add(s);
        }
        set.thread_block()
            .context("blocking SIGINT/SIGTERM/SIGHUP")?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .context("creating a signalfd")?;
        Ok(HeldSignals { set, fd })
    }

    /// A signal that arrived since [`HeldSignals::hold`], if any.
    pub fn arrived(&mut self) -> Option<Signal> {
        let s = self.fd.read_signal().ok().flatten()?;
        Signal::try_from(s.ssi_signo as i32).ok()
    }
}

impl Drop for HeldSignals {
    fn drop(&mut self) {
        let _ = self.set.thread_unblock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virsh_freeze_counts_are_read() {
        assert_eq!(froze_count("Froze 1 filesystem(s)\n"), Some(1));
        assert_eq!(froze_count("Froze 12 filesystem(s)"), Some(12));
        assert_eq!(froze_count("Froze 0 filesystem(s)"), Some(0));
        assert_eq!(froze_count(""), None);
    }
}
