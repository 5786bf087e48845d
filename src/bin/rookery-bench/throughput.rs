//! The throughput scenario: R rooms × M members, every member sending with a bounded number of
//! sends in flight (as fast as acks come back, or at a fixed rate), measuring acks and
//! deliveries per second and their latencies. Calls `peer` and `meter`.

use rookery::protocol::RoomName;
use serde_json::json;
use std::time::{Duration, Instant};

use crate::meter::{join_each, member_loop, shared, summary, verdict, CpuClock, Meter, SendPlan};
use crate::peer::{all, login_all, settle, Bench};
use crate::report::Report;
use crate::ThroughputArgs;

pub async fn run(
    bench: &Bench,
    args: &ThroughputArgs,
    server_pid: Option<u32>,
    report: &mut Report,
) -> Result<(), String> {
    let rooms: Vec<RoomName> = (0..args.rooms)
        .map(|r| bench.room(r))
        .collect::<Result<_, _>>()?;
    let total = args.rooms * args.members;
    let mut peers = login_all(bench, total, 100).await?;
    for (r, room) in rooms.iter().enumerate() {
        peers[r * args.members].create_room(room).await?;
    }
    let meter = shared(Meter::new());
    join_each(&mut peers, &meter, |i| rooms[i / args.members].clone()).await?;
    settle(&mut peers).await;
    let started = Instant::now();
    let cpu = CpuClock::start(server_pid);
    let deadline = started + Duration::from_secs_f64(args.duration);
    let loops = peers.iter_mut().enumerate().map(|(i, peer)| {
        let room = &rooms[i / args.members];
        let meter = meter.clone();
        async move {
            let plan = SendPlan {
                inflight: args.inflight,
                rate: args.rate,
                body_bytes: args.body_bytes,
                until: deadline,
                max_sends: u64::MAX,
            };
            member_loop(bench, peer, room, &meter, plan, Duration::from_secs(2)).await
        }
    });
    all(loops).await;
    let elapsed = started
        .elapsed()
        .as_secs_f64()
        .min(args.duration.max(0.001));
    {
        let m = meter.borrow();
        report.set("acked_per_s", m.acked as f64 / elapsed);
        report.set("delivered_per_s", m.delivered as f64 / elapsed);
        report.set("acked", m.acked);
        report.set("delivered", m.delivered);
        report.set("send_to_ack", summary(&m.ack));
        report.set("send_to_deliver", summary(&m.deliver));
        report.set("errors", json!(m.errors));
        cpu.report(report, "message", m.acked);
    }
    report.verdict = Some(verdict(&mut peers[0], rooms.into_iter(), &meter).await?);
    Ok(())
}
