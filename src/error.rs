//! Typed errors, one enum per area, and the one function, [`Error::to_wire`], that maps them to
//! protocol error codes with a message that is safe to show a client. Causes go to the log.
//! Imports only the protocol's codes and the crates whose errors it wraps.

use std::borrow::Cow;
use thiserror::Error;

use crate::protocol::{ErrorCode, Rejection};

/// Failures of the persistence layer (`store` and the `DbExecutor`).
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("{0} already exists")]
    Conflict(&'static str),
    #[error("unknown user '{0}'")]
    UnknownMember(String),
    #[error("the user owns {max} rooms already")]
    TooManyRooms { max: usize },
    #[error("the room has as many members as it may")]
    RoomFull,
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("too many database requests are waiting")]
    Busy,
    #[error("database error: {0}")]
    Database(#[from] diesel::result::Error),
    #[error("migration failed: {0}")]
    Migration(String),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

impl From<r2d2_error::PoolError> for StoreError {
    fn from(e: r2d2_error::PoolError) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// Re-exported so callers need not name diesel's r2d2 module.
pub mod r2d2_error {
    pub use diesel::r2d2::PoolError;
}

/// Failures sealing or opening message bodies, and loading keys.
#[derive(Debug, Error)]
pub enum CryptoError {
    #[error("no key with id {0}")]
    UnknownKey(i32),
    #[error("ciphertext failed to authenticate")]
    Authentication,
    #[error("openssl: {0}")]
    OpenSsl(#[from] openssl::error::ErrorStack),
    #[error("key {id}: {problem}")]
    BadKey { id: String, problem: String },
    #[error("unknown sealing format {0}")]
    UnknownFormat(i16),
    #[error(
        "the database holds messages sealed with key id(s) {ids:?}, which {file} does not have: \
         restore the key (a new key cannot open them)"
    )]
    MissingKeys { ids: Vec<i32>, file: String },
    #[error(
        "key {0} is not the key that sealed the stored messages with that id (its check value \
         differs): restore the original key"
    )]
    WrongKey(i32),
    #[error("key file {path}: {source}")]
    KeyFile {
        path: String,
        source: std::io::Error,
    },
}

/// Who a connection is, and who may try to be someone.
#[derive(Debug, Error)]
pub enum AuthError {
    #[error("authentication required")]
    Unauthenticated,
    #[error("this connection is already authenticated")]
    AlreadyAuthenticated,
    #[error("invalid credentials")]
    InvalidCredentials,
    #[error("token unknown, expired or revoked")]
    InvalidToken,
    #[error("too many failed logins")]
    TooManyFailures,
    #[error("too many failed resumes")]
    TooManyFailedResumes,
    #[error("too many registrations")]
    TooManyRegistrations,
    #[error("registration is closed")]
    RegistrationClosed,
    #[error("the account is disabled")]
    Disabled,
    #[error("the password hasher's queue is full")]
    HasherBusy,
    #[error("password hashing failed: {0}")]
    Hashing(#[from] bcrypt::BcryptError),
}

/// Refusals of the connection itself, before any other actor is asked.
#[derive(Debug, Error)]
pub enum SessionError {
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("over the request rate")]
    TooManyRequests,
    #[error("too many requests waiting")]
    TooManyWaiting,
    #[error("too many requests in flight before authentication")]
    TooManyAnonymous,
    #[error("over the user's send rate")]
    UserSendRate,
    #[error("over the user's typing rate")]
    UserTypingRate,
}

/// Why a room refused a request (`forbidden` on the wire, with this message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Forbidden {
    #[error("this private room is not open to you")]
    NotMember,
    #[error("join the room first")]
    NotJoined,
    #[error("the session to resume is gone")]
    SessionGone,
    #[error("this room is closed")]
    Closed,
    #[error("this room is read-only")]
    ReadOnly,
    #[error("room is full")]
    Full,
    #[error("only the room's owner or admins may do that")]
    NotManager,
    #[error("the user is listed in the policy file; an operator removes them there")]
    ListedInFile,
    #[error("nobody can be invited into or revoked from a direct room")]
    Direct,
    #[error("the room's owner cannot be revoked")]
    Owner,
    #[error("this connection has joined the most rooms it may")]
    TooManyJoined,
}

/// Refusals and failures of a Room actor.
#[derive(Debug, Error)]
pub enum RoomError {
    #[error("room not found")]
    NotFound,
    #[error("forbidden: {0}")]
    Forbidden(Forbidden),
    #[error("body is larger than this room's limit of {max} bytes")]
    TooLarge { max: usize },
    #[error("over this room's send rate")]
    RateLimited,
    #[error("a public room needs no invitation")]
    PublicRoom,
    #[error("the database refused this message")]
    Unstorable,
    #[error("the commit did not finish within the store timeout")]
    CommitTimeout,
    #[error("the message waited longer than the store timeout for its batch")]
    StoreBusy,
    #[error("the room actor is gone")]
    Gone,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The configuration could not be read or is invalid: every problem found, in order.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{}", list(.0))]
    Invalid(Vec<ConfigProblem>),
}

