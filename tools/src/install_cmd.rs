//! `cdpctl install` / `cdpctl uninstall`: put cdpd on a host (or into an image
//! tree with `--root`) without a package manager.
//!
//! Every file written comes from `packaging/` (embedded at build time) and is
//! compared by content and mode first: a second run changes nothing and says so
//! per item. Uninstall removes only what is ours by content: an operator's config
//! and state are kept unless `--purge`, a hand-edited hook or unit is left alone.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Args;
use serde::Serialize;
use thiserror::Error;

use crate::Global;

/// The programs of cdpd, all installed side by side.
pub const BINARIES: [&str; 5] = ["cdpd", "cdp-shipper", "cdp-qemu", "cdpctl", "cdp-agent"];

pub const SAMPLE_CONFIG: &str = include_str!("../../packaging/cdp.toml");
pub const HOOK: &str = include_str!("../../packaging/libvirt/cdp");
pub const UNIT: &str = include_str!("../../packaging/systemd/cdp-agent.service");
pub const APPARMOR: &str = include_str!("../../packaging/apparmor/cdp");

pub const CONFIG_PATH: &str = "/etc/cdp/cdp.toml";
pub const HOOK_PATH: &str = "/etc/libvirt/hooks/qemu.d/cdp";
pub const UNIT_PATH: &str = "/etc/systemd/system/cdp-agent.service";
pub const APPARMOR_DIR: &str = "/etc/apparmor.d";
pub const APPARMOR_LOCAL: &str = "/etc/apparmor.d/local/abstractions/libvirt-qemu";
pub const DEFAULT_BIN_DIR: &str = "/usr/local/bin";
/// Where the Debian package puts the programs: never copied over, never removed.
pub const PACKAGE_BIN_DIR: &str = "/usr/bin";
/// dpkg's list of the files the cdpd package owns (relative to the root).
const DPKG_LIST: &str = "/var/lib/dpkg/info/cdpd.list";

const HOOK_CDPCTL_LINE: &str = "CDPCTL=/usr/bin/cdpctl";
const UNIT_EXEC_LINE: &str = "ExecStart=/usr/bin/cdp-agent run";
const BLOCK_BEGIN: &str =
    "# BEGIN cdpd: written by `cdpctl install --libvirt`, removed by `cdpctl uninstall --libvirt`; edits inside this block are overwritten";
const BLOCK_END: &str = "# END cdpd";

#[derive(Args, Debug)]
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
}

#[derive(Args, Debug)]
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
    #[error(
        "{} left as it is: {}. Compare it with what cdpctl installs, keep your changes \
         elsewhere (a systemd drop-in, another hook file), then run again with --force to replace it",
        conflicts.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        if conflicts.len() == 1 { "it differs from what cdpctl installs (edited by hand?)" } else { "they differ from what cdpctl installs (edited by hand?)" }
    )]
    Modified { conflicts: Vec<PathBuf> },
    #[error("refusing to purge {path}: {why}")]
    Purge { path: PathBuf, why: String },
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

/// One thing install or uninstall looked at.
#[derive(Debug, Serialize, Clone)]
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

#[derive(Debug, Serialize)]
pub struct Report {
    pub root: PathBuf,
    pub bin_dir: PathBuf,
    pub items: Vec<Item>,
    /// What the operator still has to do.
    pub next: Vec<String>,
}

