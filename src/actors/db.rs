//! The DB-executor pool: a SyncArbiter of threads, each running `store` functions on a pooled
//! Postgres connection. AES runs here too, never on an async worker (bcrypt has its own pool).
//!
//! Messages (each replies `Result<_, StoreError>`; a pool timeout is `StoreError::Unavailable`):
//! - [`CreateUser`] (Session, register): insert the user with its bcrypt hash.
//! - [`FindLogin`], [`IssueToken`] (Session, login): the hash to verify; a new token after.
//! - [`ResumeToken`] (Session, resume): the user holding a live token.
//! - [`RevokeToken`] (Session, logout).
//! - [`ListRooms`], [`CreateRoom`] (Session).
//! - [`LoadRoom`] (Directory): a room's record, whitelist and newest messages.
//! - [`StoreBatch`] (Room, in tests): assign seqs and commit; the reply means "durably stored".
//! - [`StoreBatches`] (Committer): several rooms' batches in one transaction.
//! - [`LoadHistory`] (Room): a page of decrypted history.

use actix::prelude::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::crypto::Keyring;
use crate::error::StoreError;
use crate::ids::{RoomId, Seq, UserId};
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
#[rtype(result = "Result<Option<(UserRecord, String)>, StoreError>")]
pub struct FindLogin {
    pub username: Username,
}

impl Handler<FindLogin> for DbExecutor {
    type Result = Result<Option<(UserRecord, String)>, StoreError>;

    fn handle(&mut self, msg: FindLogin, _: &mut Self::Context) -> Self::Result {
        store::find_login(&mut *self.conn()?, msg.username.as_str())
    }
}

/// A token issued by login: the plaintext for the client, the hash for the session.
#[derive(Debug)]
pub struct IssuedToken {
    pub token: Secret,
    pub hash: TokenHash,
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
        store::insert_token(
            &mut *self.conn()?,
            msg.user,
            &hash.0,
            self.settings.token_ttl,
        )?;
        Ok(IssuedToken {
            token: Secret::new(token),
            hash,
        })
    }
}

/// Session → DbExecutor: resume. Replies the token's user; None when the token is unknown,
/// expired or revoked.
#[derive(Debug, Message)]
#[rtype(result = "Result<Option<UserRecord>, StoreError>")]
pub struct ResumeToken {
    pub hash: TokenHash,
}

impl Handler<ResumeToken> for DbExecutor {
    type Result = Result<Option<UserRecord>, StoreError>;

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

/// Session → DbExecutor: the rooms `user` may see.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<RoomSummary>, StoreError>")]
pub struct ListRooms {
    pub user: UserId,
}

impl Handler<ListRooms> for DbExecutor {
    type Result = Result<Vec<RoomSummary>, StoreError>;

    fn handle(&mut self, msg: ListRooms, _: &mut Self::Context) -> Self::Result {
        store::list_rooms(&mut *self.conn()?, msg.user, self.settings.max_listed_rooms)
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
#[rtype(result = "Result<Vec<Stored>, StoreError>")]
pub struct StoreBatch {
    pub room: RoomId,
    pub posts: Vec<NewPost>,
}

impl Handler<StoreBatch> for DbExecutor {
    type Result = Result<Vec<Stored>, StoreError>;

    fn handle(&mut self, msg: StoreBatch, _: &mut Self::Context) -> Self::Result {
        store::store_batch(&mut *self.conn()?, &self.keys, msg.room, &msg.posts)
    }
}

/// Committer → DbExecutor: several rooms' batches in one transaction (group commit). `Ok`
/// holds each batch's results, in order; `Err` means nothing was stored.
#[derive(Debug, Message)]
#[rtype(result = "Result<Vec<Vec<Stored>>, StoreError>")]
pub struct StoreBatches {
    pub batches: Vec<StoreBatch>,
}

impl Handler<StoreBatches> for DbExecutor {
    type Result = Result<Vec<Vec<Stored>>, StoreError>;

    fn handle(&mut self, msg: StoreBatches, _: &mut Self::Context) -> Self::Result {
        let batches: Vec<(RoomId, &[NewPost])> = msg
            .batches
            .iter()
            .map(|b| (b.room, b.posts.as_slice()))
            .collect();
        store::store_batches(&mut *self.conn()?, &self.keys, &batches)
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
