//! cdp-agent: the host-wide service (docs/DESIGN.md, "Processes").
//!
//! - **Adoption** ([`adopt`]): ships the journals nobody ships, those of VMs
//!   that stopped or whose shipper died. Several VMs at once, as many as
//!   the host's backlog calls for ([`adopt::plan_scan`]), each under the VM's
//!   shipper lock (`<state>/vms/<uuid>/shipper.lock`, see
//!   [`cdp_shipper::lock`]), never waiting for it: a VM whose own shipper
//!   runs is left alone. A journal a killed cdpd left open is sealed first,
//!   exactly as the next cdpd start would (its images locked meanwhile).
//!   The agent looks every `[agent] scan_interval`, and at once when told
//!   (`adopt <uuid>` datagrams on `<run-dir>/agent.sock`,
//!   [`cdp_core::notify::notify_agent`]).
//! - **Retention** every `[agent] retention_interval`, per VM and target of
//!   its policy ([`Agent::retention_pass`], `cdp_repo::retention::apply`).
//! - **Metrics** ([`metrics`]) on `[agent] metrics_listen`.
//! - **Status page** ([`page`]) on the same listener: `GET /`.
//! - **systemd** ([`sdnotify`]): Type=notify (READY=1 once the catalog is
//!   open and the sockets listen), WATCHDOG=1, STATUS=…, STOPPING=1.

/// A log line on stderr, `cdp-agent: ...`, prefixed with the UTC time
/// unless stderr is the journal's (systemd sets `JOURNAL_STREAM` then, and
/// the journal stamps each line itself): run by hand, every line says when.
macro_rules! say {
    ($($t:tt)*) => {
        $crate::log_line(&format!($($t)*))
    };
}

/// [`say!`]'s line.
pub fn log_line(msg: &str) {
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        eprintln!("cdp-agent: {msg}");
    } else {
        // RFC 3339 to the millisecond: 2026-11-27T23:20:38.123Z
        let now = cdp_core::time::fmt_ns(cdp_core::time::now_ns());
        eprintln!("{}Z cdp-agent: {msg}", &now[..now.len().min(23)]);
    }
}

pub mod adopt;
pub mod child;
pub mod definition_watch;
pub mod error;
pub mod metrics;
pub mod page;
pub mod sdnotify;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cdp_core::config::Config;
use cdp_core::layout::StateDir;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;

pub use adopt::{Adoption, Dirs, TargetDown};
pub use error::{AdoptError, AgentError};
use metrics::Counters;
use sdnotify::Notifier;

/// What `cdp-agent run` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub config: Config,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    /// One scan (and retention pass), then exit.
    pub once: bool,
    pub boot_id_file: PathBuf,
    /// The config file given on the command line (passed on to children).
    pub config_path: Option<PathBuf>,
    /// This program: each VM is adopted by `<exe> adopt-vm <uuid>` running
    /// as the VM's user ([`child`]).
    pub exe: PathBuf,
}

/// A VM that could not be adopted in a scan.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VmFailure {
    pub vm_uuid: String,
    pub vm: String,
    pub kind: &'static str,
    pub message: String,
    /// Trying again soon may succeed ([`AdoptError::is_transient`]).
    pub transient: bool,
}

/// What one scan did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ScanReport {
    pub vms: usize,
    /// VMs it did something for (recovery, shipping, baselines).
    pub adopted: Vec<Adoption>,
    /// VMs whose own shipper holds the lock.
    pub busy: Vec<String>,
    pub failed: Vec<VmFailure>,
    /// VMs adopted for some targets of their policy while others failed:
    /// not failed adoptions; the failing targets are retried.
    pub targets_down: Vec<VmTargetsDown>,
    /// Retention applied (`--once` only).
    pub retention: Vec<RetentionRun>,
}

/// A VM whose adoption is done for some targets while these are down.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VmTargetsDown {
    pub vm_uuid: String,
    pub vm: String,
    pub targets: Vec<TargetDown>,
}

/// What the last scan learnt of a VM (from its child's report): retention
/// needs its name and policy.
#[derive(Debug, Clone)]
struct KnownVm {
    name: String,
    policy: Option<String>,
}

pub struct Agent {
    opts: Options,
    config: Config,
    known: std::collections::BTreeMap<String, KnownVm>,
    counters: Arc<Counters>,
    stop: watch::Receiver<bool>,
    /// The last error printed per VM (each is printed when it changes).
    last_error: HashMap<String, String>,
}

