//! `cdpctl restore` and `cdpctl points`: a disk at any point, from the
//! repository (plus the host's local segments when it still has them).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cdp_core::time::{fmt_ns, now_ns};
use cdp_repo::format as rf;
use cdp_repo::restore::{self, History, Point};
use cdp_repo::store::Store;

use crate::Ctx;

#[derive(clap::Args, Clone)]
pub struct RepoArgs {
    /// Repository URL (file:///… or s3://…); default: the policy's primary target.
    #[arg(long)]
    pub repo: Option<String>,
    /// Policy whose primary target is the default repository.
    #[arg(long, default_value = "default")]
    pub policy: String,
    /// Ignore this host's local journal (repository only).
    #[arg(long)]
    pub no_local: bool,
    /// The key file of an encrypted repository (`cdpctl repo init --encrypt`);
    /// overrides the target's `key_file` and CDP_KEY_FILE.
    #[arg(long, value_name = "FILE", conflicts_with = "passphrase_file")]
    pub key_file: Option<PathBuf>,
    /// A file holding the passphrase of an encrypted repository; overrides
    /// the target's `passphrase_file` and CDP_PASSPHRASE_FILE.
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

impl RepoArgs {
    /// The key source given on the command line, if any.
    fn key_source(&self) -> Option<cdp_repo::crypto::KeySource> {
        use cdp_repo::crypto::KeySource;
        self.key_file
            .clone()
            .map(KeySource::KeyFile)
            .or_else(|| self.passphrase_file.clone().map(KeySource::PassphraseFile))
    }

    /// `store` with the command line's key source, when one was given.
    fn keyed(&self, store: Store) -> Store {
        match self.key_source() {
            Some(k) => store.with_key_source(Some(k)),
            None => store,
        }
    }
}

#[derive(clap::Args)]
pub struct RestoreArgs {
    /// VM name or UUID.
    pub vm: String,
    /// The disk (target name, e.g. vda); or --all-disks.
    #[arg(long, default_value = "", hide_default_value = true)]
    pub disk: String,
    /// The point: RFC 3339 time, "10 minutes ago", seq:N, mark:LABEL or latest.
    #[arg(long)]
    pub at: String,
    /// Output file (created; never overwritten).
    #[arg(long, required_unless_present_any = ["in_place", "dry_run", "all_disks"])]
    pub output: Option<PathBuf>,
    /// Output format.
    #[arg(long, default_value = "raw", value_parser = ["raw", "qcow2"])]
    pub format: String,
    /// Write the point back onto the VM's own disk (only ranges that differ). The VM must be stopped.
    /// The disk is --target, else the disk's <source> in libvirt's definition of the VM.
    #[arg(long, conflicts_with = "output")]
    pub in_place: bool,
    /// With --in-place: the file or block device to overwrite (never a symbolic link).
    /// Default: the disk's <source> in libvirt's definition of the VM (`virsh dumpxml --inactive`);
    /// never a path read from the repository or the catalog.
    #[arg(long, requires = "in_place")]
    pub target: Option<PathBuf>,
    /// With --in-place: overwrite without asking (needed without a terminal: scripts, CI).
    #[arg(long, requires = "in_place")]
    pub yes: bool,
    /// libvirt connection URI where --in-place finds the VM's definition.
    #[arg(long, default_value = "qemu:///system")]
    pub connect: String,
    /// Show the plan only.
    #[arg(long)]
    pub dry_run: bool,
    /// Every disk of the VM at one cut into --to DIR (DIR/<disk>.raw), plus
    /// the VM definition of that point remapped to them (DIR/domain.xml).
    #[arg(long, requires = "to", conflicts_with_all = ["disk", "output", "in_place", "dry_run"])]
    pub all_disks: bool,
    /// With --all-disks: the directory (created if missing; no file in it overwritten).
    #[arg(long, value_name = "DIR", requires = "all_disks")]
    pub to: Option<PathBuf>,
    /// With --all-disks: define the restored VM in libvirt (--connect) as a new VM NAME: a new
    /// UUID and MACs, its disks the restored ones, not protected (docs/LIBVIRT.md, "Whole-VM restore").
    #[arg(long, value_name = "NAME", requires = "all_disks")]
    pub define: Option<String>,
    /// With --all-disks: restore each volume disk of libvirt pool OLD into a new volume of the
    /// same name in pool NEW (and point the definition at it). Repeatable.
    #[arg(long = "remap-pool", value_name = "OLD=NEW", requires = "all_disks")]
    pub remap_pools: Vec<String>,
    #[command(flatten)]
    pub repo: RepoArgs,
}

#[derive(clap::Args)]
pub struct PointsArgs {
    /// VM name or UUID.
    pub vm: String,
    /// Only this disk.
    #[arg(long)]
    pub disk: Option<String>,
    /// List every flush point (by default: how many there are, and the
    /// newest 10).
    #[arg(long)]
    pub all: bool,
    /// Also write the timeline as an SVG picture to this file (disks,
    /// restorable ranges, baselines, marks, gaps).
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    #[command(flatten)]
    pub repo: RepoArgs,
}

/// The repository a command reads: `--repo`, or the policy's primary target
/// (no fallback: `cdpctl restore-config`; the others use [`candidate_repos`]).
pub fn open_repo(ctx: &Ctx, a: &RepoArgs) -> Result<Store> {
    let mut c = candidate_repos(ctx, a)?;
    c.remove(0).store
}

/// A repository a command may read: one target of the policy, or `--repo`.
pub struct Candidate {
    /// The policy's name for it; `None` for `--repo`.
    pub target: Option<String>,
    pub url: String,
    /// Opened (no I/O yet), or why it could not be.
    pub store: Result<Store>,
}

impl Candidate {
    /// "target NAME (URL)" or "repository URL".
    pub fn describe(&self) -> String {
        match &self.target {
            Some(t) => format!("target {t} ({})", self.url),
            None => format!("repository {}", self.url),
        }
    }
}

/// Which repository a command read, for `--json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Used {
    /// The policy's target; `None` when given `--repo`.
    pub target: Option<String>,
    pub repository: String,
}

