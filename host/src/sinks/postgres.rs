//! The PostgreSQL sink: batches of events become rows of `audit_logs` in one
//! multi-row insert that skips keys already stored.
//!
//! The insert binds one array per column and expands them with `UNNEST`, so
//! the statement is the same whatever the batch size and is prepared once
//! per connection. A batch is first tried as a plain insert, the cheapest
//! for the database. If a key is already stored (a redelivery, or two
//! copies in one batch), the database refuses it as a unique violation and
//! the batch is inserted again with `ON CONFLICT (event_id) DO NOTHING
//! RETURNING event_id`, which skips the stored keys and says which rows are
//! new; duplicates tend to come in runs (a queue given back after a crash),
//! so the next [`CAREFUL_BATCHES`] batches go straight to that form.
//!
//! Values PostgreSQL would refuse are made to fit before the insert, by
//! these rules, so that they never cause a retry loop:
//!
//! - a NUL (`\u0000`) in any string or object key of the body is replaced
//!   by U+FFFD (an idempotency key never holds one: see [`crate::event`]);
//! - a `timestamp` that is not RFC 3339 leaves `occurred_at` NULL;
//! - an `ip_address` that is not an IPv4 or IPv6 address leaves the `inet`
//!   column NULL (the raw text stays in `metadata`).
//!
//! Whenever a rule fires, the row keeps the whole event as it reached the
//! sink (after the transforms, so that redaction holds) in `raw_body` and
//! names the rules in `anomalies`. A batch the database still
//! refuses with a data or constraint error is split until the refused rows
//! are found; those are dead-lettered with the database's message.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::types::Json;
use sqlx::Arguments;
use std::sync::atomic::{AtomicU32, Ordering};
use tracing::info;

use crate::config::{redact_url as redact, PostgresSinkConfig};
use crate::event::{Event, ReasonClass, Rejection};

pub use super::row::{Row, RowOutcome};

/// The rows of a batch, one array per column.
macro_rules! insert_rows {
    () => {
        "INSERT INTO audit_logs (event_id, event_type, service, version, payload, metadata, \
            organization_id, user_id, ip_address, user_agent, correlation_id, occurred_at, \
            exchange, routing_key, raw_body, anomalies) \
        SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], \
            $6::jsonb[], $7::text[], $8::text[], $9::text[]::inet[], $10::text[], $11::text[], \
            $12::timestamptz[], $13::text[], $14::text[], $15::bytea[], $16::text[])"
    };
}

/// A batch none of whose keys is stored yet.
const INSERT: &str = insert_rows!();

/// A batch that may hold stored keys: those are skipped, and the new ones
/// returned.
const INSERT_NEW: &str = concat!(
    insert_rows!(),
    " ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
);

/// Batches written with [`INSERT_NEW`] straight away after one met a
/// stored key.
pub const CAREFUL_BATCHES: u32 = 64;

/// SQLSTATE of a unique violation.
const UNIQUE_VIOLATION: &str = "23505";

/// The migrations built into this binary, from `migrations/postgres`.
pub fn migrator() -> sqlx::migrate::Migrator {
    sqlx::migrate!("../migrations/postgres")
}

/// A sink error that concerns the whole batch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PostgresError {
    #[error("cannot connect to PostgreSQL at {url}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot apply the migrations in migrations/postgres")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("cannot insert a batch of {len} events")]
    Insert {
        len: usize,
        #[source]
        source: sqlx::Error,
    },
}

impl PostgresError {
    /// Whether waiting may fix this. Data and constraint errors and values
    /// past one of PostgreSQL's limits (SQLSTATE classes 22, 23 and 54,
    /// e.g. a text too long for an index entry) are about the rows, not
    /// the database, and are handled by splitting the batch; everything
    /// else is the database's state and worth a retry.
    pub fn is_transient(&self) -> bool {
        match self {
            PostgresError::Insert { source, .. } => !is_row_error(source),
            PostgresError::Connect { .. } => true,
            PostgresError::Migrate(_) => false,
        }
    }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some(UNIQUE_VIOLATION))
}

/// Whether the database refused rows for their content.
fn is_row_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| ["22", "23", "54"].iter().any(|class| c.starts_with(class))),
        sqlx::Error::Encode(_) => true,
        _ => false,
    }
}

/// A connected PostgreSQL sink.
pub struct PostgresSink {
    pool: PgPool,
    /// Batches still to write with [`INSERT_NEW`] before trying the plain
    /// insert again.
    careful: AtomicU32,
}

/// Which keys of an insert were new.
enum Inserted {
    All,
    Keys(Vec<String>),
}

