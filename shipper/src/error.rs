//! Errors of the shipper: one type, [`ShipError`], whose variants carry
//! their context (policy, target, path) and the typed cause, and a small
//! [`Kind`] that callers branch on (the agent labels its error counter with
//! it). [`ShipError::is_transient`] says whether trying again may help; the
//! per-target backoff of [`crate::Shipper::pass`] and the agent's retry of a
//! notified VM decide on it.

use std::path::PathBuf;

use cdp_core::catalog::CatalogError;
use cdp_core::journal::format::FormatError;
use cdp_core::names::NameError;
use cdp_repo::format::RepoFormatError;
use cdp_repo::lease::LeaseError;
use cdp_repo::store::StoreError;
use thiserror::Error;

/// What an error is about, for callers that branch or count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kind {
    /// The configuration or the command line: a policy without targets, a
    /// VM UUID that is not one. Fixing it takes an operator.
    Config,
    /// A target: unreachable, refusing, holding another format.
    Target,
    /// The host's catalog.
    Catalog,
    /// Local files: a journal segment, a disk image.
    Local,
}

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ShipError {
    #[error("policy {policy:?} is not in the config{}: add [policy.{policy}] with targets = [...]", config_file(.config))]
    UnknownPolicy {
        policy: String,
        /// The config file it was looked up in (none: built-in defaults).
        config: Option<PathBuf>,
    },

    #[error("policy {policy:?} has no targets: add targets = [\"primary\", …] and [target.primary] url = …")]
    NoTargets { policy: String },

    #[error("target {target:?} has no [target.{target}] section in the config")]
    UnknownTarget { target: String },

    #[error(transparent)]
    InvalidName(#[from] NameError),

    /// A storage operation on a target failed (after its retries).
    #[error("target {target}: {source}")]
    Store {
        target: String,
        #[source]
        source: Box<StoreError>,
    },

    /// The target holds a repository this build cannot use.
    #[error("target {target}: {source}")]
    Format {
        target: String,
        #[source]
        source: RepoFormatError,
    },

    /// The repository lease that keeps retention off a baseline's chunks.
    #[error("target {target}: {source}")]
    Lease {
        target: String,
        #[source]
        source: Box<LeaseError>,
    },

    #[error(transparent)]
    Catalog(#[from] CatalogError),

    /// A sealed segment that cannot be read as one.
    #[error("segment {path}: {source}")]
    Segment {
        path: PathBuf,
        #[source]
        source: FormatError,
    },

    #[error("segment {path} is not sealed")]
    NotSealed { path: PathBuf },

    /// A segment's index built again differs from the one built first,
    /// whose hash the next segment's index names (docs/REPOSITORY_FORMAT.md,
    /// "Chain of indexes"): not uploaded, so every target holds one chain.
    #[error("segment {path}: its repository index encodes to other bytes (BLAKE3 {built}) than when it was first built (BLAKE3 {recorded}, which the next segment's index names): not uploaded, so every target holds the same chain; was the shipper upgraded while a target lagged? Ship from the build that began")]
    ChainMismatch {
        path: PathBuf,
        built: String,
        recorded: String,
    },

    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A blocking task (compression, hashing) panicked or was cancelled.
    #[error("{what}: {source}")]
    Task {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("VM {vm}: its cdpd does not answer on its control socket and its capture session is still open: the seq its image is settled at is unknown, so no baseline now (it would be inexact); it is taken once cdpd answers or its journal is recovered")]
    UnsettledImage { vm: String },
    #[error("VM {vm}, disk {disk}: its journal was full (degraded mode) during the baseline's scan: writes then reached the image without being journaled, so no seq would make the baseline exact; it is taken again once the journal takes writes again")]
    DegradedImage { vm: String, disk: String },
    #[error("VM {vm}, disk {disk}: the disk changed while it was not captured ({reason}); those writes are in no journal yet, so no seq would make a baseline taken now exact: it is taken once the VM starts protected again (its first session journals the gap)")]
    PendingGap {
        vm: String,
        disk: String,
        reason: String,
    },
}

fn config_file(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map(|s| format!(" {}", s.display()))
        .unwrap_or_default()
}

impl ShipError {
    pub fn kind(&self) -> Kind {
        match self {
            ShipError::UnknownPolicy { .. }
            | ShipError::NoTargets { .. }
            | ShipError::UnknownTarget { .. }
            | ShipError::InvalidName(_) => Kind::Config,
            ShipError::Store { .. } | ShipError::Format { .. } | ShipError::Lease { .. } => {
                Kind::Target
            }
            ShipError::Catalog(_) => Kind::Catalog,
            ShipError::Segment { .. }
            | ShipError::NotSealed { .. }
            | ShipError::ChainMismatch { .. }
            | ShipError::Io { .. }
            | ShipError::Task { .. }
            | ShipError::UnsettledImage { .. }
            | ShipError::DegradedImage { .. }
            | ShipError::PendingGap { .. } => Kind::Local,
        }
    }

    /// True if the same call may succeed later without anyone changing
    /// anything: the storage was unreachable or failed on its side.
    /// Permanent: credentials refused, a bad URL, another repository
    /// format, a corrupt segment, a configuration mistake.
    pub fn is_transient(&self) -> bool {
        match self {
            ShipError::Store { source, .. } => source.is_transient(),
            ShipError::Lease { source, .. } => match source.as_ref() {
                LeaseError::Write { source, .. } | LeaseError::List { source, .. } => {
                    source.is_transient()
                }
            },
            // cdpd comes back (restarted) or the agent recovers its journal.
            ShipError::UnsettledImage { .. } => true,
            // The journal takes writes again once the shipper trims or the
            // target comes back.
            ShipError::DegradedImage { .. } => true,
            // The VM's next start journals the gap.
            ShipError::PendingGap { .. } => true,
            _ => false,
        }
    }

    /// The target the error is about, if it is about one.
    pub fn target(&self) -> Option<&str> {
        match self {
            ShipError::Store { target, .. }
            | ShipError::Format { target, .. }
            | ShipError::Lease { target, .. } => Some(target),
            _ => None,
        }
    }

    pub(crate) fn store(target: &str) -> impl FnOnce(StoreError) -> ShipError + '_ {
        move |source| ShipError::Store {
            target: target.to_string(),
            source: Box::new(source),
        }
    }

    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> ShipError {
        let path = path.into();
        move |source| ShipError::Io { what, path, source }
    }
}

pub type Result<T, E = ShipError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn store_error(transient: bool) -> StoreError {
        if transient {
            StoreError::Unreachable {
                url: "s3://b".into(),
                op: "put",
                key: "k".into(),
                detail: "connection refused".into(),
                hint: "is the endpoint up?",
                source: "refused".into(),
            }
        } else {
            StoreError::Auth {
                url: "s3://b".into(),
                op: "put",
                key: "k".into(),
                detail: "403".into(),
                source: "denied".into(),
            }
        }
    }

    #[test]
    fn transient_only_when_the_storage_may_come_back() {
        let t = ShipError::Store {
            target: "primary".into(),
            source: Box::new(store_error(true)),
        };
        assert!(t.is_transient());
        assert_eq!(t.kind(), Kind::Target);
        assert_eq!(t.target(), Some("primary"));
        let p = ShipError::Store {
            target: "primary".into(),
            source: Box::new(store_error(false)),
        };
        assert!(!p.is_transient());
        let lease = ShipError::Lease {
            target: "primary".into(),
            source: Box::new(LeaseError::Write {
                key: "l".into(),
                source: store_error(true),
            }),
        };
        assert!(lease.is_transient());
        let cfg = ShipError::NoTargets {
            policy: "default".into(),
        };
        assert!(!cfg.is_transient());
        assert_eq!(cfg.kind(), Kind::Config);
        let seg = ShipError::NotSealed {
            path: "/j/1.seg".into(),
        };
        assert!(!seg.is_transient());
        assert_eq!(seg.kind(), Kind::Local);
    }

    #[test]
    fn messages_name_the_context() {
        let e = ShipError::UnknownPolicy {
            policy: "gold".into(),
            config: Some("/etc/cdp/cdp.toml".into()),
        };
        assert_eq!(
            e.to_string(),
            "policy \"gold\" is not in the config /etc/cdp/cdp.toml: add [policy.gold] with targets = [...]"
        );
        let e = ShipError::Store {
            target: "offsite".into(),
            source: Box::new(store_error(false)),
        };
        assert!(e
            .to_string()
            .starts_with("target offsite: s3://b: put k: access denied"));
        assert!(std::error::Error::source(&e).is_some());
    }
}