impl ConfigError {
    pub fn problems(&self) -> &[ConfigProblem] {
        match self {
            ConfigError::Invalid(problems) => problems,
        }
    }
}

fn list(problems: &[ConfigProblem]) -> String {
    let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
    lines.join("; ")
}

/// One problem of the configuration: the setting (dotted key), what is wrong, and where its
/// value was set ("FILE:LINE:COL", or an environment variable), when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub key: String,
    pub problem: String,
    pub origin: Option<String>,
}

impl ConfigProblem {
    pub fn new(key: &str, problem: impl Into<String>) -> Self {
        ConfigProblem {
            key: key.to_string(),
            problem: problem.into(),
            origin: None,
        }
    }
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.origin, self.key.is_empty()) {
            (Some(origin), true) => write!(f, "{origin}: {}", self.problem),
            (Some(origin), false) => write!(f, "{origin}: {}: {}", self.key, self.problem),
            (None, true) => f.write_str(&self.problem),
            (None, false) => write!(f, "{}: {}", self.key, self.problem),
        }
    }
}

/// Errors that stop the server from starting or a CLI command from completing.
#[derive(Debug, Error)]
pub enum StartError {
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error("keys: {0}")]
    Crypto(#[from] CryptoError),
    #[error("tls: {0}")]
    Tls(String),
    #[error(
        "Postgres has synchronous_commit = {0}: an ack promises the message is durable, so \
         Rookery needs it 'on' (or 'remote_apply'); set it in postgresql.conf or with ALTER \
         DATABASE ... SET synchronous_commit = on"
    )]
    NotDurable(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// What the operator commands (`rookery user …`, `rookery verify`) fail with.
#[derive(Debug, Error)]
pub enum OperatorError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("no user named '{0}'")]
    UnknownUser(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the database has {0} pending migration(s): run `rookery migrate` first")]
    PendingMigrations(usize),
    #[error("{0} problem(s) found")]
    Damaged(usize),
}

impl From<StoreError> for OperatorError {
    fn from(e: StoreError) -> Self {
        OperatorError::Start(e.into())
    }
}

impl From<std::io::Error> for OperatorError {
    fn from(e: std::io::Error) -> Self {
        OperatorError::Start(e.into())
    }
}

