//! Prometheus metrics (text exposition format 0.0.4) on `GET /metrics`.
//!
//! Everything host-wide comes from the catalog and the cdpd control sockets
//! at scrape time (a fresh registry per scrape, so VMs and targets that went
//! away disappear); the agent's own counters (errors, adoptions) live in
//! [`Counters`]. Nothing is logged per request.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use cdp_core::catalog::{Catalog, CatalogError, VmRow};
use cdp_core::config::Config;
use cdp_core::layout::StateDir;
use cdp_core::privsep::{PrivsepError, VmIdentity};
use cdp_core::time::now_ns;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use prometheus::{Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use thiserror::Error;

use crate::adopt::{cdpd_answers, targets_of};

/// Kinds of `cdp_errors_total`, always exported (0 until they happen).
pub const ERROR_KINDS: &[&str] = &[
    "catalog",
    "config",
    "lock",
    "notify",
    "recovery",
    "retention",
    "ship",
    "target",
];

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Privsep(#[from] PrivsepError),
    #[error("listing the VMs: {0}")]
    List(#[from] std::io::Error),
    #[error("encoding metrics: {0}")]
    Prometheus(#[from] prometheus::Error),
}

/// The agent's own counters.
#[derive(Debug, Default)]
pub struct Counters {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    errors: BTreeMap<&'static str, u64>,
    adoptions: u64,
    /// VM uuid → (VM name, targets its last adoption found down).
    targets_down: BTreeMap<String, (String, Vec<String>)>,
}

impl Counters {
    pub fn error(&self, kind: &'static str) {
        *self.inner.lock().unwrap().errors.entry(kind).or_default() += 1;
    }

    pub fn adoption(&self) {
        self.inner.lock().unwrap().adoptions += 1;
    }

    /// The targets the last adoption of `uuid` found down (empty: none).
    pub fn set_targets_down(&self, uuid: &str, vm: &str, down: &[crate::TargetDown]) {
        let mut inner = self.inner.lock().unwrap();
        if down.is_empty() {
            inner.targets_down.remove(uuid);
        } else {
            let names = down.iter().map(|t| t.target.clone()).collect();
            inner
                .targets_down
                .insert(uuid.to_string(), (vm.to_string(), names));
        }
    }

    pub fn errors(&self, kind: &str) -> u64 {
        self.inner
            .lock()
            .unwrap()
            .errors
            .get(kind)
            .copied()
            .unwrap_or(0)
    }
}

/// What a scrape reads.
pub struct Source {
    /// Each VM's catalog is read by a child with the VM's identity
    /// (`cdp_core::privsep`), never by the agent itself.
    pub state_dir: PathBuf,
    pub config: Config,
    pub run_dir: PathBuf,
    pub counters: Arc<Counters>,
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<GaugeVec, MetricsError> {
    let g = GaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn int_gauge(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntGaugeVec, MetricsError> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn counter(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, MetricsError> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

/// The metric families of one scrape, registered in a fresh registry.
struct Families {
    registry: Registry,
    rpo: GaugeVec,
    running: IntGaugeVec,
    backlog_bytes: IntGaugeVec,
    backlog_segments: IntGaugeVec,
    shipped: IntCounterVec,
    target_up: IntGaugeVec,
    vm_target_up: IntGaugeVec,
    errors: IntCounterVec,
    adoptions: prometheus::IntCounter,
    adoption_target_down: IntGaugeVec,
    degraded: IntGaugeVec,
    image_failed: IntGaugeVec,
    dirty_bytes: IntGaugeVec,
    resync_bytes_read: IntCounterVec,
    checkpoints: IntCounterVec,
    uploads_in_flight: IntGaugeVec,
}

impl Families {
    fn new() -> Result<Families, MetricsError> {
        let r = Registry::new();
        let disk_target = &["vm", "vm_uuid", "disk", "target"];
        let f = Families {
            rpo: gauge(
                &r,
                "cdp_rpo_seconds",
                "Age of the oldest write no target has yet (running VMs: as cdpd reports it; stopped: oldest unshipped record), 0 when all is shipped",
                &["vm", "vm_uuid", "disk"],
            )?,
            running: int_gauge(
                &r,
                "cdp_vm_running",
                "1 while the VM's cdpd answers on its control socket",
                &["vm", "vm_uuid"],
            )?,
            backlog_bytes: int_gauge(
                &r,
                "cdp_backlog_bytes",
                "Bytes of sealed journal segments a target does not have yet",
                disk_target,
            )?,
            backlog_segments: int_gauge(
                &r,
                "cdp_backlog_segments",
                "Sealed journal segments a target does not have yet",
                disk_target,
            )?,
            shipped: counter(
                &r,
                "cdp_shipped_bytes_total",
                "Bytes of journal segment objects a target received (as the catalog records them)",
                &["vm", "vm_uuid", "target"],
            )?,
            target_up: int_gauge(
                &r,
                "cdp_target_up",
                "1 when the target worked the last time a shipper used it, 0 when it was failing",
                &["target"],
            )?,
            vm_target_up: int_gauge(
                &r,
                "cdp_vm_target_up",
                "1 when the VM's shipper last shipped to the target, 0 while it is failing there (a repository its QEMU user cannot write, a target down), as the shipper recorded it in the VM's catalog",
                &["vm", "vm_uuid", "target"],
            )?,
            errors: counter(
                &r,
                "cdp_errors_total",
                "Errors the agent met, by kind",
                &["kind"],
            )?,
            adoptions: prometheus::IntCounter::new(
                "cdp_agent_adoptions_total",
                "Adoptions that recovered or shipped something",
            )?,
            adoption_target_down: int_gauge(
                &r,
                "cdp_agent_adoption_target_down",
                "1 for each target the VM's last adoption found down while the others shipped (retried in the background)",
                &["vm", "vm_uuid", "target"],
            )?,
            degraded: int_gauge(
                &r,
                "cdp_disk_degraded",
                "1 while the disk's journal is full (degraded mode: writes reach the image and the dirty map, not the journal; points from then on cannot be restored until the resync ends), as its running cdpd reports it",
                &["vm", "vm_uuid", "disk"],
            )?,
            dirty_bytes: int_gauge(
                &r,
                "cdp_disk_dirty_bytes",
                "Bytes of disk written but not journaled yet (marked in the dirty map: degraded, or left to resync)",
                &["vm", "vm_uuid", "disk"],
            )?,
            image_failed: int_gauge(
                &r,
                "cdp_disk_image_failed",
                "1 once an image write failed after the guest was told it succeeded: every request on the disk fails with EIO until cdpd restarts (docs/RELIABILITY.md, \"A failed image write\")",
                &["vm", "vm_uuid", "disk"],
            )?,
            resync_bytes_read: counter(
                &r,
                "cdp_disk_resync_bytes_read_total",
                "Bytes the resyncs read from the image since cdpd started (only the dirty ranges)",
                &["vm", "vm_uuid", "disk"],
            )?,
            checkpoints: counter(
                &r,
                "cdp_disk_checkpoints_total",
                "Checkpoints since cdpd started: syncs that made the image durable (a FLUSH makes the journal durable; shipped segments are trimmed once a checkpoint covers them; docs/DESIGN.md, \"Write path\")",
                &["vm", "vm_uuid", "disk"],
            )?,
            uploads_in_flight: int_gauge(
                &r,
                "cdp_uploads_in_flight",
                "Segment uploads in flight from the VM's shipper (or the agent's adoption of it) to the target now, as the shipper records them in the VM's catalog; sized to the backlog's segments and bytes (docs/DESIGN.md, \"Plans\")",
                &["vm", "vm_uuid", "target"],
            )?,
            registry: r,
        };
        f.registry.register(Box::new(f.adoptions.clone()))?;
        Ok(f)
    }

    /// The agent's own counters; every error kind, 0 until it happens.
    fn counters(&self, c: &Counters) {
        let inner = c.inner.lock().unwrap();
        for k in ERROR_KINDS {
            self.errors.with_label_values(&[k]).inc_by(0);
        }
        for (k, n) in &inner.errors {
            self.errors.with_label_values(&[k]).inc_by(*n);
        }
        self.adoptions.inc_by(inner.adoptions);
        for (uuid, (vm, targets)) in &inner.targets_down {
            for t in targets {
                self.adoption_target_down
                    .with_label_values(&[vm, uuid, t])
                    .set(1);
            }
        }
    }

    /// One VM: running, RPO and backlog per disk, bytes shipped per target.
    /// Notes in `targets_seen` the freshest state of each target it used.
    fn vm(
        &self,
        src: &Source,
        snap: &VmSnapshot,
        now: u64,
        targets_seen: &mut BTreeMap<String, (u64, bool)>,
    ) {
        let vm = &snap.row;
        let status = snap.status.as_ref();
        self.running
            .with_label_values(&[&vm.name, &vm.uuid])
            .set(status.is_some() as i64);
        let mut target_names: Vec<String> = targets_of(&src.config, vm).to_vec();
        for (name, updated_ns, up) in &snap.targets {
            if !target_names.contains(name) {
                target_names.push(name.clone());
            }
            self.vm_target_up
                .with_label_values(&[&vm.name, &vm.uuid, name])
                .set(*up as i64);
            let e = targets_seen.entry(name.clone()).or_insert((0, false));
            if *updated_ns >= e.0 {
                *e = (*updated_ns, *up);
            }
        }
        for d in &snap.disks {
            let rpo_s = match status
                .as_ref()
                .and_then(|s| s.disks.iter().find(|x| x.disk == d.disk))
            {
                Some(x) => x.rpo_ms as f64 / 1000.0,
                None => d
                    .oldest_unprotected_ns
                    .map_or(0.0, |t| now.saturating_sub(t) as f64 / 1e9),
            };
            self.rpo
                .with_label_values(&[&vm.name, &vm.uuid, &d.disk])
                .set(rpo_s);
            for t in &target_names {
                let (n, bytes) = d.backlog.get(t).copied().unwrap_or((0, 0));
                let l = [&vm.name, &vm.uuid, &d.disk, t.as_str()];
                self.backlog_bytes.with_label_values(&l).set(bytes as i64);
                self.backlog_segments.with_label_values(&l).set(n as i64);
            }
        }
        for d in status.iter().flat_map(|s| &s.disks) {
            let l = [vm.name.as_str(), vm.uuid.as_str(), d.disk.as_str()];
            self.degraded.with_label_values(&l).set(d.degraded as i64);
            self.image_failed
                .with_label_values(&l)
                .set(d.image_failed as i64);
            self.dirty_bytes
                .with_label_values(&l)
                .set(d.dirty_bytes as i64);
            self.resync_bytes_read
                .with_label_values(&l)
                .inc_by(d.resync_bytes_read);
            self.checkpoints.with_label_values(&l).inc_by(d.checkpoints);
        }
        for (t, n) in &snap.in_flight {
            self.uploads_in_flight
                .with_label_values(&[&vm.name, &vm.uuid, t])
                .set(*n as i64);
        }
        for (t, bytes) in &snap.shipped {
            self.shipped
                .with_label_values(&[&vm.name, &vm.uuid, t])
                .inc_by(*bytes);
        }
    }
}

/// What the metrics need of one VM's catalog, read by a child with the
/// VM's identity.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct VmSnapshot {
    pub row: VmRow,
    /// (target, updated_ns, up)
    pub targets: Vec<(String, u64, bool)>,
    pub disks: Vec<DiskSnapshot>,
    pub shipped: Vec<(String, u64)>,
    /// (target, segment uploads in flight), as the shipper recorded them.
    #[serde(default)]
    pub in_flight: Vec<(String, u64)>,
    /// cdpd's answer on the VM's control socket (None: not running), asked
    /// by the same child: the socket is in `<run>/<uuid>`, which QEMU's user
    /// can write, so root never connects by that path (docs/DESIGN.md,
    /// "Trust boundaries").
    pub status: Option<cdp_core::control::Status>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct DiskSnapshot {
    pub disk: String,
    pub oldest_unprotected_ns: Option<u64>,
    /// target → (segments, bytes)
    pub backlog: BTreeMap<String, (u64, u64)>,
}

impl VmSnapshot {
    /// Read one VM's catalog and ask its cdpd (as the VM's user). `targets`
    /// are the policy's targets (those with a backlog even before anything
    /// was shipped).
    pub fn read(
        cat: &Catalog,
        uuid: &str,
        config: &Config,
        run_dir: &std::path::Path,
    ) -> Result<Option<VmSnapshot>, CatalogError> {
        let Some(row) = cat.vms()?.into_iter().find(|r| r.uuid == uuid) else {
            return Ok(None);
        };
        let targets: Vec<(String, u64, bool)> = cat
            .targets(uuid)?
            .into_iter()
            .map(|t| (t.target, t.updated_ns, t.state == "up"))
            .collect();
        let mut names: Vec<String> = targets_of(config, &row).to_vec();
        for (t, _, _) in &targets {
            if !names.contains(t) {
                names.push(t.clone());
            }
        }
        let mut disks = Vec::new();
        for (disk, _, _) in cat.disks(uuid)? {
            let (_, _, oldest) = cat.unprotected(uuid, &disk)?;
            let mut backlog = BTreeMap::new();
            for t in &names {
                let (n, bytes, _) = cat.backlog(uuid, &disk, t)?;
                backlog.insert(t.clone(), (n, bytes));
            }
            disks.push(DiskSnapshot {
                disk,
                oldest_unprotected_ns: oldest,
                backlog,
            });
        }
        let shipped = cat.shipped_bytes(uuid)?;
        let in_flight = cat.in_flight(uuid)?;
        Ok(Some(VmSnapshot {
            row,
            targets,
            disks,
            shipped,
            in_flight,
            status: cdpd_answers(run_dir, uuid),
        }))
    }

    /// Read it in a child with the identity of the VM's state directory.
    pub fn read_as_owner(src: &Source, uuid: &str) -> Result<Option<VmSnapshot>, MetricsError> {
        let state = StateDir::new(&src.state_dir);
        let id = VmIdentity::of(&state, uuid)?;
        let (dir, config) = (src.state_dir.clone(), src.config.clone());
        let snap = id.run(state.vm(uuid).path(), || {
            let cat = Catalog::open(&dir, uuid).map_err(|e| e.to_string())?;
            VmSnapshot::read(&cat, uuid, &config, &src.run_dir).map_err(|e| e.to_string())
        })?;
        Ok(snap)
    }
}

/// Render every metric in the text format 0.0.4.
pub fn render(src: &Source) -> Result<String, MetricsError> {
    let f = Families::new()?;
    let vms = StateDir::new(&src.state_dir).vms_with_catalog()?;
    let now = now_ns();
    // target → (updated_ns, up) of its freshest observation.
    let mut targets_seen: BTreeMap<String, (u64, bool)> = BTreeMap::new();
    for uuid in &vms {
        // One VM's unreadable catalog costs only its own series.
        match VmSnapshot::read_as_owner(src, uuid) {
            Ok(Some(snap)) => f.vm(src, &snap, now, &mut targets_seen),
            Ok(None) => {}
            Err(_) => src.counters.error("catalog"),
        }
    }
    f.counters(&src.counters);
    for (t, (_, up)) in targets_seen {
        f.target_up.with_label_values(&[&t]).set(up as i64);
    }
    let mut buf = Vec::new();
    TextEncoder::new().encode(&f.registry.gather(), &mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Serve `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, src: Arc<Source>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let src = src.clone();
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let svc = hyper::service::service_fn(move |req| handle(req, src.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}

pub(crate) async fn handle(
    req: Request<hyper::body::Incoming>,
    src: Arc<Source>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |code: StatusCode, ctype: &str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = code;
        r.headers_mut()
            .insert(hyper::header::CONTENT_TYPE, ctype.parse().unwrap());
        Ok(r)
    };
    if req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "cdp-agent serves /metrics\n".into(),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".into(),
        );
    }
    let s = src.clone();
    match tokio::task::spawn_blocking(move || render(&s)).await {
        Ok(Ok(body)) => reply(StatusCode::OK, prometheus::TEXT_FORMAT, body),
        Ok(Err(e)) => {
            src.counters.error("catalog");
            reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{e}\n"),
            )
        }
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{e}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cdp_core::catalog::Shipment;
    use cdp_core::journal::writer::SealedSegment;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    const VM: &str = "0b5c6a3e-1d2f-4a5b-8c9d-0e1f2a3b4c5d";

    /// A stopped VM with one disk and two sealed segments of 4096 bytes;
    /// "primary" holds the first one.
    fn source(dir: &Path) -> Source {
        let cat = Catalog::open(dir, VM).unwrap();
        cat.upsert_vm(VM, "web").unwrap();
        cat.upsert_disk(VM, "vda", &dir.join("vda.img"), 1 << 20)
            .unwrap();
        let old = now_ns() - 10_000_000_000;
        for first_seq in [1, 11] {
            let s = SealedSegment {
                path: format!("/nonexistent/{first_seq}.seg").into(),
                first_seq,
                last_seq: first_seq + 9,
                first_ts_ns: old,
                last_ts_ns: old + first_seq,
                records: 10,
                record_base: first_seq,
                size_bytes: 4096,
            };
            cat.put_segment(VM, "vda", &s, true).unwrap();
        }
        cat.record_shipment(
            VM,
            &Shipment {
                disk: "vda",
                first_seq: 1,
                target: "primary",
                key: "k",
                object_bytes: 1000,
                shipped_ns: 1,
            },
        )
        .unwrap();
        cat.set_target_state(VM, "primary", "file:///p", "up", None, 5)
            .unwrap();
        cat.set_target_state(VM, "offsite", "s3://o", "failing", Some("down"), 6)
            .unwrap();
        cat.set_in_flight(VM, "primary", 3, 7).unwrap();
        let config = Config::parse(
            r#"
[target.primary]
url = "file:///p"
[target.offsite]
url = "s3://o"
[policy.default]
targets = ["primary", "offsite"]
"#,
        )
        .unwrap();
        Source {
            state_dir: dir.to_path_buf(),
            config,
            run_dir: dir.join("run"),
            counters: Arc::new(Counters::default()),
        }
    }

    /// The value of the sample whose name and labels are exactly `series`.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn renders_backlog_rpo_targets_and_counters() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(dir.path());
        src.counters.error("target");
        src.counters.error("target");
        src.counters.adoption();
        let t = render(&src).unwrap();
        let vm = format!("vm=\"web\",vm_uuid=\"{VM}\"");
        assert_eq!(sample(&t, &format!("cdp_vm_running{{{vm}}}")), Some(0.0));
        let backlog = |m: &str, target: &str| {
            sample(&t, &format!("{m}{{disk=\"vda\",target=\"{target}\",{vm}}}"))
        };
        assert_eq!(backlog("cdp_backlog_segments", "primary"), Some(1.0), "{t}");
        assert_eq!(backlog("cdp_backlog_segments", "offsite"), Some(2.0), "{t}");
        assert_eq!(backlog("cdp_backlog_bytes", "offsite"), Some(8192.0), "{t}");
        // Stopped VM: the age of its oldest record nobody has.
        let rpo = sample(&t, &format!("cdp_rpo_seconds{{disk=\"vda\",{vm}}}")).unwrap();
        assert!((9.0..3600.0).contains(&rpo), "{rpo}");
        assert_eq!(
            sample(
                &t,
                &format!("cdp_shipped_bytes_total{{target=\"primary\",{vm}}}")
            ),
            Some(1000.0)
        );
        assert_eq!(sample(&t, "cdp_target_up{target=\"primary\"}"), Some(1.0));
        let per_vm = |target: &str| {
            sample(
                &t,
                &format!("cdp_vm_target_up{{target=\"{target}\",vm=\"web\",vm_uuid=\"{VM}\"}}"),
            )
        };
        assert_eq!(per_vm("primary"), Some(1.0), "{t}");
        assert_eq!(per_vm("offsite"), Some(0.0), "{t}");
        assert_eq!(
            sample(
                &t,
                &format!("cdp_uploads_in_flight{{target=\"primary\",{vm}}}")
            ),
            Some(3.0),
            "{t}"
        );
        assert_eq!(sample(&t, "cdp_target_up{target=\"offsite\"}"), Some(0.0));
        assert_eq!(sample(&t, "cdp_errors_total{kind=\"target\"}"), Some(2.0));
        assert_eq!(sample(&t, "cdp_agent_adoptions_total"), Some(1.0));
        // Every kind is there before it happens.
        for k in ERROR_KINDS.iter().filter(|k| **k != "target") {
            assert_eq!(
                sample(&t, &format!("cdp_errors_total{{kind=\"{k}\"}}")),
                Some(0.0),
                "{k}"
            );
        }
    }

    /// A VM whose state belongs to its QEMU user is read by a child with
    /// that identity (the agent, root, never opens the catalog): same values.
    #[test]
    fn a_vm_owned_by_its_user_is_read_as_that_user() {
        assert!(nix::unistd::geteuid().is_root(), "this test needs root");
        let dir = tempfile::tempdir().unwrap();
        let src = source(dir.path());
        let vm_dir = StateDir::new(dir.path()).vm(VM);
        for e in std::fs::read_dir(vm_dir.path()).unwrap() {
            std::os::unix::fs::chown(e.unwrap().path(), Some(65534), Some(65534)).unwrap();
        }
        std::os::unix::fs::chown(vm_dir.path(), Some(65534), Some(65534)).unwrap();
        // Root itself refuses to open it.
        assert!(Catalog::open(dir.path(), VM).is_err());
        let t = render(&src).unwrap();
        let vm = format!("vm=\"web\",vm_uuid=\"{VM}\"");
        let series = format!("cdp_backlog_segments{{disk=\"vda\",target=\"offsite\",{vm}}}");
        assert_eq!(sample(&t, &series), Some(2.0), "{t}");
        assert_eq!(sample(&t, "cdp_errors_total{kind=\"catalog\"}"), Some(0.0));
    }

    /// cdpd's status with a degraded vda and a normal vdb.
    fn fake_status() -> cdp_core::control::Status {
        use cdp_core::control::{DiskStatus, Status};
        let disk = |name: &str, degraded: bool| DiskStatus {
            disk: name.into(),
            path: format!("/img/{name}"),
            size: 1 << 30,
            bytes_written: 0,
            write_requests: 0,
            bytes_read: 0,
            read_requests: 0,
            flushes: 0,
            last_seq: 9,
            open_segment: None,
            open_segment_records: 0,
            segments_waiting_seal: 0,
            in_flight: 0,
            journal_bytes: 0,
            journal_segments: 0,
            connections: 1,
            errors: 0,
            protocol_errors: 0,
            seal_errors: 0,
            rpo_ms: 0,
            backlog_segments: 0,
            backlog_bytes: 0,
            targets: Vec::new(),
            journal_mode: if degraded { "degraded" } else { "normal" }.into(),
            degraded,
            degraded_since_ns: if degraded { 5 } else { 0 },
            dirty_bytes: if degraded { 3 << 20 } else { 0 },
            times_degraded: 2,
            resync_bytes_read: 7 << 20,
            resync_bytes_journaled: 7 << 20,
            resyncs_done: 1,
            checkpoints: 4,
            checkpoint_seq: 0,
            writes_in_place: !degraded,
            early_acks: 0,
            journal_writebacks: 0,
            image_failed: degraded,
        };
        Status {
            vm_uuid: VM.into(),
            vm_name: "web".into(),
            pid: 1,
            last_seq: 9,
            segment_size: 1 << 20,
            segment_age_ms: 1000,
            disks: vec![disk("vda", true), disk("vdb", false)],
        }
    }

    /// A fake cdpd on `sock`: answers one request with [`fake_status`].
    fn serve_status_once(sock: &Path) -> std::thread::JoinHandle<()> {
        use std::io::{BufRead, Write};
        let l = std::os::unix::net::UnixListener::bind(sock).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut line = String::new();
            std::io::BufReader::new(&s).read_line(&mut line).unwrap();
            let reply = cdp_core::control::Reply::status(fake_status());
            (&s).write_all(reply.to_line().as_bytes()).unwrap();
        })
    }

    /// A running cdpd (a fake control socket) whose vda is degraded: the
    /// degraded-mode series come from its status.
    #[test]
    fn a_degraded_disk_is_exported_from_cdpd_status() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(dir.path());
        let sock = cdp_core::layout::RunDir::new(&src.run_dir)
            .vm(VM)
            .control_socket();
        std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
        let server = serve_status_once(&sock);
        let t = render(&src).unwrap();
        server.join().unwrap();
        let vm = format!("vm=\"web\",vm_uuid=\"{VM}\"");
        let at = |m: &str, d: &str| sample(&t, &format!("{m}{{disk=\"{d}\",{vm}}}"));
        assert_eq!(sample(&t, &format!("cdp_vm_running{{{vm}}}")), Some(1.0));
        assert_eq!(at("cdp_disk_degraded", "vda"), Some(1.0), "{t}");
        assert_eq!(at("cdp_disk_degraded", "vdb"), Some(0.0), "{t}");
        assert_eq!(at("cdp_disk_dirty_bytes", "vda"), Some(3145728.0), "{t}");
        assert_eq!(at("cdp_disk_dirty_bytes", "vdb"), Some(0.0), "{t}");
        let read = at("cdp_disk_resync_bytes_read_total", "vda");
        assert_eq!(read, Some(7340032.0), "{t}");
        assert_eq!(at("cdp_disk_checkpoints_total", "vda"), Some(4.0), "{t}");
        assert_eq!(at("cdp_disk_image_failed", "vda"), Some(1.0), "{t}");
        assert_eq!(at("cdp_disk_image_failed", "vdb"), Some(0.0), "{t}");
    }

    /// A VM's user links its control socket to a socket only root can
    /// reach (here a fake cdpd in a root-only directory, standing for
    /// another VM's cdpd or any root socket): the agent asks cdpd as the
    /// VM's user, so the link leads nowhere and the VM is not running.
    #[test]
    fn a_control_socket_link_planted_by_the_vms_user_reaches_nothing_of_roots() {
        assert!(nix::unistd::geteuid().is_root(), "this test needs root");
        let dir = tempfile::tempdir().unwrap();
        let src = source(dir.path());
        let vm_dir = StateDir::new(dir.path()).vm(VM);
        for e in std::fs::read_dir(vm_dir.path()).unwrap() {
            std::os::unix::fs::chown(e.unwrap().path(), Some(65534), Some(65534)).unwrap();
        }
        std::os::unix::fs::chown(vm_dir.path(), Some(65534), Some(65534)).unwrap();
        let sock = cdp_core::layout::RunDir::new(&src.run_dir)
            .vm(VM)
            .control_socket();
        let run_vm = sock.parent().unwrap();
        std::fs::create_dir_all(run_vm).unwrap();
        std::os::unix::fs::chown(run_vm, Some(65534), Some(65534)).unwrap();
        let private = dir.path().join("roots");
        std::fs::create_dir(&private).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        let target = private.join("cdpd.sock");
        // Not joined: with the fix nobody connects.
        let _server = serve_status_once(&target);
        std::os::unix::fs::symlink(&target, &sock).unwrap();
        let t = render(&src).unwrap();
        let vm = format!("vm=\"web\",vm_uuid=\"{VM}\"");
        assert_eq!(
            sample(&t, &format!("cdp_vm_running{{{vm}}}")),
            Some(0.0),
            "root followed the VM user's link to a root-only socket: {t}"
        );
        assert_eq!(
            sample(&t, &format!("cdp_disk_degraded{{disk=\"vda\",{vm}}}")),
            None,
            "{t}"
        );
    }

    #[test]
    fn a_vm_that_went_away_disappears() {
        let dir = tempfile::tempdir().unwrap();
        let src = Source {
            state_dir: dir.path().to_path_buf(),
            config: Config::parse("").unwrap(),
            run_dir: dir.path().join("run"),
            counters: Arc::new(Counters::default()),
        };
        let t = render(&src).unwrap();
        assert!(!t.contains("cdp_vm_running{"), "{t}");
        assert!(!t.contains("cdp_backlog_segments{"), "{t}");
        assert_eq!(sample(&t, "cdp_errors_total{kind=\"ship\"}"), Some(0.0));
    }

    #[test]
    fn counters_count_by_kind() {
        let c = Counters::default();
        c.error("ship");
        c.error("ship");
        c.error("lock");
        assert_eq!(c.errors("ship"), 2);
        assert_eq!(c.errors("lock"), 1);
        assert_eq!(c.errors("notify"), 0);
    }
}
