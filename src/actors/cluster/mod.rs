//! The Cluster actor: this node's link to the other nodes through Redis, started only when
//! `redis.url` is set. It owns the Redis connections — a deadpool-redis pool for commands and
//! one dedicated pub/sub connection — and three things built on them:
//!
//! - **the bus**: one channel, `{prefix}:bus`, that every node subscribes to. Rooms publish
//!   what their members on other nodes must see ([`Publish`]); one publisher task sends the
//!   publications in the order they were made, pipelined; what a node hears from the others is
//!   routed to its running room of that name ([`FromCluster`]); its own publications and
//!   those for rooms it does not run are dropped.
//! - **presence**: who is joined where on this node ([`LocalPresence`] from rooms) is
//!   announced on the bus as it changes and written with each heartbeat to
//!   `{prefix}:node:{id}`, which expires after `cluster.node_ttl_ms`. Every node reads the
//!   others' keys a few times per heartbeat; a node whose key is gone is dead and its users
//!   leave ([`view::RemoteView`]).
//! - **trouble**: when Redis cannot be reached, the node serves its own clients as if alone,
//!   logs the problem at most once per [`REPORT_EVERY`], and tries again with backoff. When a
//!   link comes back, the rooms read their newest seq from the store and fill what they missed
//!   ([`BusEvent::Resync`]).
//!
//! Calls: Redis, rooms (through the recipients they register with [`RoomUp`]), the reload
//! trigger. Messages: [`Publish`], [`LocalPresence`], [`RoomUp`], [`RoomDown`],
//! [`PolicyReloaded`], [`CheckRedis`], [`Leave`].

use actix::prelude::*;
use deadpool_redis::redis;
use futures_util::StreamExt;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

use crate::ids::UserId;
use crate::metrics::METRICS;

pub mod bus;
pub mod view;

pub use bus::{BusEvent, WireMessage};
use view::{Members, RemoteView, Snapshot};

/// The trigger this actor gives the policy reloader when another node reloaded: this node
/// re-reads its own file (the same file, in a cluster set up as docs/cluster.md says).
pub const RELOADED_ON_ANOTHER_NODE: &str = "reloaded on another node";

/// The most a Redis problem is logged: once per this, with a count of the ones not logged.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);
/// Every Redis command and connection attempt gives up after this.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Publications waiting for the publisher, by count and by bytes; beyond, new ones are dropped
/// and the others are told to resync (their rooms' gaps are filled from the store).
const OUTBOX: usize = 65_536;
const OUTBOX_BYTES: usize = 32 << 20;
/// Most publications sent in one pipeline.
const PUBLISH_BATCH: usize = 512;

#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub url: crate::secret::Secret,
    pub prefix: String,
    pub node_id: String,
    pub heartbeat: Duration,
    pub node_ttl: Duration,
}

impl ClusterSettings {
    fn bus(&self) -> String {
        format!("{}:bus", self.prefix)
    }
    fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }
    fn node_key(&self, node: &str) -> String {
        format!("{}:node:{node}", self.prefix)
    }
}

/// A generated node id: `node-` and 8 hex digits.
pub fn generated_node_id() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("node-{}", &id[..8])
}

/// What a node hears for one of its rooms from the others.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub enum FromCluster {
    Message {
        message: WireMessage,
        persist: bool,
    },
    Typing {
        user: String,
    },
    /// Who is joined to the room on the other nodes now.
    Members(Members),
    Member {
        user: UserId,
        added: bool,
    },
    /// Publications may have been lost: read the newest seq from the store and fill the gap.
    Resync,
}

/// Room → Cluster: tell the other nodes.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Publish(pub BusEvent);

/// Room → Cluster: a user's first session on this node joined the room, or its last left.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct LocalPresence {
    pub room: String,
    pub user: UserId,
    pub username: String,
    pub present: bool,
}

/// Room → Cluster, when it starts: route the room's events to `room`. Replies the room's
/// members on the other nodes.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Members")]
pub struct RoomUp {
    pub name: String,
    pub room: Recipient<FromCluster>,
}

/// Room → Cluster, when it stops.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct RoomDown {
    pub name: String,
    pub room: Recipient<FromCluster>,
}

