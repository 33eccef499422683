//! The shipper (QEMU's user) never reads a target's prune credential
//! (docs/CREDENTIALS.md): against a real S3 server on loopback (moto) that
//! checks signatures, it ships with `credentials_file` while
//! `prune_credentials_file` is a FIFO (opening it would block the shipper),
//! and it does not fall back to a good prune credential when its own is bad.

#[path = "../../repo/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use cdp_repo::store::Store;
use cdp_tests::fixture::{qemu_io, shipper_once_cmd};
use cdp_tests::Daemon;
use common::S3Server;

fn write_config(dir: &Path, url: &str, creds: &Path, prune: &Path) -> PathBuf {
    let p = dir.join("cdp.toml");
    std::fs::write(
        &p,
        format!(
            "[target.offsite]\nurl = \"{url}\"\ncredentials_file = \"{}\"\n\
             prune_credentials_file = \"{}\"\n\
             [policy.default]\ntargets = [\"offsite\"]\n",
            creds.display(),
            prune.display()
        ),
    )
    .unwrap();
    p
}

/// `cdp-shipper run --once`, killed (and the test failed) if it has not
/// finished within a minute: it would hang opening the FIFO.
fn ship_once(d: &Daemon, cfg: &Path) -> Output {
    let mut child = shipper_once_cmd(d, cfg)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the shipper hangs (opened the prune credential FIFO?): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn the_shipper_never_reads_the_prune_credential() {
    let s3 = S3Server::start(&["cdp"]);
    let (id, secret) = s3.enable_auth();
    let mut d = Daemon::with_disk(1 << 20);
    // (The helper writes one file: each is copied away at once.)
    let good = d.work_dir().join("good.cred");
    let bad = d.work_dir().join("bad.cred");
    std::fs::copy(s3.credentials_file(&id, &secret), &good).unwrap();
    std::fs::copy(s3.credentials_file(&id, "not-the-secret"), &bad).unwrap();
    qemu_io(
        &d,
        "vda",
        &["write -P 7 0 64k".to_string(), "flush".to_string()],
    );
    d.term();
    let url = s3.url("cdp", "x");

    // Its own (bad) credential and a good prune credential: refused, it
    // never falls back to the prune credential.
    let private = d.work_dir().join("prune.cred");
    std::fs::copy(&good, &private).unwrap();
    std::fs::set_permissions(
        &private,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let cfg = write_config(&d.work_dir(), &url, &bad, &private);
    let out = ship_once(&d, &cfg);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "shipped with the prune credential");
    assert!(err.contains("access denied"), "{err}");

    // Its own good credential, the prune credential a FIFO: ships, never
    // opening the FIFO (which would block it).
    let fifo = d.work_dir().join("prune.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let cfg = write_config(&d.work_dir(), &url, &good, &fifo);
    let out = ship_once(&d, &cfg);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = Store::open(&url, Some(&good)).unwrap();
    let keys = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(store.list(&format!("cdp/v1/vms/{}/vda/journal/", d.vm_uuid)))
        .unwrap();
    assert!(
        keys.iter().any(|o| o.key.ends_with(".seg.zst")),
        "nothing shipped: {keys:?}"
    );
}
