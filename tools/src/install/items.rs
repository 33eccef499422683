//! What a plan is made of: steps (one reported row each, and the operations
//! that carry it out), and the texts install writes (hook, unit, AppArmor
//! block), computed from `packaging/` and this host's paths.

use std::path::{Path, PathBuf};

use serde::Serialize;

pub const SAMPLE_CONFIG: &str = include_str!("../../../packaging/cdp.toml");
pub const HOOK: &str = include_str!("../../../packaging/libvirt/cdp");
pub const UNIT: &str = include_str!("../../../packaging/systemd/cdp-agent.service");
pub const APPARMOR: &str = include_str!("../../../packaging/apparmor/cdp");

pub(crate) const HOOK_CDPCTL_LINE: &str = "CDPCTL=/usr/bin/cdpctl";
pub(crate) const UNIT_EXEC_LINE: &str = "ExecStart=/usr/bin/cdp-agent run";
/// The line of the hook that names cdpctl (the only one that varies).
pub(crate) const HOOK_VARIABLE: &str = "CDPCTL=";
/// The line of the unit that names cdp-agent (the only one that varies).
pub(crate) const UNIT_VARIABLE: &str = "ExecStart=";
const BLOCK_BEGIN: &str =
    "# BEGIN cdpd: written by `cdpctl install --libvirt`, removed by `cdpctl uninstall --libvirt`; edits inside this block are overwritten";
const BLOCK_END: &str = "# END cdpd";

/// One row of the report: a thing install or uninstall looked at.
#[derive(Debug, Serialize, Clone, PartialEq, Eq)]
pub struct Item {
    /// binary, dir, config, hook, apparmor, unit, service.
    pub kind: &'static str,
    /// The path as seen on the target system (without --root).
    pub path: PathBuf,
    pub changed: bool,
    /// created, updated, unchanged, kept, removed, absent, modified, skipped, started, …
    pub action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// One operation on the target system. Paths are real (under `--root`).
#[derive(Debug, Serialize, Clone, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Copy a program (through a temporary file and a rename).
    Copy {
        from: PathBuf,
        to: PathBuf,
        mode: u32,
    },
    /// Make `to` hold `content` with `mode` (temporary file and rename).
    Write {
        to: PathBuf,
        #[serde(skip)]
        content: String,
        mode: u32,
    },
    /// The content is right, the mode is not.
    Chmod { to: PathBuf, mode: u32 },
    /// Create a directory (and its parents).
    MkDir { to: PathBuf, mode: u32 },
    /// Remove a file.
    Remove { to: PathBuf },
    /// Remove a directory the plan found empty (or emptied).
    RemoveDir { to: PathBuf },
    /// Remove a directory and everything in it (`--purge`).
    RemoveTree { to: PathBuf },
    /// Run `systemctl ARGS`; a failure fails the apply only when `must`.
    Systemctl { args: Vec<&'static str>, must: bool },
}

/// A reported row and what carries it out (nothing, for "unchanged", "kept", …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub item: Item,
    pub ops: Vec<Op>,
}

impl Step {
    pub fn new(kind: &'static str, path: &Path, action: &'static str, changed: bool) -> Step {
        Step {
            item: Item {
                kind,
                path: path.to_path_buf(),
                changed,
                action,
                detail: None,
            },
            ops: Vec::new(),
        }
    }

    /// A step that changes nothing.
    pub fn same(kind: &'static str, path: &Path, action: &'static str) -> Step {
        Step::new(kind, path, action, false)
    }

    /// A step that changes something, by `op`.
    pub fn change(kind: &'static str, path: &Path, action: &'static str, op: Op) -> Step {
        let mut s = Step::new(kind, path, action, true);
        s.ops.push(op);
        s
    }

    pub fn detail(mut self, d: impl Into<String>) -> Step {
        self.item.detail = Some(d.into());
        self
    }

    pub fn then(mut self, op: Op) -> Step {
        self.ops.push(op);
        self
    }
}

/// The hook as installed for `bin_dir`.
pub fn hook_text(bin_dir: &Path) -> String {
    HOOK.replace(
        HOOK_CDPCTL_LINE,
        &format!("CDPCTL={}", shell_quote(&bin_dir.join("cdpctl"))),
    )
}

