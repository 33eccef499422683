//! `cdpctl export VM --disk D --at POINT --socket PATH`: a read-only NBD
//! export of a point, served without materialising the image (instant
//! recovery). The image is `cdp_repo::export::PointImage`, the NBD server
//! `cdp_core::nbd::server`; this is the command line, the socket and the
//! signals.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cdp_core::nbd::server::{self, Limits, Server};
use cdp_core::time::{fmt_ns, now_ns};
use cdp_repo::export::PointImage;
use cdp_repo::restore::Point;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::stat::{umask, Mode};

use crate::progress::{self, Meter, Mode as Show};
use crate::restore_cmd::{
    candidate_repos, prepare_with, resolve_vm, with_fallback, Prepared, RepoArgs, Used,
};
use crate::Ctx;

#[derive(clap::Args)]
pub struct ExportArgs {
    /// VM name or UUID.
    pub vm: String,
    /// The disk (target name, e.g. vda).
    #[arg(long)]
    pub disk: String,
    /// The point: RFC 3339 time, "10 minutes ago", seq:N, mark:LABEL or latest.
    #[arg(long)]
    pub at: String,
    /// Unix socket to serve on (export name = the disk name).
    #[arg(long)]
    pub socket: std::path::PathBuf,
    /// File descriptor to write READY to once the socket listens.
    #[arg(long)]
    pub ready_fd: Option<i32>,
    /// Memory for decompressed chunks and journal data, in MiB.
    #[arg(long, default_value_t = cdp_repo::export::DEFAULT_CACHE_BYTES >> 20)]
    pub cache_mib: u64,
    #[command(flatten)]
    pub repo: RepoArgs,
}

pub fn run(ctx: &Ctx, a: &ExportArgs) -> Result<()> {
    // Before any thread exists, so that every thread has them blocked.
    let signals = block_stop_signals().context("blocking SIGTERM/SIGINT")?;
    let r = serve(ctx, a, &signals);
    if let (Err(e), Some(fd)) = (&r, a.ready_fd) {
        cdp_core::proc::notify_ready(fd, &format!("ERROR {e:#}"));
    }
    r
}

fn serve(ctx: &Ctx, a: &ExportArgs, signals: &SigSet) -> Result<()> {
    cdp_core::names::check_disk(&a.disk)?;
    let point = Point::parse(&a.at, now_ns())?;
    let candidates = candidate_repos(ctx, &a.repo)?;
    let rt = tokio::runtime::Runtime::new()?;
    let point_ref = &point;
    // The progress of preparing: the bytes of the indexes and baselines
    // read (one meter for every target tried).
    let mode = Show::of(ctx.json);
    let meter = Meter::new(mode, "export", 0);
    let ticker = meter.ticker();
    let ticker = &ticker;
    // The first target of the policy that answers and can rebuild the point.
    let prepared = rt.block_on(with_fallback(candidates, |store| async move {
        let vm = resolve_vm(ctx, &store, &a.vm).await?;
        // Retention deletes nothing of the VM while the export serves
        // (refreshed in the background, removed when it stops).
        let lease = cdp_repo::lease::acquire(
            &store,
            &vm,
            "cdpctl export",
            &format!("{} at {point_ref}", a.disk),
            cdp_repo::lease::DEFAULT_TTL,
        )
        .await?;
        match prepare_with(ctx, &a.repo, &a.disk, &store, &vm, point_ref, Some(ticker)).await {
            Ok(p) => Ok((lease, p)),
            Err(e) => {
                lease.release().await;
                Err(e)
            }
        }
    }));
    meter.clear();
    let (store, used, (lease, prep)) = prepared?;
    meter.finish();
    let r = serve_leased(a, signals, &rt, (store, &used), prep, (&point, mode));
    rt.block_on(lease.release());
    // Connections still open end with the process; do not wait for them.
    rt.shutdown_background();
    r
}

