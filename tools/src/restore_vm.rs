//! `cdpctl restore VM --at POINT --all-disks --to DIR`: every disk of the VM
//! at one cut, plus the VM definition of that point remapped to the
//! restored files (issue 14, "Whole-VM restore").
//!
//! One cut: the point is resolved once to one seq S of the VM's single
//! sequence (docs/DESIGN.md, "Write path": one sequence per VM), and every disk is
//! restored with exactly the writes journaled at seq <= S. A mark is at one
//! seq in every disk; a time resolves in each disk to the newest
//! restorable record not after it, and S is the newest of those, so no disk
//! holds a write another disk's image predates. A disk that cannot be
//! rebuilt exactly at S refuses the whole restore.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use cdp_core::time::now_ns;
use cdp_repo::restore::Point;
use cdp_repo::store::Store;

use crate::define::{self, CloneReport, DiskDest, Identity};
use crate::restore_cmd::{
    candidate_repos, describe_seq, keep_large_buffers, prepare, resolve_vm, to_file, with_fallback,
    Prepared, RestoreArgs,
};
use crate::verify_cmd::{
    find_definition, parse_remaps, remap_disk_pools, remap_disk_sources, write_new,
    RestoreConfigArgs,
};
use crate::Ctx;

/// The file the definition is written to, in DIR.
const DOMAIN_XML: &str = "domain.xml";

/// Every disk of the VM prepared at one cut.
struct Cut {
    seq: u64,
    disks: Vec<(String, Prepared)>,
}

/// The VM's disks: those in the repository, and (unless --no-local) those
/// journaled on this host.
async fn disks_of(ctx: &Ctx, a: &RestoreArgs, store: &Store, vm: &str) -> Result<Vec<String>> {
    let mut disks = cdp_repo::read::list_disks(store, vm).await?;
    if !a.repo.no_local {
        disks.extend(cdp_core::journal::list_disks(&ctx.state_dir, vm).unwrap_or_default());
    }
    disks.sort();
    disks.dedup();
    for d in &disks {
        cdp_core::names::check_disk(d)
            .with_context(|| format!("disk name {d:?} of VM {vm} in {}", store.url()))?;
    }
    if disks.is_empty() {
        bail!("VM {vm} has no disk in {} (nor on this host)", store.url());
    }
    Ok(disks)
}

/// Resolve `point` in every disk, then plan every disk at the one cut (the
/// newest of those seqs; see the module's comment).
async fn prepare_cut(
    ctx: &Ctx,
    a: &RestoreArgs,
    store: &Store,
    vm: &str,
    point: &Point,
) -> Result<Cut> {
    let mut disks = Vec::new();
    for disk in disks_of(ctx, a, store, vm).await? {
        let p = prepare(ctx, &a.repo, &disk, store, vm, point)
            .await
            .with_context(|| format!("disk {disk}"))?;
        disks.push((disk, p));
    }
    let seq = disks.iter().map(|(_, p)| p.seq).max().unwrap_or(0);
    for (disk, p) in disks.iter_mut() {
        if p.seq != seq {
            *p = prepare(ctx, &a.repo, disk, store, vm, &Point::Seq(seq))
                .await
                .with_context(|| format!("disk {disk} at the cut seq:{seq} of {point}"))?;
        }
    }
    Ok(Cut { seq, disks })
}

/// Each disk's `<target dev=…>` and its own `<source file=…|dev=…>` (not a
/// backing store's) in a libvirt domain XML.
fn disk_sources(xml: &[u8]) -> Result<Vec<(String, String)>> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_reader(xml);
    let mut stack: Vec<Vec<u8>> = Vec::new();
    let (mut target, mut source) = (None, None);
    let mut out = Vec::new();
    loop {
        let ev = reader
            .read_event()
            .context("the stored definition is not well-formed XML")?;
        let (e, empty) = match ev {
            Event::Eof => break,
            Event::Start(e) => (e, false),
            Event::Empty(e) => (e, true),
            Event::End(_) => {
                if stack.pop().as_deref() == Some(b"disk") {
                    if let (Some(t), Some(s)) = (target.take(), source.take()) {
                        out.push((t, s));
                    }
                    (target, source) = (None, None);
                }
                continue;
            }
            _ => continue,
        };
        let name = e.name().as_ref().to_vec();
        if stack.last().map(Vec::as_slice) == Some(b"disk") {
            for attr in e.attributes() {
                let attr = attr.context("bad attribute in the stored definition")?;
                let v = attr.unescape_value()?.into_owned();
                match (name.as_slice(), attr.key.as_ref()) {
                    (b"target", b"dev") => target = Some(v),
                    (b"source", b"file" | b"dev") => source = Some(v),
                    _ => {}
                }
            }
        }
        if !empty {
            stack.push(name);
        }
    }
    Ok(out)
}

