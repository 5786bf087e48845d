//! What the operator commands (`rookery user …`, `rookery verify`) and the servers' watch for
//! revoked tokens read and write: users' access, and a read-only walk over stored messages.
//! Plain functions over `&mut PgConnection`.

use chrono::{DateTime, Utc};
use diesel::dsl::{count_star, now};
use diesel::prelude::*;

use super::lower;
use super::open_body;
use crate::crypto::{Keyring, Sealed};
use crate::error::StoreError;
use crate::ids::{RoomId, Seq, UserId};
use crate::protocol::username_key;
use crate::schema::{messages, rooms, session_tokens, unstored_seqs, users};

/// A user as `rookery user list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSummary {
    pub username: String,
    pub created_at: DateTime<Utc>,
    pub disabled_at: Option<DateTime<Utc>>,
    /// Unexpired, unrevoked tokens: the user's logged-in devices.
    pub live_tokens: i64,
}

/// id, username, created, disabled.
type UserRow = (i64, String, DateTime<Utc>, Option<DateTime<Utc>>);

pub fn list_users(conn: &mut PgConnection) -> Result<Vec<UserSummary>, StoreError> {
    let users: Vec<UserRow> = users::table
        .order(lower(users::username))
        .select((
            users::id,
            users::username,
            users::created_at,
            users::disabled_at,
        ))
        .load(conn)?;
    let live: Vec<(i64, i64)> = session_tokens::table
        .filter(session_tokens::revoked_at.is_null())
        .filter(session_tokens::expires_at.gt(now))
        .group_by(session_tokens::user_id)
        .select((session_tokens::user_id, count_star()))
        .load(conn)?;
    let live: std::collections::HashMap<i64, i64> = live.into_iter().collect();
    Ok(users
        .into_iter()
        .map(|(id, username, created_at, disabled_at)| UserSummary {
            username,
            created_at,
            disabled_at,
            live_tokens: live.get(&id).copied().unwrap_or(0),
        })
        .collect())
}

pub fn user_id(conn: &mut PgConnection, username: &str) -> Result<Option<UserId>, StoreError> {
    Ok(users::table
        .filter(lower(users::username).eq(username_key(username)))
        .select(users::id)
        .first::<i64>(conn)
        .optional()?
        .map(UserId))
}

/// Revokes every live token of the user; the servers close the sessions holding them within
/// `auth.revocation_check_ms`. None for an unknown user, else how many were revoked.
pub fn revoke_user_tokens(
    conn: &mut PgConnection,
    username: &str,
) -> Result<Option<usize>, StoreError> {
    conn.transaction(|conn| {
        let Some(user) = user_id(conn, username)? else {
            return Ok(None);
        };
        Ok(Some(revoke_all(conn, user)?))
    })
}

fn revoke_all(conn: &mut PgConnection, user: UserId) -> Result<usize, StoreError> {
    Ok(diesel::update(
        session_tokens::table
            .filter(session_tokens::user_id.eq(user.0))
            .filter(session_tokens::revoked_at.is_null()),
    )
    .set(session_tokens::revoked_at.eq(now))
    .execute(conn)?)
}

/// Disables (refuses logins and resumes, revokes every token) or enables the user. None for
/// an unknown user, else the tokens revoked.
pub fn set_disabled(
    conn: &mut PgConnection,
    username: &str,
    disabled: bool,
) -> Result<Option<usize>, StoreError> {
    conn.transaction(|conn| {
        let Some(user) = user_id(conn, username)? else {
            return Ok(None);
        };
        let target = users::table.filter(users::id.eq(user.0));
        if disabled {
            diesel::update(target.filter(users::disabled_at.is_null()))
                .set(users::disabled_at.eq(now))
                .execute(conn)?;
            Ok(Some(revoke_all(conn, user)?))
        } else {
            diesel::update(target)
                .set(users::disabled_at.eq(None::<DateTime<Utc>>))
                .execute(conn)?;
            Ok(Some(0))
        }
    })
}

/// Sets a new password hash and revokes every token (whoever knew the old password is logged
/// out). None for an unknown user, else the tokens revoked.
pub fn set_password(
    conn: &mut PgConnection,
    username: &str,
    password_hash: &str,
) -> Result<Option<usize>, StoreError> {
    conn.transaction(|conn| {
        let Some(user) = user_id(conn, username)? else {
            return Ok(None);
        };
        diesel::update(users::table.filter(users::id.eq(user.0)))
            .set(users::password_hash.eq(password_hash))
            .execute(conn)?;
        Ok(Some(revoke_all(conn, user)?))
    })
}

