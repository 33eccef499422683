//! cdp-core: the formats and host contracts every cdp process shares
//! (docs/DESIGN.md). No sockets bound, no signal handling, no process
//! state: those belong to the processes (`cdpd`, `cdp-shipper`,
//! `cdp-agent`, `cdpctl`, `cdp-qemu`). The one piece with threads is the
//! generic NBD server, which serves streams it is handed.
//!
//! - [`nbd`]: the NBD codec and the newstyle handshake (pure code over
//!   `Read + Write`), and a generic server over a backend trait.
//! - [`journal`]: the journal's byte layout, segment files, replay and
//!   start-up [`journal::recovery`].
//! - [`session`]: recovery of a VM's journals and how its last capture
//!   session ended (cdpd's start and cdp-agent's adoption).
//! - [`layout`]: every path under the state and run directories.
//! - [`config`]: `/etc/cdp/cdp.toml`, parsed once into typed values.
//! - [`catalog`]: the SQLite catalog.
//! - [`control`]: cdpd's control protocol and its client.
//! - [`image`]: opening and OFD-locking a raw image.
//! - [`fsat`]: files in a tree another user can write, through directory fds.
//! - [`names`], [`time`], [`proc`], [`notify`]: small shared contracts.

pub mod catalog;
pub mod config;
pub mod control;
pub mod fsat;
pub mod image;
pub mod journal;
pub mod layout;
pub mod names;
pub mod nbd;
pub mod notify;
pub mod privsep;
pub mod proc;
pub mod session;
pub mod time;
