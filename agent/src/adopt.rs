//! Adoption of one VM: take its shipper lock (never waiting), seal what a
//! dead cdpd left open exactly as cdpd's start-up recovery would, then run
//! shipper passes until nothing sealed is left or a target fails.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cdp_core::catalog::{Catalog, VmRow};
use cdp_core::config::Config;
use cdp_core::control;
use cdp_core::image;
use cdp_core::layout::{RunDir, StateDir};
use cdp_core::session::{self, DiskImage};
use cdp_core::time::now_ns;
use cdp_shipper::lock;

use crate::error::AdoptError;

/// Where things are, for adoption.
#[derive(Debug, Clone)]
pub struct Dirs {
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    /// `/proc/sys/kernel/random/boot_id` (tests give another file).
    pub boot_id_file: PathBuf,
}

/// What recovering a dead cdpd's journal did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Recovered {
    /// How the dead session ended, as recorded in the catalog.
    pub previous_end: &'static str,
    pub sealed_segments: usize,
    pub redone_records: u64,
    pub torn_bytes: u64,
}

/// What adopting one VM did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Adoption {
    pub vm_uuid: String,
    /// Another process (its own shipper) holds the lock: not touched.
    pub busy: bool,
    pub recovered: Option<Recovered>,
    pub passes: u64,
    pub shipped_segments: u64,
    pub shipped_bytes: u64,
    pub baselines: u64,
    /// Segments still waiting for a delayed target.
    pub waiting: u64,
}

impl Adoption {
    /// Did it do anything (for `cdp_agent_adoptions_total`)?
    pub fn did_work(&self) -> bool {
        self.recovered.is_some() || self.shipped_segments > 0 || self.baselines > 0
    }
}

/// Does the VM's cdpd answer on its control socket?
pub fn cdpd_answers(run_dir: &Path, vm_uuid: &str) -> Option<control::Status> {
    let sock = RunDir::new(run_dir).vm(vm_uuid).control_socket();
    control::Client::new(sock)
        .with_timeout(Duration::from_secs(2))
        .status()
        .ok()
}

