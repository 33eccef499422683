//! The status page on the metrics listener: `GET /` (every protected VM
//! of the host, running or not, its disks, targets, health, RPO and
//! backlog, and each VM's timeline inline) and `GET /vm/<uuid>/timeline.svg`.
//! `/metrics` and everything else go to [`crate::metrics`].
//!
//! A sampler refreshes one snapshot of the host every `[agent]
//! scan_interval`: each VM's catalog and local journal are read by a child
//! with the VM's identity (`cdp_core::privsep`, as the metrics do; the
//! agent never opens them as root), and the RPO of each target is appended
//! to a bounded in-memory history (the last [`RPO_KEEP`]). A VM's timeline
//! is read again only when its catalog changed. Requests render the
//! snapshot and never read a catalog, so the page answers fast with many
//! VMs. Everything on the page that a VM can write (names, labels,
//! reasons) is escaped by `cdp_ui`.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cdp_core::catalog::{BaselineRow, Catalog, SegmentRow};
use cdp_core::layout::StateDir;
use cdp_core::privsep::VmIdentity;
use cdp_core::time::now_ns;
use cdp_repo::restore;
use cdp_ui as ui;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};

use crate::adopt::targets_of;
use crate::metrics::{Source, VmSnapshot};

/// How far back the RPO history of a target goes.
pub const RPO_KEEP: Duration = Duration::from_secs(6 * 3600);
/// At most this many samples per target (older ones are dropped first).
const RPO_SAMPLES: usize = 4096;

/// The page's state: the last snapshot, the RPO history, cached timelines.
pub struct Page {
    src: Arc<Source>,
    every: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    host: Option<ui::HostStatus>,
    /// VM uuid → target → (time ns, RPO seconds), oldest first.
    rpo: BTreeMap<String, BTreeMap<String, VecDeque<(u64, f64)>>>,
    /// VM uuid → (catalog key, disk lanes).
    lanes: BTreeMap<String, (String, Vec<ui::DiskTimeline>)>,
}

/// What the child with the VM's identity reads for the page.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct VmRead {
    snap: VmSnapshot,
    /// target → (url, state, last error)
    targets: BTreeMap<String, (String, String, Option<String>)>,
    /// target → oldest first timestamp of a segment it lacks (any disk).
    oldest_missing: BTreeMap<String, Option<u64>>,
    /// target → newest timestamp it holds (sealed segments older than its
    /// oldest missing one).
    newest_shipped: BTreeMap<String, Option<u64>>,
    /// Changes whenever the timeline can have changed.
    key: String,
    /// None: `key` is the one the agent has cached.
    lanes: Option<Vec<ui::DiskTimeline>>,
}

impl Page {
    pub fn new(src: Arc<Source>, every: Duration) -> Page {
        Page {
            src,
            every,
            state: Mutex::new(State::default()),
        }
    }

    /// Read every VM once and replace the snapshot (blocking: children).
    pub fn refresh(&self) {
        let now = now_ns();
        let vms = StateDir::new(&self.src.state_dir)
            .vms_with_catalog()
            .unwrap_or_default();
        let mut out = Vec::new();
        let mut host_targets: BTreeMap<String, (u64, ui::TargetStatus)> = BTreeMap::new();
        for uuid in &vms {
            let cached = self
                .state
                .lock()
                .unwrap()
                .lanes
                .get(uuid)
                .map(|c| c.0.clone());
            let vm = match read_as_owner(&self.src, uuid, cached.as_deref()) {
                Ok(Some(r)) => self.vm_status(uuid, r, now, &mut host_targets),
                Ok(None) => continue,
                Err(e) => {
                    self.src.counters.error("catalog");
                    ui::VmStatus {
                        name: uuid.clone(),
                        uuid: uuid.clone(),
                        error: Some(format!("could not read its catalog: {e}")),
                        ..Default::default()
                    }
                }
            };
            out.push(vm);
        }
        out.sort_by(|a, b| (&a.name, &a.uuid).cmp(&(&b.name, &b.uuid)));
        let mut st = self.state.lock().unwrap();
        st.rpo.retain(|u, _| vms.contains(u));
        st.lanes.retain(|u, _| vms.contains(u));
        st.host = Some(ui::HostStatus {
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default(),
            generated_ns: now,
            refresh_s: self.every.as_secs().clamp(5, 300) as u32,
            targets: host_targets.into_values().map(|(_, t)| t).collect(),
            vms: out,
        });
    }

