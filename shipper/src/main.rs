//! `cdp-shipper`: argument parsing only; see the library.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cdp-shipper",
    version,
    about = "Ships a VM's sealed journal segments, baselines and definition to remote storage"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Ship until SIGTERM (or, with --once, ship what is sealed now and exit).
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    #[arg(long)]
    vm_uuid: String,
    #[arg(long)]
    state_dir: Option<PathBuf>,
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Config file (default /etc/cdp/cdp.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Policy whose targets receive the data.
    #[arg(long, default_value = "default")]
    policy: String,
    /// Most uploads in flight per target (scaled down when caught up).
    #[arg(long, default_value_t = 8)]
    max_parallel: usize,
    /// The VM definition (domain XML) to store whenever it changes.
    #[arg(long)]
    vm_config: Option<PathBuf>,
    /// One pass, then exit: non-zero if a target failed.
    #[arg(long)]
    once: bool,
    /// Do not take baselines by itself.
    #[arg(long)]
    no_auto_baseline: bool,
    /// Follow this process (the VM's cdpd): when it has exited, ship what is
    /// left and exit.
    #[arg(long)]
    follow_pid: Option<i32>,
    /// How often to look at the catalog for new sealed segments when the
    /// state directory cannot be watched (inotify); with the watch, a seal
    /// wakes the shipper at once and this is the longest it sleeps between
    /// looks at the catalog's data version.
    #[arg(long, default_value = "100ms", value_parser = cdp_core::config::parse_duration)]
    poll: Duration,
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let r = match cli.cmd {
        Cmd::Run(a) => rt.block_on(run(a)),
    };
    if let Err(e) = r {
        eprintln!("cdp-shipper: error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(a: RunArgs) -> Result<()> {
    use cdp_shipper::service::{self, Mode, Outcome};
    let config = cdp_core::config::Config::load(a.config.as_deref())?;
    let opts = cdp_shipper::Options {
        vm_uuid: a.vm_uuid,
        state_dir: config.state_dir(a.state_dir.as_deref()),
        run_dir: config.run_dir(a.run_dir.as_deref()),
        policy: a.policy,
        max_parallel: a.max_parallel,
        vm_config: a.vm_config,
        poll: a.poll,
        auto_baseline: !a.no_auto_baseline,
        images: Default::default(),
    };
    let s = cdp_shipper::Shipper::new(opts, &config).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mode = Mode {
        once: a.once,
        follow_pid: a.follow_pid,
        idle_pass: None,
    };
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        let _ = stop_tx.send(true);
    });
    if let Outcome::Once(st) = service::run(s, mode, stop).await? {
        println!("{}", serde_json::to_string(&st)?);
        if st.failed_targets > 0 {
            anyhow::bail!(
                "{} target(s) failed; see the messages above",
                st.failed_targets
            );
        }
    }
    Ok(())
}
