//! The policy a Room actor enforces, as a value it holds and swaps on reload: who is admitted
//! (public, members, the policy file's whitelist), who manages the room (its owner, or the
//! file's admins), who may send (read-only rooms), and the per-user send rate. Plain data:
//! the caller passes `now`.

use std::collections::{BTreeSet, HashSet};

use crate::error::{Forbidden, RoomError};
use crate::ids::UserId;
use crate::policy::{ConfigRoom, Limits, Policies};
use crate::protocol::{username_key, RoomKind};
use crate::rate::Buckets;
use crate::store::models::{RoomOrigin, RoomRecord, UserRecord};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomPolicy {
    pub kind: RoomKind,
    pub origin: RoomOrigin,
    /// The creator of a room made over the protocol.
    pub owner: Option<String>,
    /// Members by id: a created room's creator and members, and those invited since.
    pub members: HashSet<UserId>,
    /// A config room's whitelist from the file, by username.
    pub whitelist: BTreeSet<String>,
    /// A config room's admins from the file, by username.
    pub admins: BTreeSet<String>,
    pub limits: Limits,
    /// Removed from the policy file: nobody joins or sends any more.
    pub closed: bool,
}

impl RoomPolicy {
    /// The policy of a room as stored, under `policies`: the file's entry for a config room,
    /// the defaults for every other room.
    pub fn of(record: &RoomRecord, members: HashSet<UserId>, policies: &Policies) -> RoomPolicy {
        let defined = policies.rooms.get(record.name.as_str());
        let (whitelist, admins, limits) = match defined {
            Some(ConfigRoom {
                whitelist,
                admins,
                limits,
                ..
            }) => (whitelist.clone(), admins.clone(), limits.clone()),
            None => Default::default(),
        };
        let closed = match defined {
            Some(_) => false,
            None => record.closed || record.origin == RoomOrigin::Config,
        };
        RoomPolicy {
            kind: defined.map_or(record.kind, |r| r.kind),
            origin: if defined.is_some() {
                RoomOrigin::Config
            } else {
                record.origin
            },
            owner: record.owner.clone(),
            members,
            whitelist,
            admins,
            limits: if defined.is_some() {
                limits
            } else {
                policies.defaults.clone()
            },
            closed,
        }
    }

    pub fn admits(&self, user: &UserRecord) -> bool {
        !self.closed && self.may_read(user)
    }

    /// Whether `user` may read the room's history (a closed room's too). A config room's
    /// admins are admitted to the room they manage.
    pub fn may_read(&self, user: &UserRecord) -> bool {
        self.kind == RoomKind::Public
            || self.members.contains(&user.id)
            || self.whitelist.contains(&username_key(&user.username))
            || (self.origin == RoomOrigin::Config
                && self.admins.contains(&username_key(&user.username)))
    }

    /// Why `user` may not join (or read) the room, if it may not.
    pub fn refuses(&self, user: &UserRecord) -> Option<Forbidden> {
        if self.closed {
            return Some(Forbidden::Closed);
        }
        (!self.admits(user)).then_some(Forbidden::NotMember)
    }

    /// The owner of a created room, or an admin of a config room.
    pub fn manages(&self, user: &UserRecord) -> bool {
        match self.origin {
            RoomOrigin::User => self.owner.as_deref() == Some(user.username.as_str()),
            RoomOrigin::Config => self.admins.contains(&username_key(&user.username)),
            RoomOrigin::Direct => false,
        }
    }

    /// Whether `user` may send: a read-only room takes messages from its managers only.
    pub fn may_send(&self, user: &UserRecord) -> Result<(), RoomError> {
        if self.closed {
            return Err(RoomError::Forbidden(Forbidden::Closed));
        }
        if self.limits.read_only && !self.manages(user) {
            return Err(RoomError::Forbidden(Forbidden::ReadOnly));
        }
        Ok(())
    }

