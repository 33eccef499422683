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
use cdp_shipper::{lock, plan};

use crate::error::AdoptError;

/// Where things are, for adoption.
#[derive(Debug, Clone)]
pub struct Dirs {
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    /// `/proc/sys/kernel/random/boot_id` (tests give another file).
    pub boot_id_file: PathBuf,
    /// The VM's images as root opened them from libvirt's definition (the
    /// hook's `<state>/vms/<uuid>.images`), by disk: recovery writes to
    /// these, never to a path the catalog names. Empty: the VM's user
    /// opens what it can (a VM not started through the hook).
    pub root_images: Arc<RootImages>,
}

/// Disk → (image opened read-write by root, its path for messages).
pub type RootImages = std::collections::BTreeMap<String, (std::fs::File, PathBuf)>;

/// Open a disk's image for recovery: the one root opened, else by the
/// catalog's path as this (unprivileged) process.
fn open_image(
    dirs: &Dirs,
    disk: &str,
    path: &str,
) -> Result<(PathBuf, image::Image), image::ImageError> {
    match dirs.root_images.get(disk) {
        Some((f, p)) => {
            let f = f.try_clone().map_err(|source| image::ImageError::Open {
                path: p.clone(),
                source,
            })?;
            Ok((p.clone(), image::from_file(f, p)?))
        }
        None => Ok((PathBuf::from(path), image::open(Path::new(path))?)),
    }
}

/// What recovering a dead cdpd's journal did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Recovered {
    /// How the dead session ended, as recorded in the catalog.
    pub previous_end: String,
    pub sealed_segments: usize,
    pub redone_records: u64,
    pub torn_bytes: u64,
}

/// A target of the VM's policy that failed while the adoption went on with
/// the others: the adoption is done for them, this one is retried in the
/// background (every scan, and its shipper's per-target backoff) and gets
/// its backlog once it answers (docs/RELIABILITY.md, "A target is down").
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TargetDown {
    pub target: String,
    pub error: String,
    /// Retrying may succeed with nothing changed (unreachable, a server error).
    pub transient: bool,
}