    /// One VM's row of the page; notes its RPO samples and caches its lanes.
    fn vm_status(
        &self,
        uuid: &str,
        r: VmRead,
        now: u64,
        host_targets: &mut BTreeMap<String, (u64, ui::TargetStatus)>,
    ) -> ui::VmStatus {
        let status = r.snap.status.clone();
        let mut names: Vec<String> = targets_of(&self.src.config, &r.snap.row).to_vec();
        for t in r.targets.keys() {
            if !names.contains(t) {
                names.push(t.clone());
            }
        }
        let targets = self.targets(&r, status.as_ref(), &names, now, host_targets);
        let disks = disk_rows(&r, status.as_ref(), now);
        let mut st = self.state.lock().unwrap();
        let series = st.rpo.entry(uuid.to_string()).or_default();
        series.retain(|t, _| names.contains(t));
        for t in &targets {
            push_sample(series.entry(t.target.clone()).or_default(), now, t.rpo_s);
        }
        let rpo = series
            .iter()
            .map(|(t, s)| ui::RpoSeries {
                target: t.clone(),
                samples: s.iter().copied().collect(),
            })
            .collect();
        if let Some(l) = r.lanes {
            st.lanes.insert(uuid.to_string(), (r.key, l));
        }
        let mut lanes = st.lanes.get(uuid).map(|c| c.1.clone()).unwrap_or_default();
        drop(st);
        // A running cdpd's degraded disk: unrestorable from then on, until
        // its resync ends.
        for d in status.iter().flat_map(|s| &s.disks).filter(|d| d.degraded) {
            if let Some(l) = lanes.iter_mut().find(|l| l.disk == d.disk) {
                l.degraded.push(ui::Window {
                    from_ns: d.degraded_since_ns,
                    to_ns: None,
                    reason: "journal full (degraded mode): points from then on cannot be restored until the resync ends".into(),
                });
            }
        }
        ui::VmStatus {
            name: r.snap.row.name.clone(),
            uuid: uuid.to_string(),
            running: status.is_some(),
            disks,
            targets,
            timeline: Some(ui::Timeline {
                vm_name: r.snap.row.name.clone(),
                vm_uuid: uuid.to_string(),
                now_ns: now,
                disks: lanes,
                rpo,
            }),
            error: None,
        }
    }

    /// One VM's targets (health, RPO, backlog, newest point); notes the
    /// freshest state of each in `host_targets`.
    fn targets(
        &self,
        r: &VmRead,
        status: Option<&cdp_core::control::Status>,
        names: &[String],
        now: u64,
        host_targets: &mut BTreeMap<String, (u64, ui::TargetStatus)>,
    ) -> Vec<ui::VmTarget> {
        let mut targets = Vec::new();
        for t in names {
            let health = match r.targets.get(t) {
                Some((_, state, _)) if state == "up" => ui::Health::Up,
                Some(_) => ui::Health::Failing,
                None => ui::Health::Down,
            };
            // Running: cdpd's lag of this target (unsealed records too);
            // stopped: the age of the oldest sealed record it lacks.
            let live = status
                .into_iter()
                .flat_map(|s| &s.disks)
                .flat_map(|d| &d.targets)
                .filter(|x| &x.target == t)
                .map(|x| x.lag_ms)
                .max();
            let rpo_s = match live {
                Some(ms) => ms as f64 / 1000.0,
                None => r
                    .oldest_missing
                    .get(t)
                    .copied()
                    .flatten()
                    .map_or(0.0, |o| now.saturating_sub(o) as f64 / 1e9),
            };
            let backlog_bytes = r
                .snap
                .disks
                .iter()
                .filter_map(|d| d.backlog.get(t))
                .map(|b| b.1)
                .sum();
            targets.push(ui::VmTarget {
                target: t.clone(),
                health,
                newest_shipped_ns: r.newest_shipped.get(t).copied().flatten(),
                rpo_s,
                backlog_bytes,
            });
            let updated = r.snap.targets.iter().find(|x| &x.0 == t).map_or(0, |x| x.1);
            let (url, error) = match r.targets.get(t) {
                Some((url, _, err)) => (url.clone(), err.clone()),
                None => (
                    self.src
                        .config
                        .target
                        .get(t)
                        .map_or(String::new(), |c| c.url.clone()),
                    None,
                ),
            };
            let e = host_targets
                .entry(t.clone())
                .or_insert((0, ui::TargetStatus::default()));
            if e.1.name.is_empty() || updated >= e.0 {
                *e = (
                    updated,
                    ui::TargetStatus {
                        name: t.clone(),
                        url,
                        health,
                        error,
                    },
                );
            }
        }
        targets
    }

