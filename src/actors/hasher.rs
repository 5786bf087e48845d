//! The Hasher: a SyncArbiter pool of its own for bcrypt, apart from the DB executor, so a flood
//! of logins queues here instead of starving message stores. [`HasherHandle`] bounds the queue:
//! beyond it a request is refused at once with `rate_limited`. A job holds its place in the
//! queue until a thread has finished it, even when the connection that asked is gone.
//! Registrations may use only half the threads and half the queue, so that a flood of them
//! leaves logins room: a login waits behind at most that half.
//!
//! Messages:
//! - [`HashPassword`] (Session, register): a new bcrypt hash.
//! - [`VerifyPassword`] (Session, login): whether the password matches; with no hash (unknown
//!   user) it verifies against a decoy so both cases cost the same.

use actix::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{AuthError, Error};
use crate::secret::Secret;

pub struct Hasher {
    cost: u32,
    decoy: Option<String>,
}

impl Actor for Hasher {
    type Context = SyncContext<Self>;
}

#[derive(Message)]
#[rtype(result = "Result<String, AuthError>")]
pub struct HashPassword {
    pub password: Secret,
    /// The registration's places, given back when the job is done.
    _held: (Slot, OwnedSemaphorePermit),
}

impl Handler<HashPassword> for Hasher {
    type Result = Result<String, AuthError>;

    fn handle(&mut self, msg: HashPassword, _: &mut SyncContext<Self>) -> Self::Result {
        Ok(bcrypt::hash(msg.password.expose(), self.cost)?)
    }
}

#[derive(Message)]
#[rtype(result = "Result<bool, AuthError>")]
pub struct VerifyPassword {
    pub password: Secret,
    pub hash: Option<String>,
    _held: Slot,
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

/// The way to the hasher pool, with its queue bounds.
#[derive(Clone)]
pub struct HasherHandle {
    addr: Addr<Hasher>,
    /// Password checks waiting or running.
    checks: Bound,
    /// Registrations waiting for a turn or running.
    registrations: Bound,
    /// Turns of the threads registrations may take at once.
    registration_turns: Arc<Semaphore>,
}

/// A count with a limit: [`Bound::take`] gives a [`Slot`] while under it.
#[derive(Clone)]
struct Bound {
    count: Arc<AtomicUsize>,
    limit: usize,
}

impl Bound {
    fn new(limit: usize) -> Self {
        Bound {
            count: Arc::new(AtomicUsize::new(0)),
            limit,
        }
    }

    fn take(&self) -> Result<Slot, Error> {
        if self.count.fetch_add(1, Ordering::SeqCst) >= self.limit {
            self.count.fetch_sub(1, Ordering::SeqCst);
            return Err(AuthError::HasherBusy.into());
        }
        Ok(Slot(self.count.clone()))
    }
}

/// A place in a [`Bound`], given back when dropped.
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
            checks: Bound::new(queue_limit),
            registrations: Bound::new((queue_limit / 2).max(1)),
            registration_turns: Arc::new(Semaphore::new((threads / 2).max(1))),
        }
    }

    pub async fn hash(&self, password: Secret) -> Result<String, Error> {
        let slot = self.registrations.take()?;
        let turn = self
            .registration_turns
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| AuthError::HasherBusy)?;
        let job = HashPassword {
            password,
            _held: (slot, turn),
        };
        Ok(self.addr.send(job).await??)
    }

    pub async fn verify(&self, password: Secret, hash: Option<String>) -> Result<bool, Error> {
        let job = VerifyPassword {
            password,
            hash,
            _held: self.checks.take()?,
        };
        Ok(self.addr.send(job).await??)
    }
}
