//! The script modes: `send`, `history` and `tail`, each one login (with ROOKERY_PASSWORD), its
//! work, and an error carrying the server's code when anything fails. Over `link` and `show`.

use rookery::client::{Backoff, ClientError, Connector};
use rookery::ids::Seq;
use rookery::protocol::{Request, RoomName, MAX_HISTORY_LIMIT};
use serde_json::{json, Value};
use std::time::Duration;

use crate::link::Link;
use crate::{show, CliError, ServerArgs};

/// How many times `send` tries a message whose outcome is unknown (`unavailable`, a dropped
/// connection) before it gives up.
const SEND_ATTEMPTS: u32 = 5;

async fn login(server: &ServerArgs) -> Result<(Connector, Link), CliError> {
    let password = crate::password(&server.username()?)?;
    let connector = Connector::new(&server.connect_options())?;
    let link = Link::login(server, &connector, password).await?;
    Ok((connector, link))
}

fn join(room: &RoomName, after: Option<i64>) -> Request {
    Request::Join {
        room: room.clone(),
        after: after.map(Seq),
    }
}

/// Whether trying again later may succeed (the outcome of the last attempt is unknown, or the
/// server asked to wait).
fn retryable(error: &CliError) -> bool {
    match error {
        CliError::Server { code, .. } => matches!(code.as_str(), "unavailable" | "rate_limited"),
        CliError::Client(ClientError::Closed(Some(1008))) => false,
        CliError::Client(_) => true,
        _ => false,
    }
}

/// Sends `text` to `room` and prints its seq once stored. Retries keep one `client_msg_id`, so
/// the message is stored once however many attempts it takes.
pub async fn send(server: &ServerArgs, room: &RoomName, text: String) -> Result<(), CliError> {
    if text.len() > crate::MAX_BODY_BYTES {
        return Err(CliError::Usage(format!(
            "the message is {} bytes, over the {} a message may have",
            text.len(),
            crate::MAX_BODY_BYTES
        )));
    }
    let (connector, mut link) = login(server).await?;
    let request = Request::Post {
        room: room.clone(),
        body: text,
        client_msg_id: Some(uuid::Uuid::new_v4().to_string()),
    };
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(3));
    let (mut attempt, mut reconnect) = (1, false);
    let reply = loop {
        let tried = async {
            if reconnect {
                link.reconnect(server, &connector).await?;
            }
            link.call(&join(room, None)).await?;
            link.call(&request).await
        }
        .await;
        match tried {
            Ok(reply) => break reply,
            Err(error) if attempt < SEND_ATTEMPTS && retryable(&error) => {
                attempt += 1;
                reconnect = matches!(error, CliError::Client(_));
                tokio::time::sleep(backoff.next_wait()).await;
            }
            Err(error) => return Err(error),
        }
    };
    println!("{}", reply["seq"].as_i64().unwrap_or_default());
    link.close().await;
    Ok(())
}

/// Prints the newest `limit` messages of `room`, oldest first, paging back as needed.
pub async fn history(
    server: &ServerArgs,
    room: &RoomName,
    limit: u32,
    as_json: bool,
) -> Result<(), CliError> {
    let (_, mut link) = login(server).await?;
    let mut pages: Vec<Vec<Value>> = Vec::new();
    let (mut before, mut has_more, mut held) = (None, true, 0u32);
    while has_more && held < limit {
        let reply = link
            .call(&Request::History {
                room: room.clone(),
                before,
                limit: Some((limit - held).min(MAX_HISTORY_LIMIT)),
            })
            .await?;
        let page = reply["messages"].as_array().cloned().unwrap_or_default();
        has_more = reply["has_more"].as_bool().unwrap_or(false);
        before = page.first().and_then(|m| m["seq"].as_i64()).map(Seq);
        if page.is_empty() || before.is_none() {
            has_more = false;
        }
        held += page.len() as u32;
        pages.push(page);
    }
    let messages: Vec<Value> = pages.into_iter().rev().flatten().collect();
    if as_json {
        println!("{}", json!({"messages": messages, "has_more": has_more}));
    } else {
        for message in &messages {
            println!("{}", show::message(message, link.user.as_str()));
        }
    }
    link.close().await;
    Ok(())
}

