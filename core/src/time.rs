//! Wall-clock helpers and time points.

use std::time::{SystemTime, UNIX_EPOCH};

use thiserror::Error;

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

/// A time point that does not parse.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum TimeError {
    #[error("{value:?}: {source} (example: \"10 minutes ago\")")]
    Relative {
        value: String,
        #[source]
        source: humantime::DurationError,
    },
    #[error("{value:?} is not a time ({source}); use RFC 3339 such as 2026-11-22T10:15:03Z, or \"10 minutes ago\"")]
    Absolute {
        value: String,
        #[source]
        source: humantime::TimestampError,
    },
    #[error("{0:?} is before 1970")]
    BeforeEpoch(String),
}

/// Parse an RFC 3339 time (`2026-11-22T10:15:03Z`) or a relative one
/// (`10 minutes ago`) into ns since the epoch.
pub fn parse_time(s: &str, now_ns: u64) -> Result<u64, TimeError> {
    let t = s.trim();
    if let Some(rel) = t.strip_suffix("ago") {
        let d = humantime::parse_duration(rel.trim()).map_err(|source| TimeError::Relative {
            value: s.into(),
            source,
        })?;
        return Ok(now_ns.saturating_sub(d.as_nanos() as u64));
    }
    let st = humantime::parse_rfc3339_weak(t).map_err(|source| TimeError::Absolute {
        value: s.into(),
        source,
    })?;
    Ok(st
        .duration_since(UNIX_EPOCH)
        .map_err(|_| TimeError::BeforeEpoch(s.into()))?
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

    #[test]
    fn time_errors_say_which_form_failed() {
        let now = 1_000_000_000_000;
        assert!(matches!(
            parse_time("ten minutes ago", now),
            Err(TimeError::Relative { .. })
        ));
        assert!(matches!(
            parse_time("2026-13-01T00:00:00Z", now),
            Err(TimeError::Absolute { .. })
        ));
        let e = parse_time("yesterday-ish", now).unwrap_err().to_string();
        assert!(e.contains("yesterday-ish") && e.contains("RFC 3339"), "{e}");
        // A relative time further back than the epoch clamps to 0.
        assert_eq!(parse_time("100 years ago", now).unwrap(), 0);
        assert_eq!(
            parse_time(" 2026-11-22T10:15:03Z ", 0).unwrap(),
            parse_time("2026-11-22T10:15:03Z", 0).unwrap()
        );
    }

    #[test]
    fn boot_id_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("boot_id");
        std::fs::write(&p, "abc-123\n").unwrap();
        assert_eq!(boot_id(&p).unwrap(), "abc-123");
        assert!(boot_id(&dir.path().join("none")).is_err());
    }
}
