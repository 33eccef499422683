//! Wall-clock helpers and time points.

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// RFC 3339 with nanoseconds, UTC.
pub fn fmt_ns(ns: u64) -> String {
    let t = UNIX_EPOCH + std::time::Duration::from_nanos(ns);
    humantime::format_rfc3339_nanos(t).to_string()
}

/// Parse an RFC 3339 time (`2026-11-22T10:15:03Z`) or a relative one
/// (`10 minutes ago`) into ns since the epoch.
pub fn parse_time(s: &str, now_ns: u64) -> Result<u64, String> {
    let t = s.trim();
    if let Some(rel) = t.strip_suffix("ago") {
        let d = humantime::parse_duration(rel.trim())
            .map_err(|e| format!("{s:?}: {e} (example: \"10 minutes ago\")"))?;
        return Ok(now_ns.saturating_sub(d.as_nanos() as u64));
    }
    let st = humantime::parse_rfc3339_weak(t)
        .map_err(|e| format!("{s:?} is not a time ({e}); use RFC 3339 such as 2026-11-22T10:15:03Z, or \"10 minutes ago\""))?;
    Ok(st
        .duration_since(UNIX_EPOCH)
        .map_err(|_| format!("{s:?} is before 1970"))?
        .as_nanos() as u64)
}

/// The host's boot id (a different one after a reboot).
pub fn boot_id(path: &std::path::Path) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        let t = parse_time("2026-11-22T10:15:03Z", 0).unwrap();
        assert_eq!(fmt_ns(t), "2026-11-22T10:15:03.000000000Z");
        let now = 1_000_000_000_000;
        assert_eq!(
            parse_time("10 minutes ago", now).unwrap(),
            now - 600_000_000_000
        );
        assert!(parse_time("yesterday-ish", now).is_err());
    }
}
