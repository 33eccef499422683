//! `cdpctl status` without a VM lists every protected VM, running or not,
//! with the newest point each target holds (issue 15): a VM whose cdpd ran
//! once and stopped is still there, with its newest shipped seq and time.

use cdp_tests::fixture::{cdpctl, config, qemu_io, shipper_once_cmd};
use cdp_tests::{run_ok, Daemon};
use serde_json::Value;

#[test]
fn status_lists_a_stopped_vm_with_its_newest_shipped_point() {
    let mut d = Daemon::builder()
        .vm_name("stopped-vm")
        .disk_random("vda", 4 << 20, 5)
        .args(["--segment-age", "50ms"])
        .start();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d, &repo);
    qemu_io(
        &d,
        "vda",
        &[
            "write -P 1 0 64k".into(),
            "flush".into(),
            "write -P 2 1M 64k".into(),
            "flush".into(),
        ],
    );
    let written_seq = d.status_json()["last_seq"].as_u64().unwrap();
    assert!(written_seq > 0);
    d.term();
    run_ok(&mut shipper_once_cmd(&d, &cfg));

    let st: Value = serde_json::from_str(&cdpctl(&d, &cfg, &["status", "--json"])).unwrap();
    assert_eq!(st["vms"].as_array().map(Vec::len), Some(0), "{st:#}");
    let vm = st["protected"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["vm_uuid"] == d.vm_uuid.as_str()))
        .unwrap_or_else(|| panic!("the stopped VM is not listed: {st:#}"));
    assert_eq!(vm["running"], false, "{vm:#}");
    assert_eq!(vm["vm_name"], "stopped-vm", "{vm:#}");
    // cdpd's stop adds its own record after the writes: the catalog's newest.
    let last_seq = vm["last_seq"].as_u64().unwrap();
    assert!(last_seq >= written_seq, "{vm:#}");
    let t = &vm["targets"][0];
    assert_eq!(t["target"], "primary", "{vm:#}");
    assert_eq!(t["state"], "up", "{vm:#}");
    let p = &t["disks"][0];
    assert_eq!(p["disk"], "vda", "{vm:#}");
    assert_eq!(
        p["seq"].as_u64(),
        Some(last_seq),
        "newest shipped: everything, once cdpd stopped and the shipper ran: {vm:#}"
    );
    let ts = p["ts_ns"].as_u64().unwrap();
    assert!(ts > 0 && ts <= vm["last_ts_ns"].as_u64().unwrap(), "{vm:#}");

    // The one VM by name: what its catalog says, not an error.
    let one: Value =
        serde_json::from_str(&cdpctl(&d, &cfg, &["status", "stopped-vm", "--json"])).unwrap();
    assert_eq!(
        (&one["running"], one["last_seq"].as_u64()),
        (&Value::Bool(false), Some(last_seq)),
        "{one:#}"
    );
    let text = cdpctl(&d, &cfg, &["status", &d.vm_uuid]);
    assert!(
        text.contains("no cdpd answers") && text.contains("not running"),
        "{text}"
    );

    let text = cdpctl(&d, &cfg, &["status"]);
    assert!(
        text.contains("stopped-vm")
            && text.contains("not running")
            && text.contains(&format!("vda seq:{last_seq} (")),
        "{text}"
    );
}
