//! cdpd, the capture process: serves each protected disk to QEMU over NBD
//! and journals every write before acknowledging it (docs/DESIGN.md,
//! "cdpd"). Formats and host contracts are [`cdp_core`]; nothing else in
//! the workspace depends on this crate.
//!
//! - `capture`: the data path (connections, batching, journal-then-apply,
//!   the sync and sealer threads) and the control socket's server.
//! - [`daemon`]: `cdpd run` start-up (recovery, session), listening, clean stop.
//! - [`limits`]: who may connect, how many, for how long; ending every
//!   connection at stop.

pub(crate) mod capture;
pub mod daemon;
pub mod limits;
