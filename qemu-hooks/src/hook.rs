//! The libvirt hook `/etc/libvirt/hooks/qemu.d/cdp` (runs as root; libvirt
//! passes `DOMAIN OPERATION SUB-OPERATION EXTRA` and the domain XML on stdin).
//!
//! - `prepare begin` and `start begin`: validate the CDP keys against the
//!   config (a bad key fails the start here, with the reason, before any
//!   resource is touched); create `<state>`, `<state>/vms` and `<run>`
//!   owned by root, mode 0755 (never handed to a VM's user: older versions
//!   did, and such a directory is given back to root), and the VM's own
//!   `<state>/vms/<uuid>` and `<run>/<uuid>` owned by the user its QEMU runs
//!   as, mode 0700 (one owned by another non-root user is refused, never
//!   re-owned); leave the definition where cdp-qemu (which runs as that user
//!   and cannot read libvirt's own status files) finds it:
//!   `<run-dir>/<uuid>/domain.xml`. Under libvirt's AppArmor driver, write
//!   the VM's own AppArmor rules and make its profile include them
//!   ([`apparmor`]; docs/DESIGN.md, "libvirt integration").
//! - Everything below the state and run directories is reached through
//!   directory descriptors (`cdp_core::fsat`): QEMU's user owns those trees,
//!   so nothing there is opened by path, no link is followed, and nothing is
//!   chowned or chmodded by path (issue 11, "Trust boundaries"). A link
//!   found where cdp expects a file is left alone and reported.
//! - `release end`: hand the VM's leftover journal to cdp-agent (a datagram;
//!   the agent also finds it on its own scan), remove the definition and the
//!   VM's AppArmor rules.
//!
//! A VM without CDP keys is never blocked: the hook returns as soon as it
//! sees there are none, before reading the config, and any error about a
//! VM that is not protected is swallowed.

use std::ffi::OsStr;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use cdp_core::config::Config;
use cdp_core::fsat::{DirFd, FsatError, Kind};
use cdp_core::layout::{RunDir, StateDir};
use thiserror::Error;

use crate::domain::{self, DomainError, NS};

#[derive(Debug, Error)]
pub enum HookError {
    #[error("VM {vm}: {source}")]
    Domain {
        vm: String,
        #[source]
        source: DomainError,
    },
    #[error(transparent)]
    Config(#[from] cdp_core::config::ConfigError),
    #[error("the QEMU user {user:?} ([libvirt] qemu_user in the config) does not exist: set qemu_user to the user of libvirt's qemu.conf")]
    NoUser { user: String },
    #[error(transparent)]
    Fs(#[from] FsatError),
    #[error(
        "{path} is owned by uid {found}, not by uid {owner} that this VM's QEMU runs as: cdp never \
         re-owns another user's tree. If the VM's QEMU user changed, check what is in it and \
         `chown -R {owner} {path}`; if it is another VM's or stale, move it away; then start the VM again"
    )]
    ForeignOwner {
        path: PathBuf,
        found: u32,
        owner: u32,
    },
    #[error("{path}: AppArmor cannot name this path literally (a quote, `@{{`, a control character, or not absolute): use another directory")]
    AppArmorPath { path: PathBuf },
    #[error("{path}: not libvirt's AppArmor template (no `profile LIBVIRT_TEMPLATE ... }}`): cannot give the VM its AppArmor rules")]
    AppArmorTemplate { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> HookError + '_ {
    move |source| HookError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What one invocation did (printed by `cdpctl libvirt-hook` for the log).
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not an operation we act on, or a VM without CDP keys.
    Ignored,
    Prepared {
        uuid: String,
        owner: (u32, u32),
        /// Links (and hard-linked files) found in the VM's trees: never
        /// followed, never chowned, left where they are.
        left_alone: Vec<PathBuf>,
    },
    Released {
        uuid: String,
        agent_notified: bool,
    },
}

/// QEMU's user for a VM, as the hook decides it: the definition's DAC label,
/// else `[libvirt] qemu_user`/`qemu_group` (`cdpctl protect` prepares the
/// repository for the same owner).
pub fn vm_owner(c: &Config, xml: &str) -> Result<(u32, u32), HookError> {
    match dac_label(xml) {
        Some(o) => Ok(o),
        None => configured_owner(c),
    }
}

/// Owner from the domain's DAC label (`<seclabel model='dac'><label>+UID:+GID`),
/// known from `start begin` on.
fn dac_label(xml: &str) -> Option<(u32, u32)> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let label = doc
        .descendants()
        .filter(|n| n.has_tag_name("seclabel") && n.attribute("model") == Some("dac"))
        .find_map(|s| s.children().find(|c| c.has_tag_name("label")))?
        .text()?;
    let (u, g) = label.trim().split_once(':')?;
    let num = |s: &str| s.strip_prefix('+').and_then(|n| n.parse::<u32>().ok());
    Some((num(u)?, num(g)?))
}

fn configured_owner(c: &Config) -> Result<(u32, u32), HookError> {
    let user = c
        .libvirt
        .qemu_user
        .clone()
        .unwrap_or_else(|| cdp_core::config::DEFAULT_QEMU_USER.into());
    let pw = nix::unistd::User::from_name(&user)
        .ok()
        .flatten()
        .ok_or_else(|| HookError::NoUser { user: user.clone() })?;
    let gid = match &c.libvirt.qemu_group {
        Some(g) => nix::unistd::Group::from_name(g)
            .ok()
            .flatten()
            .ok_or_else(|| HookError::NoUser {
                user: format!("{user}:{g}"),
            })?
            .gid
            .as_raw(),
        None => pw.gid.as_raw(),
    };
    Ok((pw.uid.as_raw(), gid))
}

