//! The drill's report: what was measured, as JSON (the record) and as one
//! self-contained HTML file (the read-out). The HTML loads nothing from
//! anywhere: the plots are SVG drawn here, so the file can be mailed,
//! archived or opened on an air-gapped host and still show everything.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Width of one legitimate-traffic sample, in milliseconds.
pub const BUCKET_MS: u64 = 250;

/// A whole drill: the run's settings, the legitimate population's samples
/// for the whole run, and one entry per attack in the order they ran.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// Format version of this record: 1.
    pub version: u32,
    /// When the drill started, Unix milliseconds; every `*_ms` below
    /// counts from here unless it says otherwise.
    pub started_unix_ms: u64,
    /// The config Palisade ran with (a path, or `quickstart`).
    pub config: String,
    /// Short, bounded attacks (`--quick`).
    pub quick: bool,
    /// What a verdict was judged against.
    pub thresholds: Thresholds,
    /// One sample per [`BUCKET_MS`] of the whole run.
    pub legit: Vec<LegitSample>,
    /// The attacks, in the order they ran.
    pub attacks: Vec<AttackReport>,
    /// Every attack that ran passed.
    pub pass: bool,
}

/// Verdict thresholds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Thresholds {
    /// Least share (0..=1) of legitimate requests that must succeed.
    pub min_legit_success: f64,
    /// Highest legitimate p99 latency allowed, if any.
    pub max_p99_ms: Option<f64>,
    /// How far above its baseline a resource (fds, RSS) may stay after an
    /// attack, as a share of the baseline (0.1: 10 %).
    pub resource_slack: f64,
}

/// The legitimate population in one [`BUCKET_MS`] bucket.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct LegitSample {
    /// Bucket start, milliseconds since the drill started.
    pub t_ms: u64,
    /// Requests sent in the bucket.
    pub sent: u32,
    /// Of them, answered successfully.
    pub ok: u32,
    /// 99th percentile latency of the bucket's requests, microseconds.
    pub p99_us: u64,
}

/// Which defense acted first on an attack, cheapest first.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    /// The XDP program dropped the packets.
    Xdp,
    /// The nftables ban set dropped them.
    Nftables,
    /// The connection guard refused the connection after `accept()`.
    Accept,
    /// An HTTP layer (rate limit, reputation, timeouts) answered or cut it.
    Http,
}

impl Layer {
    fn label(self) -> &'static str {
        match self {
            Self::Xdp => "XDP",
            Self::Nftables => "nftables",
            Self::Accept => "accept",
            Self::Http => "HTTP",
        }
    }
}

/// One attack and what Palisade did about it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AttackReport {
    /// Short name (`syn-flood`), as `--only`/`--skip` take it.
    pub name: String,
    /// One line saying what the attack does.
    pub title: String,
    /// Attack start, milliseconds since the drill started.
    pub start_ms: u64,
    /// Attack end, milliseconds since the drill started.
    pub end_ms: u64,
    /// Why it did not run (no `--redis`, no XDP, …).
    pub skipped: Option<String>,
    /// Milliseconds after `start_ms` until Palisade first counted it.
    pub detected_ms: Option<u64>,
    /// Milliseconds after `start_ms` until Palisade stopped it.
    pub mitigated_ms: Option<u64>,
    /// Which layer acted.
    pub layer: Option<Layer>,
    /// Packets, connections or requests the attacker sent.
    pub attack_sent: u64,
    /// CPU seconds (user + system) Palisade spent during the attack.
    pub palisade_cpu_s: f64,
    /// Legitimate traffic while the attack ran.
    pub legit_during: LegitSummary,
    /// Legitimate traffic after it stopped.
    pub legit_after: LegitSummary,
    /// Palisade's open file descriptors, but for its sockets to the
    /// upstream (the pool keeps those open by design).
    pub fds: Resource,
    /// Palisade's sockets to the upstream, idle pooled ones included.
    #[serde(default)]
    pub upstream_conns: Resource,
    /// Palisade's resident memory, KiB.
    pub rss_kib: Resource,
    /// Pass or fail, and why.
    pub verdict: Verdict,
}

/// The legitimate population over a span.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct LegitSummary {
    /// Share (0..=1) of requests answered successfully.
    pub success: f64,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: f64,
}

