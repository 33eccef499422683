//! `cdp-agent`: argument parsing only; see the library.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cdp-agent",
    version,
    about = "Host-wide CDP service: ships journals nobody ships, applies retention, exports metrics"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run until SIGTERM (systemd Type=notify), or with --once scan once and exit.
    Run(RunArgs),
    /// Adopt one VM, as the VM's user (the agent starts this itself).
    #[command(name = "adopt-vm", hide = true)]
    AdoptVm {
        uuid: String,
        /// Images the agent opened for this VM: {"disk": [fd, "path"]}.
        #[arg(long)]
        root_images: Option<String>,
        #[command(flatten)]
        args: RunArgs,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Config file (default /etc/cdp/cdp.toml when it exists).
    #[arg(long)]
    config: Option<PathBuf>,
    /// State directory (catalog, journals); overrides the config's [paths].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Run directory (sockets); overrides the config's [paths].
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Adopt what needs it and apply retention once, print what was done as
    /// JSON, and exit (non-zero if a VM could not be adopted).
    #[arg(long)]
    once: bool,
    /// Where the host's boot id is read (tests use it to simulate a reboot).
    #[arg(long, default_value = "/proc/sys/kernel/random/boot_id", hide = true)]
    boot_id_file: PathBuf,
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
        Cmd::AdoptVm {
            uuid,
            root_images,
            args,
        } => rt.block_on(adopt_vm(uuid, root_images, args)),
    };
    if let Err(e) = r {
        cdp_agent::log_line(&format!("error: {e:#}"));
        std::process::exit(1);
    }
}

fn options(a: RunArgs) -> Result<cdp_agent::Options> {
    let config = cdp_core::config::Config::load(a.config.as_deref())?;
    Ok(cdp_agent::Options {
        state_dir: config.state_dir(a.state_dir.as_deref()),
        run_dir: config.run_dir(a.run_dir.as_deref()),
        config,
        once: a.once,
        boot_id_file: a.boot_id_file,
        config_path: a.config,
        exe: cdp_agent::child::own_exe(),
    })
}

/// The child of one adoption: its report is one JSON line on stdout.
async fn adopt_vm(uuid: String, root_images: Option<String>, a: RunArgs) -> Result<()> {
    let images =
        cdp_agent::child::take_root_images(root_images.as_deref()).map_err(anyhow::Error::msg)?;
    let opts = options(a)?;
    let stop = cdp_agent::stop_on_sigterm()?;
    // The agent's SIGTERM reaches us through it; if it dies, so do we.
    let _ = cdp_core::proc::die_with_parent();
    let report = cdp_agent::child::adopt_vm(&opts, &uuid, images, stop).await;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

async fn run(a: RunArgs) -> Result<()> {
    let opts = options(a)?;
    if opts.once {
        let report = cdp_agent::run_once(&opts).await?;
        println!("{}", serde_json::to_string(&report)?);
        if !report.failed.is_empty() {
            return Err(cdp_agent::AgentError::Incomplete(report.failed.len()).into());
        }
        return Ok(());
    }
    cdp_agent::run(&opts).await?;
    Ok(())
}
