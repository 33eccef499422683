//! `cdpctl points VM --svg FILE`: the timeline `points` builds from the
//! repository (its `--json` disks) as the `cdp_ui` model, drawn by the same
//! renderer as the agent's status page. The repository's names and labels
//! are not trusted: `cdp_ui` escapes them.

use cdp_repo::format as rf;
use cdp_repo::store::Store;
use cdp_ui as ui;
use serde_json::Value;

use crate::Ctx;

/// The VM's name: the one given when it is not the UUID, else this host's
/// catalog, else the newest `vm.json` of the repository.
pub async fn vm_name(ctx: &Ctx, store: &Store, uuid: &str, given: &str) -> Option<String> {
    if cdp_core::names::check_uuid(given).is_err() {
        return Some(given.to_string());
    }
    if ctx.state().vm(uuid).path().is_dir() {
        if let Ok(Some(n)) = ctx.with_catalog(uuid, |c| c.vm_name(uuid)) {
            return Some(n);
        }
    }
    let newest = store
        .list(&format!("{}/vms/{uuid}/vm.json.d/", rf::ROOT))
        .await
        .ok()
        .and_then(|l| l.into_iter().map(|o| o.key).max());
    let key = newest.unwrap_or_else(|| rf::vm_json_key(uuid));
    let b = store.get(&key).await.ok()?;
    serde_json::from_slice::<rf::VmJson>(&b)
        .ok()
        .map(|j| j.name)
}

fn ns(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or("?").to_string()
}

/// One disk of `points --json` as a lane.
pub fn lane(d: &Value) -> ui::DiskTimeline {
    let list = |k: &str| d[k].as_array().cloned().unwrap_or_default();
    let mut lane = ui::DiskTimeline {
        disk: text(&d["disk"]),
        ..Default::default()
    };
    for r in list("restorable") {
        lane.restorable.push(ui::Span {
            from_ns: ns(&r["from_ns"]),
            to_ns: ns(&r["to_ns"]),
        });
    }
    for b in list("baselines") {
        lane.baselines.push(ui::Baseline {
            time_ns: b["point_ns"].as_u64().unwrap_or(ns(&b["time_ns"])),
            seq: ns(&b["s1"]),
        });
    }
    for m in list("marks") {
        lane.marks.push(ui::Mark {
            time_ns: ns(&m["time_ns"]),
            seq: ns(&m["seq"]),
            label: text(&m["label"]),
            quiesced: m["quiesced"] == true,
        });
    }
    for g in list("gaps") {
        if g["resync"] == true {
            // The journal was full: unrestorable until the resync healed it.
            lane.degraded.push(ui::Window {
                from_ns: ns(&g["time_ns"]),
                to_ns: g["healed_at_ns"].as_u64(),
                reason: text(&g["reason"]),
            });
        } else {
            lane.gaps.push(ui::Gap {
                time_ns: ns(&g["time_ns"]),
                seq: ns(&g["seq"]),
                reason: text(&g["reason"]),
            });
        }
    }
    lane
}

/// The timeline of `points` for `uuid` as a standalone SVG document.
pub fn svg(uuid: &str, name: Option<&str>, disks: &[Value]) -> String {
    let t = ui::Timeline {
        vm_name: name.unwrap_or(uuid).to_string(),
        vm_uuid: uuid.to_string(),
        now_ns: cdp_core::time::now_ns(),
        disks: disks.iter().map(lane).collect(),
        rpo: Vec::new(),
    };
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n{}",
        ui::timeline_svg(&t)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_points_disk_becomes_a_lane() {
        let d = serde_json::json!({
            "disk": "vda",
            "restorable": [{"from_seq": 1, "from_ns": 100, "to_seq": 9, "to_ns": 900}],
            "baselines": [{"s1": 1, "time_ns": 150, "point_ns": 100}, {"s1": 5, "time_ns": 500, "point_ns": null}],
            "marks": [{"seq": 4, "time_ns": 400, "label": "<x>"}],
            "gaps": [
                {"seq": 6, "time_ns": 600, "reason": "stopped", "resync": false},
                {"seq": 7, "time_ns": 700, "reason": "full", "resync": true, "healed_at_ns": 800}
            ],
        });
        let l = lane(&d);
        assert_eq!(l.disk, "vda");
        assert_eq!(
            l.restorable,
            vec![ui::Span {
                from_ns: 100,
                to_ns: 900
            }]
        );
        assert_eq!(
            l.baselines.iter().map(|b| b.time_ns).collect::<Vec<_>>(),
            vec![100, 500]
        );
        assert_eq!(l.marks[0].label, "<x>");
        assert_eq!(l.gaps.len(), 1);
        assert_eq!(l.degraded[0].to_ns, Some(800));
        let svg = svg("u", Some("web"), &[d]);
        assert!(svg.starts_with("<?xml"));
        assert!(svg.contains("&lt;x&gt;") && !svg.contains("<x>"));
    }
}
