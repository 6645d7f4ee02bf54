//! The database probe: tells readiness whether the sink's database answers
//! while no batch is being written.
//!
//! The pipeline learns of a database outage from a failed write, which
//! needs an event to write. So that `/ready` also turns false while weir is
//! idle, this probe runs `SELECT 1` through the sink's own pool every
//! [`INTERVAL`] and reports the answer with [`Metrics::set_sink_ready`]. It
//! logs once when the database stops answering and once when it answers
//! again. Sinks without a server (SQLite, console, blackhole) get no probe.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::Sink;
use crate::metrics::Metrics;

/// How often the database is asked.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// A running probe; it stops when this is dropped.
pub struct SinkProbe {
    task: JoinHandle<()>,
}

impl SinkProbe {
    /// Starts probing the sink's database, if it has one.
    pub fn spawn(sink: &Sink, metrics: Arc<Metrics>) -> Option<SinkProbe> {
        let pool = match sink {
            Sink::Postgres(p) => p.pool().clone(),
            _ => return None,
        };
        Some(SinkProbe {
            task: tokio::spawn(probe(pool, metrics, INTERVAL)),
        })
    }
}

impl Drop for SinkProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn probe(pool: PgPool, metrics: Arc<Metrics>, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate; the sink has just connected.
    ticker.tick().await;
    let mut answered = true;
    loop {
        ticker.tick().await;
        let ping = sqlx::query("SELECT 1").execute(&pool);
        let error = match tokio::time::timeout(every, ping).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {every:?}")),
        };
        match (answered, error) {
            (true, Some(error)) => {
                warn!(%error, "The database does not answer; not ready.");
                answered = false;
            }
            (false, None) => {
                info!("The database answers again.");
                answered = true;
            }
            _ => {}
        }
        metrics.set_sink_ready(answered);
    }
}
