//! Shell completions and man pages generated from the CLI definition
//! (`clap_complete`, `clap_mangen`), so they never drift from it.