impl Agent {
    pub fn new(opts: &Options, stop: watch::Receiver<bool>) -> Result<Agent, AgentError> {
        Ok(Agent {
            opts: opts.clone(),
            config: opts.config.clone(),
            known: Default::default(),
            counters: Arc::new(Counters::default()),
            stop,
            last_error: HashMap::new(),
        })
    }

    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// The VMs with a catalog on this host (a listing: nothing of theirs
    /// is opened here).
    fn vms(&self) -> std::io::Result<Vec<String>> {
        StateDir::new(&self.opts.state_dir).vms_with_catalog()
    }

    /// Adopt every VM that needs it (or only `only`), several at once.
    pub async fn scan(&mut self, only: Option<&str>) -> ScanReport {
        let mut report = ScanReport::default();
        let vms = match self.vms() {
            Ok(v) => v,
            Err(e) => {
                self.counters.error("catalog");
                self.log_error("catalog", &e.to_string());
                report.failed.push(VmFailure {
                    vm_uuid: String::new(),
                    vm: String::new(),
                    kind: "catalog",
                    message: e.to_string(),
                    transient: false,
                });
                return report;
            }
        };
        self.last_error.remove("catalog");
        let vms: Vec<String> = vms
            .into_iter()
            .filter(|u| only.is_none_or(|o| o == u))
            .collect();
        // Several lagging VMs at once, sized to the host's backlog, the
        // most behind first (docs/DESIGN.md, "Plans").
        let plan = self.scan_plan(vms).await;
        let (opts, stop) = (&self.opts, &self.stop);
        let results: Vec<(String, child::ChildReport)> = futures::stream::iter(plan.vms)
            .map(|uuid| async move {
                if *stop.borrow() {
                    return None;
                }
                let mut stop = stop.clone();
                let r = child::adopt_in_child(opts, &uuid, &mut stop).await;
                Some((uuid, r))
            })
            .buffer_unordered(plan.parallel)
            .filter_map(|r| async move { r })
            .collect()
            .await;
        for (uuid, r) in results {
            report.vms += 1;
            if !r.vm.is_empty() {
                let known = KnownVm {
                    name: r.vm.clone(),
                    policy: r.policy.clone(),
                };
                self.known.insert(uuid.clone(), known);
            }
            if let Some(f) = r.vm_failure() {
                self.counters.error(f.kind);
                let msg = format!("VM {} ({}): {}", f.vm, f.vm_uuid, f.message);
                self.log_error(&uuid, &msg);
                report.failed.push(f);
                continue;
            }
            let Some(a) = r.adoption else { continue };
            if a.busy {
                report.busy.push(uuid.clone());
                continue;
            }
            self.counters
                .set_targets_down(&uuid, &r.vm, &a.targets_down);
            if a.targets_down.is_empty() {
                if self.last_error.remove(&uuid).is_some() {
                    say!("VM {} ({uuid}): working again", r.vm);
                }
            } else {
                self.counters.error("target");
                let msg = format!("VM {} ({uuid}): {}", r.vm, describe_down(&a.targets_down));
                self.log_error(&uuid, &msg);
                report.targets_down.push(VmTargetsDown {
                    vm_uuid: uuid.clone(),
                    vm: r.vm.clone(),
                    targets: a.targets_down.clone(),
                });
            }
            if a.did_work() {
                self.counters.adoption();
                say!("VM {} ({uuid}): {}", r.vm, describe(&a));
                report.adopted.push(a);
            }
        }
        report
    }

