//! The wiring: source → transforms → sink, and the delivery rules.
//!
//! This is the only module that knows the order of the stages. For each
//! delivery it decodes the body once and computes the idempotency key, runs
//! the transforms, and either adds the event to the open batch, acks it
//! (dropped on purpose) or dead-letters it with the reason. A batch is
//! written when it holds `max_events` or when its oldest event has waited
//! `max_wait`, by a timer; only after the sink committed it are its
//! deliveries acknowledged.
//!
//! A batch is written by a task of its own while the next one fills, so
//! that decoding and transforms overlap the database's commit. Up to the
//! sink's [`Sink::max_writes`] batches are written at once; a full batch
//! beyond that waits for the oldest write and settles it first. Writes are
//! settled in the order their batches were cut. With `max_events` below the
//! source's prefetch, the broker keeps sending while a batch commits.
//!
//! Transient failures (the database unreachable, a dead letter not
//! confirmed) are retried with exponential backoff and jitter while nothing
//! new is taken from the source, so the broker keeps the rest. Shutdown
//! stops consumption, writes and acknowledges the open batch, then closes.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio::time::sleep_until;
use tracing::{debug, error, info, instrument, trace, warn};

use crate::config::{BatchConfig, KeySource, Pipeline, RetryConfig, SourceConfig};
use crate::event::{Event, ReasonClass, Rejection};
use crate::metrics::{Metrics, StageOutcome, Status};
use crate::retry::Backoff;
use crate::sinks::probe::SinkProbe;
use crate::sinks::{RowOutcome, Sink, SinkError};
use crate::sources::amqp::AmqpSource;
use crate::sources::file::FileSource;
use crate::sources::queue_depth::QueueDepthProbe;
use crate::sources::{Source, SourceError};
use crate::transforms::{Chain, Transform, Verdict};

/// Why a pipeline stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    #[error("cannot build the transforms")]
    Transforms(#[from] crate::transforms::TransformError),
    #[error("sink `{0}` failed")]
    Sink(&'static str, #[source] SinkError),
    #[error("source failed")]
    Source(#[from] SourceError),
    #[error(
        "stopped while the sink was unreachable; {0} event(s) were not written and go back to \
         the queue"
    )]
    Interrupted(usize),
}

/// What a run did, for the closing log line and summaries.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub received: u64,
    pub stored: u64,
    pub duplicates: u64,
    pub dead_lettered: u64,
    pub dropped: u64,
}

/// The closing line of `weir run`:
/// `stored N, duplicates skipped N, dead-lettered N, dropped N`.
impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stored {}, duplicates skipped {}, dead-lettered {}, dropped {}",
            self.stored, self.duplicates, self.dead_lettered, self.dropped
        )
    }
}

