//! What an operator can scrape and read.
//!
//! Each thing that happens to an event has one method here that both bumps
//! its Prometheus counter and, where it deserves one, writes its log line,
//! so the two never drift apart. Label values come from bounded sets: an
//! `event_type` label is the type itself only when it is one weir knows (it
//! has a schema), and `other` otherwise, so no producer can create series at
//! will.
//!
//! The audit service's historical names are kept so existing dashboards keep
//! working: `audit_events_consumed_total{event_type,status}` and
//! `audit_processing_duration_seconds`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};
use tracing::warn;

use crate::event::{ReasonClass, Rejection};

/// Every metric weir exposes, registered in one registry.
pub struct Metrics {
    registry: Registry,
    known_types: HashSet<String>,
    consumed: IntCounterVec,
    processing: Histogram,
    dead_letters: IntCounterVec,
    duplicates: IntCounter,
    stage_seconds: HistogramVec,
    batch_size: Histogram,
    commit_seconds: Histogram,
    retries: IntCounterVec,
    reconnects: IntCounterVec,
    schema_missing: IntCounter,
    ready: IntGauge,
    dead_letter_log: RateLimit,
    duplicate_log: RateLimit,
}

/// Outcomes in `audit_events_consumed_total{status}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Stored,
    Duplicate,
    DeadLettered,
    Dropped,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Stored => "stored",
            Status::Duplicate => "duplicate",
            Status::DeadLettered => "dead_lettered",
            Status::Dropped => "dropped",
        }
    }
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric names are valid");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("metric names are valid");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("metric names are valid");
    r.register(Box::new(h.clone()))
        .expect("metric registered once");
    h
}

fn latency_buckets() -> Vec<f64> {
    vec![
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
        0.5, 1.0, 2.5, 5.0, 10.0,
    ]
}

impl Metrics {
    /// Builds the registry. `known_types` are the event types that get a
    /// label of their own.
    pub fn new(known_types: HashSet<String>) -> Metrics {
        let r = Registry::new();
        let stage_seconds = HistogramVec::new(
            HistogramOpts::new(
                "weir_stage_duration_seconds",
                "Time one event spends in one stage (decode, each transform, sink per event).",
            )
            .buckets(latency_buckets()),
            &["stage"],
        )
        .expect("metric names are valid");
        r.register(Box::new(stage_seconds.clone()))
            .expect("metric registered once");
        let ready = IntGauge::new(
            "weir_ready",
            "1 while connected to broker and database and consuming.",
        )
        .expect("metric names are valid");
        r.register(Box::new(ready.clone()))
            .expect("metric registered once");
        Metrics {
            consumed: counter_vec(
                &r,
                "audit_events_consumed_total",
                "Events consumed, by event type and outcome.",
                &["event_type", "status"],
            ),
            processing: histogram(
                &r,
                "audit_processing_duration_seconds",
                "Time from receiving an event to its commit or dead-lettering.",
                latency_buckets(),
            ),
            dead_letters: counter_vec(
                &r,
                "weir_dead_letters_total",
                "Events sent to the dead-letter queue, by reason class.",
                &["class"],
            ),
            duplicates: counter(
                &r,
                "weir_duplicates_skipped_total",
                "Events whose idempotency key was already stored.",
            ),
            stage_seconds,
            batch_size: histogram(
                &r,
                "weir_batch_size_events",
                "Events per batch written to the sink.",
                vec![1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
            ),
            commit_seconds: histogram(
                &r,
                "weir_commit_duration_seconds",
                "Time to write and commit one batch.",
                latency_buckets(),
            ),
            retries: counter_vec(
                &r,
                "weir_retries_total",
                "Retries of a stage after a transient error.",
                &["stage"],
            ),
            reconnects: counter_vec(
                &r,
                "weir_reconnects_total",
                "Reconnections to the broker or database.",
                &["target"],
            ),
            schema_missing: counter(
                &r,
                "weir_schema_missing_total",
                "Events whose event_type has no schema.",
            ),
            ready,
            registry: r,
            known_types,
            dead_letter_log: RateLimit::new(10, Duration::from_secs(10)),
            duplicate_log: RateLimit::new(10, Duration::from_secs(10)),
        }
    }

    /// The registry, for the HTTP listener.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Prometheus text format of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    fn type_label<'a>(&self, event_type: &'a str) -> &'a str {
        if self.known_types.contains(event_type) {
            event_type
        } else {
            "other"
        }
    }

