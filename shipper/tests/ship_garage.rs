//! The whole chain against a real S3-compatible server: a single-node Garage
//! on loopback (repo/tests/common/mod.rs, `GarageServer`), the only target of
//! the policy. Shipping (cdp-shipper and cdp-agent), then with the host's
//! state gone: restore at each mark byte-exact, restore-config, export over
//! NBD, verify --deep, prune with its own key, and restore after the prune.
//!
//! Garage 2.5 ignores `If-None-Match: *`, so the target URL says
//! `conditional_put=check-first` (docs/CREDENTIALS.md, "Servers without
//! conditional writes"); without it the shipper stops with a clear error
//! (`a_garage_target_without_check_first_stops_the_shipper_clearly`).

#[path = "../../repo/tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cdp_tests::fixture::{cdpctl, cdpctl_out, phase, qemu_io, shipper_once_cmd};
use cdp_tests::{assert_files_equal, bin, qemu_img_compare, run, run_ok, wait_child, Daemon};
use common::GarageServer;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const BUCKET: &str = "cdp";

const DOMAIN: &str = r#"<domain type='kvm'>
  <name>web</name>
  <memory unit='MiB'>1024</memory>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='/var/lib/libvirt/images/web.img'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
"#;

/// The target URL: Garage needs `conditional_put=check-first`.
fn target_url(g: &GarageServer, prefix: &str) -> String {
    format!("{}&conditional_put=check-first", g.url(BUCKET, prefix))
}

/// A config whose one target is Garage: shipping with the test's key,
/// pruning with a key of its own (owner-only file), retention `any_point`.
fn garage_config(d: &Daemon, g: &GarageServer, url: &str, any_point: &str) -> PathBuf {
    let ship = d.work_dir().join("ship.cred");
    std::fs::copy(g.credentials(), &ship).unwrap();
    let prune = d.work_dir().join("prune.cred");
    std::fs::copy(g.add_key(BUCKET, &["--read", "--write"]), &prune).unwrap();
    std::fs::set_permissions(&prune, std::fs::Permissions::from_mode(0o600)).unwrap();
    let p = d.work_dir().join("cdp.toml");
    std::fs::write(
        &p,
        format!(
            "[target.garage]\nurl = \"{url}\"\ncredentials_file = \"{}\"\n\
             prune_credentials_file = \"{}\"\n\
             [policy.default]\ntargets = [\"garage\"]\n\
             [policy.default.retention]\nany_point = \"{any_point}\"\n\
             [agent]\nmetrics_listen = \"\"\n",
            ship.display(),
            prune.display()
        ),
    )
    .unwrap();
    p
}

struct Snap {
    mark: String,
    seq: u64,
    copy: PathBuf,
}

fn snapshot(d: &Daemon, cfg: &Path, i: u64) -> Snap {
    let mark = format!("phase-{i}");
    cdpctl(d, cfg, &["mark", &d.vm_uuid, &mark]);
    let seq = d.status_json()["last_seq"].as_u64().unwrap();
    let copy = d.work_dir().join(format!("ref-{i}.img"));
    std::fs::copy(d.image("vda"), &copy).unwrap();
    Snap { mark, seq, copy }
}

fn restore(d: &Daemon, cfg: &Path, at: &str, out: &Path) {
    let _ = std::fs::remove_file(out);
    cdpctl(
        d,
        cfg,
        &[
            "restore",
            &d.vm_uuid,
            "--disk",
            "vda",
            "--at",
            at,
            "--output",
            out.to_str().unwrap(),
        ],
    );
}