/// The last component of a layout path: names inside an opened directory
/// come from `cdp_core::layout`, like every path under the state and run
/// directories.
fn name_of(p: &Path) -> Result<&OsStr, HookError> {
    p.file_name().ok_or_else(|| HookError::Io {
        path: p.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a directory name"),
    })
}

/// A directory every VM shares (`<state>`, `<state>/vms`, `<run>`): the
/// entry `name` of `parent`, created when missing, opened without following
/// a link, and made root's, mode 0755, through its descriptor. Older
/// versions handed these to QEMU's user: such a directory is re-owned, and
/// the hook says so on stderr.
fn shared_dir(parent: &DirFd, name: &OsStr) -> Result<DirFd, HookError> {
    parent.mkdir_at(name, 0o755)?;
    let d = parent.open_at(name)?;
    let was = d.owner()?;
    if was != (0, 0) {
        d.chown((0, 0))?;
        eprintln!(
            "cdp hook: {} was owned by {}:{} (given to QEMU's user by an older cdpd): now root's, mode 0755",
            d.path().display(),
            was.0,
            was.1
        );
    }
    d.chmod(0o755)?;
    Ok(d)
}

/// The configured directory `path` (state or run): its parent is the
/// operator's and is created as a path; `path` itself is a [`shared_dir`].
fn config_dir(path: &Path) -> Result<DirFd, HookError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    shared_dir(&DirFd::open(parent)?, name_of(path)?)
}

/// One VM's directory (`<state>/vms/<uuid>`, `<run>/<uuid>`): the entry
/// `name` of a root-owned `parent`, created when missing, opened without
/// following a link, given to `owner` with mode 0700 through its
/// descriptor. One that exists is taken over only from root (an older
/// version, or root's own work); one owned by any other user is refused:
/// another uid's tree is never re-owned.
fn vm_dir(parent: &DirFd, name: &OsStr, owner: (u32, u32)) -> Result<DirFd, HookError> {
    parent.mkdir_at(name, 0o700)?;
    let d = parent.open_at(name)?;
    let found = d.owner()?.0;
    if found != owner.0 && found != 0 {
        return Err(HookError::ForeignOwner {
            path: d.path().to_path_buf(),
            found,
            owner: owner.0,
        });
    }
    d.chown(owner)?;
    d.chmod(0o700)?;
    Ok(d)
}

/// Deeper than the journal tree (`<uuid>/<disk>/journal/<seq>.seg`) ever
/// goes: what lies below is not ours and is left alone.
const MAX_DEPTH: usize = 8;

