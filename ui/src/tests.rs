use super::*;
use proptest::prelude::*;
use quick_xml::events::Event;
use quick_xml::Reader;

const HOUR: u64 = 3_600_000_000_000;
const T0: u64 = 1_795_782_896_000_000_000;

/// Parse `s` as XML (end names checked); the text it holds, unescaped, and
/// the names of its elements. Panics where it is not well-formed.
fn parse(s: &str) -> (String, Vec<String>) {
    let mut r = Reader::from_str(s);
    r.config_mut().check_end_names = true;
    let (mut text, mut names, mut depth) = (String::new(), Vec::new(), 0i32);
    loop {
        match r.read_event() {
            Ok(Event::Eof) => break,
            Ok(Event::Start(e)) => {
                depth += 1;
                names.push(String::from_utf8(e.name().as_ref().to_vec()).unwrap());
                for a in e.attributes() {
                    a.unwrap().unescape_value().unwrap();
                }
            }
            Ok(Event::Empty(e)) => {
                names.push(String::from_utf8(e.name().as_ref().to_vec()).unwrap());
                for a in e.attributes() {
                    a.unwrap().unescape_value().unwrap();
                }
            }
            Ok(Event::End(_)) => depth -= 1,
            Ok(Event::Text(t)) => text.push_str(&t.unescape().unwrap()),
            Ok(_) => {}
            Err(e) => panic!("not well-formed at {}: {e}\n{s}", r.buffer_position()),
        }
    }
    assert_eq!(depth, 0, "unclosed elements\n{s}");
    (text, names)
}

fn disk(name: &str, label: &str) -> DiskTimeline {
    DiskTimeline {
        disk: name.into(),
        restorable: vec![Span {
            from_ns: T0,
            to_ns: T0 + 2 * HOUR,
        }],
        baselines: vec![Baseline {
            time_ns: T0,
            seq: 1,
        }],
        marks: vec![Mark {
            time_ns: T0 + HOUR,
            seq: 50,
            label: label.into(),
            quiesced: false,
        }],
        gaps: vec![Gap {
            time_ns: T0 + 2 * HOUR,
            seq: 90,
            reason: "VM ran unprotected".into(),
        }],
        degraded: vec![Window {
            from_ns: T0 + 2 * HOUR,
            to_ns: None,
            reason: "journal full".into(),
        }],
    }
}

fn timeline(name: &str, label: &str) -> Timeline {
    Timeline {
        vm_name: name.into(),
        vm_uuid: "0b5c6a3e-1d2f-4a5b-8c9d-0e1f2a3b4c5d".into(),
        now_ns: T0 + 3 * HOUR,
        disks: vec![disk("vda", label), disk("vdb", "before upgrade")],
        rpo: vec![RpoSeries {
            target: "primary".into(),
            samples: (0..30)
                .map(|i| (T0 + 2 * HOUR + i * 60_000_000_000, (i % 7) as f64))
                .collect(),
        }],
    }
}

fn host(vms: Vec<VmStatus>) -> HostStatus {
    HostStatus {
        host: "kvm1".into(),
        generated_ns: T0 + 3 * HOUR,
        refresh_s: 10,
        targets: vec![TargetStatus {
            name: "primary".into(),
            url: "file:///srv/cdp".into(),
            health: Health::Failing,
            error: Some("Permission denied".into()),
        }],
        vms,
    }
}

fn vm(name: &str, label: &str) -> VmStatus {
    VmStatus {
        name: name.into(),
        uuid: "0b5c6a3e-1d2f-4a5b-8c9d-0e1f2a3b4c5d".into(),
        running: true,
        disks: vec![DiskStatus {
            disk: "vda".into(),
            rpo_s: 1.5,
            degraded: false,
            image_failed: false,
            backlog: vec![Backlog {
                target: "primary".into(),
                segments: 2,
                bytes: 8192,
            }],
        }],
        targets: vec![VmTarget {
            target: "primary".into(),
            health: Health::Up,
            newest_shipped_ns: Some(T0),
            rpo_s: 1.5,
            backlog_bytes: 8192,
        }],
        timeline: Some(timeline(name, label)),
        error: None,
    }
}