impl Report {
    fn push(&mut self, kind: &'static str, path: &Path, action: &'static str, changed: bool) {
        self.items.push(Item {
            kind,
            path: path.to_path_buf(),
            changed,
            action,
            detail: None,
        });
    }
    fn detail(&mut self, d: impl Into<String>) {
        if let Some(i) = self.items.last_mut() {
            i.detail = Some(d.into());
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
        if ok && !self.changed() {
            println!("nothing changed");
        }
        for n in &self.next {
            println!("next: {n}");
        }
        Ok(())
    }
}

/// Paths on the target system, resolved under `--root`.
struct Target {
    root: PathBuf,
    bin_dir: PathBuf,
    /// The directory the running cdpctl is in.
    exe_dir: PathBuf,
    /// dpkg's file list of the cdpd package, if installed there.
    packaged: Vec<PathBuf>,
}

impl Target {
    fn new(root: Option<&Path>, bin_dir: Option<&Path>) -> Result<Target> {
        let root = root.unwrap_or(Path::new("/")).to_path_buf();
        if !root.is_dir() {
            return Err(InstallError::BadRoot(root));
        }
        let exe = std::env::current_exe().map_err(InstallError::NoExe)?;
        let exe_dir = exe
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| "/".into());
        let mut t = Target {
            root,
            bin_dir: DEFAULT_BIN_DIR.into(),
            exe_dir,
            packaged: Vec::new(),
        };
        // The package's cdpctl installs for the package's programs.
        t.bin_dir = match bin_dir {
            Some(d) => absolute(d),
            None if same_dir(&t.exe_dir, &t.at(Path::new(PACKAGE_BIN_DIR))) => {
                PACKAGE_BIN_DIR.into()
            }
            None => DEFAULT_BIN_DIR.into(),
        };
        if let Ok(list) = fs::read_to_string(t.at(Path::new(DPKG_LIST))) {
            t.packaged = list.lines().map(PathBuf::from).collect();
        }
        Ok(t)
    }

    /// `p` (absolute, on the target system) under the root.
    fn at(&self, p: &Path) -> PathBuf {
        self.root.join(p.strip_prefix("/").unwrap_or(p))
    }

    fn is_packaged(&self, p: &Path) -> bool {
        self.packaged.iter().any(|q| q == p)
    }

    fn real_root(&self) -> bool {
        self.root == Path::new("/")
    }

