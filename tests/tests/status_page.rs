//! The operator's view in a real browser (issue 15): cdp-agent's status
//! page over a host with two protected VMs (each cdpd as its own QEMU
//! user, as two_vms.rs sets them up), and the SVG of `cdpctl points --svg`,
//! loaded by Debian's headless Chromium. The rendered DOM must show the
//! VMs, their disks and the timelines; the screenshots stay in
//! `target/test-artifacts/` (status-page.png, points-timeline.png).
//!
//! Chromium is required: without it the test fails with the install hint
//! (scripts/install-deps installs it), it never skips.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cdp_tests::fixture::{cdpctl, phase, qemu_io};
use cdp_tests::{bin, wait_child, Daemon};

const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(90);
/// The VMs' QEMU user (libvirt-qemu, group kvm): the agent reads each
/// VM's catalog and journal as that user, never as root.
const QEMU: (u32, u32) = (64055, 107);
/// A mark label a VM's user could write: only ever text on the page.
const HOSTILE: &str = "<b id=\"pwn\">\"]]>&</b>";

fn chromium() -> PathBuf {
    let p = Path::new("/usr/bin/chromium");
    assert!(
        p.exists(),
        "this test needs Debian's chromium: run scripts/install-deps \
         (apt-get install --no-install-recommends chromium)"
    );
    p.to_path_buf()
}

