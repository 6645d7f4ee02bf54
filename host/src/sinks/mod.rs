//! Sinks: where events end up.
//!
//! - [`postgres`]: rows in `audit_logs`, batched and idempotent.
//! - [`sqlite`]: the same table in a SQLite file, with no server.
//! - [`console`]: each event as a line of JSON on standard output.
//! - `blackhole`: counts and acknowledges, stores nothing; for measuring
//!   the rest of a pipeline.
//!
//! [`probe`] checks that the sink's database answers, for readiness.
//!
//! [`row`] holds what the databases share: an event's row and its value
//! rules, and [`RowOutcome`].
//!
//! A sink writes a batch and reports, per event, whether it was stored, was
//! already there, or was refused for its content. The pipeline acknowledges
//! and dead-letters accordingly.

pub mod console;
pub mod postgres;
pub mod probe;
pub mod row;
pub mod sqlite;

use std::path::Path;

use crate::config::SinkConfig;
use crate::event::Event;

pub use row::RowOutcome;

/// A sink error for a whole batch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    #[error(transparent)]
    Postgres(#[from] postgres::PostgresError),
    #[error(transparent)]
    Sqlite(#[from] sqlite::SqliteError),
    #[error(transparent)]
    Console(#[from] console::ConsoleError),
}

impl SinkError {
    /// Whether waiting and retrying may fix this.
    pub fn is_transient(&self) -> bool {
        match self {
            SinkError::Postgres(e) => e.is_transient(),
            SinkError::Sqlite(e) => e.is_transient(),
            SinkError::Console(e) => e.is_transient(),
        }
    }
}

/// A connected sink.
pub enum Sink {
    Postgres(postgres::PostgresSink),
    Sqlite(sqlite::SqliteSink),
    Console,
    Blackhole,
}

impl Sink {
    /// Connects the sink a pipeline names. Relative paths in `cfg` are
    /// resolved against `base_dir`, the pipeline file's directory.
    ///
    /// # Errors
    ///
    /// When the sink's server cannot be reached or prepared.
    pub async fn connect(cfg: &SinkConfig, base_dir: &Path) -> Result<Sink, SinkError> {
        Ok(match cfg {
            SinkConfig::Postgres(p) => Sink::Postgres(postgres::PostgresSink::connect(p).await?),
            SinkConfig::Sqlite(s) => Sink::Sqlite(sqlite::SqliteSink::connect(s, base_dir).await?),
            SinkConfig::Console(_) => Sink::Console,
            SinkConfig::Blackhole(_) => Sink::Blackhole,
        })
    }

    /// The sink's name, for logs, metrics and dead-letter reasons.
    pub fn name(&self) -> &'static str {
        match self {
            Sink::Postgres(_) => "postgres",
            Sink::Sqlite(_) => "sqlite",
            Sink::Console => "console",
            Sink::Blackhole => "blackhole",
        }
    }

    /// Most batches the pipeline may have this sink write at once. A
    /// database with a pool takes one per connection; the others take
    /// their batches one at a time, in order.
    pub fn max_writes(&self) -> usize {
        match self {
            Sink::Postgres(p) => p.max_writes(),
            Sink::Sqlite(_) | Sink::Console | Sink::Blackhole => 1,
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
            Sink::Sqlite(s) => Ok(s.write(events).await?),
            Sink::Console => Ok(console::write(events)?),
            Sink::Blackhole => Ok(vec![RowOutcome::Stored; events.len()]),
        }
    }

    /// Counts one more delivery of a redelivered message and returns its
    /// deliveries so far, or `None` when this sink keeps no such count.
    ///
    /// # Errors
    ///
    /// When the sink's database cannot be reached.
    pub async fn count_redelivery(&self, key: &str) -> Result<Option<u32>, SinkError> {
        match self {
            Sink::Postgres(p) => Ok(Some(p.count_redelivery(key).await?)),
            _ => Ok(None),
        }
    }

    /// Forgets the delivery counts of settled events.
    ///
    /// # Errors
    ///
    /// When the sink's database cannot be reached.
    pub async fn forget_redeliveries(&self, keys: &[&str]) -> Result<(), SinkError> {
        match self {
            Sink::Postgres(p) => Ok(p.forget_redeliveries(keys).await?),
            _ => Ok(()),
        }
    }

    /// Flushes and closes connections.
    pub async fn close(self) {
        match self {
            Sink::Postgres(p) => p.close().await,
            Sink::Sqlite(s) => s.close().await,
            Sink::Console | Sink::Blackhole => {}
        }
    }
}