    /// True when the programs are already where they are to be installed.
    fn runs_from_bin_dir(&self) -> bool {
        same_dir(&self.exe_dir, &self.at(&self.bin_dir))
    }
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
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
fn is_ours(text: &str, template: &str, variable_prefix: &str) -> bool {
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

/// The AppArmor block for this installation: the packaged rules, plus rules for
/// the bin-dir, state and run directories and file:// targets the packaged rules
/// do not name.
pub fn apparmor_block(
    bin_dir: &Path,
    state_dir: &Path,
    run_dir: &Path,
    config: &cdp_core::config::Config,
) -> String {
    let mut extra = Vec::new();
    let q = |p: &Path| format!("\"{}\"", p.display());
    if bin_dir != Path::new("/usr/bin") && bin_dir != Path::new("/usr/local/bin") {
        for b in ["cdp-qemu", "cdpd", "cdp-shipper"] {
            extra.push(format!("  {} rmix,", q(&bin_dir.join(b))));
        }
    }
    let mut dirs = Vec::new();
    if state_dir != Path::new(cdp_core::config::DEFAULT_STATE_DIR) {
        dirs.push(state_dir.to_path_buf());
    }
    if run_dir != Path::new(cdp_core::config::DEFAULT_RUN_DIR) {
        dirs.push(run_dir.to_path_buf());
    }
    for t in config.target.values() {
        if let Some(p) = t.url.strip_prefix("file://") {
            let p = PathBuf::from(p.split(['?', '#']).next().unwrap_or(p));
            if p.is_absolute() && p != Path::new("/var/lib/cdp-repo") && !dirs.contains(&p) {
                dirs.push(p);
            }
        }
    }
    for d in dirs {
        extra.push(format!("  {} rw,", q(&d.join(""))));
        extra.push(format!("  {} rwk,", q(&d.join("**"))));
    }
    let mut s = format!("{BLOCK_BEGIN}\n{}", APPARMOR.trim_end());
    if !extra.is_empty() {
        s.push_str("\n\n  # This host's paths.\n");
        s.push_str(&extra.join("\n"));
    }
    s.push_str(&format!("\n{BLOCK_END}\n"));
    s
}

/// `text` without our marked block (and whether there was one).
fn without_block(text: &str) -> (String, bool) {
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

// ---------------------------------------------------------------- file helpers

fn mode_of(m: &fs::Metadata) -> u32 {
    m.mode() & 0o7777
}

fn files_equal(a: &Path, b: &Path) -> Result<bool> {
    let (ma, mb) = (
        fs::metadata(a).map_err(io_err("read", a))?,
        fs::metadata(b).map_err(io_err("read", b))?,
    );
    if ma.len() != mb.len() {
        return Ok(false);
    }
    if ma.dev() == mb.dev() && ma.ino() == mb.ino() {
        return Ok(true);
    }
    let mut fa = fs::File::open(a).map_err(io_err("read", a))?;
    let mut fb = fs::File::open(b).map_err(io_err("read", b))?;
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = read_full(&mut fa, &mut ba).map_err(io_err("read", a))?;
        let m = read_full(&mut fb, &mut bb).map_err(io_err("read", b))?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn mkdirs(op: &'static str, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(io_err(op, dir))
}

/// Write `data` to `path` with `mode` through a temporary file and a rename (a
/// running program can be replaced; a reader never sees half a file).
fn write_atomic(op: &'static str, path: &Path, data: &mut dyn Read, mode: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    mkdirs(op, dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.cdpctl-new"));
    let res = (|| -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        std::io::copy(data, &mut f)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.flush()?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(op, path)(e));
    }
    Ok(())
}

enum Put {
    Created,
    Updated,
    ModeFixed,
    Unchanged,
}

/// Make `path` hold `text` with `mode`.
fn put_text(path: &Path, text: &str, mode: u32) -> Result<Put> {
    match fs::metadata(path) {
        Ok(m) => {
            let cur = fs::read(path).map_err(io_err("install", path))?;
            if cur == text.as_bytes() {
                if mode_of(&m) == mode {
                    return Ok(Put::Unchanged);
                }
                fs::set_permissions(path, fs::Permissions::from_mode(mode))
                    .map_err(io_err("install", path))?;
                return Ok(Put::ModeFixed);
            }
            write_atomic("install", path, &mut text.as_bytes(), mode)?;
            Ok(Put::Updated)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            write_atomic("install", path, &mut text.as_bytes(), mode)?;
            Ok(Put::Created)
        }
        Err(e) => Err(io_err("install", path)(e)),
    }
}

fn remove(op: &'static str, path: &Path) -> Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(op, path)(e)),
    }
}

/// Remove `dir` if it exists and is empty.
fn remove_empty_dir(dir: &Path) -> Result<bool> {
    match fs::read_dir(dir) {
        Ok(mut it) => {
            if it.next().is_some() {
                return Ok(false);
            }
            fs::remove_dir(dir).map_err(io_err("uninstall", dir))?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("uninstall", dir)(e)),
    }
}

fn systemd_running(t: &Target) -> bool {
    t.real_root() && Path::new("/run/systemd/system").is_dir()
}

fn systemctl(args: &[&str]) -> Result<String> {
    let cmd = format!("systemctl {}", args.join(" "));
    let out =
        Command::new("systemctl")
            .args(args)
            .output()
            .map_err(|e| InstallError::Systemctl {
                cmd: cmd.clone(),
                why: e.to_string(),
            })?;
    if !out.status.success() {
        return Err(InstallError::Systemctl {
            cmd,
            why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `systemctl QUERY cdp-agent.service` printed `want` (is-enabled, is-active: they
/// exit non-zero for "no").
fn systemctl_is(query: &str, want: &str) -> bool {
    Command::new("systemctl")
        .args([query, "cdp-agent.service"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == want)
        .unwrap_or(false)
}

fn load_config(g: &Global, t: &Target) -> Result<cdp_core::config::Config> {
    let path = g
        .config
        .clone()
        .unwrap_or_else(|| t.at(Path::new(CONFIG_PATH)));
    if path.exists() || g.config.is_some() {
        Ok(cdp_core::config::Config::load_file(&path)?)
    } else {
        Ok(cdp_core::config::Config::default())
    }
}

// ---------------------------------------------------------------- install

pub fn install(g: &Global, a: &InstallArgs) -> anyhow::Result<()> {
    let (report, result) = install_report(g, a);
    if let Some(r) = &report {
        r.print(g.json, result.is_ok())?;
    }
    Ok(result?)
}

/// Install; the report lists what was done even when an item failed.
pub fn install_report(g: &Global, a: &InstallArgs) -> (Option<Report>, Result<()>) {
    let t = match Target::new(a.root.as_deref(), a.bin_dir.as_deref()) {
        Ok(t) => t,
        Err(e) => return (None, Err(e)),
    };
    let mut r = Report {
        root: t.root.clone(),
        bin_dir: t.bin_dir.clone(),
        items: Vec::new(),
        next: Vec::new(),
    };
    let res = do_install(g, a, &t, &mut r);
    (Some(r), res)
}

fn do_install(g: &Global, a: &InstallArgs, t: &Target, r: &mut Report) -> Result<()> {
    let mut conflicts = Vec::new();

    // Programs.
    let missing: Vec<&str> = BINARIES
        .iter()
        .copied()
        .filter(|b| !t.exe_dir.join(b).is_file())
        .collect();
    if !missing.is_empty() {
        return Err(InstallError::MissingBinaries {
            dir: t.exe_dir.clone(),
            missing: missing.join(", "),
        });
    }
    let mut binaries_changed = false;
    let in_place = t.runs_from_bin_dir();
    for b in BINARIES {
        let path = t.bin_dir.join(b);
        let dest = t.at(&path);
        if in_place {
            r.push("binary", &path, "unchanged", false);
            r.detail("cdpctl runs from here");
            continue;
        }
        let src = t.exe_dir.join(b);
        let same = match fs::metadata(&dest) {
            Ok(m) => mode_of(&m) == 0o755 && files_equal(&src, &dest)?,
            Err(_) => false,
        };
        if same {
            r.push("binary", &path, "unchanged", false);
            continue;
        }
        let existed = dest.exists();
        let mut f = fs::File::open(&src).map_err(io_err("install", &src))?;
        write_atomic("install", &dest, &mut f, 0o755)?;
        binaries_changed = true;
        r.push(
            "binary",
            &path,
            if existed { "updated" } else { "created" },
            true,
        );
        r.detail(format!("from {}", src.display()));
    }

    // Config: written from the sample only when absent.
    let config_path = Path::new(CONFIG_PATH);
    let dest = t.at(config_path);
    if g.config.is_some() {
        r.push("config", g.config.as_deref().unwrap(), "skipped", false);
        r.detail("--config given: the sample is not written");
    } else if dest.exists() {
        r.push("config", config_path, "kept", false);
        let same = fs::read(&dest).map(|c| c == SAMPLE_CONFIG.as_bytes());
        r.detail(if same.unwrap_or(false) {
            "the sample, as installed"
        } else {
            "exists: never overwritten"
        });
    } else {
        write_atomic("install", &dest, &mut SAMPLE_CONFIG.as_bytes(), 0o644)?;
        r.push("config", config_path, "created", true);
        r.detail("from the sample: review the targets");
    }
    let config = load_config(g, t)?;
    let state_dir = config.state_dir(g.state_dir.as_deref());
    let run_dir = config.run_dir(g.run_dir.as_deref());

    // State and run directories (their owner is set by the hook when a VM starts).
    for (what, d) in [("state", &state_dir), ("run", &run_dir)] {
        let dest = t.at(d);
        if dest.is_dir() {
            r.push("dir", d, "unchanged", false);
        } else {
            mkdirs("install", &dest)?;
            fs::set_permissions(&dest, fs::Permissions::from_mode(0o755))
                .map_err(io_err("install", &dest))?;
            r.push("dir", d, "created", true);
        }
        r.detail(format!("{what} directory"));
    }

    if a.libvirt {
        // The hook.
        let path = Path::new(HOOK_PATH);
        let dest = t.at(path);
        let text = hook_text(&t.bin_dir);
        let mut new_hook = false;
        let current = fs::read_to_string(&dest).ok();
        match current {
            Some(cur) if cur != text && !is_ours(&cur, HOOK, "CDPCTL=") && !a.force => {
                r.push("hook", path, "modified", false);
                r.detail("edited by hand: left as it is (--force replaces it)");
                conflicts.push(path.to_path_buf());
            }
            _ => {
                let put = put_text(&dest, &text, 0o755)?;
                new_hook = matches!(put, Put::Created);
                push_put(r, "hook", path, put);
            }
        }
        if new_hook {
            r.next.push(
                "restart libvirtd (libvirt reads its hooks when it starts): systemctl restart libvirtd"
                    .into(),
            );
        }

        // AppArmor rules, where AppArmor is configured.
        if t.at(Path::new(APPARMOR_DIR)).is_dir() {
            let path = Path::new(APPARMOR_LOCAL);
            let dest = t.at(path);
            let block = apparmor_block(&t.bin_dir, &state_dir, &run_dir, &config);
            let cur = match fs::read_to_string(&dest) {
                Ok(c) => Some(c),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(io_err("install", &dest)(e)),
            };
            let (rest, had) = without_block(cur.as_deref().unwrap_or(""));
            if cur.as_deref().is_some_and(|c| c.contains(&block)) {
                r.push("apparmor", path, "unchanged", false);
            } else {
                let mut text = rest.clone();
                if !text.is_empty() && !text.ends_with('\n') {
                    text.push('\n');
                }
                text.push_str(&block);
                let mode = fs::metadata(&dest).map(|m| mode_of(&m)).unwrap_or(0o644);
                write_atomic("install", &dest, &mut text.as_bytes(), mode)?;
                r.push(
                    "apparmor",
                    path,
                    if had { "updated" } else { "created" },
                    true,
                );
                r.detail("marked block; VMs started from now on get it");
            }
        } else {
            r.push("apparmor", Path::new(APPARMOR_DIR), "skipped", false);
            r.detail("no AppArmor on this system");
        }
    }

    if a.systemd {
        let path = Path::new(UNIT_PATH);
        let dest = t.at(path);
        let text = unit_text(&t.bin_dir);
        let mut unit_changed = false;
        match fs::read_to_string(&dest).ok() {
            Some(cur) if cur != text && !is_ours(&cur, UNIT, "ExecStart=") && !a.force => {
                r.push("unit", path, "modified", false);
                r.detail("edited by hand: left as it is (use a drop-in; --force replaces it)");
                conflicts.push(path.to_path_buf());
            }
            _ => {
                let put = put_text(&dest, &text, 0o644)?;
                unit_changed = !matches!(put, Put::Unchanged);
                push_put(r, "unit", path, put);
            }
        }
        if systemd_running(t) {
            if unit_changed {
                systemctl(&["daemon-reload"])?;
            }
            let enabled = systemctl_is("is-enabled", "enabled");
            let active = systemctl_is("is-active", "active");
            if !enabled || !active {
                systemctl(&["enable", "--now", "cdp-agent.service"])?;
                r.push("service", Path::new("cdp-agent.service"), "started", true);
                r.detail("systemctl enable --now");
            } else if unit_changed || binaries_changed {
                systemctl(&["try-restart", "cdp-agent.service"])?;
                r.push("service", Path::new("cdp-agent.service"), "restarted", true);
                r.detail("new unit or programs");
            } else {
                r.push(
                    "service",
                    Path::new("cdp-agent.service"),
                    "unchanged",
                    false,
                );
                r.detail("enabled and running");
            }
        } else if t.real_root() {
            r.push("service", Path::new("cdp-agent.service"), "skipped", false);
            r.detail("systemd is not running");
            r.next.push(format!(
                "systemd is not running here: start the agent by hand: {} run",
                t.bin_dir.join("cdp-agent").display()
            ));
        } else {
            r.push("service", Path::new("cdp-agent.service"), "skipped", false);
            r.detail("--root: no systemctl");
            r.next.push(format!(
                "enable the agent in the image: systemctl --root {} enable cdp-agent.service",
                t.root.display()
            ));
        }
    }

    if r.changed() && !r.next.iter().any(|n| n.contains("cdpctl protect")) {
        r.next
            .push("protect a VM: cdpctl protect VM (then restart the VM)".into());
    }
    if !conflicts.is_empty() {
        return Err(InstallError::Modified { conflicts });
    }
    Ok(())
}

fn push_put(r: &mut Report, kind: &'static str, path: &Path, put: Put) {
    match put {
        Put::Created => r.push(kind, path, "created", true),
        Put::Updated => r.push(kind, path, "updated", true),
        Put::ModeFixed => {
            r.push(kind, path, "updated", true);
            r.detail("mode");
        }
        Put::Unchanged => r.push(kind, path, "unchanged", false),
    }
}

// ---------------------------------------------------------------- uninstall

pub fn uninstall(g: &Global, a: &UninstallArgs) -> anyhow::Result<()> {
    let t = Target::new(a.root.as_deref(), a.bin_dir.as_deref())?;
    let mut r = Report {
        root: t.root.clone(),
        bin_dir: t.bin_dir.clone(),
        items: Vec::new(),
        next: Vec::new(),
    };
    let res = do_uninstall(g, a, &t, &mut r);
    r.print(g.json, res.is_ok())?;
    Ok(res?)
}

fn do_uninstall(g: &Global, a: &UninstallArgs, t: &Target, r: &mut Report) -> Result<()> {
    let config = load_config(g, t).unwrap_or_default();
    let state_dir = config.state_dir(g.state_dir.as_deref());
    let run_dir = config.run_dir(g.run_dir.as_deref());

    if a.systemd {
        let path = Path::new(UNIT_PATH);
        let dest = t.at(path);
        if systemd_running(t) && dest.exists() {
            let _ = systemctl(&["disable", "--now", "cdp-agent.service"]);
            r.push("service", Path::new("cdp-agent.service"), "stopped", true);
            r.detail("systemctl disable --now");
        }
        remove_ours(r, t, "unit", path, |c| is_ours(c, UNIT, "ExecStart="))?;
        if systemd_running(t) {
            let _ = systemctl(&["daemon-reload"]);
        }
    }

    if a.libvirt {
        let path = Path::new(HOOK_PATH);
        if remove_ours(r, t, "hook", path, |c| is_ours(c, HOOK, "CDPCTL="))? {
            r.next.push(
                "restart libvirtd so that it forgets the hook: systemctl restart libvirtd".into(),
            );
        }
        let path = Path::new(APPARMOR_LOCAL);
        let dest = t.at(path);
        match fs::read_to_string(&dest) {
            Ok(cur) => {
                let (rest, had) = without_block(&cur);
                if !had {
                    r.push("apparmor", path, "absent", false);
                } else if rest.trim().is_empty() {
                    remove("uninstall", &dest)?;
                    r.push("apparmor", path, "removed", true);
                } else {
                    write_atomic("uninstall", &dest, &mut rest.as_bytes(), 0o644)?;
                    r.push("apparmor", path, "updated", true);
                    r.detail("our block removed, the rest kept");
                }
            }
            Err(_) => r.push("apparmor", path, "absent", false),
        }
    }

    // Programs: only copies of ours, never the package's.
    for b in BINARIES {
        let path = t.bin_dir.join(b);
        let dest = t.at(&path);
        if !dest.exists() {
            r.push("binary", &path, "absent", false);
        } else if t.is_packaged(&path) {
            r.push("binary", &path, "kept", false);
            r.detail("owned by the cdpd package: apt remove cdpd");
        } else if !t.exe_dir.join(b).is_file() || !files_equal(&t.exe_dir.join(b), &dest)? {
            r.push("binary", &path, "kept", false);
            r.detail(format!(
                "differs from {}: run the installed {} uninstall",
                t.exe_dir.join(b).display(),
                t.bin_dir.join("cdpctl").display()
            ));
        } else {
            remove("uninstall", &dest)?;
            r.push("binary", &path, "removed", true);
        }
    }

    // Config: the unedited sample is ours; an edited one is the operator's.
    let path = Path::new(CONFIG_PATH);
    let dest = t.at(path);
    match fs::read(&dest) {
        Ok(_) if t.is_packaged(path) && !a.purge => {
            r.push("config", path, "kept", false);
            r.detail("a conffile of the cdpd package");
        }
        Ok(c) if a.purge || c == SAMPLE_CONFIG.as_bytes() => {
            remove("uninstall", &dest)?;
            r.push("config", path, "removed", true);
        }
        Ok(_) => {
            r.push("config", path, "kept", false);
            r.detail("edited: kept (--purge removes it)");
        }
        Err(_) => r.push("config", path, "absent", false),
    }
    if remove_empty_dir(&t.at(Path::new("/etc/cdp")))? {
        r.push("dir", Path::new("/etc/cdp"), "removed", true);
    }

    // State and run directories: removed when empty, or with --purge.
    for d in [&state_dir, &run_dir] {
        let dest = t.at(d);
        if !dest.exists() {
            r.push("dir", d, "absent", false);
        } else if remove_empty_dir(&dest)? {
            r.push("dir", d, "removed", true);
        } else if a.purge {
            check_purge(d, &run_dir, t)?;
            fs::remove_dir_all(&dest).map_err(io_err("uninstall", &dest))?;
            r.push("dir", d, "removed", true);
            r.detail("--purge");
        } else {
            r.push("dir", d, "kept", false);
            r.detail("not empty (--purge removes it)");
        }
    }
    Ok(())
}

/// Remove a file of ours (recognized by `ours`); an edited one is kept and reported.
fn remove_ours(
    r: &mut Report,
    t: &Target,
    kind: &'static str,
    path: &Path,
    ours: impl Fn(&str) -> bool,
) -> Result<bool> {
    let dest = t.at(path);
    match fs::read_to_string(&dest) {
        Err(_) if !dest.exists() => {
            r.push(kind, path, "absent", false);
            Ok(false)
        }
        Ok(c) if ours(&c) && !t.is_packaged(path) => {
            remove("uninstall", &dest)?;
            r.push(kind, path, "removed", true);
            Ok(true)
        }
        _ => {
            r.push(kind, path, "kept", false);
            r.detail(if t.is_packaged(path) {
                "owned by the cdpd package"
            } else {
                "edited by hand: not ours any more"
            });
            Ok(false)
        }
    }
}

fn check_purge(d: &Path, run_dir: &Path, t: &Target) -> Result<()> {
    let refuse = |why: String| InstallError::Purge {
        path: d.to_path_buf(),
        why,
    };
    if d.components().count() < 3 {
        return Err(refuse(
            "too close to / to be a cdpd directory: remove it by hand".into(),
        ));
    }
    // A running capture daemon has a control socket per VM in the run directory.
    if let Ok(vms) = fs::read_dir(t.at(run_dir)) {
        for vm in vms.flatten() {
            if vm.path().join("control.sock").exists() {
                return Err(refuse(format!(
                    "VM {} is being captured (control socket in {}): stop the protected VMs first",
                    vm.file_name().to_string_lossy(),
                    run_dir.display()
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_recognized_for_any_bin_dir() {
        let h = hook_text(Path::new("/opt/cdp bin"));
        assert!(h.contains("CDPCTL='/opt/cdp bin/cdpctl'"), "{h}");
        assert!(is_ours(&h, HOOK, "CDPCTL="));
        assert!(!is_ours(&format!("{h}echo x\n"), HOOK, "CDPCTL="));
        let u = unit_text(Path::new("/usr/local/bin"));
        assert!(u.contains("ExecStart=/usr/local/bin/cdp-agent run"));
        assert!(is_ours(&u, UNIT, "ExecStart="));
        assert_eq!(hook_text(Path::new("/usr/bin")), HOOK);
        assert!(HOOK.contains(HOOK_CDPCTL_LINE));
        assert!(UNIT.contains(UNIT_EXEC_LINE));
    }

    #[test]
    fn block_in_and_out() {
        let c = cdp_core::config::Config::default();
        let b = apparmor_block(
            Path::new("/usr/local/bin"),
            Path::new("/var/lib/cdp"),
            Path::new("/run/cdp"),
            &c,
        );
        let text = format!("# mine\n/x r,\n{b}# after\n");
        let (rest, had) = without_block(&text);
        assert!(had);
        assert_eq!(rest, "# mine\n/x r,\n# after\n");
        assert_eq!(without_block(&rest), (rest.clone(), false));
        let c = cdp_core::config::Config::parse(
            "[paths]\nstate_dir = \"/srv/cdp state\"\n[target.t]\nurl = \"file:///mnt/repo\"\n",
        )
        .unwrap();
        let b = apparmor_block(
            Path::new("/opt/cdp"),
            Path::new("/srv/cdp state"),
            Path::new("/run/cdp"),
            &c,
        );
        assert!(b.contains("\"/opt/cdp/cdpd\" rmix,"), "{b}");
        assert!(b.contains("\"/srv/cdp state/**\" rwk,"), "{b}");
        assert!(b.contains("\"/mnt/repo/\" rw,"), "{b}");
    }
}
