//! Persistence: plain functions over `&mut PgConnection`, called only from the DB-executor
//! threads. Owns the SQL; seals and opens bodies with the [`Keyring`] it is given.

pub mod models;

use chrono::{DateTime, Duration as TimeDelta, Utc};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use std::collections::HashMap;
use std::time::Duration;

use crate::crypto::{Keyring, Sealed};
use crate::error::StoreError;
use crate::protocol::{format_time, MessageView, RoomId, RoomKind, Seq, UserId, UNDECRYPTABLE};
use crate::schema::{messages, room_members, rooms, session_tokens, users};
use models::*;

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

pub type PgPool = Pool<ConnectionManager<PgConnection>>;

/// Any number: serializes concurrent `migrate` runs of several nodes.
const MIGRATION_LOCK: i64 = 0x0052_6f6f_6b65_7279;

fn is_unique_violation(e: &DieselError) -> bool {
    matches!(
        e,
        DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)
    )
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
        .connection_customizer(Box::new(StatementTimeout(statement_timeout)))
        .build_unchecked(ConnectionManager::new(url)))
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

/// The user and its password hash, for a login.
pub fn find_login(
    conn: &mut PgConnection,
    username: &str,
) -> Result<Option<(UserRecord, String)>, StoreError> {
    let row = users::table
        .filter(users::username.eq(username))
        .select((users::id, users::username, users::password_hash))
        .first::<(i64, String, String)>(conn)
        .optional()?;
    Ok(row.map(|(id, username, hash)| {
        (
            UserRecord {
                id: UserId(id),
                username,
            },
            hash,
        )
    }))
}

pub fn insert_token(
    conn: &mut PgConnection,
    user: UserId,
    token_hash: &[u8],
    ttl: Duration,
) -> Result<(), StoreError> {
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
    Ok(())
}

/// The user holding a live (unexpired, unrevoked) token.
pub fn user_by_token(conn: &mut PgConnection, token_hash: &[u8]) -> Result<UserRecord, StoreError> {
    let (id, username) = session_tokens::table
        .inner_join(users::table)
        .filter(session_tokens::token_hash.eq(token_hash))
        .filter(session_tokens::revoked_at.is_null())
        .filter(session_tokens::expires_at.gt(Utc::now()))
        .select((users::id, users::username))
        .first::<(i64, String)>(conn)
        .optional()?
        .ok_or(StoreError::InvalidToken)?;
    Ok(UserRecord {
        id: UserId(id),
        username,
    })
}

pub fn revoke_token(conn: &mut PgConnection, token_hash: &[u8]) -> Result<(), StoreError> {
    diesel::update(session_tokens::table.filter(session_tokens::token_hash.eq(token_hash)))
        .set(session_tokens::revoked_at.eq(Utc::now()))
        .execute(conn)?;
    Ok(())
}

fn parse_kind(kind: &str) -> RoomKind {
    // The CHECK constraint admits only these two values.
    RoomKind::parse(kind).unwrap_or(RoomKind::Private)
}

/// Public rooms and the private rooms `user` is a member of, by name.
pub fn list_rooms(
    conn: &mut PgConnection,
    user: UserId,
    limit: usize,
) -> Result<Vec<RoomSummary>, StoreError> {
    let member_of = room_members::table
        .filter(room_members::user_id.eq(user.0))
        .select(room_members::room_id);
    let rows = rooms::table
        .filter(rooms::kind.eq("public").or(rooms::id.eq_any(member_of)))
        .order(rooms::name.asc())
        .limit(i64::try_from(limit).unwrap_or(i64::MAX))
        .select((rooms::name, rooms::kind, rooms::last_seq))
        .load::<(String, String, i64)>(conn)?;
    Ok(rows
        .into_iter()
        .map(|(name, kind, last_seq)| RoomSummary {
            name,
            kind: parse_kind(&kind),
            last_seq: Seq(last_seq),
        })
        .collect())
}