/// Reloader → Cluster: this node applied a reloaded policy file.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct PolicyReloaded;

/// Readiness → Cluster: does Redis answer? `Err` says why not.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), String>")]
pub struct CheckRedis;

/// Server → Cluster, at the end: flush what is queued, remove this node's key (so the others
/// see at once that it left), stop.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Leave {
    pub graceful: bool,
}

#[derive(Debug, Message)]
#[rtype(result = "()")]
struct Received(bus::Envelope);

/// A task's report on its link to Redis.
#[derive(Debug, Message)]
#[rtype(result = "()")]
enum Link {
    Trouble(String),
    /// The subscription is (again) in place; `again` after a loss.
    Subscribed {
        again: bool,
    },
    /// Publishing works again after it failed.
    Publishing,
}

/// The other nodes' heartbeat keys, as read.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct NodesRead {
    alive: Vec<(String, Snapshot)>,
}

/// At most one report per [`REPORT_EVERY`].
#[derive(Debug, Default)]
struct Reports {
    last: Option<Instant>,
    held_back: u64,
    troubled: bool,
}

impl Reports {
    fn trouble(&mut self, what: &str) {
        self.troubled = true;
        METRICS.redis_errors.inc();
        if self.last.is_some_and(|at| at.elapsed() < REPORT_EVERY) {
            self.held_back += 1;
            return;
        }
        let more = std::mem::take(&mut self.held_back);
        if more > 0 {
            log::warn!("redis: {what} (and {more} more problems since the last report); serving this node's clients alone meanwhile");
        } else {
            log::warn!("redis: {what}; serving this node's clients alone meanwhile");
        }
        self.last = Some(Instant::now());
    }

    fn recovered(&mut self, what: &str) {
        if std::mem::take(&mut self.troubled) {
            log::info!("redis: {what}");
            self.last = None;
            self.held_back = 0;
        }
    }
}

pub struct Cluster {
    settings: ClusterSettings,
    pool: deadpool_redis::Pool,
    client: redis::Client,
    outbox: mpsc::Sender<String>,
    outbox_rx: Option<mpsc::Receiver<String>>,
    /// Bytes in the outbox, and whether anything was dropped since the last publication.
    outbox_state: Arc<OutboxState>,
    /// This process, among processes that might be given the same node id by mistake.
    instance: u64,
    local: Snapshot,
    view: RemoteView,
    rooms: HashMap<String, Recipient<FromCluster>>,
    reports: Reports,
    reading_nodes: bool,
    /// Asks this node's reloader to re-read the policy file.
    reload: Option<mpsc::UnboundedSender<&'static str>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Cluster {
    /// Checks the URL and builds the clients; connects nothing yet (a Redis that is down at
    /// start is retried like one that goes down later).
    pub fn new(
        settings: ClusterSettings,
        reload: Option<mpsc::UnboundedSender<&'static str>>,
    ) -> Result<Cluster, String> {
        let client = redis::Client::open(settings.url.expose()).map_err(|e| e.to_string())?;
        let mut config = deadpool_redis::Config::from_url(settings.url.expose());
        config.pool = Some(deadpool_redis::PoolConfig {
            max_size: 4,
            timeouts: deadpool_redis::Timeouts {
                wait: Some(REDIS_TIMEOUT),
                create: Some(REDIS_TIMEOUT),
                recycle: Some(REDIS_TIMEOUT),
            },
            ..deadpool_redis::PoolConfig::default()
        });
        let pool = config
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .map_err(|e| e.to_string())?;
        let (outbox, outbox_rx) = mpsc::channel(OUTBOX);
        Ok(Cluster {
            settings,
            pool,
            client,
            outbox,
            outbox_rx: Some(outbox_rx),
            outbox_state: Arc::default(),
            instance: rand_instance(),
            // A node restarted under the same id starts above every version it used before,
            // so the others take its new presence over what they remember of the old one.
            local: Snapshot {
                version: first_version(),
                ..Snapshot::default()
            },
            view: RemoteView::default(),
            rooms: HashMap::new(),
            reports: Reports::default(),
            reading_nodes: false,
            reload,
            tasks: Vec::new(),
        })
    }

