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
//!
//! Readiness is the conjunction of two flags, `broker` (connected and
//! consuming; [`Metrics::set_ready`]) and `sink` (the database answers;
//! [`Metrics::set_sink_ready`], from batch writes and from the idle probe in
//! [`crate::sinks::probe`]). Whoever notices a connection drop or its return
//! flips its flag; `/ready` in [`crate::http`] and the `weir_ready` gauge
//! read both.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tracing::warn;

use crate::event::{ReasonClass, Rejection};

/// An error and each of its causes, joined by `: `, for a log field: the
/// top-level message alone ("cannot insert a batch of 26 events") rarely
/// says what went wrong.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Every metric weir exposes, registered in one registry.
pub struct Metrics {
    registry: Registry,
    /// Event types that get a label of their own: those with a schema,
    /// added by the pipeline once its transforms are built.
    known_types: RwLock<HashSet<String>>,
    consumed: IntCounterVec,
    processing: Histogram,
    dead_letters: IntCounterVec,
    duplicates: IntCounter,
    stage_seconds: HistogramVec,
    stage_events: IntCounterVec,
    plugin_seconds: HistogramVec,
    batch_size: Histogram,
    commit_seconds: Histogram,
    retries: IntCounterVec,
    reconnects: IntCounterVec,
    schema_missing: IntCounter,
    queue_depth: IntGaugeVec,
    /// `weir_up{target}`: 1 while that connection is usable.
    up: IntGaugeVec,
    /// `weir_ready`: both `up` flags; recomputed under `ready_lock` so a
    /// concurrent flip of the other flag is never lost.
    ready: IntGauge,
    ready_lock: Mutex<()>,
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

/// What one stage did with one event, in
/// `weir_stage_events_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageOutcome {
    /// Passed on (for the sink: stored, or already there).
    Ok,
    /// Dropped on purpose and acknowledged.
    Dropped,
    /// Rejected: the event goes to the dead-letter queue.
    Rejected,
}

impl StageOutcome {
    fn as_str(self) -> &'static str {
        match self {
            StageOutcome::Ok => "ok",
            StageOutcome::Dropped => "dropped",
            StageOutcome::Rejected => "rejected",
        }
    }
}

