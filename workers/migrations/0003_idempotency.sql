-- The gateway's Idempotency-Key records, shared by all its replicas: the first request with a key claims it
-- (and the order and event ids it will publish), later ones with the same key replay its answer. A claim whose
-- owner died is taken over after `locked_until` with the same ids, so a retry republishes the same command and
-- the jobs' inboxes drop the copy. Rows past `expires_at` count as absent and are purged by the gateway.

CREATE TABLE idempotency_keys (
    principal          text        NOT NULL,
    key                text        NOT NULL,
    request_hash       bytea       NOT NULL,
    order_id           uuid        NOT NULL,
    event_id           uuid        NOT NULL,
    response_status    smallint,
    response_type      text,
    response_location  text,
    response_body      bytea,
    locked_until       timestamptz NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    expires_at         timestamptz NOT NULL,
    PRIMARY KEY (principal, key)
);
CREATE INDEX idempotency_keys_expires_at ON idempotency_keys (expires_at);
