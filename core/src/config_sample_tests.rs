//! The sample configuration shipped as /etc/cdp/cdp.toml (`packaging/cdp.toml`):
//! it must parse and validate as it is, and it must document every key that the
//! config structs accept, so that a new key without documentation fails here.

use std::collections::BTreeMap;

use super::*;

const SAMPLE: &str = include_str!("../../packaging/cdp.toml");

/// The sample with every commented-out setting enabled: a line that starts with `#`
/// directly followed by a `[section]` or a `key = ` loses its `#`. Prose comments
/// start with `# ` and stay.
fn uncommented(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest)
                if rest.starts_with('[')
                    || rest.split_once(" = ").is_some_and(|(k, _)| {
                        !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    }) =>
            {
                rest
            }
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every field of a pretty-printed (`{:#?}`) value, by path (`policy.*.retention.any_point`:
/// map keys become `*`), mapped to whether any occurrence held something (not
/// `None`, `[]` or `{}`).
fn field_paths(debug: &str) -> BTreeMap<String, bool> {
    let mut out: BTreeMap<String, bool> = BTreeMap::new();
    let mut stack: Vec<(usize, String)> = Vec::new();
    for line in debug.lines() {
        let indent = line.len() - line.trim_start().len();
        let t = line.trim_start();
        let Some((name, value)) = t.split_once(": ") else {
            continue;
        };
        let name = if name.starts_with('"') {
            "*".to_string()
        } else if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            name.to_string()
        } else {
            continue;
        };
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        stack.push((indent, name.clone()));
        if name == "*" {
            continue;
        }
        let path = stack
            .iter()
            .map(|(_, n)| n.as_str())
            .collect::<Vec<_>>()
            .join(".");
        let empty = matches!(value.trim_end_matches(','), "None" | "[]" | "{}");
        *out.entry(path).or_default() |= !empty;
    }
    out
}

#[test]
fn sample_parses_and_validates_as_is() {
    let mut c = Config::parse(SAMPLE).unwrap();
    c.source = Some("packaging/cdp.toml".into());
    c.validate().unwrap();
    // Safe as it is: one local file:// target, nothing ever deleted.
    assert_eq!(c.policy["default"].targets, vec!["local"]);
    assert!(c.target["local"].url.starts_with("file:///"));
    assert!(c.retention("default").unwrap().is_none());
    assert_eq!(c.state_dir(None), Path::new(DEFAULT_STATE_DIR));
    assert_eq!(c.run_dir(None), Path::new(DEFAULT_RUN_DIR));
    assert_eq!(
        c.journal_settings("default").unwrap(),
        JournalSettings::default()
    );
}

#[test]
fn sample_with_every_setting_enabled_validates() {
    let text = uncommented(SAMPLE);
    let mut c = Config::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    c.source = Some("packaging/cdp.toml (uncommented)".into());
    c.validate().unwrap();
    // The commented values are the defaults where the comment says so.
    assert_eq!(c.state_dir(None), Path::new(DEFAULT_STATE_DIR));
    assert_eq!(c.run_dir(None), Path::new(DEFAULT_RUN_DIR));
    assert_eq!(
        c.journal_settings("default").unwrap(),
        JournalSettings::default()
    );
    assert_eq!(
        c.metrics_listen(),
        DEFAULT_METRICS_LISTEN.parse().ok(),
        "metrics_listen"
    );
    assert_eq!(c.scan_interval(), DEFAULT_SCAN_INTERVAL);
    assert_eq!(c.retention_interval(), DEFAULT_RETENTION_INTERVAL);
    assert_eq!(c.libvirt.qemu_user.as_deref(), Some(DEFAULT_QEMU_USER));
}

#[test]
fn sample_documents_every_key() {
    let mut c = Config::parse(&uncommented(SAMPLE)).unwrap();
    c.source = Some("sample".into());
    let paths = field_paths(&format!("{c:#?}"));
    // The walk itself works: it sees nested keys.
    for p in [
        "paths.state_dir",
        "target.*.url",
        "policy.*.retention.thin.every",
        "libvirt.qemu_group",
    ] {
        assert!(paths.contains_key(p), "{p} not found in {paths:?}");
    }
    let missing: Vec<_> = paths
        .iter()
        .filter(|(_, set)| !**set)
        .map(|(p, _)| p.replace(".*", ""))
        .collect();
    assert!(
        missing.is_empty(),
        "packaging/cdp.toml does not show these keys (add each, documented, as a \
         `#key = example` line in its section): {missing:?}"
    );
}

#[test]
fn uncommenting_keeps_prose() {
    assert_eq!(
        uncommented("# prose = here\n#key = 1\n#[a.b]\n#not a key\n"),
        "# prose = here\nkey = 1\n[a.b]\n#not a key"
    );
}
