//! The echo scenario, a baseline: frames per second through the minimal WebSocket echo server
//! of the same stack (`echo_server`, run with `rookery-bench echo-server`). The frames are raw
//! `{"b": ...}` text on purpose: no protocol request (the echo server only echoes), but JSON, so
//! that the client's `recv` reads the echo. Calls `peer` for the connections.

use std::time::{Duration, Instant};

use crate::meter::{shared, Shared};
use crate::peer::{all, bounded, Bench, Peer};
use crate::report::Report;
use crate::EchoArgs;

pub async fn run(bench: &Bench, args: &EchoArgs, report: &mut Report) -> Result<(), String> {
    let conns = bounded(args.connections, 50, |i| async move {
        bench.connect(&format!("e{i}"), None).await
    })
    .await;
    let mut conns: Vec<Peer> = conns
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let body = "x".repeat(args.body_bytes);
    let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
    let frames = shared(0u64);
    let started = Instant::now();
    let loops = conns.iter_mut().map(|peer| {
        let (frames, body) = (frames.clone(), body.clone());
        async move { echo_loop(peer, &body, args.inflight, deadline, &frames).await }
    });
    all(loops).await;
    report.set(
        "frames_per_s",
        *frames.borrow() as f64 / started.elapsed().as_secs_f64(),
    );
    report.set("frames", *frames.borrow());
    Ok(())
}

/// One connection: keeps `inflight` frames in flight until `deadline`, then reads the rest back;
/// counts every frame echoed.
async fn echo_loop(
    peer: &mut Peer,
    body: &str,
    inflight: usize,
    deadline: Instant,
    frames: &Shared<u64>,
) {
    let mut pending = 0;
    loop {
        while Instant::now() < deadline && pending < inflight {
            if peer
                .conn
                .send_text(format!("{{\"b\":\"{body}\"}}"))
                .await
                .is_err()
            {
                return;
            }
            pending += 1;
        }
        if pending == 0 {
            return;
        }
        if peer.conn.recv_within(Duration::from_secs(5)).await.is_err() {
            return;
        }
        pending -= 1;
        *frames.borrow_mut() += 1;
    }
}
