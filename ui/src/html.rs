//! The host's status page: server-rendered HTML with each VM's timeline SVG
//! inline, one CSS block, no script and no external asset (it is also
//! well-formed XML, which the property tests check).

use std::fmt::Write;

use crate::model::{HostStatus, VmStatus};
use crate::svg::timeline_svg;
use crate::text::{bytes, esc, secs, utc};

const CSS: &str = "body{font-family:sans-serif;margin:1.5em;color:#222;background:#fafafa}\
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.15em;margin:0}\
.meta{color:#666;font-size:.9em}\
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}\
th,td{border:1px solid #ccc;padding:.2em .6em;text-align:left}th{background:#eee}\
.vm{background:#fff;border:1px solid #ccc;border-radius:6px;padding:.8em;margin:1em 0}\
.up{color:#fff;background:#2e8b57}.failing{color:#000;background:#f0ad4e}.down{color:#fff;background:#c0392b}\
.badge{border-radius:4px;padding:0 .4em;font-size:.85em}\
.running{color:#fff;background:#2c6fbb}.stopped{color:#fff;background:#777}\
.error{color:#c0392b}.num{text-align:right}svg.timeline{max-width:100%;height:auto}";

fn badge(out: &mut String, class: &str, text: &str) {
    let _ = write!(
        out,
        r#"<span class="badge {}">{}</span>"#,
        esc(class),
        esc(text)
    );
}

/// The host's targets and their health.
fn targets(out: &mut String, s: &HostStatus) {
    out.push_str("<h2>Targets</h2>");
    if s.targets.is_empty() {
        out.push_str(r#"<p class="meta">no target in use</p>"#);
        return;
    }
    out.push_str("<table><tr><th>target</th><th>health</th><th>URL</th><th>last error</th></tr>");
    for t in &s.targets {
        let _ = write!(out, "<tr><td>{}</td><td>", esc(&t.name));
        badge(out, t.health.as_str(), t.health.as_str());
        let _ = write!(
            out,
            "</td><td>{}</td><td>{}</td></tr>",
            esc(&t.url),
            esc(t.error.as_deref().unwrap_or(""))
        );
    }
    out.push_str("</table>");
}

/// One VM's disks (RPO, degraded, backlog per target).
fn disks(out: &mut String, vm: &VmStatus) {
    out.push_str(
        "<table class=\"disks\"><tr><th>disk</th><th>RPO</th><th>journal</th><th>backlog</th></tr>",
    );
    for d in &vm.disks {
        let backlog: Vec<String> = d
            .backlog
            .iter()
            .map(|b| {
                format!(
                    "{}: {} in {} segments",
                    esc(&b.target),
                    bytes(b.bytes),
                    b.segments
                )
            })
            .collect();
        let _ = write!(
            out,
            r#"<tr><td class="disk">{}</td><td class="num">{}</td><td>{}</td><td>{}</td></tr>"#,
            esc(&d.disk),
            secs(d.rpo_s),
            if d.image_failed {
                "failed: image write error, I/O fails until cdpd restarts"
            } else if d.degraded {
                "degraded"
            } else {
                "normal"
            },
            if backlog.is_empty() {
                "none".to_string()
            } else {
                backlog.join("; ")
            }
        );
    }
    out.push_str("</table>");
}

/// One VM's targets (health, newest point, RPO, backlog).
fn vm_targets(out: &mut String, vm: &VmStatus) {
    if vm.targets.is_empty() {
        return;
    }
    out.push_str("<table class=\"targets\"><tr><th>target</th><th>health</th><th>newest shipped point</th><th>RPO</th><th>backlog</th></tr>");
    for t in &vm.targets {
        let _ = write!(out, "<tr><td>{}</td><td>", esc(&t.target));
        badge(out, t.health.as_str(), t.health.as_str());
        let _ = write!(
            out,
            r#"</td><td>{}</td><td class="num">{}</td><td class="num">{}</td></tr>"#,
            t.newest_shipped_ns
                .map_or("nothing yet".to_string(), |n| format!("{} UTC", utc(n))),
            secs(t.rpo_s),
            bytes(t.backlog_bytes)
        );
    }
    out.push_str("</table>");
}

fn vm(out: &mut String, vm: &VmStatus) {
    let uuid = esc(&vm.uuid);
    let _ = write!(
        out,
        r#"<section class="vm" id="vm-{uuid}"><h2>{} "#,
        esc(&vm.name)
    );
    let state = if vm.running { "running" } else { "stopped" };
    badge(out, state, state);
    let _ = write!(
        out,
        r#"</h2><p class="meta">{uuid} · <a href="/vm/{uuid}/timeline.svg">timeline.svg</a></p>"#
    );
    if let Some(e) = &vm.error {
        let _ = write!(out, r#"<p class="error">{}</p>"#, esc(e));
    }
    disks(out, vm);
    vm_targets(out, vm);
    if let Some(t) = &vm.timeline {
        out.push_str(&timeline_svg(t));
    }
    out.push_str("</section>");
}

/// The whole page.
pub fn status_page_html(s: &HostStatus) -> String {
    let mut out =
        String::from("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/>");
    if s.refresh_s > 0 {
        let _ = write!(
            out,
            r#"<meta http-equiv="refresh" content="{}"/>"#,
            s.refresh_s
        );
    }
    let host = esc(&s.host);
    let _ = write!(
        out,
        "<title>cdpd on {host}</title><style>{CSS}</style></head><body><h1>cdpd on {host}</h1><p class=\"meta\">{} protected VMs · generated {} UTC</p>",
        s.vms.len(),
        utc(s.generated_ns)
    );
    targets(&mut out, s);
    out.push_str("<h2>Protected VMs</h2>");
    if s.vms.is_empty() {
        out.push_str(r#"<p class="meta">no protected VM on this host</p>"#);
    }
    for v in &s.vms {
        vm(&mut out, v);
    }
    out.push_str("</body></html>\n");
    out
}