/// What adopting one VM did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// Targets that failed while the others shipped (empty: all shipped).
    #[serde(default)]
    pub targets_down: Vec<TargetDown>,
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
    let uuid = cdp_core::names::check_uuid(&vm.uuid)?;
    // All images first: a live cdpd holds every one of them.
    let mut images = Vec::new();
    for (disk, path, _) in &disks {
        match open_image(dirs, disk, path) {
            Ok((p, img)) => images.push((disk.clone(), p, img)),
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
    let boot_id =
        cdp_core::time::boot_id(&dirs.boot_id_file).map_err(|source| AdoptError::BootId {
            path: dirs.boot_id_file.clone(),
            source,
        })?;
    let rec = session::recover_journals(cat, &state, &uuid, &disk_images, &boot_id)?;
    // As cdpd's start: a crash on this boot lost nothing; after a reboot
    // the next cdpd start journals a GAP (it sees this same end kind).
    let prev = rec.previous_end(Some(&last), &boot_id);
    session::end_open_session(cat, Some(&last), prev)?;
    let (last_seq, last_ts) = (rec.last_seq(), rec.last_ts_ns());
    let out = Recovered {
        previous_end: prev.as_str().to_string(),
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

/// The targets of the VM's policy (none when the config has no such policy).
pub fn targets_of<'a>(config: &'a Config, vm: &VmRow) -> &'a [String] {
    config
        .policy
        .get(policy_of(vm))
        .map_or(&[], |p| p.targets.as_slice())
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
    // Under `cascade`, a secondary may have only what the primary holds
    // (or what waited cascade_wait for it): the shipper's rule, plan::due.
    let policy = cat
        .vms()?
        .into_iter()
        .find(|r| r.uuid == vm)
        .and_then(|r| config.policy.get(policy_of(&r)).cloned());
    let (cascade_wait, primary) = match policy.filter(|p| p.cascade) {
        Some(p) => (
            Some(
                p.cascade_wait
                    .unwrap_or(cdp_core::config::DEFAULT_CASCADE_WAIT),
            ),
            p.targets.first().cloned(),
        ),
        None => (None, None),
    };
    let primary_lacks: std::collections::HashSet<(String, u64)> = match &primary {
        Some(p) => cat
            .unshipped(vm, p)?
            .into_iter()
            .map(|s| (s.disk, s.first_seq))
            .collect(),
        None => Default::default(),
    };
    for t in targets {
        let delay = cdp_shipper::target_delay(config, t)?;
        let secondary = primary.as_ref().is_some_and(|p| p != t);
        let due = cat.unshipped(vm, t)?.iter().any(|s| {
            let c = cascade_wait
                .filter(|_| secondary)
                .map(|wait| plan::Cascade {
                    primary_has: !primary_lacks.contains(&(s.disk.clone(), s.first_seq)),
                    wait,
                });
            plan::due(s.last_ts_ns, delay, now, c).ships()
        });
        if due {
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

/// The order and the width of a scan: the VMs to adopt, the most behind
/// first, and how many at once ([`plan::adoption_parallelism`], sized to
/// the host's total backlog: several lagging VMs ship side by side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanPlan {
    pub vms: Vec<String>,
    pub parallel: usize,
}

/// A VM's backlog for the plan: (segments, bytes) summed over its disks,
/// each disk counted by the target that lacks the most of it.
pub fn vm_backlog(snap: &crate::metrics::VmSnapshot) -> (u64, u64) {
    snap.disks.iter().fold((0, 0), |(n, b), d| {
        let (dn, db) = d
            .backlog
            .values()
            .fold((0, 0), |(x, y), &(n, b)| (x.max(n), y.max(b)));
        (n + dn, b + db)
    })
}

/// Plan a scan of `vms`, given each one's backlog (`None`: unknown, adopted
/// after the known ones, as if it had none).
pub fn plan_scan(vms: Vec<(String, Option<(u64, u64)>)>, max: usize) -> ScanPlan {
    let mut vms = vms;
    // Stable: equal backlogs keep the listing's order.
    vms.sort_by_key(|(_, b)| std::cmp::Reverse(b.unwrap_or((0, 0))));
    let lagging = vms
        .iter()
        .filter(|(_, b)| b.is_some_and(|b| b.0 > 0))
        .count();
    let (segments, bytes) = vms
        .iter()
        .filter_map(|(_, b)| *b)
        .fold((0, 0), |(n, b), (dn, db)| (n + dn, b + db));
    ScanPlan {
        parallel: plan::adoption_parallelism(lagging, segments, bytes, max),
        vms: vms.into_iter().map(|(u, _)| u).collect(),
    }
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
    let targets = targets_of(config, vm).to_vec();
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
        images: dirs.root_images.clone(),
    };
    let mut shipper = match cdp_shipper::Shipper::new(opts, config).await {
        Ok(s) => s,
        Err(source) => {
            mark_failing_targets(catalog, config, &vm.uuid, &targets).await;
            return Err(AdoptError::Targets { policy, source });
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
            r = shipper.pass() => r?,
            _ = stop.changed() => break,
        };
        out.passes += 1;
        out.shipped_segments += st.shipped;
        out.shipped_bytes += st.shipped_bytes;
        out.baselines += st.baselines;
        out.waiting = st.waiting;
        let left = shipper.backlog()?;
        // Done, or only segments a delayed target may not have yet.
        if left == 0 || st.shipped == 0 || running {
            break;
        }
    }
    // Per target: one down does not fail the adoption for the others; only
    // every target of the policy failing does.
    let failures = shipper.take_failures();
    if !failures.is_empty() && failures.len() >= targets.len() {
        return Err(AdoptError::TargetFailing(failures));
    }
    out.targets_down = failures
        .into_iter()
        .map(|f| TargetDown {
            transient: f.error.is_transient(),
            error: f.error.to_string(),
            target: f.target,
        })
        .collect();
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

#[cfg(test)]
mod tests {
    use super::*;
    use cdp_core::catalog::{BaselineRow, Shipment};
    use cdp_core::journal::writer::SealedSegment;

    const VM: &str = "0b5c6a3e-1d2f-4a5b-8c9d-0e1f2a3b4c5d";
    const HOUR: u64 = 3600 * 1_000_000_000;

    fn config() -> Config {
        let c = Config::parse(
            r#"
[target.now]
url = "file:///srv/now"
[target.later]
url = "file:///srv/later"
delay = "1h"
[policy.default]
targets = ["now", "later"]
"#,
        )
        .unwrap();
        c.validate().unwrap();
        c
    }

    /// A catalog with the VM and one disk whose image is `image`.
    fn catalog(dir: &Path, image: &Path) -> Catalog {
        let cat = Catalog::open(dir, VM).unwrap();
        cat.upsert_vm(VM, "web").unwrap();
        cat.upsert_disk(VM, "vda", image, 1 << 20).unwrap();
        cat
    }

    fn seal(cat: &Catalog, first_seq: u64, last_ts_ns: u64) {
        let s = SealedSegment {
            path: format!("/nonexistent/{first_seq}.seg").into(),
            first_seq,
            last_seq: first_seq + 9,
            first_ts_ns: last_ts_ns - 1,
            last_ts_ns,
            records: 10,
            record_base: first_seq,
            size_bytes: 4096,
        };
        cat.put_segment(VM, "vda", &s, true).unwrap();
    }

    fn baseline(cat: &Catalog, target: &str, s0: u64) {
        cat.add_baseline(
            VM,
            &BaselineRow {
                disk: "vda".into(),
                target: target.into(),
                s0,
                s1: s0 + 1,
                key: format!("b/{target}/{s0}"),
                created_ns: 1,
                chunks_total: 1,
                chunks_uploaded: 1,
            },
        )
        .unwrap();
    }

    fn ship(cat: &Catalog, target: &str, first_seq: u64) {
        cat.record_shipment(
            VM,
            &Shipment {
                disk: "vda",
                first_seq,
                target,
                key: "k",
                object_bytes: 1,
                shipped_ns: 1,
            },
        )
        .unwrap();
    }

    fn targets(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_fresh_segment_is_due_to_an_undelayed_target_only() {
        let dir = tempfile::tempdir().unwrap();
        // No image on this host: baselines are not a reason to ship.
        let cat = catalog(dir.path(), &dir.path().join("gone.img"));
        let c = config();
        assert!(!needs_shipping(&cat, &c, VM, &targets(&["now", "later"])).unwrap());
        seal(&cat, 1, now_ns());
        assert!(needs_shipping(&cat, &c, VM, &targets(&["now"])).unwrap());
        // Newer than the delay: not yet for the delayed target.
        assert!(!needs_shipping(&cat, &c, VM, &targets(&["later"])).unwrap());
        // Shipped where it may go: nothing left to do.
        ship(&cat, "now", 1);
        assert!(!needs_shipping(&cat, &c, VM, &targets(&["now", "later"])).unwrap());
    }

    #[test]
    fn a_segment_older_than_the_delay_is_due_to_the_delayed_target() {
        let dir = tempfile::tempdir().unwrap();
        let cat = catalog(dir.path(), &dir.path().join("gone.img"));
        seal(&cat, 1, now_ns() - 2 * HOUR);
        assert!(needs_shipping(&cat, &config(), VM, &targets(&["later"])).unwrap());
    }

    #[test]
    fn a_disk_needs_a_baseline_newer_than_its_last_gap_on_every_target() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("vda.img");
        std::fs::write(&image, b"x").unwrap();
        let cat = catalog(dir.path(), &image);
        let c = config();
        let both = targets(&["now", "later"]);
        assert!(needs_shipping(&cat, &c, VM, &both).unwrap());
        baseline(&cat, "now", 5);
        assert!(
            needs_shipping(&cat, &c, VM, &both).unwrap(),
            "later has none"
        );
        baseline(&cat, "later", 5);
        assert!(!needs_shipping(&cat, &c, VM, &both).unwrap());
        // A GAP after the baselines' s0: they no longer count.
        cat.add_gap(VM, "vda", 7, 1, "reboot").unwrap();
        assert!(needs_shipping(&cat, &c, VM, &both).unwrap());
        baseline(&cat, "now", 7);
        baseline(&cat, "later", 8);
        assert!(!needs_shipping(&cat, &c, VM, &both).unwrap());
    }

    #[test]
    fn an_unknown_target_is_an_error_not_a_zero_delay() {
        let dir = tempfile::tempdir().unwrap();
        let cat = catalog(dir.path(), &dir.path().join("gone.img"));
        seal(&cat, 1, now_ns());
        let e = needs_shipping(&cat, &config(), VM, &targets(&["nowhere"])).unwrap_err();
        assert_eq!(e.kind(), "config", "{e}");
        assert!(e.to_string().contains("nowhere"), "{e}");
    }

    #[test]
    fn the_policy_defaults_for_old_catalogs_and_names_the_targets() {
        let dir = tempfile::tempdir().unwrap();
        let cat = catalog(dir.path(), &dir.path().join("gone.img"));
        let vm = cat.vms().unwrap().remove(0);
        // Whatever the schema gives a VM cdpd never named a policy for,
        // it ships by "default".
        let mut old = vm.clone();
        old.policy = None;
        assert_eq!(policy_of(&old), "default");
        let c = config();
        assert_eq!(targets_of(&c, &old), ["now", "later"]);
        cat.set_vm_policy(VM, "gold").unwrap();
        let vm = cat.vms().unwrap().remove(0);
        assert_eq!(policy_of(&vm), "gold");
        // A policy the config lacks has no targets (adopt reports it).
        assert!(targets_of(&c, &vm).is_empty());
    }

    #[test]
    fn did_work_counts_recovery_shipping_and_baselines_only() {
        let mut a = Adoption {
            vm_uuid: VM.into(),
            passes: 3,
            waiting: 2,
            ..Default::default()
        };
        assert!(!a.did_work());
        a.baselines = 1;
        assert!(a.did_work());
        let b = Adoption {
            recovered: Some(Recovered {
                previous_end: "crash".into(),
                sealed_segments: 0,
                redone_records: 0,
                torn_bytes: 0,
            }),
            ..Default::default()
        };
        assert!(b.did_work());
    }

    #[test]
    fn a_scan_adopts_the_most_behind_first_and_several_at_once() {
        let vm = |u: &str, b: Option<(u64, u64)>| (u.to_string(), b);
        let p = plan_scan(vec![vm("a", Some((0, 0))), vm("b", Some((2, 10)))], 4);
        assert_eq!(p.vms, ["b", "a"]);
        assert_eq!(p.parallel, 1, "one small backlog: one at a time");
        let p = plan_scan(
            vec![
                vm("a", Some((10, 1 << 20))),
                vm("u", None),
                vm("b", Some((30, 1 << 20))),
                vm("c", Some((20, 1 << 20))),
                vm("d", Some((0, 0))),
            ],
            4,
        );
        assert_eq!(p.vms, ["b", "c", "a", "u", "d"]);
        assert_eq!(p.parallel, 3, "60 segments over 3 lagging VMs");
        let many = (0..10)
            .map(|i| vm(&i.to_string(), Some((100, 1 << 30))))
            .collect();
        assert_eq!(plan_scan(many, 4).parallel, 4, "bounded");
    }

    #[test]
    fn under_cascade_a_secondary_waits_for_the_primary() {
        let dir = tempfile::tempdir().unwrap();
        let cat = catalog(dir.path(), &dir.path().join("gone.img"));
        let c = Config::parse(
            r#"
[target.p]
url = "file:///srv/p"
[target.s]
url = "file:///srv/s"
[policy.default]
targets = ["p", "s"]
cascade = true
cascade_wait = "1h"
"#,
        )
        .unwrap();
        seal(&cat, 1, now_ns());
        let s = targets(&["s"]);
        assert!(!needs_shipping(&cat, &c, VM, &s).unwrap(), "p lacks it");
        assert!(needs_shipping(&cat, &c, VM, &targets(&["p"])).unwrap());
        ship(&cat, "p", 1);
        assert!(
            needs_shipping(&cat, &c, VM, &s).unwrap(),
            "s may have it now"
        );
        // Past cascade_wait, s may have it without p.
        seal(&cat, 11, now_ns() - 2 * HOUR);
        ship(&cat, "s", 1);
        assert!(needs_shipping(&cat, &c, VM, &s).unwrap(), "waited 2h > 1h");
    }

    #[test]
    fn a_vm_without_an_open_session_is_not_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let cat = catalog(dir.path(), &dir.path().join("gone.img"));
        let vm = cat.vms().unwrap().remove(0);
        let dirs = Dirs {
            state_dir: dir.path().into(),
            run_dir: dir.path().join("run"),
            boot_id_file: dir.path().join("boot_id"),
            root_images: Default::default(),
        };
        assert_eq!(recover_if_dead(&cat, &dirs, &vm).unwrap(), None);
    }
}