/// Creates a room owned by `owner`. A private room's whitelist is the owner plus `members`.
pub fn create_room(
    conn: &mut PgConnection,
    name: &str,
    kind: RoomKind,
    owner: &UserRecord,
    members: &[String],
) -> Result<RoomRecord, StoreError> {
    conn.transaction(|conn| {
        let mut member_ids = vec![owner.id.0];
        if kind == RoomKind::Private && !members.is_empty() {
            let found: Vec<(i64, String)> = users::table
                .filter(users::username.eq_any(members))
                .select((users::id, users::username))
                .load(conn)?;
            if let Some(missing) = members
                .iter()
                .find(|m| !found.iter().any(|(_, name)| name == *m))
            {
                return Err(StoreError::UnknownMember(missing.clone()));
            }
            member_ids.extend(found.into_iter().map(|(id, _)| id));
        }
        let id: i64 = diesel::insert_into(rooms::table)
            .values((
                rooms::name.eq(name),
                rooms::kind.eq(kind.as_str()),
                rooms::owner_id.eq(owner.id.0),
            ))
            .returning(rooms::id)
            .get_result(conn)
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Conflict("room")
                } else {
                    e.into()
                }
            })?;
        if kind == RoomKind::Private {
            member_ids.sort_unstable();
            member_ids.dedup();
            let rows: Vec<_> = member_ids
                .iter()
                .map(|user| {
                    (
                        room_members::room_id.eq(id),
                        room_members::user_id.eq(*user),
                    )
                })
                .collect();
            diesel::insert_into(room_members::table)
                .values(&rows)
                .execute(conn)?;
        }
        Ok(RoomRecord {
            id: RoomId(id),
            name: name.to_string(),
            kind,
            owner: Some(owner.username.clone()),
            last_seq: Seq(0),
        })
    })
}

/// A room with its whitelist and its newest `recent` messages; `NotFound` if there is none.
pub fn load_room(
    conn: &mut PgConnection,
    keys: &Keyring,
    name: &str,
    recent: usize,
) -> Result<RoomState, StoreError> {
    let (id, kind, owner, last_seq) = rooms::table
        .left_join(users::table)
        .filter(rooms::name.eq(name))
        .select((
            rooms::id,
            rooms::kind,
            users::username.nullable(),
            rooms::last_seq,
        ))
        .first::<(i64, String, Option<String>, i64)>(conn)
        .optional()?
        .ok_or(StoreError::NotFound)?;
    let members = room_members::table
        .filter(room_members::room_id.eq(id))
        .select(room_members::user_id)
        .load::<i64>(conn)?
        .into_iter()
        .map(UserId)
        .collect();
    let record = RoomRecord {
        id: RoomId(id),
        name: name.to_string(),
        kind: parse_kind(&kind),
        owner,
        last_seq: Seq(last_seq),
    };
    let recent = load_messages(conn, keys, &record, None, recent)?.messages;
    Ok(RoomState {
        record,
        members,
        recent,
    })
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
) -> Result<Vec<Stored>, StoreError> {
    let mut results = store_batches(conn, keys, &[(room, posts)])?;
    Ok(results.pop().unwrap_or_default())
}

/// Group commit: the batches of several rooms in one transaction (each room's counter updated
/// once, one multi-row insert for all). All are committed or none is; results per batch, in order.
pub fn store_batches(
    conn: &mut PgConnection,
    keys: &Keyring,
    batches: &[(RoomId, &[NewPost])],
) -> Result<Vec<Vec<Stored>>, StoreError> {
    let attempt = |conn: &mut PgConnection| {
        conn.transaction(|conn| {
            let sent_at = now_micros();
            let mut results = Vec::with_capacity(batches.len());
            let mut sealed = Vec::new();
            for (room, posts) in batches {
                let (stored, new) = plan_room(conn, keys, *room, posts, sent_at)?;
                sealed.extend(
                    new.into_iter()
                        .map(|(i, seq, s)| (*room, &posts[i], seq, s)),
                );
                results.push(stored);
            }
            for chunk in sealed.chunks(1000) {
                let rows: Vec<NewMessage> = chunk
                    .iter()
                    .map(|(room, post, seq, sealed)| NewMessage {
                        room_id: room.0,
                        seq: seq.0,
                        sender_id: post.sender.0,
                        client_msg_id: post.client_msg_id.as_deref(),
                        key_id: sealed.key_id,
                        nonce: &sealed.nonce,
                        ciphertext: &sealed.ciphertext,
                        created_at: sent_at,
                    })
                    .collect();
                diesel::insert_into(messages::table)
                    .values(&rows)
                    .execute(conn)?;
            }
            Ok::<_, StoreError>(results)
        })
    };
    match attempt(conn) {
        // A concurrent writer committed one of our client_msg_ids first: now it is a duplicate.
        Err(StoreError::Database(e)) if is_unique_violation(&e) => attempt(conn),
        other => other,
    }
}

