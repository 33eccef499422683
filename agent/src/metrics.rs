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
use cdp_core::catalog::{Catalog, CatalogError};
use cdp_core::config::Config;
use cdp_core::time::now_ns;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use prometheus::{Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use thiserror::Error;

use crate::adopt::{cdpd_answers, policy_of};

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
}

impl Counters {
    pub fn error(&self, kind: &'static str) {
        *self.inner.lock().unwrap().errors.entry(kind).or_default() += 1;
    }

    pub fn adoption(&self) {
        self.inner.lock().unwrap().adoptions += 1;
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
    pub catalog: Arc<Mutex<Catalog>>,
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

/// Render every metric in the text format 0.0.4.
pub fn render(src: &Source) -> Result<String, MetricsError> {
    let r = Registry::new();
    let rpo = gauge(
        &r,
        "cdp_rpo_seconds",
        "Age of the oldest write no target has yet (running VMs: as cdpd reports it; stopped: oldest unshipped record), 0 when all is shipped",
        &["vm", "vm_uuid", "disk"],
    )?;
    let running = int_gauge(
        &r,
        "cdp_vm_running",
        "1 while the VM's cdpd answers on its control socket",
        &["vm", "vm_uuid"],
    )?;
    let backlog_bytes = int_gauge(
        &r,
        "cdp_backlog_bytes",
        "Bytes of sealed journal segments a target does not have yet",
        &["vm", "vm_uuid", "disk", "target"],
    )?;
    let backlog_segments = int_gauge(
        &r,
        "cdp_backlog_segments",
        "Sealed journal segments a target does not have yet",
        &["vm", "vm_uuid", "disk", "target"],
    )?;
    let shipped = counter(
        &r,
        "cdp_shipped_bytes_total",
        "Bytes of journal segment objects a target received (as the catalog records them)",
        &["vm", "vm_uuid", "target"],
    )?;
    let target_up = int_gauge(
        &r,
        "cdp_target_up",
        "1 when the target worked the last time a shipper used it, 0 when it was failing",
        &["target"],
    )?;
    let errors = counter(
        &r,
        "cdp_errors_total",
        "Errors the agent met, by kind",
        &["kind"],
    )?;
    let adoptions = prometheus::IntCounter::new(
        "cdp_agent_adoptions_total",
        "Adoptions that recovered or shipped something",
    )?;
    r.register(Box::new(adoptions.clone()))?;

    {
        let inner = src.counters.inner.lock().unwrap();
        for k in ERROR_KINDS {
            errors.with_label_values(&[k]).inc_by(0);
        }
        for (k, n) in &inner.errors {
            errors.with_label_values(&[k]).inc_by(*n);
        }
        adoptions.inc_by(inner.adoptions);
    }

    let vms = src.catalog.lock().unwrap().vms()?;
    let now = now_ns();
    // target → (updated_ns, up) of its freshest observation.
    let mut targets_seen: BTreeMap<String, (u64, bool)> = BTreeMap::new();
    for vm in &vms {
        // Outside the catalog lock: a cdpd may take up to its timeout.
        let status = cdpd_answers(&src.run_dir, &vm.uuid);
        let cat = src.catalog.lock().unwrap();
        running
            .with_label_values(&[&vm.name, &vm.uuid])
            .set(status.is_some() as i64);
        let rows = cat.targets(&vm.uuid)?;
        let mut target_names: Vec<String> = src
            .config
            .policy
            .get(policy_of(vm))
            .map(|p| p.targets.clone())
            .unwrap_or_default();
        for t in &rows {
            if !target_names.contains(&t.target) {
                target_names.push(t.target.clone());
            }
            let e = targets_seen.entry(t.target.clone()).or_insert((0, false));
            if t.updated_ns >= e.0 {
                *e = (t.updated_ns, t.state == "up");
            }
        }
        for (disk, _, _) in cat.disks(&vm.uuid)? {
            let rpo_s = match status
                .as_ref()
                .and_then(|s| s.disks.iter().find(|d| d.disk == disk))
            {
                Some(d) => d.rpo_ms as f64 / 1000.0,
                None => {
                    let (_, _, oldest) = cat.unprotected(&vm.uuid, &disk)?;
                    oldest.map_or(0.0, |t| now.saturating_sub(t) as f64 / 1e9)
                }
            };
            rpo.with_label_values(&[&vm.name, &vm.uuid, &disk])
                .set(rpo_s);
            for t in &target_names {
                let (n, bytes, _) = cat.backlog(&vm.uuid, &disk, t)?;
                let l = [
                    vm.name.as_str(),
                    vm.uuid.as_str(),
                    disk.as_str(),
                    t.as_str(),
                ];
                backlog_bytes.with_label_values(&l).set(bytes as i64);
                backlog_segments.with_label_values(&l).set(n as i64);
            }
        }
        for (t, bytes) in cat.shipped_bytes(&vm.uuid)? {
            shipped
                .with_label_values(&[&vm.name, &vm.uuid, &t])
                .inc_by(bytes);
        }
    }
    for (t, (_, up)) in targets_seen {
        target_up.with_label_values(&[&t]).set(up as i64);
    }

    let mut buf = Vec::new();
    TextEncoder::new().encode(&r.gather(), &mut buf)?;
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

async fn handle(
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
