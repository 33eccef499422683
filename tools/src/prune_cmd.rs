//! `cdpctl prune VM [--dry-run] [--target NAME] [--json]`: apply the VM's
//! policy retention to its targets (`cdp_repo::retention::apply`), print
//! what was kept, written, deleted and deferred.

use anyhow::{bail, Context, Result};
use cdp_core::time::{fmt_ns, now_ns};
use cdp_repo::retention;
use cdp_repo::store::Store;

use crate::status::human;
use crate::Ctx;

#[derive(clap::Args)]
pub struct PruneArgs {
    /// VM name or UUID.
    pub vm: String,
    /// Show what would be kept, written and deleted; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Only this target of the policy (default: all of them).
    #[arg(long)]
    pub target: Option<String>,
    /// The policy whose retention applies (default: the one the VM's cdpd
    /// last ran with, else "default").
    #[arg(long)]
    pub policy: Option<String>,
    /// Apply the policy as of this time (RFC 3339 or "10 minutes ago")
    /// instead of now: to preview a later prune.
    #[arg(long)]
    pub now: Option<String>,
    /// Delete at most this many objects; the rest at the next prune.
    #[arg(long)]
    pub max_deletions: Option<u64>,
}

fn vm_policy(ctx: &Ctx, vm: &str) -> Option<String> {
    let uuid = ctx.resolve_vm(vm).ok()?;
    if !ctx.has_catalog(&uuid) {
        return None;
    }
    let vms = ctx.with_catalog(&uuid, |cat| cat.vms()).ok()?;
    vms.into_iter()
        .find(|r| r.uuid == uuid)
        .and_then(|r| r.policy)
}

pub fn run(ctx: &Ctx, a: &PruneArgs) -> Result<()> {
    let config = &ctx.config;
    let policy = a
        .policy
        .clone()
        .or_else(|| vm_policy(ctx, &a.vm))
        .unwrap_or_else(|| "default".into());
    let Some(p) = config.policy.get(&policy) else {
        bail!("no [policy.{policy}] in the config: give --policy, or check --config");
    };
    let Some(ret) = config.retention(&policy)? else {
        bail!(
            "policy {policy} has no [policy.{policy}.retention]: it keeps everything, there is nothing to prune"
        );
    };
    let targets: Vec<String> = match &a.target {
        Some(t) if p.targets.contains(t) => vec![t.clone()],
        Some(t) => bail!(
            "target {t} is not one of policy {policy}'s targets ({})",
            p.targets.join(", ")
        ),
        None => p.targets.clone(),
    };
    if targets.is_empty() {
        bail!("policy {policy} has no targets");
    }
    let now = match &a.now {
        Some(t) => cdp_core::time::parse_time(t, now_ns()).map_err(anyhow::Error::msg)?,
        None => now_ns(),
    };
    let rt = tokio::runtime::Runtime::new()?;
    let mut reports = Vec::new();
    // The bytes of the objects to delete (dry run: that would be), of
    // every target, found as each target's prune chooses them.
    let mode = crate::progress::Mode::of(ctx.json);
    let meter = crate::progress::Meter::new(mode, "prune", 0);
    for name in &targets {
        let t = &config.target[name];
        // Retention's credential, never the shipper's when one is configured
        // (docs/CREDENTIALS.md).
        if let Some(w) = cdp_repo::store::shared_credential_warning(name, t) {
            crate::progress::say(mode, "prune", &format!("cdpctl prune: {w}"));
        }
        let store = Store::for_prune(t).with_context(|| format!("target {name} ({})", t.url))?;
        let r = rt.block_on(async {
            let vm = crate::restore_cmd::resolve_vm(ctx, &store, &a.vm).await?;
            let opts = retention::Options {
                max_deletions: a.max_deletions,
                progress: Some(meter.ticker()),
            };
            retention::apply_with(&store, &vm, &ret, now, a.dry_run, &opts)
                .await
                .with_context(|| format!("pruning VM {vm} in target {name} ({})", t.url))
        });
        let r = r.inspect_err(|_| meter.clear())?;
        reports.push((name.clone(), r));
    }
    meter.finish();
    if ctx.json {
        let v: Vec<_> = reports
            .iter()
            .map(|(t, r)| {
                let mut v = serde_json::to_value(r).unwrap();
                v["target"] = t.clone().into();
                v
            })
            .collect();
        return crate::print_json(&serde_json::json!({ "policy": policy, "targets": v }));
    }
    for (t, r) in &reports {
        print_report(&policy, t, r);
    }
    Ok(())
}

/// One target's prune, for a human.
fn print_report(policy: &str, t: &str, r: &retention::Report) {
    let would = if r.dry_run { "would " } else { "" };
    println!(
        "VM {} target {t}: retention of policy {policy} as of {}{}",
        r.vm_uuid,
        r.now,
        if r.dry_run { " (dry run)" } else { "" }
    );
    match (&r.window_from_seq, &r.window_from) {
        (Some(s), Some(at)) => println!("  any point from seq {s} ({at}) on"),
        _ => {
            println!("  the whole history is inside the any-point window: nothing to prune");
            return;
        }
    }
    println!("  {} earlier points kept", r.kept_points);
    for p in &r.points {
        println!(
            "    seq {:>8} {}  {}{}",
            p.seq,
            fmt_ns(p.ts_ns),
            p.why.join(", "),
            if p.marks.is_empty() {
                String::new()
            } else {
                format!("  mark {}", p.marks.join(", "))
            }
        );
    }
    println!(
        "  {would}write {} exact baselines ({} new chunks, {})",
        r.synthetic_baselines,
        r.chunks_uploaded,
        human(r.bytes_uploaded)
    );
    println!(
        "  {would}delete {} segments, {} baselines, {} chunks, {} other objects: {} freed",
        r.segments_deleted,
        r.baselines_deleted,
        r.chunks_deleted,
        r.other_deleted,
        human(r.bytes_freed)
    );
    if r.left_for_next_prune > 0 {
        println!(
            "  {} objects left for the next prune (--max-deletions)",
            r.left_for_next_prune
        );
    }
    for (d, s) in &r.unrestorable {
        println!("  disk {d} cannot be rebuilt at seq {s} (nothing kept for it there)");
    }
    if r.deferred_by_lease {
        println!(
            "  {} deletions deferred: in use by {}",
            r.deferred_objects,
            r.leases
                .iter()
                .map(|l| format!("{} (pid {} on {}, {})", l.holder, l.pid, l.host, l.what))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
}