/// A resource measured before, during (at its peak) and after an attack.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Resource {
    /// Before the attack started.
    pub before: u64,
    /// The highest reading while it ran.
    pub during: u64,
    /// After it stopped and Palisade settled.
    pub after: u64,
}

/// An attack's verdict.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Verdict {
    /// Every threshold held.
    pub pass: bool,
    /// Why not (empty on a pass), one line each.
    pub reasons: Vec<String>,
}

impl Report {
    /// Writes the JSON record to `path`.
    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        let mut text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        text.push('\n');
        std::fs::write(path, text)
    }

    /// Writes the HTML read-out to `path`.
    pub fn write_html(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.html())
    }

    /// The report as one HTML document that loads nothing.
    pub fn html(&self) -> String {
        let mut h = String::with_capacity(64 * 1024);
        let verdict = if self.pass { "PASS" } else { "FAIL" };
        let _ = write!(
            h,
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
             <title>Palisade drill: {verdict}</title><style>{STYLE}</style></head><body>\n\
             <h1>Palisade drill <span class=\"{cls}\" id=\"overall\">{verdict}</span></h1>\n",
            cls = pass_class(self.pass),
        );
        let t = &self.thresholds;
        let _ = writeln!(
            h,
            "<p class=\"meta\">Started {} UTC · config <code>{}</code>{} · thresholds: legitimate \
             success ≥ {}, p99 ≤ {}, resources back within {} of baseline</p>",
            utc(self.started_unix_ms),
            esc(&self.config),
            if self.quick { " · quick" } else { "" },
            percent(t.min_legit_success),
            t.max_p99_ms.map_or_else(|| "any".to_owned(), ms),
            percent(t.resource_slack),
        );
        self.summary_table(&mut h);
        if let (Some(first), Some(last)) = (self.legit.first(), self.legit.last()) {
            h.push_str("<section class=\"panel\" id=\"overview\"><h2>Whole run</h2>\n");
            let windows: Vec<_> = self.ran().map(|a| (a.start_ms, a.end_ms)).collect();
            plot(
                &mut h,
                &self.legit,
                (first.t_ms, last.t_ms + BUCKET_MS),
                &windows,
                t,
                None,
            );
            h.push_str("</section>\n");
        }
        for (i, a) in self.attacks.iter().enumerate() {
            self.panel(&mut h, i, a);
        }
        h.push_str("</body></html>\n");
        h
    }

    fn ran(&self) -> impl Iterator<Item = &AttackReport> {
        self.attacks.iter().filter(|a| a.skipped.is_none())
    }

    fn summary_table(&self, h: &mut String) {
        h.push_str(
            "<table id=\"summary\"><thead><tr><th>Attack</th><th>Verdict</th><th>Detected</th>\
             <th>Mitigated</th><th>Layer</th><th>Legit success<br>during / after</th>\
             <th>Legit p99<br>during / after</th><th>Attack volume<br>per CPU-s</th>\
             <th>FDs<br>before / during / after</th><th>RSS MiB<br>before / during / after</th>\
             </tr></thead><tbody>\n",
        );
        for (i, a) in self.attacks.iter().enumerate() {
            let _ = write!(h, "<tr><td><a href=\"#attack-{i}\">{}</a></td>", esc(&a.name));
            if let Some(why) = &a.skipped {
                let _ = writeln!(
                    h,
                    "<td class=\"skip\">SKIPPED</td><td colspan=\"8\">{}</td></tr>",
                    esc(why)
                );
                continue;
            }
            let _ = writeln!(
                h,
                "<td class=\"{}\">{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{} / {}</td><td>{} / {}</td><td>{}</td><td>{} / {} / {}</td>\
                 <td>{} / {} / {}</td></tr>",
                pass_class(a.verdict.pass),
                verdict_text(a),
                a.detected_ms.map_or_else(|| "—".to_owned(), |v| ms(v as f64)),
                a.mitigated_ms.map_or_else(|| "—".to_owned(), |v| ms(v as f64)),
                a.layer.map_or("—", Layer::label),
                percent(a.legit_during.success),
                percent(a.legit_after.success),
                ms(a.legit_during.p99_ms),
                ms(a.legit_after.p99_ms),
                per_cpu_s(a.attack_sent, a.palisade_cpu_s),
                a.fds.before,
                a.fds.during,
                a.fds.after,
                mib(a.rss_kib.before),
                mib(a.rss_kib.during),
                mib(a.rss_kib.after),
            );
        }
        h.push_str("</tbody></table>\n");
    }

    fn panel(&self, h: &mut String, i: usize, a: &AttackReport) {
        let _ = writeln!(
            h,
            "<section class=\"panel attack\" id=\"attack-{i}\" data-name=\"{}\">\
             <h2>{} <span class=\"{}\">{}</span></h2><p>{}</p>",
            esc(&a.name),
            esc(&a.name),
            if a.skipped.is_some() {
                "skip"
            } else {
                pass_class(a.verdict.pass)
            },
            verdict_text(a),
            esc(&a.title),
        );
        if let Some(why) = &a.skipped {
            let _ = writeln!(h, "<p class=\"why\">Skipped: {}</p></section>", esc(why));
            return;
        }
        if !a.verdict.reasons.is_empty() {
            h.push_str("<ul class=\"reasons\">");
            for r in &a.verdict.reasons {
                let _ = write!(h, "<li>{}</li>", esc(r));
            }
            h.push_str("</ul>\n");
        }
        let _ = writeln!(
            h,
            "<p class=\"meta\">Sent {} in {} · Palisade CPU {:.2} s · detected {} · mitigated {} \
             · layer {}</p>",
            a.attack_sent,
            ms(a.end_ms.saturating_sub(a.start_ms) as f64),
            a.palisade_cpu_s,
            a.detected_ms
                .map_or_else(|| "never".to_owned(), |v| format!("after {}", ms(v as f64))),
            a.mitigated_ms
                .map_or_else(|| "never".to_owned(), |v| format!("after {}", ms(v as f64))),
            a.layer.map_or("none", Layer::label),
        );
        // Context on both sides of the window: the baseline before it, the
        // recovery after it.
        let pad = (a.end_ms.saturating_sub(a.start_ms) / 2).max(2_000);
        let run_end = self.legit.last().map_or(a.end_ms, |s| s.t_ms + BUCKET_MS);
        let span = (
            a.start_ms.saturating_sub(pad),
            (a.end_ms + pad).min(run_end.max(a.end_ms)),
        );
        let marks = Marks {
            detected: a.detected_ms.map(|d| a.start_ms + d),
            mitigated: a.mitigated_ms.map(|d| a.start_ms + d),
        };
        plot(
            h,
            &self.legit,
            span,
            &[(a.start_ms, a.end_ms)],
            &self.thresholds,
            Some(marks),
        );
        h.push_str("</section>\n");
    }
}