impl PostgresSink {
    /// Connects and applies the migrations.
    ///
    /// # Errors
    ///
    /// When the database cannot be reached or a migration fails.
    pub async fn connect(cfg: &PostgresSinkConfig) -> Result<PostgresSink, PostgresError> {
        let connect_err = |source| PostgresError::Connect {
            url: redact(&cfg.url),
            source,
        };
        let options: PgConnectOptions = cfg.url.parse().map_err(connect_err)?;
        let pool = PgPoolOptions::new()
            .max_connections(cfg.pool_size.max(1))
            .acquire_timeout(cfg.connect_timeout)
            .connect_with(options.application_name("weir"))
            .await
            .map_err(connect_err)?;
        info!(url = %redact(&cfg.url), "Connected to PostgreSQL.");
        if cfg.migrate {
            migrator()
                .run(&pool)
                .await
                .map_err(PostgresError::Migrate)?;
            info!("Migrations applied.");
        }
        Ok(PostgresSink {
            pool,
            careful: AtomicU32::new(0),
        })
    }

    /// The pool, for health checks.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Most batches written at once: one per connection of the pool.
    pub fn max_writes(&self) -> usize {
        self.pool.options().get_max_connections().max(1) as usize
    }

    /// Stores a batch. Rows the database refuses for their content are
    /// reported, not retried; the rest are stored.
    ///
    /// # Errors
    ///
    /// A transient error for the whole batch (connection lost, pool
    /// exhausted, database shutting down): nothing in the report can be
    /// trusted and the whole batch must be written again.
    pub async fn write(&self, events: &[Event]) -> Result<Vec<RowOutcome>, PostgresError> {
        // Rows go in key order, so that two batches written at once take
        // the locks of the keys they share in the same order and cannot
        // deadlock. `order[i]` is the event of the i-th row.
        let mut rows: Vec<(usize, Row<'_>)> =
            events.iter().map(Row::from_event).enumerate().collect();
        rows.sort_by(|(_, a), (_, b)| a.event_id.cmp(&b.event_id));
        let (order, rows): (Vec<usize>, Vec<Row<'_>>) = rows.into_iter().unzip();

        let mut outcomes = vec![RowOutcome::Duplicate; rows.len()];
        let mut pending = vec![(0usize, rows.len())];
        while let Some((start, end)) = pending.pop() {
            match self.insert(&rows[start..end]).await {
                Ok(Inserted::All) => outcomes[start..end].fill(RowOutcome::Stored),
                Ok(Inserted::Keys(new)) => {
                    mark_stored(&rows[start..end], new, &mut outcomes[start..end]);
                }
                Err(e) if e.is_transient() => return Err(e),
                Err(e) if end - start == 1 => outcomes[start] = RowOutcome::Refused(refusal(&e)),
                Err(_) => {
                    let mid = start + (end - start) / 2;
                    pending.push((mid, end));
                    pending.push((start, mid));
                }
            }
        }
        let mut by_event = vec![RowOutcome::Duplicate; outcomes.len()];
        for (outcome, i) in outcomes.into_iter().zip(order) {
            by_event[i] = outcome;
        }
        Ok(by_event)
    }

    /// Inserts rows and says which keys were new: all of them when the
    /// plain insert goes through, else those the careful one returns.
    async fn insert(&self, rows: &[Row<'_>]) -> Result<Inserted, PostgresError> {
        let cols = Columns::new(rows);
        let careful = self
            .careful
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        let failed = |source| PostgresError::Insert {
            len: rows.len(),
            source,
        };
        if !careful {
            let args = cols.arguments().map_err(failed)?;
            match sqlx::query_with(INSERT, args).execute(&self.pool).await {
                Ok(_) => return Ok(Inserted::All),
                Err(e) if is_unique_violation(&e) => {
                    self.careful.store(CAREFUL_BATCHES, Ordering::Relaxed);
                }
                Err(source) => return Err(failed(source)),
            }
        }
        let args = cols.arguments().map_err(failed)?;
        sqlx::query_scalar_with(INSERT_NEW, args)
            .fetch_all(&self.pool)
            .await
            .map(Inserted::Keys)
            .map_err(failed)
    }

    /// Counts one more delivery of a message the broker redelivered, for
    /// queues that keep no count, and returns how many deliveries it has
    /// had, this one included.
    ///
    /// # Errors
    ///
    /// When the database cannot be reached.
    pub async fn count_redelivery(&self, key: &str) -> Result<u32, PostgresError> {
        let n: i32 = sqlx::query_scalar(
            "INSERT INTO weir_redeliveries (event_key, deliveries) VALUES ($1, 2) \
             ON CONFLICT (event_key) DO UPDATE \
             SET deliveries = weir_redeliveries.deliveries + 1, last_seen = now() \
             RETURNING deliveries",
        )
        .bind(key)
        .fetch_one(&self.pool)
        .await
        .map_err(|source| PostgresError::Insert { len: 1, source })?;
        Ok(u32::try_from(n).unwrap_or(0))
    }

    /// Forgets the delivery counts of events that are now settled.
    ///
    /// # Errors
    ///
    /// When the database cannot be reached; the counts then stay, which
    /// only matters if those events are delivered again.
    pub async fn forget_redeliveries(&self, keys: &[&str]) -> Result<(), PostgresError> {
        sqlx::query("DELETE FROM weir_redeliveries WHERE event_key = ANY($1)")
            .bind(keys)
            .execute(&self.pool)
            .await
            .map_err(|source| PostgresError::Insert {
                len: keys.len(),
                source,
            })?;
        Ok(())
    }

    /// Closes the pool, waiting for connections in use.
    pub async fn close(self) {
        self.pool.close().await;
        info!("Disconnected from PostgreSQL.");
    }
}

/// Marks as stored the first row of each key the database returned; later
/// rows with the same key stay duplicates.
fn mark_stored(rows: &[Row<'_>], mut inserted: Vec<String>, out: &mut [RowOutcome]) {
    if inserted.len() == rows.len() {
        out.fill(RowOutcome::Stored);
        return;
    }
    inserted.sort_unstable();
    let mut seen = vec![false; inserted.len()];
    for (row, outcome) in rows.iter().zip(out.iter_mut()) {
        if let Ok(i) = inserted.binary_search_by(|k| k.as_str().cmp(&row.event_id)) {
            if !seen[i] {
                seen[i] = true;
                *outcome = RowOutcome::Stored;
            }
        }
    }
}

fn refusal(e: &PostgresError) -> Rejection {
    let detail = match e {
        PostgresError::Insert {
            source: sqlx::Error::Database(db),
            ..
        } => format!(
            "database refused the row: {} (SQLSTATE {})",
            db.message(),
            db.code().as_deref().unwrap_or("?")
        ),
        other => format!("database refused the row: {other}"),
    };
    Rejection::new(ReasonClass::Database, "postgres", detail)
}

/// Column arrays for one insert, borrowing from the rows.
struct Columns<'r> {
    event_id: Vec<&'r str>,
    event_type: Vec<&'r str>,
    service: Vec<&'r str>,
    version: Vec<&'r str>,
    payload: Vec<Json<&'r Value>>,
    metadata: Vec<Json<&'r Value>>,
    organization_id: Vec<Option<&'r str>>,
    user_id: Vec<Option<&'r str>>,
    ip_address: Vec<Option<&'r str>>,
    user_agent: Vec<Option<&'r str>>,
    correlation_id: Vec<Option<&'r str>>,
    occurred_at: Vec<Option<DateTime<Utc>>>,
    exchange: Vec<&'r str>,
    routing_key: Vec<&'r str>,
    raw_body: Vec<Option<&'r [u8]>>,
    anomalies: Vec<Option<&'r str>>,
}

impl<'r> Columns<'r> {
    /// The arrays as the insert's parameters, in order. Encoding happens
    /// here, so a value that cannot be encoded fails as the insert would.
    fn arguments(&self) -> Result<PgArguments, sqlx::Error> {
        let mut args = PgArguments::default();
        args.add(&self.event_id)
            .and_then(|()| args.add(&self.event_type))
            .and_then(|()| args.add(&self.service))
            .and_then(|()| args.add(&self.version))
            .and_then(|()| args.add(&self.payload))
            .and_then(|()| args.add(&self.metadata))
            .and_then(|()| args.add(&self.organization_id))
            .and_then(|()| args.add(&self.user_id))
            .and_then(|()| args.add(&self.ip_address))
            .and_then(|()| args.add(&self.user_agent))
            .and_then(|()| args.add(&self.correlation_id))
            .and_then(|()| args.add(&self.occurred_at))
            .and_then(|()| args.add(&self.exchange))
            .and_then(|()| args.add(&self.routing_key))
            .and_then(|()| args.add(&self.raw_body))
            .and_then(|()| args.add(&self.anomalies))
            .map_err(sqlx::Error::Encode)?;
        Ok(args)
    }

    fn new(rows: &'r [Row<'_>]) -> Self {
        Columns {
            event_id: rows.iter().map(|r| &*r.event_id).collect(),
            event_type: rows.iter().map(|r| &*r.event_type).collect(),
            service: rows.iter().map(|r| &*r.service).collect(),
            version: rows.iter().map(|r| &*r.version).collect(),
            payload: rows.iter().map(|r| Json(&*r.payload)).collect(),
            metadata: rows.iter().map(|r| Json(&*r.metadata)).collect(),
            organization_id: rows.iter().map(|r| r.organization_id.as_deref()).collect(),
            user_id: rows.iter().map(|r| r.user_id.as_deref()).collect(),
            ip_address: rows.iter().map(|r| r.ip_address.as_deref()).collect(),
            user_agent: rows.iter().map(|r| r.user_agent.as_deref()).collect(),
            correlation_id: rows.iter().map(|r| r.correlation_id.as_deref()).collect(),
            occurred_at: rows.iter().map(|r| r.occurred_at).collect(),
            exchange: rows.iter().map(|r| r.exchange).collect(),
            routing_key: rows.iter().map(|r| r.routing_key).collect(),
            raw_body: rows.iter().map(|r| r.raw_body.as_deref()).collect(),
            anomalies: rows.iter().map(|r| r.anomalies.as_deref()).collect(),
        }
    }
}
