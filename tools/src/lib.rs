//! cdpctl: the admin command line. Each subcommand is a module; `main` only
//! parses arguments and calls [`run`]. The config is loaded once, into
//! [`Ctx`], and every path under the state and run directories is built
//! through `cdp_core::layout`.

pub mod baseline_cmd;
pub mod boot_cmd;
pub mod define;
pub mod export_cmd;
pub mod files_cmd;
pub mod gen_cmd;
pub mod install;
pub mod journal_cmd;
pub mod points_svg;
pub mod progress;
pub mod protect_cmd;
pub mod prune_cmd;
pub mod quiesce;
pub mod repo_cmd;
pub mod restore_cmd;
pub mod restore_vm;
pub mod status;
pub mod verify_cmd;

use std::path::PathBuf;

use anyhow::{bail, Result};
use cdp_core::config::Config;
use cdp_core::layout::{RunDir, StateDir};
use cdp_core::privsep::VmIdentity;
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cdpctl",
    version,
    about = "cdpd's admin command line: protect VMs, restore their disks at any point, check and prune the repository",
    long_about = "cdpd's admin command line.\n\n\
        Get a disk back: restore (to a file or in place), export (an instant read-only NBD export), \
        files (list or copy single files of a point, through libguestfs), \
        restore-config (the VM definition at a point), points (the timeline).\n\
        Check the repository: verify [--deep], prune (retention).\n\
        Protect VMs: install / uninstall (programs, hook, unit, AppArmor), protect / unprotect (a libvirt domain).\n\
        Watch capture: status (RPO, backlog, targets), mark, baseline, journal (inspect or replay the local journal).\n\
        Shell completions: `cdpctl completions bash|zsh|fish`; man pages: cdpctl(1), cdpctl-SUBCOMMAND(1)."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Args, Clone)]
pub struct Global {
    /// Config file (default: $CDP_CONFIG, else /etc/cdp/cdp.toml when it exists).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// State directory; overrides the config's [paths].
    #[arg(long, global = true)]
    pub state_dir: Option<PathBuf>,
    /// Run directory; overrides the config's [paths].
    #[arg(long, global = true)]
    pub run_dir: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Show what the capture daemons are doing (all running VMs, or one).
    Status(status::StatusArgs),
    /// Write a MARK into every disk of a running VM at one sequence number.
    Mark(status::MarkArgs),
    /// Take a full baseline of a VM's disks into the policy's targets.
    Baseline(baseline_cmd::BaselineArgs),
    /// Restore a disk as it was at a point: to a file, or in place.
    Restore(restore_cmd::RestoreArgs),
    /// Show each disk's timeline: restorable ranges, baselines, marks, gaps, flushes.
    Points(restore_cmd::PointsArgs),
    /// Serve a point as a read-only NBD export, at once, without copying it.
    Export(export_cmd::ExportArgs),
    /// Boot a point as a new VM at once: NBD exports, qcow2 overlays, a remapped definition.
    Boot(boot_cmd::BootArgs),
    /// Check that every point can be rebuilt and (--deep) every object is intact.
    Verify(verify_cmd::VerifyArgs),
    /// The VM definition as it was at a point, with storage paths remapped.
    RestoreConfig(verify_cmd::RestoreConfigArgs),
    /// List or copy files of a disk as it was at a point (read-only, through libguestfs).
    Files(files_cmd::FilesArgs),
    /// Inspect or replay a VM's local journal.
    #[command(subcommand)]
    Journal(journal_cmd::JournalCmd),
    /// Apply the VM's retention policy to its targets: thin old points, compact, delete.
    Prune(prune_cmd::PruneArgs),
    /// Create a repository (with --encrypt: an encrypted one).
    #[command(subcommand)]
    Repo(repo_cmd::RepoCmd),
    /// Install cdpd's programs, config, libvirt hook and systemd unit (idempotent).
    Install(install::InstallArgs),
    /// Remove what `install` wrote (config and state kept unless --purge).
    Uninstall(install::UninstallArgs),
    /// Protect a libvirt VM's disks: CDP keys in its definition, cdp-qemu as emulator.
    Protect(protect_cmd::ProtectArgs),
    /// Undo `protect`: the definition as it was before.
    Unprotect(protect_cmd::UnprotectArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(gen_cmd::CompletionsArgs),
    /// Write the man pages into a directory (used by scripts/package).
    #[command(hide = true)]
    Man(gen_cmd::ManArgs),
    /// The libvirt hook (run by /etc/libvirt/hooks/qemu.d/cdp; domain XML on stdin).
    #[command(hide = true)]
    LibvirtHook(protect_cmd::HookArgs),
}

/// What every command shares: the config, loaded once, and the state and
/// run directories it (or the command line) names.
pub struct Ctx {
    pub config: Config,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub json: bool,
}

impl Ctx {
    pub fn new(g: &Global) -> Result<Ctx> {
        let config = Config::load(g.config.as_deref())?;
        Ok(Ctx {
            state_dir: config.state_dir(g.state_dir.as_deref()),
            run_dir: config.run_dir(g.run_dir.as_deref()),
            config,
            json: g.json,
        })
    }

    /// The state directory, through which every path under it is built.
    pub fn state(&self) -> StateDir {
        StateDir::new(&self.state_dir)
    }

    /// The run directory, through which every path under it is built.
    pub fn run(&self) -> RunDir {
        RunDir::new(&self.run_dir)
    }

