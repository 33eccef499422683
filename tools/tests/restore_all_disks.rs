//! `cdpctl restore VM --at POINT --all-disks --to DIR`: every disk of a VM at
//! one cut, from the repository alone, plus the definition of that point
//! with each disk's source remapped to its restored file; a second run into
//! the same directory refuses and changes nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use cdp_tests::fixture::{cdpctl, cdpctl_out, config, phase, qemu_io};
use cdp_tests::{bin, run_ok, Daemon};
use serde_json::Value;

const MIB: u64 = 1 << 20;

const DOMAIN: &str = r#"<domain type='kvm'>
  <name>two-disks</name>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/libvirt/images/two-a.img'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <source dev='/dev/vg0/two-b'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/srv/iso/install.iso'/>
      <target dev='sda' bus='sata'/>
    </disk>
  </devices>
</domain>
"#;

fn ship(d: &Daemon, cfg: &Path, vm_config: &Path) {
    let mut c = Command::new(bin("cdp-shipper"));
    c.args(["run", "--once", "--vm-uuid", &d.vm_uuid])
        .arg("--state-dir")
        .arg(&d.state_dir)
        .arg("--run-dir")
        .arg(&d.run_dir)
        .arg("--config")
        .arg(cfg)
        .arg("--vm-config")
        .arg(vm_config);
    run_ok(&mut c);
}

/// Each `<disk>`'s target dev and its source (file= or dev=).
fn sources(xml: &str) -> BTreeMap<String, String> {
    use quick_xml::events::Event;
    let mut r = quick_xml::Reader::from_str(xml);
    let mut out = BTreeMap::new();
    let (mut target, mut source) = (None, None);
    loop {
        match r.read_event().unwrap() {
            Event::Eof => break,
            Event::Start(e) | Event::Empty(e) => {
                for a in e.attributes() {
                    let a = a.unwrap();
                    let v = a.unescape_value().unwrap().into_owned();
                    match (e.name().as_ref(), a.key.as_ref()) {
                        (b"target", b"dev") => target = Some(v),
                        (b"source", b"file" | b"dev") => source = Some(v),
                        _ => {}
                    }
                }
            }
            Event::End(e) if e.name().as_ref() == b"disk" => {
                out.insert(target.take().unwrap(), source.take().unwrap());
            }
            _ => {}
        }
    }
    out
}

/// Every file in `dir` with its bytes.
fn contents(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect()
}

#[test]
fn restore_all_disks_gives_every_disk_at_one_cut_and_the_remapped_definition() {
    let mut d = Daemon::builder()
        .disk_random("vda", 8 * MIB, 11)
        .disk_random("vdb", 8 * MIB, 12)
        .args(["--segment-age", "30ms"])
        .start();
    let repo = d.work_dir().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let cfg = config(&d, &repo);
    let xml = d.work_dir().join("domain-in.xml");
    std::fs::write(&xml, DOMAIN).unwrap();
    cdpctl(&d, &cfg, &["baseline", &d.vm_uuid]);
    ship(&d, &cfg, &xml);
    std::thread::sleep(std::time::Duration::from_millis(60));
    qemu_io(&d, "vda", &phase(0));
    qemu_io(&d, "vdb", &phase(1));
    cdpctl(&d, &cfg, &["mark", &d.vm_uuid, "both"]);
    let refs: Vec<(&str, Vec<u8>)> = ["vda", "vdb"]
        .into_iter()
        .map(|k| (k, std::fs::read(d.image(k)).unwrap()))
        .collect();
    // Later writes to both disks, then the host's state is gone.
    qemu_io(&d, "vda", &phase(2));
    qemu_io(&d, "vdb", &phase(3));
    for (k, b) in &refs {
        assert_ne!(
            &std::fs::read(d.image(k)).unwrap(),
            b,
            "{k} changed after the mark"
        );
    }
    d.term();
    ship(&d, &cfg, &xml);
    std::fs::remove_dir_all(&d.state_dir).unwrap();
    std::fs::create_dir_all(&d.state_dir).unwrap();

    let dir = d.work_dir().join("restored");
    let url = format!("file://{}", repo.display());
    let args = [
        "--json",
        "restore",
        &d.vm_uuid,
        "--at",
        "mark:both",
        "--all-disks",
        "--to",
        dir.to_str().unwrap(),
        "--repo",
        &url,
    ];
    let out = cdpctl(&d, &cfg, &args);
    let report: Value = serde_json::from_str(&out).unwrap();
    let listed: Vec<&str> = report["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["disk"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["vda", "vdb"], "{report:#}");
    for (k, want) in &refs {
        let got = std::fs::read(dir.join(format!("{k}.raw"))).unwrap();
        assert!(&got == want, "{k}.raw differs from the image at the mark");
    }
    let domain = std::fs::read_to_string(dir.join("domain.xml")).unwrap();
    let want: BTreeMap<String, String> = [
        ("vda", dir.join("vda.raw").display().to_string()),
        ("vdb", dir.join("vdb.raw").display().to_string()),
        ("sda", "/srv/iso/install.iso".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(sources(&domain), want, "{domain}");
    assert_eq!(
        report["definition"]["kept"],
        serde_json::json!(["/srv/iso/install.iso"])
    );

    // Again into the same directory: refused, nothing changed or added.
    let before = contents(&dir);
    assert_eq!(before.len(), 3);
    let o = cdpctl_out(&d, &cfg, &args);
    assert!(!o.status.success(), "a second run into {dir:?} succeeded");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("never overwrites"), "{err}");
    assert!(contents(&dir) == before, "the second run changed {dir:?}");
}