/// Everything a request can fail with.
#[derive(Debug, Error)]
pub enum Error {
    #[error("{}", .0.message)]
    Invalid(Rejection),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Room(#[from] RoomError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("an actor mailbox failed: {0}")]
    Mailbox(#[from] actix::MailboxError),
}

impl From<Rejection> for Error {
    fn from(r: Rejection) -> Self {
        Error::Invalid(r)
    }
}

impl Error {
    /// The one mapping from internal errors to the contract's codes. Internal causes are
    /// replaced by a generic message; the caller logs `self` for the operator.
    pub fn to_wire(&self) -> (ErrorCode, Cow<'static, str>) {
        match self {
            Error::Invalid(r) => (r.code, Cow::Owned(r.message.clone())),
            Error::Auth(e) => auth_to_wire(e),
            Error::Session(e) => session_to_wire(e),
            Error::Room(e) => room_to_wire(e),
            Error::Store(e) => store_to_wire(e),
            Error::Mailbox(_) => (ErrorCode::Unavailable, "try again".into()),
        }
    }

    /// Whether the operator should hear about this error (it is not the client's doing).
    pub fn is_server_fault(&self) -> bool {
        matches!(
            self.to_wire().0,
            ErrorCode::Internal | ErrorCode::Unavailable
        )
    }
}

fn auth_to_wire(e: &AuthError) -> (ErrorCode, Cow<'static, str>) {
    let (code, message) = match e {
        AuthError::Unauthenticated => (ErrorCode::Unauthorized, "log in or resume first"),
        AuthError::AlreadyAuthenticated => (
            ErrorCode::BadRequest,
            "this connection is already authenticated",
        ),
        AuthError::InvalidCredentials => {
            (ErrorCode::InvalidCredentials, "wrong username or password")
        }
        AuthError::InvalidToken => (ErrorCode::Unauthorized, "token unknown, expired or revoked"),
        AuthError::TooManyFailures => (
            ErrorCode::RateLimited,
            "too many failed logins; wait and retry",
        ),
        AuthError::TooManyFailedResumes => (
            ErrorCode::RateLimited,
            "too many failed resumes from this address; wait and retry",
        ),
        AuthError::TooManyRegistrations => (
            ErrorCode::RateLimited,
            "too many registrations or failed logins from this address; wait and retry",
        ),
        AuthError::RegistrationClosed => (
            ErrorCode::Forbidden,
            "registration is closed on this server; ask its operator for an account",
        ),
        AuthError::Disabled => (ErrorCode::Forbidden, "this account is disabled"),
        AuthError::HasherBusy => (
            ErrorCode::RateLimited,
            "too many password checks in progress; retry shortly",
        ),
        AuthError::Hashing(_) => (ErrorCode::Internal, "internal error"),
    };
    (code, message.into())
}

fn session_to_wire(e: &SessionError) -> (ErrorCode, Cow<'static, str>) {
    let (code, message) = match e {
        SessionError::ShuttingDown => (ErrorCode::Unavailable, "the server is shutting down"),
        SessionError::TooManyRequests => (ErrorCode::RateLimited, "too many requests; slow down"),
        SessionError::TooManyWaiting => (
            ErrorCode::RateLimited,
            "too many requests waiting; slow down",
        ),
        SessionError::TooManyAnonymous => (
            ErrorCode::RateLimited,
            "authenticate first: only a few requests may be in flight before that",
        ),
        SessionError::UserSendRate => (
            ErrorCode::RateLimited,
            "too many messages from this user across its connections; slow down",
        ),
        SessionError::UserTypingRate => (
            ErrorCode::RateLimited,
            "too many typing notices from this user; slow down",
        ),
    };
    (code, message.into())
}

fn room_to_wire(e: &RoomError) -> (ErrorCode, Cow<'static, str>) {
    let (code, message) = match e {
        RoomError::NotFound => (ErrorCode::NotFound, "no such room"),
        RoomError::Forbidden(why) => return (ErrorCode::Forbidden, why.to_string().into()),
        RoomError::CommitTimeout | RoomError::StoreBusy => (
            ErrorCode::Unavailable,
            "the database is unavailable; try again",
        ),
        RoomError::Gone => (ErrorCode::Unavailable, "try again"),
        RoomError::RateLimited => (
            ErrorCode::RateLimited,
            "too many messages in this room; slow down",
        ),
        RoomError::PublicRoom => (ErrorCode::BadRequest, "a public room needs no invitation"),
        RoomError::Unstorable => (ErrorCode::BadRequest, "this message cannot be stored"),
        RoomError::TooLarge { .. } => return (ErrorCode::TooLarge, e.to_string().into()),
        RoomError::Store(e) => return store_to_wire(e),
    };
    (code, message.into())
}

fn store_to_wire(e: &StoreError) -> (ErrorCode, Cow<'static, str>) {
    let unavailable = || {
        (
            ErrorCode::Unavailable,
            "the database is unavailable; try again".into(),
        )
    };
    match e {
        StoreError::NotFound | StoreError::Database(diesel::result::Error::NotFound) => {
            (ErrorCode::NotFound, "not found".into())
        }
        StoreError::Conflict(what) => {
            (ErrorCode::Conflict, format!("{what} already exists").into())
        }
        StoreError::UnknownMember(name) => {
            (ErrorCode::NotFound, format!("unknown user '{name}'").into())
        }
        StoreError::RoomFull => (ErrorCode::Forbidden, Forbidden::Full.to_string().into()),
        StoreError::TooManyRooms { max } => (
            ErrorCode::Forbidden,
            format!("you may create at most {max} rooms").into(),
        ),
        StoreError::Unavailable(_) => unavailable(),
        StoreError::Busy => (
            ErrorCode::RateLimited,
            "the server is busy; try again shortly".into(),
        ),
        StoreError::Database(diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::ClosedConnection
            | diesel::result::DatabaseErrorKind::UnableToSendCommand,
            _,
        )) => unavailable(),
        StoreError::Database(_) | StoreError::Migration(_) | StoreError::Crypto(_) => {
            (ErrorCode::Internal, "internal error".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_causes_are_not_shown() {
        let e = Error::Store(StoreError::Migration("password=secret".into()));
        assert_eq!(e.to_wire(), (ErrorCode::Internal, "internal error".into()));
        let e = Error::Store(StoreError::Unavailable("conn refused".into()));
        assert_eq!(e.to_wire().0, ErrorCode::Unavailable);
        assert!(e.is_server_fault());
    }

    #[test]
    fn client_faults_keep_their_codes() {
        assert_eq!(
            Error::Room(RoomError::TooLarge { max: 10 }).to_wire().0,
            ErrorCode::TooLarge
        );
        assert_eq!(
            Error::Store(StoreError::UnknownMember("zed".into())).to_wire(),
            (ErrorCode::NotFound, "unknown user 'zed'".into())
        );
        assert!(!Error::Auth(AuthError::Unauthenticated).is_server_fault());
    }

    #[test]
    fn timeouts_and_limits_have_their_codes() {
        assert_eq!(
            Error::Room(RoomError::CommitTimeout).to_wire().0,
            ErrorCode::Unavailable
        );
        assert_eq!(
            Error::Session(SessionError::TooManyWaiting).to_wire().0,
            ErrorCode::RateLimited
        );
        assert_eq!(
            Error::Auth(AuthError::InvalidCredentials).to_wire(),
            (
                ErrorCode::InvalidCredentials,
                "wrong username or password".into()
            )
        );
    }
}
