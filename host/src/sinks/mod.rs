//! Sinks: where events end up.
//!
//! - [`postgres`]: rows in `audit_logs`, batched and idempotent.
//! - `blackhole`: counts and acknowledges, stores nothing; for measuring
//!   the rest of a pipeline.
//!
//! A sink writes a batch and reports, per event, whether it was stored, was
//! already there, or was refused for its content. The pipeline acknowledges
//! and dead-letters accordingly.

pub mod postgres;

use crate::config::SinkConfig;
use crate::event::Event;

pub use postgres::RowOutcome;

/// A sink error for a whole batch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    #[error(transparent)]
    Postgres(#[from] postgres::PostgresError),
}

impl SinkError {
    /// Whether waiting and retrying may fix this.
    pub fn is_transient(&self) -> bool {
        match self {
            SinkError::Postgres(e) => e.is_transient(),
        }
    }
}

/// A connected sink.
pub enum Sink {
    Postgres(postgres::PostgresSink),
    Blackhole,
}

impl Sink {
    /// Connects the sink a pipeline names.
    ///
    /// # Errors
    ///
    /// When the sink's server cannot be reached or prepared.
    pub async fn connect(cfg: &SinkConfig) -> Result<Sink, SinkError> {
        Ok(match cfg {
            SinkConfig::Postgres(p) => Sink::Postgres(postgres::PostgresSink::connect(p).await?),
            SinkConfig::Blackhole(_) => Sink::Blackhole,
        })
    }

    /// The sink's name, for logs, metrics and dead-letter reasons.
    pub fn name(&self) -> &'static str {
        match self {
            Sink::Postgres(_) => "postgres",
            Sink::Blackhole => "blackhole",
        }
    }

    /// Writes one batch.
    ///
    /// # Errors
    ///
    /// A batch-wide error; see [`SinkError::is_transient`].
    pub async fn write(&self, events: &[Event]) -> Result<Vec<RowOutcome>, SinkError> {
        match self {
            Sink::Postgres(p) => Ok(p.write(events).await?),
            Sink::Blackhole => Ok(vec![RowOutcome::Stored; events.len()]),
        }
    }

    /// Flushes and closes connections.
    pub async fn close(self) {
        if let Sink::Postgres(p) = self {
            p.close().await;
        }
    }
}
