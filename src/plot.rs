//! SVG charts drawn with plotters (its SVG backend, no font files: text is left to the
//! viewer): the failover bench's outage dots, a profile's observed use against its predicted
//! envelope (`understudy profile plot`), and a failover's steps (`understudy failover
//! timeline`).

use plotters::prelude::*;
use thiserror::Error;

use crate::failover::FailoverRecord;
use crate::profile::manager::SeriesPoint;

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

/// A panel of [`envelope`]: name, unit, and (observed, limit) of a point in that unit.
type Panel = (&'static str, &'static str, fn(&SeriesPoint) -> (f64, f64));

/// Observed use against the predicted limit over time, one panel per resource (CPU in cores,
/// memory in MiB); x is the wall clock (UTC).
pub fn envelope(title: &str, points: &[SeriesPoint]) -> Result<String, PlotError> {
    let (Some(first), Some(last)) = (points.first(), points.last()) else {
        return Err(PlotError::Empty("no observations in the period"));
    };
    let x0 = first.ts_unix_ms as f64;
    let x1 = (last.ts_unix_ms as f64).max(x0 + 1000.0);
    const MIB: f64 = 1048576.0;
    let panels: [Panel; 2] = [
        ("CPU", "cores", |p| (p.cpu_cores, p.cpu_limit)),
        ("Memory", "MiB", |p| (p.mem_bytes / MIB, p.mem_limit / MIB)),
    ];
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 640)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let root = root.titled(title, ("sans-serif", 18)).map_err(draw_err)?;
        let areas = root.split_evenly((2, 1));
        for (area, (name, unit, value)) in areas.iter().zip(panels.iter()) {
            let top = points
                .iter()
                .map(|p| {
                    let (o, l) = value(p);
                    o.max(if l.is_finite() { l } else { 0.0 })
                })
                .fold(0.0f64, f64::max);
            let top = if top > 0.0 { top * 1.15 } else { 1.0 };
            let mut chart = ChartBuilder::on(area)
                .caption(
                    format!("{name}: observed and predicted limit"),
                    ("sans-serif", 14),
                )
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(60)
                .build_cartesian_2d(x0..x1, 0.0..top)
                .map_err(draw_err)?;
            chart
                .configure_mesh()
                .x_labels(6)
                .x_label_formatter(&|x| clock(*x as u64))
                .y_desc(*unit)
                .y_label_formatter(&|y| format_number(*y))
                .draw()
                .map_err(draw_err)?;
            chart
                .draw_series(LineSeries::new(
                    points.iter().map(|p| (p.ts_unix_ms as f64, value(p).0)),
                    colour(0).stroke_width(2),
                ))
                .map_err(draw_err)?
                .label("observed")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour(0)));
            // A limit is drawn where the profile had one (an empty profile predicts nothing).
            chart
                .draw_series(LineSeries::new(
                    points
                        .iter()
                        .filter(|p| value(p).1.is_finite())
                        .map(|p| (p.ts_unix_ms as f64, value(p).1)),
                    colour(1).stroke_width(2),
                ))
                .map_err(draw_err)?
                .label("predicted limit")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour(1)));
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(draw_err)?;
        }
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

