-- Usernames are unique regardless of case. A database that already holds names differing
-- only in case cannot be upgraded silently: the migration stops and names them, and an
-- operator renames all but one of each group before starting again.
DO $$
DECLARE
    clashes TEXT;
BEGIN
    SELECT string_agg(spellings, '; ') INTO clashes
    FROM (
        SELECT string_agg(username, ', ' ORDER BY id) AS spellings
        FROM users
        GROUP BY lower(username)
        HAVING count(*) > 1
    ) AS groups;
    IF clashes IS NOT NULL THEN
        RAISE EXCEPTION 'usernames that differ only in case: %; rename all but one of each group (UPDATE users SET username = ... WHERE id = ...), then start again', clashes;
    END IF;
END
$$;

CREATE UNIQUE INDEX users_username_folded ON users (lower(username));
