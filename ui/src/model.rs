//! The data the views draw: a VM's timeline and the host's status. Plain
//! serde types filled by `cdp-agent` (from the VM's catalog and cdpd) and by
//! `cdpctl points --svg` (from a repository). Every string in here may come
//! from a VM-writable catalog (VM names, mark labels, GAP reasons): the
//! renderers escape all of them.

use serde::{Deserialize, Serialize};

/// One VM's history, one lane per disk, plus the RPO per target over the
/// last hours (sampled by the agent; empty from `cdpctl points`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    pub vm_name: String,
    pub vm_uuid: String,
    /// "Now" for the drawing: the right end of the lanes (ns since the epoch).
    pub now_ns: u64,
    pub disks: Vec<DiskTimeline>,
    pub rpo: Vec<RpoSeries>,
}

/// One disk's lane.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskTimeline {
    pub disk: String,
    /// Times (ns) any point of which can be restored.
    pub restorable: Vec<Span>,
    pub baselines: Vec<Baseline>,
    pub marks: Vec<Mark>,
    pub gaps: Vec<Gap>,
    /// Windows whose points cannot be restored: the journal was full
    /// (degraded mode) or writes were not journaled yet.
    pub degraded: Vec<Window>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Span {
    pub from_ns: u64,
    pub to_ns: u64,
}

/// A baseline: an image the journal replays onto, consistent from `seq`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    pub time_ns: u64,
    pub seq: u64,
}

/// A named point (`cdpctl mark`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Mark {
    pub time_ns: u64,
    pub seq: u64,
    pub label: String,
    /// Taken with the guest's file systems frozen (always false for now:
    /// marks do not quiesce the guest yet).
    pub quiesced: bool,
}

/// A hole in the history (VM stopped unprotected, journal lost, ...).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Gap {
    pub time_ns: u64,
    pub seq: u64,
    pub reason: String,
}

/// A window of time with no restorable point; `to_ns` None: still open.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub from_ns: u64,
    pub to_ns: Option<u64>,
    pub reason: String,
}

/// A target's RPO over time: (time ns, seconds behind).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RpoSeries {
    pub target: String,
    pub samples: Vec<(u64, f64)>,
}

/// What the status page shows of a host.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostStatus {
    pub host: String,
    pub generated_ns: u64,
    /// Seconds between automatic reloads of the page (0: none).
    pub refresh_s: u32,
    pub targets: Vec<TargetStatus>,
    pub vms: Vec<VmStatus>,
}

/// A target's health as its shippers last saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// The last use worked.
    #[default]
    Up,
    /// The last use failed; retried.
    Failing,
    /// Nobody could use it (or it was never reached).
    Down,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Up => "up",
            Health::Failing => "failing",
            Health::Down => "down",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TargetStatus {
    pub name: String,
    pub url: String,
    pub health: Health,
    /// What the failing use said.
    pub error: Option<String>,
}

/// One protected VM, running or not.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    pub name: String,
    pub uuid: String,
    pub running: bool,
    pub disks: Vec<DiskStatus>,
    pub targets: Vec<VmTarget>,
    /// The VM's timeline (None: could not be read; see `error`).
    pub timeline: Option<Timeline>,
    /// Why something of this VM could not be read.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskStatus {
    pub disk: String,
    pub rpo_s: f64,
    pub degraded: bool,
    /// An image write failed after the guest was told it succeeded: every
    /// request fails with EIO until cdpd restarts (docs/RELIABILITY.md,
    /// "A failed image write").
    #[serde(default)]
    pub image_failed: bool,
    pub backlog: Vec<Backlog>,
}

/// What one target lacks of one disk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Backlog {
    pub target: String,
    pub segments: u64,
    pub bytes: u64,
}

/// One target as one VM uses it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmTarget {
    pub target: String,
    pub health: Health,
    /// Newest point this target holds (ns), if any.
    pub newest_shipped_ns: Option<u64>,
    pub rpo_s: f64,
    pub backlog_bytes: u64,
}
