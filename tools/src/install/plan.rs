//! Deciding: what install or uninstall would do on a target system, found by
//! reading it only (files, modes, `systemctl is-enabled`). [`super::apply`]
//! does it; `--dry-run` prints it.

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cdp_core::config::Config;

use super::items::{
    apparmor_block, hook_text, is_ours, unit_text, without_block, Op, Step, HOOK, HOOK_VARIABLE,
    SAMPLE_CONFIG, UNIT, UNIT_VARIABLE,
};
use super::manifest::{Entry, Manifest, MANIFEST_DIR, MANIFEST_PATH};
use super::{
    io_err, InstallArgs, InstallError, Result, UninstallArgs, APPARMOR_DIR,
    APPARMOR_LIBVIRT_ABSTRACTION, APPARMOR_LIBVIRT_DIR, APPARMOR_LOCAL, APPARMOR_RULES_DIR,
    BINARIES, CONFIG_PATH, DEFAULT_BIN_DIR, DPKG_LIST, HOOK_PATH, PACKAGE_BIN_DIR, UNIT_PATH,
};
use crate::Global;

const SERVICE: &str = "cdp-agent.service";

/// What to do, in order. Nothing in it has been done.
#[derive(Debug)]
pub struct Plan {
    pub root: PathBuf,
    pub bin_dir: PathBuf,
    pub steps: Vec<Step>,
    /// What the operator still has to do afterwards.
    pub next: Vec<String>,
    /// Files edited by hand and left alone: the apply does everything else,
    /// then fails naming them.
    pub conflicts: Vec<PathBuf>,
    /// install: the manifest as it is to be after the apply (what this and
    /// earlier installs created or modified).
    pub manifest: Manifest,
}

impl Plan {
    fn new(t: &Target) -> Plan {
        Plan {
            root: t.root.clone(),
            bin_dir: t.bin_dir.clone(),
            steps: Vec::new(),
            next: Vec::new(),
            conflicts: Vec::new(),
            manifest: Manifest::default(),
        }
    }

    pub fn changes(&self) -> bool {
        self.steps.iter().any(|s| s.item.changed)
    }

    /// Real paths (under the root) this plan removes.
    fn removed(&self) -> impl Iterator<Item = &Path> {
        self.steps
            .iter()
            .flat_map(|s| &s.ops)
            .filter_map(|o| match o {
                Op::Remove { to } | Op::RemoveDir { to } | Op::RemoveTree { to } => {
                    Some(to.as_path())
                }
                _ => None,
            })
    }
}

/// Paths on the target system, resolved under `--root`.
#[derive(Debug, Clone)]
pub struct Target {
    pub root: PathBuf,
    pub bin_dir: PathBuf,
    /// The directory the programs are copied from (the running cdpctl's).
    pub exe_dir: PathBuf,
    /// dpkg's file list of the cdpd package, if installed there.
    packaged: Vec<PathBuf>,
    /// Whether systemd runs the target system (`/run/systemd/system`; never
    /// for a `--root`).
    pub systemd: bool,
    /// The root is the running system (`/`), not an image under `--root`:
    /// its services can be started (tests set it on a fake root).
    pub live: bool,
}