/// The connections `/ready` depends on.
const BROKER: &str = "broker";
const SINK: &str = "sink";

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

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("metric names are valid");
    r.register(Box::new(h.clone()))
        .expect("metric registered once");
    h
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("metric names are valid");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
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
        let ready = IntGauge::new(
            "weir_ready",
            "1 while connected to broker and database and consuming.",
        )
        .expect("metric names are valid");
        r.register(Box::new(ready.clone()))
            .expect("metric registered once");
        let build = gauge_vec(
            &r,
            "weir_build_info",
            "Always 1; the running version.",
            &["version"],
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let up = gauge_vec(
            &r,
            "weir_up",
            "1 while the connection to this target is usable (broker: connected and consuming).",
            &["target"],
        );
        up.with_label_values(&[BROKER]).set(0);
        up.with_label_values(&[SINK]).set(1);
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
            stage_seconds: histogram_vec(
                &r,
                "weir_stage_duration_seconds",
                "Time one event spends in one stage: source (decoding), each transform by \
                 name, sink (the write of its batch).",
                &["stage"],
                latency_buckets(),
            ),
            stage_events: counter_vec(
                &r,
                "weir_stage_events_total",
                "Events leaving each stage, by outcome (ok, dropped, rejected).",
                &["stage", "outcome"],
            ),
            plugin_seconds: histogram_vec(
                &r,
                "weir_plugin_duration_seconds",
                "Time of one WASM plugin call, by plugin (stage name).",
                &["plugin"],
                latency_buckets(),
            ),
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
                "Events a schema stage found no schema for (type or version).",
            ),
            queue_depth: gauge_vec(
                &r,
                "weir_queue_depth_messages",
                "Messages ready in a queue (the consumed one and the dead-letter one), \
                 refreshed every few seconds.",
                &["queue"],
            ),
            up,
            ready,
            ready_lock: Mutex::new(()),
            registry: r,
            known_types: RwLock::new(known_types),
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

    /// Gives these event types a label of their own. Call it with the
    /// types that have a schema; every other type is counted as `other`.
    pub fn add_event_types<I, S>(&self, types: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut known = self.known_types.write().unwrap_or_else(|p| p.into_inner());
        known.extend(types.into_iter().map(Into::into));
    }

    /// A schema stage found no schema for an event's type and version.
    pub fn schema_missing(&self) {
        self.schema_missing.inc();
    }

    fn is_known(&self, event_type: &str) -> bool {
        let known = self.known_types.read().unwrap_or_else(|p| p.into_inner());
        known.contains(event_type)
    }

    fn type_label<'a>(&self, event_type: &'a str) -> &'a str {
        if self.is_known(event_type) {
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

    /// One event left one stage after `took`. `stage` is `source`, a
    /// transform's name from the pipeline file, or `sink`.
    pub fn stage(&self, stage: &str, outcome: StageOutcome, took: Duration) {
        self.stage_seconds
            .with_label_values(&[stage])
            .observe(took.as_secs_f64());
        self.stage_events
            .with_label_values(&[stage, outcome.as_str()])
            .inc();
    }

    /// One WASM plugin call took `took`.
    pub fn plugin(&self, plugin: &str, took: Duration) {
        self.plugin_seconds
            .with_label_values(&[plugin])
            .observe(took.as_secs_f64());
    }

    /// The broker says `queue` holds `messages` ready messages.
    pub fn set_queue_depth(&self, queue: &str, messages: u32) {
        self.queue_depth
            .with_label_values(&[queue])
            .set(i64::from(messages));
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

    /// Whether the source is connected to the broker and consuming. The
    /// pipeline says true once it consumes and false when it stops; a
    /// source that loses its connection says false, and true again once it
    /// consumes on a new one. Cheap when nothing changes, so it may be
    /// called once per delivery.
    pub fn set_ready(&self, ready: bool) {
        self.set_up(BROKER, ready);
    }

    /// Whether the sink can write: false after a write failed for the whole
    /// batch or the database probe got no answer, true again once a write
    /// or a probe went through.
    pub fn set_sink_ready(&self, ready: bool) {
        self.set_up(SINK, ready);
    }

    fn set_up(&self, target: &str, up: bool) {
        let gauge = self.up.with_label_values(&[target]);
        if gauge.get() == i64::from(up) {
            return;
        }
        let _guard = self.ready_lock.lock().unwrap_or_else(|p| p.into_inner());
        gauge.set(i64::from(up));
        self.ready.set(i64::from(self.readiness().is_ready()));
    }

    /// Which of the connections `/ready` depends on are up.
    pub fn readiness(&self) -> Readiness {
        Readiness {
            broker: self.up.with_label_values(&[BROKER]).get() == 1,
            sink: self.up.with_label_values(&[SINK]).get() == 1,
        }
    }

    /// Whether weir is connected to broker and sink and consuming.
    pub fn is_ready(&self) -> bool {
        self.readiness().is_ready()
    }

    /// The label a reason class gets.
    pub fn class_label(class: ReasonClass) -> &'static str {
        class.as_str()
    }
}

/// The parts of readiness, for `/ready`'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// Connected to the broker and consuming.
    pub broker: bool,
    /// The sink's last write went through.
    pub sink: bool,
}

