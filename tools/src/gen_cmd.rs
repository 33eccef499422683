//! Shell completions and man pages generated from the CLI definition
//! (`clap_complete`, `clap_mangen`), so they never drift from it.
//! `scripts/package` puts both into the Debian package; neither needs a
//! config.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory};

#[derive(Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Args)]
pub struct ManArgs {
    /// Directory to write the pages into (created): cdpctl.1 and one
    /// cdpctl-SUBCOMMAND.1 per subcommand.
    pub dir: PathBuf,
}

/// Print the completion script of `shell` on stdout.
pub fn completions(a: &CompletionsArgs) -> Result<()> {
    let mut cmd = crate::Cli::command();
    clap_complete::generate(a.shell, &mut cmd, "cdpctl", &mut std::io::stdout());
    Ok(())
}

/// Write the man pages into `dir`; says how many on stderr.
pub fn man(a: &ManArgs) -> Result<()> {
    std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    clap_mangen::generate_to(crate::Cli::command(), &a.dir)
        .with_context(|| format!("writing man pages into {}", a.dir.display()))?;
    let n = std::fs::read_dir(&a.dir)?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".1"))
        .count();
    eprintln!("cdpctl: {n} man pages in {}", a.dir.display());
    Ok(())
}