impl Target {
    /// For the running cdpctl: programs come from its directory.
    pub fn new(root: Option<&Path>, bin_dir: Option<&Path>) -> Result<Target> {
        let exe = std::env::current_exe().map_err(InstallError::NoExe)?;
        let exe_dir = exe
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| "/".into());
        Target::with_exe_dir(root, bin_dir, exe_dir)
    }

    /// Programs come from `exe_dir`.
    pub fn with_exe_dir(
        root: Option<&Path>,
        bin_dir: Option<&Path>,
        exe_dir: PathBuf,
    ) -> Result<Target> {
        let root = root.unwrap_or(Path::new("/")).to_path_buf();
        if !root.is_dir() {
            return Err(InstallError::BadRoot(root));
        }
        let mut t = Target {
            root,
            bin_dir: DEFAULT_BIN_DIR.into(),
            exe_dir,
            packaged: Vec::new(),
            systemd: false,
            live: false,
        };
        t.live = t.root == Path::new("/");
        t.systemd = t.real_root() && Path::new("/run/systemd/system").is_dir();
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
    pub fn at(&self, p: &Path) -> PathBuf {
        self.root.join(p.strip_prefix("/").unwrap_or(p))
    }

    fn is_packaged(&self, p: &Path) -> bool {
        self.packaged.iter().any(|q| q == p)
    }

    fn real_root(&self) -> bool {
        self.live
    }

    /// True when the programs are already where they are to be installed.
    fn runs_from_bin_dir(&self) -> bool {
        same_dir(&self.exe_dir, &self.at(&self.bin_dir))
    }

    fn systemd_running(&self) -> bool {
        self.systemd
    }

    /// The cdpd package is installed on the target system.
    fn package_installed(&self) -> bool {
        !self.packaged.is_empty()
    }

    /// The manifest of an earlier install (`None`: none, or one from before
    /// manifests were written).
    fn manifest(&self) -> Result<Option<Manifest>> {
        Manifest::load(&self.at(Path::new(MANIFEST_PATH)))
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

/// `systemctl QUERY cdp-agent.service` printed `want` (is-enabled, is-active: they
/// exit non-zero for "no").
fn systemctl_is(query: &str, want: &str) -> bool {
    Command::new("systemctl")
        .args([query, SERVICE])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == want)
        .unwrap_or(false)
}

/// The config install works with: `--config`, else the target's (or, when it
/// has none yet, the sample install writes there).
fn install_config(g: &Global, t: &Target) -> Result<Config> {
    let path = g
        .config
        .clone()
        .unwrap_or_else(|| t.at(Path::new(CONFIG_PATH)));
    if path.exists() || g.config.is_some() {
        Ok(Config::load_file(&path)?)
    } else {
        Config::parse(SAMPLE_CONFIG).map_err(|e| InstallError::Sample(e.to_string()))
    }
}

/// The config uninstall works with: as install's, or the defaults.
fn uninstall_config(g: &Global, t: &Target) -> Config {
    let path = g
        .config
        .clone()
        .unwrap_or_else(|| t.at(Path::new(CONFIG_PATH)));
    Config::load_file(&path).unwrap_or_default()
}

/// Make `dest` hold `text` with `mode`: the step for it (reported as `kind`, `path`).
fn put_text(kind: &'static str, path: &Path, dest: &Path, text: &str, mode: u32) -> Result<Step> {
    let write = Op::Write {
        to: dest.to_path_buf(),
        content: text.to_string(),
        mode,
    };
    match fs::metadata(dest) {
        Ok(m) => {
            let cur = fs::read(dest).map_err(io_err("install", dest))?;
            if cur != text.as_bytes() {
                return Ok(Step::change(kind, path, "updated", write));
            }
            if mode_of(&m) == mode {
                return Ok(Step::same(kind, path, "unchanged"));
            }
            let chmod = Op::Chmod {
                to: dest.to_path_buf(),
                mode,
            };
            Ok(Step::change(kind, path, "updated", chmod).detail("mode"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok(Step::change(kind, path, "created", write))
        }
        Err(e) => Err(io_err("install", dest)(e)),
    }
}

/// A template file (hook, unit) at `path`: written unless edited by hand.
fn template(
    p: &mut Plan,
    t: &Target,
    (kind, path): (&'static str, &Path),
    (text, template, variable): (&str, &str, &str),
    (mode, force, hint): (u32, bool, &str),
) -> Result<Step> {
    let dest = t.at(path);
    match fs::read_to_string(&dest).ok() {
        Some(cur) if cur != text && !is_ours(&cur, template, variable) && !force => {
            p.conflicts.push(path.to_path_buf());
            Ok(Step::same(kind, path, "modified").detail(hint))
        }
        _ => put_text(kind, path, &dest, text, mode),
    }
}

/// What `cdpctl install` would do.
pub fn install(g: &Global, a: &InstallArgs, t: &Target) -> Result<Plan> {
    refuse_over_package(a, t)?;
    let old = t.manifest()?;
    let mut p = Plan::new(t);
    p.manifest = old.clone().unwrap_or_default();
    binaries(&mut p, t)?;
    let config = config_file(&mut p, g, t)?;
    let state_dir = config.state_dir(g.state_dir.as_deref());
    let run_dir = config.run_dir(g.run_dir.as_deref());
    // Their owner is set by the hook when a VM starts.
    for (what, d) in [("state", &state_dir), ("run", &run_dir)] {
        let step = if t.at(d).is_dir() {
            Step::same("dir", d, "unchanged")
        } else {
            let op = Op::MkDir {
                to: t.at(d),
                mode: 0o755,
            };
            Step::change("dir", d, "created", op)
        };
        p.steps.push(step.detail(format!("{what} directory")));
    }
    if a.libvirt {
        hook(&mut p, t, a.force)?;
        apparmor(&mut p, t, &apparmor_block(&t.bin_dir))?;
    }
    if a.systemd {
        let unit_changed = unit(&mut p, t, a.force)?;
        let binaries_changed = p
            .steps
            .iter()
            .any(|s| s.item.kind == "binary" && s.item.changed);
        service(&mut p, t, unit_changed, binaries_changed);
    }
    if !a.systemd && t.real_root() && !t.systemd {
        p.next.push(no_systemd_hint(t));
    }
    if p.changes() && !p.next.iter().any(|n| n.contains("cdpctl protect")) {
        p.next
            .push("protect a VM: cdpctl protect VM (then restart the VM)".into());
    }
    record(&mut p, t, old.is_none());
    manifest_step(&mut p, t, old.as_ref());
    Ok(p)
}

/// Where the cdpd package is installed, a copy of the programs elsewhere would
/// shadow (or be shadowed by) the package's: refused, naming the command to
/// use. The package's own cdpctl (run from /usr/bin) copies nothing and may
/// add the hook and AppArmor rules.
fn refuse_over_package(a: &InstallArgs, t: &Target) -> Result<()> {
    if !t.package_installed() || t.runs_from_bin_dir() {
        return Ok(());
    }
    let mut cmd = format!(
        "{} install",
        t.at(Path::new(PACKAGE_BIN_DIR)).join("cdpctl").display()
    );
    if a.libvirt {
        cmd.push_str(" --libvirt");
    }
    if !t.real_root() {
        cmd.push_str(&format!(" --root {}", t.root.display()));
    }
    if a.systemd {
        cmd.push_str(
            " (the package ships the cdp-agent unit: systemctl enable --now cdp-agent.service)",
        );
    }
    Err(InstallError::Packaged {
        bin_dir: t.bin_dir.clone(),
        cmd,
    })
}

/// What runs the agent where systemd does not.
fn no_systemd_hint(t: &Target) -> String {
    format!(
        "systemd is not running here (no /run/systemd/system): nothing starts cdp-agent; run it as root \
         and keep it running (from your init system or a supervisor): {} run",
        t.bin_dir.join("cdp-agent").display()
    )
}

/// Add what this plan creates to the manifest. `adopt`: there was no manifest
/// (a first install, or one made before manifests were written): what is ours
/// by content already (programs as built, hook and unit as templated) is
/// recorded as created too, so that uninstall removes an older install's files.
fn record(p: &mut Plan, t: &Target, adopt: bool) {
    let etc = Path::new("/etc/cdp");
    let mut created: Vec<PathBuf> = Vec::new();
    for s in &p.steps {
        let i = &s.item;
        let ours = matches!(i.kind, "binary" | "hook" | "unit")
            && matches!(i.action, "unchanged" | "updated")
            && i.detail.as_deref() != Some("cdpctl runs from here");
        if i.action == "created" || (adopt && ours && !t.package_installed()) {
            created.push(i.path.clone());
        }
        if i.kind == "config" && i.action == "created" && !t.at(etc).exists() {
            created.push(etc.to_path_buf());
        }
    }
    // dpkg's files are never install's, even where it finds them unchanged.
    for c in created.into_iter().filter(|c| !t.is_packaged(c)) {
        p.manifest.record(&c, Entry::Created);
    }
}

/// The manifest goes first: a failure later leaves a record of what was
/// about to be created.
fn manifest_step(p: &mut Plan, t: &Target, old: Option<&Manifest>) {
    if old == Some(&p.manifest) || (old.is_none() && p.manifest.entries.is_empty()) {
        return;
    }
    let path = Path::new(MANIFEST_PATH);
    let op = Op::Write {
        to: t.at(path),
        content: p.manifest.text(),
        mode: 0o644,
    };
    let action = if old.is_some() { "updated" } else { "created" };
    let step = Step::change("manifest", path, action, op)
        .detail("what install created or modified: uninstall undoes only that");
    p.steps.insert(0, step);
}

fn binaries(p: &mut Plan, t: &Target) -> Result<()> {
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
    let in_place = t.runs_from_bin_dir();
    for b in BINARIES {
        let path = t.bin_dir.join(b);
        let dest = t.at(&path);
        if in_place {
            p.steps
                .push(Step::same("binary", &path, "unchanged").detail("cdpctl runs from here"));
            continue;
        }
        let src = t.exe_dir.join(b);
        let same = match fs::metadata(&dest) {
            Ok(m) => mode_of(&m) == 0o755 && files_equal(&src, &dest)?,
            Err(_) => false,
        };
        if same {
            p.steps.push(Step::same("binary", &path, "unchanged"));
            continue;
        }
        let action = if dest.exists() { "updated" } else { "created" };
        let detail = format!("from {}", src.display());
        let op = Op::Copy {
            from: src,
            to: dest,
            mode: 0o755,
        };
        p.steps
            .push(Step::change("binary", &path, action, op).detail(detail));
    }
    Ok(())
}

/// The config: written from the sample only when absent.
fn config_file(p: &mut Plan, g: &Global, t: &Target) -> Result<Config> {
    let path = Path::new(CONFIG_PATH);
    let dest = t.at(path);
    let step = if let Some(given) = &g.config {
        Step::same("config", given, "skipped").detail("--config given: the sample is not written")
    } else if dest.exists() {
        let same = fs::read(&dest).is_ok_and(|c| c == SAMPLE_CONFIG.as_bytes());
        Step::same("config", path, "kept").detail(if same {
            "the sample, as installed"
        } else {
            "exists: never overwritten"
        })
    } else {
        let op = Op::Write {
            to: dest,
            content: SAMPLE_CONFIG.into(),
            mode: 0o644,
        };
        Step::change("config", path, "created", op).detail("from the sample: review the targets")
    };
    p.steps.push(step);
    install_config(g, t)
}

fn hook(p: &mut Plan, t: &Target, force: bool) -> Result<()> {
    let step = template(
        p,
        t,
        ("hook", Path::new(HOOK_PATH)),
        (&hook_text(&t.bin_dir), HOOK, HOOK_VARIABLE),
        (
            0o755,
            force,
            "edited by hand: left as it is (--force replaces it)",
        ),
    )?;
    if step.item.action == "created" {
        p.next.push(
            "restart libvirtd (libvirt reads its hooks when it starts): systemctl restart libvirtd"
                .into(),
        );
    }
    p.steps.push(step);
    Ok(())
}

/// AppArmor rules, where AppArmor is configured: our marked block in the
/// local abstraction, the rest of the file kept.
fn apparmor(p: &mut Plan, t: &Target, block: &str) -> Result<()> {
    if !t.at(Path::new(APPARMOR_DIR)).is_dir() {
        let step = Step::same("apparmor", Path::new(APPARMOR_DIR), "skipped");
        p.steps.push(step.detail("no AppArmor on this system"));
        return Ok(());
    }
    // Where the hook writes each VM's rules.
    let rules = Path::new(APPARMOR_RULES_DIR);
    p.steps.push(if t.at(rules).is_dir() {
        Step::same("apparmor", rules, "unchanged").detail("per-VM rules directory")
    } else {
        let op = Op::MkDir {
            to: t.at(rules),
            mode: 0o755,
        };
        Step::change("apparmor", rules, "created", op).detail("per-VM rules directory")
    });
    let path = Path::new(APPARMOR_LOCAL);
    let dest = t.at(path);
    let cur = match fs::read_to_string(&dest) {
        Ok(c) => Some(c),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err("install", &dest)(e)),
    };
    if cur.as_deref().is_some_and(|c| c.contains(block)) {
        // Ours already (an install before manifests): there before, modified.
        let before = Entry::Modified {
            added_newline: false,
        };
        p.manifest.record(path, before);
        p.steps.push(Step::same("apparmor", path, "unchanged"));
        return Ok(());
    }
    let (mut text, had) = without_block(cur.as_deref().unwrap_or(""));
    let added_newline = !text.is_empty() && !text.ends_with('\n');
    if added_newline {
        text.push('\n');
    }
    text.push_str(block);
    let mode = fs::metadata(&dest).map(|m| mode_of(&m)).unwrap_or(0o644);
    let op = Op::Write {
        to: dest,
        content: text,
        mode,
    };
    // A file that was there (libvirt's, empty or not) is modified, never
    // created: uninstall gives it back, it does not remove it.
    let action = if cur.is_some() { "updated" } else { "created" };
    if cur.is_some() {
        p.manifest.record(
            path,
            Entry::Modified {
                added_newline: added_newline && !had,
            },
        );
    }
    p.steps.push(
        Step::change("apparmor", path, action, op)
            .detail("marked block; VMs started from now on get it"),
    );
    Ok(())
}

/// The unit file; whether it changes.
fn unit(p: &mut Plan, t: &Target, force: bool) -> Result<bool> {
    let step = template(
        p,
        t,
        ("unit", Path::new(UNIT_PATH)),
        (&unit_text(&t.bin_dir), UNIT, UNIT_VARIABLE),
        (
            0o644,
            force,
            "edited by hand: left as it is (use a drop-in; --force replaces it)",
        ),
    )?;
    let changed = step.item.changed;
    p.steps.push(step);
    Ok(changed)
}

/// The service: enabled and started, restarted for a new unit or new programs.
fn service(p: &mut Plan, t: &Target, unit_changed: bool, binaries_changed: bool) {
    let path = Path::new(SERVICE);
    if !t.systemd_running() {
        p.steps.push(
            Step::same("service", path, "skipped").detail(if t.real_root() {
                "systemd is not running"
            } else {
                "--root: no systemctl"
            }),
        );
        p.next.push(if t.real_root() {
            no_systemd_hint(t)
        } else {
            format!(
                "enable the agent in the image: systemctl --root {} enable {SERVICE}",
                t.root.display()
            )
        });
        return;
    }
    let systemctl = |args: &[&'static str]| Op::Systemctl {
        args: args.to_vec(),
        must: true,
    };
    let enabled = systemctl_is("is-enabled", "enabled");
    let active = systemctl_is("is-active", "active");
    let mut step = if !enabled || !active {
        Step::change(
            "service",
            path,
            "started",
            systemctl(&["enable", "--now", SERVICE]),
        )
        .detail("systemctl enable --now")
    } else if unit_changed || binaries_changed {
        Step::change(
            "service",
            path,
            "restarted",
            systemctl(&["try-restart", SERVICE]),
        )
        .detail("new unit or programs")
    } else {
        Step::same("service", path, "unchanged").detail("enabled and running")
    };
    if unit_changed {
        step.ops.insert(0, systemctl(&["daemon-reload"]));
    }
    p.steps.push(step);
}

/// What `cdpctl uninstall` would do.
pub fn uninstall(g: &Global, a: &UninstallArgs, t: &Target) -> Result<Plan> {
    let mut p = Plan::new(t);
    let old = t.manifest()?;
    let m = old.as_ref();
    let config = uninstall_config(g, t);
    let state_dir = config.state_dir(g.state_dir.as_deref());
    let run_dir = config.run_dir(g.run_dir.as_deref());
    if a.systemd {
        remove_unit(&mut p, t, m);
    }
    if a.libvirt {
        let hook = remove_ours(t, m, "hook", Path::new(HOOK_PATH), |c| {
            is_ours(c, HOOK, HOOK_VARIABLE)
        });
        if hook.item.action == "removed" {
            p.next.push(
                "restart libvirtd so that it forgets the hook: systemctl restart libvirtd".into(),
            );
        }
        p.steps.push(hook);
        p.steps.push(remove_apparmor(t, m));
        remove_vm_rules(&mut p, t, m)?;
    }
    remove_binaries(&mut p, t, m)?;
    remove_config(&mut p, t, m, a.purge);
    let etc = Path::new("/etc/cdp");
    if empty_after(&p, &t.at(etc)) && created(m, etc) {
        p.steps.push(Step::change(
            "dir",
            etc,
            "removed",
            Op::RemoveDir { to: t.at(etc) },
        ));
    }
    // State and run directories: removed when empty, or with --purge.
    for d in [&state_dir, &run_dir] {
        let dest = t.at(d);
        let step = if !dest.exists() {
            Step::same("dir", d, "absent")
        } else if t.package_installed() && PACKAGE_DIRS.iter().any(|p| Path::new(p) == *d) {
            Step::same("dir", d, "kept").detail("the cdpd package's: `apt purge cdpd` removes it")
        } else if empty_after(&p, &dest) && created(m, d) {
            Step::change("dir", d, "removed", Op::RemoveDir { to: dest })
        } else if empty_after(&p, &dest) {
            Step::same("dir", d, "kept").detail(BEFORE)
        } else if a.purge {
            check_purge(d, &run_dir, t)?;
            Step::change("dir", d, "removed", Op::RemoveTree { to: dest }).detail("--purge")
        } else {
            Step::same("dir", d, "kept").detail("not empty (--purge removes it)")
        };
        p.steps.push(step);
    }
    if let Some(m) = m {
        forget(&mut p, t, m);
    }
    Ok(p)
}

/// Why uninstall keeps a path: install did not create it.
const BEFORE: &str = "there before cdpctl install (not in its manifest): kept";

/// The directories the cdpd package's scripts create (never in its file list).
const PACKAGE_DIRS: [&str; 2] = ["/var/lib/cdp", "/run/cdp"];

/// Whether install created `p`: by the manifest, or, without one (an install
/// from before manifests), assumed, and decided by content as before.
fn created(m: Option<&Manifest>, p: &Path) -> bool {
    m.is_none_or(|m| m.created(p))
}

/// The manifest after this uninstall: what it undid is forgotten; the file
/// (and its directory) goes once nothing is left in it.
fn forget(p: &mut Plan, t: &Target, m: &Manifest) {
    let removed: Vec<PathBuf> = p.removed().map(Path::to_path_buf).collect();
    let written: Vec<PathBuf> = p
        .steps
        .iter()
        .flat_map(|s| &s.ops)
        .filter_map(|o| match o {
            Op::Write { to, .. } => Some(to.clone()),
            _ => None,
        })
        .collect();
    let mut left = m.clone();
    left.entries.retain(|path, e| {
        let real = t.at(path);
        match e {
            Entry::Created => real.exists() && !removed.contains(&real),
            Entry::Modified { .. } => {
                !written.contains(&real)
                    && fs::read_to_string(&real).is_ok_and(|c| without_block(&c).1)
            }
        }
    });
    if &left == m {
        return;
    }
    let path = Path::new(MANIFEST_PATH);
    if !left.entries.is_empty() {
        let op = Op::Write {
            to: t.at(path),
            content: left.text(),
            mode: 0o644,
        };
        p.steps.push(
            Step::change("manifest", path, "updated", op).detail("what is left of the install"),
        );
        return;
    }
    let op = Op::Remove { to: t.at(path) };
    p.steps.push(Step::change("manifest", path, "removed", op));
    let dir = Path::new(MANIFEST_DIR);
    if empty_after(p, &t.at(dir)) {
        let op = Op::RemoveDir { to: t.at(dir) };
        p.steps.push(Step::change("manifest", dir, "removed", op));
    }
}

/// `dir` exists and holds nothing once the steps planned so far have run.
fn empty_after(p: &Plan, dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    let removed: Vec<&Path> = p.removed().collect();
    entries
        .flatten()
        .all(|e| removed.contains(&e.path().as_path()))
}

fn remove_unit(p: &mut Plan, t: &Target, m: Option<&Manifest>) {
    let path = Path::new(UNIT_PATH);
    let systemctl = |args: &[&'static str]| Op::Systemctl {
        args: args.to_vec(),
        must: false,
    };
    if t.systemd_running() && t.at(path).exists() {
        let stop = systemctl(&["disable", "--now", SERVICE]);
        p.steps.push(
            Step::change("service", Path::new(SERVICE), "stopped", stop)
                .detail("systemctl disable --now"),
        );
    }
    let mut step = remove_ours(t, m, "unit", path, |c| is_ours(c, UNIT, UNIT_VARIABLE));
    if t.systemd_running() {
        step = step.then(systemctl(&["daemon-reload"]));
    }
    p.steps.push(step);
}

/// Remove a file of ours (recognized by `ours`); an edited one is kept and reported.
fn remove_ours(
    t: &Target,
    m: Option<&Manifest>,
    kind: &'static str,
    path: &Path,
    ours: impl Fn(&str) -> bool,
) -> Step {
    let dest = t.at(path);
    match fs::read_to_string(&dest) {
        Err(_) if !dest.exists() => Step::same(kind, path, "absent"),
        Ok(_) if !created(m, path) && !t.is_packaged(path) => {
            Step::same(kind, path, "kept").detail(BEFORE)
        }
        Ok(c) if ours(&c) && !t.is_packaged(path) => {
            Step::change(kind, path, "removed", Op::Remove { to: dest })
        }
        _ => Step::same(kind, path, "kept").detail(if t.is_packaged(path) {
            "owned by the cdpd package"
        } else {
            "edited by hand: not ours any more"
        }),
    }
}

/// The local abstraction: removed only when install created it (by the
/// manifest) and nothing but our block is in it; otherwise our block goes and
/// the file is as it was before install, byte for byte. libvirt's package
/// creates it empty and its abstraction includes it without `if exists`:
/// removing it breaks every VM's profile.
fn remove_apparmor(t: &Target, m: Option<&Manifest>) -> Step {
    let path = Path::new(APPARMOR_LOCAL);
    let dest = t.at(path);
    let Ok(cur) = fs::read_to_string(&dest) else {
        return Step::same("apparmor", path, "absent");
    };
    let (mut rest, had) = without_block(&cur);
    let entry = m.and_then(|m| m.get(path));
    if entry
        == Some(Entry::Modified {
            added_newline: true,
        })
        && rest.ends_with('\n')
    {
        rest.pop();
    }
    let libvirts = t.at(Path::new(APPARMOR_LIBVIRT_ABSTRACTION)).exists() || t.is_packaged(path);
    let mode = fs::metadata(&dest).map(|m| mode_of(&m)).unwrap_or(0o644);
    if !had {
        Step::same("apparmor", path, "absent")
    } else if rest.trim().is_empty() && entry == Some(Entry::Created) && !libvirts {
        Step::change("apparmor", path, "removed", Op::Remove { to: dest })
    } else {
        let detail = if entry == Some(Entry::Created) && rest.trim().is_empty() {
            "our block removed; the file stays (libvirt's abstraction includes it)"
        } else {
            "our block removed; the file as it was before install"
        };
        let op = Op::Write {
            to: dest,
            content: rest,
            mode,
        };
        Step::change("apparmor", path, "updated", op).detail(detail)
    }
}

/// The hook's per-VM rules (`/etc/apparmor.d/cdpd/libvirt-<uuid>`, and the
/// directory when nothing else is in it) and the line including them in
/// libvirt's profile of each VM (the rest of that profile kept).
fn remove_vm_rules(p: &mut Plan, t: &Target, m: Option<&Manifest>) -> Result<()> {
    let rules = Path::new(APPARMOR_RULES_DIR);
    let is_ours = |n: &str| {
        n.strip_prefix("libvirt-")
            .or_else(|| {
                n.strip_prefix(".libvirt-")
                    .and_then(|n| n.strip_suffix(".cdp-new"))
            })
            .is_some_and(|u| cdp_core::names::check_uuid(u).is_ok())
    };
    for (name, dest) in listing(&t.at(rules)) {
        if is_ours(&name) {
            let path = rules.join(&name);
            p.steps.push(
                Step::change("apparmor", &path, "removed", Op::Remove { to: dest })
                    .detail("a VM's rules"),
            );
        }
    }
    if empty_after(p, &t.at(rules)) && created(m, rules) {
        let op = Op::RemoveDir { to: t.at(rules) };
        p.steps.push(Step::change("apparmor", rules, "removed", op));
    }
    let libvirt = Path::new(APPARMOR_LIBVIRT_DIR);
    for (name, dest) in listing(&t.at(libvirt)) {
        if !is_ours(&name) || name.starts_with('.') {
            continue;
        }
        let Ok(text) = fs::read_to_string(&dest) else {
            continue;
        };
        let (rest, had) = cdp_hooks::hook::apparmor::without_include(&text);
        if had {
            let mode = fs::metadata(&dest).map(|m| mode_of(&m)).unwrap_or(0o644);
            let op = Op::Write {
                to: dest,
                content: rest,
                mode,
            };
            p.steps.push(
                Step::change("apparmor", &libvirt.join(&name), "updated", op)
                    .detail("libvirt's profile of the VM: our include line removed"),
            );
        }
    }
    Ok(())
}

/// The entries of `dir` (name, real path), sorted; none when it is missing.
fn listing(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut v: Vec<(String, PathBuf)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .collect();
    v.sort();
    v
}

/// Programs: only copies of ours, never the package's.
fn remove_binaries(p: &mut Plan, t: &Target, m: Option<&Manifest>) -> Result<()> {
    for b in BINARIES {
        let path = t.bin_dir.join(b);
        let dest = t.at(&path);
        let src = t.exe_dir.join(b);
        let step = if !dest.exists() {
            Step::same("binary", &path, "absent")
        } else if t.is_packaged(&path) {
            Step::same("binary", &path, "kept").detail("owned by the cdpd package: apt remove cdpd")
        } else if !created(m, &path) {
            Step::same("binary", &path, "kept").detail(BEFORE)
        } else if m.is_some() {
            // Created by install (an upgrade may have replaced it since).
            Step::change("binary", &path, "removed", Op::Remove { to: dest })
        } else if !src.is_file() || !files_equal(&src, &dest)? {
            Step::same("binary", &path, "kept").detail(format!(
                "differs from {}: run the installed {} uninstall",
                src.display(),
                t.bin_dir.join("cdpctl").display()
            ))
        } else {
            Step::change("binary", &path, "removed", Op::Remove { to: dest })
        };
        p.steps.push(step);
    }
    Ok(())
}

/// The config: the unedited sample is ours; an edited one is the operator's.
fn remove_config(p: &mut Plan, t: &Target, m: Option<&Manifest>, purge: bool) {
    let path = Path::new(CONFIG_PATH);
    let dest = t.at(path);
    let step = match fs::read(&dest) {
        Ok(_) if t.is_packaged(path) => Step::same("config", path, "kept")
            .detail("a conffile of the cdpd package: `apt purge cdpd` removes it"),
        Ok(_) if !created(m, path) && !purge => Step::same("config", path, "kept").detail(BEFORE),
        Ok(c) if purge || c == SAMPLE_CONFIG.as_bytes() => {
            Step::change("config", path, "removed", Op::Remove { to: dest })
        }
        Ok(_) => Step::same("config", path, "kept").detail("edited: kept (--purge removes it)"),
        Err(_) => Step::same("config", path, "absent"),
    };
    p.steps.push(step);
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
    let run = cdp_core::layout::RunDir::new(t.at(run_dir));
    if let Some(vm) = run
        .vms_with_control_socket()
        .ok()
        .and_then(|v| v.into_iter().next())
    {
        return Err(refuse(format!(
            "VM {vm} is being captured (control socket in {}): stop the protected VMs first",
            run_dir.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::install::{apply::apply, items::Item};

    struct Host {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        exe_dir: PathBuf,
    }

    /// An empty root, and a directory with (fake) programs to install from.
    fn host() -> Host {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let exe_dir = tmp.path().join("build");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&exe_dir).unwrap();
        for b in BINARIES {
            fs::write(exe_dir.join(b), format!("#!/bin/sh\n# {b}\n")).unwrap();
        }
        Host {
            _tmp: tmp,
            root,
            exe_dir,
        }
    }

    impl Host {
        fn target(&self) -> Target {
            Target::with_exe_dir(Some(&self.root), None, self.exe_dir.clone()).unwrap()
        }
        fn install(&self, a: &InstallArgs) -> Plan {
            install(&global(), a, &self.target()).unwrap()
        }
        fn at(&self, p: &str) -> PathBuf {
            self.target().at(Path::new(p))
        }
        /// Every path under the root, sorted.
        fn tree(&self) -> Vec<PathBuf> {
            fn walk(d: &Path, out: &mut Vec<PathBuf>) {
                for e in fs::read_dir(d).unwrap().flatten() {
                    out.push(e.path());
                    if e.file_type().unwrap().is_dir() {
                        walk(&e.path(), out);
                    }
                }
            }
            let mut out = Vec::new();
            walk(&self.root, &mut out);
            out.sort();
            out
        }
    }

    fn global() -> Global {
        Global {
            config: None,
            state_dir: None,
            run_dir: None,
            json: false,
        }
    }

    fn all() -> InstallArgs {
        InstallArgs {
            libvirt: true,
            systemd: true,
            ..Default::default()
        }
    }

    fn step<'a>(p: &'a Plan, path: &str) -> &'a Step {
        p.steps
            .iter()
            .find(|s| s.item.path == Path::new(path))
            .unwrap_or_else(|| panic!("no step for {path}: {:#?}", p.steps))
    }

    /// A live host without systemd (no /run/systemd/system): the agent's
    /// service is skipped and `next` says that nothing starts the agent and
    /// the exact command line that runs it, with or without `--systemd`.
    #[test]
    fn a_host_without_systemd_is_told_how_to_run_the_agent() {
        let h = host();
        let mut t = h.target();
        t.live = true;
        t.systemd = false;
        let hint = "nothing starts cdp-agent; run it as root";
        let cmd = "/usr/local/bin/cdp-agent run";
        for a in [all(), InstallArgs::default()] {
            let p = install(&global(), &a, &t).unwrap();
            let n = p.next.iter().filter(|n| n.contains(hint)).count();
            assert_eq!(n, 1, "{:#?}", p.next);
            assert!(p.next.iter().any(|n| n.ends_with(cmd)), "{:#?}", p.next);
            if a.systemd {
                let svc = step(&p, SERVICE);
                assert_eq!((svc.item.action, svc.ops.len()), ("skipped", 0));
                assert!(!p.next.iter().any(|n| n.contains("systemctl --root")));
            }
        }
        // Under systemd, or for an image (--root), no such hint.
        let p = install(&global(), &all(), &h.target()).unwrap();
        assert!(!p.next.iter().any(|n| n.contains(hint)), "{:#?}", p.next);
    }

    #[test]
    fn planning_writes_nothing_and_names_every_item() {
        let h = host();
        let p = h.install(&all());
        assert!(h.tree().is_empty(), "planning wrote {:?}", h.tree());
        for b in BINARIES {
            let s = step(&p, &format!("/usr/local/bin/{b}"));
            assert_eq!((s.item.action, s.item.changed), ("created", true));
            assert_eq!(
                s.ops,
                [Op::Copy {
                    from: h.exe_dir.join(b),
                    to: h.at(&format!("/usr/local/bin/{b}")),
                    mode: 0o755
                }]
            );
        }
        let cfg = step(&p, CONFIG_PATH);
        assert!(
            matches!(&cfg.ops[..], [Op::Write { content, mode: 0o644, .. }] if content == SAMPLE_CONFIG)
        );
        let hook = step(&p, HOOK_PATH);
        assert!(
            matches!(&hook.ops[..], [Op::Write { content, mode: 0o755, .. }] if *content == hook_text(Path::new("/usr/local/bin")))
        );
        assert!(matches!(
            &step(&p, "/var/lib/cdp").ops[..],
            [Op::MkDir { mode: 0o755, .. }]
        ));
        assert_eq!(step(&p, APPARMOR_DIR).item.action, "skipped");
        assert_eq!(step(&p, UNIT_PATH).item.action, "created");
        // --root: no systemctl, a hint instead.
        let svc = step(&p, SERVICE);
        assert_eq!((svc.item.action, svc.ops.len()), ("skipped", 0));
        assert!(p.next.iter().any(|n| n.contains("systemctl --root")));
        assert!(p.next.iter().any(|n| n.contains("restart libvirtd")));
        assert!(p.conflicts.is_empty());
    }

    #[test]
    fn applied_plan_is_followed_by_an_empty_one() {
        let h = host();
        fs::create_dir_all(h.at(APPARMOR_DIR)).unwrap();
        let (report, res) = apply(h.install(&all()), "install");
        res.unwrap();
        assert!(report.changed());
        assert_eq!(
            fs::read_to_string(h.at("/usr/local/bin/cdpd")).unwrap(),
            "#!/bin/sh\n# cdpd\n"
        );
        let mode = fs::metadata(h.at(HOOK_PATH)).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o755);
        assert!(fs::read_to_string(h.at(APPARMOR_LOCAL))
            .unwrap()
            .contains("# END cdpd"));

        let again = h.install(&all());
        let busy: Vec<&Item> = again
            .steps
            .iter()
            .filter(|s| s.item.changed || !s.ops.is_empty())
            .map(|s| &s.item)
            .collect();
        assert!(busy.is_empty(), "second plan: {busy:#?}");
        assert!(!again.next.iter().any(|n| n.contains("restart libvirtd")));

        // A wrong mode is put right by a chmod, not a rewrite.
        fs::set_permissions(h.at(HOOK_PATH), fs::Permissions::from_mode(0o644)).unwrap();
        let p = h.install(&all());
        assert_eq!(
            step(&p, HOOK_PATH).ops,
            [Op::Chmod {
                to: h.at(HOOK_PATH),
                mode: 0o755
            }]
        );
    }

    #[test]
    fn edited_hook_is_a_conflict_until_forced() {
        let h = host();
        apply(h.install(&all()), "install").1.unwrap();
        fs::write(h.at(HOOK_PATH), "#!/bin/sh\nexit 0\n").unwrap();
        let p = h.install(&all());
        let s = step(&p, HOOK_PATH);
        assert_eq!((s.item.action, s.ops.len()), ("modified", 0));
        assert_eq!(p.conflicts, [PathBuf::from(HOOK_PATH)]);
        let (_, res) = apply(p, "install");
        assert!(matches!(res, Err(InstallError::Modified { .. })), "{res:?}");
        assert_eq!(
            fs::read_to_string(h.at(HOOK_PATH)).unwrap(),
            "#!/bin/sh\nexit 0\n"
        );

        let forced = h.install(&InstallArgs {
            force: true,
            ..all()
        });
        assert!(forced.conflicts.is_empty());
        assert_eq!(step(&forced, HOOK_PATH).item.action, "updated");
    }

    #[test]
    fn dry_run_reports_the_plan_and_changes_nothing() {
        let h = host();
        let plan = h.install(&all());
        let items: Vec<Item> = plan.steps.iter().map(|s| s.item.clone()).collect();
        let (report, res) = crate::install::finish(plan, true, "install");
        res.unwrap();
        assert!(report.dry_run);
        assert_eq!(report.items, items);
        assert!(h.tree().is_empty(), "dry run wrote {:?}", h.tree());

        // A conflict fails the dry run as it would fail the install.
        apply(h.install(&all()), "install").1.unwrap();
        fs::write(h.at(UNIT_PATH), "[Service]\n").unwrap();
        let before = h.tree();
        let (_, res) = crate::install::finish(h.install(&all()), true, "install");
        assert!(matches!(res, Err(InstallError::Modified { .. })), "{res:?}");
        assert_eq!(h.tree(), before);
    }

    #[test]
    fn missing_programs_fail_the_plan() {
        let h = host();
        fs::remove_file(h.exe_dir.join("cdp-agent")).unwrap();
        let e = install(&global(), &all(), &h.target()).unwrap_err();
        assert!(
            matches!(&e, InstallError::MissingBinaries { missing, .. } if missing == "cdp-agent"),
            "{e}"
        );
    }

    #[test]
    fn uninstall_plan_removes_what_install_wrote_and_the_emptied_dirs() {
        let h = host();
        apply(h.install(&all()), "install").1.unwrap();
        let a = UninstallArgs {
            libvirt: true,
            systemd: true,
            ..Default::default()
        };
        let p = uninstall(&global(), &a, &h.target()).unwrap();
        for path in [
            CONFIG_PATH,
            "/etc/cdp",
            "/var/lib/cdp",
            "/run/cdp",
            HOOK_PATH,
        ] {
            assert_eq!(step(&p, path).item.action, "removed", "{path}");
        }
        assert_eq!(
            step(&p, "/etc/cdp").ops,
            [Op::RemoveDir {
                to: h.at("/etc/cdp")
            }]
        );
        apply(p, "uninstall").1.unwrap();
        assert!(!h.at("/etc/cdp").exists());
        assert!(!h.at("/usr/local/bin/cdpd").exists());

        // State left in the state directory is kept without --purge.
        fs::create_dir_all(h.at("/var/lib/cdp")).unwrap();
        fs::write(h.at("/var/lib/cdp/catalog.sqlite"), "state").unwrap();
        let p = uninstall(&global(), &a, &h.target()).unwrap();
        assert_eq!(step(&p, "/var/lib/cdp").item.action, "kept");
    }

    /// issue 15: libvirt's abstraction includes the local file without `if
    /// exists`; uninstall gives it back as it was (empty included) and takes
    /// the hook's per-VM rules and include lines away, nothing else.
    #[test]
    fn uninstall_restores_libvirts_apparmor_files() {
        use cdp_hooks::hook::apparmor;
        let h = host();
        let a = "6f1c2a8e-3b4d-4e5f-8a9b-0c1d2e3f4a5b";
        fs::create_dir_all(h.at("/etc/apparmor.d/abstractions")).unwrap();
        fs::write(
            h.at(APPARMOR_LIBVIRT_ABSTRACTION),
            "#include <local/abstractions/libvirt-qemu>\n",
        )
        .unwrap();
        fs::create_dir_all(h.at("/etc/apparmor.d/local/abstractions")).unwrap();
        fs::write(h.at(APPARMOR_LOCAL), "").unwrap();
        let libvirt = h.at(APPARMOR_LIBVIRT_DIR);
        fs::create_dir_all(&libvirt).unwrap();
        let template = "#include <tunables/global>\n\nprofile LIBVIRT_TEMPLATE flags=(attach_disconnected) {\n  #include <abstractions/libvirt-qemu>\n}\n";
        fs::write(libvirt.join("TEMPLATE.qemu"), template).unwrap();
        let (untouched, _) =
            apparmor::without_include(&apparmor::from_template(template, a).unwrap());
        fs::write(libvirt.join(format!("libvirt-{a}.files")), "# libvirt's\n").unwrap();

        let (_, res) = apply(h.install(&all()), "install");
        res.unwrap();
        assert!(h.at(APPARMOR_RULES_DIR).is_dir());
        // A VM started: the hook gave it its rules.
        apparmor::install_vm(&h.at(APPARMOR_DIR), a, "  /x r,\n").unwrap();
        let profile = libvirt.join(format!("libvirt-{a}"));
        assert!(fs::read_to_string(&profile)
            .unwrap()
            .contains(apparmor::MARK));

        let un = UninstallArgs {
            libvirt: true,
            ..Default::default()
        };
        let plan = uninstall(&global(), &un, &h.target()).unwrap();
        let local = step(&plan, APPARMOR_LOCAL);
        assert_eq!(local.item.action, "updated");
        assert!(matches!(&local.ops[..], [Op::Write { content, .. }] if content.is_empty()));
        // The plan is what a dry run prints, and it changes nothing.
        let before = h.tree();
        let (report, res) = crate::install::finish(
            uninstall(&global(), &un, &h.target()).unwrap(),
            true,
            "uninstall",
        );
        res.unwrap();
        assert_eq!(h.tree(), before);
        assert!(report
            .items
            .iter()
            .any(|i| i.path == Path::new(APPARMOR_RULES_DIR) && i.action == "removed"));

        apply(plan, "uninstall").1.unwrap();
        assert_eq!(fs::read_to_string(h.at(APPARMOR_LOCAL)).unwrap(), "");
        assert!(!h.at(APPARMOR_RULES_DIR).exists());
        assert_eq!(fs::read_to_string(&profile).unwrap(), untouched);
        assert_eq!(
            fs::read_to_string(libvirt.join(format!("libvirt-{a}.files"))).unwrap(),
            "# libvirt's\n"
        );
        assert_eq!(
            fs::read_to_string(libvirt.join("TEMPLATE.qemu")).unwrap(),
            template
        );
    }
}
