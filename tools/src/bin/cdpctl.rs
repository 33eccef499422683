//! `cdpctl`: argument parsing only; see the cdp-tools library.

use clap::Parser;

fn main() {
    let cli = cdp_tools::Cli::parse();
    if let Err(e) = cdp_tools::run(cli) {
        eprintln!("cdpctl: error: {e:#}");
        std::process::exit(1);
    }
}