/// The unit as installed for `bin_dir`.
pub fn unit_text(bin_dir: &Path) -> String {
    UNIT.replace(
        UNIT_EXEC_LINE,
        &format!("ExecStart={} run", bin_dir.join("cdp-agent").display()),
    )
}

fn shell_quote(p: &Path) -> String {
    let s = p.display().to_string();
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+,".contains(c))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Whether `text` is one of our templates, written for any bin-dir: the line
/// naming the program is the only one that may differ.
pub fn is_ours(text: &str, template: &str, variable_prefix: &str) -> bool {
    let norm = |t: &str| -> Vec<String> {
        t.lines()
            .map(|l| {
                if l.starts_with(variable_prefix) {
                    variable_prefix.to_string()
                } else {
                    l.to_string()
                }
            })
            .collect()
    };
    norm(text) == norm(template)
}

/// The AppArmor block for this installation: the packaged rules (what every
/// VM's profile gets), plus the programs of a bin-dir the packaged rules do not
/// name. The state, run and `file://` directories are not here: the hook grants
/// each VM its own, per uuid (`cdp_hooks::hook::apparmor`).
pub fn apparmor_block(bin_dir: &Path) -> String {
    let mut extra = Vec::new();
    let q = |p: &Path| format!("\"{}\"", p.display());
    if bin_dir != Path::new("/usr/bin") && bin_dir != Path::new("/usr/local/bin") {
        for b in ["cdp-qemu", "cdpd", "cdp-shipper"] {
            extra.push(format!("  {} rmix,", q(&bin_dir.join(b))));
        }
    }
    let mut s = format!("{BLOCK_BEGIN}\n{}", APPARMOR.trim_end());
    if !extra.is_empty() {
        s.push_str("\n\n  # This host's bin-dir.\n");
        s.push_str(&extra.join("\n"));
    }
    s.push_str(&format!("\n{BLOCK_END}\n"));
    s
}

/// `text` without our marked block (and whether there was one).
pub fn without_block(text: &str) -> (String, bool) {
    let Some(start) = text.find(BLOCK_BEGIN) else {
        return (text.to_string(), false);
    };
    let end = match text[start..].find(&format!("\n{BLOCK_END}")) {
        Some(e) => {
            let e = start + e + 1 + BLOCK_END.len();
            if text[e..].starts_with('\n') {
                e + 1
            } else {
                e
            }
        }
        None => text.len(),
    };
    (format!("{}{}", &text[..start], &text[end..]), true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_recognized_for_any_bin_dir() {
        let h = hook_text(Path::new("/opt/cdp bin"));
        assert!(h.contains("CDPCTL='/opt/cdp bin/cdpctl'"), "{h}");
        assert!(is_ours(&h, HOOK, HOOK_VARIABLE));
        assert!(!is_ours(&format!("{h}echo x\n"), HOOK, HOOK_VARIABLE));
        let u = unit_text(Path::new("/usr/local/bin"));
        assert!(u.contains("ExecStart=/usr/local/bin/cdp-agent run"));
        assert!(is_ours(&u, UNIT, UNIT_VARIABLE));
        assert_eq!(hook_text(Path::new("/usr/bin")), HOOK);
        assert!(HOOK.contains(HOOK_CDPCTL_LINE));
        assert!(UNIT.contains(UNIT_EXEC_LINE));
    }

    #[test]
    fn block_in_and_out() {
        let b = apparmor_block(Path::new("/usr/local/bin"));
        let text = format!("# mine\n/x r,\n{b}# after\n");
        let (rest, had) = without_block(&text);
        assert!(had);
        assert_eq!(rest, "# mine\n/x r,\n# after\n");
        assert_eq!(without_block(&rest), (rest.clone(), false));
        let b = apparmor_block(Path::new("/opt/cdp"));
        assert!(b.contains("\"/opt/cdp/cdpd\" rmix,"), "{b}");
        // Nothing any VM may reach of another's: no state, run or
        // repository directory, no credentials file.
        for shared in [
            "/var/lib/cdp",
            "/run/cdp",
            "/var/lib/cdp-repo",
            "/etc/cdp/**",
        ] {
            assert!(!b.contains(shared), "{shared} in the shared block:\n{b}");
        }
    }
}