/// Token hashes revoked at or after `since` (the database's clock), with the newest
/// revocation time among them.
pub fn revoked_since(
    conn: &mut PgConnection,
    since: Option<DateTime<Utc>>,
) -> Result<(Vec<Vec<u8>>, DateTime<Utc>), StoreError> {
    let clock: DateTime<Utc> =
        diesel::select(diesel::dsl::sql::<diesel::sql_types::Timestamptz>("now()"))
            .get_result(conn)?;
    let Some(since) = since else {
        return Ok((Vec::new(), clock));
    };
    let hashes = session_tokens::table
        .filter(session_tokens::revoked_at.ge(since))
        .select(session_tokens::token_hash)
        .load(conn)?;
    Ok((hashes, clock))
}

/// One room as `rookery verify` checks it.
#[derive(Debug, Clone)]
pub struct RoomInventory {
    pub id: RoomId,
    pub name: String,
    /// The room's counter: every seq up to it was handed out.
    pub last_seq: i64,
    /// Seqs up to this one may have been deleted by retention.
    pub purged_through: i64,
    /// Blocks of seqs handed out without being stored (a room with `persist = false`).
    pub unstored: Vec<(i64, i64)>,
}

impl RoomInventory {
    /// Whether `seq` is meant to have a row.
    pub fn expects(&self, seq: i64) -> bool {
        seq > self.purged_through
            && seq <= self.last_seq
            && !self.unstored.iter().any(|(a, b)| (*a..=*b).contains(&seq))
    }
}

/// Every room (or the one named), by name.
pub fn room_inventory(
    conn: &mut PgConnection,
    only: Option<&str>,
) -> Result<Vec<RoomInventory>, StoreError> {
    let mut query = rooms::table.into_boxed();
    if let Some(name) = only {
        query = query.filter(rooms::name.eq(name.to_string()));
    }
    let rows: Vec<(i64, String, i64, i64)> = query
        .order(rooms::name)
        .select((
            rooms::id,
            rooms::name,
            rooms::last_seq,
            rooms::purged_through,
        ))
        .load(conn)?;
    let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
    let blocks: Vec<(i64, i64, i64)> = unstored_seqs::table
        .filter(unstored_seqs::room_id.eq_any(&ids))
        .order((unstored_seqs::room_id, unstored_seqs::first_seq))
        .select((
            unstored_seqs::room_id,
            unstored_seqs::first_seq,
            unstored_seqs::last_seq,
        ))
        .load(conn)?;
    Ok(rows
        .into_iter()
        .map(|(id, name, last_seq, purged_through)| RoomInventory {
            id: RoomId(id),
            name,
            last_seq,
            purged_through,
            unstored: blocks
                .iter()
                .filter(|b| b.0 == id)
                .map(|b| (b.1, b.2))
                .collect(),
        })
        .collect())
}

pub fn count_messages(conn: &mut PgConnection, rooms: &[RoomId]) -> Result<i64, StoreError> {
    let ids: Vec<i64> = rooms.iter().map(|r| r.0).collect();
    Ok(messages::table
        .filter(messages::room_id.eq_any(ids))
        .select(count_star())
        .get_result(conn)?)
}

/// What is wrong with one stored seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    pub seq: i64,
    pub problem: String,
}

/// seq, sender, key id, AAD version, nonce, ciphertext, created.
type SealedRow = (i64, i64, i32, i16, Vec<u8>, Vec<u8>, DateTime<Utc>);

/// One page of a room's rows after `after`: the seqs read, in order (empty when the room has
/// no more rows), and the rows that do not open with their key.
pub fn check_page(
    conn: &mut PgConnection,
    keys: &Keyring,
    room: RoomId,
    after: i64,
    limit: i64,
) -> Result<(Vec<i64>, Vec<BadRow>), StoreError> {
    let rows: Vec<SealedRow> = messages::table
        .filter(messages::room_id.eq(room.0))
        .filter(messages::seq.gt(after))
        .order(messages::seq)
        .limit(limit)
        .select((
            messages::seq,
            messages::sender_id,
            messages::key_id,
            messages::aad_version,
            messages::nonce,
            messages::ciphertext,
            messages::created_at,
        ))
        .load(conn)?;
    let seqs = rows.iter().map(|r| r.0).collect();
    let bad = rows
        .into_iter()
        .filter_map(
            |(seq, sender, key_id, aad_version, nonce, ciphertext, created_at)| {
                let sealed = Sealed {
                    key_id,
                    aad_version,
                    nonce,
                    ciphertext,
                };
                let opened = open_body(keys, room, Seq(seq), UserId(sender), created_at, &sealed);
                let problem = opened.err()?;
                Some(BadRow { seq, problem })
            },
        )
        .collect();
    Ok((seqs, bad))
}
