//! `cdpctl files VM --at POINT ls|get PATH`: one file back from a point,
//! without a full restore (issue 15). Owned by the file-level-restore work.

use anyhow::{bail, Result};
use clap::Args;

use crate::Ctx;

#[derive(Args)]
pub struct FilesArgs {
    /// VM name or UUID.
    pub vm: String,
}

pub fn run(_ctx: &Ctx, _a: &FilesArgs) -> Result<()> {
    bail!("cdpctl files is not built yet")
}
