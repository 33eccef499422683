//! `cdpctl baseline VM [--disk D]`: a full, sparse-aware, content-addressed
//! baseline of each disk into every target of the policy (the target with the
//! most free space first). Online (the VM runs: fuzzy, no pause) or offline.
//!
//! A VM cdpd has never served gets its state here, as cdpd would make it
//! (docs/DESIGN.md, "Baselines"): `<state>/vms/<uuid>` for the VM's QEMU
//! user (0700), a catalog with its disks and a fresh history at
//! `cdp_core::session::new_history_base`, and an exact offline baseline
//! (s0 = s1 = the base) that the first protected boot's first write follows.
//! Root opens the images (paths from the root-written `<uuid>.images` or
//! libvirt's definition, never from the catalog) and the baseline reads them
//! through those descriptors as the VM's user (docs/DESIGN.md, "Trust
//! boundaries").

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use cdp_core::catalog::Catalog;
use cdp_core::fsat::DirFd;
use cdp_core::layout::StateDir;
use cdp_core::privsep::VmIdentity;
use cdp_core::session::{self, OfflineDisk};
use cdp_shipper::baseline::BaselineResult;

use crate::Ctx;

#[derive(clap::Args)]
pub struct BaselineArgs {
    /// VM name or UUID.
    pub vm: String,
    /// Only this disk.
    #[arg(long)]
    pub disk: Option<String>,
    /// Policy whose targets receive the baseline (default: the one of the
    /// VM's libvirt definition, else "default").
    #[arg(long)]
    pub policy: Option<String>,
    /// libvirt connection URI (for a VM cdpd has never served).
    #[arg(long, default_value = "qemu:///system")]
    pub connect: String,
    /// The VM's definition as a libvirt domain XML file (the one given to
    /// `cdp-qemu --vm-config`), for a VM that is not defined in libvirt and
    /// that cdpd has never served: its protected disks and their images
    /// come from this file. Root reads it: give only a file root trusts.
    #[arg(long, value_name = "FILE")]
    pub definition: Option<PathBuf>,
}

/// A VM as root knows it before touching its state: its images' paths
/// (trusted: root's `<uuid>.images` or libvirt's definition) and, from
/// libvirt, its name and policy.
pub(crate) struct RootView {
    pub uuid: String,
    pub name: Option<String>,
    pub policy: Option<String>,
    pub images: BTreeMap<String, PathBuf>,
    /// QEMU's user from the definition's DAC label (`+uid:+gid`), as the
    /// libvirt hook reads it; else the configured one.
    pub owner: Option<(u32, u32)>,
}

/// What [`take`] did.
pub(crate) struct Taken {
    /// `<state>/vms/<uuid>` was created.
    pub created: bool,
    /// The VM's history was started at this seq (cdpd never served it).
    pub base: Option<u64>,
    /// (disk, target, baseline) for each baseline taken.
    pub results: Vec<(String, String, BaselineResult)>,
}

/// A disk's image opened by root, read by the baseline as the VM's user.
struct RootImage {
    disk: String,
    path: PathBuf,
    file: File,
    size: u64,
}

pub fn run(ctx: &Ctx, a: &BaselineArgs) -> Result<()> {
    let view = root_view(ctx, a)?;
    let policy = a
        .policy
        .clone()
        .or_else(|| view.policy.clone())
        .unwrap_or_else(|| "default".into());
    let taken = take(ctx, &view, &policy, a.disk.as_deref())?;
    if ctx.json {
        return print_json(&taken.results);
    }
    if let Some(base) = taken.base {
        println!(
            "{}: {}; its history starts at seq {base}: the baseline is exact there, and the first protected boot's writes follow it.",
            view.name.as_deref().unwrap_or(&view.uuid),
            if taken.created {
                "never served by cdpd: its state is created now"
            } else {
                "never captured before"
            }
        );
    }
    print_results(&taken.results);
    Ok(())
}

