//! The libvirt hook `/etc/libvirt/hooks/qemu.d/cdp` (runs as root; libvirt
//! passes `DOMAIN OPERATION SUB-OPERATION EXTRA` and the domain XML on stdin).
//!
//! - `prepare begin` and `start begin`: validate the CDP keys against the
//!   config (a bad key fails the start here, with the reason, before any
//!   resource is touched); create the state and run directories owned by
//!   the user QEMU runs as; leave the definition where cdp-qemu (which runs
//!   as that user and cannot read libvirt's own status files) finds it:
//!   `<run-dir>/<uuid>/domain.xml`.
//! - Everything below the state and run directories is reached through
//!   directory descriptors (`cdp_core::fsat`): QEMU's user owns those trees,
//!   so nothing there is opened by path, no link is followed, and nothing is
//!   chowned or chmodded by path (issue 11, "Trust boundaries"). A link
//!   found where cdp expects a file is left alone and reported.
//! - `release end`: hand the VM's leftover journal to cdp-agent (a datagram;
//!   the agent also finds it on its own scan) and remove the definition.
//!
//! A VM without CDP keys is never blocked: the hook returns as soon as it
//! sees there are none, before reading the config, and any error about a
//! VM that is not protected is swallowed.

use std::ffi::{OsStr, OsString};
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

/// The configured directory `path` (state or run): its parent is the
/// operator's and is created as a path; `path` itself is created with
/// `mkdirat`, opened without following a link, and given to `owner` and
/// `mode` through the opened descriptor.
fn config_dir(path: &Path, owner: (u32, u32), mode: u32) -> Result<DirFd, HookError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let p = DirFd::open(parent)?;
    let name = name_of(path)?;
    p.mkdir_at(name, mode)?;
    let d = p.open_at(name)?;
    d.chown(owner)?;
    d.chmod(mode)?;
    Ok(d)
}

/// The subdirectory `name` of `parent`, created when missing, opened
/// without following a link and given to `owner` through its descriptor.
fn sub_dir(parent: &DirFd, name: &OsStr, owner: (u32, u32), mode: u32) -> Result<DirFd, HookError> {
    parent.mkdir_at(name, mode)?;
    let d = parent.open_at(name)?;
    d.chown(owner)?;
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
            Ok(Outcome::Released {
                uuid,
                agent_notified,
            })
        }
    }
}

/// `path` with `suffix` appended to its file name (SQLite's `-wal`, `-shm`).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = OsString::from(path);
    p.push(suffix);
    p.into()
}

/// `prepare begin` / `start begin`: check the keys, make the directories
/// QEMU's user writes, leave the definition for cdp-qemu.
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
    let state_fd = config_dir(state.path(), owner, 0o750)?;
    let vms = sub_dir(&state_fd, name_of(&state.vms())?, owner, 0o750)?;
    let vm_state = sub_dir(&vms, name_of(state.vm(uuid).path())?, owner, 0o750)?;
    own_tree(&vm_state, owner, 0, &mut left_alone)?;
    let catalog = state.catalog();
    let wal = with_suffix(&catalog, "-wal");
    let shm = with_suffix(&catalog, "-shm");
    for p in [catalog, wal, shm] {
        match state_fd.own_entry(name_of(&p)?, owner) {
            Ok(()) => {}
            Err(
                FsatError::Symlink { .. }
                | FsatError::HardLinked { .. }
                | FsatError::NotAFile { .. },
            ) => left_alone.push(p),
            Err(e) => return Err(e.into()),
        }
    }
    // A file:// target the shipper (QEMU's user) writes: create it
    // for that user when missing; an existing one is the operator's.
    for t in tagged
        .iter()
        .filter_map(|t| c.policy.get(&t.policy))
        .flat_map(|p| p.targets.iter())
        .filter_map(|name| c.target.get(name))
    {
        if let Some(path) = t.url.strip_prefix("file://").map(Path::new) {
            file_target(path, owner)?;
        }
    }
    let run_fd = config_dir(run.path(), owner, 0o755)?;
    let vm_run = run.vm(uuid);
    let vm_run_fd = sub_dir(&run_fd, name_of(vm_run.path())?, owner, 0o750)?;
    vm_run_fd.chmod(0o750)?;
    write_definition(&vm_run_fd, name_of(&vm_run.definition())?, &dom.xml, owner)?;
    Ok(Outcome::Prepared {
        uuid: uuid.to_string(),
        owner,
        left_alone,
    })
}

/// A missing `file://` target directory, created for `owner` (an existing
/// one, or anything else with its name, is the operator's and left alone).
fn file_target(path: &Path, owner: (u32, u32)) -> Result<(), HookError> {
    let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) else {
        return Ok(());
    };
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let p = DirFd::open(parent)?;
    let name = name_of(path)?;
    if p.mkdir_at(name, 0o750)? {
        let d = p.open_at(name)?;
        d.chown(owner)?;
        d.chmod(0o750)?;
    }
    Ok(())
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
        assert!(StateDir::new(d.path().join("state"))
            .vm(uuid)
            .path()
            .is_dir());
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
}
