//! Restore: a disk as it was at a point, from a baseline plus the journal.
//!
//! A pipeline, planned first and then executed (as rustic_core's restore),
//! so that each step can be checked (and the plan shown) on its own:
//! 1. [`history`]: [`load_history`] gathers the disk's baselines, journal
//!    segments and retention manifest, from the repository (LIST + `.idx`
//!    objects) and, when the host still has them, from its local segments
//!    (the newest records, not shipped yet).
//! 2. [`point`]: [`resolve`] turns `latest`, `seq:N`, `mark:LABEL` or a time
//!    into a seq of that history, refusing a point that is not certain.
//! 3. [`plan`](mod@plan): [`plan()`] picks the newest baseline consistent at
//!    or before the point, and builds the extent map of the last write to
//!    every byte range up to the point from the segment indexes alone (no
//!    payload is read).
//! 4. [`execute`](mod@execute): [`execute()`] emits every byte range of the
//!    disk exactly once, as data or as zeros, to a [`Sink`] ([`sink`]: a
//!    fresh sparse file, the disk in place, …), fetching only the chunks and
//!    record payloads the map names ([`read`]), in parallel, checking every
//!    checksum on the way.

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::read::ReadError;

pub mod aligned;
pub mod chain;
pub mod execute;
pub mod history;
pub mod plan;
pub mod point;
pub mod read;
pub mod sink;

pub use execute::{execute, tick_with, Progress, RestoreStats, Tick, Ticker};
pub use history::{
    gaps, load_history, load_history_with, load_resyncs, load_retention, marks, History, Resyncs,
    SegLoc, SegRef,
};
pub use plan::{plan, restorable_ranges, Plan};
pub use point::{resolve, Point};
pub use read::{check_record, fetch_chunk, read_raw, read_record};
pub use sink::{FreshFile, InPlace, Sink};

#[derive(Debug, Error)]
pub enum RestoreError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot restore {disk} at {point}: {why}")]
    Impossible {
        disk: String,
        point: String,
        why: String,
    },
    #[error("{what}: {why}")]
    Corrupt { what: String, why: String },
    #[error("bad point {0:?}: use an RFC 3339 time, \"10 minutes ago\", seq:N or mark:LABEL")]
    BadPoint(String),
}

impl RestoreError {
    /// True if trying again may succeed: the repository was unreachable or
    /// failed on its side. A point that cannot be restored, a corrupt
    /// object or a local I/O error stays so.
    pub fn is_transient(&self) -> bool {
        matches!(self, RestoreError::Read(ReadError::Store(e)) if e.is_transient())
    }
}

pub(crate) fn io_err(path: &Path) -> impl Fn(std::io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    fn server() -> StoreError {
        StoreError::Server {
            url: "s3://b".into(),
            op: "get",
            key: "k".into(),
            detail: "503".into(),
            source: "slow down".into(),
        }
    }

    #[test]
    fn only_a_failing_store_is_transient() {
        assert!(RestoreError::Read(ReadError::Store(server())).is_transient());
        let gone = StoreError::NotFound {
            url: "s3://b".into(),
            key: "k".into(),
        };
        assert!(!RestoreError::Read(ReadError::Store(gone)).is_transient());
        assert!(!RestoreError::BadPoint("someday".into()).is_transient());
        let impossible = RestoreError::Impossible {
            disk: "vda".into(),
            point: "seq:3".into(),
            why: "no baseline".into(),
        };
        assert!(!impossible.is_transient());
    }
}