    /// The last snapshot, refreshing first when there is none yet.
    async fn host(self: &Arc<Self>) -> Option<ui::HostStatus> {
        if let Some(h) = self.state.lock().unwrap().host.clone() {
            return Some(h);
        }
        let p = self.clone();
        tokio::task::spawn_blocking(move || p.refresh())
            .await
            .ok()?;
        self.state.lock().unwrap().host.clone()
    }
}

/// One VM's disks: RPO (cdpd's when running), degraded, backlog per target.
fn disk_rows(
    r: &VmRead,
    status: Option<&cdp_core::control::Status>,
    now: u64,
) -> Vec<ui::DiskStatus> {
    r.snap
        .disks
        .iter()
        .map(|d| {
            let live = status.and_then(|s| s.disks.iter().find(|x| x.disk == d.disk));
            ui::DiskStatus {
                disk: d.disk.clone(),
                rpo_s: match live {
                    Some(x) => x.rpo_ms as f64 / 1000.0,
                    None => d
                        .oldest_unprotected_ns
                        .map_or(0.0, |t| now.saturating_sub(t) as f64 / 1e9),
                },
                degraded: live.is_some_and(|x| x.degraded),
                image_failed: live.is_some_and(|x| x.image_failed),
                backlog: d
                    .backlog
                    .iter()
                    .map(|(t, (segments, bytes))| ui::Backlog {
                        target: t.clone(),
                        segments: *segments,
                        bytes: *bytes,
                    })
                    .collect(),
            }
        })
        .collect()
}

/// Append a sample; drop those older than [`RPO_KEEP`] and beyond
/// [`RPO_SAMPLES`].
fn push_sample(s: &mut VecDeque<(u64, f64)>, now: u64, v: f64) {
    s.push_back((now, v));
    let keep_from = now.saturating_sub(RPO_KEEP.as_nanos() as u64);
    while s.front().is_some_and(|f| f.0 < keep_from) || s.len() > RPO_SAMPLES {
        s.pop_front();
    }
}

/// Read what the page needs of one VM, in a child with the identity of the
/// VM's state directory; its lanes only when its key is not `cached`.
fn read_as_owner(src: &Source, uuid: &str, cached: Option<&str>) -> Result<Option<VmRead>, String> {
    let state = StateDir::new(&src.state_dir);
    let id = VmIdentity::of(&state, uuid).map_err(|e| e.to_string())?;
    let (dir, config) = (src.state_dir.clone(), src.config.clone());
    let cached = cached.map(str::to_string);
    id.run(state.vm(uuid).path(), || {
        let cat = Catalog::open(&dir, uuid).map_err(|e| e.to_string())?;
        let Some(snap) =
            VmSnapshot::read(&cat, uuid, &config, &src.run_dir).map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        read_vm(&cat, &dir, snap, cached.as_deref()).map(Some)
    })
    .map_err(|e| e.to_string())
}

