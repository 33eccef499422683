//! A full baseline before the first protected boot (issue 14): `cdpctl
//! baseline` on a VM cdpd has never served creates its state as the libvirt
//! hook and cdpd would (`<state>/vms/<uuid>` for QEMU's user, 0700; a
//! catalog with a fresh history), opens the root-owned image as root and
//! takes an exact offline baseline (s0 = s1 = the history's base) as the
//! VM's user. cdpd's first start then continues that history (no "new
//! history" GAP) and the first boot is restorable from its first write.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;

use cdp_core::catalog::{Catalog, CatalogError};
use cdp_core::layout::StateDir;
use cdp_core::privsep::VmIdentity;
use cdp_tests::fixture::{cdpctl, config, phase, qemu_io, restore_from_repo_ok, shipper_once_cmd};
use cdp_tests::{assert_files_equal, copy_sparse, first_difference, run_ok, Daemon};

const MIB: u64 = 1 << 20;

/// QEMU's user (the configured default, `libvirt-qemu`).
fn qemu_user() -> (u32, u32) {
    let u = nix::unistd::User::from_name(cdp_core::config::DEFAULT_QEMU_USER)
        .unwrap()
        .expect("this test needs the user libvirt-qemu (QEMU's default user)");
    (u.uid.as_raw(), u.gid.as_raw())
}

/// `f` on the VM's catalog, as the VM's user (root may not open it).
fn with_catalog(
    d: &Daemon,
    f: impl FnOnce(&Catalog, &str) -> Result<serde_json::Value, CatalogError>,
) -> serde_json::Value {
    let state = StateDir::new(&d.state_dir);
    let id = VmIdentity::of(&state, &d.vm_uuid).unwrap();
    id.run(&d.state_dir, || {
        let c = Catalog::open(&d.state_dir, &d.vm_uuid).map_err(|e| e.to_string())?;
        f(&c, &d.vm_uuid).map_err(|e| e.to_string())
    })
    .unwrap()
}

#[test]
fn first_boot_is_restorable_from_its_first_write() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "cdpctl baseline opens a root-owned image as root and works as QEMU's user: run as root"
    );
    let (uid, gid) = qemu_user();
    let mut d = Daemon::builder()
        .disk_random("vda", 8 * MIB, 14)
        .as_user(uid, gid)
        .args(["--segment-age", "30ms"])
        .prepare();
    // Before its first start the VM has no state, and its image is root's
    // (libvirt's DAC driver gives it to QEMU's user only at start); the
    // hook wrote `<uuid>.images` when protect's definition was first seen.
    let vm_state = d.state_dir.join("vms").join(&d.vm_uuid);
    fs::remove_dir(&vm_state).unwrap();
    let image = d.image("vda");
    std::os::unix::fs::chown(&image, Some(0), Some(0)).unwrap();
    fs::set_permissions(&image, fs::Permissions::from_mode(0o600)).unwrap();
    let images = d
        .state_dir
        .join("vms")
        .join(format!("{}.images", d.vm_uuid));
    fs::write(
        &images,
        serde_json::json!({ "vda": image.display().to_string() }).to_string(),
    )
    .unwrap();
    let repo = d.work_dir().join("repo");
    let cfg = config(&d, &repo);

    let out: serde_json::Value =
        serde_json::from_str(&cdpctl(&d, &cfg, &["--json", "baseline", &d.vm_uuid])).unwrap();
    let b = &out[0]["baseline"];
    let (s0, s1) = (b["s0"].as_u64().unwrap(), b["s1"].as_u64().unwrap());
    assert_eq!(s0, s1, "an offline baseline is exact: {out}");
    let md = fs::metadata(&vm_state).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o7777),
        (uid, gid, 0o700),
        "the VM's state directory is QEMU's user's, 0700"
    );
    assert_eq!(
        fs::metadata(&image).unwrap().uid(),
        0,
        "the image stays root's"
    );
    let cat = with_catalog(&d, |c, vm| {
        Ok(serde_json::json!({"last_seq": c.last_seq(vm)?.0, "disks": c.disks(vm)?}))
    });
    assert_eq!(cat["last_seq"], s1, "{cat}");
    assert_eq!(
        cat["disks"],
        serde_json::json!([["vda", image.display().to_string(), 8 * MIB]]),
        "the disk and its size are recorded"
    );

    // The first protected boot: libvirt gives the image to QEMU's user.
    std::os::unix::fs::chown(&image, Some(uid), Some(gid)).unwrap();
    d.start();
    let first_write = format!("write -P 0x5a {} 65536", 3 * MIB);
    qemu_io(&d, "vda", std::slice::from_ref(&first_write));
    let m: serde_json::Value =
        serde_json::from_str(&cdpctl(&d, &cfg, &["mark", &d.vm_uuid, "first", "--json"])).unwrap();
    let reference = d.work_dir().join("first.img");
    copy_sparse(&image, &reference);
    assert!(
        first_difference(&reference, &d.disk("vda").initial).is_some(),
        "the first write reached the image"
    );
    qemu_io(&d, "vda", &phase(1));
    d.term();
    run_ok(shipper_once_cmd(&d, &cfg).uid(uid).gid(gid));

    let cat = with_catalog(&d, |c, vm| {
        let first = c.segments(vm)?.iter().map(|s| s.first_seq).min();
        Ok(serde_json::json!({"gaps": c.gaps_after(vm, 0)?, "first_seg": first}))
    });
    let (gaps, first_seg) = (&cat["gaps"], cat["first_seg"].as_u64());
    assert!(
        !gaps.to_string().contains("new history"),
        "cdpd continued the baseline's history: {gaps}"
    );
    assert_eq!(
        first_seg,
        Some(s1 + 1),
        "the first record follows the baseline's seq"
    );
    assert!(m["seq"].as_u64().unwrap() > s1, "{m}");

    // The timeline starts at the baseline's point, named by the time the
    // baseline was taken (before every record: no record has its time).
    let pts: serde_json::Value = serde_json::from_str(&cdpctl(
        &d,
        &cfg,
        &["points", &d.vm_uuid, "--json", "--no-local"],
    ))
    .unwrap();
    let disk = &pts["disks"][0];
    let range = &disk["restorable"][0];
    assert_eq!(range["from_seq"].as_u64(), Some(s1), "{pts}");
    assert_eq!(
        range["from_ns"], disk["baselines"][0]["time_ns"],
        "the first point's time is the offline baseline's: {pts}"
    );
    assert_ne!(range["from_ns"].as_u64(), Some(0), "{pts}");

    let restored = d.work_dir().join("restored-first.img");
    restore_from_repo_ok(&d, &cfg, &repo, "vda", "mark:first", &restored);
    assert_files_equal(&restored, &reference);
}
