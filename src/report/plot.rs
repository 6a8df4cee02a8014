//! `kvserve report --plot FILE`: the traces as a chart people can read,
//! drawn with `plotters` into SVG or PNG (by the file's extension). The
//! font (DejaVu Sans, from the `dejavu` crate) is compiled in, so it draws
//! the same on a machine without fonts.
//!
//! Top panel: time to first token per request, in time order, on a log axis,
//! cold and warm requests in their own colours. Bottom panel: each request's
//! prompt tokens as a bar split into read from the cache and computed.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;

use super::{answered, is_warm, num, period_text, summarize, WARM_SHARE};

/// Pixels of the chart (PNG) or its view box (SVG).
pub const SIZE: (u32, u32) = (1200, 800);

const COLD: RGBColor = RGBColor(214, 69, 65);
const WARM: RGBColor = RGBColor(38, 139, 86);
const READ: RGBColor = RGBColor(92, 176, 122);
const COMPUTED: RGBColor = RGBColor(235, 150, 40);

/// One answered request, as drawn.
struct Point {
    ttft: f64,
    warm: bool,
    read: f64,
    computed: f64,
}

/// The bundled font under plotters' "sans-serif" family.
fn fonts() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .and_then(|_| plotters::style::register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold()))
            .map_err(|_| "the bundled font (DejaVu Sans) could not be read".to_string())
    })
    .clone()
}

/// Seconds as a tick label: `0.01 s`, `0.5 s`, `2 s`, `100 s`.
fn secs_label(v: f64) -> String {
    let s = format!("{v:.4}");
    format!("{} s", s.trim_end_matches('0').trim_end_matches('.'))
}

/// Tokens as a tick label: `800`, `12K`, `1.5K`.
fn tokens_label(v: f64) -> String {
    if v >= 1000.0 {
        let k = v / 1000.0;
        if (k - k.round()).abs() < 0.05 {
            format!("{:.0}K", k)
        } else {
            format!("{k:.1}K")
        }
    } else {
        format!("{v:.0}")
    }
}

