//! Serving the control socket `<run-dir>/<vm-uuid>/control.sock`; the
//! protocol and its client are [`cdp_core::control`].

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cdp_core::control::{
    parse_request, DiskStatus, Marked, Reply, Request, Status, TargetStatus, MAX_REQUEST,
};

use super::Vm;
use crate::limits::{self, ConnSet, Deadline};

pub(super) fn journal_usage(dir: &Path) -> (u64, u64) {
    let Ok(segs) = cdp_core::journal::list_segments(dir) else {
        return (0, 0);
    };
    let bytes = segs
        .iter()
        .filter_map(|(_, p)| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    (bytes, segs.len() as u64)
}

impl Vm {
    pub fn status(&self) -> Status {
        let disks = self
            .disks
            .iter()
            .map(|d| {
                let (open, open_records, waiting, last_seq, unsealed_ts, deg, writes_in_place) = {
                    let st = d.lock_journal();
                    let deg = (st.deg.mode, st.deg.since_ns(), st.deg.dirty_bytes());
                    let unsealed_ts = st
                        .open
                        .iter()
                        .chain(st.to_seal.iter())
                        .filter(|s| s.records() > 0)
                        .map(|s| s.first_ts_ns)
                        .min();
                    (
                        st.open
                            .as_ref()
                            .and_then(|s| s.path.file_name())
                            .map(|n| n.to_string_lossy().into_owned()),
                        st.open.as_ref().map_or(0, |s| s.records() as u64),
                        st.to_seal.len() as u64,
                        st.last_seq,
                        unsealed_ts,
                        deg,
                        st.inplace.enabled(),
                    )
                };
                let ship = self.shipping_status(&d.name, unsealed_ts);
                let (journal_bytes, journal_segments) = journal_usage(&d.journal_dir);
                let s = &d.stats;
                let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
                DiskStatus {
                    disk: d.name.clone(),
                    path: d.path.display().to_string(),
                    size: d.size,
                    bytes_written: l(&s.bytes_written),
                    write_requests: l(&s.write_requests),
                    bytes_read: l(&s.bytes_read),
                    read_requests: l(&s.read_requests),
                    flushes: l(&s.flushes),
                    last_seq,
                    open_segment: open,
                    open_segment_records: open_records,
                    segments_waiting_seal: waiting,
                    in_flight: l(&s.in_flight),
                    journal_bytes,
                    journal_segments,
                    connections: l(&s.connections),
                    errors: l(&s.errors),
                    protocol_errors: l(&s.protocol_errors),
                    seal_errors: l(&s.seal_errors),
                    rpo_ms: ship.0,
                    backlog_segments: ship.1,
                    backlog_bytes: ship.2,
                    targets: ship.3,
                    journal_mode: deg.0.name().to_string(),
                    degraded: deg.0 == super::degraded::Mode::Degraded,
                    degraded_since_ns: deg.1,
                    dirty_bytes: deg.2,
                    times_degraded: l(&s.times_degraded),
                    resync_bytes_read: l(&s.resync_bytes_read),
                    resync_bytes_journaled: l(&s.resync_bytes_journaled),
                    resyncs_done: l(&s.resyncs_done),
                    checkpoints: l(&s.checkpoints),
                    checkpoint_seq: d.synced_seq.load(Ordering::Acquire),
                    writes_in_place,
                    early_acks: l(&s.early_acks),
                    journal_writebacks: l(&s.journal_writebacks),
                    image_failed: d.image_failed.load(Ordering::Acquire),
                }
            })
            .collect();
        Status {
            vm_uuid: self.uuid_str.clone(),
            vm_name: self.name.clone(),
            pid: self.pid,
            last_seq: self.last_seq(),
            segment_size: self.settings.segment_size,
            segment_age_ms: self.settings.segment_age.as_millis() as u64,
            disks,
        }
    }

    /// RPO, backlog and per-target lag of a disk, from the catalog (the
    /// shipper records what each target has).
    fn shipping_status(
        &self,
        disk: &str,
        unsealed_ts: Option<u64>,
    ) -> (u64, u64, u64, Vec<TargetStatus>) {
        let now = cdp_core::time::now_ns();
        let age = |ts: Option<u64>| ts.map_or(0, |t| now.saturating_sub(t) / 1_000_000);
        let oldest = |a: Option<u64>| match (a, unsealed_ts) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        };
        let cat = self.catalog.lock().unwrap();
        let (n, bytes, ts) = cat
            .unprotected(&self.uuid_str, disk)
            .unwrap_or((0, 0, None));
        let targets = cat
            .targets(&self.uuid_str)
            .unwrap_or_default()
            .into_iter()
            .map(|t| {
                let (tn, tb, tts) = cat
                    .backlog(&self.uuid_str, disk, &t.target)
                    .unwrap_or((0, 0, None));
                TargetStatus {
                    target: t.target,
                    url: t.url,
                    state: t.state,
                    last_error: t.last_error,
                    backlog_segments: tn,
                    backlog_bytes: tb,
                    lag_ms: age(oldest(tts)),
                }
            })
            .collect();
        (age(oldest(ts)), n, bytes, targets)
    }

    fn handle_control(&self, line: &str) -> Reply {
        match parse_request(line) {
            Ok(Request::Status) => Reply::status(self.status()),
            Ok(Request::Mark { label, quiesced }) => match self.mark(&label, quiesced) {
                Ok((seq, ts_ns)) => Reply::marked(Marked {
                    seq,
                    ts_ns,
                    quiesced,
                }),
                Err(e) => Reply::error(e.to_string()),
            },
            Err(e) => Reply::error(e),
        }
    }

    /// Serve the control socket until the listener is shut down: each
    /// client on a thread of its own (at most `clients`' cap at once; more
    /// are closed at once), only our uid or root, each request and reply
    /// within `timeout`.
    pub fn control_loop(
        self: &Arc<Self>,
        listener: UnixListener,
        clients: &Arc<ConnSet>,
        timeout: Duration,
    ) {
        for stream in listener.incoming() {
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            let Ok(stream) = stream else {
                if self.stopping.load(Ordering::Acquire) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            if let Err(who) = limits::check_peer(&stream) {
                limits::log_refused("the control socket", who);
                continue;
            }
            let Some(id) = clients.admit(&stream) else {
                continue;
            };
            let (vm, set) = (self.clone(), clients.clone());
            let h = std::thread::Builder::new()
                .name(format!("control-{id}"))
                .spawn(move || {
                    vm.serve_control(stream, timeout);
                    set.leave(id);
                });
            match h {
                Ok(h) => clients.add_thread(h),
                Err(_) => clients.leave(id),
            }
        }
    }

    /// Answer one control client's requests, a line each, until it closes
    /// or errs. Each request must arrive, and its reply be taken, within
    /// `timeout` of the previous reply (of the connection, for the first):
    /// one deadline, however slowly the client sends or reads.
    fn serve_control(&self, stream: UnixStream, timeout: Duration) {
        let mut rd = BufReader::new(Deadline::new(&stream, Instant::now() + timeout));
        let mut line = String::new();
        // Bounded: a control request is small.
        while std::io::Read::take(&mut rd, MAX_REQUEST)
            .read_line(&mut line)
            .unwrap_or(0)
            > 0
        {
            let reply = self.handle_control(line.trim()).to_line();
            let at = rd.get_ref().at;
            if Deadline::new(&stream, at)
                .write_all(reply.as_bytes())
                .is_err()
            {
                break;
            }
            line.clear();
            rd.get_mut().at = Instant::now() + timeout;
        }
    }
}
