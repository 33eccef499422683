//! The remote repository `cdp/v1/` (docs/DESIGN.md, "Repository"): where journal segments,
//! baselines and VM definitions live off the host.
//!
//! - [`store`]: the storage backends behind one small interface (S3-compatible
//!   through object_store, and `file://`), plus retry with backoff above them.

pub mod crypto;
pub mod export;
pub mod format;
pub mod lease;
pub mod read;
pub mod restore;
pub mod retention;
pub mod store;
pub mod verify;
pub mod zframe;