/// Draw the chart of the records made at or after `since` into `path`
/// (`.svg` or `.png`). Returns how many requests it shows.
pub fn plot(records: &[Value], since: f64, path: &Path) -> Result<usize, String> {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    if !matches!(ext.as_deref(), Some("svg" | "png")) {
        return Err(format!("{}: --plot writes .svg or .png files", path.display()));
    }
    fonts()?;
    let points: Vec<Point> = records
        .iter()
        .filter(|r| num(r, "time") >= since && answered(r) && r["ttft_s"].is_number() && r.get("prompt_tokens").is_some())
        .map(|r| Point {
            ttft: num(r, "ttft_s").max(0.001),
            warm: is_warm(r),
            read: num(r, "cache_read_tokens"),
            computed: (num(r, "prompt_tokens") - num(r, "cache_read_tokens")).max(0.0),
        })
        .collect();
    let summary = summarize(records, since);
    let title = format!("kvserve prompt cache: {} ({} requests answered)", period_text(&summary), summary["answered"]);
    let err = |e: String| format!("{}: {e}", path.display());
    if ext.as_deref() == Some("svg") {
        let root = SVGBackend::new(path, SIZE).into_drawing_area();
        draw(&root, &title, &points).map_err(err)?;
        root.present().map_err(|e| err(e.to_string()))?;
    } else {
        let (w, h) = SIZE;
        let mut rgb = vec![0u8; (w * h * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area();
            draw(&root, &title, &points).map_err(err)?;
            root.present().map_err(|e| err(e.to_string()))?;
        }
        write_png(path, w, h, &rgb).map_err(err)?;
    }
    Ok(points.len())
}

fn write_png(path: &Path, w: u32, h: u32, rgb: &[u8]) -> Result<(), String> {
    let file = std::fs::File::create(path).map_err(|e| e.to_string())?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(rgb).map_err(|e| e.to_string())
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, title: &str, points: &[Point]) -> Result<(), String> {
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    root.fill(&WHITE).map_err(e)?;
    let root = root.titled(title, ("sans-serif", 26).into_font().style(FontStyle::Bold)).map_err(e)?;
    if points.is_empty() {
        root.draw(&Text::new("no answered requests in this period", (40, 60), ("sans-serif", 20))).map_err(e)?;
        return Ok(());
    }
    let (top, bottom) = root.split_vertically((SIZE.1 as f64 * 0.56) as u32);
    let n = points.len() as f64;
    let x_range = 0.5..n + 0.5;
    let x_label = |v: &f64| if v.fract() == 0.0 { format!("{v:.0}") } else { String::new() };
    let x_labels = points.len().min(20);

    // Time to first token, log axis from the decade below the fastest to the one above the slowest.
    let lo = points.iter().map(|p| p.ttft).fold(f64::INFINITY, f64::min);
    let hi = points.iter().map(|p| p.ttft).fold(0.0, f64::max);
    let (lo, mut hi) = (10f64.powf(lo.log10().floor()), 10f64.powf(hi.log10().ceil()));
    if hi <= lo {
        hi = lo * 10.0;
    }
    let mut chart = ChartBuilder::on(&top)
        .caption(
            format!("Time to first token per request (warm: at least {:.0}% of the prompt read from the cache)", WARM_SHARE * 100.0),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(90)
        // A little beyond the decades, so both end labels are drawn.
        .build_cartesian_2d(x_range.clone(), (lo * 0.8..hi * 1.25).log_scale())
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_labels(x_labels)
        .x_label_formatter(&x_label)
        .y_label_formatter(&|v| secs_label(*v))
        .x_desc("request, in time order")
        .y_desc("time to first token")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(e)?;
    for (warm, colour, label) in [(false, COLD, "cold"), (true, WARM, "warm")] {
        let n = points.iter().filter(|p| p.warm == warm).count();
        chart
            .draw_series(
                points.iter().enumerate().filter(|(_, p)| p.warm == warm).map(|(i, p)| Circle::new(((i + 1) as f64, p.ttft), 5, colour.filled())),
            )
            .map_err(e)?
            .label(format!("{label} ({n})"))
            .legend(move |(x, y)| Circle::new((x + 8, y), 5, colour.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;

    // Prompt tokens per request: read from the cache, then computed, stacked.
    let most = points.iter().map(|p| p.read + p.computed).fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&bottom)
        .caption("Prompt tokens per request", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(90)
        // Headroom above the tallest bar for the legend.
        .build_cartesian_2d(x_range, 0.0..most * 1.5)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_labels(x_labels)
        .x_label_formatter(&x_label)
        .y_label_formatter(&|v| tokens_label(*v))
        .x_desc("request, in time order")
        .y_desc("prompt tokens")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(e)?;
    let half = 0.38;
    let bar = |i: usize, y0: f64, y1: f64, c: RGBColor| Rectangle::new([((i + 1) as f64 - half, y0), ((i + 1) as f64 + half, y1)], c.filled());
    chart
        .draw_series(points.iter().enumerate().map(|(i, p)| bar(i, 0.0, p.read, READ)))
        .map_err(e)?
        .label("read from the cache")
        .legend(|(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], READ.filled()));
    chart
        .draw_series(points.iter().enumerate().map(|(i, p)| bar(i, p.read, p.read + p.computed, COMPUTED)))
        .map_err(e)?
        .label("computed")
        .legend(|(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], COMPUTED.filled()));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn records() -> Vec<Value> {
        (0..12)
            .map(|i| {
                let warm = i % 4 != 0;
                let prompt = 3000 + 40 * i;
                let read = if warm { prompt - 25 } else { 0 };
                json!({"time": 1_795_782_896.0 + 30.0 * i as f64, "api": "anthropic", "status": 200, "error": null,
                       "prompt_tokens": prompt, "cache_read_tokens": read, "ttft_s": if warm { 0.3 + 0.01 * i as f64 } else { 14.0 }})
            })
            .collect()
    }

    #[test]
    fn labels() {
        assert_eq!(secs_label(0.01), "0.01 s");
        assert_eq!(secs_label(0.5), "0.5 s");
        assert_eq!(secs_label(1.0), "1 s");
        assert_eq!(secs_label(100.0), "100 s");
        assert_eq!(tokens_label(800.0), "800");
        assert_eq!(tokens_label(12000.0), "12K");
        assert_eq!(tokens_label(1500.0), "1.5K");
    }

    #[test]
    fn png_and_svg_by_extension() {
        let dir = std::env::temp_dir().join(format!("kvserve-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let recs = records();
        let png = dir.join("r.png");
        assert_eq!(plot(&recs, 0.0, &png).unwrap(), 12);
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        // Decode it back: the size, and the three colours drawn.
        let dec = png::Decoder::new(std::fs::File::open(&png).unwrap());
        let mut reader = dec.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), SIZE);
        let has = |c: RGBColor| buf.chunks(3).any(|p| p == [c.0, c.1, c.2]);
        assert!(has(COLD) && has(WARM) && has(READ) && has(COMPUTED), "the chart lacks a series colour");
        let dark = buf.chunks(3).filter(|p| p.iter().all(|&v| v < 60)).count();
        assert!(dark > 2000, "little text or axis drawn ({dark} dark pixels)");

        let svg = dir.join("r.svg");
        assert_eq!(plot(&recs, 0.0, &svg).unwrap(), 12);
        let text = std::fs::read_to_string(&svg).unwrap();
        for want in ["<svg", "kvserve prompt cache: 2026-11-27 12:34:56 - 12:40:26 UTC (12 requests answered)", "time to first token", "cold (3)", "warm (9)", "read from the cache", "computed", "0.1 s", "10 s", "3K"] {
            assert!(text.contains(want), "the SVG lacks {want:?}");
        }
        assert!(plot(&recs, 0.0, &dir.join("r.jpg")).unwrap_err().contains(".svg or .png"));
        // No requests: a chart that says so.
        assert_eq!(plot(&recs, 2e9, &dir.join("none.svg")).unwrap(), 0);
        assert!(std::fs::read_to_string(dir.join("none.svg")).unwrap().contains("no answered requests"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
