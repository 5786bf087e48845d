//! The interactive client's state, with no IO (after quinn-proto's connection state): what
//! the user typed, the frames that came and the connection opening or closing go in; frames
//! to send, lines to print, the prompt and when to reconnect come out as [`Effect`]s, which
//! `terminal` carries out. It knows the rooms joined and the last seq seen in each, so a
//! reconnect resumes the token and joins each room again `after` it: nothing is missed or
//! shown twice. Sends not yet acked are kept and sent again with the same `client_msg_id`.

use rookery::client::{request_frame, Backoff, ClientError};
use rookery::ids::Seq;
use rookery::protocol::{
    direct_room_name, Request, RoomKind, RoomName, Username, MAX_HISTORY_LIMIT,
};
use rookery::secret::Secret;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::{show, CliError};

/// What the terminal is to do.
#[derive(Debug)]
pub enum Effect {
    /// Send this text frame.
    Send(String),
    Print(String),
    /// Use this prompt from the next line on.
    Prompt(String),
    /// Open a new connection after this wait.
    Connect(Duration),
    /// Abandon the connection as lost (no answer to a ping, a resume to retry); `on_closed`
    /// follows.
    Drop(&'static str),
    /// Close the connection and stop with this outcome.
    Exit(Result<(), CliError>),
}

/// A request waiting for its reply: what to do with the reply.
#[derive(Debug)]
enum Pending {
    Login,
    Register,
    Resume,
    Join { room: RoomName, rejoin: bool },
    Leave { room: RoomName },
    Rooms,
    History,
    Who { room: RoomName },
    Dm,
    Create { room: RoomName },
    Invite { room: RoomName, user: Username },
    Revoke { room: RoomName, user: Username },
    Send { client_msg_id: String },
    Ping { sent: Instant },
}

/// A message typed but not acked yet.
#[derive(Debug)]
struct Outgoing {
    room: RoomName,
    body: String,
    client_msg_id: String,
    /// Sent on the current connection and waiting for its reply.
    in_flight: bool,
}

/// Typing lines are shown at most this often per user and room.
const TYPING_SHOWN_EVERY: Duration = Duration::from_secs(10);

pub const HELP: &str = "\
commands:
  /join ROOM                 join a room and make it the current one
  /leave [ROOM]              leave the current room (or ROOM)
  /switch ROOM               make a joined room the current one
  /rooms                     the rooms you may join
  /history [N]               the current room's last N messages (20; at most 100)
  /who                       who is online in the current room
  /dm USER                   open your direct room with USER
  /create ROOM [--private] [MEMBER...]
                             create a room (and join it)
  /invite USER, /revoke USER add to or remove from the current private room
  /register                  create your account (when login says invalid_credentials)
  /login                     try logging in again
  /quit                      leave (Ctrl-D too; Ctrl-C clears the line)
any other line is sent to the current room";

pub struct Chat {
    me: Username,
    /// Kept until the first login succeeds (a `/register` needs it); later connections resume.
    password: Option<Secret>,
    token: Option<Secret>,
    connected: bool,
    ever_connected: bool,
    /// What to do once a connection opens while not logged in.
    on_open: Pending,
    next_id: u64,
    pending: HashMap<String, Pending>,
    /// Rooms joined, with the highest seq shown.
    joined: BTreeMap<RoomName, i64>,
    current: Option<RoomName>,
    outbox: Vec<Outgoing>,
    /// Rejoins of this reconnect still to answer, and the missed messages they brought.
    rejoining: usize,
    fetched: usize,
    backoff: Backoff,
    typing_shown: HashMap<(String, String), Instant>,
    /// A login (or registration) is under way: connecting, or waiting for its reply.
    logging_in: bool,
    /// Ticks left before a `/quit` stops without the acks it waits for.
    quitting: Option<u32>,
    /// When the last frame came (a quiet connection is pinged, a dead one dropped).
    last_frame: Instant,
}

/// A connection this quiet is pinged; one whose ping is not answered this fast is dropped.
const QUIET: Duration = Duration::from_secs(8);
const PING_TIMEOUT: Duration = Duration::from_secs(6);

/// How many seconds `/quit` waits for the acks of messages still being stored.
const QUIT_WAIT_TICKS: u32 = 5;

fn reconnect_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(500), Duration::from_secs(15))
}

/// `general`, `#general` or `@bob` (the direct room with bob) as a room name.
fn parse_room(me: &Username, text: &str) -> Result<RoomName, String> {
    if let Some(user) = text.strip_prefix('@') {
        let user = Username::parse(user).map_err(|e| e.to_string())?;
        return Ok(direct_room_name(me.as_str(), user.as_str()));
    }
    RoomName::parse(text.strip_prefix('#').unwrap_or(text)).map_err(|e| e.to_string())
}

fn parse_user(text: &str) -> Result<Username, String> {
    Username::parse(text.strip_prefix('@').unwrap_or(text)).map_err(|e| e.to_string())
}

fn error_text(frame: &Value) -> String {
    format!(
        "{}: {}",
        show::line(frame["code"].as_str().unwrap_or("internal")),
        show::line(frame["message"].as_str().unwrap_or_default())
    )
}

