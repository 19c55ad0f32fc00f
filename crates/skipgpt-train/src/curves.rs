//! Training curves as an SVG picture (`curves.svg` in the run directory): the LM loss and,
//! for router tuning, the skip rates against the target. Plain SVG text, no font or plotting
//! dependency, so it renders the same everywhere.

use std::fmt::Write;
use std::path::Path;

use crate::metrics::Stat;
use crate::progress::LogRow;

/// One line of a panel.
struct Series {
    label: String,
    colour: &'static str,
    dashed: bool,
    points: Vec<(f64, f64)>,
}

struct Panel {
    title: String,
    series: Vec<Series>,
    /// Horizontal reference line (the target skip rate).
    reference: Option<(f64, String)>,
}

fn series(rows: &[LogRow], split: &str, name: &str, colour: &'static str, label: &str) -> Series {
    Series {
        label: label.to_string(),
        colour,
        dashed: split == "valid",
        points: rows
            .iter()
            .filter(|r| r.split == split)
            .filter_map(|r| Some((r.step as f64, *r.values.get(name)?)))
            .filter(|(_, y)| y.is_finite())
            .collect(),
    }
}

/// Writes the curves of a run's log rows; `target` draws the target skip rate.
pub fn write_curves(rows: &[LogRow], target: Option<f64>, path: &Path) -> std::io::Result<()> {
    let lm = Stat::LmLoss.name();
    let mut panels = vec![Panel {
        title: "LM loss (nats/token)".into(),
        series: vec![
            series(rows, "train", lm, "#1f77b4", "train"),
            series(rows, "valid", lm, "#d62728", "valid"),
        ],
        reference: None,
    }];
    if rows
        .iter()
        .any(|r| r.values.contains_key(Stat::Skip.name()))
    {
        panels.push(Panel {
            title: "skip rate".into(),
            series: vec![
                series(
                    rows,
                    "train",
                    Stat::Skip.name(),
                    "#1f77b4",
                    "train (Gumbel gates)",
                ),
                series(
                    rows,
                    "train",
                    Stat::AttnSkip.name(),
                    "#9467bd",
                    "train attention",
                ),
                series(rows, "train", Stat::MlpSkip.name(), "#2ca02c", "train MLP"),
                series(
                    rows,
                    "valid",
                    Stat::Skip.name(),
                    "#d62728",
                    "valid (deterministic)",
                ),
            ],
            reference: target.map(|t| (t, format!("target {t}"))),
        });
    }
    let svg = render(&panels);
    skipgpt_model::atomic::atomic_write(path, svg.as_bytes())
        .map_err(|e| std::io::Error::other(e.to_string()))
}

const PANEL_W: f64 = 440.0;
const PANEL_H: f64 = 300.0;
const MARGIN: (f64, f64, f64, f64) = (56.0, 16.0, 36.0, 40.0); // left, right, top, bottom

fn render(panels: &[Panel]) -> String {
    let width = PANEL_W * panels.len() as f64;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{PANEL_H}" font-family="sans-serif" font-size="11">"#
    );
    s.push_str(r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (i, panel) in panels.iter().enumerate() {
        draw_panel(&mut s, panel, i as f64 * PANEL_W);
    }
    s.push_str("</svg>\n");
    s
}

fn draw_panel(s: &mut String, panel: &Panel, x0: f64) {
    let (ml, mr, mt, mb) = MARGIN;
    let (left, right, top, bottom) = (x0 + ml, x0 + PANEL_W - mr, mt, PANEL_H - mb);
    let points = panel.series.iter().flat_map(|s| s.points.iter());
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        xmin = xmin.min(x);
        xmax = xmax.max(x);
        ymin = ymin.min(y);
        ymax = ymax.max(y);
    }
    if let Some((t, _)) = &panel.reference {
        ymin = ymin.min(*t);
        ymax = ymax.max(*t);
    }
    if xmin > xmax {
        (xmin, xmax, ymin, ymax) = (0.0, 1.0, 0.0, 1.0);
    }
    if xmax - xmin < 1e-12 {
        xmax = xmin + 1.0;
    }
    let pad = ((ymax - ymin) * 0.05).max(1e-6);
    let (ymin, ymax) = (ymin - pad, ymax + pad);
    let px = |x: f64| left + (x - xmin) / (xmax - xmin) * (right - left);
    let py = |y: f64| bottom - (y - ymin) / (ymax - ymin) * (bottom - top);

    let _ = write!(
        s,
        r#"<text x="{:.1}" y="20" font-size="13" font-weight="bold">{}</text>"#,
        left,
        escape(&panel.title)
    );
    let _ = write!(
        s,
        r##"<rect x="{left:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="#888"/>"##,
        right - left,
        bottom - top
    );
    for k in 0..=4 {
        let f = k as f64 / 4.0;
        let (xv, yv) = (xmin + f * (xmax - xmin), ymin + f * (ymax - ymin));
        let _ = write!(
            s,
            r##"<line x1="{left:.1}" x2="{right:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text><text x="{:.1}" y="{:.1}" text-anchor="middle">{:.0}</text>"##,
            left - 4.0,
            py(yv) + 4.0,
            tick(yv),
            px(xv),
            bottom + 14.0,
            xv.round(),
            y = py(yv),
        );
    }
    let _ = write!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">optimizer step</text>"#,
        (left + right) / 2.0,
        bottom + 30.0
    );
    if let Some((t, label)) = &panel.reference {
        let _ = write!(
            s,
            r##"<line x1="{left:.1}" x2="{right:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#555" stroke-dasharray="2,3"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">{}</text>"##,
            right - 4.0,
            py(*t) - 4.0,
            escape(label),
            y = py(*t)
        );
    }
    let mut legend_y = top + 14.0;
    for series in panel.series.iter().filter(|s| !s.points.is_empty()) {
        let path: Vec<String> = series
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let dash = if series.dashed {
            r#" stroke-dasharray="6,3""#
        } else {
            ""
        };
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="1.6"{dash} points="{}"/>"#,
            series.colour,
            path.join(" ")
        );
        let _ = write!(
            s,
            r#"<line x1="{:.1}" x2="{:.1}" y1="{legend_y:.1}" y2="{legend_y:.1}" stroke="{}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            right - 150.0,
            right - 130.0,
            series.colour,
            right - 126.0,
            legend_y + 4.0,
            escape(&series.label)
        );
        legend_y += 14.0;
    }
}

fn tick(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn row(split: &str, step: usize, values: &[(&str, f64)]) -> LogRow {
        LogRow {
            split: split.into(),
            step,
            values: values
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect::<HashMap<_, _>>(),
        }
    }

    #[test]
    fn draws_one_polyline_per_series_and_the_target() {
        let rows = vec![
            row("train", 10, &[("LM Loss", 3.0), ("Skip", 0.4)]),
            row("train", 20, &[("LM Loss", 2.0), ("Skip", 0.3)]),
            row("valid", 20, &[("LM Loss", 2.2), ("Skip", 0.2)]),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("curves.svg");
        write_curves(&rows, Some(0.25), &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // loss: train + valid; skip: train + valid (attention/MLP absent here)
        assert_eq!(svg.matches("<polyline").count(), 4);
        assert!(svg.contains("target 0.25"));
        assert!(svg.contains("skip rate") && svg.contains("LM loss"));
        // without skip values, one panel
        let dense: Vec<LogRow> = rows
            .iter()
            .map(|r| row(&r.split, r.step, &[("LM Loss", r.values["LM Loss"])]))
            .collect();
        write_curves(&dense, None, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(!svg.contains("skip rate"));
        assert_eq!(svg.matches("<polyline").count(), 2);
    }
}