/// chown -R through descriptors: a directory is opened (`O_NOFOLLOW`) before
/// it is walked, a file is opened and checked before `fchown`, and a
/// symbolic link, a hard-linked file or anything deeper than [`MAX_DEPTH`]
/// is left alone and reported in `left_alone`.
fn own_tree(
    dir: &DirFd,
    owner: (u32, u32),
    depth: usize,
    left_alone: &mut Vec<PathBuf>,
) -> Result<(), HookError> {
    dir.chown(owner)?;
    for e in dir.entries()? {
        let path = dir.path().join(&e.name);
        let r = match e.kind {
            Kind::Dir if depth < MAX_DEPTH => dir
                .open_at(&e.name)
                .map(|sub| own_tree(&sub, owner, depth + 1, left_alone)),
            Kind::Dir | Kind::Symlink => {
                left_alone.push(path);
                continue;
            }
            Kind::File | Kind::Other if e.owner == owner => continue,
            Kind::File | Kind::Other => dir.own_entry(&e.name, owner).map(Ok),
        };
        match r {
            Ok(inner) => inner?,
            Err(e) if e.is_not_found() => {}
            Err(
                FsatError::Symlink { .. }
                | FsatError::HardLinked { .. }
                | FsatError::NotAFile { .. }
                | FsatError::NotADirectory { .. },
            ) => left_alone.push(path),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Write `<run>/<uuid>/domain.xml` inside the opened per-VM directory: a
/// temporary name created with `O_EXCL|O_NOFOLLOW` (whatever had that name,
/// a planted link included, is unlinked first, never followed), given to
/// `owner` with `fchown`, then renamed over the definition.
fn write_definition(
    dir: &DirFd,
    name: &OsStr,
    xml: &str,
    owner: (u32, u32),
) -> Result<(), HookError> {
    let mut tmp = name.to_os_string();
    tmp.push(".tmp");
    let path = dir.path().join(&tmp);
    dir.remove_at(&tmp)?;
    let mut f = dir.create_file(&tmp, 0o600)?;
    f.write_all(xml.as_bytes()).map_err(io(&path))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io(&path))?;
    nix::unistd::fchown(
        f.as_raw_fd(),
        Some(nix::unistd::Uid::from_raw(owner.0)),
        Some(nix::unistd::Gid::from_raw(owner.1)),
    )
    .map_err(|e| io(&path)(e.into()))?;
    drop(f);
    dir.rename_at(&tmp, name)?;
    Ok(())
}

/// `<state>/vms/<uuid>.images`: root's copy of the protected disks' image
/// paths from libvirt's definition, in the root-owned `<state>/vms` (0644
/// root). cdp-agent opens these for a VM's recovery, never the paths its
/// catalog names (`cdp_core::image::root_images`).
fn write_images(vms: &DirFd, name: &OsStr, tagged: &[domain::Tagged]) -> Result<(), HookError> {
    let map: std::collections::BTreeMap<&str, &str> = tagged
        .iter()
        .map(|t| (t.target.as_str(), t.path.as_str()))
        .collect();
    let mut tmp = name.to_os_string();
    tmp.push(".tmp");
    let path = vms.path().join(&tmp);
    vms.remove_at(&tmp)?;
    let mut f = vms.create_file(&tmp, 0o644)?;
    let text = serde_json::to_vec_pretty(&map).map_err(|e| io(&path)(e.into()))?;
    f.write_all(&text).map_err(io(&path))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(io(&path))?;
    drop(f);
    vms.rename_at(&tmp, name)?;
    Ok(())
}

/// `release end`: remove `<run>/<uuid>/domain.xml` through the opened
/// directories (a link at `<run>/<uuid>` is refused, never followed).
fn remove_definition(run_dir: &RunDir, uuid: &str) -> Result<(), HookError> {
    let vm_run = run_dir.vm(uuid);
    let def = vm_run.definition();
    let (vm_name, def_name) = (name_of(vm_run.path())?, name_of(&def)?);
    let dir = match DirFd::open(run_dir.path()).and_then(|r| r.open_at(vm_name)) {
        Ok(d) => d,
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    dir.remove_at(def_name)?;
    Ok(())
}

/// Run the hook. `args` are libvirt's (`DOMAIN OP SUBOP EXTRA`), `xml` is stdin.
pub fn run(args: &[String], xml: &str, config: Option<&Path>) -> Result<Outcome, HookError> {
    let op = (
        args.get(1).map(String::as_str).unwrap_or(""),
        args.get(2).map(String::as_str).unwrap_or(""),
    );
    let phase = match op {
        ("prepare", "begin") | ("start", "begin") => Phase::Prepare,
        ("release", "end") => Phase::Release,
        _ => return Ok(Outcome::Ignored),
    };
    // Cheap first: no CDP namespace, nothing to do (never parse the config).
    if !xml.contains(NS) {
        return Ok(Outcome::Ignored);
    }
    let vm = args.first().cloned().unwrap_or_default();
    let dom = domain::parse(xml).map_err(|source| HookError::Domain {
        vm: vm.clone(),
        source,
    })?;
    if dom.protection.is_none() {
        return Ok(Outcome::Ignored);
    }
    let uuid = cdp_core::names::check_uuid(&dom.uuid)
        .map_err(|e| HookError::Domain {
            vm: vm.clone(),
            source: DomainError::Key(e.to_string()),
        })?
        .hyphenated()
        .to_string();
    let c = Config::load(config)?;
    let run_dir = RunDir::new(c.run_dir(None));
    match phase {
        Phase::Prepare => prepare(&c, &vm, &dom, &uuid, xml),
        Phase::Release => {
            let agent_notified = cdp_core::notify::notify_agent(run_dir.path(), &uuid).is_ok();
            remove_definition(&run_dir, &uuid)?;
            apparmor::remove_vm(&apparmor::dir(), &uuid)?;
            Ok(Outcome::Released {
                uuid,
                agent_notified,
            })
        }
    }
}

/// `prepare begin` / `start begin`: check the keys, make the directories
/// QEMU's user writes, leave the definition for cdp-qemu, and, under
/// libvirt's AppArmor driver, the VM's own AppArmor rules.
fn prepare(
    c: &Config,
    vm: &str,
    dom: &domain::Domain,
    uuid: &str,
    xml: &str,
) -> Result<Outcome, HookError> {
    let tagged = dom.tagged(c).map_err(|source| HookError::Domain {
        vm: vm.to_string(),
        source,
    })?;
    let owner = match dac_label(xml) {
        Some(o) => o,
        None => configured_owner(c)?,
    };
    let state = StateDir::new(c.state_dir(None));
    let run = RunDir::new(c.run_dir(None));
    let mut left_alone = Vec::new();
    let state_fd = config_dir(state.path())?;
    let vms = shared_dir(&state_fd, name_of(&state.vms())?)?;
    let vm_state = vm_dir(&vms, name_of(state.vm(uuid).path())?, owner)?;
    own_tree(&vm_state, owner, 0, &mut left_alone)?;
    write_images(&vms, name_of(&state.vm_images(uuid))?, &tagged)?;
    // A file:// target the shipper (QEMU's user) writes: create it
    // for that user when missing; an existing one is the operator's.
    let targets: Vec<&cdp_core::config::Target> = tagged
        .iter()
        .filter_map(|t| c.policy.get(&t.policy))
        .flat_map(|p| p.targets.iter())
        .filter_map(|name| c.target.get(name))
        .collect();
    for t in &targets {
        if let Some(path) = t.url.strip_prefix("file://").map(Path::new) {
            file_target(path, uuid, owner)?;
        }
    }
    let run_fd = config_dir(run.path())?;
    let vm_run = run.vm(uuid);
    let vm_run_fd = vm_dir(&run_fd, name_of(vm_run.path())?, owner)?;
    write_definition(&vm_run_fd, name_of(&vm_run.definition())?, &dom.xml, owner)?;
    if apparmor::confined(xml) {
        let rules = apparmor::vm_rules(&apparmor::VmPaths::new(c, uuid, &targets))?;
        apparmor::install_vm(&apparmor::dir(), uuid, &rules)?;
    }
    Ok(Outcome::Prepared {
        uuid: uuid.to_string(),
        owner,
        left_alone,
    })
}

/// A `file://` target made ready for the shipper of VM `uuid`, run by
/// `owner`, as `cdpctl protect` does ([`crate::target_dir`]): a missing
/// directory is created for it, a missing `cdp/` tree in a directory it
/// cannot write too; an existing tree it cannot write is left alone and
/// named in libvirt's log with the command that fixes it (the VM starts;
/// its target is "failing" until then).
fn file_target(path: &Path, uuid: &str, owner: (u32, u32)) -> Result<(), HookError> {
    use crate::target_dir::{prepare, Prepared, QemuUser};
    let user = QemuUser::new(owner);
    if let Prepared::Refused {
        path: p,
        why,
        command,
    } = prepare(path, uuid, &user, true)?
    {
        eprintln!(
            "cdp hook: warning: target {}: {} {why}: the VM's shipper fails there until you run `{command}` as root",
            path.display(),
            p.display()
        );
    }
    Ok(())
}

/// Per-VM AppArmor rules (issue 11, item 4; docs/DESIGN.md, "libvirt
/// integration"). libvirt confines each VM's QEMU (and so cdp-qemu, cdpd
/// and cdp-shipper, which it starts with `ix`) in the profile
/// `libvirt-<uuid>`, kept in `/etc/apparmor.d/libvirt/libvirt-<uuid>`:
/// virt-aa-helper creates that file from `TEMPLATE.qemu` only when it is
/// missing (`-c`), otherwise reloads it as it is (`-r`), and rewrites only
/// `libvirt-<uuid>.files` on every start. So the hook, before libvirt
/// labels the VM (`prepare begin`/`start begin`), writes the VM's rules to
/// `/etc/apparmor.d/cdpd/libvirt-<uuid>` and makes sure the profile file
/// holds one `include if exists` line naming them (creating the profile
/// from the template, as virt-aa-helper would, when it is missing). The
/// abstraction every VM includes keeps only what is not per VM.
pub mod apparmor {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};

    use cdp_core::config::{Config, Target};
    use cdp_core::layout::{RunDir, StateDir};

    use super::{io, HookError};

    /// Where AppArmor's policy lives.
    pub const DIR: &str = "/etc/apparmor.d";
    /// Replaces [`DIR`] (tests run the real hook against a copy).
    pub const DIR_ENV: &str = "CDP_APPARMOR_DIR";
    /// Our per-VM rule files, under [`DIR`]: `cdpd/libvirt-<uuid>`.
    pub const RULES_DIR: &str = "cdpd";
    /// libvirt's per-VM profiles, under [`DIR`].
    pub const LIBVIRT_DIR: &str = "libvirt";
    /// The template virt-aa-helper creates a VM's profile from.
    pub const TEMPLATE: &str = "TEMPLATE.qemu";
    /// Ends the line we add to a libvirt profile (how uninstall finds it).
    pub const MARK: &str = "# cdpd: this VM's rules (cdp's libvirt hook)";

    /// The AppArmor directory: `$CDP_APPARMOR_DIR`, else [`DIR`].
    pub fn dir() -> PathBuf {
        std::env::var_os(DIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| DIR.into())
    }

    /// The profile libvirt runs the VM in.
    pub fn profile_name(uuid: &str) -> String {
        format!("libvirt-{uuid}")
    }

    /// `<dir>/cdpd/libvirt-<uuid>`: the VM's rules.
    pub fn rules_path(dir: &Path, uuid: &str) -> PathBuf {
        dir.join(RULES_DIR).join(profile_name(uuid))
    }

    /// `<dir>/libvirt/libvirt-<uuid>`: libvirt's profile of the VM.
    pub fn profile_path(dir: &Path, uuid: &str) -> PathBuf {
        dir.join(LIBVIRT_DIR).join(profile_name(uuid))
    }

    /// The line a VM's profile includes its rules with (a missing file is
    /// no error: the rules are removed when the VM stops).
    pub fn include_line(uuid: &str) -> String {
        format!(
            "  include if exists <{RULES_DIR}/{}> {MARK}",
            profile_name(uuid)
        )
    }

    /// The VM runs under libvirt's AppArmor driver: its live definition
    /// carries `<seclabel model='apparmor'>` (from `start begin` on).
    pub fn confined(xml: &str) -> bool {
        let Ok(doc) = roxmltree::Document::parse(xml) else {
            return false;
        };
        let found = doc.descendants().any(|n| {
            n.has_tag_name("seclabel")
                && n.attribute("model") == Some("apparmor")
                && n.attribute("type") != Some("none")
        });
        found
    }

    /// What one VM may reach besides what every VM may.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct VmPaths {
        pub uuid: String,
        /// `<run>/<uuid>`
        pub run: PathBuf,
        /// `<state>/vms/<uuid>`
        pub state: PathBuf,
        /// `<run>/agent.sock`
        pub agent_socket: PathBuf,
        /// The config file (read).
        pub config: Option<PathBuf>,
        /// The shipping credentials of its targets (read).
        pub credentials: Vec<PathBuf>,
        /// Its `file://` targets (written).
        pub file_targets: Vec<PathBuf>,
        /// Every target's prune credentials: denied, whatever else allows.
        pub denied: Vec<PathBuf>,
    }

    impl VmPaths {
        /// For the VM `uuid` shipping to `targets`, under `c`'s directories.
        pub fn new(c: &Config, uuid: &str, targets: &[&Target]) -> VmPaths {
            let state = StateDir::new(c.state_dir(None));
            let run = RunDir::new(c.run_dir(None));
            let mut p = VmPaths {
                uuid: uuid.to_string(),
                run: run.vm(uuid).path().to_path_buf(),
                state: state.vm(uuid).path().to_path_buf(),
                agent_socket: run.agent_socket(),
                config: c.source.clone(),
                credentials: Vec::new(),
                file_targets: Vec::new(),
                denied: Vec::new(),
            };
            for t in targets {
                if let Some(f) = &t.credentials_file {
                    push_new(&mut p.credentials, f);
                }
                if let Some(d) = t.url.strip_prefix("file://").map(Path::new) {
                    push_new(&mut p.file_targets, d);
                }
            }
            for f in c
                .target
                .values()
                .filter_map(|t| t.prune_credentials_file.as_ref())
            {
                push_new(&mut p.denied, f);
            }
            p.credentials.retain(|f| !p.denied.contains(f));
            p
        }
    }

    fn push_new(v: &mut Vec<PathBuf>, p: &Path) {
        if !v.iter().any(|q| q == p) {
            v.push(p.to_path_buf());
        }
    }

    /// `p` as an AppArmor path: quoted, its globbing characters escaped.
    /// A path AppArmor cannot name literally (a quote, a variable, a
    /// control character, not absolute) is refused.
    pub fn quote(p: &Path) -> Result<String, HookError> {
        let s = p.to_str().filter(|s| {
            s.starts_with('/')
                && !s.contains('"')
                && !s.contains("@{")
                && !s.chars().any(char::is_control)
        });
        let Some(s) = s else {
            return Err(HookError::AppArmorPath {
                path: p.to_path_buf(),
            });
        };
        let mut out = String::from("\"");
        for ch in s.chars() {
            if "\\*?[]{}^".contains(ch) {
                out.push('\\');
            }
            out.push(ch);
        }
        out.push('"');
        Ok(out)
    }

    /// The VM's rules: its own run and state directories, the agent's
    /// socket, the config, its targets' shipping credentials and `file://`
    /// directories; every prune credential denied. Nothing here names
    /// another VM: no rule ends in a wildcard above the VM's directories.
    pub fn vm_rules(p: &VmPaths) -> Result<String, HookError> {
        // The directory and, unescaped, the wildcard for what is below it.
        let dir = |d: &Path| -> Result<[String; 2], HookError> {
            let q = quote(&d.join(""))?;
            let below = format!("{}**\"", &q[..q.len() - 1]);
            Ok([format!("  {q} rw,"), format!("  {below} rwk,")])
        };
        let mut out = vec![
            format!(
                "# cdpd: the rules of VM {} only (profile {}), written by cdp's libvirt hook",
                p.uuid,
                profile_name(&p.uuid)
            ),
            "# when the VM starts and removed when it stops. Generated: edits are lost.".into(),
            "  # Its sockets (NBD, control) and the definition the hook leaves for cdp-qemu."
                .into(),
        ];
        out.extend(dir(&p.run)?);
        out.push("  # Its catalog, journals and locks.".into());
        out.extend(dir(&p.state)?);
        out.push("  # The note to cdp-agent when capture ends (a datagram).".into());
        out.push(format!("  {} w,", quote(&p.agent_socket)?));
        if let Some(c) = &p.config {
            out.push("  # The config.".into());
            out.push(format!("  {} r,", quote(c)?));
        }
        if !p.credentials.is_empty() {
            out.push("  # Its targets' shipping credentials (create-only rights).".into());
            for f in &p.credentials {
                out.push(format!("  {} r,", quote(f)?));
            }
        }
        if !p.file_targets.is_empty() {
            out.push("  # Its file:// targets.".into());
            for d in &p.file_targets {
                out.extend(dir(d)?);
            }
        }
        if !p.denied.is_empty() {
            out.push("  # Retention and prune credentials: never a VM's.".into());
            for f in &p.denied {
                out.push(format!("  deny {} rwk,", quote(f)?));
            }
        }
        out.push(String::new());
        Ok(out.join("\n"))
    }

    /// `profile` (a libvirt VM profile's text) with our include line added
    /// before its last closing brace; `None` when it already has it, or
    /// has no closing brace (not a profile we understand: left alone).
    pub fn with_include(profile: &str, uuid: &str) -> Option<String> {
        let line = include_line(uuid);
        if profile.lines().any(|l| l == line) {
            return None;
        }
        let end = profile.rfind("\n}")?;
        Some(format!("{}\n{line}{}", &profile[..end], &profile[end..]))
    }

    /// The profile virt-aa-helper would create from `template` (its
    /// `create_profile`: the profile named for the VM, the generated
    /// `libvirt-<uuid>.files` included before the closing brace), with our
    /// include line.
    pub fn from_template(template: &str, uuid: &str) -> Option<String> {
        let name = profile_name(uuid);
        let named = template.replace("\nprofile LIBVIRT_TEMPLATE", &format!("\nprofile {name}"));
        if named == template {
            return None;
        }
        let end = named.rfind("\n}")?;
        let files = format!("  #include <{LIBVIRT_DIR}/{name}.files>");
        with_include(
            &format!("{}\n{files}{}", &named[..end], &named[end..]),
            uuid,
        )
    }

    /// `profile` without our include lines (and whether it had any).
    pub fn without_include(profile: &str) -> (String, bool) {
        let mut had = false;
        let mut out = String::with_capacity(profile.len());
        for l in profile.split_inclusive('\n') {
            if l.trim_end_matches('\n').ends_with(MARK) {
                had = true;
            } else {
                out.push_str(l);
            }
        }
        (out, had)
    }

    /// Write `path` (root's AppArmor tree, no other user's) through a
    /// temporary file and a rename.
    fn write(path: &Path, text: &str) -> Result<(), HookError> {
        let dir = path.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut tmp = dir.to_path_buf();
        tmp.push(format!(
            ".{}.cdp-new",
            path.file_name().unwrap_or_default().to_string_lossy()
        ));
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(text.as_bytes()).map_err(io(&tmp))?;
        f.set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(io(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io(path))
    }

    /// Give the VM `uuid` its rules (`prepare begin`, `start begin`).
    pub fn install_vm(dir: &Path, uuid: &str, rules: &str) -> Result<(), HookError> {
        write(&rules_path(dir, uuid), rules)?;
        let profile = profile_path(dir, uuid);
        let text = match std::fs::read_to_string(&profile) {
            Ok(t) if !t.trim().is_empty() => with_include(&t, uuid),
            // Missing, or empty (virt-aa-helper recreates those too).
            Ok(_) => template(dir, uuid)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => template(dir, uuid)?,
            Err(e) => return Err(io(&profile)(e)),
        };
        match text {
            Some(t) => write(&profile, &t),
            None => Ok(()),
        }
    }

    fn template(dir: &Path, uuid: &str) -> Result<Option<String>, HookError> {
        let path = dir.join(LIBVIRT_DIR).join(TEMPLATE);
        let t = std::fs::read_to_string(&path).map_err(io(&path))?;
        match from_template(&t, uuid) {
            Some(p) => Ok(Some(p)),
            None => Err(HookError::AppArmorTemplate { path }),
        }
    }

    /// Take the VM's rules away (`release end`); the include line stays
    /// (`if exists`).
    pub fn remove_vm(dir: &Path, uuid: &str) -> Result<(), HookError> {
        let p = rules_path(dir, uuid);
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&p)(e)),
            _ => Ok(()),
        }
    }
}