impl Chat {
    pub fn new(me: Username, password: Secret) -> Chat {
        Chat {
            me,
            password: Some(password),
            token: None,
            connected: false,
            ever_connected: false,
            on_open: Pending::Login,
            next_id: 0,
            pending: HashMap::new(),
            joined: BTreeMap::new(),
            current: None,
            outbox: Vec::new(),
            rejoining: 0,
            fetched: 0,
            backoff: reconnect_backoff(),
            typing_shown: HashMap::new(),
            logging_in: true,
            quitting: None,
            last_frame: Instant::now(),
        }
    }

    pub fn prompt(&self) -> String {
        match &self.current {
            Some(room) => format!(
                "{} {}> ",
                self.me,
                show::room_label(room.as_str(), self.me.as_str())
            ),
            None => format!("{}> ", self.me),
        }
    }

    /// Whether a request that changes the current room is waiting for its reply (the
    /// terminal holds the next prompt back until it has come, so the prompt names the room).
    pub fn settling(&self) -> bool {
        self.logging_in
            || self.pending.values().any(|p| {
                matches!(
                    p,
                    Pending::Join { rejoin: false, .. }
                        | Pending::Leave { .. }
                        | Pending::Dm
                        | Pending::Create { .. }
                        | Pending::Login
                        | Pending::Register
                )
            })
    }

    fn request(&mut self, request: &Request, pending: Pending) -> Effect {
        self.next_id += 1;
        let id = self.next_id.to_string();
        self.pending.insert(id.clone(), pending);
        Effect::Send(request_frame(&id, request))
    }

    fn login(&mut self, register: bool) -> Vec<Effect> {
        let Some(password) = self.password.clone() else {
            return vec![Effect::Print("already logged in".into())];
        };
        let username = self.me.clone();
        vec![if register {
            self.request(&Request::Register { username, password }, Pending::Register)
        } else {
            self.request(&Request::Login { username, password }, Pending::Login)
        }]
    }

    /// A connection opened.
    pub fn on_connected(&mut self, now: Instant) -> Vec<Effect> {
        self.connected = true;
        self.last_frame = now;
        self.ever_connected = true;
        let Some(token) = self.token.clone() else {
            let register = matches!(self.on_open, Pending::Register);
            return self.login(register);
        };
        // The joins go right behind the resume (the protocol allows it), and the unacked sends
        // behind the joins, which they wait for.
        let mut effects = vec![self.request(&Request::Resume { token }, Pending::Resume)];
        let rooms: Vec<(RoomName, i64)> =
            self.joined.iter().map(|(r, s)| (r.clone(), *s)).collect();
        self.rejoining = rooms.len();
        self.fetched = 0;
        for (room, seq) in rooms {
            let join = Request::Join {
                room: room.clone(),
                after: Some(Seq(seq)),
            };
            effects.push(self.request(&join, Pending::Join { room, rejoin: true }));
        }
        effects.extend(self.send_outbox());
        effects
    }

    /// A connection attempt failed.
    pub fn on_connect_failed(&mut self, error: ClientError) -> Vec<Effect> {
        self.logging_in = false;
        if !self.ever_connected {
            return vec![Effect::Exit(Err(CliError::Client(error)))];
        }
        vec![
            Effect::Print(format!("still unreachable ({error}); retrying…")),
            Effect::Connect(self.backoff.next_wait()),
        ]
    }

    /// The connection closed; `code` and `reason` from the server's close frame, if any.
    pub fn on_closed(&mut self, code: Option<u16>, reason: Option<&str>) -> Vec<Effect> {
        self.connected = false;
        self.logging_in = false;
        self.pending.clear();
        self.rejoining = 0;
        for message in &mut self.outbox {
            message.in_flight = false;
        }
        if self.quitting.is_some() {
            return vec![self.exit_with_outbox()];
        }
        let reason = reason.unwrap_or_default();
        let described = match (code, reason.is_empty()) {
            (Some(code), true) => format!("code {code}"),
            (Some(code), false) => format!("code {code}, {}", show::line(reason)),
            (None, false) => show::line(reason),
            (None, true) => "no close frame".into(),
        };
        if code == Some(1008) && reason.starts_with("token") {
            return vec![Effect::Exit(Err(CliError::Terminal(format!(
                "the server ended this session ({described}): log in again"
            ))))];
        }
        if self.token.is_none() {
            // Not logged in: reconnect when the user asks (/login or /register) rather than
            // loop on the authentication timeout.
            return vec![Effect::Print(format!(
                "disconnected ({described}); /login or /register connects again"
            ))];
        }
        vec![
            Effect::Print(format!("connection lost ({described}); reconnecting…")),
            Effect::Connect(self.backoff.next_wait()),
        ]
    }

