//! Typed errors of each area and the one function, [`Error::to_wire`], that maps them to
//! protocol error codes with a message that is safe to show a client. Causes go to the log.

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
    #[error("invalid credentials")]
    InvalidCredentials,
    #[error("token unknown, expired or revoked")]
    InvalidToken,
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Database(#[from] diesel::result::Error),
    #[error("migration failed: {0}")]
    Migration(String),
    #[error("password hashing failed: {0}")]
    Hash(#[from] bcrypt::BcryptError),
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
    #[error("key file {path}: {source}")]
    KeyFile {
        path: String,
        source: std::io::Error,
    },
}

/// Refusals and failures of a Room actor.
#[derive(Debug, Error)]
pub enum RoomError {
    #[error("room not found")]
    NotFound,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("body is larger than this room's limit of {max} bytes")]
    TooLarge { max: usize },
    #[error("the room actor is gone")]
    Gone,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Failures reading or validating the configuration. `key` names the setting.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{0}")]
    Load(String),
    #[error("{key}: {problem}")]
    Invalid { key: String, problem: String },
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
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Everything a request can fail with.
#[derive(Debug, Error)]
pub enum Error {
    #[error("{}", .0.message)]
    Rejected(Rejection),
    #[error("authentication required")]
    Unauthenticated,
    #[error(transparent)]
    Room(#[from] RoomError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("an actor mailbox failed: {0}")]
    Mailbox(#[from] actix::MailboxError),
}

impl From<Rejection> for Error {
    fn from(r: Rejection) -> Self {
        Error::Rejected(r)
    }
}

impl Error {
    /// The one mapping from internal errors to the contract's codes. Internal causes are
    /// replaced by a generic message; the caller logs `self` for the operator.
    pub fn to_wire(&self) -> (ErrorCode, String) {
        match self {
            Error::Rejected(r) => (r.code, r.message.clone()),
            Error::Unauthenticated => (ErrorCode::Unauthorized, "log in or resume first".into()),
            Error::Room(RoomError::NotFound) => (ErrorCode::NotFound, "no such room".into()),
            Error::Room(RoomError::Forbidden(why)) => (ErrorCode::Forbidden, (*why).into()),
            Error::Room(e @ RoomError::TooLarge { .. }) => (ErrorCode::TooLarge, e.to_string()),
            Error::Room(RoomError::Gone) | Error::Mailbox(_) => {
                (ErrorCode::Unavailable, "try again".into())
            }
            Error::Room(RoomError::Store(e)) | Error::Store(e) => store_to_wire(e),
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

fn store_to_wire(e: &StoreError) -> (ErrorCode, String) {
    match e {
        StoreError::NotFound => (ErrorCode::NotFound, "not found".into()),
        StoreError::Conflict(what) => (ErrorCode::Conflict, format!("{what} already exists")),
        StoreError::UnknownMember(name) => (ErrorCode::NotFound, format!("unknown user '{name}'")),
        StoreError::InvalidCredentials => (
            ErrorCode::InvalidCredentials,
            "wrong username or password".into(),
        ),
        StoreError::InvalidToken => (
            ErrorCode::Unauthorized,
            "token unknown, expired or revoked".into(),
        ),
        StoreError::Unavailable(_) => (
            ErrorCode::Unavailable,
            "the database is unavailable; try again".into(),
        ),
        StoreError::Database(diesel::result::Error::NotFound) => {
            (ErrorCode::NotFound, "not found".into())
        }
        StoreError::Database(diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::ClosedConnection
            | diesel::result::DatabaseErrorKind::UnableToSendCommand,
            _,
        )) => (
            ErrorCode::Unavailable,
            "the database is unavailable; try again".into(),
        ),
        StoreError::Database(_)
        | StoreError::Migration(_)
        | StoreError::Hash(_)
        | StoreError::Crypto(_) => (ErrorCode::Internal, "internal error".into()),
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
        assert!(!Error::Unauthenticated.is_server_fault());
    }
}