    /// May `by` invite into or revoke from this room?
    pub fn check_manager(&self, by: &UserRecord) -> Result<(), RoomError> {
        if self.closed {
            return Err(RoomError::Forbidden(Forbidden::Closed));
        }
        match (self.origin, self.kind) {
            // To a non-member, a direct room answers as one that does not exist would.
            (RoomOrigin::Direct, _) if !self.may_read(by) => {
                Err(RoomError::Forbidden(Forbidden::NotMember))
            }
            (RoomOrigin::Direct, _) => Err(RoomError::Forbidden(Forbidden::Direct)),
            _ if !self.manages(by) => Err(RoomError::Forbidden(Forbidden::NotManager)),
            (_, RoomKind::Public) => Err(RoomError::PublicRoom),
            _ => Ok(()),
        }
    }
}

/// One token bucket per user: the room's send rate.
pub type SendRates = Buckets<UserId>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{RoomId, Seq};

    fn user(id: i64, name: &str) -> UserRecord {
        UserRecord {
            id: UserId(id),
            username: name.into(),
        }
    }

    fn record(origin: RoomOrigin, kind: RoomKind) -> RoomRecord {
        RoomRecord {
            id: RoomId(1),
            name: "staff".into(),
            kind,
            owner: Some("ann".into()),
            last_seq: Seq(0),
            origin,
            closed: false,
        }
    }

    fn file(text: &str) -> Policies {
        Policies::parse(text, "rooms.toml").unwrap()
    }

    #[test]
    fn a_config_room_admits_its_whitelist_and_its_invited_members() {
        let policies = file(
            "[[room]]\nname = \"staff\"\nkind = \"private\"\nwhitelist = [\"bob\"]\nadmins = [\"cat\"]\n",
        );
        let members = HashSet::from([UserId(4)]);
        let policy = RoomPolicy::of(
            &record(RoomOrigin::Config, RoomKind::Private),
            members,
            &policies,
        );
        assert!(policy.admits(&user(2, "bob")), "listed in the file");
        assert!(policy.admits(&user(4, "dan")), "invited");
        assert!(!policy.admits(&user(5, "eve")));
        assert!(policy.manages(&user(3, "cat")) && !policy.manages(&user(1, "ann")));
    }

    #[test]
    fn a_config_room_no_longer_in_the_file_is_closed() {
        let policy = RoomPolicy::of(
            &record(RoomOrigin::Config, RoomKind::Public),
            HashSet::new(),
            &Policies::default(),
        );
        assert!(policy.closed);
        assert_eq!(policy.refuses(&user(1, "ann")), Some(Forbidden::Closed));
    }

    #[test]
    fn read_only_rooms_take_messages_from_their_managers_only() {
        let policies = file(
            "[[room]]\nname = \"staff\"\nkind = \"public\"\nread_only = true\nadmins = [\"cat\"]\n",
        );
        let policy = RoomPolicy::of(
            &record(RoomOrigin::Config, RoomKind::Public),
            HashSet::new(),
            &policies,
        );
        assert!(policy.may_send(&user(3, "cat")).is_ok());
        assert!(matches!(
            policy.may_send(&user(2, "bob")),
            Err(RoomError::Forbidden(Forbidden::ReadOnly))
        ));
    }

    #[test]
    fn only_managers_of_private_non_direct_rooms_invite() {
        let policies = Policies::default();
        let created = RoomPolicy::of(
            &record(RoomOrigin::User, RoomKind::Private),
            HashSet::new(),
            &policies,
        );
        assert!(created.check_manager(&user(1, "ann")).is_ok());
        assert!(created.check_manager(&user(2, "bob")).is_err());
        let direct = RoomPolicy::of(
            &record(RoomOrigin::Direct, RoomKind::Private),
            HashSet::from([UserId(1), UserId(2)]),
            &policies,
        );
        assert!(matches!(
            direct.check_manager(&user(1, "ann")),
            Err(RoomError::Forbidden(Forbidden::Direct))
        ));
        // To an outsider, a direct room looks like one it is not a member of.
        assert!(matches!(
            direct.check_manager(&user(3, "eve")),
            Err(RoomError::Forbidden(Forbidden::NotMember))
        ));
    }
}