    /// Once a second: sends to try again (after `unavailable` or `rate_limited`), and the
    /// end of a `/quit`'s wait.
    pub fn on_tick(&mut self, now: Instant) -> Vec<Effect> {
        if let Some(left) = &mut self.quitting {
            *left = left.saturating_sub(1);
            if *left == 0 {
                return vec![self.exit_with_outbox()];
            }
        }
        if self.connected && self.token.is_some() {
            let ping_sent = self.pending.values().find_map(|p| match p {
                Pending::Ping { sent } => Some(*sent),
                _ => None,
            });
            match ping_sent {
                Some(sent) if now.duration_since(sent) >= PING_TIMEOUT => {
                    return vec![Effect::Drop("no answer to a ping")];
                }
                None if now.duration_since(self.last_frame) >= QUIET => {
                    return vec![self.request(&Request::Ping {}, Pending::Ping { sent: now })];
                }
                _ => {}
            }
        }
        self.send_outbox()
    }

    /// The end of the session: a failure when messages typed were never acked.
    fn exit_with_outbox(&self) -> Effect {
        match self.outbox.len() {
            0 => Effect::Exit(Ok(())),
            unsent => Effect::Exit(Err(CliError::Terminal(format!(
                "{unsent} message(s) not acked by the server: they may not have been stored"
            )))),
        }
    }

    /// Stops a `/quit` once nothing waits for an ack.
    fn quit_when_done(&mut self) -> Vec<Effect> {
        if self.quitting.is_some() && self.outbox.is_empty() {
            return vec![Effect::Exit(Ok(()))];
        }
        Vec::new()
    }

    fn send_outbox(&mut self) -> Vec<Effect> {
        if !self.connected || self.token.is_none() {
            return Vec::new();
        }
        // One message in flight per room: a retry (after `unavailable` or `rate_limited`) then
        // cannot be stored after a message typed later.
        let mut busy: Vec<RoomName> = Vec::new();
        let mut due: Vec<(RoomName, String, String)> = Vec::new();
        for message in &mut self.outbox {
            if busy.contains(&message.room) {
                continue;
            }
            busy.push(message.room.clone());
            if !message.in_flight {
                message.in_flight = true;
                due.push((
                    message.room.clone(),
                    message.body.clone(),
                    message.client_msg_id.clone(),
                ));
            }
        }
        due.into_iter()
            .map(|(room, body, client_msg_id)| {
                let send = Request::Post {
                    room,
                    body,
                    client_msg_id: Some(client_msg_id.clone()),
                };
                self.request(&send, Pending::Send { client_msg_id })
            })
            .collect()
    }

    /// A line the user typed.
    pub fn on_line(&mut self, line: &str) -> Vec<Effect> {
        let line = line.trim_end_matches(['\r', '\n']);
        if line.trim().is_empty() {
            return Vec::new();
        }
        let Some(command) = line.strip_prefix('/') else {
            return self.say(line);
        };
        let mut words = command.split_whitespace();
        let name = words.next().unwrap_or_default();
        let args: Vec<&str> = words.collect();
        let effects = match (name, args.as_slice()) {
            ("help", _) => Ok(vec![Effect::Print(HELP.into())]),
            ("quit" | "exit", _) => Ok(self.quit()),
            ("register", []) => Ok(self.start_login(true)),
            ("login", []) => Ok(self.start_login(false)),
            _ if !self.connected || self.token.is_none() => Err(if self.token.is_none() {
                "not logged in yet (/register creates the account, /login tries again)".to_string()
            } else {
                "offline, reconnecting: try again in a moment".to_string()
            }),
            ("join", [room]) => self.join(room),
            ("leave", []) => self.leave(None),
            ("leave", [room]) => self.leave(Some(room)),
            ("switch", [room]) => self.switch(room),
            ("rooms", []) => Ok(vec![self.request(&Request::Rooms {}, Pending::Rooms)]),
            ("history", []) => self.history("20"),
            ("history", [count]) => self.history(count),
            ("who", []) => self.with_current(|chat, room| {
                vec![chat.request(&Request::Who { room: room.clone() }, Pending::Who { room })]
            }),
            ("dm", [user]) => {
                parse_user(user).map(|user| vec![self.request(&Request::Dm { user }, Pending::Dm)])
            }
            ("create", [room, rest @ ..]) => self.create(room, rest),
            ("invite", [user]) => self.manage(user, true),
            ("revoke", [user]) => self.manage(user, false),
            _ => Err(format!(
                "unknown command or wrong arguments: /{name} (/help lists them)"
            )),
        };
        effects.unwrap_or_else(|problem| vec![Effect::Print(problem)])
    }

    fn quit(&mut self) -> Vec<Effect> {
        if self.quitting.is_some() {
            return Vec::new();
        }
        self.quitting = Some(QUIT_WAIT_TICKS);
        if self.outbox.is_empty() || !self.connected {
            return vec![self.exit_with_outbox()];
        }
        vec![Effect::Print(format!(
            "waiting for {} message(s) to be stored…",
            self.outbox.len()
        ))]
    }

    fn start_login(&mut self, register: bool) -> Vec<Effect> {
        if self.token.is_some() {
            return vec![Effect::Print("already logged in".into())];
        }
        self.logging_in = true;
        if self.connected {
            return self.login(register);
        }
        self.on_open = if register {
            Pending::Register
        } else {
            Pending::Login
        };
        vec![
            Effect::Print("connecting…".into()),
            Effect::Connect(Duration::ZERO),
        ]
    }

