//! The NBD protocol. [`proto`] is the pure codec; [`handshake`] the
//! newstyle negotiation every server of the project speaks. The
//! transmission phases live with their storage: cdpd's capture connection
//! and cdpctl's read-only export.

pub mod handshake;
pub mod proto;
pub mod server;
