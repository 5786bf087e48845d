//! Requests that say who the connection is: `register`, `login`, `resume`, `logout`. Each
//! starts its round trips (gate, hasher, DB executor, directory, rooms) and returns a
//! [`Step`]; the session changes only when their answers are back.

use actix::prelude::*;
use chrono::{DateTime, Utc};

use super::phase::Identity;
use super::requests::{Answer, Step, Then};
use super::rooms::ask_room;
use super::shell::Session;
use super::socket::WsContext;
use super::Services;
use crate::actors::db::{
    hash_token, CreateUser, FindLogin, IssueToken, IssuedToken, ResumeToken, RevokeToken, TokenHash,
};
use crate::actors::directory::{Directory, Parked, Reclaim, Revoked};
use crate::actors::gate::{
    LoginAllowed, LoginAttempt, RegisterAllowed, RegisterFailed, ResumeAllowed, ResumeAttempt,
};
use crate::actors::room::{Deliver, Join, Joined, Room};
use crate::error::{AuthError, Error, StoreError};
use crate::ids::SessionId;
use crate::metrics::METRICS;
use crate::protocol::{Reply, RequestKind, RestoredRoom, RoomName, UserView, Username};
use crate::secret::Secret;
use crate::store::models::UserRecord;
use std::sync::Arc;

pub(super) fn user_view(user: &UserRecord) -> UserView {
    UserView {
        id: user.id,
        username: user.username.clone(),
    }
}

/// The rooms a resume tried to restore, each with its room and join answer when restored.
type Restored = Vec<(RoomName, Option<(Addr<Room>, Joined)>)>;

impl Session {
    pub(super) fn register(&mut self, username: Username, password: Secret) -> Step {
        if !self.settings.registration_open {
            return Step::fail(AuthError::RegistrationClosed);
        }
        let work = register(self.services.clone(), self.peer.ip, username, password);
        Step::later(work.into_actor(self))
    }

    pub(super) fn login(&mut self, username: Username, password: Secret) -> Step {
        if self.phase.identity().is_some() {
            return Step::fail(AuthError::AlreadyAuthenticated);
        }
        let attempt = login_attempt(self.services.clone(), self.peer.ip, username, password);
        Step::later(attempt.into_actor(self).map(move |result, session, ctx| {
            let (user, token) = result?;
            let reply = Reply::LoggedIn {
                user: user_view(&user),
                token: token.token,
            };
            let identity = Identity {
                user,
                token: token.hash,
                expires_at: token.expires_at,
            };
            session.authenticated(identity, ctx)?;
            Ok(reply)
        }))
    }

    /// Authenticates with the token; when a session of that token is parked (or still looks
    /// alive and yields), takes its place in its rooms, holding their events until the reply.
    pub(super) fn resume(&mut self, token: Secret, ctx: &mut WsContext) -> Step {
        if self.phase.identity().is_some() {
            return Step::fail(AuthError::AlreadyAuthenticated);
        }
        let hash = hash_token(token.expose());
        let lookup = look_up_token(self.services.clone(), self.peer.ip, hash.clone());
        let deliver = ctx.address().recipient::<Deliver>();
        let session = self.id;
        let work = lookup.into_actor(self).then(move |found, act, ctx| {
            let begun = found.and_then(|(user, expires_at, parked)| {
                let identity = Identity {
                    user: user.clone(),
                    token: hash,
                    expires_at,
                };
                act.authenticated(identity, ctx)?;
                if let Some(parked) = &parked {
                    parked.rooms.iter().for_each(|name| act.joins.begin(name));
                }
                Ok((user, parked))
            });
            let directory = act.services.directory.clone();
            restore(directory, session, deliver, begun).into_actor(act)
        });
        Step::answer_later(work.map(|restored, session, _| session.resumed(restored)))
    }

    fn resumed(&mut self, restored: Result<(UserRecord, Restored), Error>) -> Answer {
        let (user, restored) = match restored {
            Ok(restored) => restored,
            Err(e) => return Err(e).into(),
        };
        let mut rooms = Vec::new();
        let mut names = Vec::new();
        for (name, outcome) in restored {
            match outcome {
                Some((addr, joined)) => {
                    if self.joins.answered(&name, Some((addr, None))) {
                        rooms.push(RestoredRoom {
                            name: joined.name,
                            last_seq: joined.last_seq,
                        });
                    }
                }
                None => {
                    self.joins.answered(&name, None);
                }
            }
            names.push(name);
        }
        Answer {
            result: Ok(Reply::Resumed {
                user: user_view(&user),
                rooms,
            }),
            then: Then::AwaitJoins(names),
        }
    }

    pub(super) fn logout(&mut self) -> Step {
        let revoking = self
            .phase
            .identity()
            .map(|i| revoke(&self.services, i, self.id));
        let work = async move {
            if let Some(revoking) = revoking {
                revoking
                    .await
                    .map_err(|e| StoreError::Unavailable(e.to_string()))??;
            }
            Ok::<_, Error>(Reply::Done {})
        };
        Step::answer_later(work.into_actor(self).map(|result, _, _| {
            let then = if result.is_ok() {
                Then::LogOut
            } else {
                Then::Nothing
            };
            Answer { result, then }
        }))
    }
}

impl Session {
    /// A `logout` that was waiting its turn when the connection went away still revokes.
    pub(super) fn revoke_for_waiting_logout(&self) {
        if !self.pipeline.is_waiting(|r| r.kind == RequestKind::Logout) {
            return;
        }
        if let Some(identity) = self.phase.identity() {
            drop(revoke(&self.services, identity, self.id));
        }
    }
}