/// Where the VM's images are, without opening its state: `<uuid>.images`,
/// else (for a VM without a catalog) libvirt's definition.
fn root_view(ctx: &Ctx, a: &BaselineArgs) -> Result<RootView> {
    if let Some(file) = &a.definition {
        let xml = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read the definition {}", file.display()))?;
        let view = view_of_definition(ctx, &xml)?;
        let named = cdp_core::names::check_uuid(&a.vm)
            .map(|u| u.hyphenated().to_string() == view.uuid)
            .unwrap_or(false)
            || view.name.as_deref() == Some(a.vm.as_str());
        if !named {
            bail!(
                "{} describes VM {} ({}), not {:?}: give the VM's name or UUID as in the file",
                file.display(),
                view.name.as_deref().unwrap_or("?"),
                view.uuid,
                a.vm
            );
        }
        return Ok(view);
    }
    let known = cdp_core::names::check_uuid(&a.vm)
        .map(|u| u.hyphenated().to_string())
        .ok()
        .or_else(|| ctx.resolve_vm(&a.vm).ok());
    if let Some(uuid) = &known {
        if let Some(images) = cdp_core::image::root_images(&ctx.state(), uuid)? {
            return Ok(RootView {
                uuid: uuid.clone(),
                name: None,
                policy: None,
                images,
                owner: None,
            });
        }
        if ctx.has_catalog(uuid) {
            // Served before, started outside libvirt's hook: the catalog's
            // paths, opened as the VM's user.
            return Ok(RootView {
                uuid: uuid.clone(),
                name: None,
                policy: None,
                images: BTreeMap::new(),
                owner: None,
            });
        }
    }
    let dom = known.as_deref().unwrap_or(&a.vm);
    let xml = crate::protect_cmd::definition(&a.connect, dom).with_context(|| {
        format!(
            "VM {dom} has never been served by cdpd on this host and has no {}: \
             its disks come from its libvirt definition (protect it with `cdpctl protect`)",
            ctx.state()
                .vm_images(known.as_deref().unwrap_or("<uuid>"))
                .display()
        )
    })?;
    view_of_definition(ctx, &xml)
}

/// The protected disks of a libvirt definition.
pub(crate) fn view_of_definition(ctx: &Ctx, xml: &str) -> Result<RootView> {
    let dom = cdp_hooks::domain::parse(xml)?;
    let tagged = dom.tagged(&ctx.config)?;
    if tagged.is_empty() {
        bail!(
            "{} protects no disk: run `cdpctl protect {} --disk …` first",
            dom.name,
            dom.name
        );
    }
    Ok(RootView {
        uuid: cdp_core::names::check_uuid(&dom.uuid)?
            .hyphenated()
            .to_string(),
        name: Some(dom.name.clone()),
        policy: tagged.first().map(|t| t.policy.clone()),
        images: tagged
            .into_iter()
            .map(|t| (t.target, PathBuf::from(t.path)))
            .collect(),
        owner: dac_label(xml),
    })
}

/// The numeric DAC label of a definition (`<seclabel model='dac'>` with
/// `<label>+uid:+gid</label>`), the owner the libvirt hook gives the VM's
/// directories.
fn dac_label(xml: &str) -> Option<(u32, u32)> {
    let at = xml
        .find("model='dac'")
        .or_else(|| xml.find("model=\"dac\""))?;
    let rest = &xml[at..];
    let end = rest.find("</seclabel>")?;
    let rest = &rest[..end];
    let label = &rest[rest.find("<label>")? + "<label>".len()..];
    let label = &label[..label.find("</label>")?];
    let (u, g) = label.trim().split_once(':')?;
    let num = |s: &str| s.strip_prefix('+').and_then(|n| n.parse::<u32>().ok());
    Some((num(u)?, num(g)?))
}

