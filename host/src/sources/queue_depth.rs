//! The queue-depth probe: how many messages wait in the AMQP source's queue
//! and in its dead-letter queue, for `weir_queue_depth_messages{queue}`.
//!
//! Every [`INTERVAL`] it declares both queues passively, which only reads
//! their message counts and never creates or changes a queue. It does so on
//! a small connection of its own, named after the source's connection with
//! `-probe` appended, so that a failing probe never disturbs consumption and
//! the source can reconnect without knowing the probe exists. While the
//! broker cannot be reached the gauges keep their last value and the probe
//! tries again on the next tick; `weir_up{target="broker"}` says whether
//! that value is current.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::task::JoinHandle;
use tracing::debug;

use crate::config::AmqpSourceConfig;
use crate::metrics::Metrics;

/// How often the queues are measured.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// A running probe; it stops when this is dropped.
pub struct QueueDepthProbe {
    task: JoinHandle<()>,
}

impl QueueDepthProbe {
    /// Starts measuring the source's queue and dead-letter queue every
    /// [`INTERVAL`]. Connects lazily, on the first tick.
    pub fn spawn(cfg: &AmqpSourceConfig, metrics: Arc<Metrics>) -> QueueDepthProbe {
        let probe = Probe {
            url: cfg.url.clone(),
            connection_name: format!("{}-probe", cfg.connection_name),
            queues: vec![cfg.queue.clone(), cfg.dead_letter.queue.clone()],
            metrics,
            link: None,
        };
        QueueDepthProbe {
            task: tokio::spawn(probe.run(INTERVAL)),
        }
    }
}

impl Drop for QueueDepthProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Probe {
    url: String,
    connection_name: String,
    queues: Vec<String>,
    metrics: Arc<Metrics>,
    /// The probe's connection and channel, opened on demand and dropped
    /// (which closes them) after any failure.
    link: Option<(Connection, Channel)>,
}

impl Probe {
    async fn run(mut self, every: Duration) {
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            // A broker that accepts the socket but never answers must not
            // hold the probe past its next tick.
            match tokio::time::timeout(every, self.measure()).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    debug!(%error, "Measuring queue depth failed; trying again later.");
                    self.link = None;
                }
                Err(_) => {
                    debug!("Measuring queue depth timed out; trying again later.");
                    self.link = None;
                }
            }
        }
    }

    async fn measure(&mut self) -> Result<(), lapin::Error> {
        let channel = match &self.link {
            Some((connection, channel))
                if connection.status().connected() && channel.status().connected() =>
            {
                channel.clone()
            }
            _ => {
                self.link = None;
                let props = ConnectionProperties::default()
                    .with_connection_name(self.connection_name.clone().into());
                let connection = Connection::connect(&self.url, props).await?;
                let channel = connection.create_channel().await?;
                self.link = Some((connection, channel.clone()));
                channel
            }
        };
        for queue in &self.queues {
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            let q = channel
                .queue_declare(queue, passive, FieldTable::default())
                .await?;
            self.metrics.set_queue_depth(queue, q.message_count());
        }
        Ok(())
    }
}