    fn say(&mut self, body: &str) -> Vec<Effect> {
        if self.token.is_none() {
            return vec![Effect::Print(
                "not logged in yet (/register creates the account, /login tries again)".into(),
            )];
        }
        let Some(room) = self.current.clone() else {
            return vec![Effect::Print("no current room: /join ROOM first".into())];
        };
        if body.len() > crate::MAX_BODY_BYTES {
            return vec![Effect::Print(format!(
                "not sent: {} bytes is over the {} a message may have",
                body.len(),
                crate::MAX_BODY_BYTES
            ))];
        }
        self.outbox.push(Outgoing {
            room,
            body: body.to_string(),
            client_msg_id: uuid::Uuid::new_v4().to_string(),
            in_flight: false,
        });
        if !self.connected {
            return vec![Effect::Print(
                "offline: the message is sent once back".into(),
            )];
        }
        self.send_outbox()
    }

    fn with_current(
        &mut self,
        then: impl FnOnce(&mut Chat, RoomName) -> Vec<Effect>,
    ) -> Result<Vec<Effect>, String> {
        let room = self
            .current
            .clone()
            .ok_or("no current room: /join ROOM first")?;
        Ok(then(self, room))
    }

    fn join(&mut self, room: &str) -> Result<Vec<Effect>, String> {
        if let Some(user) = room.strip_prefix('@') {
            let user = parse_user(user)?;
            return Ok(vec![self.request(&Request::Dm { user }, Pending::Dm)]);
        }
        let room = parse_room(&self.me, room)?;
        Ok(vec![self.join_room(room)])
    }

    fn join_room(&mut self, room: RoomName) -> Effect {
        let join = Request::Join {
            room: room.clone(),
            after: None,
        };
        self.request(
            &join,
            Pending::Join {
                room,
                rejoin: false,
            },
        )
    }

    fn leave(&mut self, room: Option<&&str>) -> Result<Vec<Effect>, String> {
        let room = match room {
            Some(room) => parse_room(&self.me, room)?,
            None => self.current.clone().ok_or("no current room")?,
        };
        Ok(vec![self.request(
            &Request::Leave { room: room.clone() },
            Pending::Leave { room },
        )])
    }

    fn switch(&mut self, room: &str) -> Result<Vec<Effect>, String> {
        let room = parse_room(&self.me, room)?;
        if !self.joined.contains_key(&room) {
            return Err(format!("not joined to {room}: /join {room}"));
        }
        self.current = Some(room);
        Ok(vec![Effect::Prompt(self.prompt())])
    }

    fn history(&mut self, count: &str) -> Result<Vec<Effect>, String> {
        let count: u32 = count
            .parse()
            .map_err(|_| "/history takes a number".to_string())?;
        let limit = count.clamp(1, MAX_HISTORY_LIMIT);
        self.with_current(|chat, room| {
            let history = Request::History {
                room,
                before: None,
                limit: Some(limit),
            };
            vec![chat.request(&history, Pending::History)]
        })
    }

    fn create(&mut self, room: &str, rest: &[&str]) -> Result<Vec<Effect>, String> {
        let room = parse_room(&self.me, room)?;
        let private = rest.contains(&"--private");
        let members = rest
            .iter()
            .filter(|word| **word != "--private")
            .map(|user| parse_user(user))
            .collect::<Result<Vec<Username>, String>>()?;
        if !private && !members.is_empty() {
            return Err("members are for private rooms: add --private".into());
        }
        let kind = if private {
            RoomKind::Private
        } else {
            RoomKind::Public
        };
        let create = Request::CreateRoom {
            room: room.clone(),
            kind,
            members,
        };
        Ok(vec![self.request(&create, Pending::Create { room })])
    }

    fn manage(&mut self, user: &str, invite: bool) -> Result<Vec<Effect>, String> {
        let user = parse_user(user)?;
        self.with_current(|chat, room| {
            let (request, pending) = if invite {
                (
                    Request::Invite {
                        room: room.clone(),
                        user: user.clone(),
                    },
                    Pending::Invite { room, user },
                )
            } else {
                (
                    Request::Revoke {
                        room: room.clone(),
                        user: user.clone(),
                    },
                    Pending::Revoke { room, user },
                )
            };
            vec![chat.request(&request, pending)]
        })
    }

    /// A frame from the server; `now` paces the typing lines.
    pub fn on_frame(&mut self, frame: Value, now: Instant) -> Vec<Effect> {
        self.last_frame = now;
        let is_reply = matches!(frame["type"].as_str(), Some("ok" | "error"));
        let pending = frame["id"].as_str().and_then(|id| self.pending.remove(id));
        match (is_reply, pending) {
            (true, Some(pending)) => self.on_reply(pending, &frame),
            (true, None) if frame["type"] == "error" => {
                vec![Effect::Print(format!("server: {}", error_text(&frame)))]
            }
            (true, None) => Vec::new(),
            (false, _) => self.on_event(&frame, now),
        }
    }

