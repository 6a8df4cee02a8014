//! The last requests and the totals since start, for the dashboard's
//! `GET /v1/requests/recent`. Fed by the same records as the trace files
//! (whether or not traces are written), without request or response bodies
//! and with the API key redacted.

use std::collections::VecDeque;

use parking_lot::Mutex;
use serde_json::{json, Value};

/// Records kept in memory.
pub const KEEP: usize = 200;

#[derive(Default)]
struct Inner {
    records: VecDeque<Value>,
    requests: u64,
    answered: u64,
    prompt_tokens: u64,
    cache_read_tokens: u64,
}

#[derive(Default)]
pub struct Recent {
    inner: Mutex<Inner>,
}

/// Fields never kept here (only `--trace-bodies` puts them in a record).
pub const BODIES: [&str; 2] = ["request_body", "response_text"];

impl Recent {
    /// Keep one record (a trace record, redacted); bodies are dropped.
    pub fn push(&self, mut v: Value) {
        if let Some(o) = v.as_object_mut() {
            for k in BODIES {
                o.remove(k);
            }
        }
        let mut g = self.inner.lock();
        g.requests += 1;
        if crate::report::answered(&v) {
            g.answered += 1;
            g.prompt_tokens += v["prompt_tokens"].as_u64().unwrap_or(0);
            g.cache_read_tokens += v["cache_read_tokens"].as_u64().unwrap_or(0);
        }
        if g.records.len() == KEEP {
            g.records.pop_front();
        }
        g.records.push_back(v);
    }

    /// The totals since start and the last `limit` records, oldest first.
    pub fn view(&self, limit: usize) -> (Value, Vec<Value>) {
        let g = self.inner.lock();
        let totals = json!({
            "requests": g.requests,
            "answered": g.answered,
            "failed": g.requests - g.answered,
            "prompt_tokens": g.prompt_tokens,
            "cache_read_tokens": g.cache_read_tokens,
            "hit_rate_tokens": if g.prompt_tokens > 0 { g.cache_read_tokens as f64 / g.prompt_tokens as f64 } else { 0.0 },
        });
        let skip = g.records.len().saturating_sub(limit);
        (totals, g.records.iter().skip(skip).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_records_without_bodies_and_totals_all() {
        let r = Recent::default();
        for i in 0..(KEEP + 5) {
            r.push(json!({"status": 200, "error": null, "prompt_tokens": 100, "cache_read_tokens": if i == 0 { 0 } else { 90 },
                          "n": i, "request_body": {"messages": []}, "response_text": "secret answer"}));
        }
        r.push(json!({"status": 400, "error": "bad", "reason": "invalid_request_error (max_tokens)"}));
        let (totals, recs) = r.view(50);
        assert_eq!(totals["requests"], KEEP + 6);
        assert_eq!(totals["answered"], KEEP + 5);
        assert_eq!(totals["failed"], 1);
        assert_eq!(totals["prompt_tokens"], 100 * (KEEP + 5) as u64);
        assert_eq!(totals["cache_read_tokens"], 90 * (KEEP + 4) as u64);
        assert_eq!(recs.len(), 50);
        assert_eq!(recs[48]["n"], KEEP + 4);
        assert_eq!(recs[49]["status"], 400);
        assert!(recs.iter().all(|v| v.get("request_body").is_none() && v.get("response_text").is_none()));
        assert_eq!(r.view(usize::MAX).1.len(), KEEP);
        assert_eq!(r.view(usize::MAX).1[0]["n"], 6);
    }
}
