//! `kvserve report`: what the traces say about the cache: every request
//! counted once as answered or failed (failures grouped by status and
//! reason), then over the answered ones the hit rate by requests and by
//! tokens, token totals, time to first token for cold and warm requests and
//! the slowest requests. [`plot`] draws the same records as a chart.

pub mod plot;

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

/// A request was answered: status 200 and no error (a client that left
/// mid-answer, or a generation that failed, counts as failed).
pub fn answered(r: &Value) -> bool {
    r["error"].is_null() && r["status"].as_u64().is_none_or(|s| s == 200)
}

/// Why a request failed, for grouping: the record's `reason` (the error's
/// type, and the field at fault where there is one), else its message.
pub fn reason(r: &Value) -> String {
    if let Some(x) = r["reason"].as_str() {
        return x.to_string();
    }
    let msg = r["error"].as_str().unwrap_or("unknown");
    match msg.char_indices().nth(80) {
        Some((i, _)) => format!("{}...", &msg[..i]),
        None => msg.to_string(),
    }
}

/// At least [`WARM_SHARE`] of the prompt was read from the cache.
pub fn is_warm(r: &Value) -> bool {
    num(r, "cache_read_tokens") / num(r, "prompt_tokens").max(1.0) >= WARM_SHARE
}

/// The records made at or after `since` (unix seconds).
fn in_window(records: &[Value], since: f64) -> Vec<&Value> {
    records.iter().filter(|r| num(r, "time") >= since).collect()
}

