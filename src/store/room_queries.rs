//! Rooms in the database: listing, creating (over the protocol, from the policy file, and the
//! direct room of two users), loading for a Room actor, membership (invite and revoke),
//! closing the rooms the policy file no longer defines, reserving seqs for rooms that do not
//! store their messages, and the retention job. Plain functions over `&mut PgConnection`.

use diesel::dsl::count_star;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Integer, Text};

use super::models::*;
use super::{is_unique_violation, load_messages, lower};
use crate::crypto::Keyring;
use crate::error::StoreError;
use crate::ids::{RoomId, Seq, UserId};
use crate::protocol::{direct_room_name, username_key, RoomKind};
use crate::schema::{room_members, rooms, users};

fn parse_kind(kind: &str) -> RoomKind {
    // The CHECK constraint admits only these two values.
    RoomKind::parse(kind).unwrap_or(RoomKind::Private)
}

/// Open public rooms, the open private rooms `user` is a member of, and the open rooms named
/// in `whitelisted` (the policy file's rooms that list the user), by name.
pub fn list_rooms(
    conn: &mut PgConnection,
    user: UserId,
    whitelisted: &[String],
    limit: usize,
) -> Result<Vec<RoomSummary>, StoreError> {
    let member_of = room_members::table
        .filter(room_members::user_id.eq(user.0))
        .select(room_members::room_id);
    let rows = rooms::table
        .filter(rooms::closed_at.is_null())
        .filter(
            rooms::kind
                .eq("public")
                .or(rooms::id.eq_any(member_of))
                .or(rooms::name.eq_any(whitelisted)),
        )
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

/// Creates a room owned by `owner`, who may own at most `max_owned` rooms. A private room's
/// whitelist is the owner plus `members`.
pub fn create_room(
    conn: &mut PgConnection,
    name: &str,
    kind: RoomKind,
    owner: &UserRecord,
    members: &[String],
    max_owned: usize,
) -> Result<RoomRecord, StoreError> {
    conn.transaction(|conn| {
        // One creation at a time per user, so that concurrent ones cannot pass the limit.
        users::table
            .filter(users::id.eq(owner.id.0))
            .select(users::id)
            .for_update()
            .first::<i64>(conn)?;
        let owned: i64 = rooms::table
            .filter(rooms::owner_id.eq(owner.id.0))
            .filter(rooms::origin.eq(RoomOrigin::User.as_str()))
            .select(count_star())
            .first(conn)?;
        if usize::try_from(owned).unwrap_or(usize::MAX) >= max_owned {
            return Err(StoreError::TooManyRooms { max: max_owned });
        }
        let mut member_ids = vec![owner.id.0];
        if kind == RoomKind::Private && !members.is_empty() {
            let wanted: Vec<String> = members.iter().map(|m| username_key(m)).collect();
            let found: Vec<(i64, String)> = users::table
                .filter(lower(users::username).eq_any(&wanted))
                .select((users::id, users::username))
                .load(conn)?;
            if let Some(missing) = members
                .iter()
                .find(|m| !found.iter().any(|(_, name)| name.eq_ignore_ascii_case(m)))
            {
                return Err(StoreError::UnknownMember(missing.clone()));
            }
            member_ids.extend(found.into_iter().map(|(id, _)| id));
        }
        let id = insert_room(conn, name, kind, Some(owner.id), RoomOrigin::User)?;
        if kind == RoomKind::Private {
            add_members(conn, RoomId(id), &member_ids)?;
        }
        Ok(RoomRecord {
            id: RoomId(id),
            name: name.to_string(),
            kind,
            owner: Some(owner.username.clone()),
            last_seq: Seq(0),
            origin: RoomOrigin::User,
            closed: false,
        })
    })
}

fn insert_room(
    conn: &mut PgConnection,
    name: &str,
    kind: RoomKind,
    owner: Option<UserId>,
    origin: RoomOrigin,
) -> Result<i64, StoreError> {
    diesel::insert_into(rooms::table)
        .values((
            rooms::name.eq(name),
            rooms::kind.eq(kind.as_str()),
            rooms::owner_id.eq(owner.map(|o| o.0)),
            rooms::origin.eq(origin.as_str()),
        ))
        .returning(rooms::id)
        .get_result(conn)
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict("room")
            } else {
                e.into()
            }
        })
}

fn add_members(conn: &mut PgConnection, room: RoomId, users: &[i64]) -> Result<(), StoreError> {
    let rows: Vec<_> = users
        .iter()
        .map(|user| {
            (
                room_members::room_id.eq(room.0),
                room_members::user_id.eq(*user),
            )
        })
        .collect();
    diesel::insert_into(room_members::table)
        .values(&rows)
        .on_conflict_do_nothing()
        .execute(conn)?;
    Ok(())
}

