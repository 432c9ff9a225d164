//! SVG charts drawn with plotters (its SVG backend, no font files: text is left to the
//! viewer): the failover bench's outage dots.

use plotters::prelude::*;
use thiserror::Error;

/// Errors of a chart.
#[derive(Debug, Error)]
pub enum PlotError {
    /// There is nothing to draw.
    #[error("nothing to plot: {0}")]
    Empty(&'static str),
    /// plotters failed to lay out or draw the chart.
    #[error("drawing the chart failed: {0}")]
    Draw(String),
}

fn draw_err<E: std::fmt::Debug>(e: E) -> PlotError {
    PlotError::Draw(format!("{e:?}"))
}

/// Colours of successive series, readable on white.
const PALETTE: [RGBColor; 6] = [
    RGBColor(0x1b, 0x9e, 0x77),
    RGBColor(0xd9, 0x5f, 0x02),
    RGBColor(0x75, 0x70, 0xb3),
    RGBColor(0xe7, 0x29, 0x8a),
    RGBColor(0x66, 0xa6, 0x1e),
    RGBColor(0xa6, 0x76, 0x1d),
];

/// Colour of the `i`-th series.
fn colour(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// One column of dots per group (one dot per value, e.g. per trial), on a logarithmic y axis:
/// `groups` are (label, values). Non-positive values are drawn at the axis floor.
pub fn dots_log(
    title: &str,
    y_label: &str,
    groups: &[(&str, &[f64])],
) -> Result<String, PlotError> {
    let values = || groups.iter().flat_map(|(_, v)| v.iter().copied());
    if values().next().is_none() {
        return Err(PlotError::Empty("no values in any group"));
    }
    let floor = values()
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min)
        .min(1.0)
        / 2.0;
    let ceil = values().fold(floor, f64::max) * 2.0;
    let n = groups.len();
    let labels: Vec<String> = groups
        .iter()
        .map(|(l, v)| format!("{l} (n={})", v.len()))
        .collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 440)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), (floor..ceil).log_scale())
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n.max(1))
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 {
                    labels.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc(y_label)
            .y_label_formatter(&|y| format_number(*y))
            .draw()
            .map_err(draw_err)?;
        for (gi, (_, vals)) in groups.iter().enumerate() {
            let c = colour(gi);
            let count = vals.len().max(1) as f64;
            chart
                .draw_series(vals.iter().enumerate().map(|(i, v)| {
                    // Spread the dots across the column so equal values stay visible.
                    let x = gi as f64 - 0.3 + 0.6 * (i as f64 + 0.5) / count;
                    Circle::new((x, v.max(floor)), 4, c.filled())
                }))
                .map_err(draw_err)?;
        }
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

/// A short axis label: `0.5`, `12`, `1500`.
fn format_number(v: f64) -> String {
    if v >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SVG parsed as XML: its text contents (trimmed) and how many elements of `name`.
    pub(super) fn parse(svg: &str, name: &str) -> (Vec<String>, usize) {
        let mut xot = xot::Xot::new();
        let doc = xot.parse(svg).expect("the SVG is well-formed XML");
        let root = xot.document_element(doc).unwrap();
        let (mut texts, mut count) = (Vec::new(), 0);
        for n in xot.descendants(root) {
            if let Some(t) = xot.text_str(n) {
                if !t.trim().is_empty() {
                    texts.push(t.trim().to_string());
                }
            }
            if let Some(e) = xot.element(n) {
                if xot.local_name_str(e.name()) == name {
                    count += 1;
                }
            }
        }
        (texts, count)
    }

    #[test]
    fn dots_log_draws_one_circle_per_value_and_labels_groups() {
        let a = [58.1, 61.0, 0.0];
        let b = [9290.8];
        let svg = dots_log("outage", "ms", &[("understudy", &a), ("cold restart", &b)]).unwrap();
        let (texts, circles) = parse(&svg, "circle");
        // One dot per value; the groups are named on the x axis.
        assert_eq!(circles, 4, "{svg}");
        for t in ["outage", "understudy (n=3)", "cold restart (n=1)", "ms"] {
            assert!(texts.iter().any(|x| x == t), "no text {t:?} in {texts:?}");
        }
    }

    #[test]
    fn nothing_to_plot_is_an_error() {
        assert!(matches!(
            dots_log("t", "ms", &[("a", &[])]),
            Err(PlotError::Empty(_))
        ));
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(format_number(1500.0), "1500");
        assert_eq!(format_number(0.5), "0.5");
        assert_eq!(format_number(10.0), "10");
    }
}
