//! The pub/sub bus: one subscriber connection per replica, for three jobs.
//!
//! - **Pings.** Every [`PING_EVERY`] the replica registers (in the replicas
//!   registry) as one that may skip reports, and publishes a ping to its own
//!   channel. When the ping comes back, Redis answers, and every message
//!   published before the ping has been delivered (a subscriber gets
//!   messages in order): the repeat filter may trust what it remembers for
//!   a while (`FRESH_FOR`) from the ping's sending.
//! - **Invalidations.** After a `Leave` has taken names off the lists, the
//!   replica tells every replica to forget them, and waits until each
//!   replica in the registry has acknowledged, or its registration (which
//!   outlasts its trust) has ended. So when `Leave` returns, no replica will
//!   skip a report of those names.
//! - **Changes.** Scripts publish joins and leaves of watched scopes; the
//!   bus subscribes once per watched scope and hands them to the watch hub.
//!
//! Messages are fields separated by `\n` (names and rooms hold no control
//! characters). Any loss (a reconnect, a follower too slow) is reported as
//! [`Change::Gap`], so watchers resync instead of missing changes silently.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use redis::{PushInfo, PushKind, Value, aio::AsyncPushSender};
use tokio::{
    sync::{Notify, mpsc},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use super::Redis;
use super::connection::Subscriber;
use crate::domain::{Kind, Scope, Visitors};
use crate::keyspace::{MESSAGE_SEPARATOR, RoomKeys};
use crate::locks::lock;
use crate::store::repeat_filter::{REGISTERED_FOR, RepeatFilter};
use crate::store::{Change, StoreError};

/// How often a replica pings itself through Redis: several times within
/// the filter's `FRESH_FOR`, so that trust does not lapse between two pings.
pub const PING_EVERY: Duration = Duration::from_millis(250);

/// How many change messages a follower may have waiting before it is told
/// it missed some: the bound on a slow follower's memory.
const FOLLOWER_BACKLOG: usize = 1024;

/// After a failed connection, wait at most this long before trying again.
const RECONNECT_AFTER: Duration = Duration::from_millis(500);

pub struct Bus {
    redis: Arc<Redis>,
    filter: Arc<RepeatFilter>,
    /// This replica's name on the bus and in the registry.
    replica: String,
    own_channel: String,
    shared: Arc<Shared>,
    subscriber: tokio::sync::Mutex<Option<Subscriber>>,
    next_leave: AtomicU64,
}

/// What the push callback (which must not block) reaches.
struct Shared {
    replica: String,
    own_channel: String,
    broadcast: String,
    filter: Arc<RepeatFilter>,
    /// Ping number → when it was sent.
    pings: Mutex<VecDeque<(u64, Instant)>>,
    /// Leave number → who still has to acknowledge it.
    acks: Mutex<HashMap<u64, mpsc::UnboundedSender<String>>>,
    /// Acknowledgements to send: (leaver's channel, message).
    to_ack: mpsc::UnboundedSender<(String, String)>,
    /// Channel → the scope it belongs to, and its follower.
    followers: Mutex<HashMap<String, (Scope, mpsc::Sender<Change>)>>,
    disconnected: Notify,
}

impl Bus {
    /// Starts the subscriber, the pings and the acknowledgements; all stop
    /// with `stop`.
    pub fn start(redis: Arc<Redis>, filter: Arc<RepeatFilter>, stop: CancellationToken) -> Arc<Self> {
        let replica = replica_id();
        let own_channel = redis.keys.filter.direct(&replica);
        let (to_ack, acks_to_send) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            replica: replica.clone(),
            own_channel: own_channel.clone(),
            broadcast: redis.keys.filter.broadcast.clone(),
            filter: filter.clone(),
            pings: Mutex::default(),
            acks: Mutex::default(),
            to_ack,
            followers: Mutex::default(),
            disconnected: Notify::new(),
        });
        let bus = Arc::new(Self {
            redis,
            filter,
            replica,
            own_channel,
            shared,
            subscriber: tokio::sync::Mutex::new(None),
            next_leave: AtomicU64::new(1),
        });
        tokio::spawn(bus.clone().subscribe_loop(stop.clone()));
        tokio::spawn(bus.clone().ping_loop(stop.clone()));
        tokio::spawn(bus.clone().ack_loop(acks_to_send, stop));
        bus
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Keeps one subscriber connection up, subscribed to this replica's
    /// channels and to every followed scope, for as long as the store runs.
    async fn subscribe_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut failing = false;
        loop {
            let push: Arc<dyn AsyncPushSender> = Arc::new(Router(self.shared.clone()));
            match self.connect(push).await {
                Ok(()) => {
                    if failing {
                        tracing::info!("pub/sub connection back");
                        failing = false;
                    }
                    // Anything published while we were away is lost.
                    self.shared.gap_for_all();
                    tokio::select! {
                        () = self.shared.disconnected.notified() => {}
                        () = stop.cancelled() => return,
                    }
                    *self.subscriber.lock().await = None;
                    self.shared.gap_for_all();
                }
                Err(error) => {
                    if !failing {
                        tracing::warn!(%error, "pub/sub connection failed; retrying");
                        failing = true;
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(RECONNECT_AFTER) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    async fn connect(&self, push: Arc<dyn AsyncPushSender>) -> Result<(), StoreError> {
        // Held throughout, so that a `follow` either adds its channels
        // before they are read here, or waits and subscribes them itself
        // on the new connection: no channel is ever left out.
        let mut slot = self.subscriber.lock().await;
        let mut subscriber = Subscriber::connect(&self.redis.target, push).await?;
        let mut channels = vec![self.shared.broadcast.clone(), self.own_channel.clone()];
        channels.extend(lock(&self.shared.followers).keys().cloned());
        tokio::time::timeout(self.redis.timeout, subscriber.subscribe(&channels))
            .await
            .map_err(|_| StoreError::Timeout(self.redis.timeout))??;
        *slot = Some(subscriber);
        Ok(())
    }

    async fn ping_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut ticks = tokio::time::interval(PING_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut number = 0u64;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = stop.cancelled() => return,
            }
            number += 1;
            {
                let mut pings = lock(&self.shared.pings);
                pings.push_back((number, Instant::now()));
                while pings.len() > 16 {
                    pings.pop_front();
                }
            }
            let lease = u64::try_from(REGISTERED_FOR.as_millis()).unwrap_or(1500);
            let bus = &*self;
            let result = bus
                .redis
                .bounded(|mut connection| async move {
                    bus.redis
                        .scripts
                        .ping
                        .key(&bus.redis.keys.filter.replicas)
                        .key(&bus.own_channel)
                        .arg(bus.redis.publish)
                        .arg(&bus.replica)
                        .arg(lease)
                        .arg(number)
                        .invoke_async::<i64>(&mut connection)
                        .await?;
                    Ok(())
                })
                .await;
            if let Err(error) = result {
                tracing::debug!(%error, "ping failed");
            }
        }
    }

    /// Sends the acknowledgements the push callback asked for.
    async fn ack_loop(
        self: Arc<Self>,
        mut to_send: mpsc::UnboundedReceiver<(String, String)>,
        stop: CancellationToken,
    ) {
        loop {
            let (channel, message) = tokio::select! {
                next = to_send.recv() => match next {
                    Some(next) => next,
                    None => return,
                },
                () = stop.cancelled() => return,
            };
            let bus = &*self;
            let result = bus
                .redis
                .bounded(|mut connection| async move {
                    redis::cmd(bus.redis.publish)
                        .arg(&channel)
                        .arg(&message)
                        .query_async::<i64>(&mut connection)
                        .await?;
                    Ok(())
                })
                .await;
            if let Err(error) = result {
                // The leaver stops waiting when this replica's registration
                // ends, so a lost acknowledgement only slows one Leave.
                tracing::debug!(%error, "acknowledgement failed");
            }
        }
    }

    /// Makes every replica forget these names before returning. This
    /// replica forgets at once; the others are told, and waited for.
    pub async fn invalidate(&self, scope: &Scope, visitors: &Visitors) -> Result<(), StoreError> {
        for kind in Kind::ALL {
            self.filter.forget(scope, kind, &visitors.names(kind));
        }
        let id = self.next_leave.fetch_add(1, Ordering::Relaxed);
        let message = leave_message(id, &self.replica, scope, visitors);
        let (acked, mut acks) = mpsc::unbounded_channel();
        lock(&self.shared.acks).insert(id, acked);
        let outcome = self.invalidate_and_wait(&message, &mut acks).await;
        lock(&self.shared.acks).remove(&id);
        outcome
    }

    async fn invalidate_and_wait(
        &self,
        message: &str,
        acks: &mut mpsc::UnboundedReceiver<String>,
    ) -> Result<(), StoreError> {
        let (redis_now, live): (u64, Vec<(String, f64)>) = self
            .redis
            .bounded(|mut connection| async move {
                Ok(self
                    .redis
                    .scripts
                    .invalidate
                    .key(&self.redis.keys.filter.replicas)
                    .key(&self.redis.keys.filter.broadcast)
                    .arg(self.redis.publish)
                    .arg(message)
                    .invoke_async(&mut connection)
                    .await?)
            })
            .await?;
        let answered = Instant::now();
        // Each other replica until its registration ends, in local time:
        // by then it has stopped skipping, acknowledged or not.
        let mut waiting: HashMap<String, Instant> = live
            .into_iter()
            .filter(|(replica, _)| *replica != self.replica)
            .map(|(replica, until)| {
                let left = Duration::from_millis((until as u64).saturating_sub(redis_now));
                (replica, answered + left)
            })
            .collect();
        while let Some(latest) = waiting.values().max().copied() {
            tokio::select! {
                acked = acks.recv() => match acked {
                    Some(replica) => { waiting.remove(&replica); }
                    None => break,
                },
                () = tokio::time::sleep_until(latest) => break,
            }
            let now = Instant::now();
            waiting.retain(|_, until| *until > now);
        }
        Ok(())
    }

    /// Starts following a scope's changes.
    pub async fn follow(&self, scope: &Scope, channels: Vec<String>) -> mpsc::Receiver<Change> {
        let (sender, receiver) = mpsc::channel(FOLLOWER_BACKLOG);
        {
            let mut followers = lock(&self.shared.followers);
            for channel in &channels {
                followers.insert(channel.clone(), (scope.clone(), sender.clone()));
            }
        }
        let mut subscriber = self.subscriber.lock().await;
        if let Some(connection) = subscriber.as_mut() {
            let subscribed = tokio::time::timeout(self.redis.timeout, connection.subscribe(&channels)).await;
            if !matches!(subscribed, Ok(Ok(()))) {
                // The reconnect will subscribe it; until then it hears nothing.
                drop(subscriber);
                self.shared.disconnected.notify_one();
                let _ = sender.try_send(Change::Gap);
            }
        }
        receiver
    }

    /// Stops following channels whose follower has gone (a newer follower
    /// of the same scope keeps them).
    pub async fn unfollow(&self, channels: Vec<String>) {
        let gone: Vec<String> = {
            let mut followers = lock(&self.shared.followers);
            channels
                .into_iter()
                .filter(|channel| match followers.get(channel) {
                    Some((_, sender)) if sender.is_closed() => {
                        followers.remove(channel);
                        true
                    }
                    _ => false,
                })
                .collect()
        };
        if gone.is_empty() {
            return;
        }
        if let Some(connection) = self.subscriber.lock().await.as_mut() {
            let _ = tokio::time::timeout(self.redis.timeout, connection.unsubscribe(&gone)).await;
        }
    }
}

/// The channels carrying a scope's changes: one per kind on the site (two
/// slots), one for a room.
pub fn change_channels(redis: &Redis, scope: &Scope) -> Vec<String> {
    match scope {
        Scope::Site => Kind::ALL
            .iter()
            .map(|kind| redis.keys.site(*kind).kind.changes.clone())
            .collect(),
        Scope::Room(room) => {
            let keys: RoomKeys = redis.keys.room(room);
            vec![keys.users.changes]
        }
    }
}

/// A replica's name: unique among the replicas, readable by operators.
fn replica_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "presence".to_owned());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{host}/{}/{nanos:08x}", std::process::id())
}