    /// The order and width of a scan of `vms` ([`adopt::plan_scan`]): each
    /// VM's backlog is read by a child with its identity, as the metrics
    /// read it; one VM (a notification) is adopted at once without asking.
    async fn scan_plan(&self, vms: Vec<String>) -> adopt::ScanPlan {
        if vms.len() <= 1 {
            return adopt::ScanPlan { vms, parallel: 1 };
        }
        let src = metrics::Source {
            state_dir: self.opts.state_dir.clone(),
            config: self.config.clone(),
            run_dir: self.opts.run_dir.clone(),
            counters: self.counters.clone(),
        };
        let listed = vms.clone();
        let backlogs = tokio::task::spawn_blocking(move || {
            listed
                .into_iter()
                .map(|u| {
                    let snap = metrics::VmSnapshot::read_as_owner(&src, &u);
                    let b = snap.ok().flatten().map(|s| adopt::vm_backlog(&s));
                    (u, b)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_else(|_| vms.into_iter().map(|u| (u, None)).collect());
        adopt::plan_scan(backlogs, cdp_shipper::plan::MAX_ADOPTIONS)
    }

    /// Print an error once per change (a dead target is not a log line per scan).
    fn log_error(&mut self, key: &str, msg: &str) {
        if self.last_error.get(key).map(String::as_str) != Some(msg) {
            say!("{msg}");
            self.last_error.insert(key.to_string(), msg.to_string());
        }
    }

    /// Retention: every VM, every target of its policy, when the policy has
    /// a `[policy.P.retention]` (`cdp_repo::retention::apply`, as `cdpctl
    /// prune` runs it). Crash-safe at every step, so SIGTERM abandons it.
    pub async fn retention_pass(&mut self) -> Vec<RetentionRun> {
        let mut runs = Vec::new();
        // The VMs the last scan heard of: their catalogs are read only by
        // children with the VM's identity.
        let vms: Vec<(String, KnownVm)> = self.known.clone().into_iter().collect();
        for (uuid, vm) in vms {
            let policy = vm.policy.as_deref().unwrap_or("default");
            let retention = match self.config.retention(policy) {
                Ok(Some(r)) => r,
                Ok(None) => continue, // keep everything
                Err(e) => {
                    self.counters.error("config");
                    self.log_error(&format!("retention {}", uuid), &e.to_string());
                    continue;
                }
            };
            let targets = self
                .config
                .policy
                .get(policy)
                .map_or(Vec::new(), |p| p.targets.clone());
            for t in targets {
                if *self.stop.borrow() {
                    return runs;
                }
                let Some(tc) = self.config.target.get(&t).cloned() else {
                    continue;
                };
                let key = format!("retention {} {t}", uuid);
                let mut stop = self.stop.clone();
                if let Some(w) = cdp_repo::store::shared_credential_warning(&t, &tc) {
                    self.log_error(&format!("shared credential {t}"), &w);
                }
                let r = match cdp_repo::store::Store::for_prune(&tc) {
                    Ok(store) => tokio::select! {
                        r = cdp_repo::retention::apply(
                            &store, &uuid, &retention, cdp_core::time::now_ns(), false,
                        ) => r.map_err(|e| e.to_string()),
                        _ = stop.changed() => return runs,
                    },
                    Err(e) => Err(e.to_string()),
                };
                match r {
                    Ok(report) => {
                        self.last_error.remove(&key);
                        let deleted = report.segments_deleted
                            + report.baselines_deleted
                            + report.chunks_deleted
                            + report.other_deleted;
                        if deleted > 0 || report.synthetic_baselines > 0 {
                            say!(
                                "VM {} ({}) target {t}: retention kept {} point(s) before the window, wrote {} exact baseline(s), deleted {} segment(s), {} baseline(s), {} chunk(s), {} other object(s): {} byte(s) freed{}",
                                vm.name,
                                uuid,
                                report.kept_points,
                                report.synthetic_baselines,
                                report.segments_deleted,
                                report.baselines_deleted,
                                report.chunks_deleted,
                                report.other_deleted,
                                report.bytes_freed,
                                if report.deferred_by_lease { "; deletions deferred by a lease" } else { "" }
                            );
                        }
                        runs.push(RetentionRun {
                            vm_uuid: uuid.clone(),
                            target: t.clone(),
                            report: Some(report),
                            error: None,
                        });
                    }
                    Err(msg) => {
                        self.counters.error("retention");
                        self.log_error(
                            &key,
                            &format!("VM {} ({}) target {t}: retention: {msg}", vm.name, uuid),
                        );
                        runs.push(RetentionRun {
                            vm_uuid: uuid.clone(),
                            target: t.clone(),
                            report: None,
                            error: Some(msg),
                        });
                    }
                }
            }
        }
        runs
    }
}

/// One application of retention to one VM in one target.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RetentionRun {
    pub vm_uuid: String,
    pub target: String,
    pub report: Option<cdp_repo::retention::Report>,
    pub error: Option<String>,
}

/// One line about an adoption, for the log.
fn describe(a: &Adoption) -> String {
    let mut parts = Vec::new();
    if let Some(r) = &a.recovered {
        parts.push(format!(
            "sealed the journal its cdpd left open ({} segment(s), {} record(s) redone, {} torn byte(s) cut; session ended: {})",
            r.sealed_segments, r.redone_records, r.torn_bytes, r.previous_end
        ));
    }
    if a.shipped_segments > 0 {
        parts.push(format!(
            "shipped {} segment(s), {} byte(s)",
            a.shipped_segments, a.shipped_bytes
        ));
    }
    if a.baselines > 0 {
        parts.push(format!("took {} baseline(s)", a.baselines));
    }
    if a.waiting > 0 {
        parts.push(format!(
            "{} segment(s) wait for a delayed target",
            a.waiting
        ));
    }
    if !a.targets_down.is_empty() {
        parts.push(describe_down(&a.targets_down));
    }
    parts.join("; ")
}

/// "target offsite down: will retry (…)", for the log.
fn describe_down(down: &[TargetDown]) -> String {
    let v: Vec<String> = down
        .iter()
        .map(|t| {
            let when = if t.transient {
                "will retry"
            } else {
                "will retry at the next scans (needs an operator?)"
            };
            format!("target {} down: {when} ({})", t.target, t.error)
        })
        .collect();
    format!("adopted for the other targets; {}", v.join("; "))
}

/// `cdp-agent run --once`: one scan and one retention pass.
pub async fn run_once(opts: &Options) -> Result<ScanReport, AgentError> {
    let (_tx, rx) = watch::channel(false);
    let mut agent = Agent::new(opts, rx)?;
    let mut report = agent.scan(None).await;
    report.retention = agent.retention_pass().await;
    for r in &report.retention {
        if let Some(e) = &r.error {
            report.failed.push(VmFailure {
                vm_uuid: r.vm_uuid.clone(),
                vm: String::new(),
                kind: "retention",
                message: format!("target {}: {e}", r.target),
                transient: false,
            });
        }
    }
    Ok(report)
}

/// Bind `<run-dir>/agent.sock` (mode 0600), replacing a stale one, never a live one.
pub fn bind_agent_socket(run_dir: &Path) -> Result<tokio::net::UnixDatagram, AgentError> {
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| AgentError::Io { what, path, source }
    };
    std::fs::create_dir_all(run_dir).map_err(io("creating", run_dir))?;
    let path = cdp_core::notify::agent_socket(run_dir);
    if std::fs::symlink_metadata(&path).is_ok() {
        let probe = std::os::unix::net::UnixDatagram::unbound().map_err(io("probing", &path))?;
        if probe.connect(&path).is_ok() {
            return Err(AgentError::AlreadyRunning(path));
        }
        std::fs::remove_file(&path).map_err(io("removing stale socket", &path))?;
    }
    let s = std::os::unix::net::UnixDatagram::bind(&path).map_err(io("binding", &path))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(io("setting permissions of", &path))?;
    s.set_nonblocking(true).map_err(io("configuring", &path))?;
    tokio::net::UnixDatagram::from_std(s).map_err(io("registering", &path))
}

/// How often to retry a notified VM whose lock is held (its shipper is
/// draining) or whose adoption failed in a way that may pass, and how many
/// times.
const NOTIFIED_RETRY: Duration = Duration::from_secs(1);
const NOTIFIED_TRIES: u32 = 60;

/// Should a notified VM be tried again soon after this scan of it? While
/// its own shipper holds the lock, or when its adoption failed only in ways
/// that may pass by themselves (a target unreachable for a moment); a
/// permanent failure waits for the next regular scan.
pub fn retry_notified(r: &ScanReport) -> bool {
    !r.busy.is_empty()
        || (!r.failed.is_empty() && r.failed.iter().all(|f| f.transient))
        || r.targets_down
            .iter()
            .any(|v| v.targets.iter().any(|t| t.transient))
}

/// Tell systemd `state`, when started by it.
fn say(n: &Option<Arc<Notifier>>, state: &str) {
    if let Some(n) = n {
        let _ = n.notify(state);
    }
}

/// A receiver that turns true on SIGTERM or SIGINT (systemd is told
/// STOPPING=1 at once).
/// A watch that turns true on SIGTERM or SIGINT (an adoption's child).
pub fn stop_on_sigterm() -> Result<watch::Receiver<bool>, AgentError> {
    stop_on_signals(None)
}

fn stop_on_signals(notifier: Option<Arc<Notifier>>) -> Result<watch::Receiver<bool>, AgentError> {
    use tokio::signal::unix::{signal, SignalKind};
    let sig_err = |source| AgentError::Io {
        what: "installing signal handlers",
        path: PathBuf::from("-"),
        source,
    };
    let mut term = signal(SignalKind::terminate()).map_err(sig_err)?;
    let mut int = signal(SignalKind::interrupt()).map_err(sig_err)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        say(&notifier, "STOPPING=1\nSTATUS=stopping");
        let _ = stop_tx.send(true);
    });
    Ok(stop_rx)
}