/// The definition of the cut with each restored disk's source replaced by
/// its file in `dir` and each `--remap-pool` applied: (the definition as
/// stored, the remapped XML, the JSON report of it).
async fn definition(
    ctx: &Ctx,
    a: &RestoreArgs,
    store: &Store,
    cut: &Cut,
    dir: &Path,
) -> Result<(Vec<u8>, Vec<u8>, serde_json::Value)> {
    let args = RestoreConfigArgs {
        vm: a.vm.clone(),
        at: format!("seq:{}", cut.seq),
        remaps: Vec::new(),
        output: dir.join(DOMAIN_XML),
        repo: a.repo.clone(),
    };
    let found = find_definition(ctx, store, &args, &Point::Seq(cut.seq)).await?;
    let restored: Vec<&str> = cut.disks.iter().map(|(d, _)| d.as_str()).collect();
    let remaps: Vec<(String, String)> = disk_sources(&found.xml)?
        .into_iter()
        .filter(|(t, _)| restored.contains(&t.as_str()))
        .map(|(t, s)| (s, out_path(dir, &t).display().to_string()))
        .collect();
    let (xml, what) = remap_disk_sources(&found.xml, &remaps)?;
    let (xml, pools) = remap_disk_pools(&xml, &parse_remaps(&a.remap_pools)?)?;
    // A remap is a whole path: one that only began another path would
    // point that disk at the wrong file.
    if let Some(r) = what
        .remapped
        .iter()
        .find(|r| !remaps.iter().any(|(old, _)| *old == r.old))
    {
        bail!(
            "the definition's disk source {} begins with another disk's path: not remapped",
            r.old
        );
    }
    let report = serde_json::json!({
        "output": dir.join(DOMAIN_XML),
        "key": found.key,
        "stored": cdp_core::time::fmt_ns(found.stored_ns),
        "in_force_at": found.at_desc,
        "remapped": what.remapped,
        "pools_remapped": pools.remapped,
        "kept": what.kept,
    });
    Ok((found.xml, xml, report))
}

fn out_path(dir: &Path, disk: &str) -> PathBuf {
    dir.join(format!("{disk}.raw"))
}

/// Removes the files a failed whole-VM restore created, unless disarmed.
struct Created(Vec<PathBuf>);