enum Phase {
    Prepare,
    Release,
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOM: &str = r#"<domain type='kvm' id='3'>
  <name>web</name>
  <uuid>6f1c2a8e-3b4d-4e5f-8a9b-0c1d2e3f4a5b</uuid>
  <metadata>
    <cdp:protection xmlns:cdp="urn:cdpd:protection:1"><cdp:disk target="vda"/></cdp:protection>
  </metadata>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/images/web.raw'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'>
    <label>+0:+0</label>
  </seclabel>
</domain>"#;

    fn args(op: &str, sub: &str) -> Vec<String> {
        ["web", op, sub, "-"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn label() {
        assert_eq!(dac_label(DOM), Some((0, 0)));
        assert_eq!(
            dac_label(&DOM.replace("+0:+0", "+64055:+107")),
            Some((64055, 107))
        );
        assert_eq!(dac_label("<domain/>"), None);
    }

    #[test]
    fn unprotected_and_other_ops_are_ignored_without_config() {
        let missing = Path::new("/nonexistent/cdp.toml");
        let plain = "<domain><name>a</name><uuid>x</uuid></domain>";
        assert_eq!(
            run(&args("prepare", "begin"), plain, Some(missing)).unwrap(),
            Outcome::Ignored
        );
        // Not even XML: still not ours.
        assert_eq!(
            run(&args("prepare", "begin"), "garbage", Some(missing)).unwrap(),
            Outcome::Ignored
        );
        assert_eq!(
            run(&args("started", "begin"), DOM, Some(missing)).unwrap(),
            Outcome::Ignored
        );
        assert!(run(&args("prepare", "begin"), DOM, Some(missing)).is_err());
    }

    /// A repository root made (0755) gets a `cdp/` tree for QEMU's user at
    /// start, the directory staying root's; a missing one is created for it.
    #[test]
    fn a_file_target_is_prepared_for_qemus_user() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let d = tempfile::tempdir().unwrap();
        let cfg = d.path().join("cdp.toml");
        std::fs::write(
            &cfg,
            format!(
                "[paths]\nstate_dir = \"{0}/state\"\nrun_dir = \"{0}/run\"\n\
                 [target.t]\nurl = \"file://{0}/repo\"\n[target.u]\nurl = \"file://{0}/new/repo\"\n\
                 [policy.default]\ntargets = [\"t\", \"u\"]\n",
                d.path().display()
            ),
        )
        .unwrap();
        let repo = d.path().join("repo");
        std::fs::create_dir(&repo).unwrap();
        std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(0o755)).unwrap();
        let xml = DOM.replace("+0:+0", "+64055:+107");
        run(&args("prepare", "begin"), &xml, Some(&cfg)).unwrap();
        let mode = |p: &Path| {
            let m = std::fs::symlink_metadata(p).unwrap();
            (m.uid(), m.gid(), m.mode() & 0o7777)
        };
        assert_eq!(mode(&repo), (0, 0, 0o755));
        assert_eq!(mode(&repo.join("cdp")), (64055, 107, 0o750));
        assert_eq!(mode(&d.path().join("new/repo")), (64055, 107, 0o750));
    }