    fn on_event(&mut self, frame: &Value, now: Instant) -> Vec<Effect> {
        let room = frame["room"].as_str().unwrap_or_default();
        match frame["type"].as_str() {
            Some("message") => self.show_message(frame).into_iter().collect(),
            Some("typing") => {
                let key = (
                    room.to_string(),
                    frame["user"].as_str().unwrap_or_default().to_string(),
                );
                let recent = self
                    .typing_shown
                    .get(&key)
                    .is_some_and(|at| now.duration_since(*at) < TYPING_SHOWN_EVERY);
                if recent {
                    return Vec::new();
                }
                self.typing_shown.insert(key, now);
                show::event(frame, self.me.as_str())
                    .map(Effect::Print)
                    .into_iter()
                    .collect()
            }
            Some("kicked") => {
                let mut effects: Vec<Effect> = show::event(frame, self.me.as_str())
                    .map(Effect::Print)
                    .into_iter()
                    .collect();
                effects.extend(self.forget_room(room));
                effects
            }
            _ => show::event(frame, self.me.as_str())
                .map(Effect::Print)
                .into_iter()
                .collect(),
        }
    }

    /// Shows a message once: not when its seq was shown already (a rejoin's `missed` and the
    /// live events may overlap). Our own message's echo settles its outbox entry too.
    fn show_message(&mut self, message: &Value) -> Option<Effect> {
        let room = message["room"].as_str()?;
        let seq = message["seq"].as_i64()?;
        if let Some(last) = self.joined.get_mut(room) {
            if seq <= *last {
                return None;
            }
            *last = seq;
        }
        if let Some(key) = message["client_msg_id"].as_str() {
            if message["from"]
                .as_str()
                .is_some_and(|from| from.eq_ignore_ascii_case(self.me.as_str()))
            {
                self.outbox.retain(|m| m.client_msg_id != key);
            }
        }
        Some(Effect::Print(show::message(message, self.me.as_str())))
    }

    fn forget_room(&mut self, room: &str) -> Vec<Effect> {
        self.joined.remove(room);
        let (dropped, kept) = std::mem::take(&mut self.outbox)
            .into_iter()
            .partition(|m| m.room.as_str() == room);
        self.outbox = kept;
        let mut effects: Vec<Effect> = dropped
            .into_iter()
            .map(|m: Outgoing| Effect::Print(format!("not sent: {}", show::printable(&m.body))))
            .collect();
        if self.current.as_ref().is_some_and(|c| c.as_str() == room) {
            self.current = self.joined.keys().next().cloned();
            effects.push(Effect::Prompt(self.prompt()));
        }
        effects.extend(self.quit_when_done());
        effects
    }

    fn on_reply(&mut self, pending: Pending, frame: &Value) -> Vec<Effect> {
        if frame["type"] == "error" {
            return self.on_error(pending, frame);
        }
        let me = self.me.as_str().to_string();
        match pending {
            Pending::Register => {
                let mut effects = vec![Effect::Print(format!("account {me} created; logging in…"))];
                effects.extend(self.login(false));
                effects
            }
            Pending::Login => {
                self.logging_in = false;
                // The registered spelling, which direct rooms' names use.
                if let Some(Ok(name)) = frame["user"]["username"].as_str().map(Username::parse) {
                    self.me = name;
                }
                self.token = frame["token"].as_str().map(Secret::new);
                self.password = None;
                self.backoff = reconnect_backoff();
                vec![Effect::Print(format!(
                    "logged in as {me}; /help lists the commands"
                ))]
            }
            Pending::Resume => {
                self.backoff = reconnect_backoff();
                if self.rejoining == 0 {
                    return vec![Effect::Print("back".into())];
                }
                Vec::new()
            }
            Pending::Join { room, rejoin } => self.on_joined(room, rejoin, frame),
            Pending::Leave { room } => {
                let mut effects = vec![Effect::Print(format!(
                    "left {}",
                    show::room_label(room.as_str(), &me)
                ))];
                effects.extend(self.forget_room(room.as_str()));
                effects
            }
            Pending::Rooms => {
                let rooms = frame["rooms"].as_array().cloned().unwrap_or_default();
                if rooms.is_empty() {
                    return vec![Effect::Print("no rooms yet: /create ROOM".into())];
                }
                let lines: Vec<String> = rooms
                    .iter()
                    .map(|r| {
                        let name = r["name"].as_str().unwrap_or("?");
                        format!(
                            "  {} ({}{}, {} messages)",
                            show::room_label(name, &me),
                            show::line(r["kind"].as_str().unwrap_or("?")),
                            if r["joined"] == true { ", joined" } else { "" },
                            r["last_seq"].as_i64().unwrap_or(0)
                        )
                    })
                    .collect();
                vec![Effect::Print(lines.join("\n"))]
            }
            Pending::History => {
                let messages = frame["messages"].as_array().cloned().unwrap_or_default();
                let mut lines: Vec<String> =
                    messages.iter().map(|m| show::message(m, &me)).collect();
                if messages.is_empty() {
                    lines.push("(no messages yet)".into());
                } else if frame["has_more"] == true {
                    lines.insert(
                        0,
                        "(older messages exist: /history N shows up to 100)".into(),
                    );
                }
                vec![Effect::Print(lines.join("\n"))]
            }
            Pending::Who { room } => {
                let online: Vec<String> = frame["online"]
                    .as_array()
                    .map(|users| {
                        users
                            .iter()
                            .filter_map(Value::as_str)
                            .map(show::line)
                            .collect()
                    })
                    .unwrap_or_default();
                vec![Effect::Print(format!(
                    "online in {}: {}",
                    show::room_label(room.as_str(), &me),
                    online.join(", ")
                ))]
            }
            Pending::Dm => match frame["room"]["name"].as_str().map(RoomName::parse) {
                Some(Ok(room)) => vec![self.join_room(room)],
                _ => vec![Effect::Print(
                    "the server's dm reply has no room name".into(),
                )],
            },
            Pending::Create { room } => vec![
                Effect::Print(format!("created {}", show::room_label(room.as_str(), &me))),
                self.join_room(room),
            ],
            Pending::Invite { room, user } => vec![Effect::Print(format!(
                "invited {user} to {}",
                show::room_label(room.as_str(), &me)
            ))],
            Pending::Revoke { room, user } => vec![Effect::Print(format!(
                "revoked {user} from {}",
                show::room_label(room.as_str(), &me)
            ))],
            Pending::Send { client_msg_id } => {
                self.outbox.retain(|m| m.client_msg_id != client_msg_id);
                let mut effects = self.send_outbox();
                effects.extend(self.quit_when_done());
                effects
            }
            Pending::Ping { .. } => Vec::new(),
        }
    }

