//! Prometheus metrics (the `prometheus-client` crate), served at `/metrics`.

use std::sync::atomic::Ordering;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::cache::prefix::CacheStats;
use crate::engine::types::{Done, PromptUsage};
use crate::engine::worker::Load;

type Labels = Vec<(String, String)>;

/// The paths a route serves; every other path is counted as `other`, so
/// requests to made-up paths cannot grow the label set (or the scrape).
pub const ROUTES: [&str; 10] = [
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/chat/completions",
    "/v1/models",
    "/health",
    "/metrics",
    "/",
    "/v1/requests/recent",
    "/v1/cache/stats",
    "/v1/cache",
];

/// A request path's `route` label: the path when a route serves it, else `other`.
pub fn route_label(path: &str) -> &'static str {
    ROUTES.iter().find(|r| **r == path).copied().unwrap_or("other")
}

/// A status's label: the code for the ones HTTP defines (100-599), else `other`.
fn status_label(status: u16) -> String {
    if (100..600).contains(&status) {
        status.to_string()
    } else {
        "other".to_string()
    }
}

pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    queue_depth: Gauge,
    running: Gauge,
    batch_rows: Gauge,
    prompt_tokens: Counter,
    cached_tokens: Counter,
    cache_creation_tokens: Counter,
    generated_tokens: Counter,
    ttft: Histogram,
    decode_tps: Histogram,
    cache_bytes: Gauge,
    cache_entries: Gauge,
    cache_hits: Gauge,
    cache_misses: Gauge,
    cache_tokens_saved: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Metrics {
            requests: Family::default(),
            errors: Family::default(),
            queue_depth: Gauge::default(),
            running: Gauge::default(),
            batch_rows: Gauge::default(),
            prompt_tokens: Counter::default(),
            cached_tokens: Counter::default(),
            cache_creation_tokens: Counter::default(),
            generated_tokens: Counter::default(),
            ttft: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            decode_tps: Histogram::new(exponential_buckets(0.5, 2.0, 12)),
            cache_bytes: Gauge::default(),
            cache_entries: Gauge::default(),
            cache_hits: Gauge::default(),
            cache_misses: Gauge::default(),
            cache_tokens_saved: Gauge::default(),
            registry: Registry::with_prefix("kvserve"),
        };
        let registry = &mut m.registry;
        registry.register("requests", "HTTP requests by API, route and status", m.requests.clone());
        registry.register("errors", "Error responses by API and status", m.errors.clone());
        registry.register("queue_depth", "Requests waiting for the engine", m.queue_depth.clone());
        registry.register("running", "Requests being computed at once", m.running.clone());
        registry.register("decode_batch_rows", "Sequences in the last batched decode step", m.batch_rows.clone());
        registry.register("prompt_tokens", "Prompt tokens of finished requests", m.prompt_tokens.clone());
        registry.register("cached_tokens", "Prompt tokens served from the prompt cache", m.cached_tokens.clone());
        registry.register("cache_creation_tokens", "Prompt tokens computed and stored for reuse", m.cache_creation_tokens.clone());
        registry.register("generated_tokens", "Generated tokens", m.generated_tokens.clone());
        registry.register("time_to_first_token_seconds", "Time from the engine taking a request to its first token", m.ttft.clone());
        registry.register("decode_tokens_per_second", "Decode speed per request", m.decode_tps.clone());
        registry.register("cache_bytes", "Bytes held by prompt-cache snapshots in memory", m.cache_bytes.clone());
        registry.register("cache_entries", "Prompt-cache snapshots (memory and disk)", m.cache_entries.clone());
        registry.register("cache_hits", "Prompt-cache lookups that found a snapshot", m.cache_hits.clone());
        registry.register("cache_misses", "Prompt-cache lookups that found none", m.cache_misses.clone());
        registry.register("cache_tokens_saved", "Prompt tokens served from snapshots", m.cache_tokens_saved.clone());
        m
    }

    /// One answered request; `route` is one of [`ROUTES`] or `other` ([`route_label`]).
    pub fn request(&self, api: &'static str, route: &'static str, status: u16) {
        let labels = vec![("api".into(), api.into()), ("route".into(), route.into()), ("status".into(), status_label(status))];
        self.requests.get_or_create(&labels).inc();
        if status >= 400 {
            self.errors.get_or_create(&vec![("api".into(), api.into()), ("status".into(), status_label(status))]).inc();
        }
    }

    pub fn finished(&self, usage: &PromptUsage, done: &Done) {
        self.prompt_tokens.inc_by(usage.prompt as u64);
        self.cached_tokens.inc_by(usage.cache_read as u64);
        self.cache_creation_tokens.inc_by(usage.cache_creation as u64);
        self.generated_tokens.inc_by(done.generated_tokens as u64);
        self.ttft.observe(done.ttft_secs);
        if done.generated_tokens > 1 && done.generation_secs > 0.0 {
            self.decode_tps.observe(done.generated_tokens as f64 / done.generation_secs);
        }
    }

    /// The text exposition, with gauges read now.
    pub fn render(&self, queue_depth: usize, load: &Load, cache: &CacheStats) -> String {
        self.queue_depth.set(queue_depth as i64);
        self.running.set(load.running.load(Ordering::SeqCst) as i64);
        self.batch_rows.set(load.batch_rows.load(Ordering::SeqCst) as i64);
        self.cache_bytes.set(cache.bytes as i64);
        self.cache_entries.set(cache.entries as i64);
        self.cache_hits.set(cache.hits as i64);
        self.cache_misses.set(cache.misses as i64);
        self.cache_tokens_saved.set(cache.tokens_saved as i64);
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_served_routes_are_labels() {
        for r in ROUTES {
            assert_eq!(route_label(r), r);
        }
        for p in ["/v1/messages/", "/x", "/v1/chat/completions?x=1", "/metrics/../metrics", ""] {
            assert_eq!(route_label(p), "other", "{p}");
        }
        assert_eq!(status_label(404), "404");
        assert_eq!(status_label(999), "other");
    }
}
