//! `cdpctl verify` (is every point restorable, is every object intact) and
//! `cdpctl restore-config` (the VM definition of a point, storage remapped).

use anyhow::{bail, Result};

use crate::restore_cmd::RepoArgs;
use crate::{Ctx, Global};

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// VM name or UUID.
    pub vm: String,
    /// Also fetch every object and check its checksum.
    #[arg(long)]
    pub deep: bool,
    #[command(flatten)]
    pub repo: RepoArgs,
}

#[derive(clap::Args)]
pub struct RestoreConfigArgs {
    /// VM name or UUID.
    pub vm: String,
    /// The point: RFC 3339 time, "10 minutes ago", seq:N, mark:LABEL or latest.
    #[arg(long)]
    pub at: String,
    /// Rewrite storage paths: OLD=NEW (a path prefix). Repeatable.
    #[arg(long = "remap", value_name = "OLD=NEW")]
    pub remaps: Vec<String>,
    /// Where to write the domain XML (never overwritten).
    #[arg(long)]
    pub output: std::path::PathBuf,
    #[command(flatten)]
    pub repo: RepoArgs,
}

pub fn verify(_ctx: &Ctx, _g: &Global, _a: &VerifyArgs) -> Result<()> {
    bail!("cdpctl verify is not implemented yet")
}

pub fn restore_config(_ctx: &Ctx, _g: &Global, _a: &RestoreConfigArgs) -> Result<()> {
    bail!("cdpctl restore-config is not implemented yet")
}
