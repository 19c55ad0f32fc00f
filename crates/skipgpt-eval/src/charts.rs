//! Charts for the routing analysis, drawn with plotters' SVG backend: grouped bars, lines and a
//! token heatmap. plotters is built without its font backends, so no system font is needed and
//! the SVG names a generic family: it renders the same in a browser, on GitHub and in
//! `rsvg-convert`.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{EvalError, Result};

const SIZE: (u32, u32) = (760, 360);

pub use plotters::style::RGBColor;

/// One named series of values, drawn in `colour`.
pub struct Series<'a> {
    pub label: &'a str,
    pub colour: RGBColor,
    pub values: &'a [f64],
}

/// The y range for fractions: up to the next tenth above the largest value, at most 1.
fn fraction_max(series: &[Series]) -> f64 {
    let m = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    ((m * 10.0).ceil() / 10.0).clamp(0.1, 1.0)
}

/// The name of the category centred at `x`, or nothing between categories: plotters picks
/// round tick values, which are the integer centres once it is asked for at most one per
/// category.
fn label_at(names: &[String], x: f64) -> String {
    let i = x.round();
    if (x - i).abs() > 1e-6 || i < 0.0 {
        return String::new();
    }
    names.get(i as usize).cloned().unwrap_or_default()
}

/// `x` as an integer label, or nothing where it is not one.
fn integer(x: f64) -> String {
    if (x - x.round()).abs() > 1e-6 {
        return String::new();
    }
    format!("{}", x.round())
}

fn percent(v: &f64) -> String {
    format!("{:.0}%", 100.0 * v)
}

/// Runs `draw` on an SVG canvas and returns the document; a plotting error names the chart.
fn render(
    title: &str,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<SVGBackend, plotters::coord::Shift>) -> PlotResult,
) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE)
            .and_then(|_| draw(&root))
            .and_then(|_| root.present())
            .map_err(|e| EvalError::Plot {
                chart: title.to_string(),
                message: e.to_string(),
            })?;
    }
    svg.push('\n');
    Ok(svg)
}

type PlotResult = std::result::Result<(), DrawingAreaErrorKind<std::io::Error>>;

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

type Chart<'a> = ChartContext<'a, SVGBackend<'a>, Cartesian2d<Ranged64, Ranged64>>;

type Ranged64 = plotters::coord::types::RangedCoordf64;

/// The chart every plot but the heatmap draws on (titled, `x_area` pixels of x labels) over
/// `xs` × `ys`, and the strip under it that holds the key.
fn keyed_chart<'a>(
    root: &Area<'a>,
    title: &str,
    x_area: u32,
    xs: std::ops::Range<f64>,
    ys: std::ops::Range<f64>,
) -> std::result::Result<(Chart<'a>, Area<'a>), DrawingAreaErrorKind<std::io::Error>> {
    let (plot, strip) = root.split_vertically(SIZE.1 - KEY_H);
    let chart = ChartBuilder::on(&plot)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(x_area)
        .y_label_area_size(56)
        .build_cartesian_2d(xs, ys)?;
    Ok((chart, strip))
}

/// Grouped bars: one group per category, one bar per series. Values are fractions.
pub fn bars(
    title: &str,
    categories: &[String],
    series: &[Series],
    y_label: &str,
) -> Result<String> {
    let n = categories.len().max(1);
    let max = fraction_max(series);
    render(title, SIZE, |root| {
        let (mut chart, strip) = keyed_chart(root, title, 24, -0.5..n as f64 - 0.5, 0.0..max)?;
        let name = |x: &f64| label_at(categories, *x);
        chart
            .configure_mesh()
            .max_light_lines(0)
            .disable_x_mesh()
            .y_desc(y_label)
            .y_label_formatter(&percent)
            .x_labels(n.min(30))
            .x_label_formatter(&name)
            .draw()?;
        let width = 0.8 / series.len().max(1) as f64;
        for (k, s) in series.iter().enumerate() {
            let colour = s.colour;
            chart.draw_series((0..categories.len()).map(|c| {
                let v = s.values.get(c).copied().unwrap_or(0.0).clamp(0.0, max);
                let x0 = c as f64 - 0.4 + width * k as f64;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.95, v)], colour.filled())
            }))?;
        }
        key(&strip, series.iter().map(|s| (s.colour, s.label)))
    })
}

/// Lines over x = 0, 1, ... (the index of each value). Values are fractions.
pub fn lines(title: &str, x_label: &str, series: &[Series], y_label: &str) -> Result<String> {
    let n = series
        .iter()
        .map(|s| s.values.len())
        .max()
        .unwrap_or(1)
        .max(2);
    let max = fraction_max(series);
    render(title, SIZE, |root| {
        let (mut chart, strip) = keyed_chart(root, title, 40, 0.0..(n - 1) as f64, 0.0..max)?;
        chart
            .configure_mesh()
            .max_light_lines(0)
            .x_labels(n.min(10))
            .x_label_formatter(&|x| integer(*x))
            .x_desc(x_label)
            .y_desc(y_label)
            .y_label_formatter(&percent)
            .draw()?;
        for s in series {
            let points = s
                .values
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .map(|(i, v)| (i as f64, v.min(max)));
            chart.draw_series(LineSeries::new(points, s.colour.stroke_width(2)))?;
        }
        key(&strip, series.iter().map(|s| (s.colour, s.label)))
    })
}

