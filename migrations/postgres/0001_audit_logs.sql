-- The audit store: one row per distinct event, whatever the number of times
-- it was delivered. `event_id` holds weir's idempotency key (the producer's
-- metadata.event_id, the AMQP message_id, or sha256:<hex> of the canonical
-- body), so a second insert of the same event is a no-op.
CREATE TABLE audit_logs (
    id              bigserial   PRIMARY KEY,
    event_id        text        NOT NULL,
    event_type      text        NOT NULL,
    service         text        NOT NULL,
    version         text        NOT NULL DEFAULT '1.0',
    payload         jsonb       NOT NULL,
    metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    organization_id text,
    user_id         text,
    ip_address      inet,
    user_agent      text,
    correlation_id  text,
    -- The event's own `timestamp`; NULL when absent or unparseable.
    occurred_at     timestamptz,
    exchange        text        NOT NULL DEFAULT '',
    routing_key     text        NOT NULL DEFAULT '',
    -- The body exactly as received, kept only when a value had to be
    -- changed or left out to fit a column; `anomalies` says which.
    raw_body        bytea,
    anomalies       text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT audit_logs_event_id_key UNIQUE (event_id)
);

-- An organization over time, an event type over time, one request's events.
CREATE INDEX audit_logs_organization_time ON audit_logs (organization_id, occurred_at);
CREATE INDEX audit_logs_event_type_time ON audit_logs (event_type, occurred_at);
CREATE INDEX audit_logs_correlation_id ON audit_logs (correlation_id);
CREATE INDEX audit_logs_user_time ON audit_logs (user_id, occurred_at);
CREATE INDEX audit_logs_created_at ON audit_logs (created_at);