    pub fn node_id(&self) -> &str {
        &self.settings.node_id
    }

    fn publish(&mut self, event: &BusEvent) {
        let text = bus::encode(&self.settings.node_id, self.instance, event);
        let len = text.len();
        let state = &self.outbox_state;
        let full = state.bytes.load(Ordering::Relaxed) + len > OUTBOX_BYTES;
        if full || self.outbox.try_send(text).is_err() {
            state.dropped.store(true, Ordering::Relaxed);
            self.reports
                .trouble("the publication queue is full: publications dropped");
        } else {
            state.bytes.fetch_add(len, Ordering::Relaxed);
        }
    }

    fn to_room(&self, room: &str, message: FromCluster) {
        if let Some(recipient) = self.rooms.get(room) {
            recipient.do_send(message);
        }
    }

    fn members_changed(&self, rooms: impl IntoIterator<Item = String>) {
        for room in rooms {
            self.to_room(&room, FromCluster::Members(self.view.members(&room)));
        }
    }

    fn resync_rooms(&self) {
        for room in self.rooms.values() {
            room.do_send(FromCluster::Resync);
        }
    }

    /// Writes this node's heartbeat key (its presence) and announces a beat.
    fn heartbeat(&mut self, ctx: &mut Context<Self>) {
        let pool = self.pool.clone();
        let key = self.settings.node_key(&self.settings.node_id);
        let nodes = self.settings.nodes();
        let node = self.settings.node_id.clone();
        let ttl = u64::try_from(self.settings.node_ttl.as_millis()).unwrap_or(u64::MAX);
        let snapshot = serde_json::to_string(&self.local).unwrap_or_default();
        let beat = bus::encode(&node, self.instance, &BusEvent::Beat);
        let channel = self.settings.bus();
        let write = async move {
            let mut conn = pool.get().await.map_err(|e| e.to_string())?;
            let mut pipe = redis::pipe();
            pipe.cmd("SET")
                .arg(&key)
                .arg(snapshot)
                .arg("PX")
                .arg(ttl)
                .ignore()
                .cmd("SADD")
                .arg(&nodes)
                .arg(&node)
                .ignore()
                // The list of nodes goes too when every node is gone.
                .cmd("PEXPIRE")
                .arg(&nodes)
                .arg(ttl.saturating_mul(2))
                .ignore()
                .cmd("PUBLISH")
                .arg(&channel)
                .arg(beat)
                .ignore();
            timed(pipe.query_async::<()>(&mut conn)).await
        };
        ctx.spawn(write.into_actor(self).map(|written, cluster, _| {
            if let Err(e) = written {
                cluster
                    .reports
                    .trouble(&format!("heartbeat not written: {e}"));
            }
        }));
    }

    /// Reads which nodes are alive and their presence.
    fn read_nodes(&mut self, ctx: &mut Context<Self>) {
        if std::mem::replace(&mut self.reading_nodes, true) {
            return;
        }
        let pool = self.pool.clone();
        let settings = self.settings.clone();
        let read = async move {
            let mut conn = pool.get().await.map_err(|e| e.to_string())?;
            let nodes: Vec<String> = timed(
                redis::cmd("SMEMBERS")
                    .arg(settings.nodes())
                    .query_async(&mut conn),
            )
            .await?;
            let others: Vec<String> = nodes
                .into_iter()
                .filter(|n| *n != settings.node_id)
                .collect();
            if others.is_empty() {
                return Ok(Vec::new());
            }
            let keys: Vec<String> = others.iter().map(|n| settings.node_key(n)).collect();
            let values: Vec<Option<String>> =
                timed(redis::cmd("MGET").arg(&keys).query_async(&mut conn)).await?;
            let mut alive = Vec::new();
            let mut dead = Vec::new();
            for (node, value) in others.into_iter().zip(values) {
                match value.map(|v| serde_json::from_str::<Snapshot>(&v)) {
                    Some(Ok(snapshot)) => alive.push((node, snapshot)),
                    Some(Err(e)) => {
                        log::warn!("redis: node {node} wrote an unreadable presence: {e}")
                    }
                    None => dead.push(node),
                }
            }
            if !dead.is_empty() {
                timed(
                    redis::cmd("SREM")
                        .arg(settings.nodes())
                        .arg(&dead)
                        .query_async::<()>(&mut conn),
                )
                .await?;
            }
            Ok::<_, String>(alive)
        };
        ctx.spawn(read.into_actor(self).map(|read, cluster, ctx| {
            cluster.reading_nodes = false;
            match read {
                Ok(alive) => ctx.notify(NodesRead { alive }),
                Err(e) => cluster.reports.trouble(&format!("nodes not read: {e}")),
            }
        }));
    }

