-- Which associated data a row was sealed with: 1 binds room and seq (rows written before
-- this migration), 2 binds sender and sent-at time as well.
ALTER TABLE messages ADD COLUMN aad_version SMALLINT NOT NULL DEFAULT 1;

-- Bounds a key's use at start without counting every row: the first and last message id
-- sealed with each key come from this index.
CREATE INDEX messages_key ON messages (key_id, id);

-- Every key id that has sealed messages, with a one-way check value of its key, so a
-- different key under a known id (a lost key file regenerated) is refused at start. Ids
-- found here by the migration get their check value from the first start that holds them.
CREATE TABLE message_keys (
    key_id INTEGER PRIMARY KEY,
    check_value BYTEA,
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO message_keys (key_id) SELECT DISTINCT key_id FROM messages;