/// A room with its members and its newest `recent` messages; `NotFound` if there is none.
pub fn load_room(
    conn: &mut PgConnection,
    keys: &Keyring,
    name: &str,
    recent: usize,
) -> Result<RoomState, StoreError> {
    type Row = (i64, String, Option<String>, i64, String, bool);
    let (id, kind, owner, last_seq, origin, closed) = rooms::table
        .left_join(users::table)
        .filter(rooms::name.eq(name))
        .select((
            rooms::id,
            rooms::kind,
            users::username.nullable(),
            rooms::last_seq,
            rooms::origin,
            rooms::closed_at.is_not_null(),
        ))
        .first::<Row>(conn)
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
        origin: RoomOrigin::parse(&origin),
        closed,
    };
    let recent = load_messages(conn, keys, &record, None, recent)?.messages;
    Ok(RoomState {
        record,
        members,
        recent,
    })
}

/// Makes the policy file's rooms exist and open, with their kind; a room of that name
/// created over the protocol is taken over by the file. Closes every other room the file
/// defined before; returns the names of the rooms closed now.
pub fn sync_config_rooms(
    conn: &mut PgConnection,
    defined: &[(String, RoomKind)],
) -> Result<Vec<String>, StoreError> {
    conn.transaction(|conn| {
        let names: Vec<&str> = defined.iter().map(|(n, _)| n.as_str()).collect();
        // A room created over the protocol that the file now defines: the file's admins manage
        // it from now on, its members are the file's whitelist and whom they invite.
        let taken_over: Vec<i64> = diesel::update(
            rooms::table
                .filter(rooms::name.eq_any(&names))
                .filter(rooms::origin.ne(RoomOrigin::Config.as_str())),
        )
        .set(rooms::owner_id.eq(None::<i64>))
        .returning(rooms::id)
        .get_results(conn)?;
        diesel::delete(room_members::table.filter(room_members::room_id.eq_any(&taken_over)))
            .execute(conn)?;
        for (name, kind) in defined {
            diesel::insert_into(rooms::table)
                .values((
                    rooms::name.eq(name),
                    rooms::kind.eq(kind.as_str()),
                    rooms::origin.eq(RoomOrigin::Config.as_str()),
                ))
                .on_conflict(rooms::name)
                .do_update()
                .set((
                    rooms::kind.eq(kind.as_str()),
                    rooms::origin.eq(RoomOrigin::Config.as_str()),
                    rooms::closed_at.eq(None::<chrono::DateTime<chrono::Utc>>),
                ))
                .execute(conn)?;
        }
        Ok(diesel::update(
            rooms::table
                .filter(rooms::origin.eq(RoomOrigin::Config.as_str()))
                .filter(rooms::closed_at.is_null())
                .filter(diesel::dsl::not(rooms::name.eq_any(names))),
        )
        .set(rooms::closed_at.eq(diesel::dsl::now))
        .returning(rooms::name)
        .get_results(conn)?)
    })
}

/// Adds `username` to the members of `room` (nothing happens when it is one already), unless
/// the room has `cap` members already.
pub fn add_member(
    conn: &mut PgConnection,
    room: RoomId,
    username: &str,
    cap: usize,
) -> Result<UserRecord, StoreError> {
    let user = find_user(conn, username)?;
    conn.transaction(|conn| {
        // One change of the room's members at a time, so that invites cannot pass the cap.
        rooms::table
            .filter(rooms::id.eq(room.0))
            .select(rooms::id)
            .for_update()
            .first::<i64>(conn)?;
        let members = room_members::table.filter(room_members::room_id.eq(room.0));
        let already: i64 = members
            .filter(room_members::user_id.eq(user.id.0))
            .select(count_star())
            .first(conn)?;
        if already > 0 {
            return Ok(());
        }
        let count: i64 = members.select(count_star()).first(conn)?;
        if usize::try_from(count).unwrap_or(usize::MAX) >= cap {
            return Err(StoreError::RoomFull);
        }
        add_members(conn, room, &[user.id.0])
    })?;
    Ok(user)
}

/// Removes `username` from the members of `room` (nothing happens when it is none).
pub fn remove_member(
    conn: &mut PgConnection,
    room: RoomId,
    username: &str,
) -> Result<UserRecord, StoreError> {
    let user = find_user(conn, username)?;
    diesel::delete(
        room_members::table
            .filter(room_members::room_id.eq(room.0))
            .filter(room_members::user_id.eq(user.id.0)),
    )
    .execute(conn)?;
    Ok(user)
}

fn find_user(conn: &mut PgConnection, username: &str) -> Result<UserRecord, StoreError> {
    let (id, username) = users::table
        .filter(lower(users::username).eq(username_key(username)))
        .select((users::id, users::username))
        .first::<(i64, String)>(conn)
        .optional()?
        .ok_or_else(|| StoreError::UnknownMember(username.to_string()))?;
    Ok(UserRecord {
        id: UserId(id),
        username,
    })
}

