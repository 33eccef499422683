//! `cdpctl baseline VM [--disk D]`: a full, sparse-aware, content-addressed
//! baseline of each disk into every target of the policy (the target with the
//! most free space first). Online (the VM runs: fuzzy, no pause) or offline.

use std::sync::{Arc, Mutex};

use anyhow::{bail, Result};
use cdp_core::catalog::Catalog;

use crate::Ctx;

#[derive(clap::Args)]
pub struct BaselineArgs {
    /// VM name or UUID.
    pub vm: String,
    /// Only this disk.
    #[arg(long)]
    pub disk: Option<String>,
    /// Policy whose targets receive the baseline.
    #[arg(long, default_value = "default")]
    pub policy: String,
}

pub fn run(ctx: &Ctx, a: &BaselineArgs) -> Result<()> {
    let vm = ctx.resolve_vm(&a.vm)?;
    // A baseline is work on the VM's state: it runs as the VM's user
    // (docs/DESIGN.md, "Trust boundaries"), reading the images that user
    // can read and nothing else.
    ctx.enter_vm(&vm)?;
    let catalog = Arc::new(Mutex::new(Catalog::open(&ctx.state_dir, &vm)?));
    let disks = catalog.lock().unwrap().disks(&vm)?;
    let disks: Vec<_> = disks
        .into_iter()
        .filter(|(d, _, _)| a.disk.as_ref().is_none_or(|x| x == d))
        .collect();
    if disks.is_empty() {
        bail!(
            "VM {vm} has no disk{} in the catalog: cdpd records disks when it first serves them",
            a.disk.as_ref().map(|d| format!(" {d}")).unwrap_or_default()
        );
    }
    let rt = tokio::runtime::Runtime::new()?;
    let results = rt.block_on(async {
        let mut targets = cdp_shipper::open_targets(&ctx.config, &a.policy).await?;
        targets.sort_by_key(|t| std::cmp::Reverse(t.store.free_space().unwrap_or(0)));
        let retry = cdp_repo::store::RetryPolicy::default();
        let mut out = Vec::new();
        for (disk, path, _) in &disks {
            for t in &targets {
                let r = cdp_shipper::baseline::take(&cdp_shipper::baseline::BaselineJob {
                    store: &t.store,
                    target: &t.name,
                    retry: &retry,
                    catalog: &catalog,
                    run_dir: &ctx.run_dir,
                    vm: &vm,
                    disk,
                    image: std::path::Path::new(path),
                    opened: None,
                })
                .await?;
                out.push((disk.clone(), t.name.clone(), r));
            }
        }
        anyhow::Ok(out)
    })?;
    if ctx.json {
        let v: Vec<_> = results
            .iter()
            .map(|(d, t, r)| serde_json::json!({"disk": d, "target": t, "baseline": r}))
            .collect();
        return crate::print_json(&v);
    }
    for (d, t, r) in results {
        println!(
            "{d} → {t}: {} chunks ({} with data, {} uploaded, {}), consistent from seq {} (scan began after seq {})",
            r.chunks_total,
            r.chunks_data,
            r.chunks_uploaded,
            crate::status::human(r.bytes_uploaded),
            r.s1,
            r.s0
        );
    }
    Ok(())
}
