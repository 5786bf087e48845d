//! The DB-executor pool: a SyncArbiter of threads, each running `store` functions on a pooled
//! Postgres connection. AES runs here too, never on an async worker (bcrypt has its own pool).
//!
//! Messages (each replies `Result<_, StoreError>`; a pool timeout is `StoreError::Unavailable`):
//! - [`CreateUser`] (Session, register): insert the user with its bcrypt hash.
//! - [`FindLogin`], [`IssueToken`] (Session, login): the hash to verify; a new token after.
//! - [`ResumeToken`] (Session, resume): the user holding a live token.
//! - [`RevokeToken`] (Session, logout); [`RevokedSince`] (Directory: revocations made elsewhere).
//! - [`ListRooms`], [`CreateRoom`] (Directory, for a session), [`OpenDirect`] (Session, `dm`).
//! - [`LoadRoom`] (Directory): a room's record, whitelist and newest messages.
//! - [`ChangeMember`] (Room, invite and revoke), [`ReserveSeqs`] (Room, when it does not store
//!   its messages).
//! - [`SyncConfigRooms`] (server, at start and on reload), [`PurgeExpired`] (Directory).
//! - [`StoreBatch`] (Room, in tests): assign seqs and commit; the reply means "durably stored".
//! - [`StoreBatches`] (Committer): several rooms' batches in one transaction.
//! - [`LoadHistory`] (Room): a page of decrypted history.
//!
//! Two lanes, so that reads never delay commits: the commit lane's threads run only
//! [`StoreBatches`] and [`ReserveSeqs`] (the Committer and rooms send there directly); every
//! other request reaches the read lane's threads through a [`DbQueue`], which holds at most
//! `database.max_queued` of them and answers the rest [`StoreError::Busy`] at once.

use actix::prelude::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::crypto::Keyring;
use crate::error::StoreError;
use crate::ids::{RoomId, Seq, UserId};
use crate::metrics::METRICS;
use crate::protocol::{RoomKind, RoomName, Username};
use crate::secret::Secret;
use crate::store::models::*;
use crate::store::{self, NewPost, PgPool};

/// Hash of a session token as stored; the token itself exists only on the client.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TokenHash(pub [u8; 32]);

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenHash(..)")
    }
}

pub fn hash_token(token: &str) -> TokenHash {
    TokenHash(openssl::sha::sha256(token.as_bytes()))
}

/// Settings the executor threads share.
#[derive(Debug, Clone)]
pub struct DbSettings {
    pub token_ttl: Duration,
    pub max_listed_rooms: usize,
}

pub struct DbExecutor {
    pool: PgPool,
    keys: Arc<Keyring>,
    settings: DbSettings,
    /// Rows already reported as unreadable by this thread, so each is logged once.
    reported: HashSet<(i64, i64)>,
}

impl DbExecutor {
    pub fn new(pool: PgPool, keys: Arc<Keyring>, settings: DbSettings) -> Self {
        DbExecutor {
            pool,
            keys,
            settings,
            reported: HashSet::new(),
        }
    }

    /// Starts `threads` executors sharing `pool`.
    pub fn start(
        threads: usize,
        pool: PgPool,
        keys: Arc<Keyring>,
        settings: DbSettings,
    ) -> Addr<DbExecutor> {
        SyncArbiter::start(threads, move || {
            DbExecutor::new(pool.clone(), keys.clone(), settings.clone())
        })
    }

    fn conn(&self) -> Result<store::PooledConn, StoreError> {
        Ok(self.pool.get()?)
    }

    fn report_unreadable(&mut self, room: &RoomRecord, page: &HistoryPage) {
        for (seq, why) in &page.unreadable {
            if self.reported.len() > 100_000 {
                self.reported.clear();
            }
            if self.reported.insert((room.id.0, seq.0)) {
                log::error!(
                    "room {} seq {seq}: stored message cannot be opened: {why}",
                    room.name
                );
            }
        }
    }
}

impl Actor for DbExecutor {
    type Context = SyncContext<Self>;
}

/// The read lane's front: forwards each request to the executors while fewer than `limit`
/// are queued or running there, and sheds the rest with [`StoreError::Busy`], so that a flood
/// of reads gets fast refusals instead of a queue that grows without bound.
pub struct DbQueue {
    executors: Addr<DbExecutor>,
    queued: usize,
    limit: usize,
}

impl DbQueue {
    pub fn new(executors: Addr<DbExecutor>, limit: usize) -> Self {
        DbQueue {
            executors,
            queued: 0,
            limit: limit.max(1),
        }
    }
}