/// Where the screenshots stay.
fn artifacts() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Headless Chromium on `url` with `mode` (`--dump-dom` or
/// `--screenshot=FILE`), a fresh profile, nothing fetched from elsewhere.
/// Its stdout.
fn browse(url: &str, mode: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = tempfile::NamedTempFile::new().unwrap();
    let err = tempfile::NamedTempFile::new().unwrap();
    let child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1100,1400",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(mode)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(out.reopen().unwrap())
        .stderr(err.reopen().unwrap())
        .spawn()
        .expect("start chromium");
    let status = wait_child(child, Duration::from_secs(120)).expect("chromium hung");
    let stdout = std::fs::read_to_string(out.path()).unwrap();
    assert!(
        status.success(),
        "chromium {mode} {url}: {status}\n{}",
        std::fs::read_to_string(err.path()).unwrap_or_default()
    );
    stdout
}

/// A PNG's width and height, after checking its signature and that it is
/// not trivially small.
fn png_size(p: &Path) -> (u32, u32) {
    let b = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(b.len() > 10_000, "{}: only {} bytes", p.display(), b.len());
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{}", p.display());
    assert_eq!(&b[12..16], b"IHDR");
    let be = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

/// `GET path` on the agent's listener: (status line, content type, body).
fn get(port: u16, path: &str) -> Option<(String, String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut r = String::new();
    s.read_to_string(&mut r).ok()?;
    let (head, body) = r.split_once("\r\n\r\n")?;
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_string)
        })
        .unwrap_or_default();
    Some((head.lines().next()?.to_string(), ctype, body.to_string()))
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `cdp-agent run`, killed when dropped.
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_status_page_and_the_points_svg_render_in_chromium() {
    let chromium = chromium();
    let host = tempfile::tempdir().unwrap();
    std::fs::set_permissions(host.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (state, run_dir) = (host.path().join("state"), host.path().join("run"));
    let a = Daemon::builder()
        .vm_name("web-frontend")
        .disk_random("vda", 8 * MIB, 21)
        .disk_random("vdb", 8 * MIB, 22)
        .args(["--segment-age", "200ms"])
        .host_dirs(&state, &run_dir)
        .as_user(QEMU.0, QEMU.1)
        .start();
    let mut b = Daemon::builder()
        .vm_name("db-primary")
        .disk_random("vda", 8 * MIB, 23)
        .args(["--segment-age", "200ms"])
        .host_dirs(&state, &run_dir)
        .as_user(QEMU.0, QEMU.1)
        .start();
    // The repository QEMU's user writes (the agent ships as the VM's user).
    let repo = host.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::os::unix::fs::chown(&repo, Some(QEMU.0), Some(QEMU.1)).unwrap();
    let port = free_port();
    let cfg = host.path().join("cdp.toml");
    std::fs::write(
        &cfg,
        format!(
            "[target.primary]\nurl = \"file://{}\"\n[policy.default]\ntargets = [\"primary\"]\n\
             [agent]\nmetrics_listen = \"127.0.0.1:{port}\"\nscan_interval = \"1s\"\n",
            repo.display()
        ),
    )
    .unwrap();
    qemu_io(&a, "vda", &phase(1));
    qemu_io(&a, "vdb", &phase(2));
    qemu_io(&b, "vda", &phase(3));
    cdpctl(&a, &cfg, &["mark", &a.vm_uuid, HOSTILE]);
    qemu_io(&a, "vda", &phase(4));
    // B stops: a protected VM that is not running is on the page too.
    b.term();
    let log = host.path().join("agent.log");
    let f = std::fs::File::create(&log).unwrap();
    let _agent = Agent(
        Command::new(bin("cdp-agent"))
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .arg("--state-dir")
            .arg(&state)
            .arg("--run-dir")
            .arg(&run_dir)
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("start cdp-agent"),
    );
    let agent_log = || std::fs::read_to_string(&log).unwrap_or_default();

    // The page shows both VMs with a baseline and the mark once shipped.
    let start = Instant::now();
    loop {
        let body = get(port, "/").map(|(status, _, body)| format!("{status}\n{body}"));
        let done = body.as_deref().is_some_and(|body| {
            body.starts_with("HTTP/1.1 200")
                && body.contains("web-frontend")
                && body.contains("db-primary")
                && body.matches(r#"class="baseline""#).count() >= 2
                && body.contains(r#"class="mark""#)
                && body.contains(r#"class="restorable""#)
        });
        if done {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "timed out waiting for both VMs with a baseline and A's mark on the page:\n{}\n--- agent log ---\n{}",
            body.unwrap_or_default(),
            agent_log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // More history after the baselines: the restorable range grows, and a
    // second mark lands inside it.
    qemu_io(&a, "vda", &phase(5));
    std::thread::sleep(Duration::from_secs(2));
    cdpctl(&a, &cfg, &["mark", &a.vm_uuid, "after-upgrade"]);
    qemu_io(&a, "vdb", &phase(6));
    wait_until("the second mark on the page", || {
        get(port, "/").is_some_and(|(_, _, body)| body.contains("mark after-upgrade"))
    });
    let (_, ctype, page) = get(port, "/").unwrap();
    assert!(ctype.starts_with("text/html"), "{ctype}");
    assert!(!page.contains("<b id"), "the mark label is escaped: {page}");
    assert!(page.contains("&lt;b id=&quot;pwn&quot;&gt;&quot;]]&gt;&amp;&lt;/b&gt;"));
    assert!(!page.contains("<script"), "{page}");
    let (status, ctype, svg) = get(port, &format!("/vm/{}/timeline.svg", a.vm_uuid)).unwrap();
    assert!(
        status.contains("200") && ctype.starts_with("image/svg+xml"),
        "{status} {ctype}"
    );
    assert_eq!(svg.matches(r#"<g class="lane">"#).count(), 2, "{svg}");
    let (status, _, _) = get(
        port,
        "/vm/00000000-0000-4000-8000-000000000000/timeline.svg",
    )
    .unwrap();
    assert!(status.contains("404"), "{status}");
    // The metrics are still there.
    assert!(get(port, "/metrics").unwrap().2.contains("cdp_vm_running"));

    // In the browser: the DOM after load.
    let url = format!("http://127.0.0.1:{port}/");
    let dom = browse(&url, "--dump-dom");
    for want in [
        "web-frontend",
        "db-primary",
        &a.vm_uuid,
        &b.vm_uuid,
        "vdb",
        "running",
        "stopped",
    ] {
        assert!(
            dom.contains(want),
            "{want:?} not in the rendered DOM:\n{dom}"
        );
    }
    assert_eq!(
        dom.matches("<svg").count(),
        2,
        "one timeline per VM:\n{dom}"
    );
    assert!(dom.contains(r#"class="lane""#) && dom.contains(r#"class="restorable""#));
    assert!(
        !dom.contains("<b id"),
        "the label became an element:\n{dom}"
    );
    let shot = artifacts().join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    browse(&url, &format!("--screenshot={}", shot.display()));
    let (w, h) = png_size(&shot);
    assert!(w >= 1000 && h >= 1000, "{w}x{h}");

    // `cdpctl points --svg`: the same timeline from the repository.
    let out = host.path().join("points.svg");
    let text = cdpctl(
        &a,
        &cfg,
        &[
            "points",
            "web-frontend",
            "--svg",
            out.to_str().unwrap(),
            "--repo",
            &format!("file://{}", repo.display()),
            "--no-local",
        ],
    );
    assert!(
        text.starts_with(&format!("VM web-frontend ({})", a.vm_uuid)),
        "{text}"
    );
    assert!(text.contains("flush points"), "{text}");
    let file_url = format!("file://{}", out.display());
    let dom = browse(&file_url, "--dump-dom");
    for want in [
        "web-frontend",
        "vda",
        "vdb",
        r#"class="baseline""#,
        r#"class="mark""#,
    ] {
        assert!(dom.contains(want), "{want:?} not in the SVG's DOM:\n{dom}");
    }
    assert!(!dom.contains("<b id"), "{dom}");
    let shot = artifacts().join("points-timeline.png");
    let _ = std::fs::remove_file(&shot);
    browse(&file_url, &format!("--screenshot={}", shot.display()));
    png_size(&shot);
    assert!(!agent_log().contains("panicked"), "{}", agent_log());
    drop(chromium);
}
