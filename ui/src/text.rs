//! Escaping and formatting shared by the views.

use std::fmt::Write;

/// `s` as XML/HTML text or attribute value: the five special characters
/// escaped, and every character XML 1.0 does not allow (control characters,
/// U+FFFE, U+FFFF) replaced by U+FFFD, so hostile names stay text.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{7f}' => out.push('\u{fffd}'),
            '\u{fffe}' | '\u{ffff}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// At most `n` characters of `s`, "…" when cut (long labels stay readable).
pub fn clip(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil(days: i64) -> (i64, u32, u32) {
    // Howard Hinnant's days_from_civil inverse.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `ns` since the epoch as "YYYY-MM-DD HH:MM:SS" UTC.
pub fn utc(ns: u64) -> String {
    let s = ns / 1_000_000_000;
    let (y, mo, d) = civil((s / 86_400) as i64);
    let t = s % 86_400;
    format!(
        "{y:04}-{mo:02}-{d:02} {:02}:{:02}:{:02}",
        t / 3600,
        t / 60 % 60,
        t % 60
    )
}

/// A short label for an axis tick: the time of day, with the date when the
/// axis spans more than a day.
pub fn tick(ns: u64, span_ns: u64) -> String {
    let full = utc(ns);
    let (date, time) = full.split_once(' ').unwrap_or((&full, ""));
    if span_ns > 86_400_000_000_000 {
        format!("{date} {}", &time[..5])
    } else if span_ns > 600_000_000_000 {
        time[..5].to_string()
    } else {
        time.to_string()
    }
}

/// Seconds for a human: "0.4 s", "3 min 20 s", "2 h 5 min".
pub fn secs(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "?".into();
    }
    if s < 10.0 {
        return format!("{s:.1} s");
    }
    let n = s.round() as u64;
    match n {
        0..=59 => format!("{n} s"),
        60..=3599 => format!("{} min {} s", n / 60, n % 60),
        _ => format!("{} h {} min", n / 3600, n / 60 % 60),
    }
}

/// Bytes for a human, binary units.
pub fn bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    let mut s = String::new();
    if u == 0 {
        let _ = write!(s, "{n} B");
    } else {
        let _ = write!(s, "{v:.1} {}", units[u]);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_drops_control_characters() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(esc("a\u{0}b\u{1b}c\u{ffff}"), "a\u{fffd}b\u{fffd}c\u{fffd}");
    }

    #[test]
    fn formats_utc_times() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        // 2026-11-27 12:34:56 UTC
        assert_eq!(utc(1_795_782_896_000_000_000), "2026-11-27 12:34:56");
        assert_eq!(utc(951_782_400_000_000_000), "2000-02-29 00:00:00");
        assert_eq!(tick(1_795_782_896_000_000_000, 3_600_000_000_000), "12:34");
    }

    #[test]
    fn clips_and_formats_amounts() {
        assert_eq!(clip("abcdef", 3), "abc…");
        assert_eq!(clip("ab", 3), "ab");
        assert_eq!(secs(0.42), "0.4 s");
        assert_eq!(secs(200.0), "3 min 20 s");
        assert_eq!(secs(f64::NAN), "?");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
    }
}