/// `cdpctl export` of `at` on a socket; waits for READY; compares the export
/// with `want` through qemu-img; stops it with SIGTERM.
fn export_equals(d: &Daemon, cfg: &Path, at: &str, want: &Path) {
    let socket = d.work_dir().join("export.sock");
    let log = d.work_dir().join("export.log");
    let mut child = Command::new(bin("cdpctl"))
        .args(["export", &d.vm_uuid, "--disk", "vda", "--at", at])
        .arg("--socket")
        .arg(&socket)
        .args(["--ready-fd", "1"])
        .arg("--state-dir")
        .arg(&d.state_dir)
        .arg("--run-dir")
        .arg(&d.run_dir)
        .arg("--config")
        .arg(cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let ready = rx.recv_timeout(Duration::from_secs(60));
    if !matches!(&ready, Ok(l) if l.trim_end() == "READY") {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "cdpctl export did not say READY ({ready:?}):\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    let uri = format!("nbd+unix:///vda?socket={}", socket.display());
    qemu_img_compare(want.as_os_str(), uri.as_ref());
    run_ok(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    let st = wait_child(child, Duration::from_secs(30)).expect("cdpctl export did not stop");
    assert!(
        st.success(),
        "cdpctl export: {st}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// Every object of the VM under the target (a root-level store of the bucket).
fn vm_objects(g: &GarageServer, prefix: &str, vm: &str) -> Vec<String> {
    let url = target_url(g, prefix);
    let s = cdp_repo::store::Store::open(&url, Some(&g.credentials())).unwrap();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(s.list(&format!("cdp/v1/vms/{vm}/")))
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect()
}

#[test]
fn ship_restore_export_verify_and_prune_against_garage() {
    let started = Instant::now();
    let g = GarageServer::start(&[BUCKET]);
    let garage_up = started.elapsed();
    let mut d = Daemon::builder()
        .disk_random("vda", 8 * MIB, 51)
        .args(["--segment-age", "30ms"])
        .start();
    let url = target_url(&g, "host1");
    let cfg = garage_config(&d, &g, &url, "1s");
    // The baseline goes to Garage directly (cdpctl, the shipping key).
    cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);
    let mut snaps = Vec::new();
    for i in 0..3 {
        qemu_io(&d, "vda", &phase(i));
        snaps.push(snapshot(&d, &cfg, i));
        std::thread::sleep(Duration::from_millis(5));
    }
    d.term();
    let stopped = Instant::now();
    let xml = d.work_dir().join("domain.xml");
    std::fs::write(&xml, DOMAIN).unwrap();
    run_ok(
        shipper_once_cmd(&d, &cfg)
            .arg("--vm-config")
            .arg(&xml)
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY"),
    );
    let shipped = vm_objects(&g, "host1", &d.vm_uuid);
    assert!(
        shipped.iter().any(|k| k.contains("/vda/journal/")),
        "{shipped:?}"
    );
    let image = d.work_dir().join("final.img");
    std::fs::copy(d.image("vda"), &image).unwrap();

    // The host's state is gone: only Garage is left.
    std::fs::remove_dir_all(&d.state_dir).unwrap();
    std::fs::create_dir_all(&d.state_dir).unwrap();

    // Restore at each mark, and latest.
    for (i, s) in snaps.iter().enumerate() {
        for at in [format!("mark:{}", s.mark), format!("seq:{}", s.seq)] {
            let out = d.work_dir().join(format!("restored-{i}.img"));
            restore(&d, &cfg, &at, &out);
            assert_files_equal(&out, &s.copy);
        }
    }
    let out = d.work_dir().join("restored-latest.img");
    restore(&d, &cfg, "latest", &out);
    assert_files_equal(&out, &image);

    // The VM definition stored with the last shipment.
    let def = d.work_dir().join("domain-restored.xml");
    cdpctl(
        &d,
        &cfg,
        &[
            "restore-config",
            &d.vm_uuid,
            "--at",
            "latest",
            "--output",
            def.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::read_to_string(&def).unwrap(), DOMAIN);

    // An instant export of a mark, read over NBD.
    export_equals(&d, &cfg, &format!("mark:{}", snaps[1].mark), &snaps[1].copy);

    // verify --deep reads every object back.
    let o = cdpctl_out(&d, &cfg, &["verify", &d.vm_uuid, "--deep", "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "verify --json: {e}: {}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    assert!(o.status.success(), "{v}");
    assert_eq!(v["ok"], true, "{v}");

    // Prune, with the prune key, once every write is older than the 1 s window.
    if let Some(rest) = Duration::from_millis(1500).checked_sub(stopped.elapsed()) {
        std::thread::sleep(rest);
    }
    let p: Value = serde_json::from_str(&cdpctl(&d, &cfg, &["prune", &d.vm_uuid, "--json"]))
        .expect("prune --json");
    let t = &p["targets"][0];
    assert!(
        t["synthetic_baselines"].as_u64().unwrap() + t["segments_deleted"].as_u64().unwrap() > 0,
        "{p}"
    );
    let after = vm_objects(&g, "host1", &d.vm_uuid);
    assert!(
        after.iter().filter(|k| k.contains("/journal/")).count()
            < shipped.iter().filter(|k| k.contains("/journal/")).count(),
        "prune deleted no segment: {p}"
    );
    // What is left still restores the newest point, and verifies.
    restore(&d, &cfg, "latest", &out);
    assert_files_equal(&out, &image);
    let o = cdpctl_out(&d, &cfg, &["verify", &d.vm_uuid, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    eprintln!(
        "garage started in {garage_up:?}; the whole test took {:?}",
        started.elapsed()
    );
}

/// cdp-agent adopts a stopped VM (nothing shipped it) and a killed one,
/// ships both journals to Garage; each restores byte-exact from Garage alone.
#[test]
fn the_agent_ships_to_garage_and_the_disk_restores() {
    let g = GarageServer::start(&[BUCKET]);
    for (n, kill) in [(0u64, false), (1, true)] {
        let mut d = Daemon::builder()
            .disk_random("vda", 8 * MIB, 60 + n)
            .args(["--segment-age", if kill { "1h" } else { "20ms" }])
            .start();
        let url = target_url(&g, &format!("agent{n}"));
        let cfg = garage_config(&d, &g, &url, "30d");
        cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);
        for i in 0..3 {
            qemu_io(&d, "vda", &phase(i + n));
        }
        if kill {
            d.kill9();
        } else {
            d.term();
        }
        let out = run(Command::new(bin("cdp-agent"))
            .args(["run", "--once"])
            .arg("--config")
            .arg(&cfg)
            .arg("--state-dir")
            .arg(&d.state_dir)
            .arg("--run-dir")
            .arg(&d.run_dir)
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY"));
        assert!(
            out.status.success(),
            "cdp-agent --once: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        let a = report["adopted"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["vm_uuid"] == d.vm_uuid.as_str())
            .unwrap_or_else(|| panic!("not adopted: {report}"));
        assert!(a["shipped_segments"].as_u64().unwrap() > 0, "{a}");
        if kill {
            assert_eq!(a["recovered"]["previous_end"], "crash", "{a}");
        }
        let image = d.work_dir().join("final.img");
        std::fs::copy(d.image("vda"), &image).unwrap();
        std::fs::remove_dir_all(&d.state_dir).unwrap();
        std::fs::create_dir_all(&d.state_dir).unwrap();
        let out = d.work_dir().join("restored.img");
        restore(&d, &cfg, "latest", &out);
        assert_files_equal(&out, &image);
    }
}

/// Without `conditional_put=check-first`, a Garage target makes the shipper
/// stop with the configuration error (it would otherwise replace objects).
#[test]
fn a_garage_target_without_check_first_stops_the_shipper_clearly() {
    let g = GarageServer::start(&[BUCKET]);
    let mut d = Daemon::with_disk(MIB);
    qemu_io(
        &d,
        "vda",
        &["write -P 7 0 64k".to_string(), "flush".to_string()],
    );
    d.term();
    let cfg = garage_config(&d, &g, &g.url(BUCKET, "plain"), "30d");
    let out = run(shipper_once_cmd(&d, &cfg)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("ignores If-None-Match"), "{err}");
    assert!(err.contains("conditional_put=check-first"), "{err}");
    assert!(vm_objects(&g, "plain", &d.vm_uuid).is_empty());
}
