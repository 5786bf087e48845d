//! The fan-out baseline: a plain chat-room broadcast server on Rookery's stack (actix,
//! actix-web, actix-web-actors, serde_json), built the way actix's own chat example is: one
//! `Hub` actor holds every room's sessions and copies each message to every member as an actor
//! message of its own. Plain ws; no TLS, no authentication, no storage, no limits.
//!
//! It answers just enough of docs/protocol.md for `rookery-bench fanout` to drive it unchanged:
//! `register` and `login` (any name, no password check), `create_room`, `join`, `send` (the
//! `message` event to every member, the sender included, then the `ok` with the seq) and
//! `history` (the hub remembers each message's seq, sender and key, not its body, so the
//! scenario's checker verdict still says whether every member got every message).

use actix::{Actor, Addr, AsyncContext, Handler, Message, Recipient, StreamHandler};
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// A text frame for one session to write.
#[derive(Message)]
#[rtype(result = "()")]
struct Deliver(String);

/// What a session asks of the hub; every answer comes back as a [`Deliver`] to `reply_to`.
#[derive(Message)]
#[rtype(result = "()")]
struct Ask {
    session: u64,
    user: String,
    reply_to: Recipient<Deliver>,
    request: Request,
}

/// A session's connection ended.
#[derive(Message)]
#[rtype(result = "()")]
struct Gone(u64);

/// The requests of the protocol the baseline answers; anything else gets `bad_request`.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Request {
    Register {
        id: String,
    },
    Login {
        id: String,
        username: String,
    },
    CreateRoom {
        id: String,
        room: String,
    },
    Join {
        id: String,
        room: String,
    },
    Send {
        id: String,
        room: String,
        body: String,
        client_msg_id: Option<String>,
    },
    History {
        id: String,
        room: String,
        before: Option<i64>,
        limit: Option<usize>,
    },
}

/// What the hub remembers of a message, for `history`.
struct Sent {
    seq: i64,
    from: String,
    client_msg_id: Option<String>,
    sent_at: String,
}

#[derive(Default)]
struct Room {
    members: HashMap<u64, Recipient<Deliver>>,
    messages: Vec<Sent>,
}

#[derive(Default)]
struct Hub {
    rooms: HashMap<String, Room>,
}

impl Actor for Hub {
    type Context = actix::Context<Self>;
}

fn ok(id: &str, payload: Value) -> String {
    let mut reply = json!({"type": "ok", "id": id});
    if let (Some(reply), Value::Object(payload)) = (reply.as_object_mut(), payload) {
        reply.extend(payload);
    }
    reply.to_string()
}

fn error(id: &str, code: &str) -> String {
    json!({"type": "error", "id": id, "code": code, "message": code}).to_string()
}

impl Handler<Ask> for Hub {
    type Result = ();

    fn handle(&mut self, ask: Ask, _: &mut Self::Context) {
        let Ask {
            session,
            user,
            reply_to,
            request,
        } = ask;
        let reply = match request {
            Request::Register { id } | Request::Login { id, .. } => ok(&id, json!({})),
            Request::CreateRoom { id, room } => {
                self.rooms.entry(room).or_default();
                ok(&id, json!({}))
            }
            Request::Join { id, room } => match self.rooms.get_mut(&room) {
                Some(r) => {
                    r.members.insert(session, reply_to.clone());
                    let last_seq = r.messages.last().map_or(0, |m| m.seq);
                    ok(&id, json!({"room": {"name": room, "last_seq": last_seq}}))
                }
                None => error(&id, "not_found"),
            },
            Request::Send {
                id,
                room,
                body,
                client_msg_id,
            } => match self.rooms.get_mut(&room) {
                Some(r) if r.members.contains_key(&session) => {
                    let seq = r.messages.len() as i64 + 1;
                    let sent_at = rookery::protocol::format_time(chrono::Utc::now());
                    let event = json!({"type": "message", "room": room, "seq": seq, "from": user,
                        "body": body, "sent_at": sent_at, "client_msg_id": client_msg_id})
                    .to_string();
                    for member in r.members.values() {
                        member.do_send(Deliver(event.clone()));
                    }
                    let reply = ok(&id, json!({"seq": seq, "sent_at": sent_at}));
                    r.messages.push(Sent {
                        seq,
                        from: user,
                        client_msg_id,
                        sent_at,
                    });
                    reply
                }
                Some(_) => error(&id, "forbidden"),
                None => error(&id, "not_found"),
            },
            Request::History {
                id,
                room,
                before,
                limit,
            } => match self.rooms.get(&room) {
                Some(r) => history_page(&id, &room, &r.messages, before, limit),
                None => error(&id, "not_found"),
            },
        };
        reply_to.do_send(Deliver(reply));
    }
}

