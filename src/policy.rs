//! Room policies: the admins' TOML file (`rooms.policy_file`, default config/rooms.toml),
//! read and checked as a whole into [`Policies`]: the limits every room gets (`[defaults]`),
//! the per-user limits (`[users]`), and the rooms the file defines (`[[room]]`), each with its
//! kind, whitelist, admins and limits. An invalid file is refused as a whole, with every
//! problem named by file, line and column. Plain data and functions; reads only the file.

use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use crate::config::line_col;
use crate::error::ConfigProblem;
use crate::protocol::{username_key, RoomKind, RoomName, Username};
use crate::rate::Refill;

/// What every room is held to; a `[[room]]` of the file overrides any of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Ring-buffer size and default history page.
    pub history_limit: usize,
    /// Larger bodies are refused with `too_large`.
    pub max_body_bytes: usize,
    /// Sends per user per room: a token bucket.
    pub rate: Rate,
    /// Whitelist size, and distinct users joined at once.
    pub max_members: usize,
    /// False: messages are delivered and kept in the ring buffer only, never stored.
    pub persist: bool,
    /// 0 keeps messages for ever; otherwise older ones are deleted by a periodic job.
    pub retention_days: u32,
    /// Only the room's admins may send.
    pub read_only: bool,
}

/// A token bucket: `messages` per `per_seconds`, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub messages: u32,
    pub per_seconds: u32,
    pub burst: u32,
}

impl Rate {
    pub fn refill(&self) -> Refill {
        Refill::new(self.messages, self.per_seconds, self.burst)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            history_limit: 20,
            max_body_bytes: 4096,
            rate: Rate {
                messages: 10,
                per_seconds: 1,
                burst: 20,
            },
            max_members: 10_000,
            persist: true,
            retention_days: 0,
            read_only: false,
        }
    }
}

impl Limits {
    /// How long messages are kept, when not for ever.
    pub fn retention(&self) -> Option<Duration> {
        (self.retention_days > 0)
            .then(|| Duration::from_secs(u64::from(self.retention_days) * 86_400))
    }
}

/// Per-user limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserLimits {
    /// Rooms one user may create over the protocol.
    pub max_created_rooms: usize,
    /// Rooms one session may be joined to at once.
    pub max_joined_rooms: usize,
}

impl Default for UserLimits {
    fn default() -> Self {
        UserLimits {
            max_created_rooms: 100,
            max_joined_rooms: 500,
        }
    }
}

/// A room the file defines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigRoom {
    pub kind: RoomKind,
    /// Usernames admitted to a private room (a name not registered yet applies when it is).
    pub whitelist: BTreeSet<String>,
    /// Usernames that may invite and revoke, and send in a read-only room.
    pub admins: BTreeSet<String>,
    pub limits: Limits,
}

/// The whole policy file, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policies {
    pub defaults: Limits,
    pub users: UserLimits,
    pub rooms: BTreeMap<RoomName, ConfigRoom>,
}

impl Policies {
    /// The file at `path`, its rooms allowing bodies of at most `max_body_bytes`. A missing
    /// file is "defaults only" when `required` is false.
    pub fn load(
        path: &Path,
        required: bool,
        max_body_bytes: usize,
    ) -> Result<Policies, Vec<ConfigProblem>> {
        match std::fs::read_to_string(path) {
            Ok(text) => Policies::parse_within(&text, &path.display().to_string(), max_body_bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                Ok(Policies::default())
            }
            Err(e) => Err(vec![ConfigProblem {
                key: "rooms.policy_file".into(),
                problem: format!("cannot read {}: {e}", path.display()),
                origin: None,
            }]),
        }
    }

    /// Parses and checks policy-file `text`; `source` names it in the problems. Bodies may be
    /// up to [`MAX_BODY_BYTES`].
    pub fn parse(text: &str, source: &str) -> Result<Policies, Vec<ConfigProblem>> {
        Policies::parse_within(text, source, MAX_BODY_BYTES)
    }