/// Serve the metrics on `[agent] metrics_listen` (none when it is "").
async fn start_metrics(
    opts: &Options,
    agent: &Agent,
) -> Result<Option<tokio::task::JoinHandle<()>>, AgentError> {
    let Some(addr) = opts.config.metrics_listen() else {
        return Ok(None);
    };
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::MetricsListen { addr, source })?;
    let src = Arc::new(metrics::Source {
        state_dir: opts.state_dir.clone(),
        config: opts.config.clone(),
        run_dir: opts.run_dir.clone(),
        counters: agent.counters(),
    });
    // The status page and the timelines share the listener (docs/AGENT.md).
    let page = Arc::new(page::Page::new(src.clone(), opts.config.scan_interval()));
    Ok(Some(tokio::spawn(page::serve(l, src, page))))
}

/// Ping systemd's watchdog, when it watches us.
fn start_watchdog(notifier: &Option<Arc<Notifier>>) -> Option<tokio::task::JoinHandle<()>> {
    let (n, every) = (notifier.clone()?, sdnotify::watchdog_interval()?);
    Some(tokio::spawn(async move {
        loop {
            let _ = n.notify("WATCHDOG=1");
            tokio::time::sleep(every).await;
        }
    }))
}

/// `cdp-agent run`: until SIGTERM or SIGINT.
pub async fn run(opts: &Options) -> Result<(), AgentError> {
    let notifier = Notifier::from_env().map(Arc::new);
    let stop = stop_on_signals(notifier.clone())?;
    let mut agent = Agent::new(opts, stop.clone())?;
    let metrics_task = start_metrics(opts, &agent).await?;
    let sock = bind_agent_socket(&opts.run_dir)?;
    let metrics_on = opts
        .config
        .metrics_listen()
        .map_or("nothing".to_string(), |a| a.to_string());
    say(
        &notifier,
        &format!(
            "READY=1\nSTATUS=watching {}; metrics on {metrics_on}",
            opts.state_dir.display(),
        ),
    );
    say!(
        "watching {} (scan every {:?}, retention every {:?}), notifications on {}, metrics on {metrics_on}",
        opts.state_dir.display(),
        opts.config.scan_interval(),
        opts.config.retention_interval(),
        cdp_core::notify::agent_socket(&opts.run_dir).display(),
    );
    let watchdog = start_watchdog(&notifier);
    agent.serve(&sock, &notifier, stop).await;
    say(&notifier, "STOPPING=1\nSTATUS=stopping");
    for t in [watchdog, metrics_task].into_iter().flatten() {
        t.abort();
    }
    let _ = std::fs::remove_file(cdp_core::notify::agent_socket(&opts.run_dir));
    say!("stopped");
    Ok(())
}

