//! Several replicas sharing one Redis: any replica accepts any RPC, while a
//! host's stream lives on one. Redis carries
//!
//! * **ownership**: `{ns}:host:{id}` = `{replica}:{generation}` with a TTL,
//!   refreshed every second by the replica holding the stream (a newer
//!   generation always wins), and `{ns}:replica:{id}`, a short-lived "alive" key;
//! * **commands**: published on `{ns}:cmd:{owner}`; the owner runs them through
//!   its local router and publishes the result on `{ns}:reply:{caller}`. A
//!   command for a host whose owner is gone fails at once (`NotConnected`),
//!   not after its deadline;
//! * **events**: published on `{ns}:events` and re-broadcast on every other
//!   replica, so WatchSession and the dispatcher see changes made anywhere;
//! * **session keys** of fulfilled pending sessions, which live in the memory
//!   of the replica that took the Allocate: a watcher elsewhere asks on
//!   `{ns}:key-request` and the holder answers it alone (the key crosses Redis
//!   in flight, once, and is never stored there).
//!
//! [`RedisCluster`] is both the [`CommandRouter`] and the [`EventBus`]; the
//! in-process `LocalRouter` / `LocalEventBus` are the embedded default.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use base64::{Engine as _, engine::general_purpose::STANDARD};
use deadpool_redis::redis::{self, AsyncCommands};
use futures::StreamExt;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use switchboard_proto::v1::{Command, CommandResult, command};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    events::{Event, EventBus},
    fleet::{CommandRouter, ConnectionRegistry, LocalRouter, RouteError},
};

/// Bound on each Redis call on a request path.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);
/// How often ownership and the alive key are refreshed.
const REFRESH: Duration = Duration::from_secs(1);
/// A replica that stopped refreshing is dead after this.
const ALIVE_TTL: Duration = Duration::from_secs(3);
/// Events waiting to be published before new ones are dropped (and logged).
const EVENT_QUEUE: usize = 8192;

/// Sets the ownership key unless a newer generation holds it.
const CLAIM_SCRIPT: &str = "local cur = redis.call('GET', KEYS[1]) \
    if cur then local g = tonumber(string.match(cur, ':(%d+)$')) \
      if g and g > tonumber(ARGV[2]) then return 0 end end \
    redis.call('SET', KEYS[1], ARGV[1] .. ':' .. ARGV[2], 'PX', ARGV[3]) return 1";
/// Deletes the ownership key if it is still ours.
const RELEASE_SCRIPT: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

/// A Redis pool whose waits, connects and recycles all give up after
/// `timeout`, so that a Redis outage turns into errors, not hung calls.
pub(crate) fn bounded_pool(url: &str, timeout: Duration) -> anyhow::Result<deadpool_redis::Pool> {
    let mut config = deadpool_redis::Config::from_url(url);
    let mut pool = deadpool_redis::PoolConfig::default();
    pool.timeouts.wait = Some(timeout);
    pool.timeouts.create = Some(timeout);
    pool.timeouts.recycle = Some(timeout);
    config.pool = Some(pool);
    Ok(config.create_pool(Some(deadpool_redis::Runtime::Tokio1))?)
}

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// May carry a password: a `Secret`, so it never prints.
    pub url: crate::config::Secret,
    pub namespace: String,
    pub replica_id: String,
    /// How long a host stays owned by a replica that stopped refreshing.
    pub ownership_ttl: Duration,
}

#[derive(Serialize, Deserialize)]
struct RoutedCommand {
    request_id: String,
    reply_to: String,
    host_id: String,
    timeout_ms: u64,
    /// A prost-encoded `Command` carrying the kind.
    command: String,
}

#[derive(Serialize, Deserialize)]
struct KeyRequest {
    request_id: String,
    reply_to: String,
    session_id: uuid::Uuid,
}

#[derive(Serialize, Deserialize)]
enum Outcome {
    /// A session key handed over to the replica whose watcher asked.
    Key(String),
    /// A prost-encoded `CommandResult`.
    Ok(String),
    NotConnected,
    Gone,
    Timeout,
    Refused(String),
}

#[derive(Serialize, Deserialize)]
struct RoutedReply {
    request_id: String,
    outcome: Outcome,
}

#[derive(Serialize, Deserialize)]
struct EventEnvelope {
    origin: String,
    event: Event,
}

