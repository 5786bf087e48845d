-- A disabled user cannot log in or resume (`rookery user disable`).
ALTER TABLE users ADD COLUMN disabled_at TIMESTAMPTZ;

-- Servers look for tokens revoked elsewhere (an operator command, a logout on another node)
-- every few seconds, and close the sessions holding them.
CREATE INDEX session_tokens_revoked ON session_tokens (revoked_at) WHERE revoked_at IS NOT NULL;

-- What `rookery verify` needs to tell a lost row from a seq that was never meant to be
-- stored: every seq up to `purged_through` may have been deleted by retention, and the
-- blocks a room that stores nothing reserved are listed in `unstored_seqs`. Rooms that
-- reserved blocks before this migration have none listed (verify reports those seqs).
ALTER TABLE rooms ADD COLUMN purged_through BIGINT NOT NULL DEFAULT 0;
CREATE TABLE unstored_seqs (
    room_id BIGINT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    first_seq BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    PRIMARY KEY (room_id, first_seq)
);
