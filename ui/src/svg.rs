//! A VM's timeline as one self-contained SVG: one lane per disk over the
//! whole history (restorable ranges, baselines, marks, gaps, degraded
//! windows), a time axis, the RPO per target over its own axis (the last
//! hours), and a legend. No script, no external reference.

use std::fmt::Write;

use crate::model::{DiskTimeline, RpoSeries, Timeline};
use crate::text::{clip, esc, secs, tick, utc};

const WIDTH: f64 = 960.0;
const X0: f64 = 150.0;
const X1: f64 = 940.0;
const LANE: f64 = 36.0;
const RPO_H: f64 = 90.0;
const PALETTE: &[&str] = &[
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// A time window mapped onto [X0, X1].
#[derive(Clone, Copy)]
struct Axis {
    from: u64,
    to: u64,
}

impl Axis {
    /// Covers `times` and `now`; an hour before `now` when there is nothing.
    fn fit(times: impl Iterator<Item = u64>, now: u64) -> Axis {
        let (mut from, mut to) = (u64::MAX, now);
        for t in times {
            from = from.min(t);
            to = to.max(t);
        }
        if from == u64::MAX {
            from = now.saturating_sub(3_600_000_000_000);
        }
        if to <= from {
            if to == u64::MAX {
                from = to - 1_000_000_000;
            } else {
                to = from + 1_000_000_000;
            }
        }
        Axis { from, to }
    }

    fn span(self) -> u64 {
        self.to - self.from
    }

    fn x(self, ns: u64) -> f64 {
        let off = ns.clamp(self.from, self.to) - self.from;
        X0 + off as f64 / self.span() as f64 * (X1 - X0)
    }

    /// Tick times: multiples of a round step, at most 8.
    fn ticks(self) -> Vec<u64> {
        const S: u64 = 1_000_000_000;
        let steps = [
            S,
            2 * S,
            5 * S,
            10 * S,
            15 * S,
            30 * S,
            60 * S,
            120 * S,
            300 * S,
            600 * S,
            900 * S,
            1800 * S,
            3600 * S,
            7200 * S,
            3 * 3600 * S,
            6 * 3600 * S,
            12 * 3600 * S,
            86_400 * S,
            2 * 86_400 * S,
            7 * 86_400 * S,
            14 * 86_400 * S,
            30 * 86_400 * S,
            91 * 86_400 * S,
            365 * 86_400 * S,
        ];
        let step = steps
            .iter()
            .copied()
            .find(|s| self.span() / s <= 6)
            .unwrap_or(self.span() / 6 + 1);
        let first = self.from.div_ceil(step).saturating_mul(step);
        (0..8u64)
            .filter_map(|i| first.checked_add(i.checked_mul(step)?))
            .filter(|t| *t <= self.to)
            .collect()
    }

    /// The axis line, ticks and labels at `y`.
    fn draw(self, out: &mut String, y: f64) {
        let _ = write!(
            out,
            r##"<line x1="{X0}" y1="{y}" x2="{X1}" y2="{y}" stroke="#555"/>"##
        );
        for t in self.ticks() {
            let x = self.x(t);
            let _ = write!(
                out,
                r##"<line x1="{x:.1}" y1="{y}" x2="{x:.1}" y2="{:.1}" stroke="#555"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" class="tick">{}</text>"##,
                y + 4.0,
                y + 16.0,
                esc(&tick(t, self.span()))
            );
        }
    }
}

/// Every time a disk lane draws (to fit the axis).
fn disk_times(d: &DiskTimeline) -> impl Iterator<Item = u64> + '_ {
    let spans = d.restorable.iter().flat_map(|s| [s.from_ns, s.to_ns]);
    let base = d.baselines.iter().map(|b| b.time_ns);
    let marks = d.marks.iter().map(|m| m.time_ns);
    let gaps = d.gaps.iter().map(|g| g.time_ns);
    let windows = d
        .degraded
        .iter()
        .flat_map(|w| std::iter::once(w.from_ns).chain(w.to_ns));
    spans.chain(base).chain(marks).chain(gaps).chain(windows)
}

