//! `cdpctl protect DOMAIN --disk vda [--policy P]`, `cdpctl unprotect DOMAIN`
//! and `cdpctl libvirt-hook` (what `/etc/libvirt/hooks/qemu.d/cdp` runs).
//!
//! The definition is edited through libvirt (`virsh dumpxml --inactive
//! --security-info` then `virsh define`), never in libvirt's files, so a
//! running VM keeps running and the change applies at its next start. The
//! edit itself is `cdp_hooks::protect` (pure, byte-preserving).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use cdp_hooks::{domain, protect};

use crate::install::HOOK_PATH;
use crate::{Ctx, Global};

#[derive(clap::Args)]
pub struct ProtectArgs {
    /// libvirt domain (name or UUID).
    pub domain: String,
    /// Disk target to protect, as in <target dev='vda'/>; repeat for more.
    #[arg(long = "disk", required = true)]
    pub disks: Vec<String>,
    /// Policy of /etc/cdp/cdp.toml (targets, segment limits, retention).
    #[arg(long, default_value = "default")]
    pub policy: String,
    /// libvirt connection URI.
    #[arg(long, default_value = "qemu:///system")]
    pub connect: String,
    /// The wrapper to set as emulator (default: cdp-qemu next to cdpctl).
    #[arg(long)]
    pub wrapper: Option<PathBuf>,
    /// Print the new definition; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(clap::Args)]
pub struct UnprotectArgs {
    /// libvirt domain (name or UUID).
    pub domain: String,
    /// libvirt connection URI.
    #[arg(long, default_value = "qemu:///system")]
    pub connect: String,
    /// Print the new definition; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(clap::Args)]
pub struct HookArgs {
    /// What libvirt passes: DOMAIN OPERATION SUB-OPERATION EXTRA.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// `virsh -c CONNECT ARGS…`: its standard output, or its error.
pub(crate) fn virsh(connect: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(connect)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running virsh (install libvirt-clients)")?;
    if !out.status.success() {
        bail!(
            "virsh {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The persistent definition, secrets included (so redefining loses none).
pub(crate) fn definition(connect: &str, dom: &str) -> Result<String> {
    virsh(connect, &["dumpxml", "--inactive", "--security-info", dom])
        .with_context(|| format!("reading the definition of {dom}"))
}

fn define(connect: &str, xml: &str) -> Result<()> {
    let mut f = tempfile::NamedTempFile::new()?;
    f.write_all(xml.as_bytes())?;
    f.flush()?;
    virsh(connect, &["define", &f.path().display().to_string()])?;
    Ok(())
}

fn is_running(connect: &str, dom: &str) -> bool {
    virsh(connect, &["domstate", dom])
        .map(|s| s.trim() == "running" || s.trim() == "paused")
        .unwrap_or(false)
}

fn default_wrapper() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("cdp-qemu")))
        .unwrap_or_else(|| "/usr/bin/cdp-qemu".into())
}

/// A raw disk must hold raw data: refuse a file that is really qcow2.
fn check_raw_file(target: &str, path: &str) -> Result<u64> {
    let mut f = std::fs::File::open(path)
        .with_context(|| format!("disk {target}: cannot open {path}: create it or fix <source>"))?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).unwrap_or(0);
    if n == 4 && &magic == b"QFI\xfb" {
        bail!(
            "disk {target} ({path}) holds a qcow2 image although the domain says raw: convert it with `qemu-img convert -O raw {path} {path}.raw` and point the disk at the raw file"
        );
    }
    let m = f.metadata()?;
    Ok(if m.file_type().is_file() {
        m.len()
    } else {
        // Block device: its size by seeking.
        use std::io::Seek;
        f.seek(std::io::SeekFrom::End(0)).unwrap_or(0)
    })
}

#[derive(serde::Serialize)]
struct DiskReport {
    disk: String,
    path: String,
    size: u64,
    /// Targets that already hold a baseline of it.
    baseline_in: Vec<String>,
    /// Targets where the next start takes a full baseline.
    baseline_due_in: Vec<String>,
}

#[derive(serde::Serialize)]
struct ProtectReport {
    domain: String,
    uuid: String,
    policy: String,
    emulator: String,
    real_emulator: String,
    running: bool,
    disks: Vec<DiskReport>,
    gap_recorded: bool,
    /// `file://` target directories created for QEMU's user.
    prepared: Vec<PathBuf>,
    /// The full baseline taken now, offline, because the VM is shut off and
    /// cdpd has never served it: (disk, target, baseline).
    offline_baseline: Vec<(String, String, cdp_shipper::baseline::BaselineResult)>,
    /// Why none was taken now although the VM is shut off.
    offline_baseline_error: Option<String>,
}

pub fn protect(ctx: &Ctx, a: &ProtectArgs) -> Result<()> {
    let config = &ctx.config;
    let before = definition(&a.connect, &a.domain)?;
    refuse_per_disk_policies(&a.domain, &before)?;
    let wrapper = a.wrapper.clone().unwrap_or_else(default_wrapper);
    check_programs(&wrapper)?;
    let new = protect::protect(
        &before,
        &protect::Request {
            disks: a.disks.clone(),
            policy: a.policy.clone(),
            wrapper: wrapper.display().to_string(),
        },
    )
    .with_context(|| format!("protecting {}", a.domain))?;
    let dom = domain::parse(&new)?;
    let tagged = dom
        .tagged(config)
        .with_context(|| format!("{} cannot be protected", a.domain))?;
    if a.dry_run {
        print!("{new}");
        return Ok(());
    }
    // Before anything changes: a repository the shipper cannot write is
    // refused here, with the command that fixes it.
    let owner = cdp_hooks::hook::vm_owner(&ctx.config, &new)?;
    let prepared = prepare_repositories(ctx, owner, &dom.uuid, &a.policy, "protect")?;
    if !Path::new(HOOK_PATH).exists() {
        bail!(
            "the libvirt hook {HOOK_PATH} is not installed, so a protected VM could not start: run `cdpctl install --libvirt`, restart libvirtd, then protect"
        );
    }
    let uuid = cdp_core::names::check_uuid(&dom.uuid)?
        .hyphenated()
        .to_string();
    let mut disks = Vec::new();
    for t in &tagged {
        let size = check_raw_file(&t.target, &t.path)?;
        disks.push(DiskReport {
            disk: t.target.clone(),
            path: t.path.clone(),
            size,
            baseline_in: Vec::new(),
            baseline_due_in: Vec::new(),
        });
    }
    let targets = config
        .policy
        .get(&a.policy)
        .map(|p| p.targets.clone())
        .unwrap_or_default();
    find_baselines(config, &targets, &uuid, &mut disks)?;
    let gap_recorded = record_gap(ctx, &uuid, &disks)?;
    let fresh = !ctx.has_catalog(&uuid);
    define(&a.connect, &new)?;
    let running = is_running(&a.connect, &a.domain);
    let mut report = ProtectReport {
        domain: dom.name.clone(),
        uuid,
        policy: a.policy.clone(),
        emulator: wrapper.display().to_string(),
        real_emulator: dom
            .protection
            .as_ref()
            .and_then(|p| p.emulator.clone())
            .unwrap_or_default(),
        running,
        disks,
        gap_recorded,
        prepared,
        offline_baseline: Vec::new(),
        offline_baseline_error: None,
    };
    // Shut off and never served: the full baseline now, offline and exact,
    // so the first boot is restorable from its first write (docs/DESIGN.md,
    // "Baselines"). A VM with a history keeps it: the next start follows
    // the unprotected time's GAP with a new baseline. This process works
    // as the VM's user from here on.
    if !running && fresh && !targets.is_empty() {
        match offline_baseline(ctx, &new, &a.policy) {
            Ok(results) => {
                for d in &mut report.disks {
                    d.baseline_in.append(&mut d.baseline_due_in);
                }
                report.offline_baseline = results;
            }
            Err(e) => report.offline_baseline_error = Some(format!("{e:#}")),
        }
    }
    if ctx.json {
        return crate::print_json(&report);
    }
    print_protected(&report, targets.is_empty());
    Ok(())
}

/// A definition whose `<cdp:disk>` keys name another policy than the VM's
/// is refused: per-disk policies are not honoured, and protecting would
/// drop them silently (docs/LIBVIRT.md, "Per-disk policy").
fn refuse_per_disk_policies(vm: &str, before: &str) -> Result<()> {
    let dom = domain::parse(before)?;
    let Some(p) = &dom.protection else {
        return Ok(());
    };
    let u = p.unhonoured_policies();
    if u.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = u.iter().map(|u| format!("  {u}")).collect();
    bail!(
        "cannot protect {vm}: its definition has per-disk policies, which cdpd does not support (one policy per VM); remove them (virsh edit) and protect again:\n{}",
        lines.join("\n")
    )
}

/// Each `file://` target of `policy` made ready for the VM's QEMU user, who
/// runs its shipper (docs/LIBVIRT.md, "The repository's permissions"): a
/// missing directory, or a missing `cdp/` tree in one the user cannot
/// write, is created for the user (as root); a tree the user cannot write
/// is refused with the command that fixes it. Nothing that exists is
/// chowned ([`cdp_hooks::target_dir`]). The directories created. `again`
/// names the command to run again after a refusal (`protect`, `baseline`).
pub(crate) fn prepare_repositories(
    ctx: &Ctx,
    owner: (u32, u32),
    uuid: &str,
    policy: &str,
    again: &str,
) -> Result<Vec<PathBuf>> {
    use cdp_hooks::target_dir::{prepare, Prepared, QemuUser};
    let config = &ctx.config;
    let Some(p) = config.policy.get(policy) else {
        return Ok(Vec::new());
    };
    let user = QemuUser::new(owner);
    let root = nix::unistd::geteuid().is_root();
    let mut created = Vec::new();
    for name in &p.targets {
        let Some(dir) = config
            .target
            .get(name)
            .and_then(|t| t.url.strip_prefix("file://"))
            .map(Path::new)
        else {
            continue;
        };
        match prepare(dir, uuid, &user, root)
            .with_context(|| format!("target {name}: preparing {}", dir.display()))?
        {
            Prepared::Ready => {}
            Prepared::Created(d) => {
                crate::progress::note(&format!(
                    "cdpctl: target {name}: created {} for {} (mode 0750): its shipper writes there",
                    d.display(),
                    user.label
                ));
                created.push(d);
            }
            Prepared::Refused { path, why, command } => bail!(
                "target {name} ({}): {} {why}, and the VM's shipper runs as {}: run `{command}` as root, then {again} again (nothing was changed)",
                dir.display(),
                path.display(),
                user.label
            ),
        }
    }
    Ok(created)
}

/// The full baseline of a shut-off VM cdpd has never served, from its new
/// definition (`cdpctl baseline`'s offline path).
fn offline_baseline(
    ctx: &Ctx,
    xml: &str,
    policy: &str,
) -> Result<Vec<(String, String, cdp_shipper::baseline::BaselineResult)>> {
    let view = crate::baseline_cmd::view_of_definition(ctx, xml)?;
    Ok(crate::baseline_cmd::take(ctx, &view, policy, None)?.results)
}

/// The wrapper and the programs it starts must be where protect points the VM.
fn check_programs(wrapper: &Path) -> Result<()> {
    for b in ["cdp-qemu", "cdpd", "cdp-shipper"] {
        let p = wrapper.with_file_name(b);
        if !p.is_file() {
            bail!(
                "{} is missing: install cdpd's binaries (`cdpctl install`, or the package), then protect",
                p.display()
            );
        }
    }
    Ok(())
}

/// Which targets already hold a baseline of each disk (the shipper takes one
/// at start where a target has none).
fn find_baselines(
    config: &cdp_core::config::Config,
    targets: &[String],
    uuid: &str,
    disks: &mut [DiskReport],
) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    for t in targets {
        let tc = &config.target[t];
        let store = match cdp_repo::store::Store::for_target(tc) {
            Ok(s) => s,
            Err(e) => {
                // A missing file:// directory is created by the hook at start.
                eprintln!("cdpctl: note: target {t}: {e}");
                for d in disks.iter_mut() {
                    d.baseline_due_in.push(t.clone());
                }
                continue;
            }
        };
        for d in disks.iter_mut() {
            let have = rt
                .block_on(store.list(&cdp_repo::format::baseline_prefix(uuid, &d.disk)))
                .map(|l| !l.is_empty())
                .unwrap_or(false);
            if have {
                d.baseline_in.push(t.clone());
            } else {
                d.baseline_due_in.push(t.clone());
            }
        }
    }
    Ok(())
}

/// Writes made while the VM was not protected are in no journal: if it was
/// protected before, the next session starts with a GAP (and so a fresh
/// baseline), never a silent hole. Whether a gap was recorded.
fn record_gap(ctx: &Ctx, uuid: &str, disks: &[DiskReport]) -> Result<bool> {
    if !ctx.has_catalog(uuid) {
        return Ok(false);
    }
    let names: Vec<String> = disks.iter().map(|d| d.disk.clone()).collect();
    let gap_recorded = ctx.with_catalog(uuid, |cat| {
        let known = cat.disks(uuid)?;
        let mut gap_recorded = false;
        for d in &names {
            if known.iter().any(|(k, _, _)| k == d) {
                // After the last seq, as an in-place restore records it:
                // the next cdpd start journals gaps recorded after its
                // last seq (one AT it would never be journaled).
                let (seq, _) = cat.last_seq(uuid)?;
                cat.add_gap(
                    uuid,
                    d,
                    seq + 1,
                    cdp_core::time::now_ns(),
                    "unprotected: the disk may have been written while it was not captured",
                )?;
                gap_recorded = true;
            }
        }
        Ok(gap_recorded)
    })?;
    Ok(gap_recorded)
}

fn print_protected(report: &ProtectReport, no_targets: bool) {
    println!(
        "{} is protected with policy {:?} (emulator {} → {}).",
        report.domain, report.policy, report.emulator, report.real_emulator
    );
    if report.running {
        println!("It is running: protection starts at its next start (shut it down, then start it; a reboot inside the guest is not enough); that first start takes the full baseline online.");
    } else {
        println!("Protection starts when it next starts: every write from the first I/O of boot is journaled.");
    }
    if !report.offline_baseline.is_empty() {
        println!("It is shut off: the full baseline was taken now, offline (exact), so its first boot is restorable from its first write:");
        crate::baseline_cmd::print_results(&report.offline_baseline);
    }
    if let Some(e) = &report.offline_baseline_error {
        println!("  warning: it is shut off, but the offline baseline failed ({e}): take it with `cdpctl baseline {}` before its first start, or the first start takes it online (its writes before that baseline cannot be restored).", report.uuid);
    }
    for d in &report.disks {
        if !d.baseline_due_in.is_empty() {
            println!(
                "  {}: {} ({}): no baseline in {}: the shipper takes a full baseline at the next start (reads the whole disk; unchanged chunks are not uploaded twice).",
                d.disk,
                d.path,
                crate::status::human(d.size),
                d.baseline_due_in.join(", ")
            );
        }
        if !d.baseline_in.is_empty() {
            println!(
                "  {}: {}: a baseline exists in {}{}.",
                d.disk,
                d.path,
                d.baseline_in.join(", "),
                if report.gap_recorded {
                    "; the time it ran unprotected is recorded as a gap, and a new baseline follows it"
                } else {
                    ""
                }
            );
        }
    }
    if no_targets {
        println!("  warning: policy {:?} has no targets: the journal stays on this host until you add one.", report.policy);
    }
}

pub fn unprotect(ctx: &Ctx, a: &UnprotectArgs) -> Result<()> {
    let before = definition(&a.connect, &a.domain)?;
    let new = protect::unprotect(&before).with_context(|| format!("unprotecting {}", a.domain))?;
    if a.dry_run {
        print!("{new}");
        return Ok(());
    }
    define(&a.connect, &new)?;
    let running = is_running(&a.connect, &a.domain);
    if ctx.json {
        return crate::print_json(&serde_json::json!({
            "domain": a.domain, "running": running, "unprotected": true
        }));
    }
    println!(
        "{} is no longer protected: its definition is as it was before `cdpctl protect`.",
        a.domain
    );
    if running {
        println!(
            "It is running and still protected until it stops; cdp-agent then ships what is left."
        );
    }
    println!("Its journal and repository stay: `cdpctl points` and `cdpctl restore` still work.");
    Ok(())
}

/// The libvirt hook. Exit status matters: non-zero on `prepare begin` fails
/// the VM start (libvirt shows our message), so it happens only for a VM with
/// CDP keys whose protection cannot work.
pub fn hook(g: &Global, a: &HookArgs) -> Result<()> {
    let mut xml = String::new();
    // libvirt always writes the XML; a closed stdin reads as empty.
    let _ = std::io::stdin().read_to_string(&mut xml);
    match cdp_hooks::hook::run(&a.args, &xml, g.config.as_deref()) {
        Ok(cdp_hooks::hook::Outcome::Ignored) => Ok(()),
        Ok(o) => {
            let vm = a.args.first().map(String::as_str).unwrap_or("?");
            if let cdp_hooks::hook::Outcome::Prepared { left_alone, .. } = &o {
                for p in left_alone {
                    eprintln!(
                        "cdp hook: {vm}: warning: {} is a link (or a hard-linked file) in a tree QEMU's user owns: left alone, not followed",
                        p.display()
                    );
                }
            }
            eprintln!("cdp hook: {vm}: {o:?}");
            Ok(())
        }
        Err(e) if a.args.get(1).map(String::as_str) == Some("release") => {
            eprintln!("cdp hook: warning: {e}");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