/// If the VM's last capture session never ended and no cdpd holds its
/// images any more (it was killed), do what the next cdpd start would do
/// to its journal: cut torn tails, redo onto the image, seal, record the
/// sealed segments, and record how the session ended. Every image stays
/// locked (OFD, as cdpd locks it) while this runs, so a live cdpd is never
/// touched: a locked image means it is alive, and nothing is done.
pub fn recover_if_dead(
    cat: &Catalog,
    dirs: &Dirs,
    vm: &VmRow,
) -> Result<Option<Recovered>, AdoptError> {
    let Some(last) = cat.last_session(&vm.uuid)? else {
        return Ok(None);
    };
    if last.end_kind.is_some() || cdpd_answers(&dirs.run_dir, &vm.uuid).is_some() {
        return Ok(None);
    }
    let disks = cat.disks(&vm.uuid)?;
    if disks.is_empty() {
        return Ok(None);
    }
    let uuid =
        cdp_core::names::check_uuid(&vm.uuid).map_err(|e| AdoptError::Ship(e.to_string()))?;
    // All images first: a live cdpd holds every one of them.
    let mut images = Vec::new();
    for (disk, path, _) in &disks {
        match image::open(Path::new(path)) {
            Ok(img) => images.push((disk.clone(), PathBuf::from(path), img)),
            Err(image::ImageError::Locked { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
    // The session may have been ended while we took the locks (a cdpd that
    // started, recovered and stopped in between): look again.
    let Some(last) = cat.last_session(&vm.uuid)? else {
        return Ok(None);
    };
    if last.end_kind.is_some() {
        return Ok(None);
    }
    let disk_images: Vec<DiskImage> = images
        .iter()
        .map(|(disk, path, img)| DiskImage {
            disk,
            path,
            file: &img.file,
        })
        .collect();
    let state = StateDir::new(&dirs.state_dir);
    let rec = session::recover_journals(cat, &state, &uuid, &disk_images)?;
    let boot_id =
        cdp_core::time::boot_id(&dirs.boot_id_file).map_err(|source| AdoptError::BootId {
            path: dirs.boot_id_file.clone(),
            source,
        })?;
    // As cdpd's start: a crash on this boot lost nothing; after a reboot
    // the next cdpd start journals a GAP (it sees this same end kind).
    let prev = rec.previous_end(Some(&last), &boot_id);
    session::end_open_session(cat, Some(&last), prev)?;
    let (last_seq, last_ts) = (rec.last_seq(), rec.last_ts_ns());
    let out = Recovered {
        previous_end: prev.as_str(),
        sealed_segments: rec.sealed_segments(),
        redone_records: rec.redone(),
        torn_bytes: rec.torn_bytes(),
    };
    // What sealing records in a running cdpd (baselines read it as the
    // settled seq of a stopped VM).
    cat.set_last_seq(&vm.uuid, last_seq, last_ts)?;
    drop(disk_images);
    drop(images);
    Ok(Some(out))
}

/// The policy the VM's cdpd ran with ("default" for catalogs that predate
/// the column).
pub fn policy_of(vm: &VmRow) -> &str {
    vm.policy.as_deref().unwrap_or("default")
}

/// Is there anything for the policy's targets: a sealed segment one of them
/// lacks and may have (past the target's delay), or a disk without a
/// baseline on one of them (as the shipper decides it: none newer than the
/// disk's last GAP)?
pub fn needs_shipping(
    cat: &Catalog,
    config: &Config,
    vm: &str,
    targets: &[String],
) -> Result<bool, AdoptError> {
    let now = now_ns();
    for t in targets {
        let delay = config
            .target
            .get(t)
            .and_then(|t| t.delay)
            .unwrap_or_default();
        let cutoff = now.saturating_sub(delay.as_nanos() as u64);
        if cat.unshipped(vm, t)?.iter().any(|s| s.last_ts_ns <= cutoff) {
            return Ok(true);
        }
    }
    let baselines = cat.baselines(vm)?;
    for (disk, path, _) in cat.disks(vm)? {
        if !Path::new(&path).exists() {
            continue;
        }
        let gap = cat.last_gap_seq(vm, &disk)?;
        for t in targets {
            let have = baselines
                .iter()
                .any(|b| b.disk == disk && &b.target == t && gap.is_none_or(|g| b.s0 >= g));
            if !have {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Adopt one VM: see the module documentation. `stop` turns true on SIGTERM:
/// the pass in flight is abandoned (as safe as a kill: uploads are
/// idempotent and recorded only once complete).
pub async fn adopt(
    catalog: &Arc<Mutex<Catalog>>,
    config: &Config,
    dirs: &Dirs,
    vm: &VmRow,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<Adoption, AdoptError> {
    let mut out = Adoption {
        vm_uuid: vm.uuid.clone(),
        ..Default::default()
    };
    let Some(held) = lock::try_lock(&dirs.state_dir, &vm.uuid)? else {
        out.busy = true;
        return Ok(out);
    };
    let policy = policy_of(vm).to_string();
    let targets = config
        .policy
        .get(&policy)
        .map(|p| p.targets.clone())
        .unwrap_or_default();
    let work = tokio::task::block_in_place(|| -> Result<bool, AdoptError> {
        let cat = catalog.lock().unwrap();
        out.recovered = recover_if_dead(&cat, dirs, vm)?;
        if targets.is_empty() {
            return Ok(false);
        }
        needs_shipping(&cat, config, &vm.uuid, &targets)
    })?;
    if targets.is_empty() {
        return Err(AdoptError::NoTargets { policy });
    }
    if !work {
        return Ok(out);
    }
    let opts = cdp_shipper::Options {
        vm_uuid: vm.uuid.clone(),
        state_dir: dirs.state_dir.clone(),
        run_dir: dirs.run_dir.clone(),
        policy: policy.clone(),
        max_parallel: 8,
        // The definition cdp-qemu saved at the VM's start (stored when it
        // changed and the VM's own shipper did not get to it).
        vm_config: Some(StateDir::new(&dirs.state_dir).vm(&vm.uuid).definition())
            .filter(|p| p.exists()),
        poll: Duration::from_millis(100),
        auto_baseline: true,
    };
    let mut shipper = match cdp_shipper::Shipper::new(opts, config).await {
        Ok(s) => s,
        Err(e) => {
            mark_failing_targets(catalog, config, &vm.uuid, &targets).await;
            return Err(AdoptError::Targets {
                policy,
                message: format!("{e:#}"),
            });
        }
    };
    // A running VM goes on writing: one pass (everything sealed by now),
    // then the lock goes back, so that its own shipper, if it comes back,
    // is not kept waiting behind an agent that never finishes. A stopped
    // VM's backlog is finite: pass until it is gone.
    let running = cdpd_answers(&dirs.run_dir, &vm.uuid).is_some();
    loop {
        if *stop.borrow() {
            break;
        }
        let st = tokio::select! {
            r = shipper.pass() => r.map_err(|e| AdoptError::Ship(format!("{e:#}")))?,
            _ = stop.changed() => break,
        };
        out.passes += 1;
        out.shipped_segments += st.shipped;
        out.shipped_bytes += st.shipped_bytes;
        out.baselines += st.baselines;
        out.waiting = st.waiting;
        if st.failed_targets > 0 {
            let failing: Vec<String> = tokio::task::block_in_place(|| {
                catalog
                    .lock()
                    .unwrap()
                    .targets(&vm.uuid)
                    .map(|ts| {
                        ts.into_iter()
                            .filter(|t| t.state != "up" && targets.contains(&t.target))
                            .map(|t| {
                                format!(
                                    "{} ({})",
                                    t.target,
                                    t.last_error.unwrap_or_else(|| "failing".into())
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            });
            return Err(AdoptError::TargetFailing(failing.join("; ")));
        }
        let left = shipper
            .backlog()
            .map_err(|e| AdoptError::Ship(format!("{e:#}")))?;
        // Done, or only segments a delayed target may not have yet.
        if left == 0 || st.shipped == 0 || running {
            break;
        }
    }
    drop(shipper);
    drop(held);
    Ok(out)
}

/// The shipper could not open the policy's targets: find which are
/// unusable and record them as failing in the catalog (metrics and
/// `cdpctl status` read it there).
async fn mark_failing_targets(
    catalog: &Arc<Mutex<Catalog>>,
    config: &Config,
    vm: &str,
    targets: &[String],
) {
    for name in targets {
        let Some(t) = config.target.get(name) else {
            continue;
        };
        let r = match cdp_repo::store::Store::for_target(t) {
            Ok(s) => s.check().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(msg) = r {
            let cat = catalog.lock().unwrap();
            let _ = cat.set_target_state(vm, name, &t.url, "failing", Some(&msg), now_ns());
        }
    }
}