/// [`read_as_owner`]'s work, as the VM's user.
fn read_vm(
    cat: &Catalog,
    dir: &std::path::Path,
    snap: VmSnapshot,
    cached: Option<&str>,
) -> Result<VmRead, String> {
    let e = |e: cdp_core::catalog::CatalogError| e.to_string();
    let uuid = snap.row.uuid.clone();
    let targets: BTreeMap<_, _> = cat
        .targets(&uuid)
        .map_err(e)?
        .into_iter()
        .map(|t| (t.target, (t.url, t.state, t.last_error)))
        .collect();
    let segments = cat.segments(&uuid).map_err(e)?;
    let baselines = cat.baselines(&uuid).map_err(e)?;
    let mut oldest_missing = BTreeMap::new();
    let mut newest_shipped = BTreeMap::new();
    let names: Vec<String> = snap
        .disks
        .first()
        .map(|d| d.backlog.keys().cloned().collect())
        .unwrap_or_default();
    for t in &names {
        let mut oldest: Option<u64> = None;
        for d in &snap.disks {
            let (_, _, o) = cat.backlog(&uuid, &d.disk, t).map_err(e)?;
            oldest = match (oldest, o) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        let newest = segments
            .iter()
            .filter(|s| s.sealed && oldest.is_none_or(|o| s.first_ts_ns < o))
            .map(|s| s.last_ts_ns)
            .max();
        oldest_missing.insert(t.clone(), oldest);
        newest_shipped.insert(
            t.clone(),
            if baselines.iter().any(|b| &b.target == t) {
                newest
            } else {
                None
            },
        );
    }
    let key = format!(
        "{}:{}:{}:{}",
        snap.row.last_seq,
        segments.len(),
        segments.iter().map(|s| s.last_seq).max().unwrap_or(0),
        baselines.iter().map(|b| b.chunks_uploaded).sum::<u64>()
    );
    let lanes = if cached == Some(key.as_str()) {
        None
    } else {
        let cat_view = CatalogView {
            baselines: &baselines,
            segments: &segments,
            marks: &cat.marks(&uuid).map_err(e)?,
            quiesced: &cat.quiesced_marks(&uuid).map_err(e)?,
            gaps: &cat.gaps(&uuid).map_err(e)?,
        };
        let mut out = Vec::new();
        for (disk, _, _) in cat.disks(&uuid).map_err(e)? {
            out.push(disk_lane(dir, &uuid, &disk, &cat_view)?);
        }
        Some(out)
    };
    Ok(VmRead {
        snap,
        targets,
        oldest_missing,
        newest_shipped,
        key,
        lanes,
    })
}

/// What the catalog records of a VM's history.
struct CatalogView<'a> {
    baselines: &'a [BaselineRow],
    /// Every segment, trimmed ones too.
    segments: &'a [SegmentRow],
    /// (label, seq, ts_ns)
    marks: &'a [(String, u64, u64)],
    /// Labels of the quiesced marks (`cdpctl mark --quiesce`).
    quiesced: &'a std::collections::HashSet<String>,
    /// (disk, seq, ts_ns, reason)
    gaps: &'a [(String, u64, u64, String)],
}

impl CatalogView<'_> {
    /// The time of `seq` of `disk`, interpolated within its segment.
    fn time_of(&self, disk: &str, seq: u64) -> Option<u64> {
        let s = self
            .segments
            .iter()
            .find(|s| s.disk == disk && s.first_seq <= seq && seq <= s.last_seq)?;
        let span = (s.last_seq - s.first_seq).max(1) as u128;
        let dt = s.last_ts_ns.saturating_sub(s.first_ts_ns) as u128;
        Some(s.first_ts_ns + (dt * (seq - s.first_seq) as u128 / span) as u64)
    }
}

/// One disk's lane from what this host knows: the catalog's complete
/// baselines, marks, GAPs and segments (trimmed ones too), and the resyncs
/// of the journal still on this host (a resync GAP is a window, healed
/// where its RESYNCED is known). Restorable: from a complete baseline on,
/// until a GAP, to the newest record. `cdpctl points` reads the
/// repository and is the authoritative list.
fn disk_lane(
    dir: &std::path::Path,
    uuid: &str,
    disk: &str,
    cv: &CatalogView<'_>,
) -> Result<ui::DiskTimeline, String> {
    // Local reads only (no store): any executor will do, and this one needs
    // no runtime (it runs in a forked child, or on a blocking thread).
    let h = futures::executor::block_on(restore::load_history(None, Some(dir), uuid, disk))
        .map_err(|e| e.to_string())?;
    let local_ts = |seq: u64| {
        h.entries()
            .map(|(_, e)| e)
            .find(|e| e.seq >= seq)
            .map(|e| e.ts_ns)
    };
    let newest = cv
        .segments
        .iter()
        .filter(|s| s.disk == disk)
        .map(|s| s.last_ts_ns)
        .max();
    let mut lane = ui::DiskTimeline {
        disk: disk.to_string(),
        ..Default::default()
    };
    for b in cv
        .baselines
        .iter()
        .filter(|b| b.disk == disk && b.chunks_uploaded >= b.chunks_total)
    {
        if !lane.baselines.iter().any(|x| x.seq == b.s1) {
            lane.baselines.push(ui::Baseline {
                time_ns: cv.time_of(disk, b.s1).unwrap_or(b.created_ns),
                seq: b.s1,
            });
        }
    }
    lane.marks = cv
        .marks
        .iter()
        .map(|(label, seq, time_ns)| ui::Mark {
            time_ns: *time_ns,
            seq: *seq,
            label: label.clone(),
            quiesced: cv.quiesced.contains(label),
        })
        .collect();
    for (_, seq, time_ns, reason) in cv.gaps.iter().filter(|g| g.0 == disk) {
        if h.resyncs.gaps.contains(seq) {
            lane.degraded.push(ui::Window {
                from_ns: *time_ns,
                to_ns: h.resyncs.healed_by(*seq).and_then(local_ts),
                reason: reason.clone(),
            });
        } else {
            lane.gaps.push(ui::Gap {
                time_ns: *time_ns,
                seq: *seq,
                reason: reason.clone(),
            });
        }
    }
    // Writes since the journal filled that are not journaled yet (a VM
    // stopped while degraded): unrestorable until its next start resyncs.
    if let Some(since) = unjournaled_since(dir, uuid, disk) {
        if !lane.degraded.iter().any(|w| w.to_ns.is_none()) {
            lane.degraded.push(ui::Window {
                from_ns: since,
                to_ns: None,
                reason:
                    "writes not journaled since the journal filled: the next start resyncs them"
                        .into(),
            });
        }
    }
    lane.restorable = restorable(&lane, newest);
    Ok(lane)
}

