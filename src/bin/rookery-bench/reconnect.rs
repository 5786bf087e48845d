//! The reconnect scenario: joined clients drop their TCP connections at once while senders keep
//! sending, and come back with `resume` and `join` after the last seq they received; measures
//! how fast they are all back, and the checker says whether any message was lost on the way.
//! Calls `peer` and `meter`.

use rookery::client::{Backoff, ClientError};
use rookery::ids::Seq;
use rookery::protocol::{Request, RoomName};
use serde_json::json;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

use crate::meter::{
    histogram, join_each, member_loop, micros, shared, summary, verdict, Meter, SendPlan, Shared,
};
use crate::peer::{all, login_all, Bench, Peer};
use crate::report::Report;
use crate::ReconnectArgs;

/// When the clients drop, and when the senders stop.
#[derive(Clone, Copy)]
struct Phases {
    send_until: Instant,
    drop_at: Instant,
}

/// What the clients tallied coming back.
#[derive(Default)]
struct Comeback {
    /// Per client back: from its drop to its join answered.
    back_times: Vec<Duration>,
    failures: BTreeMap<String, u64>,
    /// Clients whose resume restored their rooms.
    restored: u64,
    /// Attempts that failed and were retried after a backoff, by reason.
    retried: BTreeMap<String, u64>,
}

/// A client retries coming back for this long, waiting a jittered, exponentially growing
/// time between attempts, as a real client would.
const COME_BACK_FOR: Duration = Duration::from_secs(60);
const FIRST_RETRY: Duration = Duration::from_millis(100);
const LONGEST_RETRY: Duration = Duration::from_secs(3);

