//! Persistence: plain functions over `&mut PgConnection`, called only from the DB-executor
//! threads. Owns the SQL; seals and opens bodies with the [`Keyring`] it is given.

pub mod models;
pub mod operator;
mod room_queries;

pub use room_queries::*;

use chrono::{DateTime, Duration as TimeDelta, Utc};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::{Array, BigInt, Bytea, Integer, Nullable, SmallInt, Text, Timestamptz};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use std::collections::HashMap;
use std::time::Duration;

use crate::crypto::{Binding, Keyring, RecordedKey, Sealed};
use crate::error::StoreError;
use crate::ids::{RoomId, Seq, UserId};
use crate::protocol::{format_time, username_key, MessageView, UNDECRYPTABLE};
use crate::schema::{message_keys, messages, session_tokens, users};
use models::*;

diesel::define_sql_function! {
    /// Postgres `lower()`: usernames are unique and looked up regardless of case.
    fn lower(text: Text) -> Text;
}

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// How many migrations `migrations/` holds.
pub fn migration_count() -> usize {
    use diesel::migration::MigrationSource;
    use diesel::pg::Pg;
    MigrationSource::<Pg>::migrations(&MIGRATIONS).map_or(0, |m| m.len())
}

pub type PgPool = Pool<ConnectionManager<PgConnection>>;

/// Any number: serializes concurrent `migrate` runs of several nodes.
const MIGRATION_LOCK: i64 = 0x0052_6f6f_6b65_7279;

pub(crate) fn is_unique_violation(e: &DieselError) -> bool {
    matches!(
        e,
        DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)
    )
}

