//! `cdpctl install` / `cdpctl uninstall`: put cdpd on a host (or into an image
//! tree with `--root`) without a package manager.
//!
//! Every file written comes from `packaging/` (embedded at build time) and is
//! compared by content and mode first: a second run changes nothing and says so
//! per item. Uninstall removes only what is ours by content: an operator's config
//! and state are kept unless `--purge`, a hand-edited hook or unit is left alone.
//!
//! Plan, then apply (as rustic_core's restore does): [`plan`] reads the target
//! system and decides every step ([`items`]); [`apply`] carries the steps out;
//! `--dry-run` prints the plan instead.

pub mod apply;
pub mod items;
pub mod manifest;
pub mod plan;

use std::path::{Path, PathBuf};

use clap::Args;
use serde::Serialize;
use thiserror::Error;

use crate::Global;
pub use items::{apparmor_block, hook_text, unit_text, Item, Op, Step};
pub use plan::{Plan, Target};

/// The programs of cdpd, all installed side by side.
pub const BINARIES: [&str; 5] = ["cdpd", "cdp-shipper", "cdp-qemu", "cdpctl", "cdp-agent"];

pub const CONFIG_PATH: &str = "/etc/cdp/cdp.toml";
pub const HOOK_PATH: &str = "/etc/libvirt/hooks/qemu.d/cdp";
pub const UNIT_PATH: &str = "/etc/systemd/system/cdp-agent.service";
pub const APPARMOR_DIR: &str = "/etc/apparmor.d";
pub const APPARMOR_LOCAL: &str = "/etc/apparmor.d/local/abstractions/libvirt-qemu";
/// libvirt's abstraction, which includes [`APPARMOR_LOCAL`] (without `if
/// exists` on Debian 12: removing that file breaks every VM's profile).
pub const APPARMOR_LIBVIRT_ABSTRACTION: &str = "/etc/apparmor.d/abstractions/libvirt-qemu";
/// The per-VM rules the hook writes (`cdpd/libvirt-<uuid>`).
pub const APPARMOR_RULES_DIR: &str = "/etc/apparmor.d/cdpd";
/// libvirt's per-VM profiles (`libvirt-<uuid>`), where the hook adds the line
/// including a VM's rules.
pub const APPARMOR_LIBVIRT_DIR: &str = "/etc/apparmor.d/libvirt";
pub const DEFAULT_BIN_DIR: &str = "/usr/local/bin";
/// Where the Debian package puts the programs: never copied over, never removed.
pub const PACKAGE_BIN_DIR: &str = "/usr/bin";
/// dpkg's list of the files the cdpd package owns (relative to the root).
const DPKG_LIST: &str = "/var/lib/dpkg/info/cdpd.list";