/// `leave`, id, leaver, room (`""`: every scope), then one entry per name:
/// `u` or `g` and the name.
fn leave_message(id: u64, from: &str, scope: &Scope, visitors: &Visitors) -> String {
    let mut fields = vec![
        "leave".to_owned(),
        id.to_string(),
        from.to_owned(),
        scope.as_str().to_owned(),
    ];
    fields.extend(visitors.users.iter().map(|u| format!("u{}", u.as_str())));
    fields.extend(visitors.guests.iter().map(|g| format!("g{}", g.as_str())));
    fields.join(&MESSAGE_SEPARATOR.to_string())
}

/// Routes pushed messages; runs inside the connection's reader, so it never
/// blocks: everything is handed on with `try_send` or a std lock.
struct Router(Arc<Shared>);

impl AsyncPushSender for Router {
    fn send(&self, info: PushInfo) -> Result<(), redis::aio::SendError> {
        match info.kind {
            PushKind::Disconnection => self.0.disconnected.notify_one(),
            PushKind::Message | PushKind::SMessage => {
                if let [channel, payload, ..] = info.data.as_slice() {
                    let (Some(channel), Some(payload)) = (text(channel), text(payload)) else {
                        return Ok(());
                    };
                    self.0.route(&channel, &payload);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

impl Shared {
    fn route(&self, channel: &str, payload: &str) {
        let mut fields = payload.split(MESSAGE_SEPARATOR);
        if channel == self.own_channel {
            match (fields.next(), fields.next(), fields.next()) {
                (Some("ping"), Some(number), None) => {
                    let Ok(number) = number.parse::<u64>() else { return };
                    let sent = lock(&self.pings).iter().find(|(n, _)| *n == number).map(|(_, at)| *at);
                    if let Some(sent) = sent {
                        self.filter.ping_returned(sent);
                    }
                }
                (Some("ack"), Some(id), Some(from)) => {
                    if let Ok(id) = id.parse::<u64>()
                        && let Some(waiting) = lock(&self.acks).get(&id)
                    {
                        let _ = waiting.send(from.to_owned());
                    }
                }
                _ => {}
            }
        } else if channel == self.broadcast {
            self.on_leave(fields);
        } else {
            self.on_change(channel, fields);
        }
    }

    fn on_leave<'a>(&self, mut fields: impl Iterator<Item = &'a str>) {
        let (Some("leave"), Some(id), Some(from), Some(room)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return;
        };
        if from == self.replica {
            return;
        }
        let scope = match Scope::parse(room.to_owned()) {
            Ok(scope) => scope,
            Err(_) => return,
        };
        let (mut users, mut guests) = (Vec::new(), Vec::new());
        for entry in fields {
            if let Some(name) = entry.strip_prefix('u') {
                users.push(name);
            } else if let Some(name) = entry.strip_prefix('g') {
                guests.push(name);
            }
        }
        self.filter.forget(&scope, Kind::Users, &users);
        self.filter.forget(&scope, Kind::Guests, &guests);
        let leaver = format!("{}:{from}", self.broadcast);
        let ack = ["ack", id, &self.replica].join(&MESSAGE_SEPARATOR.to_string());
        let _ = self.to_ack.send((leaver, ack));
    }

    fn on_change<'a>(&self, channel: &str, mut fields: impl Iterator<Item = &'a str>) {
        let follower = lock(&self.followers).get(channel).map(|(_, sender)| sender.clone());
        let Some(follower) = follower else { return };
        let parsed = (|| {
            let joined = match fields.next()? {
                "joined" => true,
                "left" => false,
                _ => return None,
            };
            let kind = Kind::parse(fields.next()?)?;
            let seq = fields.next()?.parse().ok()?;
            Some(Change::Names {
                kind,
                joined,
                seq,
                names: fields.map(str::to_owned).collect(),
            })
        })();
        let Some(change) = parsed else { return };
        if follower.try_send(change).is_err() {
            let _ = follower.try_send(Change::Gap);
        }
    }

    fn gap_for_all(&self) {
        for (_, follower) in lock(&self.followers).values() {
            let _ = follower.try_send(Change::Gap);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{GuestAddress, Username};

    #[test]
    fn a_leave_message_names_the_room_and_each_entry_with_its_kind() {
        let visitors = Visitors {
            users: vec![Username::parse("ada lovelace".into()).expect("valid")],
            guests: vec![GuestAddress::parse("10.0.0.1").expect("valid")],
        };
        let scope = Scope::parse("forum 1".into()).expect("valid");
        assert_eq!(
            leave_message(7, "pod-a/1/ff", &scope, &visitors),
            "leave\n7\npod-a/1/ff\nforum 1\nuada lovelace\ng10.0.0.1"
        );
        assert_eq!(
            leave_message(8, "p", &Scope::Site, &visitors),
            "leave\n8\np\n\nuada lovelace\ng10.0.0.1"
        );
    }
}