impl Actor for DbQueue {
    type Context = Context<Self>;
}

impl<M, T> Handler<M> for DbQueue
where
    M: Message<Result = Result<T, StoreError>> + Send + 'static,
    T: Send + 'static,
    DbExecutor: Handler<M>,
{
    type Result = ResponseActFuture<Self, Result<T, StoreError>>;

    fn handle(&mut self, msg: M, _: &mut Context<Self>) -> Self::Result {
        if self.queued >= self.limit {
            return Box::pin(fut::ready(Err(StoreError::Busy)));
        }
        self.queued += 1;
        METRICS.db_queue_depth.inc();
        let request = self.executors.send(msg);
        Box::pin(request.into_actor(self).map(|result, queue, _| {
            queue.queued -= 1;
            METRICS.db_queue_depth.dec();
            result.unwrap_or_else(|e| Err(StoreError::Unavailable(e.to_string())))
        }))
    }
}

/// Session → DbExecutor: register with a hash from the Hasher. `Conflict` if the name is taken.
#[derive(Debug, Message)]
#[rtype(result = "Result<UserRecord, StoreError>")]
pub struct CreateUser {
    pub username: Username,
    pub password_hash: String,
}

impl Handler<CreateUser> for DbExecutor {
    type Result = Result<UserRecord, StoreError>;

    fn handle(&mut self, msg: CreateUser, _: &mut Self::Context) -> Self::Result {
        store::create_user(
            &mut *self.conn()?,
            msg.username.as_str(),
            &msg.password_hash,
        )
    }
}

/// Session → DbExecutor: login, step one. The user and its password hash, if it exists.
#[derive(Debug, Message)]
#[rtype(result = "Result<Option<Login>, StoreError>")]
pub struct FindLogin {
    pub username: Username,
}

impl Handler<FindLogin> for DbExecutor {
    type Result = Result<Option<Login>, StoreError>;

    fn handle(&mut self, msg: FindLogin, _: &mut Self::Context) -> Self::Result {
        store::find_login(&mut *self.conn()?, msg.username.as_str())
    }
}

/// A token issued by login: the plaintext for the client, the hash for the session.
#[derive(Debug)]
pub struct IssuedToken {
    pub token: Secret,
    pub hash: TokenHash,
    pub expires_at: DateTime<Utc>,
}

/// Session → DbExecutor: login, last step, after the password was verified: a new token.
#[derive(Debug, Message)]
#[rtype(result = "Result<IssuedToken, StoreError>")]
pub struct IssueToken {
    pub user: UserId,
}

impl Handler<IssueToken> for DbExecutor {
    type Result = Result<IssuedToken, StoreError>;

    fn handle(&mut self, msg: IssueToken, _: &mut Self::Context) -> Self::Result {
        let mut raw = [0u8; 32];
        openssl::rand::rand_bytes(&mut raw).map_err(crate::error::CryptoError::from)?;
        let token = URL_SAFE_NO_PAD.encode(raw);
        let hash = hash_token(&token);
        let expires_at = store::insert_token(
            &mut *self.conn()?,
            msg.user,
            &hash.0,
            self.settings.token_ttl,
        )?;
        Ok(IssuedToken {
            token: Secret::new(token),
            hash,
            expires_at,
        })
    }
}

/// Session → DbExecutor: resume. Replies the token's user and when the token expires; None
/// when the token is unknown, expired or revoked.
#[derive(Debug, Message)]
#[rtype(result = "Result<Option<(UserRecord, DateTime<Utc>)>, StoreError>")]
pub struct ResumeToken {
    pub hash: TokenHash,
}

impl Handler<ResumeToken> for DbExecutor {
    type Result = Result<Option<(UserRecord, DateTime<Utc>)>, StoreError>;

    fn handle(&mut self, msg: ResumeToken, _: &mut Self::Context) -> Self::Result {
        store::user_by_token(&mut *self.conn()?, &msg.hash.0)
    }
}

/// Session → DbExecutor: logout. The token no longer resumes.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), StoreError>")]
pub struct RevokeToken {
    pub hash: TokenHash,
}

impl Handler<RevokeToken> for DbExecutor {
    type Result = Result<(), StoreError>;

    fn handle(&mut self, msg: RevokeToken, _: &mut Self::Context) -> Self::Result {
        store::revoke_token(&mut *self.conn()?, &msg.hash.0)
    }
}