/// Waits until Postgres accepts connections (a database that does not exist yet counts as an
/// answer), retrying with backoff for at most `bound`: a container's database may still be
/// starting. Zero tries once.
pub fn wait_for_server(url: &str, bound: Duration) -> Result<(), StoreError> {
    let started = std::time::Instant::now();
    let mut pause = Duration::from_millis(100);
    let mut said = false;
    loop {
        let why = match PgConnection::establish(url) {
            Ok(_) => return Ok(()),
            Err(diesel::ConnectionError::BadConnection(why)) if !why.contains("does not exist") => {
                why
            }
            Err(_) => return Ok(()),
        };
        let why = why.trim().to_string();
        if started.elapsed() + pause > bound {
            return Err(StoreError::Unavailable(why));
        }
        if !said {
            log::warn!(
                "the database does not answer ({why}); retrying for up to {} s",
                bound.as_secs()
            );
            said = true;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// Creates the database named in `url` when it does not exist yet.
pub fn ensure_database(url: &str) -> Result<(), StoreError> {
    let mut parsed =
        url::Url::parse(url).map_err(|e| StoreError::Unavailable(format!("database url: {e}")))?;
    let name = crate::config::database_name(url)
        .ok_or_else(|| StoreError::Unavailable("database url names no database".into()))?;
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(StoreError::Unavailable(format!(
            "database name '{name}' must be letters, digits, _ or -"
        )));
    }
    if PgConnection::establish(url).is_ok() {
        return Ok(());
    }
    parsed.set_path("/postgres");
    let mut admin = PgConnection::establish(parsed.as_str())
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    match admin.batch_execute(&format!("CREATE DATABASE \"{name}\"")) {
        Ok(()) => {
            log::info!("created database {name}");
            Ok(())
        }
        Err(DieselError::DatabaseError(_, info)) if info.message().contains("already exists") => {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Runs pending migrations under an advisory lock; returns how many ran.
pub fn run_migrations(conn: &mut PgConnection) -> Result<usize, StoreError> {
    conn.batch_execute(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK})"))?;
    let result = conn
        .run_pending_migrations(MIGRATIONS)
        .map(|done| done.len())
        .map_err(|e| StoreError::Migration(e.to_string()));
    conn.batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"))?;
    result
}

/// How many migrations have not run on this database.
pub fn pending_migrations(conn: &mut PgConnection) -> Result<usize, StoreError> {
    conn.pending_migrations(MIGRATIONS)
        .map(|p| p.len())
        .map_err(|e| StoreError::Migration(e.to_string()))
}

/// Reverts every migration (tests check that down and up again work).
pub fn revert_all_migrations(conn: &mut PgConnection) -> Result<usize, StoreError> {
    let mut count = 0;
    while !conn
        .applied_migrations()
        .map_err(|e| StoreError::Migration(e.to_string()))?
        .is_empty()
    {
        conn.revert_last_migration(MIGRATIONS)
            .map_err(|e| StoreError::Migration(e.to_string()))?;
        count += 1;
    }
    Ok(count)
}

/// Bounds every statement of a pooled connection, so a stuck query cannot hold an executor
/// thread (and with it a room's commits) forever.
#[derive(Debug)]
struct StatementTimeout(Duration);

impl diesel::r2d2::CustomizeConnection<PgConnection, diesel::r2d2::Error> for StatementTimeout {
    fn on_acquire(&self, conn: &mut PgConnection) -> Result<(), diesel::r2d2::Error> {
        let ms = self.0.as_millis().max(1);
        conn.batch_execute(&format!(
            "SET statement_timeout = {ms}; SET idle_in_transaction_session_timeout = {ms}"
        ))
        .map_err(diesel::r2d2::Error::QueryError)
    }
}

/// A pool of `size` connections; a checkout waits at most `timeout`; statements are cancelled
/// by Postgres after `statement_timeout`.
pub fn connect_pool(
    url: &str,
    size: u32,
    timeout: Duration,
    statement_timeout: Duration,
) -> Result<PgPool, StoreError> {
    Ok(Pool::builder()
        .max_size(size)
        .min_idle(Some(0))
        .connection_timeout(timeout)
        // No `SELECT 1` before every use: a broken connection fails its one statement (the
        // caller hears `unavailable` and retries) and is then replaced.
        .test_on_check_out(false)
        .connection_customizer(Box::new(StatementTimeout(statement_timeout)))
        .build_unchecked(ConnectionManager::new(url)))
}

/// `SELECT 1`: does the database answer?
pub fn ping(conn: &mut PgConnection) -> Result<(), StoreError> {
    diesel::sql_query("SELECT 1").execute(conn)?;
    Ok(())
}

pub fn create_user(
    conn: &mut PgConnection,
    username: &str,
    password_hash: &str,
) -> Result<UserRecord, StoreError> {
    let (id, username) = diesel::insert_into(users::table)
        .values((
            users::username.eq(username),
            users::password_hash.eq(password_hash),
        ))
        .returning((users::id, users::username))
        .get_result::<(i64, String)>(conn)
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict("username")
            } else {
                e.into()
            }
        })?;
    Ok(UserRecord {
        id: UserId(id),
        username,
    })
}

/// The user, its password hash and whether it is disabled, for a login.
pub fn find_login(conn: &mut PgConnection, username: &str) -> Result<Option<Login>, StoreError> {
    let row = users::table
        .filter(lower(users::username).eq(username_key(username)))
        .select((
            users::id,
            users::username,
            users::password_hash,
            users::disabled_at.is_not_null(),
        ))
        .first::<(i64, String, String, bool)>(conn)
        .optional()?;
    Ok(row.map(|(id, username, password_hash, disabled)| Login {
        user: UserRecord {
            id: UserId(id),
            username,
        },
        password_hash,
        disabled,
    }))
}

pub fn insert_token(
    conn: &mut PgConnection,
    user: UserId,
    token_hash: &[u8],
    ttl: Duration,
) -> Result<DateTime<Utc>, StoreError> {
    let ttl = TimeDelta::from_std(ttl).unwrap_or(TimeDelta::days(30));
    let expires = Utc::now()
        .checked_add_signed(ttl)
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    diesel::insert_into(session_tokens::table)
        .values((
            session_tokens::user_id.eq(user.0),
            session_tokens::token_hash.eq(token_hash),
            session_tokens::expires_at.eq(expires),
        ))
        .execute(conn)?;
    Ok(expires)
}

/// The user holding a live (unexpired, unrevoked) token; None for an unknown, expired or
/// revoked one.
pub fn user_by_token(
    conn: &mut PgConnection,
    token_hash: &[u8],
) -> Result<Option<(UserRecord, DateTime<Utc>)>, StoreError> {
    let found = session_tokens::table
        .inner_join(users::table)
        .filter(session_tokens::token_hash.eq(token_hash))
        .filter(session_tokens::revoked_at.is_null())
        .filter(session_tokens::expires_at.gt(Utc::now()))
        .filter(users::disabled_at.is_null())
        .select((users::id, users::username, session_tokens::expires_at))
        .first::<(i64, String, DateTime<Utc>)>(conn)
        .optional()?;
    Ok(found.map(|(id, username, expires_at)| {
        let user = UserRecord {
            id: UserId(id),
            username,
        };
        (user, expires_at)
    }))
}

pub fn revoke_token(conn: &mut PgConnection, token_hash: &[u8]) -> Result<(), StoreError> {
    // The database's clock, which the other servers' watch for revoked tokens compares with.
    diesel::update(session_tokens::table.filter(session_tokens::token_hash.eq(token_hash)))
        .set(session_tokens::revoked_at.eq(diesel::dsl::now))
        .execute(conn)?;
    Ok(())
}

/// A message to store: who sent it, the plaintext body and the sender's optional retry key.
#[derive(Debug, Clone)]
pub struct NewPost {
    pub sender: UserId,
    pub body: std::sync::Arc<str>,
    pub client_msg_id: Option<String>,
}

/// Stores a batch of messages of one room in one transaction, in order: seqs come from the
/// room's counter, updated once for the batch. A `client_msg_id` already stored for the same
/// sender (or repeated within the batch) returns the original seq and stores nothing.
/// Either every message of the batch is committed or none is.
pub fn store_batch(
    conn: &mut PgConnection,
    keys: &Keyring,
    room: RoomId,
    posts: &[NewPost],
) -> Result<Vec<Outcome>, StoreError> {
    let mut results = store_batches(conn, keys, &[(room, posts)])?;
    Ok(results.pop().unwrap_or_default())
}

/// Group commit: the batches of several rooms in one transaction, in two statements whatever
/// the number of rooms: the look-up of repeated `client_msg_id`s together with the update of
/// the rooms' counters, then one multi-row insert. Results per batch, in order. A repeated
/// `client_msg_id` (stored before, or earlier in the batch) returns the original seq and
/// stores nothing.
///
/// The transaction is all or nothing; when it fails for a reason that may belong to one
/// message (a value the database refuses, not a lost connection), each batch is stored on
/// its own, and the messages of a batch that still fails one by one, in order: the others
/// are stored, and only a message that fails alone is [`Refused`].
pub fn store_batches(
    conn: &mut PgConnection,
    keys: &Keyring,
    batches: &[(RoomId, &[NewPost])],
) -> Result<Vec<Vec<Outcome>>, StoreError> {
    match store_together(conn, keys, batches) {
        Ok(results) => Ok(results.into_iter().map(all_stored).collect()),
        Err(e)
            if may_belong_to_one_message(&e)
                && batches.iter().map(|b| b.1.len()).sum::<usize>() > 1 =>
        {
            log::warn!(
                "storing {} batch(es) failed ({e}); storing them apart",
                batches.len()
            );
            batches
                .iter()
                .map(|(room, posts)| store_apart(conn, keys, *room, posts))
                .collect()
        }
        Err(e) if may_belong_to_one_message(&e) => {
            Ok(vec![vec![Err(Refused { why: e.to_string() })]])
        }
        Err(e) => Err(e),
    }
}

fn all_stored(batch: Vec<Stored>) -> Vec<Outcome> {
    batch.into_iter().map(Ok).collect()
}

/// One transaction for `batches`, retried once when a concurrent writer committed one of
/// their client_msg_ids first (now it is a duplicate).
fn store_together(
    conn: &mut PgConnection,
    keys: &Keyring,
    batches: &[(RoomId, &[NewPost])],
) -> Result<Vec<Vec<Stored>>, StoreError> {
    let attempt =
        |conn: &mut PgConnection| conn.transaction(|conn| store_batches_once(conn, keys, batches));
    match attempt(conn) {
        Err(StoreError::Database(e)) if is_unique_violation(&e) => attempt(conn),
        other => other,
    }
}

/// One room's batch on its own; when it fails for a message's sake, its messages one by one.
fn store_apart(
    conn: &mut PgConnection,
    keys: &Keyring,
    room: RoomId,
    posts: &[NewPost],
) -> Result<Vec<Outcome>, StoreError> {
    match store_together(conn, keys, &[(room, posts)]) {
        Ok(mut results) => return Ok(all_stored(results.pop().unwrap_or_default())),
        Err(e) if !may_belong_to_one_message(&e) => return Err(e),
        Err(_) => {}
    }
    let mut outcomes = Vec::with_capacity(posts.len());
    for post in posts {
        match store_together(conn, keys, &[(room, std::slice::from_ref(post))]) {
            Ok(mut results) => outcomes.extend(all_stored(results.pop().unwrap_or_default())),
            Err(e) if may_belong_to_one_message(&e) => {
                log::warn!("room {}: a message cannot be stored: {e}", room.0);
                outcomes.push(Err(Refused { why: e.to_string() }));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(outcomes)
}

/// Whether a failed store may be one message's fault: the database refused a value. Lost
/// connections, cancelled statements and the like are everyone's, and fail the whole batch.
fn may_belong_to_one_message(e: &StoreError) -> bool {
    let StoreError::Database(DieselError::DatabaseError(kind, info)) = e else {
        return false;
    };
    let transient = matches!(
        kind,
        DatabaseErrorKind::ClosedConnection
            | DatabaseErrorKind::UnableToSendCommand
            | DatabaseErrorKind::SerializationFailure
            | DatabaseErrorKind::ReadOnlyTransaction
    ) || info.message().contains("canceling statement");
    !transient
}

/// A row of the look-up that also moves the counters: a stored message found by its retry key
/// (`sender_id`, `client_msg_id` and `created_at` set), or a room's counter after the update
/// (`seq` is its new `last_seq`; the others null).
#[derive(QueryableByName)]
struct LookedUp {
    #[diesel(sql_type = BigInt)]
    room_id: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    sender_id: Option<i64>,
    #[diesel(sql_type = Nullable<Text>)]
    client_msg_id: Option<String>,
    #[diesel(sql_type = BigInt)]
    seq: i64,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    created_at: Option<DateTime<Utc>>,
}

/// What happens to one post.
enum Plan {
    /// Stored now, unless its retry key is found stored before (only first uses of a key
    /// within the batch are looked up).
    New,
    Earlier(Stored),
    /// A repeat, within the batch, of the post at this index.
    SameAs(usize),
}

/// Finds the stored messages with the retry keys of the first uses in the batch and moves
/// every room's counter past its new messages, in one statement: a room's count is the
/// batch's `candidates` in it less the earlier ones found. Each key is looked up as a whole
/// (room, sender, key), which the unique index answers without reading the rest of the room.
const LOOK_UP_AND_COUNT: &str = "\
    WITH k AS (SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[]) \
               AS k(room_id, sender_id, key)), \
    earlier AS (SELECT m.room_id, m.sender_id, m.client_msg_id, m.seq, m.created_at \
                FROM messages m JOIN k ON m.room_id = k.room_id \
                AND m.sender_id = k.sender_id AND m.client_msg_id = k.key), \
    wanted AS (SELECT w.id, w.n - (SELECT count(*) FROM earlier e WHERE e.room_id = w.id) AS n \
               FROM unnest($4::bigint[], $5::bigint[]) AS w(id, n)), \
    bumped AS (UPDATE rooms SET last_seq = rooms.last_seq + wanted.n FROM wanted \
               WHERE rooms.id = wanted.id AND wanted.n > 0 RETURNING rooms.id, rooms.last_seq) \
    SELECT room_id, sender_id, client_msg_id, seq, created_at FROM earlier \
    UNION ALL \
    SELECT id, NULL, NULL, last_seq, NULL FROM bumped";

fn store_batches_once(
    conn: &mut PgConnection,
    keys: &Keyring,
    batches: &[(RoomId, &[NewPost])],
) -> Result<Vec<Vec<Stored>>, StoreError> {
    // 1. Within the batch: the first use of each retry key per room and sender, and repeats.
    let mut plans: Vec<Vec<Plan>> = Vec::with_capacity(batches.len());
    let mut key_rooms: Vec<i64> = Vec::new();
    let mut key_senders: Vec<i64> = Vec::new();
    let mut retry_keys: Vec<&str> = Vec::new();
    for (room, posts) in batches {
        let mut first: HashMap<(i64, &str), usize> = HashMap::new();
        let plan = posts
            .iter()
            .enumerate()
            .map(|(i, post)| {
                let Some(key) = post.client_msg_id.as_deref() else {
                    return Plan::New;
                };
                if let Some(at) = first.get(&(post.sender.0, key)) {
                    return Plan::SameAs(*at);
                }
                first.insert((post.sender.0, key), i);
                key_rooms.push(room.0);
                key_senders.push(post.sender.0);
                retry_keys.push(key);
                Plan::New
            })
            .collect();
        plans.push(plan);
    }
    let rooms: Vec<i64> = batches.iter().map(|(room, _)| room.0).collect();
    let candidates: Vec<i64> = plans
        .iter()
        .map(|plan| plan.iter().filter(|p| matches!(p, Plan::New)).count() as i64)
        .collect();
    // 2. Earlier messages with those keys, and the counters, in one round trip.
    let rows: Vec<LookedUp> = diesel::sql_query(LOOK_UP_AND_COUNT)
        .bind::<Array<BigInt>, _>(&key_rooms)
        .bind::<Array<BigInt>, _>(&key_senders)
        .bind::<Array<Text>, _>(&retry_keys)
        .bind::<Array<BigInt>, _>(&rooms)
        .bind::<Array<BigInt>, _>(&candidates)
        .load(conn)?;
    let mut earlier: HashMap<(i64, i64, String), Stored> = HashMap::new();
    let mut last_seqs: HashMap<i64, i64> = HashMap::new();
    for row in rows {
        match (row.sender_id, row.client_msg_id, row.created_at) {
            (Some(sender_id), Some(client_msg_id), Some(sent_at)) => {
                let stored = Stored {
                    seq: Seq(row.seq),
                    sent_at,
                    duplicate: true,
                };
                earlier.insert((row.room_id, sender_id, client_msg_id), stored);
            }
            _ => {
                last_seqs.insert(row.room_id, row.seq);
            }
        }
    }
    // 3. The posts found stored before are answered with what was stored.
    let mut new_counts: Vec<i64> = Vec::with_capacity(batches.len());
    for ((room, posts), plan) in batches.iter().zip(plans.iter_mut()) {
        for (post, step) in posts.iter().zip(plan.iter_mut()) {
            let (Plan::New, Some(key)) = (&step, post.client_msg_id.as_deref()) else {
                continue;
            };
            if let Some(stored) = earlier.get(&(room.0, post.sender.0, key.to_string())) {
                *step = Plan::Earlier(stored.clone());
            }
        }
        new_counts.push(plan.iter().filter(|p| matches!(p, Plan::New)).count() as i64);
    }
    if new_counts.iter().filter(|n| **n > 0).count() != last_seqs.len() {
        return Err(StoreError::NotFound);
    }
    // 4. Seal the new bodies and insert them all.
    let sent_at = now_micros();
    let mut results = Vec::with_capacity(batches.len());
    let mut sealed = Vec::new();
    for (((room, posts), plan), new_count) in batches.iter().zip(plans).zip(&new_counts) {
        let mut next = last_seqs
            .get(&room.0)
            .map(|last| last - new_count + 1)
            .unwrap_or(0);
        let mut stored: Vec<Stored> = Vec::with_capacity(posts.len());
        for (i, step) in plan.into_iter().enumerate() {
            let outcome = match step {
                Plan::New => {
                    let seq = Seq(next);
                    next += 1;
                    sealed.push((
                        *room,
                        &posts[i],
                        seq,
                        keys.seal(
                            &Binding {
                                room: *room,
                                seq,
                                sender: posts[i].sender,
                                sent_at_micros: sent_at.timestamp_micros(),
                            },
                            posts[i].body.as_bytes(),
                        )?,
                    ));
                    Stored {
                        seq,
                        sent_at,
                        duplicate: false,
                    }
                }
                Plan::Earlier(earlier) => earlier,
                Plan::SameAs(at) => Stored {
                    duplicate: true,
                    ..stored[at].clone()
                },
            };
            stored.push(outcome);
        }
        results.push(stored);
    }
    // One statement of column arrays, 9 parameters for any number of rows, where a multi-row
    // VALUES list has 9 per row for Postgres to parse and plan on every batch.
    if !sealed.is_empty() {
        let mut room_ids = Vec::with_capacity(sealed.len());
        let mut seqs = Vec::with_capacity(sealed.len());
        let mut senders = Vec::with_capacity(sealed.len());
        let mut retry_keys = Vec::with_capacity(sealed.len());
        let mut key_ids = Vec::with_capacity(sealed.len());
        let mut aad_versions = Vec::with_capacity(sealed.len());
        let mut nonces = Vec::with_capacity(sealed.len());
        let mut ciphertexts = Vec::with_capacity(sealed.len());
        for (room, post, seq, sealed) in &sealed {
            room_ids.push(room.0);
            seqs.push(seq.0);
            senders.push(post.sender.0);
            retry_keys.push(post.client_msg_id.as_deref());
            key_ids.push(sealed.key_id);
            aad_versions.push(sealed.aad_version);
            nonces.push(sealed.nonce.as_slice());
            ciphertexts.push(sealed.ciphertext.as_slice());
        }
        diesel::sql_query(
            "INSERT INTO messages (room_id, seq, sender_id, client_msg_id, key_id, aad_version, \
             nonce, ciphertext, created_at) \
             SELECT r, s, u, k, kid, v, n, c, $9 FROM unnest($1::bigint[], $2::bigint[], \
             $3::bigint[], $4::text[], $5::integer[], $6::smallint[], $7::bytea[], \
             $8::bytea[]) AS t(r, s, u, k, kid, v, n, c)",
        )
        .bind::<Array<BigInt>, _>(&room_ids)
        .bind::<Array<BigInt>, _>(&seqs)
        .bind::<Array<BigInt>, _>(&senders)
        .bind::<Array<Nullable<Text>>, _>(&retry_keys)
        .bind::<Array<Integer>, _>(&key_ids)
        .bind::<Array<SmallInt>, _>(&aad_versions)
        .bind::<Array<Bytea>, _>(&nonces)
        .bind::<Array<Bytea>, _>(&ciphertexts)
        .bind::<Timestamptz, _>(sent_at)
        .execute(conn)?;
    }
    Ok(results)
}

/// An upper bound of the messages sealed with each of `key_ids`: the span of message ids
/// sealed with it, read from the (key_id, id) index in two look-ups per key, where a count
/// would read every row and outlast the statement timeout on a large database.
pub fn key_usage(conn: &mut PgConnection, key_ids: &[i32]) -> Result<Vec<(i32, i64)>, StoreError> {
    use diesel::dsl::{max, min};
    let mut usage = Vec::with_capacity(key_ids.len());
    for id in key_ids {
        let (first, last): (Option<i64>, Option<i64>) = messages::table
            .filter(messages::key_id.eq(id))
            .select((min(messages::id), max(messages::id)))
            .first(conn)?;
        if let (Some(first), Some(last)) = (first, last) {
            usage.push((*id, last - first + 1));
        }
    }
    Ok(usage)
}

/// The `synchronous_commit` setting the server's own connections commit with.
pub fn synchronous_commit(conn: &mut PgConnection) -> Result<String, StoreError> {
    #[derive(QueryableByName)]
    struct Setting {
        #[diesel(sql_type = Text)]
        synchronous_commit: String,
    }
    let row: Setting = diesel::sql_query("SHOW synchronous_commit").get_result(conn)?;
    Ok(row.synchronous_commit)
}

/// The key ids the database knows, with their check values and whether rows sealed with
/// them are stored.
pub fn recorded_keys(conn: &mut PgConnection) -> Result<Vec<RecordedKey>, StoreError> {
    let known: Vec<(i32, Option<Vec<u8>>)> = message_keys::table
        .select((message_keys::key_id, message_keys::check_value))
        .order(message_keys::key_id)
        .load(conn)?;
    known
        .into_iter()
        .map(|(id, check_value)| {
            let in_use = diesel::select(diesel::dsl::exists(
                messages::table.filter(messages::key_id.eq(id)),
            ))
            .get_result(conn)?;
            Ok(RecordedKey {
                id,
                check_value,
                in_use,
            })
        })
        .collect()
}

/// Records the check values of keys new to the database (or recorded without one).
pub fn record_keys(conn: &mut PgConnection, checks: &[(i32, Vec<u8>)]) -> Result<(), StoreError> {
    for (id, check) in checks {
        diesel::sql_query(
            "INSERT INTO message_keys (key_id, check_value) VALUES ($1, $2) \
             ON CONFLICT (key_id) DO UPDATE SET check_value = EXCLUDED.check_value \
             WHERE message_keys.check_value IS NULL",
        )
        .bind::<Integer, _>(id)
        .bind::<Bytea, _>(check)
        .execute(conn)?;
    }
    Ok(())
}

/// Postgres keeps microseconds; the in-memory copy must format the same as the stored one.
fn now_micros() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}

/// Up to `limit` messages with seq < `before` (all when None), returned in ascending seq.
/// A row that fails to open is returned without a body and with `error` set.
pub fn load_messages(
    conn: &mut PgConnection,
    keys: &Keyring,
    room: &RoomRecord,
    before: Option<Seq>,
    limit: usize,
) -> Result<HistoryPage, StoreError> {
    let mut query = messages::table
        .inner_join(users::table)
        .filter(messages::room_id.eq(room.id.0))
        .into_boxed();
    if let Some(before) = before {
        query = query.filter(messages::seq.lt(before.0));
    }
    let mut rows: Vec<MessageRow> = query
        .order(messages::seq.desc())
        .limit(i64::try_from(limit).unwrap_or(i64::MAX).saturating_add(1))
        .select((
            messages::seq,
            messages::client_msg_id,
            messages::sender_id,
            messages::key_id,
            messages::aad_version,
            messages::nonce,
            messages::ciphertext,
            messages::created_at,
            users::username,
        ))
        .load(conn)?;
    let has_more = rows.len() > limit;
    rows.truncate(limit);
    rows.reverse();
    let mut unreadable = Vec::new();
    let messages = rows
        .into_iter()
        .map(|row| {
            let (view, problem) = open_row(keys, room, row);
            if let Some(problem) = problem {
                unreadable.push((view.seq, problem));
            }
            view
        })
        .collect();
    Ok(HistoryPage {
        messages,
        has_more,
        unreadable,
    })
}

/// The plaintext body of a stored row, or why it cannot be had.
pub(crate) fn open_body(
    keys: &Keyring,
    room: RoomId,
    seq: Seq,
    sender: UserId,
    created_at: DateTime<Utc>,
    sealed: &Sealed,
) -> Result<String, String> {
    let at = Binding {
        room,
        seq,
        sender,
        sent_at_micros: created_at.timestamp_micros(),
    };
    keys.open(&at, sealed)
        .map_err(|e| format!("does not decrypt with key {}: {e}", sealed.key_id))
        .and_then(|plain| {
            String::from_utf8(plain).map_err(|_| "decrypts, but the body is not UTF-8".to_string())
        })
}

/// The message of a row, and why its body is missing when it could not be opened.
fn open_row(keys: &Keyring, room: &RoomRecord, row: MessageRow) -> (MessageView, Option<String>) {
    let seq = Seq(row.seq);
    let sealed = Sealed {
        key_id: row.key_id,
        aad_version: row.aad_version,
        nonce: row.nonce,
        ciphertext: row.ciphertext,
    };
    let body = open_body(
        keys,
        room.id,
        seq,
        UserId(row.sender_id),
        row.created_at,
        &sealed,
    );
    let (body, error, problem) = match body {
        Ok(body) => (Some(body), None, None),
        Err(why) => (None, Some(UNDECRYPTABLE), Some(why)),
    };
    let view = MessageView {
        room: room.name.clone(),
        seq,
        from: row.username,
        body,
        sent_at: format_time(row.created_at),
        client_msg_id: row.client_msg_id,
        error,
    };
    (view, problem)
}

pub type PooledConn = diesel::r2d2::PooledConnection<ConnectionManager<PgConnection>>;
