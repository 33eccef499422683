//! `cdpctl export VM --disk D --at POINT --socket PATH`: a read-only NBD
//! export of a point, served without materialising the image (instant
//! recovery). The server is `cdp_repo::export`; this is the command line.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cdp_core::time::{fmt_ns, now_ns};
use cdp_repo::export::{ExportServer, Exporter, StopSignals};
use cdp_repo::restore::{self, Point};

use crate::restore_cmd::{open_repo, resolve_vm, RepoArgs};
use crate::{Ctx, Global};

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

pub fn run(ctx: &Ctx, g: &Global, a: &ExportArgs) -> Result<()> {
    // Before any thread exists, so that every thread has them blocked.
    let signals = StopSignals::block().context("blocking SIGTERM/SIGINT")?;
    let r = serve(ctx, g, a, &signals);
    if let (Err(e), Some(fd)) = (&r, a.ready_fd) {
        cdp_core::proc::notify_ready(fd, &format!("ERROR {e:#}"));
    }
    r
}

fn serve(ctx: &Ctx, g: &Global, a: &ExportArgs, signals: &StopSignals) -> Result<()> {
    cdp_core::names::check_disk(&a.disk)?;
    let point = Point::parse(&a.at, now_ns())?;
    let store = open_repo(g, &a.repo)?;
    let rt = tokio::runtime::Runtime::new()?;
    let (vm, lease) = rt.block_on(async {
        let vm = resolve_vm(ctx, &store, &a.vm).await?;
        // Retention deletes nothing of the VM while the export serves
        // (refreshed in the background, removed when it stops).
        let lease = cdp_repo::lease::acquire(
            &store,
            &vm,
            "cdpctl export",
            &format!("{} at {point}", a.disk),
            cdp_repo::lease::DEFAULT_TTL,
        )
        .await?;
        Ok::<_, anyhow::Error>((vm, lease))
    })?;
    let r = serve_leased(ctx, a, signals, &rt, store, &vm, &point);
    rt.block_on(lease.release());
    // Connections still open end with the process; do not wait for them.
    rt.shutdown_background();
    r
}

fn serve_leased(
    ctx: &Ctx,
    a: &ExportArgs,
    signals: &StopSignals,
    rt: &tokio::runtime::Runtime,
    store: cdp_repo::store::Store,
    vm: &str,
    point: &Point,
) -> Result<()> {
    let (plan, at) = rt.block_on(async {
        let local = (!a.repo.no_local
            && cdp_core::journal::journal_dir(&ctx.state_dir, vm, &a.disk).is_dir())
        .then_some(ctx.state_dir.as_path());
        let h = restore::load_history(Some(&store), local, vm, &a.disk).await?;
        if h.segments.is_empty() && h.baselines.is_empty() {
            bail!(
                "VM {vm} has no disk {} in {} (nor on this host)",
                a.disk,
                store.url()
            );
        }
        let seq = restore::resolve(&h, Some(&store), point).await?;
        // Refuses a point that cannot be rebuilt exactly, saying why.
        let plan = restore::plan(&h, seq, point)?;
        let at = h
            .entries()
            .map(|(_, e)| e)
            .filter(|e| e.seq <= seq)
            .last()
            .map(|e| format!("seq {seq}, {}", fmt_ns(e.ts_ns)))
            .unwrap_or_else(|| format!("seq {seq}"));
        Ok::<_, anyhow::Error>((plan, at))
    })?;
    let socket = std::path::absolute(&a.socket)
        .with_context(|| format!("socket path {}", a.socket.display()))?;
    let exporter = Arc::new(Exporter::new(
        plan,
        Some(store),
        rt.handle().clone(),
        a.cache_mib.max(1) << 20,
    )?);
    let server = ExportServer::bind(&socket, exporter.clone())?;
    let stopper = server.stopper();
    let accept = std::thread::Builder::new()
        .name("export-accept".into())
        .spawn(move || server.serve())?;
    if let Some(fd) = a.ready_fd {
        cdp_core::proc::notify_ready(fd, "READY");
    }
    eprintln!(
        "serving {} at {point} ({at}) on nbd+unix:///{}?socket={} (read-only; SIGTERM or ^C stops)",
        a.disk,
        a.disk,
        socket.display()
    );
    let (journal, cache) = (exporter.journal_bytes(), exporter.cache_bytes());
    eprintln!(
        "{} of the {} disk come from journal records; cache {}{}",
        crate::status::human(journal),
        crate::status::human(exporter.size()),
        crate::status::human(cache),
        if journal > cache {
            format!(
                " (a full sequential read will fetch journal data again: --cache-mib {} holds it all)",
                (journal >> 20) + 256
            )
        } else {
            String::new()
        }
    );
    let sig = signals.wait();
    stopper.stop();
    let _ = accept.join();
    let st = &exporter.stats;
    let (cached, hits, misses) = exporter.cache_stats();
    use std::sync::atomic::Ordering::Relaxed;
    eprintln!(
        "stopped ({sig}): {} connections, {} reads ({}), {} read errors, {} refused requests; cache {} held, {hits} hits, {misses} misses",
        st.connections.load(Relaxed),
        st.reads.load(Relaxed),
        crate::status::human(st.bytes_read.load(Relaxed)),
        st.read_errors.load(Relaxed),
        st.rejected.load(Relaxed),
        crate::status::human(cached),
    );
    Ok(())
}