/// Directory → DbExecutor: the tokens revoked at or after `since` (by an operator command, or
/// a logout on another node), and the database's clock now; `since: None` asks only the clock.
#[derive(Debug, Message)]
#[rtype(result = "Result<(Vec<TokenHash>, DateTime<Utc>), StoreError>")]
pub struct RevokedSince {
    pub since: Option<DateTime<Utc>>,
}

impl Handler<RevokedSince> for DbExecutor {
    type Result = Result<(Vec<TokenHash>, DateTime<Utc>), StoreError>;

    fn handle(&mut self, msg: RevokedSince, _: &mut Self::Context) -> Self::Result {
        let (hashes, clock) = store::operator::revoked_since(&mut *self.conn()?, msg.since)?;
        let hashes = hashes
            .into_iter()
            .filter_map(|h| <[u8; 32]>::try_from(h.as_slice()).ok().map(TokenHash))
            .collect();
        Ok((hashes, clock))
    }
}

/// Directory → DbExecutor: the rooms `user` may see; `whitelisted` names the policy file's
/// private rooms that list the user.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<RoomSummary>, StoreError>")]
pub struct ListRooms {
    pub user: UserId,
    pub whitelisted: Vec<String>,
}

impl Handler<ListRooms> for DbExecutor {
    type Result = Result<Vec<RoomSummary>, StoreError>;

    fn handle(&mut self, msg: ListRooms, _: &mut Self::Context) -> Self::Result {
        store::list_rooms(
            &mut *self.conn()?,
            msg.user,
            &msg.whitelisted,
            self.settings.max_listed_rooms,
        )
    }
}

/// Session → DbExecutor: create_room. `Conflict` if the name exists, `UnknownMember` if a member does not.
#[derive(Debug, Message)]
#[rtype(result = "Result<RoomRecord, StoreError>")]
pub struct CreateRoom {
    pub name: RoomName,
    pub kind: RoomKind,
    pub owner: UserRecord,
    pub members: Vec<Username>,
    /// Rooms the owner may own at most (`users.max_created_rooms`).
    pub max_owned: usize,
}

impl Handler<CreateRoom> for DbExecutor {
    type Result = Result<RoomRecord, StoreError>;

    fn handle(&mut self, msg: CreateRoom, _: &mut Self::Context) -> Self::Result {
        let members: Vec<String> = msg.members.into_iter().map(String::from).collect();
        store::create_room(
            &mut *self.conn()?,
            msg.name.as_str(),
            msg.kind,
            &msg.owner,
            &members,
            msg.max_owned,
        )
    }
}

/// Directory → DbExecutor: what a Room actor starts from. `NotFound` if there is no such room.
#[derive(Debug, Message)]
#[rtype(result = "Result<RoomState, StoreError>")]
pub struct LoadRoom {
    pub name: String,
    pub recent: usize,
}

impl Handler<LoadRoom> for DbExecutor {
    type Result = Result<RoomState, StoreError>;

    fn handle(&mut self, msg: LoadRoom, _: &mut Self::Context) -> Self::Result {
        let state = store::load_room(&mut *self.conn()?, &self.keys, &msg.name, msg.recent)?;
        Ok(state)
    }
}

/// Room → DbExecutor: store a batch of one room's messages in one transaction, in order.
/// `Ok` means all are committed (one `Stored` per message, in order); `Err` means none is.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Vec<Outcome>, StoreError>")]
pub struct StoreBatch {
    pub room: RoomId,
    pub posts: Vec<NewPost>,
}

impl Handler<StoreBatch> for DbExecutor {
    type Result = Result<Vec<Outcome>, StoreError>;

    fn handle(&mut self, msg: StoreBatch, _: &mut Self::Context) -> Self::Result {
        store::store_batch(&mut *self.conn()?, &self.keys, msg.room, &msg.posts)
    }
}

/// How a room's members change.
#[derive(Debug, Clone, Copy)]
pub enum MemberChange {
    /// Invite, unless the room has `cap` members already.
    Add {
        cap: usize,
    },
    Remove,
}

/// Room → DbExecutor: `invite` / `revoke`. Replies the user; `UnknownMember` if none.
#[derive(Debug, Message)]
#[rtype(result = "Result<UserRecord, StoreError>")]
pub struct ChangeMember {
    pub room: RoomId,
    pub user: Username,
    pub change: MemberChange,
}

impl Handler<ChangeMember> for DbExecutor {
    type Result = Result<UserRecord, StoreError>;

    fn handle(&mut self, msg: ChangeMember, _: &mut Self::Context) -> Self::Result {
        let conn = &mut *self.conn()?;
        match msg.change {
            MemberChange::Add { cap } => store::add_member(conn, msg.room, msg.user.as_str(), cap),
            MemberChange::Remove => store::remove_member(conn, msg.room, msg.user.as_str()),
        }
    }
}