fn serve_leased(
    a: &ExportArgs,
    signals: &SigSet,
    rt: &tokio::runtime::Runtime,
    (store, used): (cdp_repo::store::Store, &Used),
    prep: Prepared,
    (point, mode): (&Point, Show),
) -> Result<()> {
    let seq = prep.seq;
    let at = prep
        .history
        .entries()
        .map(|(_, e)| e)
        .filter(|e| e.seq <= seq)
        .last()
        .map(|e| format!("seq {seq}, {}", fmt_ns(e.ts_ns)))
        .unwrap_or_else(|| format!("seq {seq}"));
    let plan = prep.plan;
    let socket = std::path::absolute(&a.socket)
        .with_context(|| format!("socket path {}", a.socket.display()))?;
    let image = Arc::new(PointImage::new(
        plan,
        Some(store),
        rt.handle().clone(),
        a.cache_mib.max(1) << 20,
    )?);
    let server = Server::new(&a.disk, image.clone(), Limits::default());
    let listener = Arc::new(bind(&socket)?);
    let stop = Arc::new(AtomicBool::new(false));
    let accept = {
        let (server, listener, stop) = (server.clone(), listener.clone(), stop.clone());
        std::thread::Builder::new()
            .name("export-accept".into())
            .spawn(move || server.accept_until(&listener, &stop))?
    };
    if let Some(fd) = a.ready_fd {
        cdp_core::proc::notify_ready(fd, "READY");
    }
    let uri = format!("nbd+unix:///{}?socket={}", a.disk, socket.display());
    progress::event(
        mode,
        serde_json::json!({"event": "ready", "op": "export", "uri": uri, "disk": a.disk,
            "seq": seq, "at": at, "size": image.size(),
            "target": used.target, "repository": used.repository}),
    );
    progress::say(
        mode,
        "export",
        &format!(
            "serving {} at {point} ({at}) from {} on {uri} (read-only; SIGTERM or ^C stops)",
            a.disk,
            match &used.target {
                Some(t) => format!("target {t} ({})", used.repository),
                None => used.repository.clone(),
            },
        ),
    );
    say_cache(&image, mode);
    let sig = wait_stop_signal(signals);
    stop.store(true, Ordering::Release);
    let woken = server::wake(&listener);
    if woken.is_ok() {
        let _ = accept.join();
    }
    let _ = std::fs::remove_file(&socket);
    let st = server.stats();
    let (cached, hits, misses) = image.cache_stats();
    use std::sync::atomic::Ordering::Relaxed;
    let text = format!(
        "stopped ({sig}): {} connections, {} reads ({}), {} read errors, {} refused requests; cache {} held, {hits} hits, {misses} misses",
        st.connections.load(Relaxed),
        st.reads.load(Relaxed),
        crate::status::human(st.bytes_read.load(Relaxed)),
        st.errors.load(Relaxed),
        st.rejected.load(Relaxed),
        crate::status::human(cached),
    );
    progress::say(mode, "export", &text);
    Ok(())
}

/// How much of the disk comes from journal records, and whether the cache
/// holds it all.
fn say_cache(image: &PointImage, mode: Show) {
    let (journal, cache) = (image.journal_bytes(), image.cache_bytes());
    let text = format!(
        "{} of the {} disk come from journal records; cache {}{}",
        crate::status::human(journal),
        crate::status::human(image.size()),
        crate::status::human(cache),
        if journal > cache {
            format!(
                " (what the cache drops goes to an unlinked file in $TMPDIR or /var/tmp, up to {}, \
                 and is read back from there; --cache-mib {} keeps it all in memory)",
                crate::status::human(journal),
                (journal >> 20) + 256
            )
        } else {
            String::new()
        }
    );
    progress::say(mode, "export", &text);
}

/// Listen on `path` (mode 0600), replacing a stale socket but never a live
/// one or a file that is not a socket.
fn bind(path: &Path) -> Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => bail!(
            "{} exists and is not a socket: remove it or choose another --socket",
            path.display()
        ),
        Ok(_) => {
            if UnixStream::connect(path).is_ok() {
                bail!(
                    "{} is already served by another process (it answers): stop that one or choose another --socket",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("{}: removing the stale socket", path.display()))?;
        }
        Err(_) => {}
    }
    // Owner only from the start: no window where others could connect.
    let old = umask(Mode::from_bits_truncate(0o177));
    let l = UnixListener::bind(path);
    umask(old);
    let listener = l.with_context(|| format!("{}: binding the socket", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("{}: setting the socket's mode", path.display()))?;
    Ok(listener)
}

/// Block SIGTERM and SIGINT so that [`wait_stop_signal`] receives them.
/// Call before any thread (a tokio runtime) starts: threads inherit the
/// mask, and a signal delivered to a thread that has it unblocked would
/// kill the process without cleaning up.
fn block_stop_signals() -> nix::Result<SigSet> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block()?;
    Ok(set)
}

/// Wait for SIGTERM or SIGINT; returns its name.
fn wait_stop_signal(set: &SigSet) -> &'static str {
    loop {
        match set.wait() {
            Ok(Signal::SIGINT) => return "SIGINT",
            Ok(_) => return "SIGTERM",
            Err(_) => continue,
        }
    }
}
