//! The SQLite sink: `audit_logs` in a database file, for running weir with
//! no database server.
//!
//! The table has the columns, unique key and value rules of the PostgreSQL
//! sink ([`Row::from_event`] maps both); its migrations live in
//! `migrations/sqlite` and are applied at start. The file is created when
//! missing and put in WAL mode, so a reader (`sqlite3 audit.db`) never
//! blocks weir.
//!
//! Each batch is one transaction of single-row inserts with
//! `ON CONFLICT(event_id) DO NOTHING`: a row that changed nothing was
//! already stored. A row SQLite refuses for its content fails only its own
//! statement, not the transaction, so it is reported as refused and the
//! rest of the batch is committed. SQLite stores `payload` and `metadata` as
//! JSON text, `ip_address` as text, and `occurred_at` as RFC 3339 text in
//! UTC with six fractional digits, so that text order is time order.

use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use tracing::{debug, info};

use super::row::{Row, RowOutcome};
use crate::config::SqliteSinkConfig;
use crate::event::{Event, ReasonClass, Rejection};

/// The statement each event runs.
const INSERT: &str = "\
INSERT INTO audit_logs (event_id, event_type, service, version, payload, metadata, \
    organization_id, user_id, ip_address, user_agent, correlation_id, occurred_at, \
    exchange, routing_key, raw_body, anomalies) \
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
ON CONFLICT (event_id) DO NOTHING";

/// The migrations built into this binary, from `migrations/sqlite`.
pub fn migrator() -> sqlx::migrate::Migrator {
    sqlx::migrate!("../migrations/sqlite")
}

/// A sink error that concerns the whole batch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SqliteError {
    #[error("cannot open the SQLite database {database}")]
    Open {
        database: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot apply the migrations in migrations/sqlite to {database}")]
    Migrate {
        database: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("cannot write a batch of {len} events")]
    Write {
        len: usize,
        #[source]
        source: sqlx::Error,
    },
}

impl SqliteError {
    /// Whether waiting may fix this: another process holding the lock, a
    /// full disk or an I/O error. A database that is read-only, corrupt or
    /// not a database at all stops weir instead of looping.
    pub fn is_transient(&self) -> bool {
        match self {
            SqliteError::Write { source, .. } => match primary_code(source) {
                // SQLITE_PERM, SQLITE_READONLY, SQLITE_CORRUPT, SQLITE_NOTADB
                Some(3 | 8 | 11 | 26) => false,
                _ => true,
            },
            SqliteError::Open { .. } | SqliteError::Migrate { .. } => false,
        }
    }
}

/// The primary result code of a SQLite error (the extended code's low
/// byte), if it came from SQLite.
fn primary_code(e: &sqlx::Error) -> Option<i64> {
    match e {
        sqlx::Error::Database(db) => db.code()?.parse::<i64>().ok().map(|c| c & 0xff),
        _ => None,
    }
}

/// Whether SQLite refused a row for its content: a constraint (19), a type
/// mismatch (20), a value too big (18) or out of range (25).
fn is_row_error(e: &sqlx::Error) -> bool {
    matches!(primary_code(e), Some(18 | 19 | 20 | 25)) || matches!(e, sqlx::Error::Encode(_))
}

/// An open SQLite sink.
pub struct SqliteSink {
    pool: SqlitePool,
}

impl SqliteSink {
    /// Opens (creating it if missing) and migrates the database. A `path`
    /// is resolved against `base_dir`, the pipeline file's directory; a
    /// `url` is taken as SQLite reads it.
    ///
    /// # Errors
    ///
    /// When the file cannot be created or opened, or a migration fails.
    pub async fn connect(
        cfg: &SqliteSinkConfig,
        base_dir: &Path,
    ) -> Result<SqliteSink, SqliteError> {
        let (options, database) = options(cfg, base_dir)?;
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(cfg.busy_timeout);
        // One connection: SQLite has one writer at a time anyway.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .map_err(|source| SqliteError::Open {
                database: database.clone(),
                source,
            })?;
        migrator()
            .run(&pool)
            .await
            .map_err(|source| SqliteError::Migrate {
                database: database.clone(),
                source,
            })?;
        debug!("Migrations applied.");
        info!(database = %database, "Opened the SQLite database.");
        Ok(SqliteSink { pool })
    }

    /// The pool, for tests and health checks.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Stores a batch in one transaction. Rows SQLite refuses for their
    /// content are reported, not retried; the rest are stored.
    ///
    /// # Errors
    ///
    /// A batch-wide error; the transaction is rolled back and nothing in it
    /// was stored. See [`SqliteError::is_transient`].
    pub async fn write(&self, events: &[Event]) -> Result<Vec<RowOutcome>, SqliteError> {
        let batch_err = |source| SqliteError::Write {
            len: events.len(),
            source,
        };
        let mut tx = self.pool.begin().await.map_err(batch_err)?;
        let mut outcomes = Vec::with_capacity(events.len());
        for event in events {
            let row = Row::from_event(event);
            let outcome = match insert(&mut tx, &row).await {
                Ok(1) => RowOutcome::Stored,
                Ok(_) => RowOutcome::Duplicate,
                Err(e) if is_row_error(&e) => RowOutcome::Refused(refusal(&e)),
                Err(e) => return Err(batch_err(e)),
            };
            outcomes.push(outcome);
        }
        tx.commit().await.map_err(batch_err)?;
        Ok(outcomes)
    }

    /// Closes the database; the last connection to close folds the WAL back
    /// into the file.
    pub async fn close(self) {
        self.pool.close().await;
    }
}