/// The repositories a command may read, in order: `--repo` alone, or every
/// target of the policy, primary first. A configuration error (no such
/// policy, no targets) is an error here; a target that cannot be opened is
/// a candidate that fails (the next one is tried).
pub fn candidate_repos(ctx: &Ctx, a: &RepoArgs) -> Result<Vec<Candidate>> {
    if let Some(url) = &a.repo {
        return Ok(vec![Candidate {
            target: None,
            url: url.clone(),
            store: Store::open(url, None)
                .map(|s| a.keyed(s))
                .with_context(|| format!("repository {url}")),
        }]);
    }
    let config = &ctx.config;
    let Some(p) = config.policy.get(&a.policy) else {
        bail!(
            "no --repo given and no [policy.{}] in the config: give --repo file:///… or s3://…",
            a.policy
        );
    };
    if p.targets.is_empty() {
        bail!("policy {} has no targets: give --repo", a.policy);
    }
    Ok(p.targets
        .iter()
        .map(|name| {
            let t = &config.target[name];
            Candidate {
                target: Some(name.clone()),
                url: t.url.clone(),
                store: Store::for_target(t)
                    .map(|s| a.keyed(s))
                    .with_context(|| format!("target {name} ({})", t.url)),
            }
        })
        .collect())
}

/// Run `f` on each candidate in order until it succeeds: a target that is
/// unreachable, or does not hold what is asked for, falls back to the next
/// of the policy (docs/RELIABILITY.md, "A target is down"). Says on stderr
/// which target was skipped and why, and which one is read. Returns the
/// repository used with `f`'s result; every error when none served.
pub async fn with_fallback<T, F, Fut>(
    candidates: Vec<Candidate>,
    mut f: F,
) -> Result<(Store, Used, T)>
where
    F: FnMut(Store) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let n = candidates.len();
    let mut errors = Vec::new();
    for (i, c) in candidates.into_iter().enumerate() {
        let desc = c.describe();
        let r = match c.store {
            Ok(store) => f(store.clone()).await.map(|v| (store, v)),
            Err(e) => Err(e),
        };
        match r {
            Ok((store, v)) => {
                if c.target.is_some() {
                    crate::progress::note(&format!("cdpctl: reading from {desc}"));
                }
                let used = Used {
                    target: c.target,
                    repository: c.url,
                };
                return Ok((store, used, v));
            }
            Err(e) if n == 1 => return Err(e),
            Err(e) => {
                if i + 1 < n {
                    crate::progress::note(&format!(
                        "cdpctl: {desc}: {e:#}; trying the next target of the policy"
                    ));
                }
                errors.push(format!("{desc}: {e:#}"));
            }
        }
    }
    bail!(
        "no target of the policy could serve this:\n  {}",
        errors.join("\n  ")
    )
}

/// Resolve a VM by UUID, by the host catalog, or by the repository's vm.json files.
pub async fn resolve_vm(ctx: &Ctx, store: &Store, vm: &str) -> Result<String> {
    if let Ok(u) = cdp_core::names::check_uuid(vm) {
        return Ok(u.hyphenated().to_string());
    }
    if let Ok(u) = ctx.resolve_vm(vm) {
        return Ok(u);
    }
    let list = store.list(&format!("{}/vms/", rf::ROOT)).await?;
    // Every version of every VM's vm.json (a renamed VM is found by either name).
    let is_vm_json =
        |k: &str| k.ends_with("/vm.json") || (k.contains("/vm.json.d/") && k.ends_with(".json"));
    for o in list.iter().filter(|o| is_vm_json(&o.key)) {
        let b = store.get(&o.key).await?;
        if let Ok(j) = serde_json::from_slice::<rf::VmJson>(&b) {
            if j.name == vm {
                // The repository is not trusted: its uuid is a name, checked.
                let u = cdp_core::names::check_uuid(&j.uuid)
                    .with_context(|| format!("{} in {}", o.key, store.url()))?;
                return Ok(u.hyphenated().to_string());
            }
        }
    }
    bail!(
        "no VM named {vm:?} on this host or in {}: give its UUID",
        store.url()
    )
}

fn local_dir<'a>(ctx: &'a Ctx, a: &RepoArgs, vm: &str, disk: &str) -> Option<&'a Path> {
    (!a.no_local && cdp_core::journal::journal_dir(&ctx.state_dir, vm, disk).is_dir())
        .then_some(ctx.state_dir.as_path())
}

/// When this host's journal of `disk` filled (the `since_ns` of its dirty
/// map, docs/RELIABILITY.md, "A full journal"), if writes since then are not
/// journaled yet: the map's header, read as root never through a link
/// below `<state>` (as local segments are). No map, or one that does not
/// check out: None (cdpd journals an unbounded GAP for a corrupt one).
fn unjournaled_since(ctx: &Ctx, vm: &str, disk: &str) -> Option<u64> {
    use cdp_core::journal::dirty::{Header, MapKind, HEADER_LEN};
    let state = cdp_core::layout::StateDir::new(&ctx.state_dir);
    let map = state.vm(vm).dirty_map(disk);
    let rel = map.strip_prefix(&ctx.state_dir).ok()?;
    let b = read_head::<HEADER_LEN>(&ctx.state_dir, rel)?;
    let h = Header::decode(MapKind::Dirty, &b).ok()?;
    (h.since_ns != 0).then_some(h.since_ns)
}