    fn received(&mut self, envelope: bus::Envelope) {
        if envelope.node == self.settings.node_id {
            if envelope.instance.is_some_and(|i| i != self.instance) {
                self.reports.trouble(&format!(
                    "another process publishes as node {}: give each node its own cluster.node_id",
                    self.settings.node_id
                ));
            }
            return;
        }
        match envelope.event {
            BusEvent::Message {
                room,
                persist,
                message,
            } => self.to_room(&room, FromCluster::Message { message, persist }),
            BusEvent::Typing { room, user } => self.to_room(&room, FromCluster::Typing { user }),
            BusEvent::Presence {
                version,
                room,
                user,
                username,
                present,
            } => {
                let changed =
                    self.view
                        .event(&envelope.node, version, &room, user, &username, present);
                self.members_changed(changed);
            }
            BusEvent::Member { room, user, added } => {
                self.to_room(&room, FromCluster::Member { user, added })
            }
            BusEvent::Reload => {
                if let Some(reload) = &self.reload {
                    let _ = reload.send(RELOADED_ON_ANOTHER_NODE);
                }
            }
            BusEvent::Resync => self.resync_rooms(),
            BusEvent::Beat | BusEvent::Unknown => {}
        }
    }
}

/// The microseconds since 1970: no process makes a million presence changes per second.
fn first_version() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2))
}

async fn timed<T>(
    command: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(REDIS_TIMEOUT, command).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {REDIS_TIMEOUT:?}")),
    }
}

#[derive(Debug, Default)]
struct OutboxState {
    bytes: AtomicUsize,
    dropped: AtomicBool,
}

fn rand_instance() -> u64 {
    // The low half of a v4 UUID: random.
    (uuid::Uuid::new_v4().as_u128() & u128::from(u64::MAX)) as u64
}

