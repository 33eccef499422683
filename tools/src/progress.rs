//! Progress of long commands: a bar on a terminal, JSON events with
//! `--json` (issue 15). Owned by the progress work.
