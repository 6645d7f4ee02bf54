-- Deliveries of messages the broker handed out more than once, by
-- idempotency key, for queues that keep no delivery count of their own
-- (classic queues). A message whose count reaches the pipeline's
-- delivery_limit is dead-lettered as a poison message. Rows go away once
-- the event is stored.
CREATE TABLE weir_redeliveries (
    event_key   text        PRIMARY KEY,
    deliveries  integer     NOT NULL,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now()
);
