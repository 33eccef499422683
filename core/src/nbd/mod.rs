//! The NBD protocol. [`proto`] is the pure codec; [`handshake`] the
//! newstyle negotiation every server of the project speaks; [`server`] a
//! generic transmission phase against a small backend trait (cdpctl's
//! read-only export of a restore point). cdpd's capture connection has its
//! own transmission phase (the journal-then-apply data path) on the same
//! codec and handshake.

pub mod handshake;
pub mod proto;
pub mod server;
