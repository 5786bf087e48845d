-- Where a room comes from: created over the protocol ('user'), defined by the admins' policy
-- file ('config'), or the direct room of two users ('direct').
ALTER TABLE rooms ADD COLUMN origin TEXT NOT NULL DEFAULT 'user'
    CHECK (origin IN ('user', 'config', 'direct'));
-- Set when a room is removed from the policy file: it is closed (no joins, no sends), and its
-- history stays. Cleared when the file defines it again.
ALTER TABLE rooms ADD COLUMN closed_at TIMESTAMPTZ;
-- Counting the rooms a user created (users.max_created_rooms).
CREATE INDEX rooms_owner ON rooms (owner_id);
-- The retention job deletes a room's messages older than its window.
CREATE INDEX messages_room_created ON messages (room_id, created_at);