/// Prints `room`'s events as JSON lines until interrupted. A dropped connection (or one that
/// stops answering pings) is resumed and the room joined again after the last seq printed, so
/// no message is missed or printed twice.
pub async fn tail(server: &ServerArgs, room: &RoomName) -> Result<(), CliError> {
    let (connector, mut link) = login(server).await?;
    let reply = link.call(&join(room, None)).await?;
    let mut last_seq = reply["room"]["last_seq"].as_i64().unwrap_or(0);
    eprintln!(
        "tailing {} after seq {last_seq} (Ctrl-C to stop)",
        show::room_label(room.as_str(), link.user.as_str())
    );
    loop {
        let event = match tokio::time::timeout(QUIET, link.next_event()).await {
            Ok(event) => event,
            Err(_) => link
                .call_within(&Request::Ping {}, PING_TIMEOUT)
                .await
                .map(|_| Value::Null),
        };
        match event {
            Ok(Value::Null) => {}
            Ok(event) => {
                if let Some(seq) = event["seq"].as_i64() {
                    if event["type"] == "message" && seq <= last_seq {
                        continue;
                    }
                    last_seq = last_seq.max(seq);
                }
                println!("{event}");
            }
            Err(error) if retryable(&error) => {
                eprintln!("connection lost ({error}); reconnecting…");
                for message in rejoin(server, &connector, &mut link, room, last_seq).await? {
                    last_seq = last_seq.max(message["seq"].as_i64().unwrap_or(0));
                    println!("{}", with_type(message));
                }
            }
            Err(error) => return Err(error),
        }
    }
}

/// A quiet connection is pinged; one whose ping is not answered this fast is taken as lost.
const QUIET: Duration = Duration::from_secs(8);
const PING_TIMEOUT: Duration = Duration::from_secs(6);

/// Reconnects (with backoff, for as long as it takes), resumes and joins `room` again: the
/// messages after `after`, oldest first.
async fn rejoin(
    server: &ServerArgs,
    connector: &Connector,
    link: &mut Link,
    room: &RoomName,
    after: i64,
) -> Result<Vec<Value>, CliError> {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
    loop {
        tokio::time::sleep(backoff.next_wait()).await;
        let rejoined = async {
            link.reconnect(server, connector).await?;
            let reply = link.call(&join(room, Some(after))).await?;
            let mut missed = reply["missed"].as_array().cloned().unwrap_or_default();
            let lowest = missed.first().and_then(|m| m["seq"].as_i64());
            if let (true, Some(lowest)) = (reply["truncated"] == true, lowest) {
                let mut gap = between(link, room, after, lowest).await?;
                gap.append(&mut missed);
                missed = gap;
            }
            Ok::<_, CliError>(missed)
        }
        .await;
        match rejoined {
            Ok(missed) => {
                eprintln!("back, {} missed messages fetched", missed.len());
                return Ok(missed);
            }
            Err(error) if retryable(&error) => eprintln!("still unreachable ({error}); retrying…"),
            Err(error) => return Err(error),
        }
    }
}

/// A message object of `missed` or a history page, written like the `message` event it
/// stands for.
fn with_type(message: Value) -> Value {
    let mut event = serde_json::Map::new();
    event.insert("type".into(), "message".into());
    if let Value::Object(fields) = message {
        event.extend(fields);
    }
    Value::Object(event)
}

/// The messages of `room` with `after < seq < before`, oldest first, from history pages: what
/// a truncated `missed` left out.
async fn between(
    link: &mut Link,
    room: &RoomName,
    after: i64,
    before: i64,
) -> Result<Vec<Value>, CliError> {
    let mut pages = Vec::new();
    let mut before = before;
    while before > after + 1 {
        let reply = link
            .call(&Request::History {
                room: room.clone(),
                before: Some(Seq(before)),
                limit: Some(MAX_HISTORY_LIMIT),
            })
            .await?;
        let page: Vec<Value> = reply["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|m| m["seq"].as_i64().is_some_and(|seq| seq > after))
            .collect();
        match page.first().and_then(|m| m["seq"].as_i64()) {
            Some(lowest) if lowest < before => before = lowest,
            _ => break,
        }
        pages.push(page);
    }
    Ok(pages.into_iter().rev().flatten().collect())
}
