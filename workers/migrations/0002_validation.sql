-- The validate stage: an order is stored with its verdict (accepted or rejected), the history row of a verdict
-- carries the failed rules, and a rejected order may have no total (it overflowed). The inbox gets an index on
-- its age for the retention job.

ALTER TABLE orders ALTER COLUMN total_cents DROP NOT NULL;
ALTER TABLE orders ADD COLUMN validated_at timestamptz;
ALTER TABLE order_status_history ADD COLUMN detail jsonb;
CREATE INDEX processed_events_processed_at ON processed_events (processed_at);
CREATE INDEX order_status_history_at ON order_status_history (at);
