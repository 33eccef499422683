//! `cdpd run`: start-up (recovery, session bookkeeping, sockets), serving,
//! and the clean stop.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::thread::JoinHandle;

use nix::sys::socket::{shutdown, Shutdown};
use nix::sys::stat::{umask, Mode};

use thiserror::Error;

use cdp_core::catalog::{Catalog, CatalogError};
use cdp_core::config::JournalSettings;
use cdp_core::image;
use cdp_core::journal::Kind;
use cdp_core::layout::{RunDir, StateDir};
use cdp_core::names;
use cdp_core::proc::{die_with_parent, notify_ready};
use cdp_core::session::{self, DiskImage, PreviousEnd};
use cdp_core::time::now_ns;

use crate::capture::{self, DiskSetup, SyncJob, Vm, VmSetup};
use crate::limits::{self, ConnSet, Limits};

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error(transparent)]
    Name(#[from] names::NameError),
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error(transparent)]
    Session(#[from] session::SessionError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk {0} is given twice")]
    DuplicateDisk(String),
    #[error("no disk given: add --disk NAME=PATH")]
    NoDisk,
    #[error("socket {0} is served by a running cdpd already: stop that one first")]
    AlreadyServed(PathBuf),
    #[error("reading the boot id from {path}: {source}")]
    BootId {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl Fn(io::Error) -> DaemonError + 'a {
    move |source| DaemonError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// What `cdpd run` was asked to do.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub vm_uuid: String,
    pub vm_name: String,
    pub disks: Vec<(String, PathBuf)>,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub settings: JournalSettings,
    /// The policy (`--policy`), recorded in the catalog for cdp-agent.
    pub policy: String,
    pub boot_id_file: PathBuf,
    /// SIGTERM ourselves when the parent (QEMU, after cdp-qemu's exec) exits.
    pub die_with_parent: bool,
    /// Connection caps and timeouts of the sockets.
    pub limits: Limits,
}

pub struct Daemon {
    pub vm: Arc<Vm>,
    pub previous_end: PreviousEnd,
    pub redone: u64,
    listeners: Vec<PathBuf>,
    /// The listening sockets, to shut down at stop (their paths may be gone).
    listen_fds: Vec<UnixListener>,
    acceptors: Vec<JoinHandle<()>>,
    control: Option<JoinHandle<()>>,
    control_path: PathBuf,
    sealer: Option<JoinHandle<()>>,
    syncers: Vec<JoinHandle<()>>,
    /// The NBD connections of each disk, then the control clients.
    conns: Vec<Arc<ConnSet>>,
}

/// What recovery leaves for the session to start from.
struct Recovery {
    setup: VmSetup,
    boot_id: String,
    /// The last seq before this start (0: none), for the pending gaps.
    previous_seq: u64,
    /// The base of a fresh history (docs/DESIGN.md, "Capture sessions").
    new_history: Option<u64>,
    prev: PreviousEnd,
    redone: u64,
    torn: u64,
    chain_breaks: Vec<String>,
}

/// Threads that do not need the sockets.
struct Workers {
    sealer: JoinHandle<()>,
    syncers: Vec<JoinHandle<()>>,
}

/// The sockets and the threads serving them.
struct Listening {
    listeners: Vec<PathBuf>,
    listen_fds: Vec<UnixListener>,
    acceptors: Vec<JoinHandle<()>>,
    control: JoinHandle<()>,
    control_path: PathBuf,
    conns: Vec<Arc<ConnSet>>,
}

impl Daemon {
    /// Recover, record the session, listen. When this returns Ok, every
    /// socket listens and the caller may report READY.
    pub fn start(opts: &RunOptions) -> Result<Daemon, DaemonError> {
        let rec = recover(opts)?;
        let (prev, redone) = (rec.prev, rec.redone);
        let (vm, rxs) = record_session(opts, rec)?;
        let workers = spawn_workers(&vm, rxs);
        let l = listen(&vm, opts)?;
        Ok(Daemon {
            vm,
            previous_end: prev,
            redone,
            listeners: l.listeners,
            listen_fds: l.listen_fds,
            acceptors: l.acceptors,
            control: Some(l.control),
            control_path: l.control_path,
            sealer: Some(workers.sealer),
            syncers: workers.syncers,
            conns: l.conns,
        })
    }

    /// Stop cleanly: finish what is in flight, seal, record SESSION_END.
    pub fn stop(mut self, reason: &str) -> Result<(), DaemonError> {
        let vm = self.vm.clone();
        vm.stopping.store(true, Ordering::Release);
        // Wake the accept loops and the control loop; they see `stopping`.
        // Shutting a listener down fails its accept() (its path may be gone
        // already); connecting covers a kernel where it would not.
        for l in &self.listen_fds {
            let _ = shutdown(l.as_raw_fd(), Shutdown::Both);
        }
        for p in self
            .listeners
            .iter()
            .chain(std::iter::once(&self.control_path))
        {
            let _ = UnixStream::connect(p);
        }
        for h in self.acceptors.drain(..) {
            let _ = h.join();
        }
        if let Some(h) = self.control.take() {
            let _ = h.join();
        }
        // No more requests: connections end after what they have read, or
        // at once after the grace when their client does not take replies.
        ConnSet::close_all(&self.conns, limits::STOP_GRACE);
        vm.close_sync();
        for h in self.syncers.drain(..) {
            let _ = h.join();
        }
        vm.wake_sealer();
        if let Some(h) = self.sealer.take() {
            let _ = h.join();
        }
        let jerr = io_err("writing the journal under", &vm.state_dir);
        let (seq, ts) = vm
            .append_to_all(Kind::SessionEnd, &serde_json::json!({ "reason": reason }))
            .map_err(&jerr)?;
        vm.seal_pass(true);
        // The image durable too: a power loss after a clean stop finds
        // every record in it (FLUSHes made the journal durable only).
        if let Err(e) = vm.checkpoint_all() {
            eprintln!("cdpd: the checkpoint at stop failed (NBD error {e}): the next start redoes the journal after the last one");
        }
        {
            let cat = vm.catalog.lock().unwrap();
            cat.set_last_seq(&vm.uuid_str, seq, ts)?;
            cat.end_session(*vm.session_id.lock().unwrap(), now_ns(), "clean")?;
        }
        for p in self
            .listeners
            .iter()
            .chain(std::iter::once(&self.control_path))
        {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_dir(RunDir::new(&vm.run_dir).vm(&vm.uuid_str).path());
        Ok(())
    }
}

/// Check the options, open the catalog and the images, recover every
/// disk's journal onto its image and end the previous session.
fn recover(opts: &RunOptions) -> Result<Recovery, DaemonError> {
    let uuid = names::check_uuid(&opts.vm_uuid)?;
    let uuid_str = uuid.hyphenated().to_string();
    names::check_vm_name(&opts.vm_name)?;
    if opts.disks.is_empty() {
        return Err(DaemonError::NoDisk);
    }
    let mut seen = std::collections::HashSet::new();
    for (d, _) in &opts.disks {
        names::check_disk(d)?;
        if !seen.insert(d.clone()) {
            return Err(DaemonError::DuplicateDisk(d.clone()));
        }
    }
    let boot_id =
        cdp_core::time::boot_id(&opts.boot_id_file).map_err(|source| DaemonError::BootId {
            path: opts.boot_id_file.clone(),
            source,
        })?;
    // Sockets and journal files: owner only.
    umask(Mode::from_bits_truncate(0o077));

    let catalog = Catalog::open(&opts.state_dir, &uuid_str)?;
    catalog.upsert_vm(&uuid_str, &opts.vm_name)?;
    catalog.set_vm_policy(&uuid_str, &opts.policy)?;

    let state = StateDir::new(&opts.state_dir);
    // The size each disk had when last served: a change is journaled as
    // RESIZE before the catalog takes the new size.
    let recorded: std::collections::HashMap<String, u64> = catalog
        .disks(&uuid_str)?
        .into_iter()
        .map(|(disk, _, size)| (disk, size))
        .collect();
    let mut images = Vec::new();
    for (name, path) in &opts.disks {
        let img = image::open(path)?;
        let size = recorded.get(name).copied().unwrap_or(img.size);
        catalog.upsert_disk(&uuid_str, name, path, size)?;
        images.push(img);
    }
    let disk_images: Vec<DiskImage> = opts
        .disks
        .iter()
        .zip(&images)
        .map(|((disk, path), img)| DiskImage {
            disk,
            path,
            file: &img.file,
        })
        .collect();
    let recovered = session::recover_journals(&catalog, &state, &uuid, &disk_images, &boot_id)?;
    drop(disk_images);
    let mut disks = Vec::new();
    for (((name, path), img), rec) in opts.disks.iter().zip(images).zip(&recovered.disks) {
        let next_base = rec
            .next_base
            .max(catalog.next_record_base(&uuid_str, name)?);
        disks.push(DiskSetup {
            name: name.clone(),
            path: path.clone(),
            image: img,
            journal_dir: state.journal(&uuid_str, name),
            next_base,
            last_seq: rec.last_seq,
        });
    }
    let (cat_seq, cat_ts) = catalog.last_seq(&uuid_str)?;
    let last = catalog.last_session(&uuid_str)?;
    let prev = recovered.previous_end(last.as_ref(), &boot_id);
    session::end_open_session(&catalog, last.as_ref(), prev)?;
    let previous_seq = recovered.last_seq().max(cat_seq);
    let mut last_ts = recovered.last_ts_ns().max(cat_ts);
    let (last_seq, new_history) = if session::is_fresh_history(cat_seq, recovered.had_records()) {
        let base = session::new_history_base(now_ns());
        (base, Some(base))
    } else {
        let seq = journal_resizes(
            &catalog,
            &uuid,
            &recorded,
            &mut disks,
            previous_seq,
            &mut last_ts,
        )?;
        (seq, None)
    };
    for d in &disks {
        catalog.upsert_disk(&uuid_str, &d.name, &d.path, d.image.size)?;
    }
    Ok(Recovery {
        setup: VmSetup {
            uuid,
            name: opts.vm_name.clone(),
            disks,
            settings: opts.settings,
            catalog,
            state_dir: opts.state_dir.clone(),
            run_dir: opts.run_dir.clone(),
            last_seq,
            last_ts,
        },
        boot_id,
        previous_seq,
        new_history,
        prev,
        redone: recovered.redone(),
        torn: recovered.torn_bytes(),
        chain_breaks: recovered.chain_breaks(),
    })
}

/// A disk whose image size differs from the size the catalog recorded for
/// it (resized while the VM was stopped) gets a RESIZE in its journal, at
/// one seq after `last_seq` shared by every resized disk, before the session
/// starts (docs/DESIGN.md, "Capture sessions"). Returns the last seq.
fn journal_resizes(
    catalog: &Catalog,
    uuid: &uuid::Uuid,
    recorded: &std::collections::HashMap<String, u64>,
    disks: &mut [DiskSetup],
    last_seq: u64,
    last_ts: &mut u64,
) -> Result<u64, DaemonError> {
    let seq = last_seq + 1;
    let ts = now_ns().max(*last_ts);
    let mut any = false;
    for d in disks.iter_mut() {
        let Some(&old_size) = recorded.get(&d.name) else {
            continue;
        };
        if old_size == d.image.size {
            continue;
        }
        let r = session::Resize {
            seq,
            ts_ns: ts,
            record_base: d.next_base,
            old_size,
            new_size: d.image.size,
        };
        // (A dirty map or activity log made for the old size that tracks
        // nothing is made again for the new one when the capture opens it.)
        session::journal_resize(catalog, &d.journal_dir, uuid, &d.name, &r)?;
        eprintln!(
            "cdpd: disk {} was resized from {old_size} to {} bytes while the VM was stopped: \
             journaled as RESIZE at seq {seq}",
            d.name, d.image.size
        );
        d.next_base += 1;
        d.last_seq = seq;
        any = true;
    }
    if !any {
        return Ok(last_seq);
    }
    *last_ts = ts;
    Ok(seq)
}

/// Start the session: SESSION_START in every journal, then a GAP for each
/// reason the history is incomplete, made durable before the catalog
/// records the session.
fn record_session(
    opts: &RunOptions,
    rec: Recovery,
) -> Result<(Arc<Vm>, Vec<Receiver<SyncJob>>), DaemonError> {
    let previous_seq = rec.previous_seq;
    let (vm, rxs) = Vm::new(rec.setup);
    let uuid_str = vm.uuid_str.clone();
    let boot_id = rec.boot_id;
    let jerr = |e| io_err("writing the journal under", &opts.state_dir)(e);
    let (start_seq, _) = vm
        .append_to_all(
            Kind::SessionStart,
            &serde_json::json!({
                "boot_id": boot_id,
                "pid": vm.pid,
                "previous_end": rec.prev.as_str(),
                "redone_records": rec.redone,
                "torn_bytes": rec.torn,
                "version": env!("CARGO_PKG_VERSION"),
            }),
        )
        .map_err(jerr)?;
    let mut gap_reasons = Vec::new();
    if let Some(base) = rec.new_history {
        gap_reasons.push(session::new_history_reason(base));
    }
    // After a power loss, a valid activity log on every disk bounds what
    // may differ between journal and image: those extents are resynced
    // (docs/RELIABILITY.md, "A power loss"); else a new baseline is needed.
    let mut resync_gap = None;
    if rec.prev == PreviousEnd::PowerLoss {
        match vm.power_loss_extents() {
            Some((extents, bytes)) => resync_gap = Some(serde_json::json!({
                "reason": format!(
                    "power loss: the host rebooted (boot id now {boot_id}) after capture ended \
                     uncleanly: writes not yet durable may be missing from the journal; the \
                     {extents} extents ({bytes} bytes) of the activity log that may hold them are \
                     journaled again from the image (RESYNC records), then RESYNCED heals this gap"
                ),
                "resync": true,
                "extents": extents,
                "bytes": bytes,
            })),
            None => gap_reasons.push(format!(
                "the host rebooted (boot id now {boot_id}) after capture ended uncleanly: \
                 writes acknowledged before the reboot may be missing from the journal or the image \
                 (no valid activity log bounds them); a new baseline is needed"
            )),
        }
    }
    for b in rec.chain_breaks {
        gap_reasons.push(format!("journal chain broken: {b}"));
    }
    // Gaps a tool recorded while the VM was stopped (in-place restore):
    // already in the catalog, journaled now.
    let pending: Vec<String> = vm
        .catalog
        .lock()
        .unwrap()
        .gaps_after(&uuid_str, previous_seq)?
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    for reason in gap_reasons {
        let (seq, ts) = vm
            .append_to_all(Kind::Gap, &serde_json::json!({ "reason": reason }))
            .map_err(jerr)?;
        let cat = vm.catalog.lock().unwrap();
        for d in &vm.disks {
            cat.add_gap(&uuid_str, &d.name, seq, ts, &reason)?;
        }
    }
    for reason in pending {
        vm.append_to_all(Kind::Gap, &serde_json::json!({ "reason": reason }))
            .map_err(jerr)?;
    }
    // The RESYNCED heals from a floor made durable in the activity logs
    // before the GAP: a second power loss before the dirty maps hold the
    // extents leaves the logs as they were, and the next start's RESYNCED
    // then heals this GAP as well as its own.
    let resync_seq = match &resync_gap {
        Some(gap) => {
            let floor = vm.power_loss_gap_floor(vm.last_seq() + 1);
            let seq = vm.append_to_all(Kind::Gap, gap).map_err(jerr)?.0;
            Some(floor.map_or(seq, |f| f.min(seq)))
        }
        None => None,
    };
    vm.sync_open_segments().map_err(jerr)?;
    if let Some(seq) = resync_seq {
        vm.resync_after_power_loss(seq);
    }
    vm.reset_activity_logs();
    // Recovery synced the images: the first checkpoint, so that trimming
    // and a power loss's redo start from here.
    if let Err(e) = vm.checkpoint_all() {
        eprintln!("cdpd: the checkpoint at start failed (NBD error {e}): the next one is tried in a sealer pass");
    }
    {
        let cat = vm.catalog.lock().unwrap();
        let id = cat.start_session(
            &uuid_str,
            &boot_id,
            vm.pid,
            now_ns(),
            start_seq,
            rec.prev.as_str(),
        )?;
        *vm.session_id.lock().unwrap() = id;
    }
    Ok((vm, rxs))
}

/// The sync thread of every disk and the sealer.
fn spawn_workers(vm: &Arc<Vm>, rxs: Vec<Receiver<SyncJob>>) -> Workers {
    let mut syncers = Vec::new();
    for (d, rx) in vm.disks.iter().zip(rxs) {
        let d = d.clone();
        syncers.push(
            std::thread::Builder::new()
                .name(format!("sync-{}", d.name))
                .spawn(move || Vm::sync_loop(&d, rx))
                .expect("spawn"),
        );
    }
    let sealer = {
        let vm = vm.clone();
        std::thread::Builder::new()
            .name("sealer".into())
            .spawn(move || vm.sealer_loop())
            .expect("spawn")
    };
    Workers { sealer, syncers }
}

/// Bind every disk's NBD socket and the control socket, each with its thread.
fn listen(vm: &Arc<Vm>, opts: &RunOptions) -> Result<Listening, DaemonError> {
    let dir = RunDir::new(&opts.run_dir)
        .vm(&vm.uuid_str)
        .path()
        .to_path_buf();
    std::fs::create_dir_all(&dir).map_err(io_err("creating run directory", &dir))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("setting permissions of", &dir))?;
    let mut conns = Vec::new();
    let mut listeners = Vec::new();
    let mut listen_fds = Vec::new();
    let mut acceptors = Vec::new();
    for d in &vm.disks {
        let path = vm.socket_path(&d.name);
        let l = bind(&path)?;
        listen_fds.push(l.try_clone().map_err(io_err("cloning socket", &path))?);
        listeners.push(path);
        let set = Arc::new(ConnSet::new(opts.limits.max_conns));
        conns.push(set.clone());
        let (vm, d, lim) = (vm.clone(), d.clone(), opts.limits);
        acceptors.push(
            std::thread::Builder::new()
                .name(format!("accept-{}", d.name))
                .spawn(move || accept_loop(&vm, d, l, &set, &lim))
                .expect("spawn"),
        );
    }
    let control_path = RunDir::new(&opts.run_dir).vm(&vm.uuid_str).control_socket();
    let cl = bind(&control_path)?;
    listen_fds.push(
        cl.try_clone()
            .map_err(io_err("cloning socket", &control_path))?,
    );
    let clients = Arc::new(ConnSet::new(opts.limits.max_control_clients));
    conns.push(clients.clone());
    let control = {
        let (vm, timeout) = (vm.clone(), opts.limits.control_timeout);
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || vm.control_loop(cl, &clients, timeout))
            .expect("spawn")
    };
    Ok(Listening {
        listeners,
        listen_fds,
        acceptors,
        control,
        control_path,
        conns,
    })
}