impl Drop for Created {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// `cdpctl restore VM --at POINT --all-disks --to DIR`.
pub fn restore_all_disks(ctx: &Ctx, a: &RestoreArgs) -> Result<()> {
    crate::progress::Mode::of(ctx.json);
    keep_large_buffers();
    if a.format != "raw" {
        bail!("--all-disks writes raw images (DIR/<disk>.raw): leave out --format");
    }
    let dir = a.to.as_deref().context("--all-disks needs --to DIR")?;
    let point = Point::parse(&a.at, now_ns())?;
    parse_remaps(&a.remap_pools).context("--remap-pool")?;
    if let Some(name) = &a.define {
        define::check_name(name)?;
        define::output(define::virsh(&a.connect).arg("uri")).context("--define needs libvirt")?;
        if define::exists(&a.connect, name)? {
            bail!("libvirt already has a VM named {name}: --define names a NEW VM; choose another name");
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let candidates = candidate_repos(ctx, &a.repo)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let point = &point;
        let (store, used, (vm, lease, cut)) = with_fallback(candidates, |store| async move {
            let vm = resolve_vm(ctx, &store, &a.vm).await?;
            let lease = cdp_repo::lease::acquire(
                &store,
                &vm,
                "cdpctl restore --all-disks",
                &format!("every disk at {point}"),
                cdp_repo::lease::DEFAULT_TTL,
            )
            .await?;
            match prepare_cut(ctx, a, &store, &vm, point).await {
                Ok(c) => Ok((vm, lease, c)),
                Err(e) => {
                    lease.release().await;
                    Err(e)
                }
            }
        })
        .await?;
        let r = write_cut(ctx, a, &store, &vm, point, &cut, dir).await;
        lease.release().await;
        let mut report = r?;
        report["target"] = serde_json::to_value(&used.target)?;
        report["repository"] = used.repository.into();
        if ctx.json {
            return crate::print_json(&report);
        }
        Ok(())
    })
}

/// Refuse any file already there, then write every disk and the definition;
/// on an error, remove what this run created.
async fn write_cut(
    ctx: &Ctx,
    a: &RestoreArgs,
    store: &Store,
    vm: &str,
    point: &Point,
    cut: &Cut,
    dir: &Path,
) -> Result<serde_json::Value> {
    let outs: Vec<PathBuf> = cut.disks.iter().map(|(d, _)| out_path(dir, d)).collect();
    let domain = dir.join(DOMAIN_XML);
    let clone_file = a.define.as_ref().map(|n| dir.join(format!("{n}.xml")));
    let there: Vec<String> = outs
        .iter()
        .chain([&domain])
        .chain(clone_file.as_ref())
        .filter(|p| p.symlink_metadata().is_ok())
        .map(|p| p.display().to_string())
        .collect();
    if !there.is_empty() {
        bail!(
            "{} already in {}: restore never overwrites a file; choose another --to",
            there.join(", "),
            dir.display()
        );
    }
    // The definition first: a point without one, or a new VM that could
    // not be defined, writes nothing.
    let (stored, xml, def_report) = definition(ctx, a, store, cut, dir).await?;
    let pools = pool_disks(a, &stored, cut)?;
    let clone = match &a.define {
        Some(name) => Some(new_vm(a, vm, &stored, cut, dir, &pools, name)?),
        None => None,
    };
    let mut created = Created(Vec::new());
    let mut disks = Vec::new();
    for ((disk, p), out) in cut.disks.iter().zip(&outs) {
        let stats = to_file(store, &p.plan, out, "raw", ctx.json).await?;
        created.0.push(out.clone());
        if !ctx.json {
            println!(
                "restored {disk} of VM {vm} at {} to {}",
                describe_seq(&p.history, cut.seq),
                out.display()
            );
        }
        disks.push(serde_json::json!({
            "disk": disk,
            "output": out,
            "size": p.plan.size,
            "baseline": p.plan.baseline_key,
            "journal_records": p.plan.records,
            "stats": stats,
        }));
    }
    for pd in &pools {
        let (_, p) = cut
            .disks
            .iter()
            .find(|(d, _)| *d == pd.disk)
            .expect("a restored disk");
        upload_to_pool(&a.connect, pd, &out_path(dir, &pd.disk), p.plan.size)?;
        if !ctx.json {
            println!(
                "{} is now volume {} of pool {}",
                pd.disk, pd.volume, pd.pool
            );
        }
    }
    write_new(&domain, &xml)?;
    created.0.clear();
    if !ctx.json {
        println!(
            "wrote {}: the definition of VM {vm} at seq {}, disks remapped to {}",
            domain.display(),
            cut.seq,
            dir.display()
        );
    }
    let mut report = serde_json::json!({
        "vm_uuid": vm,
        "point": point.to_string(),
        "seq": cut.seq,
        "disks": disks,
        "definition": def_report,
        "pools": pools.iter().map(|p| serde_json::json!({
            "disk": p.disk, "pool": p.pool, "volume": p.volume,
        })).collect::<Vec<_>>(),
    });
    if let (Some(c), Some(file)) = (clone, clone_file) {
        report["defined"] = define_new_vm(ctx, a, c, &file)?;
    }
    Ok(report)
}

/// A restored disk that goes into a new volume of a libvirt pool
/// (`--remap-pool OLD=NEW`: its definition's `<source pool='OLD' volume='V'>`).
struct PoolDisk {
    disk: String,
    pool: String,
    volume: String,
}

/// The restored disks `--remap-pool` moves into a pool, checked before
/// anything is written: the pool exists, the volume does not, and each
/// remap applies to some restored disk.
fn pool_disks(a: &RestoreArgs, stored: &[u8], cut: &Cut) -> Result<Vec<PoolDisk>> {
    let remaps = parse_remaps(&a.remap_pools)?;
    if remaps.is_empty() {
        return Ok(Vec::new());
    }
    let infos = define::disks_of(stored)?;
    let mut out = Vec::new();
    for (disk, _) in &cut.disks {
        let Some(info) = infos.iter().find(|i| &i.target == disk) else {
            continue;
        };
        let Some((_, new)) = remaps.iter().find(|(old, _)| *old == info.pool) else {
            continue;
        };
        if info.kind != "volume" {
            continue;
        }
        define::check_name(new).context("--remap-pool: the new pool's name")?;
        define::check_name(&info.volume)
            .with_context(|| format!("disk {disk}'s volume name in the stored definition"))?;
        define::output(define::virsh(&a.connect).args(["pool-info", new]))
            .with_context(|| format!("--remap-pool: libvirt has no pool {new}"))?;
        let there = define::virsh(&a.connect)
            .args(["vol-info", "--pool", new, &info.volume])
            .output()?;
        if there.status.success() {
            bail!(
                "pool {new} already has a volume {}: restore never overwrites; remove it or remap to another pool",
                info.volume
            );
        }
        out.push(PoolDisk {
            disk: disk.clone(),
            pool: new.clone(),
            volume: info.volume.clone(),
        });
    }
    for (old, _) in &remaps {
        if !infos.iter().any(|i| {
            i.kind == "volume" && i.pool == *old && cut.disks.iter().any(|(d, _)| *d == i.target)
        }) {
            bail!("--remap-pool {old}=…: no restored disk is a volume of pool {old}");
        }
    }
    Ok(out)
}

/// Create the volume (raw, the disk's size) and upload the restored image
/// into it, then remove the image; the volume is deleted if the upload fails.
fn upload_to_pool(connect: &str, pd: &PoolDisk, file: &Path, size: u64) -> Result<()> {
    define::output(define::virsh(connect).args([
        "vol-create-as",
        &pd.pool,
        &pd.volume,
        &size.to_string(),
        "--format",
        "raw",
    ]))?;
    let up = define::output(
        define::virsh(connect)
            .args(["vol-upload", "--sparse", "--pool", &pd.pool, &pd.volume])
            .arg(file),
    );
    if let Err(e) = up {
        let _ = define::virsh(connect)
            .args(["vol-delete", "--pool", &pd.pool, &pd.volume])
            .output();
        return Err(e);
    }
    std::fs::remove_file(file).with_context(|| format!("removing {}", file.display()))
}

/// The new VM's definition (docs/SECURITY.md, "Defining a restored VM"):
/// made before anything is written, so a refused one writes nothing.
struct NewVm {
    identity: Identity,
    xml: Vec<u8>,
    report: CloneReport,
}

fn new_vm(
    a: &RestoreArgs,
    vm: &str,
    stored: &[u8],
    cut: &Cut,
    dir: &Path,
    pools: &[PoolDisk],
    name: &str,
) -> Result<NewVm> {
    let identity = Identity::random(name)?;
    let disks = cut
        .disks
        .iter()
        .map(|(d, _)| {
            let dest = match pools.iter().find(|p| p.disk == *d) {
                Some(p) => DiskDest::Volume {
                    pool: p.pool.clone(),
                    volume: p.volume.clone(),
                },
                None => DiskDest::File(out_path(dir, d)),
            };
            (d.clone(), dest)
        })
        .collect();
    let (kind, arch) = define::domain_kind(stored)?;
    let emulator = define::host_emulator(&a.connect, &kind, arch.as_deref())?;
    let trusted = define::trusted_paths(&a.connect, vm)?;
    let spec = define::CloneSpec {
        identity: &identity,
        disks: &disks,
        emulator: &emulator,
        trusted_paths: &trusted,
        char_dir: dir,
    };
    let (xml, report) = define::clone_definition(stored, &spec, &mut define::random_mac)
        .context("the stored definition cannot be defined as a new VM")?;
    Ok(NewVm {
        identity,
        xml,
        report,
    })
}

/// Write DIR/NAME.xml and define it; say what it is and how to protect it.
fn define_new_vm(ctx: &Ctx, a: &RestoreArgs, c: NewVm, file: &Path) -> Result<serde_json::Value> {
    write_new(file, &c.xml)?;
    define::define(&a.connect, file).with_context(|| {
        format!(
            "the restored disks and {} are kept: fix what libvirt says and `virsh define` it",
            file.display()
        )
    })?;
    let Identity { name, uuid } = &c.identity;
    let mut disks: Vec<&str> = c.report.disks.iter().map(|(d, _)| d.as_str()).collect();
    disks.sort();
    let protect = format!(
        "cdpctl protect {name}{}",
        disks
            .iter()
            .map(|d| format!(" --disk {d}"))
            .collect::<String>()
    );
    if !ctx.json {
        println!(
            "defined VM {name} in libvirt (UUID {uuid}) from {}:",
            file.display()
        );
        for (d, at) in &c.report.disks {
            println!("  disk {d}: {at}");
        }
        for (old, new) in &c.report.macs {
            println!("  MAC {old} → {new}");
        }
        for (old, new) in &c.report.chardevs {
            println!("  console {old} → {new}");
        }
        for n in &c.report.notes {
            println!("  {n}");
        }
        println!("{name} is NOT protected (a restored copy starts its own history only when asked): `{protect}`");
        println!("start it: virsh start {name}");
    }
    Ok(serde_json::json!({
        "name": name,
        "uuid": uuid,
        "file": file,
        "changes": c.report,
        "protected": false,
        "protect": protect,
    }))
}