/// One named series of (x, y) points, drawn in `colour`.
pub struct Points<'a> {
    pub label: &'a str,
    pub colour: RGBColor,
    pub points: &'a [(f64, f64)],
}

/// A range around `values` with a margin of a tenth of its width on each side.
fn padded(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let margin = ((hi - lo) * 0.1).max(0.02);
    lo - margin..hi + margin
}

/// A scatter of each series' points joined in order of x, with markers: a trade-off curve
/// such as quality against speed.
pub fn frontier(title: &str, x_label: &str, y_label: &str, series: &[Points]) -> Result<String> {
    let all = || series.iter().flat_map(|s| s.points.iter().copied());
    let (xs, ys) = (padded(all().map(|p| p.0)), padded(all().map(|p| p.1)));
    render(title, SIZE, |root| {
        let (mut chart, strip) = keyed_chart(root, title, 40, xs, ys)?;
        chart
            .configure_mesh()
            .max_light_lines(0)
            .x_desc(x_label)
            .y_desc(y_label)
            .x_label_formatter(&|x| format!("{x:.2}"))
            .y_label_formatter(&|y| format!("{y:.2}"))
            .draw()?;
        for s in series {
            let mut points: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart.draw_series(LineSeries::new(points.clone(), s.colour.stroke_width(2)))?;
            chart.draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 4, s.colour.filled())),
            )?;
        }
        key(&strip, series.iter().map(|s| (s.colour, s.label)))
    })
}

/// Height of the strip under a chart that holds its key.
const KEY_H: u32 = 28;

/// The key: a swatch and a label per entry, left to right.
fn key<'a>(
    strip: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    entries: impl Iterator<Item = (RGBColor, &'a str)>,
) -> PlotResult {
    let style = ("sans-serif", 14).into_font();
    let mut x = 70;
    for (colour, label) in entries {
        strip.draw(&Rectangle::new([(x, 6), (x + 12, 18)], colour.filled()))?;
        strip.draw(&Rectangle::new(
            [(x, 6), (x + 12, 18)],
            RGBColor(150, 150, 150),
        ))?;
        strip.draw(&Text::new(label, (x + 18, 6), style.clone()))?;
        x += 40 + 8 * label.chars().count() as i32;
    }
    Ok(())
}

/// The colours of executed and skipped cells.
const EXECUTED: RGBColor = RGBColor(0x1f, 0x4e, 0x79);
const SKIPPED: RGBColor = RGBColor(0xe8, 0xee, 0xf5);

