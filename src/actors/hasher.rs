//! The Hasher: a SyncArbiter pool of its own for bcrypt, apart from the DB executor, so a flood
//! of logins queues here instead of starving message stores. [`HasherHandle`] bounds the queue:
//! beyond it a request is refused at once with `rate_limited`.
//!
//! Messages:
//! - [`HashPassword`] (Session, register): a new bcrypt hash.
//! - [`VerifyPassword`] (Session, login): whether the password matches; with no hash (unknown
//!   user) it verifies against a decoy so both cases cost the same.

use actix::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::error::{AuthError, Error};
use crate::secret::Secret;

pub struct Hasher {
    cost: u32,
    decoy: Option<String>,
}

impl Actor for Hasher {
    type Context = SyncContext<Self>;
}

#[derive(Debug, Message)]
#[rtype(result = "Result<String, AuthError>")]
pub struct HashPassword {
    pub password: Secret,
}

impl Handler<HashPassword> for Hasher {
    type Result = Result<String, AuthError>;

    fn handle(&mut self, msg: HashPassword, _: &mut SyncContext<Self>) -> Self::Result {
        Ok(bcrypt::hash(msg.password.expose(), self.cost)?)
    }
}

#[derive(Debug, Message)]
#[rtype(result = "Result<bool, AuthError>")]
pub struct VerifyPassword {
    pub password: Secret,
    pub hash: Option<String>,
}

impl Handler<VerifyPassword> for Hasher {
    type Result = Result<bool, AuthError>;

    fn handle(&mut self, msg: VerifyPassword, _: &mut SyncContext<Self>) -> Self::Result {
        let hash = match msg.hash {
            Some(hash) => hash,
            None => {
                let decoy = match &self.decoy {
                    Some(decoy) => decoy.clone(),
                    None => {
                        let decoy = bcrypt::hash("rookery-decoy-password", self.cost)?;
                        self.decoy = Some(decoy.clone());
                        decoy
                    }
                };
                let _ = bcrypt::verify(msg.password.expose(), &decoy);
                return Ok(false);
            }
        };
        Ok(bcrypt::verify(msg.password.expose(), &hash).unwrap_or(false))
    }
}

/// The way to the hasher pool, with its queue bound.
#[derive(Clone)]
pub struct HasherHandle {
    addr: Addr<Hasher>,
    queued: Arc<AtomicUsize>,
    limit: usize,
}

/// Releases a queue slot when the request is done, whatever happens to it.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl HasherHandle {
    pub fn start(threads: usize, cost: u32, queue_limit: usize) -> Self {
        HasherHandle {
            addr: SyncArbiter::start(threads, move || Hasher { cost, decoy: None }),
            queued: Arc::new(AtomicUsize::new(0)),
            limit: queue_limit,
        }
    }

    fn slot(&self) -> Result<Slot, Error> {
        if self.queued.fetch_add(1, Ordering::SeqCst) >= self.limit {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(AuthError::HasherBusy.into());
        }
        Ok(Slot(self.queued.clone()))
    }

    pub async fn hash(&self, password: Secret) -> Result<String, Error> {
        let _slot = self.slot()?;
        Ok(self.addr.send(HashPassword { password }).await??)
    }

    pub async fn verify(&self, password: Secret, hash: Option<String>) -> Result<bool, Error> {
        let _slot = self.slot()?;
        Ok(self.addr.send(VerifyPassword { password, hash }).await??)
    }
}