/// One disk's lane with its top at `y`.
fn lane(out: &mut String, ax: Axis, d: &DiskTimeline, y: f64) {
    let bar = y + 12.0;
    let _ = write!(
        out,
        r##"<g class="lane"><text x="{:.1}" y="{:.1}" text-anchor="end" class="disk">{}</text><rect x="{X0}" y="{bar}" width="{:.1}" height="14" fill="#ddd"><title>no restorable point</title></rect>"##,
        X0 - 8.0,
        bar + 11.0,
        esc(&clip(&d.disk, 20)),
        X1 - X0
    );
    for s in &d.restorable {
        let (a, b) = (ax.x(s.from_ns.min(s.to_ns)), ax.x(s.to_ns.max(s.from_ns)));
        let _ = write!(
            out,
            r##"<rect class="restorable" x="{a:.1}" y="{bar}" width="{:.1}" height="14" fill="#3a9d5d"><title>restorable from {} to {}</title></rect>"##,
            (b - a).max(1.0),
            utc(s.from_ns),
            utc(s.to_ns)
        );
    }
    for w in &d.degraded {
        let a = ax.x(w.from_ns);
        let b = ax.x(w.to_ns.unwrap_or(ax.to));
        let until = w.to_ns.map_or("now".to_string(), utc);
        let _ = write!(
            out,
            r##"<rect class="degraded" x="{a:.1}" y="{bar}" width="{:.1}" height="14" fill="#e8a33d"><title>not restorable from {} to {until}: {}</title></rect>"##,
            (b - a).max(2.0),
            utc(w.from_ns),
            esc(&w.reason)
        );
    }
    for g in &d.gaps {
        let x = ax.x(g.time_ns);
        let _ = write!(
            out,
            r##"<line class="gap" x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#c0392b" stroke-width="3"><title>GAP at {} (seq {}): {}</title></line>"##,
            bar - 4.0,
            bar + 18.0,
            utc(g.time_ns),
            g.seq,
            esc(&g.reason)
        );
    }
    for b in &d.baselines {
        let x = ax.x(b.time_ns);
        let _ = write!(
            out,
            r##"<path class="baseline" d="M{x:.1} {:.1} l5 5 l-5 5 l-5 -5 z" fill="#2c6fbb"><title>baseline {} (consistent from seq {})</title></path>"##,
            bar + 2.0,
            utc(b.time_ns),
            b.seq
        );
    }
    for m in &d.marks {
        let x = ax.x(m.time_ns);
        let (fill, q) = if m.quiesced {
            ("#6a3d9a", "quiesced")
        } else {
            ("#fff", "not quiesced")
        };
        let _ = write!(
            out,
            r##"<path class="mark" d="M{x:.1} {bar:.1} l-5 -9 l10 0 z" fill="{fill}" stroke="#6a3d9a" stroke-width="1.5"><title>mark {} at {} (seq {}, {q})</title></path>"##,
            esc(&m.label),
            utc(m.time_ns),
            m.seq
        );
    }
    out.push_str("</g>");
}

/// The RPO chart with its top at `y` (height RPO_H + axis): one line per
/// target over the sampled window.
fn rpo_chart(out: &mut String, series: &[RpoSeries], now: u64, y: f64) {
    let finite = |s: &(u64, f64)| s.1.is_finite();
    let ax = Axis::fit(
        series.iter().flat_map(|s| s.samples.iter().map(|p| p.0)),
        now,
    );
    let max = series
        .iter()
        .flat_map(|s| s.samples.iter().filter(|p| finite(p)).map(|p| p.1))
        .fold(1.0f64, f64::max);
    let _ = write!(
        out,
        r##"<g class="rpo"><text x="{:.1}" y="{:.1}" text-anchor="end" class="disk">RPO</text><rect x="{X0}" y="{y}" width="{:.1}" height="{RPO_H}" fill="#f7f7f7" stroke="#ccc"/><text x="{:.1}" y="{:.1}" text-anchor="end" class="tick">{}</text><text x="{:.1}" y="{:.1}" text-anchor="end" class="tick">0</text>"##,
        X0 - 8.0,
        y + RPO_H / 2.0,
        X1 - X0,
        X0 - 4.0,
        y + 10.0,
        esc(&secs(max)),
        X0 - 4.0,
        y + RPO_H,
    );
    for (i, s) in series.iter().filter(|s| !s.samples.is_empty()).enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let mut pts = String::new();
        for &(t, v) in s.samples.iter().filter(|p| finite(p)) {
            let yv = y + RPO_H - v.clamp(0.0, max) / max * RPO_H;
            let _ = write!(pts, "{:.1},{:.1} ", ax.x(t), yv);
        }
        let _ = write!(
            out,
            r##"<polyline class="rpo-line" points="{}" fill="none" stroke="{color}" stroke-width="1.5"><title>RPO of target {}</title></polyline>"##,
            pts.trim_end(),
            esc(&s.target)
        );
    }
    ax.draw(out, y + RPO_H);
    out.push_str("</g>");
}