/// The first `N` bytes of the regular file `rel` below `dir`, read as root
/// from a tree QEMU's user writes: no link followed on the way (`openat2`
/// `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), and opened `O_NONBLOCK`, so a
/// FIFO planted there cannot hang the restore; what is not a regular file
/// with one name is refused after `fstat` (docs/DESIGN.md, "Trust
/// boundaries").
fn read_head<const N: usize>(dir: &Path, rel: &Path) -> Option<[u8; N]> {
    use std::io::Read;
    let mut f = cdp_core::fsat::DirFd::open(dir)
        .ok()?
        .open_beneath(rel)
        .ok()?;
    let mut b = [0u8; N];
    f.read_exact(&mut b).ok()?;
    Some(b)
}

/// A point refused as not restorable names the nearest restorable points
/// before and after it (from `restore::restorable_ranges`, as seq and
/// time): the one place restore and export say so.
fn with_nearest(h: &History, point: &Point, e: restore::RestoreError) -> restore::RestoreError {
    match e {
        restore::RestoreError::Impossible {
            disk,
            point: p,
            why,
        } => {
            let why = match nearest_restorable(h, point) {
                Some(near) => format!("{why}; nearest restorable: {near}"),
                None => why,
            };
            restore::RestoreError::Impossible {
                disk,
                point: p,
                why,
            }
        }
        other => other,
    }
}

/// "seq:N (time) before, seq:M (time) after" around `point` (either side
/// may be missing), or None when the disk has no restorable point or the
/// point has no place in its history (a mark that is not there).
fn nearest_restorable(h: &History, point: &Point) -> Option<String> {
    let ranges = restore::restorable_ranges(h);
    if ranges.is_empty() {
        return Some("none (no point of this disk can be restored yet)".into());
    }
    // Restorable seqs <= lo are before the point, those >= hi after it.
    let (lo, hi) = match point {
        Point::Seq(x) => (x.checked_sub(1), x.saturating_add(1)),
        Point::TimeNs(t) => {
            let at = h
                .entries()
                .map(|(_, e)| e)
                .filter(|e| e.ts_ns <= *t)
                .last()
                .map(|e| e.seq);
            (at, at.map_or(0, |s| s + 1))
        }
        Point::Mark(_) | Point::Latest => return None,
    };
    let before = lo.and_then(|lo| {
        ranges
            .iter()
            .filter(|(a, _)| *a <= lo)
            .map(|(_, b)| (*b).min(lo))
            .max()
    });
    let after = ranges
        .iter()
        .filter(|(_, b)| *b >= hi)
        .map(|(a, _)| (*a).max(hi))
        .min();
    let show = |s: u64| {
        let ts = h
            .entries()
            .map(|(_, e)| e)
            .filter(|e| e.seq <= s)
            .last()
            .map_or(0, |e| e.ts_ns);
        format!("seq:{s} ({})", fmt_ns(ts))
    };
    let mut parts = Vec::new();
    if let Some(b) = before {
        parts.push(format!("{} before", show(b)));
    }
    if let Some(a) = after {
        parts.push(format!("{} after", show(a)));
    }
    if parts.is_empty() {
        return None;
    }
    Some(parts.join(", "))
}

pub(crate) fn describe_seq(h: &History, seq: u64) -> String {
    h.entries()
        .map(|(_, e)| e)
        .filter(|e| e.seq <= seq)
        .last()
        .map(|e| format!("seq {seq} ({})", fmt_ns(e.ts_ns)))
        .unwrap_or_else(|| format!("seq {seq}"))
}

/// Restore moves every byte through 1 MiB buffers. glibc serves those with
/// fresh mmap()s (or trims them back to the kernel) by default, so each one
/// is faulted in and zeroed again: a fifth of the CPU time of a restore.
/// Keep them in the heap instead.
pub(crate) fn keep_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt(3) takes two integers and only changes glibc's malloc
    // tunables (under its own lock); no pointer is passed, nothing is freed.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

pub fn restore(ctx: &Ctx, a: &RestoreArgs) -> Result<()> {
    if a.all_disks {
        return crate::restore_vm::restore_all_disks(ctx, a);
    }
    if a.disk.is_empty() {
        bail!("give --disk NAME (or --all-disks --to DIR)");
    }
    cdp_core::names::check_disk(&a.disk)?;
    // With --json, stderr is JSON lines from here on (the target read too).
    crate::progress::Mode::of(ctx.json);
    keep_large_buffers();
    let point = Point::parse(&a.at, now_ns())?;
    let candidates = candidate_repos(ctx, &a.repo)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let point = &point;
        // The first target of the policy that answers and can rebuild the
        // point exactly; the lease is taken before its history is read.
        let (store, used, (vm, lease, prep)) = with_fallback(candidates, |store| async move {
            let vm = resolve_vm(ctx, &store, &a.vm).await?;
            // Retention deletes nothing of the VM while the restore reads.
            let lease = cdp_repo::lease::acquire(
                &store,
                &vm,
                "cdpctl restore",
                &format!("{} at {point}", a.disk),
                cdp_repo::lease::DEFAULT_TTL,
            )
            .await?;
            match prepare(ctx, &a.repo, &a.disk, &store, &vm, point).await {
                Ok(p) => Ok((vm, lease, p)),
                Err(e) => {
                    lease.release().await;
                    Err(e)
                }
            }
        })
        .await?;
        let r = restore_leased(ctx, a, &store, &used, &vm, point, prep).await;
        lease.release().await;
        r
    })
}

/// A point's history, its seq and the plan that rebuilds it.
pub struct Prepared {
    pub history: History,
    pub seq: u64,
    pub plan: restore::Plan,
}