/// The report over trace records made at or after `since` (unix seconds):
/// every request counted once, as answered or failed (failures grouped by
/// status and reason); the cache figures are over the answered ones.
pub fn summarize(records: &[Value], since: f64) -> Value {
    let all = in_window(records, since);
    let gens: Vec<&Value> = all.iter().copied().filter(|r| answered(r) && r.get("prompt_tokens").is_some()).collect();
    let answered_n = all.iter().filter(|r| answered(r)).count();
    let mut groups: Vec<((u64, String), usize)> = vec![];
    for r in all.iter().filter(|r| !answered(r)) {
        let key = (r["status"].as_u64().unwrap_or(0), reason(r));
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => groups.push((key, 1)),
        }
    }
    groups.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let failures: Vec<Value> = groups.iter().map(|((status, reason), n)| json!({"status": status, "reason": reason, "count": n})).collect();
    let total: f64 = gens.iter().map(|r| num(r, "prompt_tokens")).sum();
    let read: f64 = gens.iter().map(|r| num(r, "cache_read_tokens")).sum();
    let created: f64 = gens.iter().map(|r| num(r, "cache_creation_tokens")).sum();
    let computed: f64 = gens.iter().map(|r| num(r, "computed_tokens")).sum();
    let generated: f64 = gens.iter().map(|r| num(r, "generated_tokens")).sum();
    let hits = gens.iter().filter(|r| num(r, "cache_read_tokens") > 0.0).count();
    let ttfts = |warm: bool| {
        let mut v: Vec<f64> = gens.iter().filter(|r| is_warm(r) == warm).filter_map(|r| r["ttft_s"].as_f64()).collect();
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
    let period = if all.is_empty() {
        Value::Null
    } else {
        let times = || all.iter().map(|r| num(r, "time"));
        json!({"from": times().fold(f64::INFINITY, f64::min), "to": times().fold(0.0, f64::max)})
    };
    json!({
        "period": period,
        "requests": all.len(),
        "answered": answered_n,
        "failed": all.len() - answered_n,
        "failures": failures,
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

/// Unix seconds as `YYYY-MM-DD HH:MM:SS` (UTC).
pub fn utc(t: f64) -> String {
    let secs = t.max(0.0) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's days_from_civil, inverted).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The summary's period as text: `2026-11-27 12:01:07 - 12:45:30 UTC`.
pub fn period_text(s: &Value) -> String {
    let (Some(a), Some(b)) = (s["period"]["from"].as_f64(), s["period"]["to"].as_f64()) else { return "no requests".into() };
    let (fa, fb) = (utc(a), utc(b));
    if fa[..10] == fb[..10] {
        format!("{fa} - {} UTC", &fb[11..])
    } else {
        format!("{fa} - {fb} UTC")
    }
}

/// The report as text for people.
pub fn render(s: &Value, records: &[Value], detail: bool, since: f64) -> String {
    let t = &s["tokens"];
    let mut out = format!("period: {}\nrequests: {} = {} answered + {} failed\n", period_text(s), s["requests"], s["answered"], s["failed"]);
    for f in s["failures"].as_array().into_iter().flatten() {
        out += &format!("  failed: {} x status {}, {}\n", f["count"], f["status"], f["reason"].as_str().unwrap_or("-"));
    }
    out += &format!(
        "over the {} answered requests:\n\
         cache hit rate: {:.0}% of requests, {:.1}% of prompt tokens\n\
         tokens: {} prompt = {} read from cache + {} computed ({} of them stored for reuse); {} generated\n\
         time to first token, cold (<{:.0}% read): {} requests, median {}, p90 {}\n\
         time to first token, warm: {} requests, median {}, p90 {}\n",
        s["answered"],
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
        for r in in_window(records, since) {
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

    fn records() -> Vec<Value> {
        vec![
            json!({"time": 100.0, "api": "anthropic", "status": 200, "prompt_tokens": 1000, "cache_read_tokens": 0, "cache_creation_tokens": 1000, "computed_tokens": 1000, "generated_tokens": 10, "ttft_s": 20.0, "error": null}),
            json!({"time": 200.0, "api": "anthropic", "status": 200, "prompt_tokens": 1010, "cache_read_tokens": 1000, "cache_creation_tokens": 10, "computed_tokens": 10, "generated_tokens": 10, "ttft_s": 0.5, "error": null}),
            json!({"time": 300.0, "api": "anthropic", "status": 200, "prompt_tokens": 1020, "cache_read_tokens": 1010, "cache_creation_tokens": 10, "computed_tokens": 10, "generated_tokens": 10, "ttft_s": 0.7, "error": null}),
            json!({"time": 310.0, "api": "openai", "route": "/v1/chat/completions", "status": 400, "reason": "invalid_request_error (max_tokens)", "error": "max_tokens: 0 is below 1"}),
            json!({"time": 320.0, "api": "openai", "route": "/v1/chat/completions", "status": 400, "reason": "invalid_request_error (max_tokens)", "error": "max_tokens: -4 is below 1"}),
            json!({"time": 330.0, "api": "anthropic", "route": "/v1/messages", "status": 529, "reason": "overloaded_error", "error": "server is busy"}),
            // A client that left mid-answer: usage known, but not answered.
            json!({"time": 340.0, "api": "anthropic", "status": 200, "prompt_tokens": 1030, "cache_read_tokens": 1020, "computed_tokens": 10, "ttft_s": 0.4, "reason": "client_disconnected", "error": "the client disconnected"}),
            // An old record without a reason: grouped by its message.
            json!({"time": 350.0, "api": "openai", "status": 401, "error": "invalid API key"}),
        ]
    }

    #[test]
    fn every_request_counted_once_and_failures_grouped() {
        let recs = records();
        let s = summarize(&recs, 0.0);
        assert_eq!((s["requests"].as_u64(), s["answered"].as_u64(), s["failed"].as_u64()), (Some(8), Some(3), Some(5)));
        let f = &s["failures"];
        assert_eq!(f.as_array().unwrap().len(), 4, "{f}");
        assert_eq!(f[0], json!({"status": 400, "reason": "invalid_request_error (max_tokens)", "count": 2}));
        assert!(f.as_array().unwrap().contains(&json!({"status": 200, "reason": "client_disconnected", "count": 1})));
        assert!(f.as_array().unwrap().contains(&json!({"status": 401, "reason": "invalid API key", "count": 1})));
        // Cache figures are over the three answered requests only.
        assert!((num(&s, "cache_hit_rate_requests") - 2.0 / 3.0).abs() < 1e-9);
        assert!((num(&s, "cache_hit_rate_tokens") - 2010.0 / 3030.0).abs() < 1e-9);
        assert_eq!(s["tokens"]["prompt"], 3030);
        assert_eq!(s["ttft_cold"]["median_s"], 20.0);
        assert_eq!(s["ttft_warm"]["requests"], 2);
        assert_eq!(s["slowest"][0]["ttft_s"], 20.0);
        assert_eq!(s["period"], json!({"from": 100.0, "to": 350.0}));
        let text = render(&s, &recs, true, 0.0);
        assert!(text.contains("requests: 8 = 3 answered + 5 failed"), "{text}");
        assert!(text.contains("failed: 2 x status 400, invalid_request_error (max_tokens)"), "{text}");
        assert!(text.contains("over the 3 answered requests:\ncache hit rate: 67% of requests, 66.3% of prompt tokens"), "{text}");
        let later = summarize(&recs, 150.0);
        assert_eq!((later["requests"].as_u64(), later["answered"].as_u64()), (Some(7), Some(2)));
    }

    #[test]
    fn since_and_times() {
        assert_eq!(parse_since("2h", 10_000.0).unwrap(), 2800.0);
        assert_eq!(parse_since("1700000000", 0.0).unwrap(), 1.7e9);
        assert!(parse_since("soon", 0.0).is_err());
        assert_eq!(utc(0.0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_795_782_896.0), "2026-11-27 12:34:56");
        assert_eq!(utc(951_825_600.0), "2000-02-29 12:00:00");
        let s = json!({"period": {"from": 1_795_782_896.0, "to": 1_795_785_000.0}});
        assert_eq!(period_text(&s), "2026-11-27 12:34:56 - 13:10:00 UTC");
    }
}
