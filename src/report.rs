//! `kvserve report`: what the traces say about the cache: hit rate by
//! requests and by tokens, token totals, time to first token for cold and
//! warm requests, the slowest requests.

use serde_json::{json, Value};

/// A request counts as warm when at least this share of its prompt was read from the cache.
pub const WARM_SHARE: f64 = 0.5;

fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    Some(sorted[i])
}

fn num(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(0.0)
}

/// The report over trace records (only generation requests with usage count)
/// made at or after `since` (unix seconds).
pub fn summarize(records: &[Value], since: f64) -> Value {
    let gens: Vec<&Value> = records.iter().filter(|r| num(r, "time") >= since && r.get("prompt_tokens").is_some()).collect();
    let errors = records.iter().filter(|r| num(r, "time") >= since && !r["error"].is_null()).count();
    let total: f64 = gens.iter().map(|r| num(r, "prompt_tokens")).sum();
    let read: f64 = gens.iter().map(|r| num(r, "cache_read_tokens")).sum();
    let created: f64 = gens.iter().map(|r| num(r, "cache_creation_tokens")).sum();
    let computed: f64 = gens.iter().map(|r| num(r, "computed_tokens")).sum();
    let generated: f64 = gens.iter().map(|r| num(r, "generated_tokens")).sum();
    let hits = gens.iter().filter(|r| num(r, "cache_read_tokens") > 0.0).count();
    let share = |r: &Value| num(r, "cache_read_tokens") / num(r, "prompt_tokens").max(1.0);
    let ttfts = |warm: bool| {
        let mut v: Vec<f64> = gens.iter().filter(|r| (share(r) >= WARM_SHARE) == warm).filter_map(|r| r["ttft_s"].as_f64()).collect();
        v.sort_by(f64::total_cmp);
        json!({"requests": v.len(), "median_s": quantile(&v, 0.5), "p90_s": quantile(&v, 0.9)})
    };
    let mut slow: Vec<&&Value> = gens.iter().filter(|r| r["ttft_s"].is_number()).collect();
    slow.sort_by(|a, b| num(b, "ttft_s").total_cmp(&num(a, "ttft_s")));
    let slowest: Vec<Value> = slow
        .iter()
        .take(5)
        .map(|r| {
            json!({"time": r["time"], "api": r["api"], "prompt_tokens": r["prompt_tokens"], "cache_read_tokens": r["cache_read_tokens"], "ttft_s": r["ttft_s"]})
        })
        .collect();
    json!({
        "requests": gens.len(),
        "errors": errors,
        "cache_hit_rate_requests": if gens.is_empty() { 0.0 } else { hits as f64 / gens.len() as f64 },
        "cache_hit_rate_tokens": if total > 0.0 { read / total } else { 0.0 },
        "tokens": {"prompt": total as u64, "read_from_cache": read as u64, "created_in_cache": created as u64, "computed": computed as u64, "generated": generated as u64},
        "ttft_cold": ttfts(false),
        "ttft_warm": ttfts(true),
        "slowest": slowest,
    })
}

fn secs(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |x| format!("{x:.2}s"))
}

/// The report as text for people.
pub fn render(s: &Value, records: &[Value], detail: bool, since: f64) -> String {
    let t = &s["tokens"];
    let mut out = format!(
        "requests: {} ({} errors)\ncache hit rate: {:.0}% of requests, {:.1}% of prompt tokens\n\
         tokens: {} prompt = {} read from cache + {} computed ({} of them stored for reuse); {} generated\n\
         time to first token, cold (<{:.0}% read): {} requests, median {}, p90 {}\n\
         time to first token, warm: {} requests, median {}, p90 {}\n",
        s["requests"],
        s["errors"],
        num(s, "cache_hit_rate_requests") * 100.0,
        num(s, "cache_hit_rate_tokens") * 100.0,
        t["prompt"],
        t["read_from_cache"],
        t["computed"],
        t["created_in_cache"],
        t["generated"],
        WARM_SHARE * 100.0,
        s["ttft_cold"]["requests"],
        secs(&s["ttft_cold"]["median_s"]),
        secs(&s["ttft_cold"]["p90_s"]),
        s["ttft_warm"]["requests"],
        secs(&s["ttft_warm"]["median_s"]),
        secs(&s["ttft_warm"]["p90_s"]),
    );
    out += "slowest:\n";
    for r in s["slowest"].as_array().into_iter().flatten() {
        out += &format!("  {} prompt {} tokens, {} read from cache, first token {}\n", r["api"], r["prompt_tokens"], r["cache_read_tokens"], secs(&r["ttft_s"]));
    }
    if detail {
        out += "requests:\n";
        for r in records.iter().filter(|r| num(r, "time") >= since) {
            out += &format!(
                "  {:.0} {} {} status {} prompt {} read {} computed {} generated {} first token {} {}\n",
                num(r, "time"),
                r["api"].as_str().unwrap_or("-"),
                r["route"].as_str().unwrap_or("-"),
                r["status"],
                r["prompt_tokens"],
                r["cache_read_tokens"],
                r["computed_tokens"],
                r["generated_tokens"],
                secs(&r["ttft_s"]),
                r["error"].as_str().unwrap_or(""),
            );
        }
    }
    out
}

