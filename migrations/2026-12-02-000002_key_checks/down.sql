DROP TABLE message_keys;
DROP INDEX messages_key;
ALTER TABLE messages DROP COLUMN aad_version;
