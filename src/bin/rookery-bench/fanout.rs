//! The fan-out scenario: one room with many members and a few senders, measuring deliveries
//! per second and the latency to every member and to the last one. Calls `peer` and `meter`.

use rookery::ids::Seq;
use rookery::protocol::RoomName;
use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::meter::{
    histogram, member_loop, micros, shared, summary, verdict, CpuClock, Meter, SendPlan, Shared,
};
use crate::peer::{all, login_all, settle, Bench, Peer};
use crate::report::Report;
use crate::FanoutArgs;

/// Per seq: the latest delivery time across members, for latency to the last member.
type LastDelivery = Shared<HashMap<i64, Duration>>;

pub async fn run(
    bench: &Bench,
    args: &FanoutArgs,
    server_pid: Option<u32>,
    report: &mut Report,
) -> Result<(), String> {
    let room = bench.room(0)?;
    let mut peers = login_all(bench, args.members, 100).await?;
    peers[0].create_room(&room).await?;
    let meter = shared(Meter::new());
    let senders = args.senders.clamp(1, args.members);
    join_members(&mut peers, &room, senders, &meter).await?;
    settle(&mut peers).await;
    let last_delivery: LastDelivery = shared(HashMap::new());
    let per_sender = args.messages.div_ceil(senders);
    let rate = if args.rate > 0.0 {
        args.rate / senders as f64
    } else {
        0.0
    };
    let started = Instant::now();
    let cpu = CpuClock::start(server_pid);
    let (sending, listening) = peers.split_at_mut(senders);
    let send_loops = sending.iter_mut().map(|peer| {
        let meter = meter.clone();
        let room = room.clone();
        async move {
            // Senders are members too; they stop after their share of the messages.
            let plan = SendPlan {
                inflight: args.inflight,
                rate,
                body_bytes: args.body_bytes,
                until: Instant::now() + Duration::from_secs(3600),
                max_sends: per_sender as u64,
            };
            member_loop(bench, peer, &room, &meter, plan, Duration::from_secs(2)).await
        }
    });
    let expected = (per_sender * senders) as u64;
    let listen_loops = listening.iter_mut().map(|peer| {
        let meter = meter.clone();
        let last_delivery = last_delivery.clone();
        let room = room.clone();
        async move { listener(bench, peer, &room, &meter, &last_delivery, expected).await }
    });
    futures_util::future::join(all(send_loops), all(listen_loops)).await;
    // Up to the last delivery: the senders then wait for a quiet moment before they stop, which
    // is not time spent delivering.
    let ended = meter
        .borrow()
        .last_delivered_at
        .unwrap_or_else(Instant::now);
    let elapsed = ended.saturating_duration_since(started).as_secs_f64();
    set_figures(report, &meter.borrow(), &last_delivery.borrow(), elapsed);
    cpu.report(report, "delivery", meter.borrow().delivered);
    report.verdict = Some(verdict(&mut peers[0], std::iter::once(room), &meter).await?);
    Ok(())
}

/// Joins every member to `room`, one after the other.
async fn join_members(
    peers: &mut [Peer],
    room: &RoomName,
    senders: usize,
    meter: &Shared<Meter>,
) -> Result<(), String> {
    for (i, peer) in peers.iter_mut().enumerate() {
        let reply = peer.join(room).await?;
        let last = Seq(reply["room"]["last_seq"].as_i64().unwrap_or(0));
        // Senders only send; the other members must receive everything.
        if i >= senders {
            meter
                .borrow_mut()
                .history
                .covers(&peer.name, room.as_str(), last, None);
        }
    }
    Ok(())
}

fn set_figures(
    report: &mut Report,
    m: &Meter,
    last_delivery: &HashMap<i64, Duration>,
    elapsed: f64,
) {
    let mut to_last = histogram();
    for (_, at) in last_delivery.iter() {
        let _ = to_last.record(micros(*at));
    }
    report.set("deliveries_per_s", m.delivered as f64 / elapsed.max(0.001));
    report.set("delivered", m.delivered);
    report.set("acked", m.acked);
    report.set("send_to_deliver", summary(&m.deliver));
    report.set("send_to_deliver_last_member", summary(&to_last));
    report.set("send_to_ack", summary(&m.ack));
    report.set("errors", json!(m.errors));
}

/// A member that only listens: records every message until it has seen `expected` of them.
async fn listener(
    bench: &Bench,
    peer: &mut Peer,
    room: &RoomName,
    meter: &Shared<Meter>,
    last_delivery: &LastDelivery,
    expected: u64,
) {
    let mut got = 0;
    while got < expected {
        let Ok(frame) = peer.conn.recv_within(Duration::from_secs(60)).await else {
            return;
        };
        if frame["type"] != "message" {
            continue;
        }
        got += 1;
        let seq = frame["seq"].as_i64().unwrap_or(0);
        let latency = meter
            .borrow_mut()
            .delivery(bench, &peer.name, room.as_str(), &frame);
        if let Some(latency) = latency {
            let mut last = last_delivery.borrow_mut();
            let entry = last.entry(seq).or_default();
            *entry = (*entry).max(latency);
        }
    }
}