/// The `since_ns` of the disk's dirty map, when writes since then are not
/// journaled yet (docs/RELIABILITY.md, "A full journal"). Opened beneath the
/// state directory, no link followed, `O_NONBLOCK`: a FIFO planted there
/// cannot hang the page's reader. No map or a bad one: None.
fn unjournaled_since(dir: &std::path::Path, uuid: &str, disk: &str) -> Option<u64> {
    use cdp_core::journal::dirty::{Header, MapKind, HEADER_LEN};
    use std::io::Read;
    let map = StateDir::new(dir).vm(uuid).dirty_map(disk);
    let rel = map.strip_prefix(dir).ok()?;
    let mut f = cdp_core::fsat::DirFd::open(dir)
        .ok()?
        .open_beneath(rel)
        .ok()?;
    let mut b = [0u8; HEADER_LEN];
    f.read_exact(&mut b).ok()?;
    let h = Header::decode(MapKind::Dirty, &b).ok()?;
    (h.since_ns != 0).then_some(h.since_ns)
}

/// Restorable spans, in seq order: a complete baseline opens one, a GAP
/// closes it (a baseline at the GAP's seq or after opens the next), the
/// newest record ends the last; resync windows are cut out.
fn restorable(lane: &ui::DiskTimeline, newest: Option<u64>) -> Vec<ui::Span> {
    // (seq, 0 = GAP closes / 1 = baseline opens, time)
    let mut ev: Vec<(u64, u8, u64)> = lane
        .baselines
        .iter()
        .map(|b| (b.seq, 1, b.time_ns))
        .collect();
    ev.extend(lane.gaps.iter().map(|g| (g.seq, 0, g.time_ns)));
    ev.sort();
    let mut open: Option<u64> = None;
    let mut spans = Vec::new();
    for (_, k, t) in ev {
        match (k, open) {
            (1, None) => open = Some(t),
            (0, Some(a)) => {
                spans.push(ui::Span {
                    from_ns: a,
                    to_ns: t.max(a),
                });
                open = None;
            }
            _ => {}
        }
    }
    if let Some(a) = open {
        spans.push(ui::Span {
            from_ns: a,
            to_ns: newest.unwrap_or(a).max(a),
        });
    }
    let mut out = Vec::new();
    for s in spans {
        let mut cur = Some(s);
        for w in &lane.degraded {
            let Some(c) = cur else { break };
            let to = w.to_ns.unwrap_or(u64::MAX);
            if w.from_ns >= c.to_ns || to <= c.from_ns {
                continue;
            }
            if w.from_ns > c.from_ns {
                out.push(ui::Span {
                    from_ns: c.from_ns,
                    to_ns: w.from_ns,
                });
            }
            cur = (to < c.to_ns).then_some(ui::Span {
                from_ns: to,
                to_ns: c.to_ns,
            });
        }
        out.extend(cur);
    }
    out
}

/// Sample every `every` while serving; the sampler and the listener end
/// together when the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, src: Arc<Source>, page: Arc<Page>) {
    let sampler = {
        let page = page.clone();
        async move {
            loop {
                let p = page.clone();
                let _ = tokio::task::spawn_blocking(move || p.refresh()).await;
                tokio::time::sleep(page.every).await;
            }
        }
    };
    let accept = async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (src, page) = (src.clone(), page.clone());
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let svc =
                    hyper::service::service_fn(move |req| handle(req, src.clone(), page.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    };
    tokio::join!(sampler, accept);
}