/// Load `disk`'s history from `store` (and this host's journal), resolve the
/// point and plan it: fails when `store` cannot rebuild it exactly.
pub async fn prepare(
    ctx: &Ctx,
    repo: &RepoArgs,
    disk: &str,
    store: &Store,
    vm: &str,
    point: &Point,
) -> Result<Prepared> {
    prepare_with(ctx, repo, disk, store, vm, point, None).await
}

/// [`prepare`], reporting the bytes of the indexes and baselines read to
/// `tick` (`cdpctl export`'s progress).
pub async fn prepare_with(
    ctx: &Ctx,
    repo: &RepoArgs,
    disk: &str,
    store: &Store,
    vm: &str,
    point: &Point,
    tick: Option<&restore::Ticker>,
) -> Result<Prepared> {
    let local = local_dir(ctx, repo, vm, disk);
    let h = restore::load_history_with(Some(store), local, vm, disk, tick).await?;
    if h.segments.is_empty() && h.baselines.is_empty() {
        bail!(
            "VM {vm} has no disk {disk} in {} (nor on this host)",
            store.url()
        );
    }
    let near = |e| with_nearest(&h, point, e);
    let seq = restore::resolve(&h, Some(store), point)
        .await
        .map_err(near)?;
    // This host's cdpd may hold writes the journal does not (degraded
    // mode): no point from when its journal filled names a journaled state.
    if let Some(since) = unjournaled_since(ctx, vm, disk) {
        restore::point::refuse_unjournaled(&h, point, seq, since)
            .map_err(|e| with_nearest(&h, &Point::Seq(seq), e))?;
    }
    // Refuses a point that cannot be rebuilt exactly, saying why.
    let plan = restore::plan(&h, seq, point).map_err(|e| with_nearest(&h, &Point::Seq(seq), e))?;
    Ok(Prepared {
        history: h,
        seq,
        plan,
    })
}

async fn restore_leased(
    ctx: &Ctx,
    a: &RestoreArgs,
    store: &Store,
    used: &Used,
    vm: &str,
    point: &Point,
    prep: Prepared,
) -> Result<()> {
    let (store, vm, point) = (store.clone(), vm.to_string(), point.clone());
    {
        let Prepared {
            history: h,
            seq,
            plan,
        } = prep;
        let target = if a.in_place {
            Some(in_place_target(a, &vm)?)
        } else {
            None
        };
        let summary = serde_json::json!({
            "vm_uuid": vm,
            "disk": a.disk,
            "point": point.to_string(),
            "seq": seq,
            "at": describe_seq(&h, seq),
            "baseline": plan.baseline_key,
            "journal_records": plan.records,
            "extents": plan.extents.len(),
            "journal_bytes": plan.extents.covered(),
            "size": plan.size,
            "in_place_target": target.as_ref().map(|t| t.path.display().to_string()),
            "target": used.target,
            "repository": used.repository,
        });
        let summary = with_reads(summary, &plan);
        if a.dry_run {
            if ctx.json {
                return crate::print_json(&summary);
            }
            println!(
                "would restore {} of VM {vm} at {}: baseline {}, then {} journal records ({} extents, {})",
                a.disk,
                describe_seq(&h, seq),
                plan.baseline_key,
                plan.records,
                plan.extents.len(),
                crate::status::human(plan.extents.covered())
            );
            if let Some(t) = &target {
                println!("would overwrite {} ({})", t.path.display(), t.named_by);
            }
            return Ok(());
        }
        let started = std::time::Instant::now();
        let stats = if let Some(t) = &target {
            in_place(ctx, &store, &vm, t, &plan, &point, a.yes).await?
        } else {
            let out = a.output.as_deref().unwrap();
            to_file(&store, &plan, out, &a.format, ctx.json).await?
        };
        let secs = started.elapsed().as_secs_f64();
        if ctx.json {
            let mut v = summary;
            v["stats"] = serde_json::to_value(stats)?;
            v["seconds"] = secs.into();
            return crate::print_json(&v);
        }
        println!(
            "restored {} of VM {vm} at {} to {} in {secs:.2} s ({} from {} journal records, {} chunks)",
            a.disk,
            describe_seq(&h, seq),
            if let Some(t) = &target {
                t.path.display().to_string()
            } else {
                a.output.as_ref().unwrap().display().to_string()
            },
            crate::status::human(stats.bytes),
            stats.journal_records,
            stats.chunks_fetched,
        );
        Ok(())
    }
}

/// The dry run's plan, with what it reads: the journal segments (their
/// seq ranges, in the repository or on this host), the baseline chunks
/// fetched and the bytes of the disk they give.
fn with_reads(mut summary: serde_json::Value, plan: &restore::Plan) -> serde_json::Value {
    use cdp_core::journal::extents::Source;
    let mut used = std::collections::BTreeSet::new();
    for (_, _, src) in plan.extents.iter() {
        if let Source::Journal { segment, .. } = src {
            used.insert(segment as usize);
        }
    }
    let segments: Vec<_> = used
        .into_iter()
        .filter_map(|i| plan.segments.get(i))
        .map(|s| {
            let local = matches!(s.loc, restore::SegLoc::Local(_));
            serde_json::json!({"first_seq": s.first_seq, "last_seq": s.last_seq,
                "in": if local { "local" } else { "repository" }})
        })
        .collect();
    let b = &plan.baseline;
    let (mut chunks, mut chunk_bytes) = (0u64, 0u64);
    for (i, c) in b.chunks.iter().enumerate() {
        let start = i as u64 * b.chunk_size;
        let end = (start + b.chunk_size).min(b.size).min(plan.size);
        if c.is_none() || start >= end {
            continue;
        }
        let gaps = plan.extents.uncovered(start, end);
        if !gaps.is_empty() {
            chunks += 1;
            chunk_bytes += gaps.iter().map(|(s, e)| e - s).sum::<u64>();
        }
    }
    summary["journal_segments"] = segments.into();
    summary["baseline_chunks"] = chunks.into();
    summary["baseline_bytes"] = chunk_bytes.into();
    summary
}

