//! cdp-qemu, the QEMU launch wrapper (docs/DESIGN.md, "Processes"): used as a VM's
//! emulator, it reads the VM's CDP keys, starts the capture daemon and the
//! shipper, waits until every disk socket listens, rewrites the tagged disks
//! to NBD and becomes QEMU (same PID).
//!
//! - [`domain`]: the libvirt domain XML and its CDP metadata keys (pure).
//! - [`argv`]: recognising probes and rewriting QEMU's disk arguments (pure).
//! - [`launch`]: the processes (cdp-qemu).
//! - [`supervise`]: the process that starts cdpd and restarts it while QEMU runs.
//! - [`hook`]: the libvirt hook (`cdpctl libvirt-hook`, as root).
//! - [`target_dir`]: a `file://` target's directory made ready for QEMU's
//!   user (`cdpctl protect`).
//! - [`protect`]: adding and removing the CDP keys in a definition (pure,
//!   byte-preserving; `cdpctl protect` / `unprotect`).

pub mod argv;
pub mod domain;
pub mod hook;
pub mod launch;
pub mod protect;
pub mod supervise;
pub mod target_dir;
