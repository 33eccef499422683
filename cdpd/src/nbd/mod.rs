//! The NBD protocol. [`proto`] is the pure codec; [`server`] the handshake
//! every server of the project speaks. The transmission phases live with
//! their storage: `capture::conn` (the capture daemon's disks) and
//! `cdp_repo::export` (read-only exports of restore points).

pub mod proto;
pub mod server;
