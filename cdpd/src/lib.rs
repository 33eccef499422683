//! cdpd: continuous data protection for QEMU/KVM disks.
//!
//! Layers, bottom up:
//! - [`nbd::proto`] and [`journal::format`]: the wire protocol and the
//!   journal's byte layout, pure code (no sockets, no files).
//! - [`journal`]: segment files, replay; [`catalog`]: the SQLite catalog.
//! - [`capture`]: the NBD server, data path, recovery, control socket.
//! - [`daemon`]: `cdpd run` start-up and clean stop.

pub mod capture;
pub mod catalog;
pub mod config;
pub mod daemon;
pub mod journal;
pub mod names;
pub mod nbd;
pub mod notify;
pub mod proc;
pub mod time;
