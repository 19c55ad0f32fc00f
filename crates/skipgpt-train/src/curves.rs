//! Training curves as an SVG picture (`curves.svg` in the run directory): the LM loss and,
//! for router tuning, the skip rates against the target, drawn with plotters' SVG backend
//! (built without font backends, so no system font is needed).

use std::path::Path;

use plotters::prelude::*;

use crate::metrics::Stat;
use crate::progress::LogRow;

/// One line of a panel.
struct Series {
    label: String,
    colour: RGBColor,
    /// Validation runs every few steps: its points are marked.
    marked: bool,
    points: Vec<(f64, f64)>,
}

struct Panel {
    title: String,
    series: Vec<Series>,
    /// Horizontal reference line (the target skip rate).
    reference: Option<(f64, String)>,
}

const BLUE: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const RED: RGBColor = RGBColor(0xd6, 0x27, 0x28);
const PURPLE: RGBColor = RGBColor(0x94, 0x67, 0xbd);
const GREEN: RGBColor = RGBColor(0x2c, 0xa0, 0x2c);
const GREY: RGBColor = RGBColor(0x55, 0x55, 0x55);

fn series(rows: &[LogRow], split: &str, name: &str, colour: RGBColor, label: &str) -> Series {
    Series {
        label: label.to_string(),
        colour,
        marked: split == "valid",
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
            series(rows, "train", lm, BLUE, "train"),
            series(rows, "valid", lm, RED, "valid"),
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
                    BLUE,
                    "train (Gumbel gates)",
                ),
                series(
                    rows,
                    "train",
                    Stat::AttnSkip.name(),
                    PURPLE,
                    "train attention",
                ),
                series(rows, "train", Stat::MlpSkip.name(), GREEN, "train MLP"),
                series(
                    rows,
                    "valid",
                    Stat::Skip.name(),
                    RED,
                    "valid (deterministic)",
                ),
            ],
            reference: target.map(|t| (t, format!("target {t}"))),
        });
    }
    let svg = render(&panels).map_err(|e| std::io::Error::other(e.to_string()))?;
    skipgpt_model::io::atomic_write::atomic_write(path, svg.as_bytes())
        .map_err(|e| std::io::Error::other(e.to_string()))
}

const PANEL: (u32, u32) = (460, 320);

type PlotResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;

fn render(panels: &[Panel]) -> Result<String, DrawingAreaErrorKind<std::io::Error>> {
    let mut svg = String::new();
    {
        let size = (PANEL.0 * panels.len() as u32, PANEL.1);
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE)?;
        for (area, panel) in root.split_evenly((1, panels.len())).iter().zip(panels) {
            draw_panel(area, panel)?;
        }
        root.present()?;
    }
    svg.push('\n');
    Ok(svg)
}

/// The data's extent, with the reference line, padded by 5% vertically.
fn extent(panel: &Panel) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    let points = panel.series.iter().flat_map(|s| s.points.iter().copied());
    let reference = panel.reference.iter().map(|(t, _)| (f64::NAN, *t));
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in points.chain(reference) {
        if x.is_finite() {
            (x0, x1) = (x0.min(x), x1.max(x));
        }
        (y0, y1) = (y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        (x0, x1) = (0.0, 1.0);
    }
    if y0 > y1 {
        (y0, y1) = (0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    (x0..x1, y0 - pad..y1 + pad)
}

fn draw_panel(area: &DrawingArea<SVGBackend, plotters::coord::Shift>, panel: &Panel) -> PlotResult {
    let (xs, ys) = extent(panel);
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 16))
        .margin(10)
        .margin_right(20)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(xs.clone(), ys)?;
    chart
        .configure_mesh()
        .max_light_lines(0)
        .x_labels(6)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_labels(6)
        .x_desc("optimizer step")
        .draw()?;
    if let Some((t, label)) = &panel.reference {
        chart
            .draw_series(LineSeries::new(
                [(xs.start, *t), (xs.end, *t)],
                GREY.stroke_width(1),
            ))?
            .label(label)
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], GREY.stroke_width(1)));
    }
    for s in panel.series.iter().filter(|s| !s.points.is_empty()) {
        let style = s.colour.stroke_width(2);
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), style))?
            .label(&s.label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], style));
        if s.marked {
            let dots = s
                .points
                .iter()
                .map(|&p| Circle::new(p, 3, s.colour.filled()));
            chart.draw_series(dots)?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(170, 170, 170))
        .draw()
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
        // loss: train + valid; skip: train + valid (attention/MLP absent here); each line
        // once more in its panel's legend; the one validation point of each panel marked
        let lines = |colour: &str| {
            svg.matches(&format!(
                r#"<polyline fill="none" opacity="1" stroke="{colour}""#
            ))
            .count()
        };
        assert_eq!((lines("#1F77B4"), lines("#D62728")), (4, 4));
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(svg.contains("target 0.25"));
        assert!(svg.contains("skip rate") && svg.contains("LM loss"));
        // without skip values, one panel
        let dense: Vec<LogRow> = rows
            .iter()
            .map(|r| row(&r.split, r.step, &[("LM Loss", r.values["LM Loss"])]))
            .collect();
        write_curves(&dense, None, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(!svg.contains("skip rate") && !svg.contains("target"));
        assert_eq!(
            svg.matches(r##"<polyline fill="none" opacity="1" stroke="#1F77B4""##)
                .count(),
            2
        );
    }
}