    /// Resolve a VM given by name or UUID to its UUID: a name is looked up
    /// in the VMs' catalogs (each read as its VM's user).
    pub fn resolve_vm(&self, vm: &str) -> Result<String> {
        if let Ok(u) = cdp_core::names::check_uuid(vm) {
            return Ok(u.hyphenated().to_string());
        }
        let vms = self.state().vms_with_catalog()?;
        if vms.is_empty() {
            bail!(
                "no VM has a catalog under {}: give the VM's UUID, or the right --state-dir",
                self.state().vms().display()
            );
        }
        for uuid in vms {
            if self
                .with_catalog(&uuid, |c| c.vm_name(&uuid))
                .ok()
                .flatten()
                .as_deref()
                == Some(vm)
            {
                return Ok(uuid);
            }
        }
        bail!(
            "no VM named {vm:?} under {}: check the name, or give its UUID",
            self.state().vms().display()
        )
    }

    /// Does the VM have a catalog on this host?
    pub fn has_catalog(&self, uuid: &str) -> bool {
        self.state().vm(uuid).catalog().exists()
    }

    /// Run `f` on the VM's catalog as the VM's user (docs/DESIGN.md, "Trust
    /// boundaries"): root never opens a catalog QEMU's user can write; a
    /// child with the identity of `<state>/vms/<uuid>` does.
    pub fn with_catalog<T, F>(&self, uuid: &str, f: F) -> Result<T>
    where
        T: serde::Serialize + serde::de::DeserializeOwned,
        F: FnOnce(&cdp_core::catalog::Catalog) -> Result<T, cdp_core::catalog::CatalogError>,
    {
        let state = self.state();
        let id = VmIdentity::of(&state, uuid)?;
        let dir = self.state_dir.clone();
        Ok(id.run(state.vm(uuid).path(), || {
            let cat = cdp_core::catalog::Catalog::open(&dir, uuid).map_err(|e| e.to_string())?;
            f(&cat).map_err(|e| e.to_string())
        })?)
    }

    /// Talk to the VM's cdpd over its control socket from a child with the
    /// identity of `<run>/<uuid>`: the socket's path lies in a
    /// directory QEMU's user owns, so root never connects through it (a
    /// symlink there could point root's request at any socket of the host).
    pub fn with_control<T, F>(&self, uuid: &str, f: F) -> Result<T>
    where
        T: serde::Serialize + serde::de::DeserializeOwned,
        F: FnOnce(&cdp_core::control::Client) -> Result<T, String>,
    {
        let id = VmIdentity::of_run(&self.run(), uuid)?;
        let sock = self.run().vm(uuid).control_socket();
        Ok(id.run(&sock, || f(&cdp_core::control::Client::new(&sock)))?)
    }

    /// Drop this whole process to the VM's identity, for a command that
    /// works only on that VM's state and needs nothing of root afterwards.
    pub fn enter_vm(&self, uuid: &str) -> Result<()> {
        VmIdentity::of(&self.state(), uuid)?.enter()?;
        Ok(())
    }
}

pub fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub fn run(cli: Cli) -> Result<()> {
    // Before the config is read: install writes it, uninstall works with a broken one.
    match &cli.cmd {
        Cmd::Install(a) => return install::install(&cli.global, a),
        Cmd::Uninstall(a) => return install::uninstall(&cli.global, a),
        // Generated from the CLI definition alone.
        Cmd::Completions(a) => return gen_cmd::completions(a),
        Cmd::Man(a) => return gen_cmd::man(a),
        // Works on a URL, without a config.
        Cmd::Repo(c) => return repo_cmd::run(cli.global.json, c),
        _ => {}
    }
    // Before the config is read: the hook must not fail a VM without CDP keys.
    if let Cmd::LibvirtHook(a) = &cli.cmd {
        return protect_cmd::hook(&cli.global, a);
    }
    let ctx = Ctx::new(&cli.global)?;
    match cli.cmd {
        Cmd::Files(a) => files_cmd::run(&ctx, &a),
        Cmd::Status(a) => status::status(&ctx, &a),
        Cmd::Mark(a) => status::mark(&ctx, &a),
        Cmd::Journal(c) => journal_cmd::run(&ctx, c),
        Cmd::Baseline(a) => baseline_cmd::run(&ctx, &a),
        Cmd::Restore(a) => restore_cmd::restore(&ctx, &a),
        Cmd::Points(a) => restore_cmd::points(&ctx, &a),
        Cmd::Export(a) => export_cmd::run(&ctx, &a),
        Cmd::Boot(a) => boot_cmd::run(&ctx, cli.global.config.as_deref(), &a),
        Cmd::Verify(a) => verify_cmd::verify(&ctx, &a),
        Cmd::Prune(a) => prune_cmd::run(&ctx, &a),
        Cmd::RestoreConfig(a) => verify_cmd::restore_config(&ctx, &a),
        Cmd::Install(_) | Cmd::Uninstall(_) | Cmd::Completions(_) | Cmd::Man(_) | Cmd::Repo(_) => {
            unreachable!("handled before the config is read")
        }
        Cmd::Protect(a) => protect_cmd::protect(&ctx, &a),
        Cmd::Unprotect(a) => protect_cmd::unprotect(&ctx, &a),
        Cmd::LibvirtHook(_) => unreachable!("handled above"),
    }
}