/// The progress of a restore: `total` bytes of disk written once each.
fn progress(json: bool, total: u64) -> crate::progress::Meter {
    crate::progress::Meter::new(crate::progress::Mode::of(json), "restore", total)
}

/// Removes a file when dropped unless [`Scratch::keep`] was called: whatever
/// way a restore fails (an error, `?`, a panic), it leaves nothing behind.
struct Scratch(Option<PathBuf>);

impl Scratch {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// `<out>.<suffix>`, next to `out`.
fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    out.with_file_name(name)
}

fn create_scratch(p: &Path) -> Result<(std::fs::File, Scratch)> {
    match std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(p)
    {
        Ok(f) => Ok((f, Scratch(Some(p.to_path_buf())))),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!(
            "{} exists (left by an interrupted restore?): remove it and run the restore again",
            p.display()
        ),
        Err(e) => Err(e).with_context(|| format!("creating {}", p.display())),
    }
}

/// Give `from` the name `to`, never replacing an existing `to`.
fn publish(from: &Path, to: &Path) -> Result<()> {
    match std::fs::hard_link(from, to) {
        Ok(()) => std::fs::remove_file(from)?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!(
            "{} appeared while restoring: restore never overwrites a file; choose another --output",
            to.display()
        ),
        // A filesystem without hard links.
        Err(_) => {
            if to.exists() {
                bail!(
                    "{} appeared while restoring: choose another --output",
                    to.display()
                );
            }
            std::fs::rename(from, to)?;
        }
    }
    if let Some(dir) = to.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

pub(crate) async fn to_file(
    store: &Store,
    plan: &restore::Plan,
    out: &Path,
    format: &str,
    json: bool,
) -> Result<restore::RestoreStats> {
    if out.exists() {
        bail!(
            "{} exists: restore never overwrites a file; remove it or choose another --output",
            out.display()
        );
    }
    // Written under a temporary name and renamed at the end, so a failed
    // restore leaves nothing that could be taken for a good image: the
    // scratch files are removed on every error path.
    let partial = sibling(out, ".partial");
    let raw_path = if format == "qcow2" {
        sibling(out, ".partial.raw")
    } else {
        partial.clone()
    };
    let (f, raw_scratch) = create_scratch(&raw_path)?;
    f.set_len(plan.size)
        .with_context(|| format!("sizing {}", raw_path.display()))?;
    let meter = progress(json, plan.size);
    let r = restore::execute(
        plan,
        Some(store),
        Arc::new(restore::FreshFile(f.try_clone()?)),
        Some(meter.progress()),
    )
    .await;
    meter.clear();
    let stats = r.with_context(|| {
        format!(
            "restore of {} at seq {} failed, {} was not written (`cdpctl verify --deep` checks the repository)",
            plan.disk,
            plan.point_seq,
            out.display()
        )
    })?;
    f.sync_all()
        .with_context(|| format!("writing {}", raw_path.display()))?;
    drop(f);
    meter.finish();
    if format == "qcow2" {
        let (_, q_scratch) = create_scratch(&partial)?;
        let st = std::process::Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw_path)
            .arg(&partial)
            .status()
            .context("running qemu-img convert (install qemu-utils)")?;
        if !st.success() {
            bail!("qemu-img convert to qcow2 failed ({st})");
        }
        drop(raw_scratch);
        std::fs::File::open(&partial)
            .and_then(|q| q.sync_all())
            .with_context(|| format!("writing {}", partial.display()))?;
        publish(&partial, out)?;
        q_scratch.keep();
    } else {
        publish(&partial, out)?;
        raw_scratch.keep();
    }
    Ok(stats)
}

/// What `restore --in-place` overwrites, and who named it.
struct InPlaceTarget {
    path: PathBuf,
    disk: String,
    /// "--target" or "libvirt's definition of NAME".
    named_by: String,
}

/// An in-place restore overwrites a disk: asked on a terminal; without
/// one (scripts, CI) only with `--yes`. `what` names the file and the point.
fn confirm_overwrite(what: &str, yes: bool) -> Result<()> {
    use std::io::{BufRead, IsTerminal, Write};
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() || !std::io::stderr().is_terminal() {
        bail!(
            "restore --in-place would overwrite {what}; there is no terminal to ask on: \
             pass --yes to confirm (nothing was written)"
        );
    }
    eprint!("overwrite {what}? Its current contents are lost. Type yes to go on: ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if answer.trim() != "yes" {
        bail!(
            "not confirmed (answer {:?}): nothing was written",
            answer.trim()
        );
    }
    Ok(())
}

