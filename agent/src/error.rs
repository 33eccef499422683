//! Errors of the agent, one type per layer.

use std::path::PathBuf;

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
    #[error("opening the targets of policy {policy:?}: {message}")]
    Targets { policy: String, message: String },
    #[error("target(s) failing: {0}")]
    TargetFailing(String),
    #[error("shipping: {0}")]
    Ship(String),
}

impl AdoptError {
    /// The `kind` label of `cdp_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            AdoptError::Lock(_) => "lock",
            AdoptError::Catalog(_) => "catalog",
            AdoptError::Image(_) | AdoptError::Recovery(_) | AdoptError::BootId { .. } => {
                "recovery"
            }
            AdoptError::NoTargets { .. } => "config",
            AdoptError::Targets { .. } | AdoptError::TargetFailing(_) => "target",
            AdoptError::Ship(_) => "ship",
        }
    }
}