/// Take the baselines of `view` (only `only` when given) to every target
/// of `policy`. This process ends as the VM's user: root's part (the VM's
/// directory, the images, a missing `file://` target) comes first.
pub(crate) fn take(ctx: &Ctx, view: &RootView, policy: &str, only: Option<&str>) -> Result<Taken> {
    let state = ctx.state();
    let uuid = view.uuid.as_str();
    let created = ensure_vm_state(ctx, &state, uuid, view.owner)?;
    let images = open_images(&view.images)?;
    let id = VmIdentity::of(&state, uuid)?;
    if nix::unistd::geteuid().is_root() {
        // As protect and the libvirt hook at start do (docs/LIBVIRT.md,
        // "The repository's permissions").
        crate::protect_cmd::prepare_repositories(ctx, (id.uid, id.gid), uuid, policy, "baseline")?;
    }
    // A baseline is work on the VM's state: it runs as the VM's user
    // (docs/DESIGN.md, "Trust boundaries"), reading the images through the
    // descriptors root opened, and nothing else.
    id.enter()?;
    let catalog = Catalog::open(&ctx.state_dir, uuid)?;
    let offline: Vec<OfflineDisk> = images
        .iter()
        .map(|i| OfflineDisk {
            disk: &i.disk,
            path: &i.path,
            size: i.size,
        })
        .collect();
    let name = view.name.as_deref().unwrap_or(uuid);
    let base = session::start_offline_history(
        &catalog,
        &state,
        uuid,
        name,
        policy,
        &offline,
        cdp_core::time::now_ns(),
    )?;
    let catalog = Arc::new(Mutex::new(catalog));
    let disks: Vec<_> = catalog
        .lock()
        .unwrap()
        .disks(uuid)?
        .into_iter()
        .filter(|(d, _, _)| only.is_none_or(|x| x == d))
        .collect();
    if disks.is_empty() {
        bail!(
            "VM {uuid} has no disk{} in the catalog, and none in {} or its libvirt definition",
            only.map(|d| format!(" {d}")).unwrap_or_default(),
            state.vm_images(uuid).display()
        );
    }
    Ok(Taken {
        created,
        base,
        results: upload(ctx, &catalog, uuid, policy, &disks, &images)?,
    })
}

/// Each disk to each target of `policy`, the target with the most free
/// space first.
fn upload(
    ctx: &Ctx,
    catalog: &Arc<Mutex<Catalog>>,
    vm: &str,
    policy: &str,
    disks: &[(String, String, u64)],
    images: &[RootImage],
) -> Result<Vec<(String, String, BaselineResult)>> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut targets = cdp_shipper::open_targets(&ctx.config, policy).await?;
        if targets.is_empty() {
            bail!(
                "policy {policy:?} has no targets: add one to the config, then take the baseline"
            );
        }
        targets.sort_by_key(|t| std::cmp::Reverse(t.store.free_space().unwrap_or(0)));
        let retry = cdp_repo::store::RetryPolicy::default();
        // The progress: every disk's bytes, scanned once per target.
        let size_of = |disk: &str, size: u64| {
            images
                .iter()
                .find(|i| i.disk == disk)
                .map_or(size, |i| i.size)
        };
        let total: u64 =
            disks.iter().map(|(d, _, n)| size_of(d, *n)).sum::<u64>() * targets.len() as u64;
        let meter =
            crate::progress::Meter::new(crate::progress::Mode::of(ctx.json), "baseline", total);
        let mut out = Vec::new();
        for (disk, path, _) in disks {
            let opened = images.iter().find(|i| &i.disk == disk);
            let image = opened.map_or(Path::new(path), |i| i.path.as_path());
            for t in &targets {
                let job = cdp_shipper::baseline::BaselineJob {
                    store: &t.store,
                    target: &t.name,
                    throttle: &t.throttle,
                    retry: &retry,
                    catalog,
                    run_dir: &ctx.run_dir,
                    vm,
                    disk,
                    image,
                    opened: opened.map(|i| &i.file),
                };
                let r = cdp_shipper::baseline::take_with_progress(&job, Some(meter.progress()))
                    .await
                    .inspect_err(|_| meter.clear())?;
                out.push((disk.clone(), t.name.clone(), r));
            }
        }
        meter.finish();
        anyhow::Ok(out)
    })
}

/// Open each image read-only (as root: its path is trusted) and find its size.
fn open_images(images: &BTreeMap<String, PathBuf>) -> Result<Vec<RootImage>> {
    let mut out = Vec::new();
    for (disk, path) in images {
        let mut file = File::open(path)
            .with_context(|| format!("disk {disk}: opening its image {}", path.display()))?;
        // A block device has no length in its metadata: its end.
        let size = file
            .seek(SeekFrom::End(0))
            .with_context(|| format!("disk {disk}: the size of {}", path.display()))?;
        out.push(RootImage {
            disk: disk.clone(),
            path: path.clone(),
            file,
            size,
        });
    }
    Ok(out)
}