impl Agent {
    /// Scan every `scan_interval`, apply retention every
    /// `retention_interval`, and adopt a VM at once when `sock` names it,
    /// until `stop`.
    async fn serve(
        &mut self,
        sock: &tokio::net::UnixDatagram,
        notifier: &Option<Arc<Notifier>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let scan_every = self.config.scan_interval();
        let retention_every = self.config.retention_interval();
        let mut next_scan = Instant::now();
        let mut next_retention = Instant::now();
        let mut notified: HashMap<String, u32> = HashMap::new();
        let mut buf = [0u8; 256];
        while !*stop.borrow() {
            if Instant::now() >= next_scan {
                let r = self.scan(None).await;
                let w = self.watch_definitions().await;
                next_scan = Instant::now() + scan_every;
                say(notifier, &format!("STATUS={}{}", summary(&r), w.status()));
                for a in &r.adopted {
                    notified.remove(&a.vm_uuid);
                }
            }
            let uuids: Vec<String> = notified.keys().cloned().collect();
            for u in uuids {
                let r = self.scan(Some(&u)).await;
                let tries = notified.get_mut(&u).expect("present");
                *tries += 1;
                if !retry_notified(&r) || *tries >= NOTIFIED_TRIES {
                    notified.remove(&u);
                }
            }
            if Instant::now() >= next_retention {
                self.retention_pass().await;
                next_retention = Instant::now() + retention_every;
            }
            let mut wake = next_scan.min(next_retention);
            if !notified.is_empty() {
                wake = wake.min(Instant::now() + NOTIFIED_RETRY);
            }
            tokio::select! {
                _ = stop.changed() => {}
                r = sock.recv(&mut buf) => match r {
                    Ok(n) => match cdp_core::notify::parse_message(&buf[..n]) {
                        Some(u) => { notified.insert(u.to_string(), 0); }
                        None => self.counters.error("notify"),
                    },
                    Err(_) => self.counters.error("notify"),
                },
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }
}

fn summary(r: &ScanReport) -> String {
    format!(
        "{} VM(s) looked at; {} adopted, {} shipped by their own shipper, {} failing, {} with a target down",
        r.vms,
        r.adopted.len(),
        r.busy.len(),
        r.failed.len(),
        r.targets_down.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use adopt::Recovered;

    fn failure(transient: bool) -> VmFailure {
        VmFailure {
            vm_uuid: "u".into(),
            vm: "web".into(),
            kind: "target",
            message: "target(s) failing".into(),
            transient,
        }
    }

    #[test]
    fn a_notified_vm_is_retried_while_busy_or_failing_transiently() {
        let mut r = ScanReport::default();
        assert!(!retry_notified(&r), "adopted or nothing to do: done");
        r.busy.push("u".into());
        assert!(retry_notified(&r));
        let mut r = ScanReport::default();
        r.failed.push(failure(true));
        assert!(retry_notified(&r));
        r.failed.push(failure(false));
        assert!(
            !retry_notified(&r),
            "a permanent failure waits for the scan"
        );
    }

    #[test]
    fn the_status_line_counts_each_outcome() {
        let r = ScanReport {
            vms: 4,
            adopted: vec![Adoption::default()],
            busy: vec!["a".into(), "b".into()],
            failed: vec![failure(true)],
            targets_down: vec![],
            retention: vec![],
        };
        assert_eq!(
            summary(&r),
            "4 VM(s) looked at; 1 adopted, 2 shipped by their own shipper, 1 failing, 0 with a target down"
        );
    }

    #[test]
    fn a_target_down_is_retried_and_described_by_name() {
        let down = |transient| TargetDown {
            target: "offsite".into(),
            error: "connection refused".into(),
            transient,
        };
        let mut r = ScanReport::default();
        r.targets_down.push(VmTargetsDown {
            vm_uuid: "u".into(),
            vm: "web".into(),
            targets: vec![down(true)],
        });
        assert!(retry_notified(&r), "an unreachable target is retried soon");
        r.targets_down[0].targets = vec![down(false)];
        assert!(
            !retry_notified(&r),
            "a permanent failure waits for the scan"
        );
        let a = Adoption {
            shipped_segments: 1,
            shipped_bytes: 10,
            targets_down: vec![down(true)],
            ..Default::default()
        };
        assert_eq!(
            describe(&a),
            "shipped 1 segment(s), 10 byte(s); adopted for the other targets; \
             target offsite down: will retry (connection refused)"
        );
    }

    #[test]
    fn an_adoption_is_described_by_what_it_did() {
        let a = Adoption {
            vm_uuid: "u".into(),
            recovered: Some(Recovered {
                previous_end: "crash".into(),
                sealed_segments: 2,
                redone_records: 3,
                torn_bytes: 512,
            }),
            shipped_segments: 5,
            shipped_bytes: 4096,
            baselines: 1,
            waiting: 2,
            ..Default::default()
        };
        assert_eq!(
            describe(&a),
            "sealed the journal its cdpd left open (2 segment(s), 3 record(s) redone, 512 torn byte(s) cut; session ended: crash); \
             shipped 5 segment(s), 4096 byte(s); took 1 baseline(s); 2 segment(s) wait for a delayed target"
        );
        assert_eq!(describe(&Adoption::default()), "");
    }

    #[tokio::test]
    async fn a_live_agent_socket_is_never_replaced_a_stale_one_is() {
        let dir = tempfile::tempdir().unwrap();
        let s = bind_agent_socket(dir.path()).unwrap();
        match bind_agent_socket(dir.path()) {
            Err(AgentError::AlreadyRunning(p)) => {
                assert_eq!(p, cdp_core::notify::agent_socket(dir.path()))
            }
            other => panic!("expected AlreadyRunning, got {other:?}"),
        }
        drop(s);
        // The file stays behind; nobody listens on it any more.
        assert!(cdp_core::notify::agent_socket(dir.path()).exists());
        let s = bind_agent_socket(dir.path()).unwrap();
        let tx = std::os::unix::net::UnixDatagram::unbound().unwrap();
        tx.send_to(b"x", cdp_core::notify::agent_socket(dir.path()))
            .unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(s.recv(&mut buf).await.unwrap(), 1);
    }
}