/// Runs a pipeline until `shutdown` resolves or the source ends.
///
/// # Errors
///
/// When a stage cannot start, or fails in a way retrying cannot fix.
pub async fn run(
    pipeline: &Pipeline,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Summary, PipelineError> {
    let chain = Chain::build(pipeline)?;
    if chain
        .stages()
        .iter()
        .any(|s| matches!(s, Transform::Schema(_)))
    {
        metrics.add_event_types(chain.event_types());
    }
    let sink_cfg = &pipeline.config.sink;
    let sink = Sink::connect(sink_cfg, &pipeline.base_dir)
        .await
        .map_err(|e| PipelineError::Sink(sink_cfg.kind(), e))?;
    match &pipeline.config.source {
        SourceConfig::Amqp(cfg) => {
            let source = AmqpSource::connect(cfg)
                .await
                .map_err(SourceError::from)?
                .with_retry(pipeline.config.retry)
                .with_metrics(metrics.clone());
            drive(pipeline, source, chain, sink, metrics, shutdown).await
        }
        SourceConfig::File(cfg) => {
            let source = FileSource::open(cfg, &pipeline.base_dir).map_err(SourceError::from)?;
            drive(pipeline, source, chain, sink, metrics, shutdown).await
        }
    }
}

/// Runs a pipeline whose source and sink are open, whatever the source.
async fn drive<S: Source>(
    pipeline: &Pipeline,
    source: S,
    chain: Chain,
    sink: Sink,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Summary, PipelineError> {
    let sink_cfg = &pipeline.config.sink;
    let _depth_probe = match &pipeline.config.source {
        SourceConfig::Amqp(cfg) => Some(QueueDepthProbe::spawn(cfg, metrics.clone())),
        _ => None,
    };
    let _sink_probe = SinkProbe::spawn(&sink, metrics.clone());
    let max_writes = sink.max_writes();
    let sink = Arc::new(sink);
    info!(pipeline = %pipeline.path.display(), transforms = chain.stages().len(), "Pipeline started.");
    metrics.set_sink_ready(true);
    metrics.set_ready(true);
    let mut runner = Runner {
        source,
        chain,
        sink,
        metrics: metrics.clone(),
        key: pipeline.config.idempotency.key.clone(),
        batch_cfg: sink_cfg.batch(),
        retry: pipeline.config.retry,
        delivery_limit: match &pipeline.config.source {
            SourceConfig::Amqp(a) => a.effective_delivery_limit(),
            _ => None,
        },
        redeliveries: Default::default(),
        stop: tokio::sync::watch::channel(false).1,
        batch: Batch::default(),
        max_writes,
        writing: VecDeque::new(),
        summary: Summary::default(),
    };
    // The shutdown signal is watched from its own task, so that a retry
    // loop deep in a stage can see it too.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let result = runner.run(stop_rx).await;
    watcher.abort();
    metrics.set_ready(false);
    let summary = runner.summary;
    runner.source.close().await;
    // `run` waited for every write, unless one failed; a write still
    // running then keeps the sink, and the process is ending anyway.
    if let Ok(sink) = Arc::try_unwrap(runner.sink) {
        sink.close().await;
    }
    info!(
        received = summary.received,
        stored = summary.stored,
        duplicates = summary.duplicates,
        dead_lettered = summary.dead_lettered,
        dropped = summary.dropped,
        "Pipeline stopped."
    );
    result.map(|()| summary)
}

/// Events waiting to be written, with their deliveries.
struct Batch<D> {
    events: Vec<Event>,
    pending: Vec<Pending<D>>,
    deadline: Option<tokio::time::Instant>,
}

impl<D> Default for Batch<D> {
    fn default() -> Self {
        Batch {
            events: Vec::new(),
            pending: Vec::new(),
            deadline: None,
        }
    }
}

/// A delivery whose event is in the open batch.
struct Pending<D> {
    delivery: D,
    received: Instant,
}

/// A batch being written by its own task, and its deliveries, which are
/// settled once the task reports.
struct Writing<D> {
    task: JoinHandle<Result<Written, PipelineError>>,
    pending: Vec<Pending<D>>,
}

/// What a batch write did.
struct Written {
    events: Vec<Event>,
    report: Vec<RowOutcome>,
    /// From the first attempt to the commit, retries included.
    took: Duration,
    /// Attempts that failed before the one that went through.
    retries: u32,
}

struct Runner<S: Source> {
    source: S,
    chain: Chain,
    /// Shared with the tasks writing batches.
    sink: Arc<Sink>,
    metrics: Arc<Metrics>,
    key: Vec<KeySource>,
    batch_cfg: BatchConfig,
    retry: RetryConfig,
    delivery_limit: Option<u32>,
    /// True once shutdown was asked for; seen by retry loops.
    stop: tokio::sync::watch::Receiver<bool>,
    /// Deliveries of redelivered messages, by key, when the sink cannot
    /// count them.
    redeliveries: std::collections::HashMap<String, u32>,
    batch: Batch<S::Delivery>,
    /// Most batches written at once.
    max_writes: usize,
    /// The batches being written, oldest first.
    writing: VecDeque<Writing<S::Delivery>>,
    summary: Summary,
}

impl<S: Source> Runner<S> {
    async fn run(
        &mut self,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), PipelineError> {
        self.stop = stop.clone();
        // One timer, re-armed once per batch rather than made anew for each
        // delivery.
        let timer = sleep_until(far_future());
        tokio::pin!(timer);
        let mut armed = None;
        loop {
            if self.batch.deadline != armed {
                armed = self.batch.deadline;
                if let Some(deadline) = armed {
                    timer.as_mut().reset(deadline);
                }
            }
            tokio::select! {
                biased;
                _ = stop.wait_for(|stop| *stop) => {
                    info!("Shutdown requested; flushing the open batch.");
                    self.source.stop().await;
                    break;
                }
                done = written(self.writing.front_mut()), if !self.writing.is_empty() => {
                    let pending = self.writing.pop_front().map(|w| w.pending).unwrap_or_default();
                    self.settle(done?, pending).await?;
                }
                () = &mut timer, if armed.is_some() => {
                    self.flush().await?;
                }
                next = self.source.next() => match next {
                    Some(Ok(d)) => {
                        self.metrics.set_ready(true);
                        self.handle(d).await?;
                    }
                    Some(Err(e)) => {
                        self.metrics.set_ready(false);
                        error!(error = %crate::metrics::error_chain(&e), "Source failed.");
                        return Err(e.into());
                    }
                    None => {
                        info!("Source ended.");
                        break;
                    }
                },
            }
        }
        let open = self.batch.events.len();
        self.flush().await?;
        while !self.writing.is_empty() {
            self.finish_write().await?;
        }
        info!(events = open, "Open batch flushed.");
        Ok(())
    }

    #[instrument(level = "trace", skip_all)]
    async fn handle(&mut self, delivery: S::Delivery) -> Result<(), PipelineError> {
        let received = Instant::now();
        self.summary.received += 1;
        let decoded = Event::decode(S::message(&delivery), &self.key);
        if let Some(why) = self.over_delivery_limit(&delivery, &decoded).await {
            let (event_type, key) = match &decoded {
                Ok(e) => (e.event_type().to_string(), Some(e.key.as_str())),
                Err(_) => (String::new(), None),
            };
            let key = key.map(str::to_string);
            self.dead_letter(&delivery, &event_type, key.as_deref(), &why, received)
                .await?;
            // Set aside: a replay of it starts counting afresh.
            if let Some(key) = &key {
                self.forget_redeliveries(&[key.as_str()]).await;
            }
            return Ok(());
        }
        let outcome = match decoded {
            Ok(_) => StageOutcome::Ok,
            Err(_) => StageOutcome::Rejected,
        };
        self.metrics.stage("source", outcome, received.elapsed());
        let mut event = match decoded {
            Ok(e) => e,
            Err(why) => return self.dead_letter(&delivery, "", None, &why, received).await,
        };
        trace!(key = %event.key, event_type = %event.event_type(), "Event decoded.");

        let metrics = &self.metrics;
        let verdict = self.chain.apply_observed(
            &mut event,
            Some(&S::message(&delivery).body[..]),
            |stage, took, verdict| {
                metrics.stage(stage.name(), stage_outcome(verdict), took);
                match stage {
                    Transform::Wasm(_) => metrics.plugin(stage.name(), took),
                    Transform::Schema(s) if s.missed_last() => metrics.schema_missing(),
                    Transform::Schema(_) => {}
                }
            },
        );
        match verdict {
            Verdict::Keep => {
                if self.batch.events.is_empty() {
                    self.batch.deadline =
                        Some(tokio::time::Instant::now() + self.batch_cfg.max_wait);
                }
                self.batch.events.push(event);
                self.batch.pending.push(Pending { delivery, received });
                if self.batch.events.len() >= self.batch_cfg.max_events {
                    self.flush().await?;
                }
                Ok(())
            }
            Verdict::Drop => {
                self.ack(&delivery).await?;
                self.flush_acks().await?;
                self.summary.dropped += 1;
                self.metrics
                    .finished(event.event_type(), Status::Dropped, received);
                Ok(())
            }
            Verdict::Reject(why) => {
                let event_type = event.event_type().to_string();
                self.dead_letter(&delivery, &event_type, Some(&event.key), &why, received)
                    .await
            }
        }
    }

    /// Hands the open batch to a task that writes it, once fewer than
    /// `max_writes` batches are being written.
    async fn flush(&mut self) -> Result<(), PipelineError> {
        self.batch.deadline = None;
        if self.batch.events.is_empty() {
            return Ok(());
        }
        while self.writing.len() >= self.max_writes {
            self.finish_write().await?;
        }
        let room = self.batch_cfg.max_events;
        let events = std::mem::replace(&mut self.batch.events, Vec::with_capacity(room));
        let pending = std::mem::replace(&mut self.batch.pending, Vec::with_capacity(room));
        let task = tokio::spawn(write_batch(
            self.sink.clone(),
            events,
            self.metrics.clone(),
            self.retry,
            self.stop.clone(),
        ));
        self.writing.push_back(Writing { task, pending });
        Ok(())
    }

    /// Waits for the oldest batch being written, if any, and settles it.
    async fn finish_write(&mut self) -> Result<(), PipelineError> {
        let Some(writing) = self.writing.pop_front() else {
            return Ok(());
        };
        let written = joined(writing.task.await)?;
        self.settle(written, writing.pending).await
    }

    /// Acknowledges what a write stored and dead-letters what it refused.
    async fn settle(
        &mut self,
        written: Written,
        pending: Vec<Pending<S::Delivery>>,
    ) -> Result<(), PipelineError> {
        let Written {
            events,
            report,
            took,
            retries,
        } = written;
        self.metrics.committed(events.len(), took);
        if retries > 0 {
            info!(
                sink = self.sink.name(),
                attempts = retries,
                "Sink write went through again."
            );
            self.metrics.reconnect("sink");
        }
        self.metrics.set_sink_ready(true);
        for outcome in &report {
            let outcome = match outcome {
                RowOutcome::Refused(_) => StageOutcome::Rejected,
                RowOutcome::Stored | RowOutcome::Duplicate => StageOutcome::Ok,
            };
            self.metrics.stage("sink", outcome, took);
        }

        for ((event, p), outcome) in events.iter().zip(&pending).zip(report) {
            let event_type = event.event_type();
            match outcome {
                RowOutcome::Refused(why) => {
                    self.dead_letter(&p.delivery, event_type, Some(&event.key), &why, p.received)
                        .await?;
                }
                RowOutcome::Stored => {
                    self.ack(&p.delivery).await?;
                    self.summary.stored += 1;
                    self.metrics
                        .finished(event_type, Status::Stored, p.received);
                }
                RowOutcome::Duplicate => {
                    self.ack(&p.delivery).await?;
                    self.summary.duplicates += 1;
                    self.metrics.duplicate(event_type, &event.key, p.received);
                }
            }
        }
        let settled: Vec<&str> = events
            .iter()
            .zip(&pending)
            .filter(|(_, p)| S::redelivered(&p.delivery))
            .map(|(e, _)| e.key.as_str())
            .collect();
        self.forget_redeliveries(&settled).await;
        self.flush_acks().await
    }

    async fn dead_letter(
        &mut self,
        delivery: &S::Delivery,
        event_type: &str,
        key: Option<&str>,
        why: &Rejection,
        received: Instant,
    ) -> Result<(), PipelineError> {
        let mut backoff = Backoff::new(self.retry);
        let done = loop {
            match self.source.dead_letter(delivery, why, key).await {
                Ok(done) => break done,
                Err(e) => self.settle_failed(e, &mut backoff).await?,
            }
        };
        // Not done: the link was lost, the message goes back to the queue
        // and is counted when it is handled again.
        if done {
            self.summary.dead_lettered += 1;
            self.metrics.dead_lettered(event_type, key, why, received);
        }
        self.flush_acks().await
    }

    /// A poison message: one delivered more than `delivery_limit` times
    /// without being settled (weir died on it, say). It is dead-lettered
    /// before any stage sees it again. The count is the broker's where the
    /// queue keeps one (quorum queues); otherwise redeliveries are counted
    /// in the sink's database, so the count survives weir dying, or in
    /// memory for sinks without one.
    async fn over_delivery_limit(
        &mut self,
        delivery: &S::Delivery,
        decoded: &Result<Event, Rejection>,
    ) -> Option<Rejection> {
        let limit = self.delivery_limit?;
        let deliveries = match S::delivery_count(delivery) {
            Some(before) => before.saturating_add(1),
            None if S::redelivered(delivery) => {
                let key = &decoded.as_ref().ok()?.key;
                match self.sink.count_redelivery(key).await {
                    Ok(Some(n)) => n,
                    Ok(None) => {
                        let n = self.redeliveries.entry(key.clone()).or_insert(1);
                        *n += 1;
                        *n
                    }
                    Err(error) => {
                        warn!(%error, "Cannot count a redelivery; handling the message anyway.");
                        return None;
                    }
                }
            }
            None => return None,
        };
        (deliveries > limit).then(|| {
            Rejection::new(
                ReasonClass::DeliveryLimit,
                "source",
                format!(
                    "delivered {deliveries} times, past the delivery limit of {limit}; set aside \
                     as a poison message"
                ),
            )
        })
    }

    /// Forgets the delivery counts of redelivered events that are now
    /// stored. Best effort: a count left behind only matters if the same
    /// event is delivered again.
    async fn forget_redeliveries(&mut self, keys: &[&str]) {
        if keys.is_empty() {
            return;
        }
        for k in keys {
            self.redeliveries.remove(*k);
        }
        if let Err(error) = self.sink.forget_redeliveries(keys).await {
            debug!(%error, "Cannot forget delivery counts.");
        }
    }

    /// Acknowledges a delivery, retrying while the failure is transient.
    async fn ack(&mut self, delivery: &S::Delivery) -> Result<(), PipelineError> {
        let mut backoff = Backoff::new(self.retry);
        loop {
            match self.source.ack(delivery).await {
                Ok(()) => return Ok(()),
                Err(e) => self.settle_failed(e, &mut backoff).await?,
            }
        }
    }

    /// Sends the acknowledgements the source held back, retrying while
    /// the failure is transient.
    async fn flush_acks(&mut self) -> Result<(), PipelineError> {
        let mut backoff = Backoff::new(self.retry);
        loop {
            match self.source.flush_acks().await {
                Ok(()) => return Ok(()),
                Err(e) => self.settle_failed(e, &mut backoff).await?,
            }
        }
    }

    /// Waits before settling again, or gives up: a failure that lasts
    /// through eight retries (a dead-letter queue nobody bound, say) needs
    /// an operator, and the unsettled message is safe in the queue.
    async fn settle_failed(
        &self,
        e: SourceError,
        backoff: &mut Backoff,
    ) -> Result<(), PipelineError> {
        if !e.is_transient() || backoff.attempts >= 8 {
            error!(error = %crate::metrics::error_chain(&e), "Cannot settle a delivery; stopping.");
            return Err(e.into());
        }
        let wait = backoff.next_delay();
        warn!(error = %crate::metrics::error_chain(&e), retry_in = ?wait, "Settling a delivery failed; retrying.");
        self.metrics.retry("source");
        tokio::time::sleep(wait).await;
        Ok(())
    }
}

/// Writes one batch, retrying transient failures with backoff until the
/// write goes through or shutdown is asked for.
async fn write_batch(
    sink: Arc<Sink>,
    events: Vec<Event>,
    metrics: Arc<Metrics>,
    retry: RetryConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Written, PipelineError> {
    let mut backoff = Backoff::new(retry);
    let started = Instant::now();
    let report = loop {
        match sink.write(&events).await {
            Ok(report) => break report,
            Err(e) if e.is_transient() => {
                let wait = backoff.next_delay();
                warn!(sink = sink.name(), error = %crate::metrics::error_chain(&e), retry_in = ?wait, "Sink write failed; retrying.");
                metrics.set_sink_ready(false);
                metrics.retry(sink.name());
                // `wait_for` also returns at once if shutdown was asked
                // for before this outage began.
                let stopped = tokio::select! {
                    () = tokio::time::sleep(wait) => false,
                    _ = stop.wait_for(|stop| *stop) => true,
                };
                if stopped {
                    // Nothing of this batch is acked: the broker gives
                    // it back, and a later run stores it.
                    error!(
                            events = events.len(),
                            "Shutdown requested while the sink is unreachable; leaving the open batch unwritten."
                        );
                    return Err(PipelineError::Interrupted(events.len()));
                }
            }
            Err(e) => return Err(PipelineError::Sink(sink.name(), e)),
        }
    };
    Ok(Written {
        took: started.elapsed(),
        retries: backoff.attempts,
        events,
        report,
    })
}

/// A batch write's outcome, once its task is done.
async fn written<D>(writing: Option<&mut Writing<D>>) -> Result<Written, PipelineError> {
    match writing {
        Some(w) => joined((&mut w.task).await),
        None => std::future::pending().await,
    }
}

/// A write task's result; a panic in the task goes on in the caller.
fn joined<T>(result: Result<T, tokio::task::JoinError>) -> T {
    match result {
        Ok(t) => t,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => unreachable!("batch writers are never cancelled: {e}"),
    }
}

fn stage_outcome(verdict: &Verdict) -> StageOutcome {
    match verdict {
        Verdict::Keep => StageOutcome::Ok,
        Verdict::Drop => StageOutcome::Dropped,
        Verdict::Reject(_) => StageOutcome::Rejected,
    }
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400 * 365)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reads_as_one_line() {
        let s = Summary {
            received: 9,
            stored: 5,
            duplicates: 2,
            dead_lettered: 1,
            dropped: 1,
        };
        assert_eq!(
            s.to_string(),
            "stored 5, duplicates skipped 2, dead-lettered 1, dropped 1"
        );
    }
}