/// A failover's steps as bars on a millisecond axis from the detection of the failure, with
/// the moment service was restored (the end of the outage) marked.
pub fn timeline(title: &str, record: &FailoverRecord) -> Result<String, PlotError> {
    if record.steps.is_empty() {
        return Err(PlotError::Empty("the failover recorded no steps"));
    }
    // Records of older daemons have no start offsets: their steps are laid end to end.
    let mut at = 0.0;
    let bars: Vec<(&str, f64, f64)> = record
        .steps
        .iter()
        .map(|s| {
            let start = s.start_ms.unwrap_or(at);
            at = start + s.ms;
            (s.name.as_str(), start, s.ms)
        })
        .collect();
    let end = bars
        .iter()
        .map(|(_, s, d)| s + d)
        .fold(record.outage_ms, f64::max)
        .max(1.0)
        * 1.08;
    let n = bars.len();
    let names: Vec<String> = bars.iter().map(|(n, _, _)| n.to_string()).collect();
    let mut svg = String::new();
    {
        let root =
            SVGBackend::with_string(&mut svg, (900, 120 + 40 * n as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(34)
            .y_label_area_size(110)
            .build_cartesian_2d(0.0..end, -0.5..(n as f64 - 0.5))
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n)
            .y_label_formatter(&|y| {
                let i = y.round();
                if (y - i).abs() < 1e-6 && i >= 0.0 {
                    // The first step on top.
                    names.get(n - 1 - i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .x_desc("ms after the failure was detected")
            .x_label_formatter(&|x| format_number(*x))
            .draw()
            .map_err(draw_err)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, start, ms))| {
                let y = (n - 1 - i) as f64;
                Rectangle::new(
                    [(*start, y - 0.3), (start + ms.max(end / 500.0), y + 0.3)],
                    colour(i).filled(),
                )
            }))
            .map_err(draw_err)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, start, ms))| {
                let y = (n - 1 - i) as f64;
                Text::new(
                    format!("{} ms", format_number(*ms)),
                    (start + ms + end / 100.0, y),
                    ("sans-serif", 12),
                )
            }))
            .map_err(draw_err)?;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(record.outage_ms, -0.5), (record.outage_ms, n as f64 - 0.5)],
                RED.stroke_width(2),
            )))
            .map_err(draw_err)?;
        chart
            .draw_series(std::iter::once(Text::new(
                format!("restored at {} ms", format_number(record.outage_ms)),
                (record.outage_ms + end / 100.0, n as f64 - 0.75),
                ("sans-serif", 12).into_font().color(&RED),
            )))
            .map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

/// `HH:MM:SS` (UTC) of a Unix time in ms.
fn clock(ms: u64) -> String {
    let s = crate::events::format_unix_ms(ms);
    s.get(11..19).unwrap_or(&s).to_string()
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
    fn envelope_draws_observed_and_limit_per_resource() {
        let points: Vec<SeriesPoint> = (0..30)
            .map(|i| SeriesPoint {
                ts_unix_ms: 1_764_601_200_000 + i * 1000,
                cpu_cores: 0.5 + (i % 3) as f64 * 0.1,
                cpu_limit: 1.2,
                mem_bytes: 64.0 * 1048576.0,
                mem_limit: if i < 10 { f64::NAN } else { 96.0 * 1048576.0 },
            })
            .collect();
        let svg = envelope("web1", &points).unwrap();
        let (texts, lines) = parse(&svg, "polyline");
        // Observed and limit, CPU and memory, plus one legend line per series.
        assert!(lines >= 4, "{lines} polylines");
        for t in [
            "web1",
            "cores",
            "MiB",
            "observed",
            "predicted limit",
            "15:00:00",
        ] {
            assert!(texts.iter().any(|x| x.contains(t)), "no {t:?} in {texts:?}");
        }
        assert!(matches!(envelope("t", &[]), Err(PlotError::Empty(_))));
    }

    #[test]
    fn timeline_draws_a_bar_per_step_and_the_restore_mark() {
        let step = |name: &str, start: Option<f64>, ms: f64| crate::failover::StepTiming {
            name: name.into(),
            ms,
            start_ms: start,
        };
        let record = FailoverRecord {
            at_unix_ms: 1_764_601_200_000,
            from: "web1".into(),
            to: "web1-shadow-2".into(),
            trigger: crate::failover::Trigger::Pidfd,
            outage_ms: 9.5,
            steps: vec![
                step("fence", Some(0.2), 1.0),
                step("claim", Some(1.2), 0.1),
                step("resume", Some(1.3), 6.0),
                step("rewire", Some(1.3), 2.0),
                step("announce", None, 3.0),
            ],
            ok: true,
            error: None,
            notes: vec![],
        };
        let svg = timeline("web1", &record).unwrap();
        let (texts, rects) = parse(&svg, "rect");
        // The background and one bar per step.
        assert_eq!(rects, 1 + 5, "{svg}");
        for t in [
            "fence",
            "claim",
            "resume",
            "rewire",
            "announce",
            "6 ms",
            "restored at 9.5 ms",
        ] {
            assert!(texts.iter().any(|x| x == t), "no {t:?} in {texts:?}");
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