/// Bind a socket, replacing a stale one but never a live one.
fn bind(path: &Path) -> Result<UnixListener, DaemonError> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(DaemonError::AlreadyServed(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io_err("removing stale socket", path))?;
    }
    let l = UnixListener::bind(path).map_err(io_err("binding socket", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err("setting permissions of", path))?;
    Ok(l)
}

fn accept_loop(
    vm: &Arc<Vm>,
    disk: Arc<capture::Disk>,
    l: UnixListener,
    conns: &Arc<ConnSet>,
    lim: &Limits,
) {
    let socket = format!("disk {}'s NBD socket", disk.name);
    for stream in l.incoming() {
        if vm.stopping.load(Ordering::Acquire) {
            return;
        }
        let Ok(stream) = stream else {
            if vm.stopping.load(Ordering::Acquire) {
                return;
            }
            // Out of descriptors or memory: do not spin.
            std::thread::sleep(std::time::Duration::from_millis(20));
            continue;
        };
        if let Err(who) = limits::check_peer(&stream) {
            disk.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
            limits::log_refused(&socket, who);
            continue;
        }
        // Over the cap, the connection is closed at once (dropped).
        let Some(id) = conns.admit(&stream) else {
            continue;
        };
        let (vm2, d2, conns2, lim) = (vm.clone(), disk.clone(), conns.clone(), *lim);
        let h = std::thread::Builder::new()
            .name(format!("nbd-{}-{id}", disk.name))
            .spawn(move || {
                d2.stats.connections.fetch_add(1, Ordering::Relaxed);
                // A misbehaving client ends its own connection, nothing else.
                let _ = capture::conn::serve(&vm2, &d2, stream, &lim);
                d2.stats.connections.fetch_sub(1, Ordering::Relaxed);
                conns2.leave(id);
            });
        match h {
            Ok(h) => conns.add_thread(h),
            Err(_) => conns.leave(id),
        }
    }
}

/// Run until SIGTERM or SIGINT, then stop cleanly.
pub fn run(opts: &RunOptions, ready_fd: Option<RawFd>) -> Result<(), DaemonError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .map_err(io_err("installing signal handlers", Path::new("-")))?;
    if opts.die_with_parent {
        die_with_parent().map_err(io_err("setting the parent-death signal", Path::new("-")))?;
    }
    let daemon = match Daemon::start(opts) {
        Ok(d) => d,
        Err(e) => {
            if let Some(fd) = ready_fd {
                notify_ready(fd, &format!("ERROR {e}"));
            }
            return Err(e);
        }
    };
    if let Some(fd) = ready_fd {
        notify_ready(fd, "READY");
    }
    eprintln!(
        "cdpd: serving VM {} ({}) disks [{}] under {}; previous run: {}; {} records redone",
        daemon.vm.name,
        daemon.vm.uuid_str,
        daemon
            .vm
            .disks
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        RunDir::new(&opts.run_dir)
            .vm(&daemon.vm.uuid_str)
            .path()
            .display(),
        daemon.previous_end.as_str(),
        daemon.redone,
    );
    let sig = signals.forever().next().unwrap_or(SIGTERM);
    let reason = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
    daemon.stop(reason)?;
    Ok(())
}
