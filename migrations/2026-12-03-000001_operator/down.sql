DROP TABLE unstored_seqs;
ALTER TABLE rooms DROP COLUMN purged_through;
DROP INDEX session_tokens_revoked;
ALTER TABLE users DROP COLUMN disabled_at;