fn options(
    cfg: &SqliteSinkConfig,
    base_dir: &Path,
) -> Result<(SqliteConnectOptions, String), SqliteError> {
    match (&cfg.path, &cfg.url) {
        (Some(path), _) => {
            let path: PathBuf = if path.is_absolute() {
                path.clone()
            } else {
                base_dir.join(path)
            };
            let shown = path.display().to_string();
            Ok((SqliteConnectOptions::new().filename(path), shown))
        }
        (None, Some(url)) => url
            .parse::<SqliteConnectOptions>()
            .map(|o| (o, url.clone()))
            .map_err(|source| SqliteError::Open {
                database: url.clone(),
                source,
            }),
        (None, None) => Err(SqliteError::Open {
            database: "(none)".into(),
            source: sqlx::Error::Configuration(
                "a sqlite sink needs `path` or `url` in the pipeline file".into(),
            ),
        }),
    }
}

/// Inserts one row; returns the number of rows it added (0 or 1).
async fn insert(conn: &mut sqlx::SqliteConnection, row: &Row<'_>) -> Result<u64, sqlx::Error> {
    let payload = row.payload.to_string();
    let metadata = row.metadata.to_string();
    sqlx::query(INSERT)
        .bind(&*row.event_id)
        .bind(&*row.event_type)
        .bind(&*row.service)
        .bind(&*row.version)
        .bind(payload)
        .bind(metadata)
        .bind(row.organization_id.as_deref())
        .bind(row.user_id.as_deref())
        .bind(row.ip_address.as_deref())
        .bind(row.user_agent.as_deref())
        .bind(row.correlation_id.as_deref())
        .bind(row.occurred_at.map(timestamp_text))
        .bind(row.exchange)
        .bind(row.routing_key)
        .bind(row.raw_body.as_deref())
        .bind(row.anomalies.as_deref())
        .execute(conn)
        .await
        .map(|r| r.rows_affected())
}

/// RFC 3339 in UTC with a fixed six fractional digits, so that comparing
/// the text compares the times.
fn timestamp_text(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn refusal(e: &sqlx::Error) -> Rejection {
    let detail = match e {
        sqlx::Error::Database(db) => format!(
            "database refused the row: {} (SQLite code {})",
            db.message(),
            db.code().as_deref().unwrap_or("?")
        ),
        other => format!("database refused the row: {other}"),
    };
    Rejection::new(ReasonClass::Database, "sqlite", detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(body: &str) -> Event {
        crate::event::test_event(body)
    }

    fn config(path: &Path) -> SqliteSinkConfig {
        SqliteSinkConfig {
            path: Some(path.to_path_buf()),
            url: None,
            max_events: 50,
            max_wait: std::time::Duration::from_millis(20),
            busy_timeout: std::time::Duration::from_secs(5),
        }
    }

    const A: &str = r#"{"event_type":"a.b","service":"s","timestamp":"2026-11-29T12:00:00.5+01:00","payload":{"organization_id":"o"},"metadata":{"event_id":"e-1","ip_address":"203.0.113.9"}}"#;
    const B: &str =
        r#"{"event_type":"a.c","service":"s","payload":{},"metadata":{"event_id":"e-2"}}"#;

    #[tokio::test]
    async fn stores_each_key_once_and_reports_duplicates() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let sink = SqliteSink::connect(&config(Path::new("audit.db")), dir.path()).await?;
        let batch = [event(A), event(B), event(A)];
        let outcomes = sink.write(&batch).await?;
        assert_eq!(
            outcomes,
            [
                RowOutcome::Stored,
                RowOutcome::Stored,
                RowOutcome::Duplicate
            ]
        );
        let again = sink.write(&batch[..2]).await?;
        assert_eq!(again, [RowOutcome::Duplicate, RowOutcome::Duplicate]);
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_logs")
            .fetch_one(sink.pool())
            .await?;
        assert_eq!(rows, 2);
        sink.close().await;
        assert!(dir.path().join("audit.db").exists());
        Ok(())
    }

    #[tokio::test]
    async fn columns_follow_the_shared_value_rules() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let sink = SqliteSink::connect(&config(&dir.path().join("a.db")), Path::new("/")).await?;
        sink.write(&[event(A)]).await?;
        let (org, ip, at, version, payload): (String, String, String, String, String) =
            sqlx::query_as(
                "SELECT organization_id, ip_address, occurred_at, version, payload \
                 FROM audit_logs WHERE event_id = 'e-1'",
            )
            .fetch_one(sink.pool())
            .await?;
        assert_eq!(org, "o");
        assert_eq!(ip, "203.0.113.9");
        assert_eq!(at, "2026-11-29T11:00:00.500000Z");
        assert_eq!(version, "1.0");
        assert_eq!(payload, r#"{"organization_id":"o"}"#);
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(sink.pool())
            .await?;
        assert_eq!(mode, "wal");
        sink.close().await;
        Ok(())
    }

    #[tokio::test]
    async fn reopening_keeps_rows_and_migrations() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let cfg = config(Path::new("audit.db"));
        let sink = SqliteSink::connect(&cfg, dir.path()).await?;
        sink.write(&[event(A)]).await?;
        sink.close().await;
        let sink = SqliteSink::connect(&cfg, dir.path()).await?;
        assert_eq!(sink.write(&[event(A)]).await?, [RowOutcome::Duplicate]);
        sink.close().await;
        Ok(())
    }
}
