//! The history scenario: one writer fills a room, then readers page through history below the
//! ring buffer (so every page comes from the store), measuring pages per second and their
//! latency; the checker then compares the stored room with what the writer sent. Calls `peer`
//! and `meter`.

use hdrhistogram::Histogram;
use rookery::checker::{History, Verdict};
use rookery::client::Incoming;
use rookery::ids::Seq;
use rookery::protocol::{Request, RoomName};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::meter::{histogram, micros, shared, summary, Shared};
use crate::peer::{all, bounded, stored_history, Bench, Peer};
use crate::report::Report;
use crate::HistoryArgs;

/// What the readers counted.
struct Pages {
    /// Of full pages.
    latency: Histogram<u64>,
    /// Full pages (50 messages).
    pages: u64,
    /// Pages short of 50 messages, and errors.
    bad: u64,
}

pub async fn run(bench: &Bench, args: &HistoryArgs, report: &mut Report) -> Result<(), String> {
    let mut writer = bench.login(0).await?;
    let room = bench.room(0)?;
    writer.create_room(&room).await?;
    writer.join(&room).await?;
    fill(bench, &mut writer, &room, args.messages).await?;
    let readers = bounded(args.clients, 50, |i| bench.login(i + 1)).await;
    let mut readers: Vec<Peer> = readers.into_iter().collect::<Result<_, _>>()?;
    let pages = shared(Pages {
        latency: histogram(),
        pages: 0,
        bad: 0,
    });
    let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
    let newest = args.messages as i64;
    let started = Instant::now();
    let loops = readers.iter_mut().enumerate().map(|(i, peer)| {
        let (pages, room) = (pages.clone(), room.clone());
        async move { reader(peer, i, &room, newest, deadline, &pages).await }
    });
    all(loops).await;
    let elapsed = started.elapsed().as_secs_f64();
    {
        let pages = pages.borrow();
        report.set("pages_per_s", pages.pages as f64 / elapsed);
        report.set("pages", pages.pages);
        report.set("bad_pages", pages.bad);
        report.set("latency", summary(&pages.latency));
    }
    report.verdict = Some(check(&mut writer, room, args.messages).await?);
    Ok(())
}

/// Fills `room` with `messages` messages, pipelined (64 in flight), with client_msg_ids
/// h1, h2, ...
async fn fill(
    bench: &Bench,
    writer: &mut Peer,
    room: &RoomName,
    messages: usize,
) -> Result<(), String> {
    let mut sent = 0;
    let mut acked = 0;
    while acked < messages {
        while sent < messages && sent - acked < 64 {
            sent += 1;
            let id = writer.id();
            let post = Request::Post {
                room: room.clone(),
                body: bench.body(200),
                client_msg_id: Some(format!("h{sent}")),
            };
            writer
                .conn
                .send_request(&id, &post)
                .await
                .map_err(|e| e.to_string())?;
        }
        if let Incoming::Reply { frame, .. } =
            writer.conn.next().await.map_err(|e| e.to_string())?
        {
            if frame["type"] != "ok" {
                return Err(format!("filling the room: {frame}"));
            }
            acked += 1;
        }
    }
    Ok(())
}

/// Reader `i`: asks for pages of 50 at pseudo-random places below the ring buffer until
/// `deadline`.
async fn reader(
    peer: &mut Peer,
    i: usize,
    room: &RoomName,
    newest: i64,
    deadline: Instant,
    pages: &Shared<Pages>,
) {
    let mut n = i as i64 * 7919;
    while Instant::now() < deadline {
        // Pages below the ring buffer: before in 51..=newest-100.
        n = (n * 48271 + 11) % 2_147_483_647;
        let span = (newest - 150).max(1);
        let before = 51 + n.rem_euclid(span);
        let asked = Instant::now();
        let page = Request::History {
            room: room.clone(),
            before: Some(Seq(before)),
            limit: Some(50),
        };
        match peer.call(&page).await {
            Ok(page) if page["messages"].as_array().is_some_and(|m| m.len() == 50) => {
                let mut pages = pages.borrow_mut();
                let _ = pages.latency.record(micros(asked.elapsed()));
                pages.pages += 1;
            }
            _ => pages.borrow_mut().bad += 1,
        }
    }
}

/// The checker's verdict on the stored room, against the client_msg_ids h1..h`messages` the
/// writer sent.
async fn check(writer: &mut Peer, room: RoomName, messages: usize) -> Result<Verdict, String> {
    let stored = stored_history(writer, &room).await?;
    let mut checker = History::new();
    for i in 1..=messages {
        checker.sent("w", &writer.name, room.as_str(), &format!("h{i}"));
    }
    for m in &stored {
        if let Some(key) = &m.client_msg_id {
            checker.acked("w", &writer.name, room.as_str(), key, m.seq);
        }
    }
    Ok(checker.verdict(&BTreeMap::from([(room.into_string(), stored)])))
}