fn reply(code: StatusCode, ctype: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    let h = r.headers_mut();
    h.insert(hyper::header::CONTENT_TYPE, ctype.parse().unwrap());
    // Nothing from elsewhere, no script: even an unescaped name could not run.
    h.insert(
        hyper::header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'"
            .parse()
            .unwrap(),
    );
    h.insert(
        hyper::header::X_CONTENT_TYPE_OPTIONS,
        "nosniff".parse().unwrap(),
    );
    r
}

/// `GET /` and `GET /vm/<uuid>/timeline.svg`; the rest is the metrics'.
async fn handle(
    req: Request<hyper::body::Incoming>,
    src: Arc<Source>,
    page: Arc<Page>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let svg_of = path
        .strip_prefix("/vm/")
        .and_then(|p| p.strip_suffix("/timeline.svg"))
        .map(str::to_string);
    if path != "/" && svg_of.is_none() {
        return crate::metrics::handle(req, src).await;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".into(),
        ));
    }
    let Some(host) = page.host().await else {
        return Ok(reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "no snapshot yet\n".into(),
        ));
    };
    let Some(uuid) = svg_of else {
        return Ok(reply(
            StatusCode::OK,
            "text/html; charset=utf-8",
            ui::status_page_html(&host),
        ));
    };
    match host
        .vms
        .iter()
        .find(|v| v.uuid == uuid)
        .and_then(|v| v.timeline.as_ref())
    {
        Some(t) => Ok(reply(StatusCode::OK, "image/svg+xml", ui::timeline_svg(t))),
        None => Ok(reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "no such protected VM\n".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn the_rpo_history_is_bounded_in_time_and_count() {
        let mut s = VecDeque::new();
        for i in 0..10_000u64 {
            push_sample(&mut s, i * S, i as f64);
        }
        assert!(s.len() <= RPO_SAMPLES);
        let mut s = VecDeque::new();
        let hour = 3600 * S;
        for i in 0..20u64 {
            push_sample(&mut s, i * hour, 1.0);
        }
        assert_eq!(s.front().unwrap().0, 13 * hour, "{s:?}");
    }

    /// A stopped degraded disk's dirty map names when its unjournaled
    /// window began; a FIFO planted there is no map and does not hang.
    #[test]
    fn the_dirty_map_names_the_unjournaled_window_and_a_fifo_never_hangs() {
        use cdp_core::journal::dirty::{Header, MapKind};
        const VM: &str = "0b5c6a3e-1d2f-4a5b-8c9d-0e1f2a3b4c5d";
        let t = tempfile::tempdir().unwrap();
        let map = StateDir::new(t.path()).vm(VM).dirty_map("vda");
        std::fs::create_dir_all(map.parent().unwrap()).unwrap();
        assert_eq!(unjournaled_since(t.path(), VM, "vda"), None);
        let h = Header {
            kind: MapKind::Dirty,
            disk_size: 1 << 20,
            since_ns: 77,
            gap_seq: 5,
            bitmap_crc: 0,
            synced_seq: 0,
        };
        std::fs::write(&map, h.encode()).unwrap();
        assert_eq!(unjournaled_since(t.path(), VM, "vda"), Some(77));
        std::fs::remove_file(&map).unwrap();
        nix::unistd::mkfifo(&map, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert_eq!(unjournaled_since(t.path(), VM, "vda"), None);
    }

    #[test]
    fn restorable_spans_start_at_a_baseline_and_stop_at_gaps_and_windows() {
        let lane = ui::DiskTimeline {
            disk: "vda".into(),
            baselines: vec![
                ui::Baseline {
                    time_ns: 10,
                    seq: 1,
                },
                ui::Baseline {
                    time_ns: 60,
                    seq: 9,
                },
            ],
            gaps: vec![ui::Gap {
                time_ns: 40,
                seq: 5,
                reason: "x".into(),
            }],
            degraded: vec![ui::Window {
                from_ns: 70,
                to_ns: Some(80),
                reason: "full".into(),
            }],
            ..Default::default()
        };
        let spans: Vec<(u64, u64)> = restorable(&lane, Some(100))
            .iter()
            .map(|s| (s.from_ns, s.to_ns))
            .collect();
        assert_eq!(spans, vec![(10, 40), (60, 70), (80, 100)]);
        let open = ui::DiskTimeline {
            degraded: vec![ui::Window {
                from_ns: 70,
                to_ns: None,
                reason: "full".into(),
            }],
            ..lane
        };
        let spans: Vec<(u64, u64)> = restorable(&open, Some(100))
            .iter()
            .map(|s| (s.from_ns, s.to_ns))
            .collect();
        assert_eq!(spans, vec![(10, 40), (60, 70)]);
    }
}
