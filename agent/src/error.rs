//! Errors of the agent, one type per layer.

use std::path::PathBuf;

use cdp_shipper::{Kind, ShipError, TargetFailure};
use thiserror::Error;

/// Why the agent could not start or had to stop.
#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Catalog(#[from] cdp_core::catalog::CatalogError),
    #[error("metrics: cannot listen on {addr}: {source} (set [agent] metrics_listen to a free address, or \"\" for none)")]
    MetricsListen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("another cdp-agent listens on {0} already: stop it first")]
    AlreadyRunning(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} VM(s) could not be adopted; see the messages above")]
    Incomplete(usize),
}

/// Why one VM could not be adopted (the agent goes on with the others).
#[derive(Debug, Error)]
pub enum AdoptError {
    #[error(transparent)]
    Lock(#[from] cdp_shipper::lock::LockError),
    #[error(transparent)]
    Catalog(#[from] cdp_core::catalog::CatalogError),
    #[error("the catalog names a VM that is not one: {0}")]
    InvalidVm(#[from] cdp_core::names::NameError),
    #[error("recovering the journal of a stopped cdpd: {0}")]
    Image(#[from] cdp_core::image::ImageError),
    #[error("recovering the journal of a stopped cdpd: {0}")]
    Recovery(#[from] cdp_core::session::SessionError),
    #[error("reading the boot id from {path}: {source}")]
    BootId {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("policy {policy:?} has no targets in the config: add [policy.{policy}] targets = [...] so its journal can be shipped")]
    NoTargets { policy: String },
    #[error("opening the targets of policy {policy:?}: {source}")]
    Targets {
        policy: String,
        #[source]
        source: ShipError,
    },
    #[error("target(s) failing: {}", join(.0))]
    TargetFailing(Vec<TargetFailure>),
    #[error("shipping: {0}")]
    Ship(#[from] ShipError),
}

fn join(failures: &[TargetFailure]) -> String {
    let v: Vec<String> = failures.iter().map(ToString::to_string).collect();
    v.join("; ")
}

fn ship_kind(e: &ShipError) -> &'static str {
    match e.kind() {
        Kind::Config => "config",
        Kind::Target => "target",
        Kind::Catalog => "catalog",
        _ => "ship",
    }
}

impl AdoptError {
    /// The `kind` label of `cdp_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            AdoptError::Lock(_) => "lock",
            AdoptError::Catalog(_) | AdoptError::InvalidVm(_) => "catalog",
            AdoptError::Image(_) | AdoptError::Recovery(_) | AdoptError::BootId { .. } => {
                "recovery"
            }
            AdoptError::NoTargets { .. } => "config",
            AdoptError::TargetFailing(_) => "target",
            AdoptError::Targets { source, .. } => match ship_kind(source) {
                "ship" => "target",
                k => k,
            },
            AdoptError::Ship(e) => ship_kind(e),
        }
    }

    /// True if adopting the VM again soon may succeed with nothing changed:
    /// every failing target failed in a way that may pass (unreachable, a
    /// server error). A configuration mistake, refused credentials or a
    /// damaged journal wait for an operator (and the next scan).
    pub fn is_transient(&self) -> bool {
        match self {
            AdoptError::Targets { source, .. } | AdoptError::Ship(source) => source.is_transient(),
            AdoptError::TargetFailing(f) => {
                !f.is_empty() && f.iter().all(|t| t.error.is_transient())
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cdp_repo::store::StoreError;

    fn unreachable() -> StoreError {
        StoreError::Unreachable {
            url: "s3://bucket".into(),
            op: "put",
            key: "cdp/v1/FORMAT".into(),
            detail: "connection refused".into(),
            hint: "is the S3 endpoint up?",
            source: "refused".into(),
        }
    }

    fn denied() -> StoreError {
        StoreError::Auth {
            url: "s3://bucket".into(),
            op: "put",
            key: "cdp/v1/FORMAT".into(),
            detail: "403 Forbidden".into(),
            source: "denied".into(),
        }
    }

    fn failure(target: &str, source: StoreError) -> TargetFailure {
        TargetFailure {
            target: target.into(),
            error: ShipError::Store {
                target: target.into(),
                source: Box::new(source),
            },
        }
    }

    #[test]
    fn a_failing_target_is_transient_only_if_all_are() {
        let e = AdoptError::TargetFailing(vec![failure("a", unreachable())]);
        assert!(e.is_transient());
        assert_eq!(e.kind(), "target");
        let e =
            AdoptError::TargetFailing(vec![failure("a", unreachable()), failure("b", denied())]);
        assert!(!e.is_transient());
        assert!(!AdoptError::TargetFailing(vec![]).is_transient());
        let msg = e.to_string();
        assert!(
            msg.starts_with("target(s) failing: a (target a: s3://bucket"),
            "{msg}"
        );
        assert!(msg.contains("; b (target b: s3://bucket"), "{msg}");
    }

    #[test]
    fn shipper_errors_keep_their_kind_and_cause() {
        let e = AdoptError::from(ShipError::Store {
            target: "primary".into(),
            source: Box::new(unreachable()),
        });
        assert_eq!(e.kind(), "target");
        assert!(e.is_transient());
        // The typed cause is there, not a string.
        let src = std::error::Error::source(&e).expect("a source");
        assert!(src.downcast_ref::<ShipError>().is_some());

        let e = AdoptError::Targets {
            policy: "default".into(),
            source: ShipError::NoTargets {
                policy: "default".into(),
            },
        };
        assert_eq!(e.kind(), "config");
        assert!(!e.is_transient());
        let e = AdoptError::Ship(ShipError::NotSealed {
            path: "/j/1.seg".into(),
        });
        assert_eq!(e.kind(), "ship");
        assert!(!e.is_transient());
        assert!(!AdoptError::NoTargets { policy: "p".into() }.is_transient());
    }

    #[test]
    fn every_kind_is_exported() {
        let kinds = [
            AdoptError::NoTargets { policy: "p".into() }.kind(),
            AdoptError::TargetFailing(vec![]).kind(),
            AdoptError::InvalidVm(cdp_core::names::NameError::Uuid("x".into())).kind(),
            AdoptError::BootId {
                path: "/b".into(),
                source: std::io::Error::other("x"),
            }
            .kind(),
            AdoptError::Ship(ShipError::NotSealed { path: "/s".into() }).kind(),
        ];
        for k in kinds {
            assert!(crate::metrics::ERROR_KINDS.contains(&k), "{k}");
        }
    }
}