/// The direct room of `me` and `other`, created on first use: private, the two of them its
/// only members, named the same whichever of them asks.
pub fn open_direct(
    conn: &mut PgConnection,
    me: &UserRecord,
    other: &str,
) -> Result<RoomRecord, StoreError> {
    let other = find_user(conn, other)?;
    let name = direct_room_name(&me.username, &other.username);
    match open_direct_once(conn, me, &other, &name) {
        // The other user asked at the same moment and created it first.
        Err(StoreError::Conflict(_)) => open_direct_once(conn, me, &other, &name),
        opened => opened,
    }
}

fn open_direct_once(
    conn: &mut PgConnection,
    me: &UserRecord,
    other: &UserRecord,
    name: &crate::protocol::RoomName,
) -> Result<RoomRecord, StoreError> {
    conn.transaction(|conn| {
        let existing = rooms::table
            .filter(rooms::name.eq(name.as_str()))
            .select((rooms::id, rooms::last_seq))
            .first::<(i64, i64)>(conn)
            .optional()?;
        let (id, last_seq) = match existing {
            Some(found) => found,
            None => {
                let id = insert_room(
                    conn,
                    name.as_str(),
                    RoomKind::Private,
                    None,
                    RoomOrigin::Direct,
                )?;
                add_members(conn, RoomId(id), &[me.id.0, other.id.0])?;
                (id, 0)
            }
        };
        Ok(RoomRecord {
            id: RoomId(id),
            name: name.to_string(),
            kind: RoomKind::Private,
            owner: None,
            last_seq: Seq(last_seq),
            origin: RoomOrigin::Direct,
            closed: false,
        })
    })
}

/// Reserves `count` more seqs of `room` (a room that does not store its messages hands them
/// out itself): returns the last seq of the reserved block, which starts after the room's
/// counter as it was.
pub fn reserve_seqs(conn: &mut PgConnection, room: RoomId, count: i64) -> Result<Seq, StoreError> {
    // One statement: the block is listed in `unstored_seqs` (for `rookery verify`) exactly
    // when the counter moved past it.
    let reserved: Reserved = diesel::sql_query(
        "WITH r AS (UPDATE rooms SET last_seq = last_seq + $2 WHERE id = $1 RETURNING last_seq) \
         INSERT INTO unstored_seqs (room_id, first_seq, last_seq) \
         SELECT $1, r.last_seq - $2 + 1, r.last_seq FROM r RETURNING last_seq",
    )
    .bind::<BigInt, _>(room.0)
    .bind::<BigInt, _>(count)
    .get_result(conn)?;
    Ok(Seq(reserved.last_seq))
}

#[derive(QueryableByName)]
struct Reserved {
    #[diesel(sql_type = BigInt)]
    last_seq: i64,
}

/// Rows deleted by one statement of the retention job, so that no statement runs for long.
const PURGE_BATCH: i64 = 10_000;

/// Deletes messages older than their room's retention: `rules` gives the days of the rooms
/// the policy file defines (0: kept for ever), `default_days` those of every other room.
/// Returns the number of messages deleted.
pub fn purge_expired(
    conn: &mut PgConnection,
    rules: &[(String, u32)],
    default_days: u32,
) -> Result<usize, StoreError> {
    let defined: Vec<String> = rules.iter().map(|(n, _)| n.clone()).collect();
    let mut deleted = 0;
    for (name, days) in rules.iter().filter(|(_, d)| *d > 0) {
        deleted += purge(conn, "r.name = ANY($1)", std::slice::from_ref(name), *days)?;
    }
    if default_days > 0 {
        deleted += purge(conn, "r.name <> ALL($1)", &defined, default_days)?;
    }
    Ok(deleted)
}

fn purge(
    conn: &mut PgConnection,
    rooms_filter: &str,
    names: &[String],
    days: u32,
) -> Result<usize, StoreError> {
    // Each room's `purged_through` moves with its deletions in the same statement, so that
    // `rookery verify` tells retention from a lost row.
    let sql = format!(
        "WITH d AS (DELETE FROM messages WHERE id IN (SELECT m.id FROM messages m JOIN rooms r ON r.id = m.room_id \
         WHERE {rooms_filter} AND m.created_at < now() - make_interval(days => $2) LIMIT $3) RETURNING room_id, seq), \
         top AS (SELECT room_id, max(seq) AS seq FROM d GROUP BY room_id), \
         moved AS (UPDATE rooms SET purged_through = GREATEST(rooms.purged_through, top.seq) \
         FROM top WHERE rooms.id = top.room_id) \
         SELECT count(*) AS deleted FROM d"
    );
    let mut deleted = 0;
    loop {
        let n = diesel::sql_query(sql.as_str())
            .bind::<Array<Text>, _>(names)
            .bind::<Integer, _>(i32::try_from(days).unwrap_or(i32::MAX))
            .bind::<BigInt, _>(PURGE_BATCH)
            .get_result::<Purged>(conn)?
            .deleted;
        deleted += usize::try_from(n).unwrap_or(0);
        if n < PURGE_BATCH {
            return Ok(deleted);
        }
    }
}

#[derive(QueryableByName)]
struct Purged {
    #[diesel(sql_type = BigInt)]
    deleted: i64,
}
