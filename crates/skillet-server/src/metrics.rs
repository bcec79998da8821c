//! Prometheus counters, gauges and histograms, kept in atomics (no lock on
//! the token path) and written in the text exposition format.

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds (seconds) of the latency histograms.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A cumulative histogram of seconds.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, seconds: f64) {
        for (b, c) in BUCKETS.iter().zip(&self.counts) {
            if seconds <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(
            out,
            "{name}_sum {}\n{name}_count {n}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
    }
}

/// Everything `/metrics` reports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Finished HTTP requests by route and status.
    requests: Mutex<Vec<(String, u16, u64)>>,
    /// Prompt tokens of accepted requests.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub generation_tokens: AtomicU64,
    /// Prompt tokens taken from a slot's cache instead of computed.
    pub cached_prompt_tokens: AtomicU64,
    /// Sequences waiting for a slot.
    pub waiting: AtomicU64,
    /// Sequences holding a slot.
    pub running: AtomicU64,
    /// Sequences cancelled because their client went away.
    pub cancelled: AtomicU64,
    /// Arrival to first token.
    pub ttft: Histogram,
    /// Time between tokens of one sequence.
    pub inter_token: Histogram,
}

impl Metrics {
    /// Counts a finished request.
    pub fn request(&self, route: &str, status: u16) {
        let Ok(mut r) = self.requests.lock() else {
            return;
        };
        match r.iter_mut().find(|(p, s, _)| p == route && *s == status) {
            Some(entry) => entry.2 += 1,
            None => r.push((route.to_string(), status, 1)),
        }
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP skillet_requests_total HTTP requests by route and status.\n# TYPE skillet_requests_total counter\n");
        if let Ok(r) = self.requests.lock() {
            for (route, status, n) in r.iter() {
                let _ = writeln!(
                    out,
                    "skillet_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for (name, kind, help, v) in [
            (
                "skillet_prompt_tokens_total",
                "counter",
                "Prompt tokens of accepted requests.",
                load(&self.prompt_tokens),
            ),
            (
                "skillet_generation_tokens_total",
                "counter",
                "Tokens generated.",
                load(&self.generation_tokens),
            ),
            (
                "skillet_cancelled_sequences_total",
                "counter",
                "Sequences dropped because their client went away.",
                load(&self.cancelled),
            ),
            (
                "skillet_queue_depth",
                "gauge",
                "Sequences waiting for a slot.",
                load(&self.waiting),
            ),
            (
                "skillet_running_sequences",
                "gauge",
                "Sequences holding a slot.",
                load(&self.running),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
        self.ttft.write(
            &mut out,
            "skillet_time_to_first_token_seconds",
            "From arrival to the first generated token.",
        );
        self.inter_token.write(
            &mut out,
            "skillet_time_per_output_token_seconds",
            "Between consecutive tokens of one sequence.",
        );
        out
    }
}