#[test]
fn the_timeline_draws_every_disk_an_axis_and_a_legend() {
    let svg = timeline_svg(&timeline("web", "before upgrade"));
    let (text, names) = parse(&svg);
    assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert_eq!(svg.matches(r#"<g class="lane">"#).count(), 2);
    assert!(svg.contains(r#"class="restorable""#));
    assert!(svg.contains(r#"class="gap""#));
    assert!(svg.contains(r#"class="degraded""#));
    assert!(svg.contains(r#"class="baseline""#));
    assert!(svg.contains(r#"class="mark""#));
    assert!(svg.contains(r#"class="rpo-line""#));
    for t in [
        "vda",
        "vdb",
        "RPO primary",
        "restorable",
        "gap",
        "mark before upgrade at 2026-11-27 13:34:56 (seq 50, not quiesced)",
    ] {
        assert!(text.contains(t), "{t:?} missing in {text}");
    }
    // Hourly ticks over four hours.
    assert!(text.contains("13:00") && text.contains("14:00"), "{text}");
    assert!(!names
        .iter()
        .any(|n| n == "script" || n == "image" || n == "foreignObject"));
    assert!(!svg.contains("href"), "no external reference: {svg}");
}

/// VM names, labels and reasons come from VM-writable catalogs: they only
/// ever appear escaped, and read back exactly as written.
#[test]
fn hostile_names_and_labels_appear_only_escaped() {
    let name = "<script>alert(1)</script>";
    let label = "\"]]>&";
    let mut v = vm(name, label);
    v.disks[0].disk = "<b>vda</b>".into();
    v.error = Some("<img src=x onerror=alert(2)>".into());
    v.timeline.as_mut().unwrap().disks[0].gaps[0].reason = "</title><script>x</script>".into();
    let page = status_page_html(&host(vec![v]));
    let svg = timeline_svg(&timeline(name, label));
    for out in [&page, &svg] {
        assert!(!out.contains("<script"), "{out}");
        assert!(!out.contains("\"]]>&"), "{out}");
        assert!(!out.contains("<img"), "{out}");
        assert!(!out.contains("<b>"), "{out}");
        assert!(
            out.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{out}"
        );
        assert!(out.contains("&quot;]]&gt;&amp;"), "{out}");
        let (text, names) = parse(out);
        assert!(text.contains(name), "{text}");
        assert!(text.contains(&format!("mark {label} at")), "{text}");
        assert!(!names
            .iter()
            .any(|n| n == "script" || n == "img" || n == "b"));
    }
    assert!(page.contains("&lt;img src=x onerror=alert(2)&gt;"));
    assert!(page.contains("&lt;/title&gt;&lt;script&gt;x&lt;/script&gt;"));
}

#[test]
fn the_page_lists_vms_targets_and_inlines_timelines() {
    let mut stopped = vm("db", "nightly");
    stopped.running = false;
    stopped.uuid = "1b5c6a3e-1d2f-4a5b-8c9d-0e1f2a3b4c5d".into();
    let mut failed = vm("mail", "y");
    failed.uuid = "2b5c6a3e-1d2f-4a5b-8c9d-0e1f2a3b4c5d".into();
    failed.disks[0].image_failed = true;
    let page = status_page_html(&host(vec![vm("web", "x"), stopped, failed]));
    let (text, names) = parse(&page);
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert!(page.contains(r#"<meta http-equiv="refresh" content="10"/>"#));
    for t in [
        "cdpd on kvm1",
        "3 protected VMs",
        "failed: image write error, I/O fails until cdpd restarts",
        "normal",
        "web",
        "db",
        "running",
        "stopped",
        "failing",
        "Permission denied",
        "8.0 KiB in 2 segments",
        "1.5 s",
    ] {
        assert!(text.contains(t), "{t:?} missing in {text}");
    }
    assert_eq!(names.iter().filter(|n| *n == "svg").count(), 3);
    assert!(!names
        .iter()
        .any(|n| n == "script" || n == "link" || n == "img"));
    assert!(page.contains(r#"href="/vm/1b5c6a3e-1d2f-4a5b-8c9d-0e1f2a3b4c5d/timeline.svg""#));
    // No asset from elsewhere: the only links are the page's own.
    assert!(
        !page.contains("http://")
            || !page
                .replace("http://www.w3.org/2000/svg", "")
                .contains("http://")
    );
    assert!(!page.contains("https://"));
}

#[test]
fn empty_and_degenerate_models_still_render() {
    let (text, _) = parse(&status_page_html(&HostStatus::default()));
    assert!(text.contains("no protected VM on this host"), "{text}");
    let t = Timeline {
        now_ns: u64::MAX,
        disks: vec![DiskTimeline {
            disk: "vda".into(),
            restorable: vec![Span {
                from_ns: u64::MAX,
                to_ns: 0,
            }],
            ..Default::default()
        }],
        rpo: vec![RpoSeries {
            target: "t".into(),
            samples: vec![(0, f64::NAN), (5, f64::INFINITY), (u64::MAX, -3.0)],
        }],
        ..Default::default()
    };
    parse(&timeline_svg(&t));
    parse(&timeline_svg(&Timeline::default()));
}

fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[<>&\"' \\]\\[a-z]{0,12}"]
}

fn any_disk() -> impl Strategy<Value = DiskTimeline> {
    (
        any_text(),
        prop::collection::vec((any::<u64>(), any::<u64>()), 0..4),
        prop::collection::vec((any::<u64>(), any::<u64>()), 0..3),
        prop::collection::vec(
            (any::<u64>(), any::<u64>(), any_text(), any::<bool>()),
            0..4,
        ),
        prop::collection::vec((any::<u64>(), any::<u64>(), any_text()), 0..3),
        prop::collection::vec((any::<u64>(), any::<Option<u64>>(), any_text()), 0..3),
    )
        .prop_map(|(disk, r, b, m, g, w)| DiskTimeline {
            disk,
            restorable: r
                .into_iter()
                .map(|(from_ns, to_ns)| Span { from_ns, to_ns })
                .collect(),
            baselines: b
                .into_iter()
                .map(|(time_ns, seq)| Baseline { time_ns, seq })
                .collect(),
            marks: m
                .into_iter()
                .map(|(time_ns, seq, label, quiesced)| Mark {
                    time_ns,
                    seq,
                    label,
                    quiesced,
                })
                .collect(),
            gaps: g
                .into_iter()
                .map(|(time_ns, seq, reason)| Gap {
                    time_ns,
                    seq,
                    reason,
                })
                .collect(),
            degraded: w
                .into_iter()
                .map(|(from_ns, to_ns, reason)| Window {
                    from_ns,
                    to_ns,
                    reason,
                })
                .collect(),
        })
}

fn any_timeline() -> impl Strategy<Value = Timeline> {
    (
        any_text(),
        any_text(),
        any::<u64>(),
        prop::collection::vec(any_disk(), 0..4),
        prop::collection::vec(
            (
                any_text(),
                prop::collection::vec((any::<u64>(), any::<f64>()), 0..6),
            ),
            0..3,
        ),
    )
        .prop_map(|(vm_name, vm_uuid, now_ns, disks, rpo)| Timeline {
            vm_name,
            vm_uuid,
            now_ns,
            disks,
            rpo: rpo
                .into_iter()
                .map(|(target, samples)| RpoSeries { target, samples })
                .collect(),
        })
}

fn any_health() -> impl Strategy<Value = Health> {
    prop_oneof![Just(Health::Up), Just(Health::Failing), Just(Health::Down)]
}

fn any_vm() -> impl Strategy<Value = VmStatus> {
    (
        (any_text(), any_text(), any::<bool>()),
        prop::collection::vec(
            (
                any_text(),
                any::<f64>(),
                any::<bool>(),
                any_text(),
                any::<u64>(),
                any::<u64>(),
            ),
            0..3,
        ),
        prop::collection::vec(
            (
                any_text(),
                any_health(),
                any::<Option<u64>>(),
                any::<f64>(),
                any::<u64>(),
            ),
            0..3,
        ),
        prop::option::of(any_timeline()),
        prop::option::of(any_text()),
    )
        .prop_map(|((name, uuid, running), d, t, timeline, error)| VmStatus {
            name,
            uuid,
            running,
            disks: d
                .into_iter()
                .map(
                    |(disk, rpo_s, degraded, target, segments, bytes)| DiskStatus {
                        disk,
                        rpo_s,
                        degraded,
                        image_failed: degraded && rpo_s > 1.0,
                        backlog: vec![Backlog {
                            target,
                            segments,
                            bytes,
                        }],
                    },
                )
                .collect(),
            targets: t
                .into_iter()
                .map(
                    |(target, health, newest_shipped_ns, rpo_s, backlog_bytes)| VmTarget {
                        target,
                        health,
                        newest_shipped_ns,
                        rpo_s,
                        backlog_bytes,
                    },
                )
                .collect(),
            timeline,
            error,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn any_timeline_is_well_formed_svg(t in any_timeline()) {
        let svg = timeline_svg(&t);
        let (_, names) = parse(&svg);
        prop_assert_eq!(names.first().map(String::as_str), Some("svg"));
        prop_assert!(!names.iter().any(|n| n == "script"));
    }

    #[test]
    fn any_host_is_a_well_formed_page(
        host in any_text(),
        generated_ns in any::<u64>(),
        refresh_s in any::<u32>(),
        targets in prop::collection::vec((any_text(), any_text(), any_health(), prop::option::of(any_text())), 0..3),
        vms in prop::collection::vec(any_vm(), 0..3),
    ) {
        let s = HostStatus {
            host,
            generated_ns,
            refresh_s,
            targets: targets
                .into_iter()
                .map(|(name, url, health, error)| TargetStatus { name, url, health, error })
                .collect(),
            vms,
        };
        let page = status_page_html(&s);
        let (_, names) = parse(&page);
        prop_assert_eq!(names.first().map(String::as_str), Some("html"));
        prop_assert!(!names.iter().any(|n| n == "script"));
    }
}