/// A grid of cells: one column per token (labelled with its text), one row per entry of
/// `rows` (label, per-token executed or not). Executed cells are dark, skipped ones light.
/// Drawn in pixels rather than on chart axes, so every cell is a square of `CELL` pixels.
pub fn heatmap(title: &str, tokens: &[String], rows: &[(String, Vec<bool>)]) -> Result<String> {
    const CELL: i32 = 18;
    const LABELS_W: i32 = 80;
    const TOP: i32 = 40;
    const TOKENS_H: i32 = 100;
    let (cols, nrows) = (tokens.len() as i32, rows.len() as i32);
    let width = (LABELS_W + CELL * cols + 20).max(320);
    let grid_h = TOP + CELL * nrows + TOKENS_H;
    let size = (width as u32, (grid_h as u32) + KEY_H);
    render(title, size, |root| {
        let (grid, strip) = root.split_vertically(grid_h as u32);
        let text = |size: u32| TextStyle::from(("sans-serif", size).into_font());
        grid.draw(&Text::new(
            title.to_string(),
            (width / 2, 12),
            text(18).pos(Pos::new(HPos::Center, VPos::Top)),
        ))?;
        for (r, (label, executed)) in rows.iter().enumerate() {
            let y = TOP + CELL * r as i32;
            grid.draw(&Text::new(
                label.clone(),
                (LABELS_W - 6, y + CELL / 2),
                text(13).pos(Pos::new(HPos::Right, VPos::Center)),
            ))?;
            for (c, &e) in executed.iter().enumerate() {
                let x = LABELS_W + CELL * c as i32;
                let fill = if e { EXECUTED } else { SKIPPED };
                grid.draw(&Rectangle::new(
                    [(x, y), (x + CELL - 1, y + CELL - 1)],
                    fill.filled(),
                ))?;
            }
        }
        // Token texts run downwards under their columns; a space shows as ␣, a newline as ⏎.
        let below = TOP + CELL * nrows + 6;
        let mono = ("monospace", 13)
            .into_font()
            .transform(FontTransform::Rotate90);
        for (c, t) in tokens.iter().enumerate() {
            let x = LABELS_W + CELL * c as i32 + CELL / 2 + 5;
            grid.draw(&Text::new(
                t.replace(' ', "␣").replace('\n', "⏎"),
                (x, below),
                mono.clone(),
            ))?;
        }
        key(
            &strip,
            [(EXECUTED, "executed"), (SKIPPED, "skipped")].into_iter(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series<'a>(values: &'a [f64]) -> [Series<'a>; 2] {
        [
            Series {
                label: "attention & co",
                colour: RGBColor(0x94, 0x67, 0xbd),
                values,
            },
            Series {
                label: "MLP",
                colour: RGBColor(0x2c, 0xa0, 0x2c),
                values,
            },
        ]
    }

    #[test]
    fn bars_draw_one_rectangle_per_value_and_round_percent_ticks() {
        let cats: Vec<String> = (0..3).map(|l| format!("L{l}")).collect();
        let svg = bars(
            "skip <per> layer",
            &cats,
            &series(&[0.1, 0.25, 0.42]),
            "skipped",
        )
        .unwrap();
        std::fs::write("/tmp/bars.svg", &svg).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // 2 series × 3 values, in the series colours
        assert_eq!(svg.matches(r##"fill="#9467BD""##).count(), 3 + 1); // + its legend swatch
        assert_eq!(svg.matches(r##"fill="#2CA02C""##).count(), 3 + 1);
        // the axis runs to 50% in round steps; text is escaped
        assert!(svg.contains("\n50%\n") && svg.contains("\n10%\n"), "{svg}");
        assert!(svg.contains("skip &lt;per&gt; layer") && svg.contains("attention &amp; co"));
        for l in ["L0", "L1", "L2"] {
            assert!(svg.contains(&format!("\n{l}\n")), "{l}");
        }
    }

    #[test]
    fn lines_draw_one_polyline_per_series() {
        let svg = lines(
            "by position",
            "position",
            &series(&[0.3, f64::NAN, 0.2, 0.25]),
            "skipped",
        )
        .unwrap();
        std::fs::write("/tmp/lines.svg", &svg).unwrap();
        // one polyline per series in its colour (the axes are black polylines)
        assert_eq!(
            svg.matches(r##"<polyline fill="none" opacity="1" stroke="#9467BD""##)
                .count(),
            1
        );
        assert_eq!(
            svg.matches(r##"<polyline fill="none" opacity="1" stroke="#2CA02C""##)
                .count(),
            1
        );
        assert!(svg.contains("\nposition\n") && svg.contains("\n30%\n"));
    }

    #[test]
    fn heatmap_draws_a_cell_per_token_and_row() {
        let tokens: Vec<String> = ["a", " b", "\n"].iter().map(|t| t.to_string()).collect();
        let rows = vec![
            ("L0 attn".to_string(), vec![true, false, true]),
            ("L0 mlp".to_string(), vec![false, false, true]),
        ];
        let svg = heatmap("map", &tokens, &rows).unwrap();
        std::fs::write("/tmp/heat.svg", &svg).unwrap();
        let executed = svg.matches(r##"fill="#1F4E79""##).count();
        let skipped = svg.matches(r##"fill="#E8EEF5""##).count();
        // the cells plus one legend swatch each
        assert_eq!((executed, skipped), (3 + 1, 3 + 1));
        assert!(svg.contains("\n␣b\n") && svg.contains("\n⏎\n") && svg.contains("\nL0 mlp\n"));
    }

    #[test]
    fn a_frontier_draws_a_marker_per_point_and_a_line_per_series() {
        let skip = [(1.3, 1.1), (1.1, 1.02), (f64::NAN, 9.0)];
        let short = [(1.2, 1.6), (1.4, 2.5)];
        let svg = frontier(
            "quality against speed",
            "decode speedup",
            "perplexity / dense",
            &[
                Points {
                    label: "SkipGPT",
                    colour: RGBColor(0x1f, 0x77, 0xb4),
                    points: &skip,
                },
                Points {
                    label: "ShortGPT",
                    colour: RGBColor(0xd6, 0x27, 0x28),
                    points: &short,
                },
            ],
        )
        .unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // two finite SkipGPT points and two ShortGPT points: four markers, one line each
        assert_eq!(svg.matches("<circle").count(), 4, "{svg}");
        for colour in ["#1F77B4", "#D62728"] {
            let lines = svg
                .split("<polyline")
                .skip(1)
                .filter(|l| l.split('>').next().unwrap().contains(colour))
                .count();
            assert_eq!(lines, 1, "{colour}: {svg}");
        }
        assert!(svg.contains("SkipGPT") && svg.contains("ShortGPT"));
    }
}
