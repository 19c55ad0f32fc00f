//! Small SVG charts for the routing analysis: grouped bars, lines and a heatmap. Plain SVG
//! text with generic fonts, no plotting or font dependency, so they render the same in a
//! browser, on GitHub and in `rsvg-convert`.

use std::fmt::Write;

const W: f64 = 760.0;
const H: f64 = 360.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;

/// One named series of values, drawn in `colour`.
pub struct Series<'a> {
    pub label: &'a str,
    pub colour: &'a str,
    pub values: &'a [f64],
}

fn header(out: &mut String, w: f64, h: f64, title: &str) {
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12"><rect width="{w}" height="{h}" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        w / 2.0,
        escape(title)
    );
}

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Y axis from 0 to `max` with 5 grid lines, labelled as percentages.
fn y_axis(out: &mut String, max: f64, y_label: &str) {
    let plot_h = H - TOP - BOTTOM;
    for i in 0..=5 {
        let v = max * i as f64 / 5.0;
        let y = H - BOTTOM - plot_h * i as f64 / 5.0;
        let _ = write!(
            out,
            r##"<line x1="{LEFT}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{:.0}%</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            100.0 * v
        );
    }
    let _ = write!(
        out,
        r#"<text transform="translate(16 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
        TOP + plot_h / 2.0,
        escape(y_label)
    );
}

fn legend(out: &mut String, series: &[Series]) {
    for (i, s) in series.iter().enumerate() {
        let x = LEFT + 10.0 + 170.0 * i as f64;
        let _ = write!(
            out,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            H - 22.0,
            s.colour,
            x + 16.0,
            H - 12.0,
            escape(s.label)
        );
    }
}

fn nice_max(series: &[Series]) -> f64 {
    let m = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    ((m * 10.0).ceil() / 10.0).clamp(0.1, 1.0)
}

/// Grouped bars: one group per category, one bar per series. Values are fractions.
pub fn bars(title: &str, categories: &[String], series: &[Series], y_label: &str) -> String {
    let mut out = String::new();
    header(&mut out, W, H, title);
    let max = nice_max(series);
    y_axis(&mut out, max, y_label);
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let group = plot_w / categories.len().max(1) as f64;
    let bar = group * 0.8 / series.len().max(1) as f64;
    for (c, name) in categories.iter().enumerate() {
        let x0 = LEFT + group * c as f64 + group * 0.1;
        for (k, s) in series.iter().enumerate() {
            let v = s.values.get(c).copied().unwrap_or(0.0).max(0.0);
            let h = plot_h * (v / max).min(1.0);
            let _ = write!(
                out,
                r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} {}: {:.1}%</title></rect>"#,
                x0 + bar * k as f64,
                H - BOTTOM - h,
                bar * 0.95,
                h,
                s.colour,
                escape(s.label),
                escape(name),
                100.0 * v
            );
        }
        let _ = write!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            x0 + group * 0.4,
            H - BOTTOM + 16.0,
            escape(name)
        );
    }
    legend(&mut out, series);
    out.push_str("</svg>\n");
    out
}

/// Lines over x = 0, 1, ... (the index of each value), labelled every `x_step`.
pub fn lines(title: &str, x_label: &str, series: &[Series], y_label: &str) -> String {
    let mut out = String::new();
    header(&mut out, W, H, title);
    let max = nice_max(series);
    y_axis(&mut out, max, y_label);
    let n = series
        .iter()
        .map(|s| s.values.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let plot_w = W - LEFT - RIGHT;
    let plot_h = H - TOP - BOTTOM;
    let x = |i: usize| LEFT + plot_w * i as f64 / (n - 1) as f64;
    let step = (n / 8).max(1);
    for i in (0..n).step_by(step) {
        let _ = write!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{i}</text>"#,
            x(i),
            H - BOTTOM + 16.0
        );
    }
    let _ = write!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        LEFT + plot_w / 2.0,
        H - BOTTOM + 32.0,
        escape(x_label)
    );
    for s in series {
        let points: Vec<String> = s
            .values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, v)| {
                format!(
                    "{:.1},{:.1}",
                    x(i),
                    H - BOTTOM - plot_h * (v / max).min(1.0)
                )
            })
            .collect();
        let _ = write!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>"#,
            points.join(" "),
            s.colour
        );
    }
    legend(&mut out, series);
    out.push_str("</svg>\n");
    out
}

/// A grid of cells: one column per token (labelled with its text), one row per entry of
/// `rows` (label, per-token 0/1 executed). Executed cells are dark, skipped ones light.
pub fn heatmap(title: &str, tokens: &[String], rows: &[(String, Vec<bool>)]) -> String {
    let cell = 18.0;
    let label_w = 70.0;
    let token_h = 90.0;
    let w = label_w + cell * tokens.len() as f64 + 90.0;
    let h = TOP + cell * rows.len() as f64 + token_h + 30.0;
    let mut out = String::new();
    header(&mut out, w.max(300.0), h, title);
    for (r, (label, executed)) in rows.iter().enumerate() {
        let y = TOP + cell * r as f64;
        let _ = write!(
            out,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            label_w - 6.0,
            y + cell * 0.7,
            escape(label)
        );
        for (c, &e) in executed.iter().enumerate() {
            let _ = write!(
                out,
                r##"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}" stroke="#fff"><title>{}: {}</title></rect>"##,
                label_w + cell * c as f64,
                cell,
                cell,
                if e { "#1f4e79" } else { "#e8eef5" },
                escape(tokens.get(c).map_or("", |t| t.as_str())),
                if e { "executed" } else { "skipped" }
            );
        }
    }
    let y0 = TOP + cell * rows.len() as f64 + 8.0;
    for (c, t) in tokens.iter().enumerate() {
        let x = label_w + cell * c as f64 + cell * 0.6;
        let _ = write!(
            out,
            r#"<text transform="translate({x:.1} {y0:.1}) rotate(60)" font-family="monospace">{}</text>"#,
            escape(&t.replace(' ', "␣").replace('\n', "⏎"))
        );
    }
    let _ = write!(
        out,
        r##"<rect x="{label_w}" y="{:.1}" width="12" height="12" fill="#1f4e79"/><text x="{}" y="{:.1}">executed</text><rect x="{}" y="{:.1}" width="12" height="12" fill="#e8eef5" stroke="#999"/><text x="{}" y="{:.1}">skipped</text>"##,
        h - 20.0,
        label_w + 16.0,
        h - 10.0,
        label_w + 100.0,
        h - 20.0,
        label_w + 116.0,
        h - 10.0
    );
    out.push_str("</svg>\n");
    out
}
