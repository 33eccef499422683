//! The NBD protocol. [`proto`] is the pure codec; the server side that uses
//! it lives in `capture::conn`.

pub mod proto;
