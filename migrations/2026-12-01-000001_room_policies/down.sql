DROP INDEX messages_room_created;
DROP INDEX rooms_owner;
ALTER TABLE rooms DROP COLUMN closed_at;
ALTER TABLE rooms DROP COLUMN origin;