    #[test]
    fn prepare_and_release() {
        let d = tempfile::tempdir().unwrap();
        let cfg = d.path().join("cdp.toml");
        std::fs::write(
            &cfg,
            format!(
                "[paths]\nstate_dir = \"{0}/state\"\nrun_dir = \"{0}/run\"\n[target.t]\nurl = \"file://{0}/repo\"\n[policy.default]\ntargets = [\"t\"]\n",
                d.path().display()
            ),
        )
        .unwrap();
        let uuid = "6f1c2a8e-3b4d-4e5f-8a9b-0c1d2e3f4a5b";
        let me = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        let xml = DOM.replace("+0:+0", &format!("+{}:+{}", me.0, me.1));
        let out = run(&args("prepare", "begin"), &xml, Some(&cfg)).unwrap();
        assert_eq!(
            out,
            Outcome::Prepared {
                uuid: uuid.into(),
                owner: me,
                left_alone: vec![]
            }
        );
        let def = RunDir::new(d.path().join("run")).vm(uuid).definition();
        assert!(std::fs::read_to_string(&def)
            .unwrap()
            .starts_with("<domain"));
        let state = StateDir::new(d.path().join("state"));
        let run_dir = RunDir::new(d.path().join("run"));
        let mode = |p: &Path| {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::symlink_metadata(p).unwrap();
            (m.uid(), m.mode() & 0o7777)
        };
        for shared in [state.path(), &state.vms(), run_dir.path()] {
            assert_eq!(mode(shared), (0, 0o755), "{}", shared.display());
        }
        for own in [state.vm(uuid).path(), run_dir.vm(uuid).path()] {
            assert_eq!(mode(own), (me.0, 0o700), "{}", own.display());
        }
        // Root's copy of the image paths, from libvirt's definition, where
        // QEMU's user cannot write; the agent reads it as trusted.
        assert_eq!(mode(&state.vm_images(uuid)), (0, 0o644));
        let images = cdp_core::image::root_images(&state, uuid).unwrap().unwrap();
        assert_eq!(
            images.into_iter().collect::<Vec<_>>(),
            [("vda".to_string(), PathBuf::from("/images/web.raw"))]
        );
        assert!(
            d.path().join("repo").is_dir(),
            "the file:// target is created"
        );
        // Twice is fine (prepare, then start).
        run(&args("start", "begin"), &xml, Some(&cfg)).unwrap();
        let out = run(&args("release", "end"), &xml, Some(&cfg)).unwrap();
        assert_eq!(
            out,
            Outcome::Released {
                uuid: uuid.into(),
                agent_notified: false
            }
        );
        assert!(!def.exists());
        // A bad key fails the start with the reason.
        let bad = xml.replace("target=\"vda\"/>", "target=\"vdz\"/>");
        let e = run(&args("prepare", "begin"), &bad, Some(&cfg)).unwrap_err();
        assert!(e.to_string().contains("vdz"), "{e}");
    }