/// Decides, for one room's posts, which are new (assigning their seqs from the room's
/// counter and sealing them) and which repeat a stored or earlier `client_msg_id`.
/// Returns every post's outcome and the new ones to insert: (index, seq, sealed body).
#[allow(clippy::type_complexity)]
fn plan_room(
    conn: &mut PgConnection,
    keys: &Keyring,
    room: RoomId,
    posts: &[NewPost],
    sent_at: DateTime<Utc>,
) -> Result<(Vec<Stored>, Vec<(usize, Seq, Sealed)>), StoreError> {
    enum Plan {
        New,
        Earlier(Stored),
        SameAs(usize),
    }
    let retry_keys: Vec<&str> = posts
        .iter()
        .filter_map(|p| p.client_msg_id.as_deref())
        .collect();
    let mut seen: HashMap<(i64, &str), Plan> = HashMap::new();
    if !retry_keys.is_empty() {
        let found: Vec<(i64, Option<String>, i64, DateTime<Utc>)> = messages::table
            .filter(messages::room_id.eq(room.0))
            .filter(messages::client_msg_id.eq_any(&retry_keys))
            .select((
                messages::sender_id,
                messages::client_msg_id,
                messages::seq,
                messages::created_at,
            ))
            .load(conn)?;
        for (sender, key, seq, sent_at) in found {
            if let Some(key) = key.and_then(|k| retry_keys.iter().find(|r| **r == k).copied()) {
                let stored = Stored {
                    seq: Seq(seq),
                    sent_at,
                    duplicate: true,
                };
                seen.insert((sender, key), Plan::Earlier(stored));
            }
        }
    }
    let plan: Vec<Plan> = posts
        .iter()
        .enumerate()
        .map(|(i, post)| {
            let Some(key) = post.client_msg_id.as_deref().map(|k| (post.sender.0, k)) else {
                return Plan::New;
            };
            match seen.get(&key) {
                Some(Plan::Earlier(stored)) => Plan::Earlier(stored.clone()),
                Some(Plan::New) => Plan::New, // not stored in `seen`; kept for exhaustiveness
                Some(Plan::SameAs(first)) => Plan::SameAs(*first),
                None => {
                    seen.insert(key, Plan::SameAs(i));
                    Plan::New
                }
            }
        })
        .collect();
    let new_count = plan.iter().filter(|p| matches!(p, Plan::New)).count();
    let mut next = 0;
    if new_count > 0 {
        let count = i64::try_from(new_count).unwrap_or(i64::MAX);
        let last: i64 = diesel::update(rooms::table.find(room.0))
            .set(rooms::last_seq.eq(rooms::last_seq + count))
            .returning(rooms::last_seq)
            .get_result(conn)
            .optional()?
            .ok_or(StoreError::NotFound)?;
        next = last - count + 1;
    }
    let mut results: Vec<Stored> = Vec::with_capacity(posts.len());
    let mut sealed = Vec::with_capacity(new_count);
    for (i, step) in plan.into_iter().enumerate() {
        let stored = match step {
            Plan::New => {
                let seq = Seq(next);
                next += 1;
                sealed.push((i, seq, keys.seal(room, seq, posts[i].body.as_bytes())?));
                Stored {
                    seq,
                    sent_at,
                    duplicate: false,
                }
            }
            Plan::Earlier(stored) => stored,
            Plan::SameAs(first) => Stored {
                duplicate: true,
                ..results[first].clone()
            },
        };
        results.push(stored);
    }
    Ok((results, sealed))
}

/// Messages stored per key id.
pub fn key_usage(conn: &mut PgConnection) -> Result<Vec<(i32, i64)>, StoreError> {
    use diesel::dsl::count_star;
    Ok(messages::table
        .group_by(messages::key_id)
        .select((messages::key_id, count_star()))
        .load(conn)?)
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
            messages::key_id,
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

/// The message of a row, and why its body is missing when it could not be opened.
fn open_row(keys: &Keyring, room: &RoomRecord, row: MessageRow) -> (MessageView, Option<String>) {
    let seq = Seq(row.seq);
    let sealed = Sealed {
        key_id: row.key_id,
        nonce: row.nonce,
        ciphertext: row.ciphertext,
    };
    let body = keys
        .open(room.id, seq, &sealed)
        .map_err(|e| e.to_string())
        .and_then(|plain| String::from_utf8(plain).map_err(|_| "not UTF-8".to_string()));
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