/// The file to overwrite: the operator's `--target`, else the disk's
/// `<source>` in libvirt's definition of the VM. Never a path from the
/// repository (`vm.json`) or the catalog: QEMU's user and whoever writes
/// the repository control those (issue 11, "Trust boundaries").
fn in_place_target(a: &RestoreArgs, vm: &str) -> Result<InPlaceTarget> {
    if let Some(p) = &a.target {
        return Ok(InPlaceTarget {
            path: p.clone(),
            disk: a.disk.clone(),
            named_by: "--target".into(),
        });
    }
    let xml = crate::protect_cmd::virsh(&a.connect, &["dumpxml", "--inactive", vm])
        .with_context(|| {
            format!(
                "finding disk {} of VM {vm} in libvirt ({}): give the file to overwrite with --target PATH",
                a.disk, a.connect
            )
        })?;
    let dom = cdp_hooks::domain::parse(&xml)
        .with_context(|| format!("libvirt's definition of VM {vm}"))?;
    if cdp_core::names::check_uuid(&dom.uuid).ok() != cdp_core::names::check_uuid(vm).ok() {
        bail!(
            "libvirt answered with VM {} for {vm}: give the file to overwrite with --target PATH",
            dom.uuid
        );
    }
    let Some(source) = dom
        .disks
        .iter()
        .find(|d| d.target == a.disk)
        .and_then(|d| d.source.clone())
    else {
        bail!(
            "libvirt's definition of {} ({vm}) has no disk {} with a local source: give the file to overwrite with --target PATH",
            dom.name,
            a.disk
        );
    };
    let state = crate::protect_cmd::virsh(&a.connect, &["domstate", vm]).unwrap_or_default();
    if matches!(state.trim(), "running" | "paused" | "in shutdown") {
        bail!(
            "VM {} is {} (libvirt): stop it before restoring in place",
            dom.name,
            state.trim()
        );
    }
    Ok(InPlaceTarget {
        path: source.into(),
        disk: a.disk.clone(),
        named_by: format!("libvirt's definition of {}", dom.name),
    })
}

/// Open the in-place target read-write and locked, refusing a symbolic
/// link (`O_NOFOLLOW`) and anything but a regular file or a block device
/// (`fstat` of what was opened). The locked image must be that same file.
fn open_target(path: &Path) -> Result<cdp_core::image::Image> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path);
    let f = match f {
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => bail!(
            "{} is a symbolic link: restore --in-place never follows one; give the file it points to with --target",
            path.display()
        ),
        r => r.with_context(|| format!("opening {}", path.display()))?,
    };
    let md = f.metadata()?;
    if !md.file_type().is_file() && !md.file_type().is_block_device() {
        bail!(
            "{} is neither a regular file nor a block device: refusing to overwrite it",
            path.display()
        );
    }
    // Locked like QEMU and cdpd lock it: fails if anything has it open.
    let img = cdp_core::image::open(path)?;
    let locked = img.file.metadata()?;
    if (locked.dev(), locked.ino()) != (md.dev(), md.ino()) {
        bail!(
            "{} changed while it was being opened: refusing to overwrite it",
            path.display()
        );
    }
    Ok(img)
}

async fn in_place(
    ctx: &Ctx,
    store: &Store,
    vm: &str,
    target: &InPlaceTarget,
    plan: &restore::Plan,
    point: &Point,
    yes: bool,
) -> Result<restore::RestoreStats> {
    let ctl = ctx.run().vm(vm).control_socket();
    // As the VM's user (the socket lies in its run directory); no run
    // directory, no cdpd of it on this host.
    let running = ctx.run().vm(vm).path().exists()
        && ctx.with_control(vm, |c| {
            Ok(std::os::unix::net::UnixStream::connect(c.path()).is_ok())
        })?;
    if running {
        bail!(
            "VM {vm} is running (cdpd answers on {}): stop the VM before restoring in place",
            ctl.display()
        );
    }
    let path = &target.path;
    let img = open_target(path)?;
    if img.size != plan.size {
        bail!(
            "{} is {} bytes but the point is {} bytes: resize it first (qemu-img resize)",
            path.display(),
            img.size,
            plan.size
        );
    }
    let what = format!(
        "{} ({} bytes, named by {}) with disk {} of VM {vm} at {point}",
        path.display(),
        img.size,
        target.named_by,
        target.disk
    );
    confirm_overwrite(&what, yes)?;
    let mode = crate::progress::Mode::of(ctx.json);
    crate::progress::say(mode, "restore", &format!("overwriting {what}"));
    let sink = Arc::new(restore::InPlace {
        file: img.file,
        changed: Default::default(),
    });
    let meter = progress(ctx.json, plan.size);
    let r = restore::execute(plan, Some(store), sink.clone(), Some(meter.progress())).await;
    meter.clear();
    let stats = r?;
    sink.file.sync_all()?;
    meter.finish();
    // The disk no longer equals baseline + journal: the next capture
    // session records a GAP and the shipper takes a new baseline.
    if ctx.has_catalog(vm) {
        let reason = format!(
            "{} to {point}: a new baseline is needed",
            cdp_core::session::RESTORED_IN_PLACE
        );
        ctx.with_catalog(vm, |cat| {
            let (last, _) = cat.last_seq(vm)?;
            cat.add_gap(vm, &target.disk, last + 1, now_ns(), &reason)
        })?;
    }
    let changed = sink.changed.load(std::sync::atomic::Ordering::Relaxed);
    crate::progress::say(
        mode,
        "restore",
        &format!("{changed} bytes differed and were rewritten"),
    );
    Ok(stats)
}

pub fn points(ctx: &Ctx, a: &PointsArgs) -> Result<()> {
    let candidates = candidate_repos(ctx, &a.repo)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let (store, used, (vm, name, out)) = with_fallback(candidates, |store| async move {
            let vm = resolve_vm(ctx, &store, &a.vm).await?;
            let name = crate::points_svg::vm_name(ctx, &store, &vm, &a.vm).await;
            let out = timelines(ctx, a, &store, &vm).await?;
            Ok((vm, name, out))
        })
        .await?;
        if let Some(path) = &a.svg {
            let svg = crate::points_svg::svg(&vm, name.as_deref(), &out);
            std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("timeline written to {}", path.display());
        }
        if ctx.json {
            return crate::print_json(&serde_json::json!({
                "vm_uuid": vm,
                "vm_name": name,
                "disks": out,
                "target": used.target,
                "repository": used.repository,
            }));
        }
        print_timeline(&vm, name.as_deref(), &store, &out, a.all);
        Ok(())
    })
}

