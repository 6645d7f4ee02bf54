-- The audit store in SQLite, for running weir with no database server: the
-- columns, unique key and indexes of migrations/postgres/0001_audit_logs.sql.
-- `event_id` holds weir's idempotency key, so a second insert of the same
-- event is a no-op.
--
-- SQLite has no jsonb, inet or timestamptz: `payload` and `metadata` are JSON
-- text, `ip_address` is the address as text (only valid addresses are
-- stored), and `occurred_at` and `created_at` are RFC 3339 text in UTC with
-- a fixed number of fractional digits (`2026-11-29T12:00:00.000000Z` and
-- `2026-11-29T12:00:00.000Z`), so that each sorts in time order.
CREATE TABLE audit_logs (
    id              INTEGER PRIMARY KEY,
    event_id        TEXT    NOT NULL,
    event_type      TEXT    NOT NULL,
    service         TEXT    NOT NULL,
    version         TEXT    NOT NULL DEFAULT '1.0',
    payload         TEXT    NOT NULL CHECK (json_valid(payload)),
    metadata        TEXT    NOT NULL DEFAULT '{}' CHECK (json_valid(metadata)),
    organization_id TEXT,
    user_id         TEXT,
    ip_address      TEXT,
    user_agent      TEXT,
    correlation_id  TEXT,
    -- The event's own `timestamp`; NULL when absent or unparseable.
    occurred_at     TEXT,
    exchange        TEXT    NOT NULL DEFAULT '',
    routing_key     TEXT    NOT NULL DEFAULT '',
    -- The body exactly as received, kept only when a value had to be
    -- changed or left out to fit a column; `anomalies` says which.
    raw_body        BLOB,
    anomalies       TEXT,
    created_at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    CONSTRAINT audit_logs_event_id_key UNIQUE (event_id)
) STRICT;

-- An organization over time, an event type over time, one request's events.
CREATE INDEX audit_logs_organization_time ON audit_logs (organization_id, occurred_at);
CREATE INDEX audit_logs_event_type_time ON audit_logs (event_type, occurred_at);
CREATE INDEX audit_logs_correlation_id ON audit_logs (correlation_id);
CREATE INDEX audit_logs_user_time ON audit_logs (user_id, occurred_at);
CREATE INDEX audit_logs_created_at ON audit_logs (created_at);