/// Revokes the token of `identity` in a task of its own, so that it completes whatever
/// happens to the connection, then has the directory end the token's other sessions.
pub(super) fn revoke(
    services: &Services,
    identity: &Identity,
    by: SessionId,
) -> tokio::task::JoinHandle<Result<(), Error>> {
    let (db, directory) = (services.executors.clone(), services.directory.clone());
    let token = identity.token.clone();
    actix::spawn(async move {
        db.send(RevokeToken {
            hash: token.clone(),
        })
        .await??;
        directory.do_send(Revoked { token, by });
        Ok(())
    })
}

/// A registration through the gate: refused without hashing while the address is over its
/// registration rate (or has too many failed logins); a name already taken counts as a
/// failed login of the address.
async fn register(
    services: Arc<Services>,
    ip: Option<std::net::IpAddr>,
    username: Username,
    password: Secret,
) -> Result<Reply, Error> {
    if !services.gate.send(RegisterAllowed { ip }).await? {
        return Err(AuthError::TooManyRegistrations.into());
    }
    let password_hash = services.hasher.hash(password).await?;
    let created = services
        .db
        .send(CreateUser {
            username,
            password_hash,
        })
        .await?;
    if let Err(StoreError::Conflict(_)) = created {
        services.gate.do_send(RegisterFailed { ip });
    }
    Ok(Reply::Registered {
        user: user_view(&created?),
    })
}

/// A login attempt through the gate: refused without checking the password while the name
/// or the address has too many recent failures; its outcome is reported back to the gate.
async fn login_attempt(
    services: Arc<Services>,
    ip: Option<std::net::IpAddr>,
    username: Username,
    password: Secret,
) -> Result<(UserRecord, IssuedToken), Error> {
    let allowed = services
        .gate
        .send(LoginAllowed {
            username: username.clone(),
            ip,
        })
        .await?;
    if !allowed {
        METRICS.logins.with_label_values(&["refused"]).inc();
        return Err(AuthError::TooManyFailures.into());
    }
    let admitted = LoginAttempt::new(services.gate.clone(), username.clone(), ip);
    let attempt = check_password(&services, &username, password).await;
    let failed = matches!(attempt, Err(Error::Auth(AuthError::InvalidCredentials)));
    admitted.finish(failed);
    let result = match &attempt {
        Ok(_) => "ok",
        Err(_) if failed => "invalid_credentials",
        Err(_) => "refused",
    };
    METRICS.logins.with_label_values(&[result]).inc();
    attempt
}

/// The user whose password this is, with a new token; the same error for an unknown user
/// and a wrong password, at the same bcrypt cost.
async fn check_password(
    services: &Services,
    username: &Username,
    password: Secret,
) -> Result<(UserRecord, IssuedToken), Error> {
    let found = services
        .db
        .send(FindLogin {
            username: username.clone(),
        })
        .await??;
    let (login, hash) = match found {
        Some(login) => {
            let hash = login.password_hash.clone();
            (Some(login), Some(hash))
        }
        None => (None, None),
    };
    let verified = services.hasher.verify(password, hash).await?;
    let login = login
        .filter(|_| verified)
        .ok_or(AuthError::InvalidCredentials)?;
    // Only who knows the password learns that the account is disabled.
    if login.disabled {
        return Err(AuthError::Disabled.into());
    }
    let user = login.user;
    let token = services.db.send(IssueToken { user: user.id }).await??;
    Ok((user, token))
}

/// The token's user, and the parked session it may take over; refused without a look-up
/// while the address has too many recent failed resumes.
async fn look_up_token(
    services: Arc<Services>,
    ip: Option<std::net::IpAddr>,
    hash: TokenHash,
) -> Result<(UserRecord, DateTime<Utc>, Option<Parked>), Error> {
    if !services.gate.send(ResumeAllowed { ip }).await? {
        return Err(AuthError::TooManyFailedResumes.into());
    }
    let attempt = ResumeAttempt::new(services.gate.clone(), ip);
    let found = services.db.send(ResumeToken { hash: hash.clone() }).await;
    let (user, expires_at) = match found {
        Ok(Ok(Some(found))) => {
            attempt.finish(false);
            found
        }
        Ok(Ok(None)) => {
            attempt.finish(true);
            return Err(AuthError::InvalidToken.into());
        }
        // The server's trouble, not a guess.
        Ok(Err(e)) => {
            attempt.finish(false);
            return Err(e.into());
        }
        Err(e) => {
            attempt.finish(false);
            return Err(e.into());
        }
    };
    let parked = services.directory.send(Reclaim { token: hash }).await?;
    Ok((user, expires_at, parked))
}

/// Joins each room of the parked session in its place. A room that went away (or refuses
/// now) is simply not restored.
async fn restore(
    directory: Addr<Directory>,
    session: SessionId,
    deliver: Recipient<Deliver>,
    begun: Result<(UserRecord, Option<Parked>), Error>,
) -> Result<(UserRecord, Restored), Error> {
    let (user, parked) = begun?;
    let mut restored = Vec::new();
    if let Some(parked) = parked {
        for name in parked.rooms {
            let join = Join {
                session,
                user: user.clone(),
                deliver: deliver.clone(),
                after: None,
                replaces: Some(parked.session),
            };
            let outcome = ask_room(&directory, &name, join).await.ok();
            restored.push((name, outcome));
        }
    }
    Ok((user, restored))
}