    /// Like [`Policies::parse`], allowing bodies of at most `max_body_bytes`.
    pub fn parse_within(
        text: &str,
        source: &str,
        max_body_bytes: usize,
    ) -> Result<Policies, Vec<ConfigProblem>> {
        let at = |offset: usize| {
            let (line, col) = line_col(text, offset);
            Some(format!("{source}:{line}:{col}"))
        };
        let file: File = toml::from_str(text).map_err(|e| {
            vec![ConfigProblem {
                key: String::new(),
                problem: e.message().to_string(),
                origin: e
                    .span()
                    .map(|s| s.start)
                    .and_then(at)
                    .or(Some(source.into())),
            }]
        })?;
        let mut problems = Vec::new();
        let locate = Locator::new(text, source);
        let bounds = Bounds { max_body_bytes };
        let defaults = file.defaults.apply(
            &Limits::default(),
            "defaults",
            &bounds,
            &|key| locate.key(&["defaults", key]),
            &mut problems,
        );
        let users = file
            .users
            .checked(&mut problems, |key| locate.key(&["users", key]));
        let mut rooms = BTreeMap::new();
        for (index, entry) in file.room.into_iter().enumerate() {
            let start = at(entry.span().start);
            let origin = |key: &str| locate.room_key(index, key).or_else(|| start.clone());
            let (name, room) =
                entry
                    .into_inner()
                    .checked(&defaults, &bounds, &origin, &mut problems);
            if let Some(name) = name {
                if rooms.insert(name.clone(), room).is_some() {
                    let key = format!("room.{name}");
                    problems.push(problem(&origin("name"), &key, "defined twice"));
                }
            }
        }
        if problems.is_empty() {
            Ok(Policies {
                defaults,
                users,
                rooms,
            })
        } else {
            Err(problems)
        }
    }

    /// The policy of a room: the file's for a room it defines, the defaults otherwise.
    pub fn limits_of(&self, room: &str) -> &Limits {
        self.rooms.get(room).map_or(&self.defaults, |r| &r.limits)
    }
}

/// Finds keys of the file by their place, for the problems' "file:line:col".
struct Locator<'a> {
    text: &'a str,
    source: &'a str,
    table: Option<toml::Spanned<toml::de::DeTable<'a>>>,
}

impl<'a> Locator<'a> {
    fn new(text: &'a str, source: &'a str) -> Self {
        Locator {
            text,
            source,
            table: toml::de::DeTable::parse(text).ok(),
        }
    }

    fn at(&self, offset: usize) -> String {
        let (line, col) = line_col(self.text, offset);
        format!("{}:{line}:{col}", self.source)
    }

    /// The key at `path` (tables only), or the nearest table on the way that exists.
    fn key(&self, path: &[&str]) -> Option<String> {
        let mut table = self.table.as_ref()?.get_ref();
        let mut found = None;
        for part in path {
            let Some((key, value)) = table.get_key_value(*part) else {
                break;
            };
            found = Some(key.span().start);
            match value.get_ref() {
                toml::de::DeValue::Table(inner) => table = inner,
                _ => break,
            }
        }
        found.map(|offset| self.at(offset))
    }

    /// Key `key` of the `index`-th `[[room]]`.
    fn room_key(&self, index: usize, key: &str) -> Option<String> {
        let rooms = self.table.as_ref()?.get_ref().get("room")?;
        let toml::de::DeValue::Array(rooms) = rooms.get_ref() else {
            return None;
        };
        let toml::de::DeValue::Table(room) = rooms.get(index)?.get_ref() else {
            return None;
        };
        let (found, _) = room.get_key_value(key)?;
        Some(self.at(found.span().start))
    }
}