/// Detection and mitigation instants, drill milliseconds.
#[derive(Clone, Copy)]
struct Marks {
    detected: Option<u64>,
    mitigated: Option<u64>,
}

const W: f64 = 760.0;
const CHART_H: f64 = 120.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 18.0;
const GAP: f64 = 34.0;

/// Two charts sharing one time axis, legitimate success above and p99
/// latency below, with the attack windows shaded.
fn plot(
    h: &mut String,
    legit: &[LegitSample],
    (from, to): (u64, u64),
    windows: &[(u64, u64)],
    t: &Thresholds,
    marks: Option<Marks>,
) {
    let to = to.max(from + BUCKET_MS);
    let samples: Vec<_> = legit
        .iter()
        .filter(|s| s.t_ms + BUCKET_MS > from && s.t_ms < to)
        .collect();
    let height = TOP + CHART_H + GAP + CHART_H + 30.0;
    let plot_w = W - LEFT - RIGHT;
    let x = |ms: u64| LEFT + (ms.clamp(from, to) - from) as f64 / (to - from) as f64 * plot_w;
    let top2 = TOP + CHART_H + GAP;
    let max_p99 = samples
        .iter()
        .map(|s| s.p99_us as f64 / 1000.0)
        .chain(t.max_p99_ms)
        .fold(1.0_f64, f64::max);
    let lat_top = nice_ceiling(max_p99);
    let _ = writeln!(
        h,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {height}\" role=\"img\" \
         aria-label=\"legitimate success and p99 latency over time\">"
    );
    for (y0, label) in [(TOP, "legit success"), (top2, "legit p99")] {
        for &(ws, we) in windows {
            if we > from && ws < to {
                let _ = write!(
                    h,
                    "<rect class=\"window\" x=\"{:.1}\" y=\"{y0}\" width=\"{:.1}\" height=\"{CHART_H}\"/>",
                    x(ws),
                    (x(we) - x(ws)).max(1.0)
                );
            }
        }
        let _ = writeln!(
            h,
            "<rect class=\"frame\" x=\"{LEFT}\" y=\"{y0}\" width=\"{plot_w}\" height=\"{CHART_H}\"/>\
             <text x=\"{LEFT}\" y=\"{:.1}\" class=\"label\">{label}</text>",
            y0 - 5.0
        );
    }
    let y_success = |f: f64| TOP + (1.0 - f.clamp(0.0, 1.0)) * CHART_H;
    let y_lat = |v: f64| top2 + (1.0 - (v / lat_top).clamp(0.0, 1.0)) * CHART_H;
    for f in [0.0, 0.5, 1.0] {
        let _ = write!(
            h,
            "<text x=\"{:.1}\" y=\"{:.1}\" class=\"tick\" text-anchor=\"end\">{}</text>",
            LEFT - 4.0,
            y_success(f) + 4.0,
            percent(f)
        );
    }
    for f in [0.0, 0.5, 1.0] {
        let _ = write!(
            h,
            "<text x=\"{:.1}\" y=\"{:.1}\" class=\"tick\" text-anchor=\"end\">{}</text>",
            LEFT - 4.0,
            y_lat(f * lat_top) + 4.0,
            ms(f * lat_top)
        );
    }
    let yt = y_success(t.min_legit_success);
    let _ = write!(
        h,
        "<line class=\"threshold\" x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{yt:.1}\" y2=\"{yt:.1}\"/>",
        LEFT + plot_w
    );
    if let Some(max) = t.max_p99_ms {
        let yt = y_lat(max);
        let _ = write!(
            h,
            "<line class=\"threshold\" x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{yt:.1}\" y2=\"{yt:.1}\"/>",
            LEFT + plot_w
        );
    }
    let step = nice_step((to - from) as f64 / 6.0);
    let mut tick = from.div_ceil(step) * step;
    while tick <= to {
        let _ = write!(
            h,
            "<text x=\"{:.1}\" y=\"{:.1}\" class=\"tick\" text-anchor=\"middle\">{}</text>",
            x(tick),
            height - 8.0,
            seconds(tick)
        );
        tick += step;
    }
    // A bucket with nothing sent has no success rate: the line breaks
    // there instead of pretending it was 0 % or 100 %.
    let mid = |s: &LegitSample| x(s.t_ms + BUCKET_MS / 2);
    let success = path(&samples, |s| {
        (s.sent > 0).then(|| (mid(s), y_success(f64::from(s.ok) / f64::from(s.sent))))
    });
    let latency = path(&samples, |s| {
        (s.sent > 0).then(|| (mid(s), y_lat(s.p99_us as f64 / 1000.0)))
    });
    let _ = writeln!(
        h,
        "<path class=\"success\" d=\"{success}\"/><path class=\"latency\" d=\"{latency}\"/>"
    );
    if let Some(m) = marks {
        for (at, class) in [(m.detected, "detected"), (m.mitigated, "mitigated")] {
            if let Some(at) = at.filter(|&at| at >= from && at <= to) {
                let _ = write!(
                    h,
                    "<line class=\"{class}\" x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{TOP}\" \
                     y2=\"{:.1}\"><title>{class}</title></line>",
                    top2 + CHART_H,
                    x = x(at),
                );
            }
        }
    }
    h.push_str("</svg>\n");
}

