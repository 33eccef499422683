//! `cdpctl export VM --disk D --at POINT --socket PATH`: a read-only NBD
//! export of a point, served without materialising the image.

use anyhow::{bail, Result};

use crate::restore_cmd::RepoArgs;
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
    #[command(flatten)]
    pub repo: RepoArgs,
}

pub fn run(_ctx: &Ctx, _g: &Global, _a: &ExportArgs) -> Result<()> {
    bail!("cdpctl export is not implemented yet")
}