/// The timeline of each disk of `vm` (or of `--disk`) in `store`.
async fn timelines(
    ctx: &Ctx,
    a: &PointsArgs,
    store: &Store,
    vm: &str,
) -> Result<Vec<serde_json::Value>> {
    let disks = match &a.disk {
        Some(d) => vec![d.clone()],
        None => {
            let mut d = cdp_repo::read::list_disks(store, vm).await?;
            if !a.repo.no_local {
                d.extend(cdp_core::journal::list_disks(&ctx.state_dir, vm).unwrap_or_default());
            }
            d.sort();
            d.dedup();
            d
        }
    };
    if disks.is_empty() {
        bail!("VM {vm} has nothing in {} nor on this host", store.url());
    }
    let mut out = Vec::new();
    for disk in &disks {
        out.push(disk_timeline(ctx, store, &a.repo, vm, disk).await?);
    }
    Ok(out)
}

/// One disk's timeline: restorable ranges, retention, baselines, flushes,
/// marks and gaps (the JSON of `cdpctl points --json`).
async fn disk_timeline(
    ctx: &Ctx,
    store: &Store,
    repo: &RepoArgs,
    vm: &str,
    disk: &str,
) -> Result<serde_json::Value> {
    let local = local_dir(ctx, repo, vm, disk);
    let h = restore::load_history(Some(store), local, vm, disk).await?;
    let ts_of = |seq: u64| {
        h.entries()
            .map(|(_, e)| e)
            .filter(|e| e.seq <= seq)
            .last()
            .map(|e| e.ts_ns)
            // A point before every record: an offline baseline's (the
            // disk as it was when that baseline was taken).
            .or_else(|| {
                h.baselines
                    .iter()
                    .filter(|(_, b)| b.s1 == seq)
                    .map(|(_, b)| b.finished_ns)
                    .min()
            })
            .unwrap_or(0)
    };
    let ranges: Vec<_> = restore::restorable_ranges(&h)
        .into_iter()
        .map(|(a, b)| {
            serde_json::json!({"from_seq": a, "from": fmt_ns(ts_of(a)), "from_ns": ts_of(a),
                "to_seq": b, "to": fmt_ns(ts_of(b)), "to_ns": ts_of(b)})
        })
        .collect();
    let flushes: Vec<_> = h
        .entries()
        .map(|(_, e)| e)
        .filter(|e| e.kind == cdp_core::journal::Kind::Flush)
        .map(|e| serde_json::json!({"seq": e.seq, "time": fmt_ns(e.ts_ns), "time_ns": e.ts_ns}))
        .collect();
    // "quiesced": the guest's filesystems were frozen for the mark
    // (`cdpctl mark --quiesce`); false: crash-consistent.
    let marks: Vec<_> = restore::history::mark_records(&h, Some(store))
        .await?
        .into_iter()
        .map(|m| {
            serde_json::json!({"seq": m.seq, "time": fmt_ns(m.ts_ns), "time_ns": m.ts_ns,
                "label": m.label, "quiesced": m.quiesced})
        })
        .collect();
    let gaps: Vec<_> = restore::gaps(&h, Some(store))
        .await?
        .into_iter()
        .map(|(s, t, r)| {
            // A GAP a resync heals: the points in [seq, healed_by_seq) are
            // not restorable, those after are (docs/DESIGN.md, "Restore").
            let healed = h.resyncs.healed_by(s);
            serde_json::json!({"seq": s, "time": fmt_ns(t), "time_ns": t, "reason": r,
                "resync": h.resyncs.gaps.contains(&s),
                "healed_by_seq": healed,
                "healed_at": healed.map(|r| fmt_ns(ts_of(r))),
                "healed_at_ns": healed.map(ts_of)})
        })
        .collect();
    let baselines: Vec<_> = h
        .baselines
        .iter()
        .map(|(k, b)| {
            // The time of its point (s1), when the journal still has it.
            let point = Some(ts_of(b.s1)).filter(|t| *t != 0);
            serde_json::json!({"key": k, "s0": b.s0, "s1": b.s1, "time": fmt_ns(b.finished_ns),
                "time_ns": b.finished_ns, "point_ns": point})
        })
        .collect();
    let shipped_to = h
        .segments
        .iter()
        .rev()
        .find(|s| matches!(s.loc, restore::SegLoc::Repo { .. }))
        .map(|s| s.last_seq);
    let retention = h.retention.as_ref().map(|m| {
        let kept: Vec<_> = m
            .points
            .iter()
            .map(|p| serde_json::json!({"seq": p.seq, "time": fmt_ns(p.ts_ns), "marks": p.marks, "why": p.why}))
            .collect();
        serde_json::json!({
            "pruned": fmt_ns(m.written_ns),
            "any_point_from_seq": h.retained().map_or(m.window.seq, |(_, d)| d.journal_from_seq),
            "any_point_from": fmt_ns(h.retained().map_or(m.window.ts_ns, |(_, d)| d.from_ts_ns)),
            "kept_points": kept,
        })
    });
    Ok(serde_json::json!({
        "disk": disk,
        "retention": retention,
        "restorable": ranges,
        "newest_shipped_seq": shipped_to,
        "newest_seq": h.last_entry().map(|e| e.seq),
        "baselines": baselines,
        "flushes": flushes,
        "marks": marks,
        "gaps": gaps,
    }))
}