/// An SVG path through the points `point` gives, broken where it gives none.
fn path(samples: &[&LegitSample], point: impl Fn(&LegitSample) -> Option<(f64, f64)>) -> String {
    let mut d = String::new();
    let mut pen_down = false;
    for s in samples {
        match point(s) {
            Some((x, y)) => {
                let _ = write!(d, "{}{x:.1},{y:.1} ", if pen_down { "L" } else { "M" });
                pen_down = true;
            }
            None => pen_down = false,
        }
    }
    d
}

/// The smallest 1, 2 or 5 times a power of ten that is ≥ `v` (v > 0).
fn nice_ceiling(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|&c| c >= v)
        .unwrap_or(10.0 * p)
}

/// A tick step in milliseconds near `approx`: 250 ms, 500 ms, 1 s, 2 s, 5 s…
fn nice_step(approx: f64) -> u64 {
    [
        250, 500, 1_000, 2_000, 5_000, 10_000, 15_000, 30_000, 60_000, 120_000, 300_000, 600_000,
    ]
    .into_iter()
    .find(|&s| s as f64 >= approx)
    .unwrap_or(1_800_000)
}

const STYLE: &str = "\
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}\
h1 span,h2 span{font-size:.8em;padding:1px 8px;border-radius:4px;margin-left:8px}\
.pass{background:#d7f5dd;color:#135c22}.fail{background:#fbd9d9;color:#8a1414}\
.skip{background:#eee;color:#555}\
table{border-collapse:collapse;margin:16px 0}th,td{border:1px solid #ccc;padding:4px 8px;\
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}\
td.pass,td.fail,td.skip{text-align:center;font-weight:bold}\
.panel{border:1px solid #ddd;border-radius:6px;padding:8px 16px;margin:16px 0}\
.meta{color:#555}.reasons{color:#8a1414}code{background:#f4f4f4;padding:0 3px}\
svg{width:100%;max-width:760px;height:auto;display:block}\
svg .window{fill:#f5c6a5;opacity:.55}svg .frame{fill:none;stroke:#bbb}\
svg .label{font-size:12px;fill:#333}svg .tick{font-size:10px;fill:#666}\
svg .threshold{stroke:#c33;stroke-dasharray:4 3}\
svg .success{fill:none;stroke:#1a7f37;stroke-width:1.5}\
svg .latency{fill:none;stroke:#2456c9;stroke-width:1.5}\
svg .detected{stroke:#a06000;stroke-dasharray:2 2}svg .mitigated{stroke:#6a1b9a}";

