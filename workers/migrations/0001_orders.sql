-- Orders, their lines and their status history, and the inbox that makes redelivery harmless.

CREATE TABLE orders (
    id            uuid        PRIMARY KEY,
    customer_id   text        NOT NULL,
    currency      char(3)     NOT NULL,
    total_cents   bigint      NOT NULL,
    status        text        NOT NULL,
    received_at   timestamptz NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE order_items (
    order_id          uuid    NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    line              integer NOT NULL,
    sku               text    NOT NULL,
    qty               integer NOT NULL,
    unit_price_cents  bigint  NOT NULL,
    PRIMARY KEY (order_id, line)
);

CREATE TABLE order_status_history (
    id        bigserial   PRIMARY KEY,
    order_id  uuid        NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    status    text        NOT NULL,
    event_id  uuid        NOT NULL,
    at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX order_status_history_order_id ON order_status_history (order_id, at);

-- One row per (job, event) applied, written in the same transaction as the effect: a redelivered event finds
-- its row and changes nothing.
CREATE TABLE processed_events (
    consumer      text        NOT NULL,
    event_id      uuid        NOT NULL,
    processed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
