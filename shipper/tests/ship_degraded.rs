//! No baseline is taken of a disk whose journal is full (degraded mode):
//! writes then reach the image without a record, so no seq would make the
//! baseline exact (issue 12). Once the journal takes writes again, the
//! baseline is taken and restores exactly.

use std::path::Path;
use std::time::{Duration, Instant};

use cdp_tests::fixture::{assert_repo_restores_image, config, qemu_io, shipper_once_cmd};
use cdp_tests::{run, Daemon};

const MIB: u64 = 1 << 20;

fn ship(d: &Daemon, cfg: &Path) -> (serde_json::Value, String) {
    let out = run(&mut shipper_once_cmd(d, cfg));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let pass = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "cdp-shipper printed no pass ({e}): {}\n{err}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (pass, err)
}

fn journal_mode(d: &Daemon) -> String {
    let s = d.status_json();
    s["disks"]
        .as_array()
        .and_then(|v| v.iter().find(|x| x["disk"] == "vda"))
        .and_then(|x| x["journal_mode"].as_str())
        .unwrap_or_else(|| panic!("no journal_mode for vda: {s:#}"))
        .to_string()
}

/// Poll cdpd's status until the disk's journal is in `mode`.
fn wait_for_mode(d: &Daemon, mode: &str) {
    let t0 = Instant::now();
    while journal_mode(d) != mode {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "vda's journal never became {mode}: {:#}",
            d.status_json()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn no_baseline_of_a_degraded_disk_and_one_once_it_journals_again() {
    let mut d = Daemon::builder().disk_random("vda", 32 * MIB, 9).prepare();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d, &repo);
    let base = std::fs::read_to_string(&cfg).unwrap()
        + "journal_max = \"4MiB\"\njournal_min_free = \"0\"\nsegment_size = \"1MiB\"\n";
    // First the target takes nothing for an hour: nothing is trimmed, the
    // journal stays full.
    let delayed = base.replacen("\n[policy", "\ndelay = \"1h\"\n[policy", 1);
    assert_ne!(delayed, base, "the config has no [policy section: {base}");
    std::fs::write(&cfg, &delayed).unwrap();
    d.extra
        .extend(["--config".into(), cfg.clone().into_os_string()]);
    d.start();
    let cmds: Vec<String> = (0..24)
        .map(|i| format!("write -P {} {} 1M", 0x30 + i, i * MIB))
        .chain(std::iter::once("flush".to_string()))
        .collect();
    qemu_io(&d, "vda", &cmds);
    wait_for_mode(&d, "degraded");

    let (pass, err) = ship(&d, &cfg);
    assert_eq!(
        pass["baselines"], 0,
        "a baseline of a degraded disk: {pass}\n{err}"
    );
    assert!(err.contains("degraded mode"), "{err}");

    // The target takes segments again: they are trimmed, the journal has
    // room, cdpd resyncs, and the next pass takes the baseline.
    // The resync needs room for what it journals again (20 MiB against a
    // 4 MiB journal_max): it may fill the journal again, until the next
    // pass trims.
    std::fs::write(&cfg, &base).unwrap();
    let t0 = Instant::now();
    let mut taken = 0;
    while journal_mode(&d) != "normal" {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "vda's journal never became normal: {:#}",
            d.status_json()
        );
        taken += ship(&d, &cfg).0["baselines"].as_u64().unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    // (A pass between the degraded mode's end and the resync's may have
    // taken it already: exact too, since every write is journaled again.)
    let (pass, err) = ship(&d, &cfg);
    taken += pass["baselines"].as_u64().unwrap();
    assert_eq!(taken, 1, "{pass}\n{err}");
    d.term();
    ship(&d, &cfg);
    assert_repo_restores_image(&d, &cfg, &repo, "vda");
}