fn pass_class(pass: bool) -> &'static str {
    if pass { "pass" } else { "fail" }
}

fn verdict_text(a: &AttackReport) -> &'static str {
    match (&a.skipped, a.verdict.pass) {
        (Some(_), _) => "SKIPPED",
        (None, true) => "PASS",
        (None, false) => "FAIL",
    }
}

/// Escapes text for HTML element content and quoted attributes.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn percent(f: f64) -> String {
    if !f.is_finite() {
        return "—".to_owned();
    }
    let p = f * 100.0;
    if p == p.trunc() {
        format!("{p:.0} %")
    } else {
        format!("{p:.1} %")
    }
}

fn ms(v: f64) -> String {
    if !v.is_finite() {
        "—".to_owned()
    } else if v >= 1_000.0 {
        format!("{:.2} s", v / 1_000.0)
    } else if v >= 10.0 || v == 0.0 {
        format!("{v:.0} ms")
    } else {
        format!("{v:.1} ms")
    }
}

fn seconds(ms: u64) -> String {
    if ms.is_multiple_of(1_000) {
        format!("{} s", ms / 1_000)
    } else {
        format!("{:.2} s", ms as f64 / 1_000.0)
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn per_cpu_s(sent: u64, cpu_s: f64) -> String {
    if cpu_s <= 0.0 || !cpu_s.is_finite() {
        return "—".to_owned();
    }
    let v = sent as f64 / cpu_s;
    match v {
        v if v >= 1e6 => format!("{:.1} M", v / 1e6),
        v if v >= 1e3 => format!("{:.1} k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

/// `YYYY-MM-DD HH:MM:SS` for Unix milliseconds (UTC; days to civil date
/// after Howard Hinnant's algorithm).
fn utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A 20 s run with two attacks that ran (one failed) and one skipped,
    /// whose names and reasons carry markup that must come out as text.
    pub(crate) fn sample() -> Report {
        let legit = (0..80)
            .map(|i| {
                let t_ms = i * BUCKET_MS;
                let hit = (6_000..9_000).contains(&t_ms);
                LegitSample {
                    t_ms,
                    sent: if i == 40 { 0 } else { 50 },
                    ok: if hit { 40 } else { 50 },
                    p99_us: if hit { 180_000 } else { 4_000 },
                }
            })
            .collect();
        let attack = |name: &str, start_ms, end_ms, pass: bool| AttackReport {
            name: name.to_owned(),
            title: format!("the {name} attack"),
            start_ms,
            end_ms,
            skipped: None,
            detected_ms: Some(120),
            mitigated_ms: pass.then_some(400),
            layer: pass.then_some(Layer::Xdp),
            attack_sent: 30_000,
            palisade_cpu_s: 0.25,
            legit_during: LegitSummary {
                success: if pass { 1.0 } else { 0.8 },
                p99_ms: 4.2,
            },
            legit_after: LegitSummary {
                success: 1.0,
                p99_ms: 4.0,
            },
            fds: Resource {
                before: 20,
                during: 900,
                after: 21,
            },
            upstream_conns: Resource {
                before: 12,
                during: 200,
                after: 150,
            },
            rss_kib: Resource {
                before: 10_240,
                during: 30_000,
                after: 10_400,
            },
            verdict: Verdict {
                pass,
                reasons: if pass {
                    vec![]
                } else {
                    vec!["legitimate success 80 % < 99 % <during>".to_owned()]
                },
            },
        };
        let mut skipped = attack("redis-forged", 19_000, 19_000, true);
        skipped.skipped = Some("needs --redis <url> & cluster mode".to_owned());
        Report {
            version: 1,
            started_unix_ms: 1_796_300_000_000,
            config: "/etc/palisade/<odd>.toml".to_owned(),
            quick: true,
            thresholds: Thresholds {
                min_legit_success: 0.99,
                max_p99_ms: Some(250.0),
                resource_slack: 0.1,
            },
            legit,
            attacks: vec![
                attack("syn-flood", 2_000, 4_000, true),
                attack("<script>alert(1)</script>", 6_000, 9_000, false),
                skipped,
            ],
            pass: false,
        }
    }

    #[test]
    fn json_has_the_agreed_shape_and_reads_back() {
        let r = sample();
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["thresholds"]["max_p99_ms"], 250.0);
        assert_eq!(
            v["legit"][3],
            serde_json::json!({"t_ms": 750, "sent": 50, "ok": 50, "p99_us": 4000})
        );
        let a = &v["attacks"][0];
        assert_eq!(a["layer"], "xdp");
        assert_eq!(a["skipped"], serde_json::Value::Null);
        assert_eq!(
            a["fds"],
            serde_json::json!({"before": 20, "during": 900, "after": 21})
        );
        assert_eq!(
            a["legit_during"],
            serde_json::json!({"success": 1.0, "p99_ms": 4.2})
        );
        assert_eq!(v["attacks"][1]["layer"], serde_json::Value::Null);
        assert_eq!(v["attacks"][1]["verdict"]["pass"], false);
        let back: Report = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn html_escapes_every_text() {
        let html = sample().html();
        assert!(!html.contains("<script>"), "an attack name became markup");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("&lt;during&gt;"));
        assert!(html.contains("/etc/palisade/&lt;odd&gt;.toml"));
        assert!(html.contains("--redis &lt;url&gt; &amp; cluster mode"));
        assert_eq!(esc("a\"b'c"), "a&quot;b&#39;c");
    }

    #[test]
    fn html_loads_nothing_from_outside() {
        let html = sample().html();
        for needle in ["<script", "<link", "src=", "@import", "url("] {
            assert!(!html.contains(needle), "{needle} in the report");
        }
        // The SVG namespace is an identifier, not a fetch.
        assert_eq!(
            html.matches("http").count(),
            html.matches("http://www.w3.org/2000/svg").count()
        );
    }

    #[test]
    fn plot_breaks_the_line_where_nothing_was_sent() {
        let html = sample().html();
        // Sample 40 sent nothing: the success line lifts the pen there, so
        // the whole-run plot has two sub-paths.
        let overview = html.split("id=\"overview\"").nth(1).unwrap();
        let d = overview.split("class=\"success\" d=\"").nth(1).unwrap();
        let d = &d[..d.find('"').unwrap()];
        assert_eq!(d.matches('M').count(), 2, "{d}");
        assert_eq!(d.matches(['M', 'L']).count(), 79, "{d}");
    }

    #[test]
    fn plot_scales_latency_to_a_round_top() {
        assert_eq!(nice_ceiling(180.0), 200.0);
        assert_eq!(nice_ceiling(250.0), 500.0);
        assert_eq!(nice_ceiling(1.0), 1.0);
        assert_eq!(nice_ceiling(0.3), 0.5);
        assert_eq!(nice_step(20_000.0 / 6.0), 5_000);
    }

    /// Headless Chromium, or `None` after saying why not (under `CI`, a
    /// missing browser is a failure: CI must really render the report).
    fn chromium() -> Option<&'static str> {
        let found = std::process::Command::new("chromium")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            assert!(std::env::var_os("CI").is_none(), "chromium is needed in CI");
            eprintln!("skipped: no chromium on PATH (apt-get install chromium)");
        }
        found.then_some("chromium")
    }

    fn headless(browser: &str, dir: &Path, args: &[&str]) -> std::process::Output {
        std::process::Command::new(browser)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
            ])
            .arg(format!("--user-data-dir={}", dir.join("profile").display()))
            .args(args)
            .output()
            .unwrap()
    }

    #[test]
    fn chromium_renders_a_panel_verdict_and_plot_per_attack() {
        let Some(browser) = chromium() else { return };
        let dir = std::env::temp_dir().join(format!("palisade-report-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("report.html");
        let report = sample();
        report.write_html(&file).unwrap();
        let url = format!("file://{}", file.display());

        let out = headless(browser, &dir, &["--dump-dom", &url]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let dom = String::from_utf8(out.stdout).unwrap();
        // What the browser built, not what was written: an attack name
        // that looks like a tag must have stayed text.
        assert!(!dom.contains("<script"), "{dom}");
        assert!(dom.contains("id=\"overall\">FAIL</span>"), "{dom}");
        let summary = dom.split("<table id=\"summary\">").nth(1).unwrap();
        let summary = &summary[..summary.find("</table>").unwrap()];
        assert_eq!(
            summary.matches("<tr>").count(),
            1 + report.attacks.len(),
            "{summary}"
        );
        for (i, a) in report.attacks.iter().enumerate() {
            let open = format!("id=\"attack-{i}\"");
            let panel = dom
                .split(&open)
                .nth(1)
                .unwrap_or_else(|| panic!("no panel {i}: {dom}"));
            let panel = &panel[..panel.find("</section>").unwrap()];
            assert!(panel.contains(&esc(&a.name)), "{panel}");
            let (verdict, svgs) = match (&a.skipped, a.verdict.pass) {
                (Some(_), _) => ("SKIPPED", 0),
                (None, true) => ("PASS", 1),
                (None, false) => ("FAIL", 1),
            };
            assert!(panel.contains(&format!(">{verdict}</span>")), "{panel}");
            assert_eq!(panel.matches("<svg").count(), svgs, "{panel}");
            if a.skipped.is_none() {
                assert_eq!(panel.matches("class=\"window\"").count(), 2, "{panel}");
                assert!(panel.contains("class=\"success\" d=\"M"), "{panel}");
            }
            for r in &a.verdict.reasons {
                assert!(panel.contains(&format!("<li>{}</li>", esc(r))), "{panel}");
            }
        }

        let shot = dir.join("report.png");
        let out = headless(
            browser,
            &dir,
            &[
                &format!("--screenshot={}", shot.display()),
                "--window-size=1100,2400",
                &url,
            ],
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let png = std::fs::read(&shot).unwrap();
        assert!(
            png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
            "{} bytes",
            png.len()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn utc_dates() {
        // Expected values from `date -u -d @SECONDS`.
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(utc(1_796_300_000_123), "2026-12-03 12:13:20");
    }

    #[test]
    fn units() {
        assert_eq!(percent(0.99), "99 %");
        assert_eq!(percent(0.995), "99.5 %");
        assert_eq!(ms(4.2), "4.2 ms");
        assert_eq!(ms(1_500.0), "1.50 s");
        assert_eq!(per_cpu_s(30_000, 0.25), "120.0 k");
        assert_eq!(per_cpu_s(1, 0.0), "—");
    }
}