struct Inner {
    options: ClusterOptions,
    pool: deadpool_redis::Pool,
    client: redis::Client,
    registry: Arc<ConnectionRegistry>,
    local: LocalRouter,
    pending: Mutex<HashMap<String, oneshot::Sender<Outcome>>>,
    events: broadcast::Sender<Event>,
    outgoing: mpsc::Sender<Event>,
    outgoing_rx: Mutex<Option<mpsc::Receiver<Event>>>,
    /// This replica's pending sessions, whose keys other replicas' watchers ask for.
    session_keys: std::sync::OnceLock<crate::allocation::PendingSessions>,
}

/// The Redis router and event bus of one replica; cheap to clone.
#[derive(Clone)]
pub struct RedisCluster {
    inner: Arc<Inner>,
}

impl RedisCluster {
    pub fn new(
        options: ClusterOptions,
        registry: Arc<ConnectionRegistry>,
        event_buffer: usize,
    ) -> anyhow::Result<Self> {
        let pool = bounded_pool(options.url.expose(), REDIS_TIMEOUT)?;
        let client = redis::Client::open(options.url.expose())?;
        let (outgoing, outgoing_rx) = mpsc::channel(EVENT_QUEUE);
        Ok(RedisCluster {
            inner: Arc::new(Inner {
                local: LocalRouter::new(registry.clone()),
                registry,
                pool,
                client,
                pending: Mutex::new(HashMap::new()),
                events: broadcast::channel(event_buffer).0,
                outgoing,
                outgoing_rx: Mutex::new(Some(outgoing_rx)),
                session_keys: std::sync::OnceLock::new(),
                options,
            }),
        })
    }

    /// Lets other replicas' watchers take the keys of sessions this one fulfils.
    pub fn serve_session_keys(&self, pending: crate::allocation::PendingSessions) {
        let _ = self.inner.session_keys.set(pending);
    }

    /// Takes the key of a fulfilled pending session from whichever replica
    /// holds it (once); None if no replica answers within `wait`.
    pub async fn take_session_key(&self, session_id: uuid::Uuid, wait: Duration) -> Option<String> {
        let request_id = uuid::Uuid::new_v4().to_string();
        let request = KeyRequest { request_id: request_id.clone(), reply_to: self.me().to_owned(), session_id };
        let payload = serde_json::to_vec(&request).ok()?;
        let (waiter, answer) = oneshot::channel();
        self.pending().insert(request_id.clone(), waiter);
        let published = match self.connection().await {
            Ok(mut connection) => connection.publish::<_, _, i64>(self.key("key-request"), payload).await.is_ok(),
            Err(_) => false,
        };
        let outcome = if published { tokio::time::timeout(wait, answer).await.ok().and_then(Result::ok) } else { None };
        self.pending().remove(&request_id);
        match outcome {
            Some(Outcome::Key(key)) => Some(key),
            _ => None,
        }
    }

