//! What `cdpctl install` created and what it modified, recorded on the target
//! system so that `cdpctl uninstall` removes only what install created, puts a
//! modified file back as it was (never removing a file that was there before,
//! empty or not: libvirt's local AppArmor abstraction is one), and the cdpd
//! package's preinst can take over an install (packaging/debian/preinst).
//!
//! A root-owned text file, one entry a line, `KIND<TAB>PATH`:
//! - `created`: install made the file or directory; uninstall may remove it.
//! - `modified`: it was there before; install added its marked block, and
//!   uninstall takes the block out, the rest byte for byte.
//! - `modified+newline`: as `modified`, and the file did not end with a
//!   newline: install added one before its block, uninstall takes it out too.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use super::{io_err, Result};

/// Where the manifest lives on the target system.
pub const MANIFEST_PATH: &str = "/var/lib/cdpctl/install.manifest";
/// Its directory, created with it and removed with it.
pub const MANIFEST_DIR: &str = "/var/lib/cdpctl";

const HEADER: &str =
    "# cdpctl install: what it created and what it modified (read by cdpctl uninstall \
and the cdpd package's preinst; do not edit)\n";

/// What install did to one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    Created,
    /// Was there before; `added_newline`: install ended its last line.
    Modified {
        added_newline: bool,
    },
}

/// The entries, by path on the target system (without `--root`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    pub entries: BTreeMap<PathBuf, Entry>,
}

impl Manifest {
    /// The manifest at `real` (under the root); `None` when there is none (no
    /// install, or one made before manifests were written).
    pub fn load(real: &Path) -> Result<Option<Manifest>> {
        let text = match fs::read_to_string(real) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("read", real)(e)),
        };
        Ok(Some(Manifest::parse(&text)))
    }

    /// Lines it does not understand are skipped (a newer cdpctl's kinds).
    pub fn parse(text: &str) -> Manifest {
        let entries = text
            .lines()
            .filter_map(|l| {
                let (kind, path) = l.split_once('\t')?;
                let e = match kind {
                    "created" => Entry::Created,
                    "modified" => Entry::Modified {
                        added_newline: false,
                    },
                    "modified+newline" => Entry::Modified {
                        added_newline: true,
                    },
                    _ => return None,
                };
                Some((PathBuf::from(path), e))
            })
            .collect();
        Manifest { entries }
    }

    pub fn text(&self) -> String {
        let mut s = HEADER.to_string();
        for (p, e) in &self.entries {
            let kind = match e {
                Entry::Created => "created",
                Entry::Modified {
                    added_newline: false,
                } => "modified",
                Entry::Modified {
                    added_newline: true,
                } => "modified+newline",
            };
            s.push_str(&format!("{kind}\t{}\n", p.display()));
        }
        s
    }

    pub fn get(&self, p: &Path) -> Option<Entry> {
        self.entries.get(p).copied()
    }

    pub fn created(&self, p: &Path) -> bool {
        self.get(p) == Some(Entry::Created)
    }

    /// Record `e` for `p` unless an earlier install recorded it: what a path
    /// was before the FIRST install is what counts.
    pub fn record(&mut self, p: &Path, e: Entry) {
        self.entries.entry(p.to_path_buf()).or_insert(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_first_record_wins() {
        let mut m = Manifest::default();
        m.record(Path::new("/a b/c"), Entry::Created);
        m.record(
            Path::new("/etc/x"),
            Entry::Modified {
                added_newline: true,
            },
        );
        m.record(Path::new("/etc/x"), Entry::Created);
        let back = Manifest::parse(&m.text());
        assert_eq!(back, m);
        assert!(back.created(Path::new("/a b/c")));
        assert!(!back.created(Path::new("/etc/x")));
        assert!(Manifest::parse("# x\nfuture\t/y\n").entries.is_empty());
    }
}