/// A page of `messages` (seq i + 1 at index i) below `before`, ascending, as the protocol's
/// history reply.
fn history_page(
    id: &str,
    room: &str,
    messages: &[Sent],
    before: Option<i64>,
    limit: Option<usize>,
) -> String {
    let end = before.map_or(messages.len(), |b| {
        usize::try_from(b.saturating_sub(1))
            .unwrap_or(0)
            .min(messages.len())
    });
    let start = end.saturating_sub(limit.unwrap_or(20).clamp(1, 100));
    let page: Vec<Value> = messages[start..end]
        .iter()
        .map(|m| {
            json!({"room": room, "seq": m.seq, "from": m.from, "body": "",
                "sent_at": m.sent_at, "client_msg_id": m.client_msg_id})
        })
        .collect();
    ok(id, json!({"messages": page, "has_more": start > 0}))
}

impl Handler<Gone> for Hub {
    type Result = ();

    fn handle(&mut self, Gone(session): Gone, _: &mut Self::Context) {
        for room in self.rooms.values_mut() {
            room.members.remove(&session);
        }
    }
}

/// One WebSocket connection.
struct Session {
    id: u64,
    user: String,
    hub: Addr<Hub>,
}

impl Actor for Session {
    type Context = ws::WebsocketContext<Self>;

    fn stopped(&mut self, _: &mut Self::Context) {
        self.hub.do_send(Gone(self.id));
    }
}

impl Handler<Deliver> for Session {
    type Result = ();

    fn handle(&mut self, Deliver(text): Deliver, ctx: &mut Self::Context) {
        ctx.text(text);
    }
}

impl Session {
    fn request(&mut self, text: &str, ctx: &mut ws::WebsocketContext<Self>) {
        let request = match serde_json::from_str::<Request>(text) {
            Ok(request) => request,
            Err(_) => {
                ctx.text(error("", "bad_request"));
                return;
            }
        };
        if let Request::Login { username, .. } = &request {
            self.user.clone_from(username);
        }
        self.hub.do_send(Ask {
            session: self.id,
            user: self.user.clone(),
            reply_to: ctx.address().recipient(),
            request,
        });
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for Session {
    fn handle(&mut self, item: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        if let Some(ws::Message::Text(text)) = crate::echo_server::data_frame(item, ctx) {
            self.request(&text, ctx);
        }
    }
}

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

async fn ws_route(
    req: HttpRequest,
    stream: web::Payload,
    hub: web::Data<Addr<Hub>>,
) -> Result<HttpResponse, actix_web::Error> {
    let session = Session {
        id: NEXT_SESSION.fetch_add(1, Ordering::Relaxed),
        user: String::new(),
        hub: hub.get_ref().clone(),
    };
    ws::start(session, &req, stream)
}

/// Runs the broadcast server on `bind` until interrupted.
pub fn run(bind: &str) -> std::io::Result<()> {
    let bind = bind.to_string();
    actix::System::new().block_on(async move {
        let hub = web::Data::new(Hub::default().start());
        actix_web::HttpServer::new(move || {
            actix_web::App::new()
                .app_data(hub.clone())
                .route("/ws", web::get().to(ws_route))
        })
        .bind(bind)?
        .run()
        .await
    })
}