/// Sends the outbox's publications in order, pipelined. A batch that fails is tried again
/// with backoff (a repeat is harmless: rooms drop seqs they delivered, presence carries
/// versions); once publications were dropped, a [`BusEvent::Resync`] follows the next batch
/// that goes through, so the others fill what they missed from the store.
async fn publisher(
    pool: deadpool_redis::Pool,
    channel: String,
    resync: String,
    mut outbox: mpsc::Receiver<String>,
    state: Arc<OutboxState>,
    cluster: Addr<Cluster>,
) {
    let mut failing = false;
    let mut backoff = BACKOFF_MIN;
    let mut batch: Vec<String> = Vec::with_capacity(PUBLISH_BATCH);
    loop {
        if batch.is_empty() {
            if outbox.recv_many(&mut batch, PUBLISH_BATCH).await == 0 {
                return;
            }
            let taken: usize = batch.iter().map(String::len).sum();
            state.bytes.fetch_sub(taken, Ordering::Relaxed);
        }
        let dropped = state.dropped.swap(false, Ordering::Relaxed);
        let sent = async {
            let mut conn = pool.get().await.map_err(|e| e.to_string())?;
            let mut pipe = redis::pipe();
            for text in &batch {
                pipe.cmd("PUBLISH").arg(&channel).arg(text).ignore();
            }
            if dropped || failing {
                pipe.cmd("PUBLISH").arg(&channel).arg(&resync).ignore();
            }
            timed(pipe.query_async::<()>(&mut conn)).await
        }
        .await;
        match sent {
            Ok(()) => {
                batch.clear();
                backoff = BACKOFF_MIN;
                if std::mem::take(&mut failing) {
                    cluster.do_send(Link::Publishing);
                }
            }
            Err(e) => {
                if dropped {
                    state.dropped.store(true, Ordering::Relaxed);
                }
                failing = true;
                cluster.do_send(Link::Trouble(format!("publishing failed: {e}")));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Keeps the one subscription to the bus open, opening it again (with backoff) when it
/// fails or goes silent.
async fn subscriber(
    client: redis::Client,
    channel: String,
    silence: Duration,
    cluster: Addr<Cluster>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut again = false;
    loop {
        let opened = timed(async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok(pubsub)
        })
        .await;
        match opened {
            Ok(pubsub) => {
                backoff = BACKOFF_MIN;
                cluster.do_send(Link::Subscribed { again });
                again = true;
                let mut messages = pubsub.into_on_message();
                loop {
                    match tokio::time::timeout(silence, messages.next()).await {
                        Ok(Some(message)) => match bus::decode(message.get_payload_bytes()) {
                            Ok(envelope) => cluster.do_send(Received(envelope)),
                            Err(e) => log::debug!("redis: an unreadable publication: {e}"),
                        },
                        Ok(None) => {
                            cluster.do_send(Link::Trouble("the subscription closed".into()));
                            break;
                        }
                        Err(_) => {
                            cluster.do_send(Link::Trouble(format!(
                                "the subscription was silent for {silence:?}"
                            )));
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                again = true;
                cluster.do_send(Link::Trouble(format!("cannot subscribe: {e}")));
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

impl Actor for Cluster {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        log::info!(
            "cluster: node {} on redis (prefix {}), heartbeat {:?}, node ttl {:?}",
            self.settings.node_id,
            self.settings.prefix,
            self.settings.heartbeat,
            self.settings.node_ttl
        );
        if let Some(outbox) = self.outbox_rx.take() {
            self.tasks.push(actix::spawn(publisher(
                self.pool.clone(),
                self.settings.bus(),
                bus::encode(&self.settings.node_id, self.instance, &BusEvent::Resync),
                outbox,
                self.outbox_state.clone(),
                ctx.address(),
            )));
        }
        // Every node beats once per heartbeat: twice that without a word is a dead link.
        let silence = self.settings.heartbeat * 2 + Duration::from_secs(1);
        self.tasks.push(actix::spawn(subscriber(
            self.client.clone(),
            self.settings.bus(),
            silence,
            ctx.address(),
        )));
        self.heartbeat(ctx);
        self.read_nodes(ctx);
        ctx.run_interval(self.settings.heartbeat, |cluster, ctx| {
            cluster.heartbeat(ctx)
        });
        let check =
            (self.settings.heartbeat / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        ctx.run_interval(check, |cluster, ctx| cluster.read_nodes(ctx));
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}

impl Handler<Publish> for Cluster {
    type Result = ();
    fn handle(&mut self, msg: Publish, _: &mut Context<Self>) {
        self.publish(&msg.0);
    }
}

impl Handler<LocalPresence> for Cluster {
    type Result = ();
    fn handle(&mut self, msg: LocalPresence, _: &mut Context<Self>) {
        if !self
            .local
            .set(&msg.room, msg.user, &msg.username, msg.present)
        {
            return;
        }
        self.local.version += 1;
        let event = BusEvent::Presence {
            version: self.local.version,
            room: msg.room,
            user: msg.user,
            username: msg.username,
            present: msg.present,
        };
        self.publish(&event);
    }
}

impl Handler<RoomUp> for Cluster {
    type Result = MessageResult<RoomUp>;
    fn handle(&mut self, msg: RoomUp, _: &mut Context<Self>) -> Self::Result {
        let members = self.view.members(&msg.name);
        self.rooms.insert(msg.name, msg.room);
        MessageResult(members)
    }
}

impl Handler<RoomDown> for Cluster {
    type Result = ();
    fn handle(&mut self, msg: RoomDown, _: &mut Context<Self>) {
        if self.rooms.get(&msg.name) == Some(&msg.room) {
            self.rooms.remove(&msg.name);
        }
    }
}

impl Handler<PolicyReloaded> for Cluster {
    type Result = ();
    fn handle(&mut self, _: PolicyReloaded, _: &mut Context<Self>) {
        self.publish(&BusEvent::Reload);
    }
}

impl Handler<Received> for Cluster {
    type Result = ();
    fn handle(&mut self, msg: Received, _: &mut Context<Self>) {
        self.received(msg.0);
    }
}

impl Handler<Link> for Cluster {
    type Result = ();
    fn handle(&mut self, msg: Link, ctx: &mut Context<Self>) {
        match msg {
            Link::Trouble(what) => self.reports.trouble(&what),
            Link::Subscribed { again } => {
                if again {
                    self.reports
                        .recovered("subscribed again: cross-node delivery resumes");
                }
                // Rooms started before the subscription was in place may have missed
                // publications.
                self.resync_rooms();
                self.read_nodes(ctx);
            }
            Link::Publishing => self.reports.recovered("publishing again"),
        }
    }
}

impl Handler<NodesRead> for Cluster {
    type Result = ();
    fn handle(&mut self, msg: NodesRead, _: &mut Context<Self>) {
        let alive: BTreeSet<String> = msg.alive.iter().map(|(node, _)| node.clone()).collect();
        let mut changed = BTreeSet::new();
        for (node, snapshot) in msg.alive {
            changed.extend(self.view.snapshot(&node, snapshot));
        }
        let (gone, dead) = self.view.keep_only(&alive);
        for node in dead {
            log::warn!(
                "cluster: node {node} is gone (no heartbeat for {:?}); its users left",
                self.settings.node_ttl
            );
        }
        changed.extend(gone);
        self.members_changed(changed);
    }
}

impl Handler<CheckRedis> for Cluster {
    type Result = ResponseFuture<Result<(), String>>;
    fn handle(&mut self, _: CheckRedis, _: &mut Context<Self>) -> Self::Result {
        let pool = self.pool.clone();
        Box::pin(async move {
            let mut conn = pool.get().await.map_err(|e| e.to_string())?;
            timed(redis::cmd("PING").query_async::<String>(&mut conn))
                .await
                .map(|_| ())
        })
    }
}

impl Handler<Leave> for Cluster {
    type Result = ResponseActFuture<Self, ()>;
    fn handle(&mut self, msg: Leave, _: &mut Context<Self>) -> Self::Result {
        if !msg.graceful {
            return Box::pin(fut::ready(()).map(|_, _, ctx: &mut Context<Self>| ctx.stop()));
        }
        let outbox = self.outbox.clone();
        let state = self.outbox_state.clone();
        let pool = self.pool.clone();
        let key = self.settings.node_key(&self.settings.node_id);
        let nodes = self.settings.nodes();
        let node = self.settings.node_id.clone();
        Box::pin(
            async move {
                // What the drained sessions' rooms published goes out first.
                let deadline = Instant::now() + REDIS_TIMEOUT;
                while (outbox.capacity() < outbox.max_capacity()
                    || state.bytes.load(Ordering::Relaxed) > 0)
                    && Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                if let Ok(mut conn) = pool.get().await {
                    let mut pipe = redis::pipe();
                    pipe.cmd("DEL").arg(&key).ignore();
                    pipe.cmd("SREM").arg(&nodes).arg(&node).ignore();
                    let _ = timed(pipe.query_async::<()>(&mut conn)).await;
                }
            }
            .into_actor(self)
            .map(|_, _, ctx| ctx.stop()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trouble_is_reported_once_per_interval_and_recovery_once() {
        let mut reports = Reports::default();
        reports.trouble("cannot subscribe");
        assert!(reports.last.is_some());
        for _ in 0..5 {
            reports.trouble("cannot subscribe");
        }
        assert_eq!(reports.held_back, 5);
        reports.recovered("subscribed again");
        assert!(!reports.troubled);
        assert_eq!((reports.last, reports.held_back), (None, 0));
        // Nothing to recover from: nothing is said.
        reports.recovered("subscribed again");
        reports.trouble("publishing failed");
        assert_eq!(reports.held_back, 0);
    }

    #[test]
    fn generated_node_ids_are_distinct_and_valid() {
        let (a, b) = (generated_node_id(), generated_node_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), "node-".len() + 8);
        assert!(a.starts_with("node-"));
    }
}