/// Room → DbExecutor: a room that does not store its messages reserves `count` seqs. Replies
/// the last of them.
#[derive(Debug, Message)]
#[rtype(result = "Result<Seq, StoreError>")]
pub struct ReserveSeqs {
    pub room: RoomId,
    pub count: i64,
}

impl Handler<ReserveSeqs> for DbExecutor {
    type Result = Result<Seq, StoreError>;

    fn handle(&mut self, msg: ReserveSeqs, _: &mut Self::Context) -> Self::Result {
        store::reserve_seqs(&mut *self.conn()?, msg.room, msg.count)
    }
}

/// Session → DbExecutor: `dm`: the direct room of `me` and `other`, created on first use.
#[derive(Debug, Message)]
#[rtype(result = "Result<RoomRecord, StoreError>")]
pub struct OpenDirect {
    pub me: UserRecord,
    pub other: Username,
}

impl Handler<OpenDirect> for DbExecutor {
    type Result = Result<RoomRecord, StoreError>;

    fn handle(&mut self, msg: OpenDirect, _: &mut Self::Context) -> Self::Result {
        store::open_direct(&mut *self.conn()?, &msg.me, msg.other.as_str())
    }
}

/// Server (at start and on reload) → DbExecutor: the policy file's rooms exist and are open;
/// the ones it no longer defines are closed. Replies the names closed now.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<String>, StoreError>")]
pub struct SyncConfigRooms {
    pub rooms: Vec<(String, RoomKind)>,
}

impl Handler<SyncConfigRooms> for DbExecutor {
    type Result = Result<Vec<String>, StoreError>;

    fn handle(&mut self, msg: SyncConfigRooms, _: &mut Self::Context) -> Self::Result {
        store::sync_config_rooms(&mut *self.conn()?, &msg.rooms)
    }
}

/// Directory (periodically) → DbExecutor: delete messages past their room's retention.
/// Replies the number deleted.
#[derive(Debug, Message)]
#[rtype(result = "Result<usize, StoreError>")]
pub struct PurgeExpired {
    /// Days per room the policy file defines (0: kept for ever).
    pub rules: Vec<(String, u32)>,
    /// Days for every other room.
    pub default_days: u32,
}

impl Handler<PurgeExpired> for DbExecutor {
    type Result = Result<usize, StoreError>;

    fn handle(&mut self, msg: PurgeExpired, _: &mut Self::Context) -> Self::Result {
        store::purge_expired(&mut *self.conn()?, &msg.rules, msg.default_days)
    }
}

/// Committer → DbExecutor: several rooms' batches in one transaction (group commit). `Ok`
/// holds each batch's results, in order; `Err` means nothing was stored.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<Vec<Outcome>>, StoreError>")]
pub struct StoreBatches {
    pub batches: Vec<StoreBatch>,
}

impl Handler<StoreBatches> for DbExecutor {
    type Result = Result<Vec<Vec<Outcome>>, StoreError>;

    fn handle(&mut self, msg: StoreBatches, _: &mut Self::Context) -> Self::Result {
        let batches: Vec<(RoomId, &[NewPost])> = msg
            .batches
            .iter()
            .map(|b| (b.room, b.posts.as_slice()))
            .collect();
        let messages: usize = batches.iter().map(|b| b.1.len()).sum();
        let started = std::time::Instant::now();
        let stored = store::store_batches(&mut *self.conn()?, &self.keys, &batches)?;
        METRICS
            .store_seconds
            .observe(started.elapsed().as_secs_f64());
        METRICS.commit_batch_messages.observe(messages as f64);
        METRICS.messages_stored.inc_by(messages as u64);
        Ok(stored)
    }
}

/// Room → DbExecutor: a page of history, seq < `before`, ascending.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<HistoryPage, StoreError>")]
pub struct LoadHistory {
    pub room: RoomRecord,
    pub before: Option<Seq>,
    pub limit: usize,
}

impl Handler<LoadHistory> for DbExecutor {
    type Result = Result<HistoryPage, StoreError>;

    fn handle(&mut self, msg: LoadHistory, _: &mut Self::Context) -> Self::Result {
        let page = store::load_messages(
            &mut *self.conn()?,
            &self.keys,
            &msg.room,
            msg.before,
            msg.limit,
        )?;
        self.report_unreadable(&msg.room, &page);
        Ok(page)
    }
}