/// The legend's items placed in rows: (x, row, colour, text); targets of
/// the RPO chart get their line's colour.
fn legend_items(series: &[RpoSeries]) -> Vec<(f64, usize, &'static str, String)> {
    let mut items: Vec<(&'static str, String)> = vec![
        ("#3a9d5d", "restorable".into()),
        ("#ddd", "no restorable point".into()),
        ("#e8a33d", "degraded / unjournaled".into()),
        ("#c0392b", "gap".into()),
        ("#2c6fbb", "baseline".into()),
        ("#6a3d9a", "mark (filled: quiesced)".into()),
    ];
    for (i, s) in series.iter().filter(|s| !s.samples.is_empty()).enumerate() {
        let name = format!("RPO {}", clip(&s.target, 24));
        items.push((PALETTE[i % PALETTE.len()], name));
    }
    let (mut x, mut row) = (X0, 0);
    let mut out = Vec::new();
    for (color, name) in items {
        let w = 26.0 + 6.5 * name.chars().count() as f64;
        if x + w > WIDTH && x > X0 {
            x = X0;
            row += 1;
        }
        out.push((x, row, color, name));
        x += w;
    }
    out
}

/// The legend with its top at `y`.
fn legend(out: &mut String, items: &[(f64, usize, &str, String)], y: f64) {
    out.push_str(r#"<g class="legend">"#);
    for (x, row, color, name) in items {
        let row = y + 18.0 * *row as f64;
        let _ = write!(
            out,
            r##"<rect x="{x:.1}" y="{row:.1}" width="12" height="12" fill="{color}" stroke="#888"/><text x="{:.1}" y="{:.1}" class="tick">{}</text>"##,
            x + 16.0,
            row + 10.0,
            esc(name)
        );
    }
    out.push_str("</g>");
}

/// The timeline of `t` as an `<svg>` element (standalone file or inline in
/// HTML alike).
pub fn timeline_svg(t: &Timeline) -> String {
    let ax = Axis::fit(t.disks.iter().flat_map(disk_times), t.now_ns);
    let has_rpo = t.rpo.iter().any(|s| !s.samples.is_empty());
    let lanes_h = LANE * t.disks.len().max(1) as f64;
    let axis_y = 34.0 + lanes_h;
    let rpo_y = axis_y + 34.0;
    let legend_y = if has_rpo {
        rpo_y + RPO_H + 30.0
    } else {
        axis_y + 30.0
    };
    let items = legend_items(&t.rpo);
    let rows = items.last().map_or(0, |i| i.1) + 1;
    let height = legend_y + 18.0 * rows as f64 + 6.0;
    let mut out = String::new();
    let _ = write!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" class="timeline" width="{WIDTH}" height="{height:.0}" viewBox="0 0 {WIDTH} {height:.0}" font-family="sans-serif" font-size="11"><style>.tick{{font-size:10px;fill:#333}} .disk{{font-size:12px;font-weight:bold;fill:#222}} .title{{font-size:13px;font-weight:bold}}</style><rect width="100%" height="100%" fill="#fff"/><text x="8" y="18" class="title">{} — {} (UTC)</text>"##,
        esc(&clip(&t.vm_name, 60)),
        esc(&t.vm_uuid)
    );
    if t.disks.is_empty() {
        let _ = write!(
            out,
            r#"<text x="{X0}" y="{:.1}">no disk recorded</text>"#,
            34.0 + 20.0
        );
    }
    for (i, d) in t.disks.iter().enumerate() {
        lane(&mut out, ax, d, 34.0 + LANE * i as f64);
    }
    ax.draw(&mut out, axis_y);
    if has_rpo {
        rpo_chart(&mut out, &t.rpo, t.now_ns, rpo_y);
    }
    legend(&mut out, &items, legend_y);
    out.push_str("</svg>\n");
    out
}