    async fn answer_key_request(&self, request: KeyRequest) {
        let Some(key) = self.inner.session_keys.get().and_then(|pending| pending.take_key(request.session_id)) else {
            return;
        };
        let reply = RoutedReply { request_id: request.request_id, outcome: Outcome::Key(key) };
        let Ok(payload) = serde_json::to_vec(&reply) else { return };
        if let Ok(mut connection) = self.connection().await {
            let sent: Result<i64, _> =
                connection.publish(self.key(&format!("reply:{}", request.reply_to)), payload).await;
            if let Err(error) = sent {
                warn!(%error, session_id = %request.session_id, "could not hand a session key over");
            }
        }
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.inner.options.namespace)
    }

    fn me(&self) -> &str {
        &self.inner.options.replica_id
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Outcome>>> {
        self.inner.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn connection(&self) -> Result<deadpool_redis::Connection, RouteError> {
        self.inner.pool.get().await.map_err(|error| RouteError::Unavailable(format!("redis: {error}")))
    }

    /// Runs the subscriber, the event publisher and the ownership refresher
    /// until `shutdown`; each reconnects by itself when Redis comes back.
    pub async fn run(self, shutdown: CancellationToken) {
        let outgoing = self.inner.outgoing_rx.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(self.clone().subscribe_loop(shutdown.clone()));
        tasks.spawn(self.clone().refresh_loop(shutdown.clone()));
        if let Some(outgoing) = outgoing {
            tasks.spawn(self.clone().publish_loop(outgoing, shutdown.clone()));
        }
        while tasks.join_next().await.is_some() {}
        self.release_all().await;
    }

    async fn subscribe_loop(self, shutdown: CancellationToken) {
        let channels = [
            self.key(&format!("cmd:{}", self.me())),
            self.key(&format!("reply:{}", self.me())),
            self.key("events"),
            self.key("key-request"),
        ];
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.inner.client.get_async_pubsub().await {
                Ok(mut pubsub) => {
                    let mut subscribed = true;
                    for channel in &channels {
                        if let Err(error) = pubsub.subscribe(channel).await {
                            warn!(%error, "could not subscribe to the cluster channels");
                            subscribed = false;
                            break;
                        }
                    }
                    if subscribed {
                        info!(replica = %self.me(), "cluster link up");
                        backoff = Duration::from_millis(100);
                        let mut messages = pubsub.on_message();
                        loop {
                            tokio::select! {
                                _ = shutdown.cancelled() => return,
                                message = messages.next() => match message {
                                    Some(message) => self.dispatch(message.get_channel_name(), message.get_payload_bytes()),
                                    None => break,
                                },
                            }
                        }
                        warn!("cluster link lost; reconnecting");
                    }
                }
                Err(error) => debug!(%error, "redis unavailable for the cluster link"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    fn dispatch(&self, channel: &str, payload: &[u8]) {
        if channel.ends_with(":events") {
            match serde_json::from_slice::<EventEnvelope>(payload) {
                Ok(envelope) if envelope.origin != self.me() => {
                    let _ = self.inner.events.send(envelope.event);
                }
                Ok(_) => {}
                Err(error) => warn!(%error, "unreadable cluster event"),
            }
        } else if channel.ends_with(":key-request") {
            match serde_json::from_slice::<KeyRequest>(payload) {
                Ok(request) if request.reply_to != self.me() => {
                    let cluster = self.clone();
                    tokio::spawn(async move { cluster.answer_key_request(request).await });
                }
                Ok(_) => {}
                Err(error) => warn!(%error, "unreadable session key request"),
            }
        } else if channel.contains(":reply:") {
            match serde_json::from_slice::<RoutedReply>(payload) {
                Ok(reply) => {
                    if let Some(waiter) = self.pending().remove(&reply.request_id) {
                        let _ = waiter.send(reply.outcome);
                    }
                }
                Err(error) => warn!(%error, "unreadable cluster reply"),
            }
        } else {
            match serde_json::from_slice::<RoutedCommand>(payload) {
                Ok(routed) => {
                    let cluster = self.clone();
                    tokio::spawn(async move { cluster.execute(routed).await });
                }
                Err(error) => warn!(%error, "unreadable routed command"),
            }
        }
    }

    /// A command another replica routed here: run it locally, send the result back.
    async fn execute(&self, routed: RoutedCommand) {
        let kind = STANDARD
            .decode(&routed.command)
            .ok()
            .and_then(|bytes| Command::decode(bytes.as_slice()).ok())
            .and_then(|command| command.kind);
        let outcome = match kind {
            None => Outcome::Refused("unreadable routed command".into()),
            Some(kind) => {
                let timeout = Duration::from_millis(routed.timeout_ms);
                match self.inner.local.send(&routed.host_id, kind, timeout).await {
                    Ok(result) => Outcome::Ok(STANDARD.encode(result.encode_to_vec())),
                    Err(RouteError::NotConnected) => Outcome::NotConnected,
                    Err(RouteError::Gone) => Outcome::Gone,
                    Err(RouteError::Timeout(_)) => Outcome::Timeout,
                    Err(RouteError::Refused(error)) => Outcome::Refused(error),
                    Err(RouteError::Unavailable(error)) => Outcome::Refused(error),
                }
            }
        };
        let reply = RoutedReply { request_id: routed.request_id, outcome };
        let Ok(payload) = serde_json::to_vec(&reply) else { return };
        let channel = self.key(&format!("reply:{}", routed.reply_to));
        match self.connection().await {
            Ok(mut connection) => {
                let sent: Result<i64, _> = connection.publish(channel, payload).await;
                if let Err(error) = sent {
                    warn!(%error, "could not send a routed command's result back");
                }
            }
            Err(error) => warn!(%error, "could not send a routed command's result back"),
        }
    }

    async fn publish_loop(self, mut outgoing: mpsc::Receiver<Event>, shutdown: CancellationToken) {
        let channel = self.key("events");
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                event = outgoing.recv() => match event { Some(event) => event, None => return },
            };
            let envelope = EventEnvelope { origin: self.me().to_owned(), event };
            let Ok(payload) = serde_json::to_vec(&envelope) else { continue };
            match self.connection().await {
                Ok(mut connection) => {
                    let sent: Result<i64, _> = connection.publish(&channel, payload).await;
                    if let Err(error) = sent {
                        debug!(%error, "could not publish an event to other replicas");
                    }
                }
                Err(error) => debug!(%error, "could not publish an event to other replicas"),
            }
        }
    }

    /// Keeps this replica's alive key and its hosts' ownership fresh.
    async fn refresh_loop(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(error) = self.refresh_once().await {
                debug!(%error, "could not refresh host ownership");
            }
        }
    }

    async fn refresh_once(&self) -> Result<(), RouteError> {
        let mut connection = self.connection().await?;
        let ttl_ms = u64::try_from(self.inner.options.ownership_ttl.as_millis()).unwrap_or(u64::MAX);
        let alive_ms = u64::try_from(ALIVE_TTL.as_millis()).unwrap_or(u64::MAX);
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(self.key(&format!("replica:{}", self.me()))).arg("1").arg("PX").arg(alive_ms).ignore();
        for (host_id, generation) in self.inner.registry.generations() {
            pipe.cmd("EVAL")
                .arg(CLAIM_SCRIPT)
                .arg(1)
                .arg(self.key(&format!("host:{host_id}")))
                .arg(self.me())
                .arg(generation)
                .arg(ttl_ms)
                .ignore();
        }
        let result: Result<(), _> = tokio::time::timeout(REDIS_TIMEOUT * 5, pipe.query_async(&mut *connection))
            .await
            .map_err(|_| RouteError::Unavailable("redis did not answer in time".into()))?;
        result.map_err(|error| RouteError::Unavailable(format!("redis: {error}")))
    }

    /// On the way out: this replica is no longer alive and owns nothing, so
    /// commands for its hosts fail at once until they reconnect elsewhere.
    async fn release_all(&self) {
        let Ok(mut connection) = self.connection().await else { return };
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(self.key(&format!("replica:{}", self.me()))).ignore();
        for (host_id, generation) in self.inner.registry.generations() {
            pipe.cmd("EVAL")
                .arg(RELEASE_SCRIPT)
                .arg(1)
                .arg(self.key(&format!("host:{host_id}")))
                .arg(format!("{}:{generation}", self.me()))
                .ignore();
        }
        let _: Result<(), _> =
            tokio::time::timeout(REDIS_TIMEOUT, pipe.query_async(&mut *connection)).await.unwrap_or(Ok(()));
    }

    /// Of `host_ids`, those no live replica holds (never claimed, expired, or
    /// claimed by a replica that stopped refreshing).
    pub async fn unowned(&self, host_ids: &[String]) -> Result<Vec<String>, RouteError> {
        if host_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut connection = self.connection().await?;
        let keys: Vec<String> = host_ids.iter().map(|id| self.key(&format!("host:{id}"))).collect();
        let values: Vec<Option<String>> = tokio::time::timeout(REDIS_TIMEOUT, connection.mget(keys))
            .await
            .map_err(|_| RouteError::Unavailable("redis did not answer in time".into()))?
            .map_err(|error| RouteError::Unavailable(format!("redis: {error}")))?;
        let owners: Vec<Option<String>> = values
            .into_iter()
            .map(|value| value.and_then(|value| value.rsplit_once(':').map(|(owner, _)| owner.to_owned())))
            .collect();
        let mut distinct: Vec<String> = owners.iter().flatten().cloned().collect();
        distinct.sort();
        distinct.dedup();
        let mut alive = std::collections::HashSet::new();
        if !distinct.is_empty() {
            let keys: Vec<String> = distinct.iter().map(|owner| self.key(&format!("replica:{owner}"))).collect();
            let flags: Vec<Option<String>> = tokio::time::timeout(REDIS_TIMEOUT, connection.mget(keys))
                .await
                .map_err(|_| RouteError::Unavailable("redis did not answer in time".into()))?
                .map_err(|error| RouteError::Unavailable(format!("redis: {error}")))?;
            alive.extend(distinct.into_iter().zip(flags).filter(|(_, flag)| flag.is_some()).map(|(owner, _)| owner));
        }
        Ok(host_ids
            .iter()
            .zip(owners)
            .filter(|(_, owner)| owner.as_ref().is_none_or(|owner| !alive.contains(owner)))
            .map(|(host_id, _)| host_id.clone())
            .collect())
    }

    /// The live replica holding `host_id`'s stream, if any.
    async fn owner(&self, host_id: &str) -> Result<Option<String>, RouteError> {
        let mut connection = self.connection().await?;
        let value: Option<String> =
            tokio::time::timeout(REDIS_TIMEOUT, connection.get(self.key(&format!("host:{host_id}"))))
                .await
                .map_err(|_| RouteError::Unavailable("redis did not answer in time".into()))?
                .map_err(|error| RouteError::Unavailable(format!("redis: {error}")))?;
        let Some(owner) = value.and_then(|value| value.rsplit_once(':').map(|(owner, _)| owner.to_owned())) else {
            return Ok(None);
        };
        let alive: bool = tokio::time::timeout(REDIS_TIMEOUT, connection.exists(self.key(&format!("replica:{owner}"))))
            .await
            .map_err(|_| RouteError::Unavailable("redis did not answer in time".into()))?
            .map_err(|error| RouteError::Unavailable(format!("redis: {error}")))?;
        Ok(alive.then_some(owner))
    }
}

#[async_trait]
impl CommandRouter for RedisCluster {
    async fn send(&self, host_id: &str, kind: command::Kind, timeout: Duration) -> Result<CommandResult, RouteError> {
        if self.inner.registry.is_connected(host_id) {
            return self.inner.local.send(host_id, kind, timeout).await;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let owner = match self.owner(host_id).await? {
            Some(owner) if owner != self.me() => owner,
            // Nobody holds it, its holder is dead, or the holder is us and
            // the stream has just gone: fail now, not at the deadline.
            _ => return Err(RouteError::NotConnected),
        };
        let request_id = uuid::Uuid::new_v4().to_string();
        let command = Command { command_id: String::new(), kind: Some(kind), traceparent: String::new() };
        let routed = RoutedCommand {
            request_id: request_id.clone(),
            reply_to: self.me().to_owned(),
            host_id: host_id.to_owned(),
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            command: STANDARD.encode(command.encode_to_vec()),
        };
        let payload = serde_json::to_vec(&routed).map_err(|error| RouteError::Unavailable(error.to_string()))?;
        let (waiter, answer) = oneshot::channel();
        self.pending().insert(request_id.clone(), waiter);
        let mut connection = self.connection().await?;
        let receivers: Result<i64, _> = connection.publish(self.key(&format!("cmd:{owner}")), payload).await;
        drop(connection);
        match receivers {
            Ok(0) => {
                self.pending().remove(&request_id);
                return Err(RouteError::NotConnected);
            }
            Ok(_) => {}
            Err(error) => {
                self.pending().remove(&request_id);
                return Err(RouteError::Unavailable(format!("redis: {error}")));
            }
        }
        debug!(host_id, %owner, %request_id, "command routed to the host's replica");
        let outcome = tokio::time::timeout_at(deadline, answer).await;
        self.pending().remove(&request_id);
        match outcome {
            Err(_) => Err(RouteError::Timeout(timeout)),
            Ok(Err(_)) => Err(RouteError::Gone),
            Ok(Ok(Outcome::Ok(encoded))) => STANDARD
                .decode(encoded)
                .ok()
                .and_then(|bytes| CommandResult::decode(bytes.as_slice()).ok())
                .ok_or_else(|| RouteError::Refused("unreadable routed result".into())),
            Ok(Ok(Outcome::NotConnected)) => Err(RouteError::NotConnected),
            Ok(Ok(Outcome::Gone)) => Err(RouteError::Gone),
            Ok(Ok(Outcome::Timeout)) => Err(RouteError::Timeout(timeout)),
            Ok(Ok(Outcome::Refused(error))) => Err(RouteError::Refused(error)),
            Ok(Ok(Outcome::Key(_))) => Err(RouteError::Refused("unexpected reply".into())),
        }
    }
}

impl EventBus for RedisCluster {
    fn publish(&self, event: Event) {
        if self.inner.outgoing.try_send(event.clone()).is_err() {
            warn!("event queue to other replicas is full; an event reaches this replica only");
        }
        let _ = self.inner.events.send(event);
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }
}