pub async fn run(bench: &Bench, args: &ReconnectArgs, report: &mut Report) -> Result<(), String> {
    let rooms: Vec<RoomName> = (0..args.rooms)
        .map(|r| bench.room(r))
        .collect::<Result<_, _>>()?;
    let total = args.clients + args.senders;
    let started = Instant::now();
    let mut peers = login_all(bench, total, args.concurrency).await?;
    eprintln!(
        "reconnect: {total} logged in after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for room in &rooms {
        peers[0].create_room(room).await?;
    }
    let meter = shared(Meter::new());
    let room_of = |i: usize| rooms[i % rooms.len()].clone();
    join_each(&mut peers, &meter, room_of).await?;
    eprintln!(
        "reconnect: joined after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let (senders, clients) = peers.split_at_mut(args.senders);
    let phase = Duration::from_secs_f64(args.phase);
    let phases = Phases {
        send_until: Instant::now() + phase * 2,
        drop_at: Instant::now() + phase,
    };
    let comeback = shared(Comeback::default());
    let handshakes = match args.handshakes {
        0 => Semaphore::MAX_PERMITS,
        n => n,
    };
    let handshakes = &Semaphore::new(handshakes);
    let clients_out = Rc::new(Cell::new(clients.len()));
    let send_loops = senders.iter_mut().enumerate().map(|(i, peer)| {
        let room = room_of(i);
        let meter = meter.clone();
        let clients_out = clients_out.clone();
        async move {
            let plan = SendPlan {
                inflight: 1,
                rate: args.rate,
                body_bytes: 64,
                until: phases.send_until,
                max_sends: u64::MAX,
            };
            member_loop(bench, peer, &room, &meter, plan, Duration::from_secs(2)).await;
            // Still answering pings while the last clients come back (for up to a minute).
            while clients_out.get() > 0 {
                match peer.conn.recv_within(Duration::from_millis(500)).await {
                    Ok(_) | Err(ClientError::Timeout | ClientError::NotJson) => {}
                    Err(_) => break,
                }
            }
        }
    });
    let client_loops = clients.iter_mut().enumerate().map(|(i, peer)| {
        let room = room_of(i + args.senders);
        let meter = meter.clone();
        let comeback = comeback.clone();
        let clients_out = clients_out.clone();
        async move {
            client(bench, peer, &room, &meter, phases, &comeback, handshakes).await;
            clients_out.set(clients_out.get() - 1);
        }
    });
    futures_util::future::join(all(send_loops), all(client_loops)).await;
    set_figures(report, args, &comeback.borrow(), &meter.borrow());
    report.set("tls_resumed", bench.tls_resumed());
    report.verdict = Some(verdict(&mut peers[0], rooms.iter().cloned(), &meter).await?);
    Ok(())
}

/// One client: listens until the drop, comes back, then listens until the senders are done.
async fn client(
    bench: &Bench,
    peer: &mut Peer,
    room: &RoomName,
    meter: &Shared<Meter>,
    phases: Phases,
    comeback: &Shared<Comeback>,
    handshakes: &Semaphore,
) {
    // Listen until the drop, then cut the TCP connection without a close frame.
    listen(bench, peer, room, meter, phases.drop_at).await;
    let dropped = Instant::now();
    let mut backoff = Backoff::new(FIRST_RETRY, LONGEST_RETRY);
    let outcome = loop {
        match come_back(bench, peer, room, meter, handshakes).await {
            Err(e) if dropped.elapsed() < COME_BACK_FOR => {
                *comeback.borrow_mut().retried.entry(reason(&e)).or_default() += 1;
                tokio::time::sleep(backoff.next_wait()).await;
            }
            done => break done,
        }
    };
    match outcome {
        Ok(restored) => {
            {
                let mut tally = comeback.borrow_mut();
                tally.back_times.push(dropped.elapsed());
                if restored {
                    tally.restored += 1;
                }
            }
            let until = phases.send_until + Duration::from_secs(2);
            listen(bench, peer, room, meter, until).await;
        }
        Err(e) => {
            *comeback
                .borrow_mut()
                .failures
                .entry(reason(&e))
                .or_default() += 1
        }
    }
}

/// A failure's kind, for the tally (an error reply's code, or the client's error).
fn reason(error: &str) -> String {
    match error.split_once("\"code\":\"") {
        Some((kind, rest)) => {
            let code = rest.split('"').next().unwrap_or("");
            format!("{} {code}", kind.split(':').next().unwrap_or("").trim())
        }
        None => error.chars().take(80).collect(),
    }
}

/// Comes back on a fresh connection: `resume` with the peer's token, then `join` after the last
/// seq it received, recording the missed messages. Ok(whether the resume restored its rooms).
async fn come_back(
    bench: &Bench,
    peer: &mut Peer,
    room: &RoomName,
    meter: &Shared<Meter>,
    handshakes: &Semaphore,
) -> Result<bool, String> {
    let token = peer.token.clone().unwrap_or_default();
    // Cut the old connection without a close frame, as a network loss would (and before the
    // new one, or 10,000 clients would need 20,000 descriptors at once).
    peer.conn.abandon();
    let fresh = {
        let _turn = handshakes.acquire().await.map_err(|e| e.to_string())?;
        bench.connect(&peer.name, None).await
    }
    .map_err(|e| e.to_string())?;
    peer.conn = fresh.conn;
    let reply = peer.call(&Request::Resume { token }).await?;
    let restored = reply["rooms"].as_array().is_some_and(|r| !r.is_empty());
    let after = meter
        .borrow()
        .history
        .resume_point(&peer.name, room.as_str());
    let join = Request::Join {
        room: room.clone(),
        after: Some(after),
    };
    let reply = peer.call(&join).await?;
    for m in reply["missed"].as_array().cloned().unwrap_or_default() {
        let seq = m["seq"].as_i64().unwrap_or(0);
        meter
            .borrow_mut()
            .history
            .received(&peer.name, room.as_str(), Seq(seq));
    }
    if reply["truncated"] == true {
        return Err("missed was truncated".to_string());
    }
    Ok(restored)
}

/// Records message events until `until`, or until the server closes the connection.
async fn listen(
    bench: &Bench,
    peer: &mut Peer,
    room: &RoomName,
    meter: &Shared<Meter>,
    until: Instant,
) {
    // One timer for the whole listen, not one per frame: thousands of clients each receive
    // hundreds of messages a second here.
    let deadline = tokio::time::sleep_until(until.into());
    tokio::pin!(deadline);
    loop {
        let frame = tokio::select! {
            frame = peer.conn.recv() => frame,
            () = &mut deadline => return,
        };
        let frame = match frame {
            Ok(frame) => frame,
            Err(ClientError::NotJson) => continue,
            Err(_) => return,
        };
        if frame["type"] == "message" {
            meter
                .borrow_mut()
                .delivery(bench, &peer.name, room.as_str(), &frame);
        }
    }
}

fn set_figures(report: &mut Report, args: &ReconnectArgs, comeback: &Comeback, m: &Meter) {
    let all_back = comeback
        .back_times
        .iter()
        .max()
        .copied()
        .unwrap_or_default();
    report.set("clients", args.clients as u64);
    report.set("back", comeback.back_times.len() as u64);
    report.set("resumed_with_rooms", comeback.restored);
    report.set("all_back_seconds", all_back.as_secs_f64());
    let mut back = histogram();
    for t in &comeback.back_times {
        let _ = back.record(micros(*t));
    }
    report.set("back_time", summary(&back));
    report.set("failures", json!(comeback.failures));
    report.set("retried", json!(comeback.retried));
    report.set("acked", m.acked);
    report.set("errors", json!(m.errors));
}
