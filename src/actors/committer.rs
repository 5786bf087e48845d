//! The Committer: group commit across rooms. Rooms send it their batches (one in flight per
//! room); it forwards them to the DB executor at once while fewer than `max_in_flight`
//! transactions run, and otherwise gathers what arrives into one combined batch, sent when a
//! transaction finishes, when `max_messages` are gathered, or after `max_wait`. One combined
//! batch is one transaction, so under load the batches grow instead of the transactions.
//! Calls the DB executor ([`StoreBatches`]).
//!
//! Messages: [`StoreBatch`] (Room): replies when the transaction holding it has committed, or
//! `Unavailable` when it failed (then none of its messages was stored).

use actix::prelude::*;
use std::time::Duration;
use tokio::sync::oneshot;

use crate::actors::db::{StoreBatch, StoreBatches};
use crate::error::StoreError;
use crate::store::models::Outcome;

type BatchSender = oneshot::Sender<Result<Vec<Outcome>, StoreError>>;

pub struct Committer {
    db: Recipient<StoreBatches>,
    max_in_flight: usize,
    max_messages: usize,
    max_wait: Duration,
    gathered: Vec<(StoreBatch, BatchSender)>,
    gathered_messages: usize,
    in_flight: usize,
    timer: Option<SpawnHandle>,
}

impl Committer {
    pub fn new(
        db: Recipient<StoreBatches>,
        max_in_flight: usize,
        max_messages: usize,
        max_wait: Duration,
    ) -> Self {
        Committer {
            db,
            max_in_flight: max_in_flight.max(1),
            max_messages: max_messages.max(1),
            max_wait,
            gathered: Vec::new(),
            gathered_messages: 0,
            in_flight: 0,
            timer: None,
        }
    }

    fn flush(&mut self, ctx: &mut Context<Self>) {
        if let Some(timer) = self.timer.take() {
            ctx.cancel_future(timer);
        }
        if self.gathered.is_empty() {
            return;
        }
        let (batches, replies): (Vec<StoreBatch>, Vec<BatchSender>) =
            self.gathered.drain(..).unzip();
        self.gathered_messages = 0;
        self.in_flight += 1;
        let request = self.db.send(StoreBatches { batches });
        ctx.spawn(request.into_actor(self).map(move |result, committer, ctx| {
            committer.in_flight -= 1;
            match result {
                Ok(Ok(results)) if results.len() == replies.len() => {
                    for (reply, stored) in replies.into_iter().zip(results) {
                        let _ = reply.send(Ok(stored));
                    }
                }
                other => {
                    let why = match other {
                        Ok(Ok(results)) => {
                            format!("{} results for {} batches", results.len(), replies.len())
                        }
                        Ok(Err(e)) => e.to_string(),
                        Err(e) => e.to_string(),
                    };
                    for reply in replies {
                        let _ = reply.send(Err(StoreError::Unavailable(why.clone())));
                    }
                }
            }
            committer.maybe_flush(ctx);
        }));
    }

    /// Sends what is gathered when a transaction may start or enough has gathered; otherwise makes
    /// sure the wait is bounded.
    fn maybe_flush(&mut self, ctx: &mut Context<Self>) {
        if self.gathered.is_empty() {
            return;
        }
        if self.in_flight < self.max_in_flight || self.gathered_messages >= self.max_messages {
            self.flush(ctx);
        } else if self.timer.is_none() {
            self.timer = Some(ctx.run_later(self.max_wait, |committer, ctx| {
                committer.timer = None;
                committer.flush(ctx);
            }));
        }
    }
}

impl Actor for Committer {
    type Context = Context<Self>;
}

impl Handler<StoreBatch> for Committer {
    type Result = ResponseFuture<Result<Vec<Outcome>, StoreError>>;

    fn handle(&mut self, msg: StoreBatch, ctx: &mut Context<Self>) -> Self::Result {
        let (reply, answer) = oneshot::channel();
        self.gathered_messages += msg.posts.len();
        self.gathered.push((msg, reply));
        self.maybe_flush(ctx);
        Box::pin(async move {
            answer
                .await
                .unwrap_or_else(|_| Err(StoreError::Unavailable("the committer stopped".into())))
        })
    }
}