    /// Root runs the hook: a per-VM directory another (non-root) user owns
    /// is refused with what to do, and left as it was.
    #[test]
    fn a_vm_dir_of_another_user_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            panic!("this test chowns to another uid: run it as root");
        }
        let d = tempfile::tempdir().unwrap();
        let cfg = d.path().join("cdp.toml");
        std::fs::write(
            &cfg,
            format!(
                "[paths]\nstate_dir = \"{0}/state\"\nrun_dir = \"{0}/run\"\n",
                d.path().display()
            ),
        )
        .unwrap();
        let uuid = "6f1c2a8e-3b4d-4e5f-8a9b-0c1d2e3f4a5b";
        let xml = DOM.replace("+0:+0", "+64055:+64055");
        run(&args("prepare", "begin"), &xml, Some(&cfg)).unwrap();
        let vm_state = StateDir::new(d.path().join("state")).vm(uuid);
        std::os::unix::fs::chown(vm_state.path(), Some(65534), Some(65534)).unwrap();
        let e = run(&args("prepare", "begin"), &xml, Some(&cfg)).unwrap_err();
        assert!(
            matches!(
                &e,
                HookError::ForeignOwner {
                    found: 65534,
                    owner: 64055,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("chown -R 64055"), "{e}");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(vm_state.path()).unwrap().uid(), 65534);
        // Root's own leftovers are taken over.
        std::os::unix::fs::chown(vm_state.path(), Some(0), Some(0)).unwrap();
        run(&args("prepare", "begin"), &xml, Some(&cfg)).unwrap();
        assert_eq!(std::fs::metadata(vm_state.path()).unwrap().uid(), 64055);
    }

    mod aa {
        use super::super::apparmor::*;
        use super::*;

        const A: &str = "6f1c2a8e-3b4d-4e5f-8a9b-0c1d2e3f4a5b";
        const B: &str = "0b9e6a52-1c3d-4f5e-8a7b-9c0d1e2f3a4b";
        const TEMPLATE_TEXT: &str = "#\n# This profile is for the domain whose UUID matches this file.\n#\n\n#include <tunables/global>\n\nprofile LIBVIRT_TEMPLATE flags=(attach_disconnected) {\n  #include <abstractions/libvirt-qemu>\n}\n";

        fn config() -> Config {
            Config::parse(
                "[paths]\nstate_dir = \"/var/lib/cdp\"\nrun_dir = \"/run/cdp\"\n\
                 [target.s3]\nurl = \"s3://b/p\"\ncredentials_file = \"/etc/cdp/ship.cred\"\n\
                 prune_credentials_file = \"/etc/cdp/prune.cred\"\n\
                 [target.local]\nurl = \"file:///srv/cdp repo\"\n\
                 [target.other]\nurl = \"s3://c/p\"\ncredentials_file = \"/etc/cdp/other.cred\"\n\
                 prune_credentials_file = \"/etc/cdp/other-prune.cred\"\n",
            )
            .unwrap()
        }

        fn rules(uuid: &str) -> String {
            let c = config();
            let t = [&c.target["s3"], &c.target["local"]];
            vm_rules(&VmPaths::new(&c, uuid, &t)).unwrap()
        }

        #[test]
        fn rules_name_only_this_vm() {
            let r = rules(A);
            for want in [
                format!("  \"/run/cdp/{A}/\" rw,"),
                format!("  \"/run/cdp/{A}/**\" rwk,"),
                format!("  \"/var/lib/cdp/vms/{A}/**\" rwk,"),
                "  \"/run/cdp/agent.sock\" w,".into(),
                "  \"/etc/cdp/ship.cred\" r,".into(),
                "  \"/srv/cdp repo/**\" rwk,".into(),
                "  deny \"/etc/cdp/prune.cred\" rwk,".into(),
                "  deny \"/etc/cdp/other-prune.cred\" rwk,".into(),
            ] {
                assert!(r.lines().any(|l| l == want), "{want:?} not in\n{r}");
            }
            assert!(!r.contains(B), "{r}");
            // Another target's shipping credentials are not this VM's.
            assert!(!r.contains("other.cred"), "{r}");
            // No wildcard over every VM: every rule under the state or run
            // directory is inside this VM's own directory (or the agent's
            // socket).
            for l in r.lines().filter(|l| !l.trim_start().starts_with('#')) {
                if l.contains("/var/lib/cdp") || l.contains("/run/cdp") {
                    assert!(
                        l.contains(&format!("/{A}/")) || l.contains("/run/cdp/agent.sock\""),
                        "{l}"
                    );
                }
            }
            assert_ne!(rules(B), r);
        }

        #[test]
        fn quoting() {
            assert_eq!(
                quote(Path::new("/srv/a b/x*{y}[z]?^")).unwrap(),
                r#""/srv/a b/x\*\{y\}\[z\]\?\^""#
            );
            for bad in ["rel/dir", "/a\"b", "/a@{HOME}", "/a\nb"] {
                assert!(quote(Path::new(bad)).is_err(), "{bad:?}");
            }
        }

        #[test]
        fn profile_from_the_template_and_included_once() {
            let p = from_template(TEMPLATE_TEXT, A).unwrap();
            assert!(p.contains(&format!(
                "\nprofile libvirt-{A} flags=(attach_disconnected) {{\n"
            )));
            assert!(p.contains(&format!("  #include <libvirt/libvirt-{A}.files>\n")));
            assert!(p.contains(&format!("{}\n}}\n", include_line(A))), "{p}");
            assert_eq!(with_include(&p, A), None, "already there");
            let (bare, had) = without_include(&p);
            assert!(had);
            assert!(!bare.contains("cdpd"));
            assert_eq!(with_include(&bare, A).unwrap(), p);
            assert_eq!(from_template("not a template", A), None);
            assert_eq!(with_include("no brace", A), None);
        }

        #[test]
        fn confined_only_under_the_apparmor_driver() {
            assert!(!confined(DOM));
            let aa = DOM.replace(
                "</domain>",
                "<seclabel type='dynamic' model='apparmor' relabel='yes'><label>libvirt-x</label></seclabel></domain>",
            );
            assert!(confined(&aa));
            assert!(!confined(
                &aa.replace("type='dynamic' model", "type='none' model")
            ));
        }

        #[test]
        fn install_and_remove() {
            let d = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(d.path().join("libvirt")).unwrap();
            std::fs::write(d.path().join("libvirt/TEMPLATE.qemu"), TEMPLATE_TEXT).unwrap();
            install_vm(d.path(), A, "  /x r,\n").unwrap();
            let profile = std::fs::read_to_string(profile_path(d.path(), A)).unwrap();
            assert_eq!(profile, from_template(TEMPLATE_TEXT, A).unwrap());
            assert_eq!(
                std::fs::read_to_string(rules_path(d.path(), A)).unwrap(),
                "  /x r,\n"
            );
            // libvirt's own profile of another VM (written by virt-aa-helper,
            // maybe edited by the operator): our line is added, the rest kept.
            let theirs = from_template(TEMPLATE_TEXT, B)
                .map(|p| without_include(&p).0.replace("{\n", "{\n  /opt/mine r,\n"))
                .unwrap();
            std::fs::write(profile_path(d.path(), B), &theirs).unwrap();
            install_vm(d.path(), B, "  /y r,\n").unwrap();
            let now = std::fs::read_to_string(profile_path(d.path(), B)).unwrap();
            assert_eq!(without_include(&now).0, theirs);
            assert!(now.contains(&include_line(B)));
            // Again: nothing changes.
            install_vm(d.path(), B, "  /y r,\n").unwrap();
            assert_eq!(
                std::fs::read_to_string(profile_path(d.path(), B)).unwrap(),
                now
            );
            remove_vm(d.path(), A).unwrap();
            assert!(!rules_path(d.path(), A).exists());
            assert!(rules_path(d.path(), B).exists());
            remove_vm(d.path(), A).unwrap();
        }
    }
}