    fn on_joined(&mut self, room: RoomName, rejoin: bool, frame: &Value) -> Vec<Effect> {
        let me = self.me.as_str().to_string();
        let label = show::room_label(room.as_str(), &me);
        let last_seq = frame["room"]["last_seq"].as_i64().unwrap_or(0);
        let mut effects = Vec::new();
        if rejoin {
            let missed = frame["missed"].as_array().cloned().unwrap_or_default();
            for message in &missed {
                if let Some(shown) = self.show_message(message) {
                    self.fetched += 1;
                    effects.push(shown);
                }
            }
            if frame["truncated"] == true {
                effects.push(Effect::Print(format!(
                    "(more was missed in {label} than one reply holds: /history 100 shows the latest)"
                )));
            }
            self.rejoining = self.rejoining.saturating_sub(1);
            if self.rejoining == 0 {
                effects.push(Effect::Print(format!(
                    "back, {} missed messages fetched",
                    self.fetched
                )));
            }
            return effects;
        }
        // A room joined again keeps its seen seq: live events below the reply's last_seq may
        // still be on their way.
        self.joined.entry(room.clone()).or_insert(last_seq);
        self.current = Some(room);
        effects.push(Effect::Print(format!(
            "joined {label} ({last_seq} messages; /history to read the latest)"
        )));
        effects.push(Effect::Prompt(self.prompt()));
        effects
    }