/// A GAP for a human: one a resync heals (or will) as the window of points
/// it leaves unrestorable, others with their reason.
fn print_gap(x: &serde_json::Value) {
    let (seq, time) = (&x["seq"], x["time"].as_str().unwrap_or("?"));
    if x["resync"] != true {
        println!(
            "  GAP        seq {seq:>8} {time}  {}",
            x["reason"].as_str().unwrap_or("?")
        );
        return;
    }
    match (x["healed_by_seq"].as_u64(), x["healed_at"].as_str()) {
        (Some(r), Some(at)) => println!(
            "  not restorable: journal full from {time} to {at} (resynced at seq {r}; points seq {seq}..{} cannot be restored)",
            r - 1
        ),
        _ => println!(
            "  not restorable from {time}: resync not finished (journal full; points from seq {seq} on cannot be restored until it ends)"
        ),
    }
}

/// The timelines, for a human: every flush point with `all`, else their
/// count and the newest [`FLUSHES_SHOWN`].
fn print_timeline(
    vm: &str,
    name: Option<&str>,
    store: &Store,
    out: &[serde_json::Value],
    all: bool,
) {
    match name {
        Some(n) => println!("VM {n} ({vm}), repository {}", store.url()),
        None => println!("VM {vm} (repository {})", store.url()),
    }
    for d in out {
        println!("disk {}", d["disk"].as_str().unwrap());
        let r = d["restorable"].as_array().unwrap();
        if r.is_empty() {
            println!("  no restorable point (no usable baseline: take one with `cdpctl baseline`)");
        }
        for x in r {
            println!(
                "  restorable  seq {:>8} {}  →  seq {:>8} {}",
                x["from_seq"],
                x["from"].as_str().unwrap(),
                x["to_seq"],
                x["to"].as_str().unwrap()
            );
        }
        match (d["newest_shipped_seq"].as_u64(), d["newest_seq"].as_u64()) {
            (Some(s), Some(n)) if n > s => {
                println!("  shipped up to seq {s}; seq {s}..{n} are on this host only")
            }
            (None, Some(n)) => {
                println!("  nothing shipped yet; records up to seq {n} are on this host only")
            }
            _ => {}
        }
        if let Some(r) = d["retention"].as_object() {
            println!(
                "  retention (pruned {}): any point from seq {} ({}) on; {} earlier points kept:",
                r["pruned"].as_str().unwrap_or("?"),
                r["any_point_from_seq"],
                r["any_point_from"].as_str().unwrap_or("?"),
                r["kept_points"].as_array().map_or(0, |k| k.len())
            );
            for p in r["kept_points"].as_array().into_iter().flatten() {
                let marks: Vec<&str> = p["marks"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|m| m.as_str())
                    .collect();
                println!(
                    "  kept point seq {:>8} {}{}",
                    p["seq"],
                    p["time"].as_str().unwrap_or("?"),
                    if marks.is_empty() {
                        String::new()
                    } else {
                        format!("  mark {}", marks.join(", "))
                    }
                );
            }
        }
        for b in d["baselines"].as_array().unwrap() {
            println!(
                "  baseline   consistent from seq {:>8}  ({})",
                b["s1"],
                b["time"].as_str().unwrap()
            );
        }
        for m in d["marks"].as_array().unwrap() {
            println!(
                "  mark       seq {:>8} {}  {}  ({})",
                m["seq"],
                m["time"].as_str().unwrap(),
                m["label"].as_str().unwrap(),
                if m["quiesced"] == true {
                    "quiesced"
                } else {
                    "crash-consistent"
                }
            );
        }
        for x in d["gaps"].as_array().unwrap() {
            print_gap(x);
        }
        print_flushes(d["flushes"].as_array().unwrap(), all);
    }
}

/// Flush points listed by default (`cdpctl points --all` lists every one).
const FLUSHES_SHOWN: usize = 10;

/// A disk's flush points, newest first: all, or the newest
/// [`FLUSHES_SHOWN`] and how many more `--all` lists.
fn print_flushes(f: &[serde_json::Value], all: bool) {
    let shown = if all {
        f.len()
    } else {
        f.len().min(FLUSHES_SHOWN)
    };
    match (f.len(), shown) {
        (0, _) => println!("  0 flush points"),
        (n, s) if s == n => println!("  {n} flush points, newest first:"),
        (n, s) => println!(
            "  {n} flush points, the newest {s} ({} more: --all lists every one):",
            n - s
        ),
    }
    for x in f.iter().rev().take(shown) {
        println!(
            "  flush      seq {:>8} {}",
            x["seq"],
            x["time"].as_str().unwrap()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dirty map QEMU's user replaced with a FIFO, a link or a directory
    /// reads as no map, at once: the root-run restore neither hangs on it
    /// nor follows it.
    #[test]
    fn a_planted_dirty_map_is_no_map_and_never_hangs() {
        let t = tempfile::tempdir().unwrap();
        let disk = t.path().join("vms/u/vda");
        std::fs::create_dir_all(&disk).unwrap();
        let outside = t.path().join("outside");
        std::fs::write(&outside, [7u8; 64]).unwrap();
        let rel = Path::new("vms/u/vda/dirty.map");
        nix::unistd::mkfifo(&disk.join("dirty.map"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let dir = t.path().to_path_buf();
        std::thread::spawn(move || tx.send(read_head::<16>(&dir, rel)).unwrap());
        let r = rx.recv_timeout(std::time::Duration::from_secs(5));
        assert_eq!(r, Ok(None), "a FIFO is refused at once");
        std::fs::remove_file(disk.join("dirty.map")).unwrap();
        std::os::unix::fs::symlink(&outside, disk.join("dirty.map")).unwrap();
        assert_eq!(
            read_head::<16>(t.path(), rel),
            None,
            "a link is not followed"
        );
        std::fs::remove_file(disk.join("dirty.map")).unwrap();
        std::fs::write(disk.join("dirty.map"), [1u8; 64]).unwrap();
        assert_eq!(read_head::<16>(t.path(), rel), Some([1u8; 16]));
    }
}