fn problem(origin: &Option<String>, key: &str, text: &str) -> ConfigProblem {
    ConfigProblem {
        key: key.to_string(),
        problem: text.to_string(),
        origin: origin.clone(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    defaults: LimitsSection,
    #[serde(default)]
    users: UsersSection,
    #[serde(default)]
    room: Vec<toml::Spanned<RoomSection>>,
}

/// The limit keys, each optional: `[defaults]`, and the same keys of a `[[room]]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsSection {
    history_limit: Option<usize>,
    max_body_bytes: Option<usize>,
    rate: Option<Rate>,
    max_members: Option<usize>,
    persist: Option<bool>,
    retention_days: Option<u32>,
    read_only: Option<bool>,
}

/// Largest body a room may allow when nothing smaller bounds it (the server allows 1 KiB
/// below `session.max_frame_bytes`).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// What the rest of the configuration bounds the file's values by.
struct Bounds {
    max_body_bytes: usize,
}

impl LimitsSection {
    /// `base` with the keys given here, each checked; problems are named `{section}.{key}`.
    fn apply(
        &self,
        base: &Limits,
        section: &str,
        bounds: &Bounds,
        origin: &dyn Fn(&str) -> Option<String>,
        problems: &mut Vec<ConfigProblem>,
    ) -> Limits {
        let mut out = base.clone();
        let mut check = |key: &str, ok: bool, rule: &str| {
            if !ok {
                problems.push(problem(&origin(key), &format!("{section}.{key}"), rule));
            }
        };
        if let Some(n) = self.history_limit {
            check(
                "history_limit",
                (1..=10_000).contains(&n),
                "must be 1..10000",
            );
            out.history_limit = n;
        }
        if let Some(n) = self.max_body_bytes {
            let rule = format!(
                "must be 1..{} (1 KiB below session.max_frame_bytes)",
                bounds.max_body_bytes
            );
            check(
                "max_body_bytes",
                (1..=bounds.max_body_bytes).contains(&n),
                &rule,
            );
            out.max_body_bytes = n;
        }
        if let Some(rate) = self.rate {
            let ok = rate.messages > 0 && rate.per_seconds > 0 && rate.burst >= 1;
            check(
                "rate",
                ok,
                "messages and per_seconds must be at least 1, burst at least 1",
            );
            out.rate = rate;
        }
        if let Some(n) = self.max_members {
            check(
                "max_members",
                (1..=1_000_000).contains(&n),
                "must be 1..1000000",
            );
            out.max_members = n;
        }
        if let Some(days) = self.retention_days {
            check(
                "retention_days",
                days <= 36_500,
                "must be 0 (keep for ever) to 36500",
            );
            out.retention_days = days;
        }
        out.persist = self.persist.unwrap_or(out.persist);
        out.read_only = self.read_only.unwrap_or(out.read_only);
        out
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersSection {
    max_created_rooms: Option<usize>,
    max_joined_rooms: Option<usize>,
}

impl UsersSection {
    fn checked(
        &self,
        problems: &mut Vec<ConfigProblem>,
        origin: impl Fn(&str) -> Option<String>,
    ) -> UserLimits {
        let defaults = UserLimits::default();
        if self.max_joined_rooms == Some(0) {
            problems.push(problem(
                &origin("max_joined_rooms"),
                "users.max_joined_rooms",
                "must be at least 1",
            ));
        }
        UserLimits {
            max_created_rooms: self.max_created_rooms.unwrap_or(defaults.max_created_rooms),
            max_joined_rooms: self.max_joined_rooms.unwrap_or(defaults.max_joined_rooms),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoomSection {
    name: String,
    kind: RoomKind,
    whitelist: Option<Vec<String>>,
    #[serde(default)]
    admins: Vec<String>,
    history_limit: Option<usize>,
    max_body_bytes: Option<usize>,
    rate: Option<Rate>,
    max_members: Option<usize>,
    persist: Option<bool>,
    retention_days: Option<u32>,
    read_only: Option<bool>,
}

impl RoomSection {
    fn checked(
        self,
        defaults: &Limits,
        bounds: &Bounds,
        origin: &dyn Fn(&str) -> Option<String>,
        problems: &mut Vec<ConfigProblem>,
    ) -> (Option<RoomName>, ConfigRoom) {
        let name = match RoomName::parse(self.name.as_str()) {
            Ok(name) if !name.is_direct() => Some(name),
            Ok(_) => {
                let rule = "a room of the file cannot use the dm: prefix (direct rooms)";
                problems.push(problem(&origin("name"), "room.name", rule));
                None
            }
            Err(e) => {
                problems.push(problem(
                    &origin("name"),
                    "room.name",
                    &format!("'{}': {e}", self.name),
                ));
                None
            }
        };
        let section = format!("room.{}", self.name);
        let mut usernames = |key: &str, names: &[String]| -> BTreeSet<String> {
            for bad in names
                .iter()
                .filter(|n| Username::parse(n.as_str()).is_err())
            {
                let text = format!("'{bad}' is not a username (3..32 of A-Z a-z 0-9 _ . -)");
                problems.push(problem(&origin(key), &format!("{section}.{key}"), &text));
            }
            names.iter().map(|n| username_key(n)).collect()
        };
        let admins = usernames("admins", &self.admins);
        let whitelist = match (&self.whitelist, self.kind) {
            (Some(list), RoomKind::Private) => usernames("whitelist", list),
            (None, _) => BTreeSet::new(),
            (Some(_), RoomKind::Public) => {
                let text = "a public room has no whitelist (anyone may join it)";
                problems.push(problem(
                    &origin("whitelist"),
                    &format!("{section}.whitelist"),
                    text,
                ));
                BTreeSet::new()
            }
        };
        let limits = LimitsSection {
            history_limit: self.history_limit,
            max_body_bytes: self.max_body_bytes,
            rate: self.rate,
            max_members: self.max_members,
            persist: self.persist,
            retention_days: self.retention_days,
            read_only: self.read_only,
        }
        .apply(defaults, &section, bounds, origin, problems);
        if whitelist.len() > limits.max_members {
            let text = format!("{} names, more than max_members", whitelist.len());
            problems.push(problem(
                &origin("whitelist"),
                &format!("{section}.whitelist"),
                &text,
            ));
        }
        let room = ConfigRoom {
            kind: self.kind,
            whitelist,
            admins,
            limits,
        };
        (name, room)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match Policies::parse(text, "rooms.toml") {
            Ok(p) => panic!("parsed {p:?}"),
            Err(problems) => problems.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn rooms_take_the_defaults_for_the_keys_they_leave_out() {
        let policies = Policies::parse(
            "[defaults]\nmax_body_bytes = 100\n[users]\nmax_joined_rooms = 7\n[[room]]\nname = \"staff\"\nkind = \"private\"\nwhitelist = [\"Ann\"]\nhistory_limit = 5\n",
            "rooms.toml",
        )
        .unwrap();
        let staff = &policies.rooms[&RoomName::parse("staff").unwrap()];
        assert_eq!(
            (staff.limits.history_limit, staff.limits.max_body_bytes),
            (5, 100)
        );
        assert_eq!(policies.limits_of("other").max_body_bytes, 100);
        assert_eq!(policies.users.max_joined_rooms, 7);
        assert_eq!(
            policies.users.max_created_rooms, 100,
            "the built-in default"
        );
        assert!(
            staff.whitelist.contains("ann"),
            "names are kept by their case-insensitive key"
        );
    }

    #[test]
    fn every_problem_is_named_with_its_place() {
        let found = problems(
            "[defaults]\nmax_members = 0\n\n[[room]]\nname = \"Bad\"\nkind = \"public\"\nadmins = [\"x\"]\n",
        );
        assert_eq!(found.len(), 3, "{found:#?}");
        assert!(
            found[0].starts_with("rooms.toml:2:1: defaults.max_members"),
            "{found:#?}"
        );
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("rooms.toml:5:1: room.name")),
            "{found:#?}"
        );
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("rooms.toml:7:1: room.Bad.admins")),
            "{found:#?}"
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused_with_their_place() {
        let found = problems("[defaults]\nhistory_limits = 5\n");
        assert!(
            found[0].starts_with("rooms.toml:2:1:") && found[0].contains("history_limits"),
            "{found:?}"
        );
        let found = problems("[[room]]\nname = \"a\"\nkind = \"secret\"\n");
        assert!(found[0].starts_with("rooms.toml:3:"), "{found:?}");
    }

    #[test]
    fn a_missing_default_file_means_defaults_only_and_a_missing_chosen_one_is_an_error() {
        let nowhere = Path::new("/nonexistent/rooms.toml");
        assert_eq!(
            Policies::load(nowhere, false, MAX_BODY_BYTES),
            Ok(Policies::default())
        );
        assert!(Policies::load(nowhere, true, MAX_BODY_BYTES).is_err());
    }
}