#[derive(Args, Debug, Default)]
pub struct InstallArgs {
    /// Also install the libvirt hook (/etc/libvirt/hooks/qemu.d/cdp) and, where
    /// /etc/apparmor.d exists, the AppArmor rules for QEMU.
    #[arg(long)]
    pub libvirt: bool,
    /// Also install and start the cdp-agent systemd service.
    #[arg(long)]
    pub systemd: bool,
    /// Where the programs go (default /usr/local/bin; /usr/bin when cdpctl runs from there).
    #[arg(long, value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Prefix every destination with DIR (an image tree, a test directory); runs no systemctl.
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Replace a hook or unit file that was edited by hand (normally left as it is, with an error).
    #[arg(long)]
    pub force: bool,
    /// Print what install would do; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args, Debug, Default)]
pub struct UninstallArgs {
    /// Also remove the libvirt hook and the AppArmor rules.
    #[arg(long)]
    pub libvirt: bool,
    /// Also stop, disable and remove the cdp-agent service.
    #[arg(long)]
    pub systemd: bool,
    /// Also remove the config (even edited), the state directory (journals not yet
    /// shipped, the catalog) and the run directory.
    #[arg(long)]
    pub purge: bool,
    /// Where the programs were installed (same default as install).
    #[arg(long, value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Prefix every path with DIR, as given to install.
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Print what uninstall would do; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Error)]
pub enum InstallError {
    #[error("{path}: {source} (cdpctl {op} needs write access there: run it as root, or give a writable --root)")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--root {0}: not an existing directory (create it first)")]
    BadRoot(PathBuf),
    #[error("cannot tell where cdpctl runs from: {0}")]
    NoExe(#[source] std::io::Error),
    #[error(
        "missing next to cdpctl in {dir}: {missing}. Install copies all of cdpd's programs from the \
         directory cdpctl runs from: build them all (`cargo build --release --workspace --bins`, then \
         run target/release/cdpctl) or install the cdpd package"
    )]
    MissingBinaries { dir: PathBuf, missing: String },
    #[error("{0}")]
    Config(#[from] cdp_core::config::ConfigError),
    #[error("the sample config built into cdpctl does not parse (a bug): {0}")]
    Sample(String),
    #[error(
        "{} left as it is: {}. Compare it with what cdpctl installs, keep your changes \
         elsewhere (a systemd drop-in, another hook file), then run again with --force to replace it",
        conflicts.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        if conflicts.len() == 1 { "it differs from what cdpctl installs (edited by hand?)" } else { "they differ from what cdpctl installs (edited by hand?)" }
    )]
    Modified { conflicts: Vec<PathBuf> },
    #[error("refusing to purge {path}: {why}")]
    Purge { path: PathBuf, why: String },
    #[error(
        "the cdpd package is installed here (its programs are in /usr/bin): copies in {} would \
         shadow them, and uninstalling those would take the package's files. Use the package's \
         cdpctl instead: {cmd}",
        bin_dir.display()
    )]
    Packaged { bin_dir: PathBuf, cmd: String },
    #[error("`{cmd}` failed: {why}")]
    Systemctl { cmd: String, why: String },
}

type Result<T> = std::result::Result<T, InstallError>;

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> InstallError + 'a {
    move |source| InstallError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What install or uninstall did (or, with `--dry-run`, would do).
#[derive(Debug, Serialize)]
pub struct Report {
    pub root: PathBuf,
    pub bin_dir: PathBuf,
    pub items: Vec<Item>,
    /// What the operator still has to do.
    pub next: Vec<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

impl Report {
    /// The plan as a report, nothing done.
    pub fn of_plan(plan: &Plan) -> Report {
        Report {
            root: plan.root.clone(),
            bin_dir: plan.bin_dir.clone(),
            items: plan.steps.iter().map(|s| s.item.clone()).collect(),
            next: plan.next.clone(),
            dry_run: true,
        }
    }

    pub fn changed(&self) -> bool {
        self.items.iter().any(|i| i.changed)
    }

    fn print(&self, json: bool, ok: bool) -> anyhow::Result<()> {
        if json {
            return crate::print_json(self);
        }
        for i in &self.items {
            print!("{:<9} {:<8} {}", i.action, i.kind, i.path.display());
            if let Some(d) = &i.detail {
                print!("  ({d})");
            }
            println!();
        }
        if self.dry_run {
            println!("dry run: nothing was changed; the lines above say what would be");
        } else if ok && !self.changed() {
            println!("nothing changed");
        }
        for n in &self.next {
            println!("next: {n}");
        }
        Ok(())
    }
}

/// Print the plan (`dry_run`), or apply it and print what was done.
fn finish(plan: Plan, dry_run: bool, op: &'static str) -> (Report, Result<()>) {
    if dry_run {
        let report = Report::of_plan(&plan);
        let res = match plan.conflicts.is_empty() {
            true => Ok(()),
            false => Err(InstallError::Modified {
                conflicts: plan.conflicts,
            }),
        };
        return (report, res);
    }
    apply::apply(plan, op)
}

pub fn install(g: &Global, a: &InstallArgs) -> anyhow::Result<()> {
    let t = Target::new(a.root.as_deref(), a.bin_dir.as_deref())?;
    let plan = plan::install(g, a, &t)?;
    let (report, result) = finish(plan, a.dry_run, "install");
    report.print(g.json, result.is_ok())?;
    Ok(result?)
}

pub fn uninstall(g: &Global, a: &UninstallArgs) -> anyhow::Result<()> {
    let t = Target::new(a.root.as_deref(), a.bin_dir.as_deref())?;
    let plan = plan::uninstall(g, a, &t)?;
    let (report, result) = finish(plan, a.dry_run, "uninstall");
    report.print(g.json, result.is_ok())?;
    Ok(result?)
}
