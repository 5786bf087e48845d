//! The process's Prometheus metrics: one registry, and a named handle per figure that every
//! layer updates where the thing happens. Imports nothing of the crate; [`render`] writes the
//! text exposition format that `GET /metrics` serves.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use std::sync::LazyLock;

/// Every figure the server exports.
pub struct Metrics {
    registry: Registry,
    pub connections_open: IntGauge,
    pub sessions_authenticated: IntGauge,
    pub rooms_active: IntGauge,
    pub messages_received: IntCounter,
    pub messages_stored: IntCounter,
    pub messages_delivered: IntCounter,
    pub errors: IntCounterVec,
    pub closes: IntCounterVec,
    pub db_queue_depth: IntGauge,
    pub commit_batch_messages: Histogram,
    pub store_seconds: Histogram,
    pub logins: IntCounterVec,
    pub rate_limited: IntCounter,
    pub reloads: IntCounterVec,
    pub kicks: IntCounterVec,
    pub redis_errors: IntCounter,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// Register-or-die is fine here: names are constants of this file and unique; a clash is a
/// programming error caught by the first test that touches the metrics.
#[allow(clippy::expect_used)]
fn registered<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, m: M) -> M {
    registry
        .register(Box::new(m.clone()))
        .expect("metric names are unique");
    m
}

#[allow(clippy::expect_used)]
impl Metrics {
    fn new() -> Metrics {
        let r = Registry::new_custom(Some("rookery".into()), None).expect("a valid prefix");
        let gauge = |name: &str, help: &str| {
            registered(&r, IntGauge::new(name, help).expect("a valid gauge"))
        };
        let counter = |name: &str, help: &str| {
            registered(&r, IntCounter::new(name, help).expect("a valid counter"))
        };
        let counters = |name: &str, help: &str, label: &str| {
            registered(
                &r,
                IntCounterVec::new(Opts::new(name, help), &[label]).expect("a valid counter"),
            )
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            registered(
                &r,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                    .expect("a valid histogram"),
            )
        };
        let seconds = vec![
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
        ];
        Metrics {
            connections_open: gauge("connections_open", "Open WebSocket connections."),
            sessions_authenticated: gauge(
                "sessions_authenticated",
                "Connections that are logged in or resumed.",
            ),
            rooms_active: gauge("rooms_active", "Room actors running on this node."),
            messages_received: counter(
                "messages_received_total",
                "Sends accepted from clients (before storage).",
            ),
            messages_stored: counter(
                "messages_stored_total",
                "Messages committed to the database (acked).",
            ),
            messages_delivered: counter(
                "messages_delivered_total",
                "Message events handed to connections on this node.",
            ),
            errors: counters(
                "errors_total",
                "Error replies sent, by protocol error code.",
                "code",
            ),
            closes: counters(
                "closes_total",
                "Connections closed by the server, by WebSocket close code.",
                "code",
            ),
            db_queue_depth: gauge(
                "db_queue_depth",
                "Requests queued or running on the DB executors' read lane.",
            ),
            commit_batch_messages: histogram(
                "commit_batch_messages",
                "Messages per commit transaction.",
                vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0],
            ),
            store_seconds: histogram(
                "store_seconds",
                "Time from a commit transaction's start to its commit.",
                seconds,
            ),
            logins: counters(
                "logins_total",
                "Login attempts, by result (ok, invalid_credentials, refused).",
                "result",
            ),
            rate_limited: counter(
                "rate_limited_total",
                "Requests and connections refused by a rate limit.",
            ),
            reloads: counters(
                "policy_reloads_total",
                "Room policy file reloads, by result (applied, invalid).",
                "result",
            ),
            kicks: counters(
                "kicks_total",
                "Users kicked from rooms, by reason.",
                "reason",
            ),
            redis_errors: counter(
                "redis_errors_total",
                "Failed Redis commands and lost subscriptions.",
            ),
            registry: r,
        }
    }
}

/// One unit of a gauge for as long as it lives (an open connection, a running room).
#[derive(Debug)]
pub struct Held(&'static IntGauge);

impl Held {
    pub fn new(gauge: &'static IntGauge) -> Held {
        gauge.inc();
        Held(gauge)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Every metric in the Prometheus text exposition format.
pub fn render() -> String {
    let mut out = Vec::new();
    let families = METRICS.registry.gather();
    if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
        log::warn!("metrics could not be encoded: {e}");
    }
    String::from_utf8(out).unwrap_or_default()
}
