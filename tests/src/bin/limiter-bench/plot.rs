//! SVG plots of benchmark results, written next to the numbers they show.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

const COLORS: [RGBColor; 8] = [
    RGBColor(120, 120, 120),
    RGBColor(40, 40, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing: {e}")
}

/// Grouped bars: one group per case, one bar per series (median values).
pub fn grouped_bars(
    path: &Path,
    title: &str,
    y_label: &str,
    cases: &[String],
    series: &[(&str, Vec<f64>)],
) -> Result<()> {
    let root = SVGBackend::new(path, (1100, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0f64, f64::max)
        * 1.1;
    let group = series.len() as f64 + 1.0;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..(cases.len() as f64 * group), 0.0..max.max(1.0))
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(cases.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = (*x / group).floor() as usize;
            if (x - (i as f64 * group + group / 2.0)).abs() < 0.5 {
                cases.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(y_label)
        .draw()
        .map_err(err)?;
    for (s, (name, values)) in series.iter().enumerate() {
        let color = COLORS[s % COLORS.len()];
        chart
            .draw_series(values.iter().enumerate().map(|(c, v)| {
                let x0 = c as f64 * group + s as f64 + 0.5;
                Rectangle::new([(x0, 0.0), (x0 + 0.9, *v)], color.filled())
            }))
            .map_err(err)?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Points (x, y) per series on log-log axes, with the line y = `limit`.
pub fn admitted_vs_offered(
    path: &Path,
    title: &str,
    points: &[(&str, f64, f64)],
    limit: f64,
) -> Result<()> {
    let root = SVGBackend::new(path, (800, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let max_x = points.iter().map(|p| p.1).fold(limit, f64::max) * 2.0;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (limit / 4.0..max_x).log_scale(),
            (limit / 4.0..max_x).log_scale(),
        )
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("arrived, per second (multiple of the budget)")
        .y_desc("admitted, per second")
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(
            [(limit / 4.0, limit / 4.0), (limit, limit), (max_x, limit)],
            BLACK.stroke_width(1),
        ))
        .map_err(err)?
        .label("ideal: min(offered, budget)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 15, y)], BLACK));
    for (i, (name, x, y)) in points.iter().enumerate() {
        let color = COLORS[(i + 2) % COLORS.len()];
        chart
            .draw_series([Circle::new((*x, *y), 5, color.filled())])
            .map_err(err)?
            .label(*name)
            .legend(move |(x, y)| Circle::new((x + 5, y), 4, color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Grouped bars (one group per case, one bar per series) of ratios to a
/// budget, on a y axis from `floor`, with a line at 1 (the budget); over
/// each bar a tick per entry of `marks` (label, values by series then
/// case), black then grey: the most the bar may reach. NaNs are skipped.
pub fn bars_with_marks(
    path: &Path,
    title: &str,
    y_label: &str,
    floor: f64,
    cases: &[String],
    series: &[(String, Vec<f64>)],
    marks: &[(&str, Vec<Vec<f64>>)],
) -> Result<()> {
    let root = SVGBackend::new(path, (1100, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let top = series
        .iter()
        .flat_map(|(_, v)| v.iter())
        .chain(marks.iter().flat_map(|(_, m)| m.iter().flatten()))
        .copied()
        .filter(|v| v.is_finite())
        .fold(1.0f64, f64::max);
    // Room above the tallest bar for the legend.
    let max = top + (top - floor) * 0.45;
    let group = series.len() as f64 + 1.0;
    let width = cases.len() as f64 * group;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..width, floor..max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(cases.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = (*x / group).floor() as usize;
            if (x - (i as f64 * group + group / 2.0)).abs() < 0.5 {
                cases.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(y_label)
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(
            [(0.0, 1.0), (width, 1.0)],
            BLACK.stroke_width(1),
        ))
        .map_err(err)?
        .label("1: the budget")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 15, y)], BLACK));
    let x0 = |s: usize, c: usize| c as f64 * group + s as f64 + 0.5;
    for (s, (name, values)) in series.iter().enumerate() {
        let color = COLORS[(s + 2) % COLORS.len()];
        chart
            .draw_series(
                values
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_finite())
                    .map(|(c, v)| {
                        Rectangle::new([(x0(s, c), floor), (x0(s, c) + 0.9, *v)], color.filled())
                    }),
            )
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    for (m, (name, values)) in marks.iter().enumerate() {
        let color = if m == 0 { BLACK } else { COLORS[0] };
        let ticks = values.iter().enumerate().flat_map(|(s, by_case)| {
            by_case
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .map(move |(c, v)| (s, c, *v))
        });
        chart
            .draw_series(ticks.map(|(s, c, v)| {
                PathElement::new([(x0(s, c), v), (x0(s, c) + 0.9, v)], color.stroke_width(3))
            }))
            .map_err(err)?
            .label(*name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 15, y)], color.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