/// A PNG chart: one dot per request in time order (x), its time to first
/// token on a log scale from 0.01 s to 1000 s (y, a grid line per decade),
/// coloured from red (nothing read from the cache) to green (all of it).
pub fn plot(records: &[Value], since: f64, path: &std::path::Path) -> Result<usize, String> {
    let pts: Vec<(f64, f64)> = records
        .iter()
        .filter(|r| num(r, "time") >= since && r["ttft_s"].is_number() && r.get("prompt_tokens").is_some())
        .map(|r| (num(r, "ttft_s").max(0.01), num(r, "cache_read_tokens") / num(r, "prompt_tokens").max(1.0)))
        .collect();
    let (w, h, m) = (800usize, 400usize, 20usize);
    let mut px = vec![255u8; w * h * 3];
    let mut set = |x: usize, y: usize, c: [u8; 3]| {
        if x < w && y < h {
            px[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&c);
        }
    };
    let y_of = |t: f64| -> usize {
        let f = (t.log10() + 2.0) / 5.0; // 0.01 s .. 1000 s
        (h - m) - ((f.clamp(0.0, 1.0)) * (h - 2 * m) as f64) as usize
    };
    for decade in -2..=3 {
        let y = y_of(10f64.powi(decade));
        for x in m..w - m {
            set(x, y, if decade == 0 { [150, 150, 150] } else { [220, 220, 220] });
        }
    }
    for y in m..=h - m {
        set(m, y, [0, 0, 0]);
    }
    let n = pts.len().max(1);
    for (i, (t, share)) in pts.iter().enumerate() {
        let x = m + 5 + i * (w - 2 * m - 10) / n.max(2).saturating_sub(1).max(1);
        let y = y_of(*t);
        let c = [(255.0 * (1.0 - share)) as u8, (180.0 * share) as u8, 40];
        for dx in 0..5 {
            for dy in 0..5 {
                set(x + dx - 2, y + dy - 2, c);
            }
        }
    }
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(|e| format!("{}: {e}", path.display()))?;
    writer.write_image_data(&px).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(pts.len())
}

/// "1h", "30m", "2d", "45s" before now, or unix seconds, as unix seconds.
pub fn parse_since(s: &str, now: f64) -> Result<f64, String> {
    let s = s.trim();
    let unit = |c: char| match c {
        's' => Some(1.0),
        'm' => Some(60.0),
        'h' => Some(3600.0),
        'd' => Some(86400.0),
        _ => None,
    };
    match s.chars().last().and_then(unit) {
        Some(mult) => s[..s.len() - 1].parse::<f64>().map(|n| now - n * mult).map_err(|_| format!("'{s}': expected e.g. 30m, 2h, 1d or unix seconds")),
        None => s.parse::<f64>().map_err(|_| format!("'{s}': expected e.g. 30m, 2h, 1d or unix seconds")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_from_traces() {
        let recs = vec![
            json!({"time": 100.0, "api": "anthropic", "prompt_tokens": 1000, "cache_read_tokens": 0, "cache_creation_tokens": 1000, "computed_tokens": 1000, "generated_tokens": 10, "ttft_s": 20.0, "error": null}),
            json!({"time": 200.0, "api": "anthropic", "prompt_tokens": 1010, "cache_read_tokens": 1000, "cache_creation_tokens": 10, "computed_tokens": 10, "generated_tokens": 10, "ttft_s": 0.5, "error": null}),
            json!({"time": 300.0, "api": "anthropic", "prompt_tokens": 1020, "cache_read_tokens": 1010, "cache_creation_tokens": 10, "computed_tokens": 10, "generated_tokens": 10, "ttft_s": 0.7, "error": null}),
            json!({"time": 310.0, "api": "openai", "route": "/v1/chat/completions", "status": 400, "error": "bad"}),
        ];
        let s = summarize(&recs, 0.0);
        assert_eq!(s["requests"], 3);
        assert_eq!(s["errors"], 1);
        assert!((num(&s, "cache_hit_rate_requests") - 2.0 / 3.0).abs() < 1e-9);
        assert!((num(&s, "cache_hit_rate_tokens") - 2010.0 / 3030.0).abs() < 1e-9);
        assert_eq!(s["ttft_cold"]["median_s"], 20.0);
        assert_eq!(s["ttft_warm"]["requests"], 2);
        assert_eq!(s["slowest"][0]["ttft_s"], 20.0);
        let later = summarize(&recs, 150.0);
        assert_eq!(later["requests"], 2);
        assert!(render(&s, &recs, true, 0.0).contains("cache hit rate: 67% of requests, 66.3% of prompt tokens"));
        assert_eq!(parse_since("2h", 10_000.0).unwrap(), 2800.0);
        assert_eq!(parse_since("1700000000", 0.0).unwrap(), 1.7e9);
        assert!(parse_since("soon", 0.0).is_err());
        let png = std::env::temp_dir().join(format!("kvserve-plot-{}.png", std::process::id()));
        assert_eq!(plot(&recs, 0.0, &png).unwrap(), 3);
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let _ = std::fs::remove_file(png);
    }
}
