//! `cdpd`: the capture daemon. Argument parsing only; see the library.

use std::os::fd::RawFd;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cdpd",
    version,
    about = "cdpd capture daemon: serves a VM's disks over NBD and journals every write"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the disks of one VM until SIGTERM.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// The VM's UUID.
    #[arg(long)]
    vm_uuid: String,
    /// The VM's name.
    #[arg(long)]
    vm_name: String,
    /// A disk to protect, as TARGET=PATH (e.g. vda=/var/lib/libvirt/images/web.raw). Repeatable.
    #[arg(long = "disk", value_name = "TARGET=PATH", required = true)]
    disks: Vec<String>,
    /// State directory (journal, catalog); overrides the config's [paths].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Run directory (sockets); overrides the config's [paths].
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// File descriptor to write READY (or ERROR …) to once every socket listens.
    #[arg(long)]
    ready_fd: Option<RawFd>,
    /// Config file (default /etc/cdp/cdp.toml when it exists).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Policy whose journal settings apply.
    #[arg(long, default_value = "default")]
    policy: String,
    /// Seal journal segments at this size (overrides the policy), e.g. 64MiB.
    #[arg(long)]
    segment_size: Option<String>,
    /// Seal journal segments at this age (overrides the policy), e.g. 1s.
    #[arg(long)]
    segment_age: Option<String>,
    /// Make a written disk's image durable at least this often (overrides
    /// the policy's `checkpoint_interval`), e.g. 30s.
    #[arg(long)]
    checkpoint_interval: Option<String>,
    /// How much of each disk's newest journal to leave in the page cache
    /// (overrides the policy's `journal_cache`), e.g. 256MiB.
    #[arg(long)]
    journal_cache: Option<String>,
    /// Stop cleanly (as on SIGTERM) when the parent process exits: cdp-qemu
    /// forks cdpd and then becomes QEMU, so this ends capture when QEMU ends.
    #[arg(long)]
    die_with_parent: bool,
    /// Where the host's boot id is read (tests use it to simulate a reboot).
    #[arg(long, default_value = "/proc/sys/kernel/random/boot_id", hide = true)]
    boot_id_file: PathBuf,
    /// How long a client may stay silent during the NBD handshake (tests
    /// shorten it; default: cdpd::limits::Limits's).
    #[arg(long, value_parser = parse_duration, hide = true)]
    handshake_timeout: Option<std::time::Duration>,
    /// How long a reply may wait for its client to take it before the
    /// connection is dropped (tests shorten it; default: Limits's).
    #[arg(long, value_parser = parse_duration, hide = true)]
    write_timeout: Option<std::time::Duration>,
    /// How long a control client has for a request and its reply (tests
    /// shorten it; default: Limits's).
    #[arg(long, value_parser = parse_duration, hide = true)]
    control_timeout: Option<std::time::Duration>,
    /// How long a client holding shared memory for a large WRITE has to
    /// send the rest of it (tests shorten it; default: Limits's).
    #[arg(long, value_parser = parse_duration, hide = true)]
    payload_timeout: Option<std::time::Duration>,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    cdp_core::config::parse_duration(s).map_err(|e| e.to_string())
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => run(a),
    };
    if let Err(e) = r {
        eprintln!("cdpd: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(a: RunArgs) -> Result<()> {
    let config = cdp_core::config::Config::load(a.config.as_deref())?;
    let mut settings = config.journal_settings(&a.policy)?;
    if let Some(s) = &a.segment_size {
        settings.segment_size = cdp_core::config::parse_size(s)
            .map_err(anyhow::Error::msg)
            .context("--segment-size")?;
    }
    if let Some(s) = &a.segment_age {
        settings.segment_age = cdp_core::config::parse_duration(s)
            .map_err(anyhow::Error::msg)
            .context("--segment-age")?;
    }
    if let Some(s) = &a.checkpoint_interval {
        settings.checkpoint_interval = cdp_core::config::parse_duration(s)
            .map_err(anyhow::Error::msg)
            .context("--checkpoint-interval")?;
    }
    if let Some(s) = &a.journal_cache {
        settings.journal_cache = cdp_core::config::parse_size(s)
            .map_err(anyhow::Error::msg)
            .context("--journal-cache")?;
    }
    let disks = a
        .disks
        .iter()
        .map(|d| {
            d.split_once('=')
                .map(|(n, p)| (n.to_string(), PathBuf::from(p)))
                .with_context(|| {
                    format!("--disk {d:?}: expected TARGET=PATH, e.g. vda=/path/to/disk.raw")
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let opts = cdpd::daemon::RunOptions {
        vm_uuid: a.vm_uuid,
        vm_name: a.vm_name,
        disks,
        state_dir: config.state_dir(a.state_dir.as_deref()),
        run_dir: config.run_dir(a.run_dir.as_deref()),
        settings,
        policy: a.policy,
        boot_id_file: a.boot_id_file,
        die_with_parent: a.die_with_parent,
        limits: {
            let mut l = cdpd::limits::Limits::default();
            if let Some(t) = a.handshake_timeout {
                l.handshake_timeout = t;
            }
            if let Some(t) = a.write_timeout {
                l.write_timeout = t;
            }
            if let Some(t) = a.control_timeout {
                l.control_timeout = t;
            }
            if let Some(t) = a.payload_timeout {
                l.payload_timeout = t;
            }
            l
        },
    };
    cdpd::daemon::run(&opts, a.ready_fd)?;
    Ok(())
}