    /// An event reached its final outcome.
    pub fn finished(&self, event_type: &str, status: Status, received: Instant) {
        self.consumed
            .with_label_values(&[self.type_label(event_type), status.as_str()])
            .inc();
        self.processing.observe(received.elapsed().as_secs_f64());
    }

    /// An event was dead-lettered: count it and log it, rate-limited.
    pub fn dead_lettered(
        &self,
        event_type: &str,
        key: Option<&str>,
        why: &Rejection,
        received: Instant,
    ) {
        self.dead_letters
            .with_label_values(&[why.class.as_str()])
            .inc();
        self.finished(event_type, Status::DeadLettered, received);
        if let Some(suppressed) = self.dead_letter_log.admit() {
            warn!(
                event_type = %event_type,
                key = key.unwrap_or("-"),
                class = why.class.as_str(),
                stage = %why.stage,
                reason = %why.reason,
                suppressed,
                "Event dead-lettered."
            );
        }
    }

    /// A stored event turned out to be there already.
    pub fn duplicate(&self, event_type: &str, key: &str, received: Instant) {
        self.duplicates.inc();
        self.finished(event_type, Status::Duplicate, received);
        if let Some(suppressed) = self.duplicate_log.admit() {
            warn!(event_type = %event_type, key = %key, suppressed, "Duplicate event skipped.");
        }
    }

    /// Time spent in one stage for one event.
    pub fn stage(&self, stage: &str, took: Duration) {
        self.stage_seconds
            .with_label_values(&[stage])
            .observe(took.as_secs_f64());
    }

    /// A batch was committed.
    pub fn committed(&self, size: usize, took: Duration) {
        self.batch_size.observe(size as f64);
        self.commit_seconds.observe(took.as_secs_f64());
    }

    /// A stage is retried after a transient error.
    pub fn retry(&self, stage: &str) {
        self.retries.with_label_values(&[stage]).inc();
    }

    /// A connection was made again.
    pub fn reconnect(&self, target: &str) {
        self.reconnects.with_label_values(&[target]).inc();
    }

    /// An event had no schema for its type.
    pub fn schema_missing(&self) {
        self.schema_missing.inc();
    }

    /// Whether the pipeline is connected and consuming.
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// Whether [`Metrics::set_ready`] last said ready.
    pub fn is_ready(&self) -> bool {
        self.ready.get() == 1
    }

    /// The label a reason class gets.
    pub fn class_label(class: ReasonClass) -> &'static str {
        class.as_str()
    }
}

/// Lets through at most `burst` log lines per `window`, and reports how
/// many were held back since the last one let through.
struct RateLimit {
    burst: u64,
    window: Duration,
    state: Mutex<(Instant, u64)>,
    suppressed: AtomicU64,
}

impl RateLimit {
    fn new(burst: u64, window: Duration) -> Self {
        RateLimit {
            burst,
            window,
            state: Mutex::new((Instant::now(), 0)),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(held back so far)` when this line may be logged.
    fn admit(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.0.elapsed() >= self.window {
            *state = (Instant::now(), 0);
        }
        if state.1 < self.burst {
            state.1 += 1;
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_event_types_share_one_label() {
        let m = Metrics::new(HashSet::from(["order.created".to_string()]));
        for i in 0..100 {
            m.finished(&format!("made.up.{i}"), Status::Stored, Instant::now());
        }
        m.finished("order.created", Status::Stored, Instant::now());
        let text = m.render();
        assert!(
            text.contains(r#"audit_events_consumed_total{event_type="other",status="stored"} 100"#),
            "{text}"
        );
        assert!(text.contains(r#"event_type="order.created""#));
        assert!(!text.contains("made.up"));
    }

    #[test]
    fn rate_limit_holds_back_past_the_burst() {
        let r = RateLimit::new(2, Duration::from_secs(60));
        assert_eq!(r.admit(), Some(0));
        assert_eq!(r.admit(), Some(0));
        assert_eq!(r.admit(), None);
        assert_eq!(r.admit(), None);
    }
}