    fn on_error(&mut self, pending: Pending, frame: &Value) -> Vec<Effect> {
        let error = error_text(frame);
        let code = frame["code"].as_str().unwrap_or_default();
        if matches!(pending, Pending::Login | Pending::Register) {
            self.logging_in = false;
        }
        match pending {
            Pending::Login if code == "invalid_credentials" => vec![Effect::Print(format!(
                "login failed: {error} (/register creates the account)"
            ))],
            Pending::Login | Pending::Register => {
                vec![Effect::Print(format!("login failed: {error}"))]
            }
            Pending::Resume if code == "unauthorized" => {
                vec![Effect::Exit(Err(CliError::Terminal(format!(
                    "the session could not be resumed ({error}): log in again"
                ))))]
            }
            // `rate_limited`, `unavailable`: the next connection tries again.
            Pending::Resume => vec![
                Effect::Print(format!("resume refused for now ({error})")),
                Effect::Drop("resume to retry"),
            ],
            Pending::Join { room, rejoin: true } if matches!(code, "forbidden" | "not_found") => {
                self.rejoining = self.rejoining.saturating_sub(1);
                let mut effects = vec![Effect::Print(format!(
                    "could not rejoin {}: {error}",
                    show::room_label(room.as_str(), self.me.as_str())
                ))];
                effects.extend(self.forget_room(room.as_str()));
                effects
            }
            Pending::Join { rejoin: true, .. } => vec![
                Effect::Print(format!("rejoin refused for now ({error})")),
                Effect::Drop("rejoin to retry"),
            ],
            Pending::Send { client_msg_id } if matches!(code, "unavailable" | "rate_limited") => {
                // Tried again on the next tick, with the same client_msg_id.
                for message in &mut self.outbox {
                    if message.client_msg_id == client_msg_id {
                        message.in_flight = false;
                    }
                }
                Vec::new()
            }
            Pending::Send { client_msg_id } => {
                self.outbox.retain(|m| m.client_msg_id != client_msg_id);
                let mut effects = vec![Effect::Print(format!("not sent: {error}"))];
                effects.extend(self.send_outbox());
                effects.extend(self.quit_when_done());
                effects
            }
            _ => vec![Effect::Print(format!("error: {error}"))],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sent(effects: &[Effect]) -> Vec<Value> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Send(text) => serde_json::from_str(text).ok(),
                _ => None,
            })
            .collect()
    }

    fn printed(effects: &[Effect]) -> String {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Print(text) => Some(text.as_str()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn reply(request: &Value, fields: Value) -> Value {
        let mut frame = json!({"type": "ok", "id": request["id"]});
        for (k, v) in fields.as_object().unwrap() {
            frame[k] = v.clone();
        }
        frame
    }

    fn message(seq: i64, from: &str, key: Option<&str>) -> Value {
        let mut m = json!({"type": "message", "room": "general", "seq": seq, "from": from, "body": format!("m{seq}"), "sent_at": "2026-12-03T10:00:00.000Z"});
        if let Some(key) = key {
            m["client_msg_id"] = key.into();
        }
        m
    }

    /// A chat logged in as ann and joined to general at seq 2.
    fn joined() -> Chat {
        let mut chat = Chat::new(Username::parse("ann").unwrap(), Secret::new("password-1"));
        let login = sent(&chat.on_connected(Instant::now()));
        assert_eq!(login[0]["type"], "login");
        chat.on_frame(reply(&login[0], json!({"token": "t0k"})), Instant::now());
        let join = sent(&chat.on_line("/join general"));
        assert_eq!(join[0]["room"], "general");
        let effects = chat.on_frame(
            reply(
                &join[0],
                json!({"room": {"name": "general", "kind": "public", "last_seq": 2}}),
            ),
            Instant::now(),
        );
        assert!(printed(&effects).contains("joined #general"));
        assert_eq!(chat.prompt(), "ann #general> ");
        chat
    }

    #[test]
    fn a_reconnect_resumes_rejoins_after_the_last_seq_and_resends_unacked_messages() {
        let mut chat = joined();
        let first = sent(&chat.on_line("hello"));
        let key = first[0]["client_msg_id"].as_str().unwrap().to_string();
        chat.on_frame(message(3, "bob", None), Instant::now());
        let effects = chat.on_closed(None, None);
        assert!(matches!(effects.last(), Some(Effect::Connect(_))));
        assert!(printed(&effects).contains("reconnecting"));

        let frames = sent(&chat.on_connected(Instant::now()));
        assert_eq!(frames[0]["type"], "resume");
        assert_eq!(frames[0]["token"], "t0k");
        assert_eq!(
            frames[1],
            json!({"id": frames[1]["id"], "type": "join", "room": "general", "after": 3})
        );
        assert_eq!(frames[2]["type"], "send");
        assert_eq!(
            frames[2]["client_msg_id"],
            key.as_str(),
            "the retry keeps the key"
        );

        chat.on_frame(reply(&frames[0], json!({"rooms": []})), Instant::now());
        let missed = json!({"room": {"name": "general", "last_seq": 5}, "truncated": false,
            "missed": [message(3, "bob", None), message(4, "carol", None), message(5, "ann", Some(&key))]});
        let effects = chat.on_frame(reply(&frames[1], missed), Instant::now());
        let shown = printed(&effects);
        assert!(!shown.contains("m3"), "seq 3 was shown before: {shown}");
        assert!(
            shown.contains("carol: m4") && shown.contains("ann: m5"),
            "{shown}"
        );
        assert!(
            shown.ends_with("back, 2 missed messages fetched"),
            "{shown}"
        );
        chat.on_frame(reply(&frames[2], json!({"seq": 5})), Instant::now());
        assert!(
            sent(&chat.on_tick(Instant::now())).is_empty(),
            "nothing left to send"
        );
    }

    #[test]
    fn unavailable_sends_are_retried_with_their_key_and_refused_ones_are_dropped() {
        let mut chat = joined();
        let first = sent(&chat.on_line("one"));
        let error = json!({"type": "error", "id": first[0]["id"], "code": "unavailable", "message": "slow"});
        assert!(chat.on_frame(error, Instant::now()).is_empty());
        let again = sent(&chat.on_tick(Instant::now()));
        assert_eq!(again[0]["client_msg_id"], first[0]["client_msg_id"]);
        assert_ne!(again[0]["id"], first[0]["id"]);
        let too_large = json!({"type": "error", "id": again[0]["id"], "code": "too_large", "message": "over 4096"});
        assert!(printed(&chat.on_frame(too_large, Instant::now())).contains("not sent: too_large"));
        assert!(sent(&chat.on_tick(Instant::now())).is_empty());
    }

    #[test]
    fn a_failed_login_offers_register_and_a_revoked_token_ends_the_session() {
        let mut chat = Chat::new(Username::parse("ann").unwrap(), Secret::new("password-1"));
        let login = sent(&chat.on_connected(Instant::now()));
        let error = json!({"type": "error", "id": login[0]["id"], "code": "invalid_credentials", "message": "wrong username or password"});
        let effects = chat.on_frame(error, Instant::now());
        assert!(
            printed(&effects).contains("invalid_credentials"),
            "{}",
            printed(&effects)
        );
        assert!(printed(&chat.on_line("hello")).contains("not logged in"));
        let register = sent(&chat.on_line("/register"));
        assert_eq!(register[0]["type"], "register");
        assert_eq!(register[0]["password"], "password-1");
        let login = sent(&chat.on_frame(reply(&register[0], json!({})), Instant::now()));
        assert_eq!(login[0]["type"], "login");
        chat.on_frame(reply(&login[0], json!({"token": "t"})), Instant::now());
        let effects = chat.on_closed(Some(1008), Some("token revoked"));
        assert!(matches!(effects.as_slice(), [Effect::Exit(Err(_))]));
    }

    #[test]
    fn commands_check_their_arguments_before_sending() {
        let mut chat = joined();
        assert!(printed(&chat.on_line("/join Not_A_Room")).contains("room must be"));
        assert!(printed(&chat.on_line("/create club bob")).contains("--private"));
        let create = sent(&chat.on_line("/create club --private bob carol"));
        assert_eq!(create[0]["kind"], "private");
        assert_eq!(create[0]["members"], json!(["bob", "carol"]));
        let dm = sent(&chat.on_line("/join @bob"));
        assert_eq!(
            dm[0],
            json!({"id": dm[0]["id"], "type": "dm", "user": "bob"})
        );
        let join = sent(&chat.on_frame(
            reply(
                &dm[0],
                json!({"room": {"name": "dm:ann:bob", "kind": "private"}}),
            ),
            Instant::now(),
        ));
        assert_eq!(join[0]["room"], "dm:ann:bob");
        assert_eq!(sent(&chat.on_line("/history 500"))[0]["limit"], 100);
        assert!(printed(&chat.on_line("/switch staff")).contains("not joined"));
        assert!(printed(&chat.on_line("/frobnicate")).contains("/help"));
        assert!(chat.on_line("   ").is_empty());
    }

    #[test]
    fn typing_lines_are_paced_and_a_kick_forgets_the_room() {
        let mut chat = joined();
        let t0 = Instant::now();
        let typing = json!({"type": "typing", "room": "general", "user": "bob"});
        assert!(printed(&chat.on_frame(typing.clone(), t0)).contains("bob is typing"));
        assert!(chat
            .on_frame(typing.clone(), t0 + Duration::from_secs(1))
            .is_empty());
        assert!(!chat
            .on_frame(typing, t0 + Duration::from_secs(11))
            .is_empty());
        let kicked = json!({"type": "kicked", "room": "general", "reason": "revoked"});
        chat.on_frame(kicked, t0);
        assert_eq!(chat.prompt(), "ann> ");
        assert!(printed(&chat.on_line("hi")).contains("/join"));
    }

    #[test]
    fn a_quiet_connection_is_pinged_and_dropped_when_the_ping_goes_unanswered() {
        let mut chat = joined();
        let t0 = Instant::now();
        chat.on_frame(json!({"type": "ok", "id": "none"}), t0);
        assert!(sent(&chat.on_tick(t0 + Duration::from_secs(2))).is_empty());
        let ping = sent(&chat.on_tick(t0 + QUIET));
        assert_eq!(ping[0]["type"], "ping");
        assert!(sent(&chat.on_tick(t0 + QUIET + Duration::from_secs(1))).is_empty());
        let effects = chat.on_tick(t0 + QUIET + PING_TIMEOUT);
        assert!(
            matches!(effects.as_slice(), [Effect::Drop(_)]),
            "{effects:?}"
        );
    }

    #[test]
    fn a_refused_resume_retries_unless_the_token_is_gone() {
        let mut chat = joined();
        chat.on_closed(None, None);
        let frames = sent(&chat.on_connected(Instant::now()));
        let busy = json!({"type": "error", "id": frames[0]["id"], "code": "rate_limited", "message": "wait"});
        let effects = chat.on_frame(busy, Instant::now());
        assert!(
            matches!(effects.last(), Some(Effect::Drop(_))),
            "{effects:?}"
        );
        chat.on_closed(None, Some("resume to retry"));
        let frames = sent(&chat.on_connected(Instant::now()));
        let gone = json!({"type": "error", "id": frames[0]["id"], "code": "unauthorized", "message": "revoked"});
        let effects = chat.on_frame(gone, Instant::now());
        assert!(matches!(effects.as_slice(), [Effect::Exit(Err(_))]));
    }

    #[test]
    fn messages_to_a_room_go_one_at_a_time_so_a_retry_keeps_their_order() {
        let mut chat = joined();
        let first = sent(&chat.on_line("one"));
        assert!(sent(&chat.on_line("two")).is_empty(), "waits for one's ack");
        let busy = json!({"type": "error", "id": first[0]["id"], "code": "rate_limited", "message": "slow down"});
        assert!(sent(&chat.on_frame(busy, Instant::now())).is_empty());
        let retry = sent(&chat.on_tick(Instant::now()));
        assert_eq!(retry.len(), 1);
        assert_eq!(retry[0]["body"], "one");
        let next = sent(&chat.on_frame(reply(&retry[0], json!({"seq": 3})), Instant::now()));
        assert_eq!(next[0]["body"], "two");
    }

    #[test]
    fn quitting_with_unacked_messages_is_a_failure() {
        let mut chat = joined();
        chat.on_line("unacked");
        chat.on_closed(None, None);
        let effects = chat.on_line("/quit");
        assert!(
            matches!(effects.as_slice(), [Effect::Exit(Err(_))]),
            "{effects:?}"
        );
    }
}