/// `<state>/vms/<uuid>` as the libvirt hook makes it when missing: in the
/// root-owned `<state>/vms` (0755), given to the VM's QEMU user (its
/// definition's DAC label, else the configured `qemu_user`) with mode 0700 through its descriptor. Whether
/// it was created.
fn ensure_vm_state(
    ctx: &Ctx,
    state: &StateDir,
    uuid: &str,
    owner: Option<(u32, u32)>,
) -> Result<bool> {
    match std::fs::symlink_metadata(state.vm(uuid).path()) {
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).context(format!("{}", state.vm(uuid).path().display())),
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "{} does not exist: cdpd has never served this VM; run this as root to create it",
            state.vm(uuid).path().display()
        );
    }
    let owner = match owner {
        Some(o) => o,
        None => configured_owner(&ctx.config)?,
    };
    for dir in [state.path().to_path_buf(), state.vms()] {
        if !dir.exists() {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            DirFd::open(&dir)?.chmod(0o755)?;
        }
    }
    let vms = DirFd::open(&state.vms())?;
    vms.mkdir_at(uuid, 0o700)?;
    let d = vms.open_at(uuid)?;
    let found = d.owner()?.0;
    if found != 0 && found != owner.0 {
        bail!(
            "{} belongs to uid {found}, not to QEMU's user (uid {}): left alone",
            d.path().display(),
            owner.0
        );
    }
    d.chown(owner)?;
    d.chmod(0o700)?;
    Ok(true)
}

/// The VM's QEMU user as configured (`[libvirt] qemu_user`, `qemu_group`).
fn configured_owner(c: &cdp_core::config::Config) -> Result<(u32, u32)> {
    let user = c
        .libvirt
        .qemu_user
        .clone()
        .unwrap_or_else(|| cdp_core::config::DEFAULT_QEMU_USER.into());
    let pw = nix::unistd::User::from_name(&user)?
        .with_context(|| format!("no user {user:?} (QEMU's user, [libvirt] qemu_user)"))?;
    let gid = match &c.libvirt.qemu_group {
        Some(g) => {
            nix::unistd::Group::from_name(g)?
                .with_context(|| format!("no group {g:?} ([libvirt] qemu_group)"))?
                .gid
        }
        None => pw.gid,
    };
    Ok((pw.uid.as_raw(), gid.as_raw()))
}

/// The baselines as JSON.
pub(crate) fn print_json(results: &[(String, String, BaselineResult)]) -> Result<()> {
    let v: Vec<_> = results
        .iter()
        .map(|(d, t, r)| serde_json::json!({"disk": d, "target": t, "baseline": r}))
        .collect();
    crate::print_json(&v)
}

/// One line per baseline.
pub(crate) fn print_results(results: &[(String, String, BaselineResult)]) {
    for (d, t, r) in results {
        println!(
            "{d} → {t}: {} chunks ({} with data, {} uploaded, {}), consistent from seq {} (scan began after seq {}){}",
            r.chunks_total,
            r.chunks_data,
            r.chunks_uploaded,
            crate::status::human(r.bytes_uploaded),
            r.s1,
            r.s0,
            if r.s0 == r.s1 { ": exact" } else { "" }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dac_label_is_read_as_the_hook_reads_it() {
        let xml = "<domain><seclabel type='static' model='dac' relabel='yes'>\
                   <label>+1001:+1002</label></seclabel></domain>";
        assert_eq!(dac_label(xml), Some((1001, 1002)));
        let named = "<domain><seclabel type='static' model='dac'><label>qemu:kvm</label></seclabel></domain>";
        assert_eq!(dac_label(named), None);
        let selinux = "<domain><seclabel model='selinux'><label>+1:+2</label></seclabel></domain>";
        assert_eq!(dac_label(selinux), None);
    }
}