impl Readiness {
    /// Both parts are up.
    pub fn is_ready(self) -> bool {
        self.broker && self.sink
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
    fn event_types_added_later_get_their_own_label() {
        let m = Metrics::new(HashSet::new());
        m.add_event_types(["order.created"]);
        m.finished("order.created", Status::Duplicate, Instant::now());
        let text = m.render();
        assert!(
            text.contains(
                r#"audit_events_consumed_total{event_type="order.created",status="duplicate"} 1"#
            ),
            "{text}"
        );
    }

    #[test]
    fn ready_needs_both_broker_and_sink() {
        let m = Metrics::new(HashSet::new());
        assert!(!m.is_ready(), "not ready before the pipeline consumes");
        m.set_ready(true);
        assert!(m.is_ready());
        m.set_sink_ready(false);
        assert!(!m.is_ready());
        assert!(m.render().contains("weir_ready 0"));
        m.set_sink_ready(true);
        assert!(m.render().contains("weir_ready 1"));
        m.set_ready(false);
        assert_eq!(
            m.readiness(),
            Readiness {
                broker: false,
                sink: true
            }
        );
        assert!(m.render().contains(r#"weir_up{target="broker"} 0"#));
    }

    #[test]
    fn stage_plugin_and_queue_metrics_are_rendered() {
        let m = Metrics::new(HashSet::new());
        m.stage("validate", StageOutcome::Rejected, Duration::from_millis(2));
        m.plugin("validate", Duration::from_millis(2));
        m.set_queue_depth("audit_service_queue", 7);
        let text = m.render();
        for want in [
            r#"weir_stage_events_total{outcome="rejected",stage="validate"} 1"#,
            r#"weir_stage_duration_seconds_count{stage="validate"} 1"#,
            r#"weir_plugin_duration_seconds_count{plugin="validate"} 1"#,
            r#"weir_queue_depth_messages{queue="audit_service_queue"} 7"#,
            "weir_build_info{version=",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
    }

    /// A `Metrics` in which every metric has at least one series.
    fn every_metric_touched() -> Metrics {
        let m = Metrics::new(HashSet::from(["order.created".to_string()]));
        let why = Rejection::new(ReasonClass::Decode, "source", "not JSON");
        m.schema_missing();
        m.finished("order.created", Status::Stored, Instant::now());
        m.dead_lettered("", None, &why, Instant::now());
        m.duplicate("order.created", "k", Instant::now());
        m.stage("source", StageOutcome::Ok, Duration::ZERO);
        m.plugin("enrich", Duration::ZERO);
        m.committed(1, Duration::ZERO);
        m.retry("postgres");
        m.reconnect("broker");
        m.set_queue_depth("q", 0);
        m
    }

    /// The dashboard and the README name only metrics weir exposes, and
    /// the README names them all.
    #[test]
    fn dashboard_and_readme_agree_with_the_registry() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let rendered = every_metric_touched().render();
        let exposed: HashSet<&str> = rendered
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        let dashboard = std::fs::read_to_string(root.join("dashboards/weir.json"))
            .expect("dashboards/weir.json is readable");
        let _: serde_json::Value =
            serde_json::from_str(&dashboard).expect("dashboards/weir.json is JSON");
        let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
        for name in metric_names(&dashboard) {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            assert!(
                exposed.contains(base),
                "the dashboard uses unknown metric {name}"
            );
        }
        for name in &exposed {
            assert!(
                readme.contains(&format!("`{name}`")),
                "README.md does not list {name}"
            );
        }
    }

    /// Words in `text` that look like weir's metric names.
    fn metric_names(text: &str) -> HashSet<String> {
        text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("weir_") || w.starts_with("audit_"))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn rate_limit_holds_back_past_the_burst() {
        let r = RateLimit::new(2, Duration::from_secs(60));
        assert_eq!(r.admit(), Some(0));
        assert_eq!(r.admit(), Some(0));
        assert_eq!(r.admit(), None);
        assert_eq!(r.admit(), None);
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // a plain test thread, no runtime
    fn rate_limit_reports_what_it_held_back_in_the_next_window() {
        let r = RateLimit::new(1, Duration::from_millis(20));
        assert_eq!(r.admit(), Some(0));
        assert_eq!(r.admit(), None);
        assert_eq!(r.admit(), None);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(r.admit(), Some(2));
    }
}
