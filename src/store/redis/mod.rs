//! The Redis store: the two-set algorithm of `keyspace.rs`, on a single
//! Redis or a Sentinel-managed master through a `bb8-redis` pool, or on a
//! Redis Cluster.
//!
//! Every call is bounded by the timeout. A call that sees its connection
//! fail or hang marks it broken, and it is replaced (see [`Connections`]):
//! that is how the store recovers by itself after Redis restarts or fails
//! over.
//!
//! Reports go through the repeat filter (names this replica already wrote
//! in this interval are skipped) and the report queue (concurrent reports
//! share one call); the filter trusts only what the bus and the probe keep
//! confirming (see `repeat_filter.rs`).

mod bus;
mod connection;

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use redis::Script;
use tokio::{
    sync::mpsc,
    time::{Instant, timeout_at},
};
use tokio_util::sync::CancellationToken;

pub use self::connection::RedisMode;
use self::{
    bus::Bus,
    connection::{Connections, RedisConnection, RedisTarget},
};
use super::coalesce::{ReportQueue, SendBatch};
use super::repeat_filter::{RepeatFilter, Written};
use super::{Change, Maintenance, Probe, Snapshot, Store, StoreError};
use crate::domain::{
    Counts, Kind, KindPage, Room, RoomCount, RoomOrder, RoomsPage, RoomsPageToken, Scope, Visitors, page_of,
};
use crate::keyspace::{self, KeyPrefix, Keyspace};
use crate::locks::lock;
use crate::traces;

/// Rooms looked at per step of the sweep: each is one small script, and a
/// step is a few milliseconds of Redis work in all, between which Redis
/// serves everyone else.
const SWEEP_STEP: usize = 100;

/// Rooms per call of the rooms index script. Each room costs it about
/// 10 µs inside Redis (a few writes to sorted sets of every room), and one
/// script call holds Redis for all of its rooms: a sweep step's hundred
/// rooms in one call measured 0.5-1.2 ms (`bench/rooms` e), so a call
/// takes at most this many, and Redis serves others between calls.
const INDEX_STEP: usize = 20;

/// How many intervals an interval's set of rooms reported into lives, from
/// its start, should no sweep free it: the sweep reads it during the two
/// intervals that follow, and a sweep may start late in its interval (a
/// replica learns of a new interval from its probe, once a second, and its
/// keeper looks for work once a second), so it gets one interval more. The
/// sweep frees each set with `UNLINK` once done with it.
const SEEN_SETS_LIVE: u64 = 4;

/// Last-seen entries pruned per step.
const PRUNE_STEP: usize = 500;

/// Names announced per step when a watched scope rotates.
const DRAIN_STEP: usize = 500;

/// How long a scope stays marked as watched without being marked again.
const WATCHED_FOR: Duration = Duration::from_secs(5);

/// What a [`RedisStore`] needs to know.
#[derive(Debug, Clone)]
pub struct RedisStoreConfig {
    /// `redis://[user:password@]host:port[/db]`, `rediss://…` or
    /// `unix:///path/to/socket`: the server, one cluster node, or one
    /// sentinel.
    pub url: String,
    pub mode: RedisMode,
    /// Sentinel mode: the master's name.
    pub sentinel_master: String,
    /// Connections in the pool. Each is multiplexed: many calls share it.
    pub pool_size: u32,
    /// The longest any one store call may take, connecting included.
    pub timeout: Duration,
    pub key_prefix: KeyPrefix,
    /// *T*: the length of an interval.
    pub interval: Duration,
    /// Last seen: how precise, and how long kept; `None` is off.
    pub last_seen: Option<(Duration, Duration)>,
    /// `rediss://` with a private CA: its PEM certificates.
    pub tls_ca: Option<Vec<u8>>,
}

/// What every part of the store shares: connections, scripts, keys.
pub(crate) struct Redis {
    connections: Connections,
    target: RedisTarget,
    keys: Keyspace,
    timeout: Duration,
    scripts: Scripts,
    /// `SPUBLISH` in a cluster, `PUBLISH` elsewhere.
    publish: &'static str,
    /// *T*, in ms.
    period: u64,
    /// How long a room's keys live after the start of the interval of its
    /// last report: two intervals, and a margin for the sweep to remove
    /// them first (a big set is freed by `UNLINK` in the background, where
    /// an expiry would free it on Redis's main thread).
    keep: u64,
    /// Last seen: (precision, retention), in ms.
    last_seen: Option<(u64, u64)>,
    /// Site-wide rotations this replica's scripts did, by kind.
    rotations: [AtomicU64; 2],
}

struct Scripts {
    site_report: Script,
    room_report: Script,
    site_leave: Script,
    forget_memberships: Script,
    room_leave: Script,
    page: Script,
    check: Script,
    prune_last_seen: Script,
    probe: Script,
    ping: Script,
    invalidate: Script,
    snapshot: Script,
    watch: Script,
    drain_leaving: Script,
    room_counts: Script,
    index_rooms: Script,
    rooms_page: Script,
    take_sweep: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            site_report: Script::new(keyspace::SITE_REPORT_SCRIPT),
            room_report: Script::new(keyspace::ROOM_REPORT_SCRIPT),
            site_leave: Script::new(keyspace::SITE_LEAVE_SCRIPT),
            forget_memberships: Script::new(keyspace::FORGET_MEMBERSHIPS_SCRIPT),
            room_leave: Script::new(keyspace::ROOM_LEAVE_SCRIPT),
            page: Script::new(keyspace::PAGE_SCRIPT),
            check: Script::new(keyspace::CHECK_SCRIPT),
            prune_last_seen: Script::new(keyspace::PRUNE_LAST_SEEN_SCRIPT),
            probe: Script::new(keyspace::PROBE_SCRIPT),
            ping: Script::new(keyspace::PING_SCRIPT),
            invalidate: Script::new(keyspace::INVALIDATE_SCRIPT),
            snapshot: Script::new(keyspace::SNAPSHOT_SCRIPT),
            watch: Script::new(keyspace::WATCH_SCRIPT),
            drain_leaving: Script::new(keyspace::DRAIN_LEAVING_SCRIPT),
            room_counts: Script::new(keyspace::ROOM_COUNTS_SCRIPT),
            index_rooms: Script::new(keyspace::INDEX_ROOMS_SCRIPT),
            rooms_page: Script::new(keyspace::ROOMS_PAGE_SCRIPT),
            take_sweep: Script::new(keyspace::TAKE_SWEEP_SCRIPT),
        }
    }
}

/// Who updates the rooms index after a change in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Indexed {
    /// The room's script itself, in the same atomic step: off a cluster,
    /// where a script may touch keys of any slot.
    InScript,
    /// The caller, with the counts returned: in a cluster, the index lives
    /// in a slot of its own.
    ByCaller,
}

/// A room's new counts, for the rooms index.
struct RoomUpdate {
    room: Room,
    counts: Counts,
    version: u64,
}

impl Redis {
    /// Runs one store operation on a connection, within the time bound. A
    /// connection that failed or hung is marked broken, so the next call
    /// gets a fresh one.
    async fn bounded<T, F, Fut>(&self, operation: F) -> Result<T, StoreError>
    where
        F: FnOnce(RedisConnection) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        // A span per round trip, within a traced call (see `traces`).
        let name = || traces::operation_of(std::any::type_name::<F>());
        traces::redis_round_trip(name, self.bounded_untraced(operation)).await
    }

    async fn bounded_untraced<T, F, Fut>(&self, operation: F) -> Result<T, StoreError>
    where
        F: FnOnce(RedisConnection) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let deadline = Instant::now() + self.timeout;
        let timed_out = || StoreError::Timeout(self.timeout);
        let checkout = timeout_at(deadline, self.connections.checkout()).await;
        let (connection, checkout) = checkout.map_err(|_| timed_out())??;
        match timeout_at(deadline, operation(connection)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                if error.breaks_connection() {
                    self.connections.mark_broken(&checkout);
                }
                Err(error)
            }
            Err(_) => {
                self.connections.mark_broken(&checkout);
                Err(timed_out())
            }
        }
    }

    /// A scope's keys for one kind, as scripts take them: 9 on the site
    /// (with the memberships), 7 in a room.
    fn kind_keys(&self, scope: &Scope, kind: Kind) -> Vec<String> {
        match scope {
            Scope::Site => self.keys.site(kind).nine().map(str::to_owned).to_vec(),
            Scope::Room(room) => self.keys.room(room).of(kind).seven().map(str::to_owned).to_vec(),
        }
    }

    /// A page of each of one or more kinds of `scope` (each: the kind,
    /// after, size; see [`keyspace::PAGE_SCRIPT`]) in one script call:
    /// their keys must share a slot. [`one_each`] takes them apart. (Its
    /// round trip's trace span is named after it: `page`.)
    async fn page(&self, scope: &Scope, wanted: &[(Kind, Option<&str>, usize)]) -> Result<Vec<KindPage>, StoreError> {
        let mut invocation = self.scripts.page.prepare_invoke();
        for &(kind, _, _) in wanted {
            for key in self.kind_keys(scope, kind) {
                invocation.key(key);
            }
        }
        invocation.arg(self.publish).arg(self.period).arg(self.keep_of(scope));
        for &(_, after, size) in wanted {
            invocation.arg(after.unwrap_or("")).arg(size);
        }
        self.bounded(|mut connection| async move {
            let read: Vec<(u8, u64, Vec<String>, Vec<String>)> = invocation.invoke_async(&mut connection).await?;
            Ok(wanted
                .iter()
                .zip(read)
                .map(|(&(kind, _, size), (rotated, total, current, old))| {
                    self.rotated(scope, kind, rotated);
                    page_of(current, old, size, total)
                })
                .collect())
        })
        .await
    }

    /// Counts a rotation a script reports, if it was of a site kind.
    fn rotated(&self, scope: &Scope, kind: Kind, rotated: u8) {
        if rotated == 1 && scope == &Scope::Site {
            self.rotations[kind as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How long (ms) a seen set lives from its interval's start, should no
    /// sweep free it: one figure for both ways the index is updated.
    fn seen_sets_live(&self) -> u64 {
        SEEN_SETS_LIVE * self.period
    }

    /// Room keys expire on their own; the site's never do.
    fn keep_of(&self, scope: &Scope) -> u64 {
        match scope {
            Scope::Site => 0,
            Scope::Room(_) => self.keep,
        }
    }

    fn room_script<'a>(&self, script: &'a Script, room: &Room) -> redis::ScriptInvocation<'a> {
        let keys = self.keys.room(room);
        let mut invocation = script.prepare_invoke();
        for key in keys.users.seven().into_iter().chain(keys.guests.seven()) {
            invocation.key(key);
        }
        invocation.key(&keys.version);
        invocation
    }

    async fn site_report(
        &self,
        mut connection: RedisConnection,
        kind: Kind,
        names: &[&str],
        rooms: &[&str],
    ) -> Result<u64, StoreError> {
        let mut invocation = self.scripts.site_report.prepare_invoke();
        for key in self.keys.site(kind).nine() {
            invocation.key(key);
        }
        // Guests have no last seen; their script must still name keys of
        // their own slot only.
        let record = kind == Kind::Users && self.last_seen.is_some();
        invocation.key(match kind {
            Kind::Users => &self.keys.last_seen,
            Kind::Guests => &self.keys.site(kind).kind.current,
        });
        let (start, rotated): (u64, u8) = invocation
            .arg(self.publish)
            .arg(self.period)
            .arg(kind.as_str())
            .arg(u8::from(record))
            .arg(names.len())
            .arg(names)
            .arg(rooms)
            .invoke_async(&mut connection)
            .await?;
        self.rotated(&Scope::Site, kind, rotated);
        Ok(start)
    }

    /// Reports names into a room, or takes them off (`script`): both are
    /// answered with the interval they landed in and the room's new counts.
    /// With `Indexed::InScript` (reports, off a cluster) the script has
    /// updated the rooms index too.
    async fn room_change(
        &self,
        mut connection: RedisConnection,
        script: &Script,
        room: &Room,
        (users, guests): (&[&str], &[&str]),
        indexed: Indexed,
    ) -> Result<(u64, RoomUpdate), StoreError> {
        let mut invocation = self.room_script(script, room);
        if indexed == Indexed::InScript {
            let index = &self.keys.rooms;
            invocation
                .key(&index.names)
                .key(&index.users)
                .key(&index.indexed)
                .key(index.seen_prefix());
        }
        invocation
            .arg(self.publish)
            .arg(self.period)
            .arg(self.keep)
            .arg(users.len())
            .arg(users)
            .arg(guests);
        if indexed == Indexed::InScript {
            invocation.arg(room.as_str()).arg(self.seen_sets_live());
        }
        let (start, u, g, version): (u64, u64, u64, u64) = invocation.invoke_async(&mut connection).await?;
        let update = RoomUpdate {
            room: room.clone(),
            counts: Counts { users: u, guests: g },
            version,
        };
        Ok((start, update))
    }

    async fn room_counts(&self, mut connection: RedisConnection, room: &Room) -> Result<RoomUpdate, StoreError> {
        let (u, g, version): (u64, u64, u64) = self
            .room_script(&self.scripts.room_counts, room)
            .arg(self.publish)
            .arg(self.period)
            .arg(self.keep)
            .invoke_async(&mut connection)
            .await?;
        Ok(RoomUpdate {
            room: room.clone(),
            counts: Counts { users: u, guests: g },
            version,
        })
    }

    /// Brings the rooms index up to date with rooms' counts; `seen` notes
    /// them as reported into during the interval that starts then. At most
    /// [`INDEX_STEP`] rooms per script call; the calls go out together.
    async fn index_rooms(
        &self,
        connection: RedisConnection,
        updates: &[RoomUpdate],
        seen: Option<u64>,
    ) -> Result<(), StoreError> {
        let index = &self.keys.rooms;
        let seen_key = index.seen(seen.unwrap_or(0));
        let calls = updates.chunks(INDEX_STEP).map(|updates| {
            let mut connection = connection.clone();
            let mut invocation = self.scripts.index_rooms.prepare_invoke();
            invocation
                .key(&index.names)
                .key(&index.users)
                .key(&index.indexed)
                .key(&seen_key);
            invocation.arg(seen.map_or(0, |start| start + self.seen_sets_live()));
            for update in updates {
                invocation
                    .arg(update.room.as_str())
                    .arg(update.counts.users)
                    .arg(update.counts.guests)
                    .arg(update.version);
            }
            async move { invocation.invoke_async::<()>(&mut connection).await }
        });
        futures_util::future::try_join_all(calls).await?;
        Ok(())
    }

    /// Reads the counts of rooms (bringing each into the current interval)
    /// and updates the index with them.
    async fn refresh_rooms(&self, connection: RedisConnection, rooms: &[Room]) -> Result<Vec<RoomUpdate>, StoreError> {
        let reads = rooms.iter().map(|room| self.room_counts(connection.clone(), room));
        let updates = futures_util::future::try_join_all(reads).await?;
        self.index_rooms(connection, &updates, None).await?;
        Ok(updates)
    }
}

#[async_trait]
impl SendBatch for Redis {
    /// One coalesced batch: a script per site kind (every name, with its
    /// room as a membership), a script per room, then the rooms index. All
    /// go out at once on the multiplexed connection.
    async fn send(&self, batch: &[(Scope, Visitors)]) -> Result<Written, StoreError> {
        let mut site: [(Vec<&str>, Vec<&str>); 2] = Default::default();
        let mut rooms: BTreeMap<&Room, (Vec<&str>, Vec<&str>)> = BTreeMap::new();
        for (scope, visitors) in batch {
            for kind in Kind::ALL {
                let names = visitors.names(kind);
                let (site_names, site_rooms) = &mut site[kind as usize];
                site_rooms.extend(std::iter::repeat_n(scope.as_str(), names.len()));
                if let Some(room) = scope.room() {
                    let (users, guests) = rooms.entry(room).or_default();
                    match kind {
                        Kind::Users => users.extend(&names),
                        Kind::Guests => guests.extend(&names),
                    }
                }
                site_names.extend(names);
            }
        }
        self.bounded(|connection| async move {
            let site_parts = Kind::ALL.map(|kind| {
                let (names, rooms) = &site[kind as usize];
                let connection = connection.clone();
                async move {
                    if names.is_empty() {
                        Ok(None)
                    } else {
                        self.site_report(connection, kind, names, rooms).await.map(Some)
                    }
                }
            });
            let [users, guests] = site_parts;
            let indexed = if self.connections.is_cluster() {
                Indexed::ByCaller
            } else {
                Indexed::InScript
            };
            let room_parts = rooms.iter().map(|(room, (users, guests))| {
                let names = (users.as_slice(), guests.as_slice());
                self.room_change(connection.clone(), &self.scripts.room_report, room, names, indexed)
            });
            let (users, guests, rooms) =
                tokio::try_join!(users, guests, futures_util::future::try_join_all(room_parts))?;
            let mut written = Written {
                users,
                guests,
                rooms: HashMap::new(),
            };
            // Index updates left to do, grouped by the interval they were
            // reported in.
            let mut by_start: BTreeMap<u64, Vec<RoomUpdate>> = BTreeMap::new();
            for (start, update) in rooms {
                written.rooms.insert(update.room.clone(), start);
                if indexed == Indexed::ByCaller {
                    by_start.entry(start).or_default().push(update);
                }
            }
            for (start, updates) in by_start {
                self.index_rooms(connection.clone(), &updates, Some(start)).await?;
            }
            Ok(written)
        })
        .await
    }
}

/// The pages [`Redis::page`] read, one for each kind asked for.
fn one_each<const N: usize>(pages: Vec<KindPage>) -> Result<[KindPage; N], StoreError> {
    pages
        .try_into()
        .map_err(|pages: Vec<KindPage>| StoreError::Protocol(format!("{} pages for {N} kinds", pages.len())))
}

/// Where the sweep of the rooms stands: which interval it is for, which
/// set of rooms it reads (those reported into one and two intervals
/// before), and the last room done.
#[derive(Debug, Default)]
struct Sweep {
    /// The interval whose sweep is done (by us or another replica).
    done: u64,
    /// The interval being swept, and where.
    current: Option<(u64, u8, String)>,
}

/// The Redis store. See the module documentation.
pub struct RedisStore {
    redis: Arc<Redis>,
    filter: Arc<RepeatFilter>,
    queue: ReportQueue,
    bus: Arc<Bus>,
    sweep: Mutex<Sweep>,
    /// The start of the interval Redis was in at the last probe (Redis's ms).
    interval: Mutex<Option<u64>>,
    stop: CancellationToken,
}

impl RedisStore {
    /// Builds the store without connecting: the service starts, and reports
    /// itself not ready, even while Redis is down. Its background tasks
    /// (pings, pub/sub) start at once and stop with [`Store::close`].
    pub fn start(config: RedisStoreConfig) -> Result<Self, redis::RedisError> {
        let timeout = config.timeout;
        let target = RedisTarget::parse(&config.url, config.mode, &config.sentinel_master, timeout)?
            .with_ca(config.tls_ca.as_deref())?;
        let connections = Connections::new(&target, config.pool_size)?;
        let period = millis(config.interval).max(1);
        let redis = Arc::new(Redis {
            connections,
            keys: Keyspace::new(&config.key_prefix),
            timeout,
            scripts: Scripts::new(),
            publish: match config.mode {
                RedisMode::Cluster => "SPUBLISH",
                RedisMode::Single | RedisMode::Sentinel => "PUBLISH",
            },
            period,
            keep: 2 * period + (period / 2).max(1000),
            last_seen: config
                .last_seen
                .map(|(precision, retention)| (millis(precision), millis(retention))),
            rotations: Default::default(),
            target,
        });
        let precision = config.last_seen.map(|(precision, _)| precision);
        let filter = Arc::new(RepeatFilter::new(config.interval, precision));
        let stop = CancellationToken::new();
        let in_flight = usize::try_from(config.pool_size).unwrap_or(1);
        Ok(Self {
            queue: ReportQueue::new(redis.clone(), in_flight, timeout),
            bus: Bus::start(redis.clone(), filter.clone(), stop.clone()),
            redis,
            filter,
            sweep: Mutex::default(),
            interval: Mutex::default(),
            stop,
        })
    }

    /// A failure of Redis may mean it lost what it had: forget it all.
    fn failed<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(error) = &result
            && error.is_backend_failure()
        {
            self.filter.forget_all();
        }
        result
    }

    /// [`keyspace::CHECK_SCRIPT`]: whether each name of `kind` is online in
    /// `scope`, and Redis's clock (ms) when it was asked.
    async fn check_script(&self, scope: &Scope, kind: Kind, names: &[&str]) -> Result<(Vec<bool>, u64), StoreError> {
        let redis = &self.redis;
        let keys = redis.kind_keys(scope, kind);
        let result = redis
            .bounded(|mut connection| async move {
                let mut invocation = redis.scripts.check.prepare_invoke();
                for key in &keys {
                    invocation.key(key);
                }
                let (rotated, online, now): (u8, Vec<u8>, u64) = invocation
                    .arg(redis.publish)
                    .arg(redis.period)
                    .arg(redis.keep_of(scope))
                    .arg(names)
                    .invoke_async(&mut connection)
                    .await?;
                redis.rotated(scope, kind, rotated);
                Ok((online.into_iter().map(|o| o == 1).collect(), now))
            })
            .await;
        self.failed(result)
    }

    /// Each user's last seen score (Unix ms), by a plain `ZMSCORE`: see
    /// [`keyspace::CHECK_SCRIPT`] for why not a script.
    async fn last_seen_scores(&self, users: &[&str]) -> Result<Vec<Option<f64>>, StoreError> {
        let redis = &self.redis;
        let result = redis
            .bounded(|mut connection| async move {
                Ok(redis::cmd("ZMSCORE")
                    .arg(&redis.keys.last_seen)
                    .arg(users)
                    .query_async(&mut connection)
                    .await?)
            })
            .await;
        self.failed(result)
    }

    /// One step of the rooms' sweep: after each interval begins, every
    /// room reported into during the two before (and not since) is brought
    /// into the new interval, its index entry updated, and an empty room's
    /// last keys removed. One replica sweeps each interval.
    async fn sweep_step(&self) -> Result<(u64, bool), StoreError> {
        let Some(start) = *lock(&self.interval) else {
            return Ok((0, false));
        };
        let (phase, after) = {
            let mut sweep = lock(&self.sweep);
            if sweep.done >= start {
                return Ok((0, false));
            }
            match &sweep.current {
                Some((s, phase, after)) if *s == start => (*phase, after.clone()),
                _ => {
                    sweep.current = Some((start, 0, String::new()));
                    (0, String::new())
                }
            }
        };
        let redis = &self.redis;
        if phase == 0 && after.is_empty() {
            let taken: u8 = redis
                .bounded(|mut connection| async move {
                    Ok(redis
                        .scripts
                        .take_sweep
                        .key(&redis.keys.rooms.sweep)
                        .key(&redis.keys.rooms.retired[0])
                        .key(&redis.keys.rooms.retired[1])
                        .arg(start)
                        .arg(self.bus.replica())
                        .invoke_async(&mut connection)
                        .await?)
                })
                .await?;
            if taken == 0 {
                let mut sweep = lock(&self.sweep);
                sweep.done = start;
                sweep.current = None;
                return Ok((0, false));
            }
        }
        let interval = start - (u64::from(phase) + 1) * redis.period;
        let seen = redis.keys.rooms.seen(interval);
        let rooms: Vec<String> = redis
            .bounded(|mut connection| {
                let seen = seen.clone();
                let after = after.clone();
                async move {
                    let min = if after.is_empty() {
                        "-".to_owned()
                    } else {
                        format!("({after}")
                    };
                    Ok(redis::cmd("ZRANGE")
                        .arg(&seen)
                        .arg(min)
                        .arg("+")
                        .arg("BYLEX")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(SWEEP_STEP)
                        .query_async(&mut connection)
                        .await?)
                }
            })
            .await?;
        let parsed: Vec<Room> = rooms
            .iter()
            .filter_map(|name| Scope::parse(name.clone()).ok()?.room().cloned())
            .collect();
        if !parsed.is_empty() {
            redis
                .bounded(|connection| async move { redis.refresh_rooms(connection, &parsed).await })
                .await?;
        }
        let swept = rooms.len() as u64;
        let more = match rooms.last() {
            Some(last) if rooms.len() == SWEEP_STEP => Some((phase, last.clone())),
            _ if phase == 0 => Some((1, String::new())),
            _ => None,
        };
        if more.is_none() {
            // The older set has now been read for both intervals after its
            // own: free it in the background. Left to expire, it would be
            // freed on Redis's main thread, and a set of 100,000 rooms
            // takes tens of milliseconds to free.
            redis
                .bounded(|mut connection| {
                    let seen = seen.clone();
                    async move {
                        Ok(redis::cmd("UNLINK")
                            .arg(&seen)
                            .query_async::<()>(&mut connection)
                            .await?)
                    }
                })
                .await?;
        }
        let going_on = more.is_some();
        let mut sweep = lock(&self.sweep);
        match more {
            Some((phase, after)) => sweep.current = Some((start, phase, after)),
            None => {
                sweep.done = start;
                sweep.current = None;
            }
        }
        Ok((swept, going_on))
    }

    async fn prune_step(&self) -> Result<(u64, bool), StoreError> {
        let Some((_, retention)) = self.redis.last_seen else {
            return Ok((0, false));
        };
        let redis = &self.redis;
        let pruned: u64 = redis
            .bounded(|mut connection| async move {
                Ok(redis
                    .scripts
                    .prune_last_seen
                    .key(&redis.keys.last_seen)
                    .arg(redis.publish)
                    .arg(retention)
                    .arg(PRUNE_STEP)
                    .invoke_async(&mut connection)
                    .await?)
            })
            .await?;
        Ok((pruned, pruned as usize == PRUNE_STEP))
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[async_trait]
impl Store for RedisStore {
    async fn report(&self, scope: &Scope, visitors: Visitors, deadline: Instant) -> Result<(), StoreError> {
        let ticket = self.filter.ticket();
        let fresh = self.filter.unknown(scope, visitors);
        if fresh.is_empty() {
            return Ok(());
        }
        let written = self.queue.report(scope.clone(), fresh.clone(), deadline).await;
        let written = self.failed(written)?;
        self.filter.remember(scope, &fresh, &written, ticket);
        Ok(())
    }

    async fn leave(&self, scope: &Scope, visitors: &Visitors) -> Result<(), StoreError> {
        let redis = &self.redis;
        let removed = redis
            .bounded(|connection| async move {
                let mut updates = Vec::new();
                match scope {
                    Scope::Site => {
                        // Each name's rooms come from its memberships.
                        let mut in_rooms: BTreeMap<Room, (Vec<&str>, Vec<&str>)> = BTreeMap::new();
                        for kind in Kind::ALL {
                            let names = visitors.names(kind);
                            if names.is_empty() {
                                continue;
                            }
                            let mut invocation = redis.scripts.site_leave.prepare_invoke();
                            for key in redis.keys.site(kind).nine() {
                                invocation.key(key);
                            }
                            let (rotated, rooms): (u8, Vec<Vec<String>>) = invocation
                                .arg(redis.publish)
                                .arg(redis.period)
                                .arg(kind.as_str())
                                .arg(&names)
                                .invoke_async(&mut connection.clone())
                                .await?;
                            redis.rotated(scope, kind, rotated);
                            for (name, rooms) in names.iter().zip(rooms) {
                                for room in rooms {
                                    let Ok(Scope::Room(room)) = Scope::parse(room) else {
                                        continue;
                                    };
                                    let (users, guests) = in_rooms.entry(room).or_default();
                                    match kind {
                                        Kind::Users => users.push(name),
                                        Kind::Guests => guests.push(name),
                                    }
                                }
                            }
                        }
                        let leaves = in_rooms.iter().map(|(room, (users, guests))| {
                            let names = (users.as_slice(), guests.as_slice());
                            let script = &redis.scripts.room_leave;
                            redis.room_change(connection.clone(), script, room, names, Indexed::ByCaller)
                        });
                        updates = futures_util::future::try_join_all(leaves)
                            .await?
                            .into_iter()
                            .map(|(_, update)| update)
                            .collect();
                    }
                    Scope::Room(room) => {
                        let (users, guests) = (visitors.names(Kind::Users), visitors.names(Kind::Guests));
                        let names = (users.as_slice(), guests.as_slice());
                        let script = &redis.scripts.room_leave;
                        let (_, update) = redis
                            .room_change(connection.clone(), script, room, names, Indexed::ByCaller)
                            .await?;
                        updates.push(update);
                        for kind in Kind::ALL {
                            let names = visitors.names(kind);
                            if names.is_empty() {
                                continue;
                            }
                            let site = redis.keys.site(kind);
                            redis
                                .scripts
                                .forget_memberships
                                .key(&site.memberships_current)
                                .key(&site.memberships_old)
                                .arg(room.as_str())
                                .arg(&names)
                                .invoke_async::<()>(&mut connection.clone())
                                .await?;
                        }
                    }
                }
                redis.index_rooms(connection, &updates, None).await
            })
            .await;
        self.failed(removed)?;
        // Only after the names are gone: a write that raced the Leave must
        // not be remembered by anyone.
        self.bus.invalidate(scope, visitors).await
    }

    async fn pages(
        &self,
        scope: &Scope,
        users: (Option<&str>, usize),
        guests: (Option<&str>, usize),
    ) -> Result<(KindPage, KindPage), StoreError> {
        let redis = &self.redis;
        let (users, guests) = ([(Kind::Users, users.0, users.1)], [(Kind::Guests, guests.0, guests.1)]);
        let pages = if redis.connections.is_cluster() && scope == &Scope::Site {
            // The site's kinds have a hash tag each, so a slot each.
            tokio::try_join!(redis.page(scope, &users), redis.page(scope, &guests)).and_then(|(users, guests)| {
                let ([users], [guests]) = (one_each(users)?, one_each(guests)?);
                Ok((users, guests))
            })
        } else {
            let both = redis.page(scope, &[users[0], guests[0]]).await;
            both.and_then(|both| one_each(both).map(|[users, guests]| (users, guests)))
        };
        self.failed(pages)
    }

    async fn check(&self, scope: &Scope, kind: Kind, names: &[&str]) -> Result<Vec<bool>, StoreError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.check_script(scope, kind, names).await?.0)
    }

    /// The check and the last seen scores go out together; the retention
    /// is counted back from Redis's clock as the check script read it.
    async fn check_users(&self, scope: &Scope, users: &[&str]) -> Result<(Vec<bool>, Vec<Option<u64>>), StoreError> {
        if users.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let Some((_, retention)) = self.redis.last_seen else {
            return Ok((self.check(scope, Kind::Users, users).await?, vec![None; users.len()]));
        };
        let ((online, now), scores) = tokio::try_join!(
            self.check_script(scope, Kind::Users, users),
            self.last_seen_scores(users)
        )?;
        let cutoff = now.saturating_sub(retention);
        let seen = scores
            .into_iter()
            // Scores are whole ms, well within f64's exact integers.
            .map(|score| score.map(|at| at as u64).filter(|at| *at >= cutoff))
            .collect();
        Ok((online, seen))
    }

    async fn rooms(
        &self,
        order: RoomOrder,
        after: Option<&RoomsPageToken>,
        size: usize,
    ) -> Result<RoomsPage, StoreError> {
        let redis = &self.redis;
        let result = redis
            .bounded(|mut connection| async move {
                let index = &redis.keys.rooms;
                let (after_room, after_users) = match after {
                    None => ("", 0),
                    Some(RoomsPageToken::ByName { after }) => (after.as_str(), 0),
                    Some(RoomsPageToken::ByUsers { users, after }) => (after.as_str(), *users),
                };
                let order_arg = match order {
                    RoomOrder::Name => "name",
                    RoomOrder::MostOnline => "users",
                };
                let raw: Vec<String> = redis
                    .scripts
                    .rooms_page
                    .key(&index.names)
                    .key(&index.users)
                    .arg(order_arg)
                    .arg(after_room)
                    .arg(after_users)
                    .arg(size)
                    .invoke_async(&mut connection)
                    .await?;
                // By name: names; busiest first: name, minus count, ….
                let listed: Vec<(String, u64)> = match order {
                    RoomOrder::Name => raw.into_iter().map(|name| (name, 0)).collect(),
                    RoomOrder::MostOnline => raw
                        .chunks(2)
                        .filter_map(|pair| match pair {
                            [name, score] => Some((name.clone(), (-score.parse::<f64>().ok()?) as u64)),
                            _ => None,
                        })
                        .collect(),
                };
                let rooms: Vec<Room> = listed
                    .iter()
                    .filter_map(|(name, _)| Scope::parse(name.clone()).ok()?.room().cloned())
                    .collect();
                // The counts returned are read now, exactly; a room found
                // empty leaves the index.
                let updates = redis.refresh_rooms(connection, &rooms).await?;
                let next = if listed.len() == size {
                    listed.last().map(|(name, users)| match order {
                        RoomOrder::Name => RoomsPageToken::ByName { after: name.clone() },
                        RoomOrder::MostOnline => RoomsPageToken::ByUsers {
                            users: *users,
                            after: name.clone(),
                        },
                    })
                } else {
                    None
                };
                let rooms = updates
                    .into_iter()
                    .filter(|u| u.counts != Counts::default())
                    .map(|u| RoomCount {
                        room: u.room.as_str().to_owned(),
                        counts: u.counts,
                    })
                    .collect();
                Ok(RoomsPage { rooms, next })
            })
            .await;
        self.failed(result)
    }

    async fn probe(&self) -> Result<Probe, StoreError> {
        let redis = &self.redis;
        let sent = Instant::now();
        let samples = Kind::ALL.map(|kind| self.filter.sample(kind).unwrap_or_default());
        let result = redis
            .bounded(|connection| async move {
                let probes = Kind::ALL.map(|kind| {
                    let mut connection = connection.clone();
                    let sample = samples[kind as usize].clone();
                    async move {
                        let mut invocation = redis.scripts.probe.prepare_invoke();
                        for key in redis.keys.site(kind).nine() {
                            invocation.key(key);
                        }
                        let answer: (u64, u64, u8, u64, u8) = invocation
                            .arg(redis.publish)
                            .arg(redis.period)
                            .arg(sample)
                            .invoke_async(&mut connection)
                            .await?;
                        Ok::<_, StoreError>(answer)
                    }
                });
                let [users, guests] = probes;
                Ok(tokio::try_join!(users, guests)?)
            })
            .await;
        let (users, guests) = self.failed(result)?;
        let (now, start, ..) = users;
        self.filter.interval_seen(sent, now, start);
        *lock(&self.interval) = Some(start);
        if users.4 == 0 || guests.4 == 0 {
            // A name written lately has vanished without an error: keys
            // were flushed, evicted or lost in a failover.
            tracing::warn!("keys vanished from Redis without an error; the repeat filter forgets");
            self.filter.forget_all();
        }
        let mut probe = Probe::default();
        for (kind, (_, _, rotated, total, _)) in [(Kind::Users, users), (Kind::Guests, guests)] {
            probe.counts.set(kind, total);
            self.redis.rotated(&Scope::Site, kind, rotated);
        }
        probe.rooms = self
            .redis
            .bounded(|mut connection| async move {
                Ok(redis::cmd("ZCARD")
                    .arg(&redis.keys.rooms.names)
                    .query_async::<u64>(&mut connection)
                    .await?)
            })
            .await
            .ok();
        Ok(probe)
    }

    async fn maintain(&self) -> Result<Maintenance, StoreError> {
        let (rooms_swept, more_rooms) = self.sweep_step().await?;
        let (last_seen_pruned, more_pruning) = self.prune_step().await?;
        Ok(Maintenance {
            rooms_swept,
            last_seen_pruned,
            more: more_rooms || more_pruning,
        })
    }

    async fn follow(&self, scope: &Scope) -> Result<mpsc::Receiver<Change>, StoreError> {
        Ok(self.bus.follow(scope, bus::change_channels(&self.redis, scope)).await)
    }

    async fn unfollow(&self, scope: &Scope) {
        self.bus.unfollow(bus::change_channels(&self.redis, scope)).await;
    }

    async fn snapshot(&self, scope: &Scope, kind: Kind, n: usize) -> Result<Snapshot, StoreError> {
        let redis = &self.redis;
        let keys = redis.kind_keys(scope, kind);
        let result = redis
            .bounded(|mut connection| async move {
                let mut invocation = redis.scripts.snapshot.prepare_invoke();
                for key in &keys {
                    invocation.key(key);
                }
                let (rotated, seq, total, current, old): (u8, u64, u64, Vec<String>, Vec<String>) = invocation
                    .arg(redis.publish)
                    .arg(redis.period)
                    .arg(redis.keep_of(scope))
                    .arg(n)
                    .invoke_async(&mut connection)
                    .await?;
                redis.rotated(scope, kind, rotated);
                Ok(Snapshot {
                    seq,
                    total,
                    names: crate::domain::merge_sorted(current, old, n),
                })
            })
            .await;
        self.failed(result)
    }

    async fn keep_watched(&self, scope: &Scope) -> Result<bool, StoreError> {
        let redis = &self.redis;
        let mut marked_all_along = true;
        for kind in Kind::ALL {
            let keys = redis.kind_keys(scope, kind);
            let was_watched: u8 = redis
                .bounded(|mut connection| {
                    let keys = keys.clone();
                    async move {
                        let mut invocation = redis.scripts.watch.prepare_invoke();
                        for key in &keys {
                            invocation.key(key);
                        }
                        let (rotated, was): (u8, u8) = invocation
                            .arg(redis.publish)
                            .arg(redis.period)
                            .arg(redis.keep_of(scope))
                            .arg(millis(WATCHED_FOR))
                            .invoke_async(&mut connection)
                            .await?;
                        redis.rotated(scope, kind, rotated);
                        Ok(was)
                    }
                })
                .await?;
            marked_all_along &= was_watched == 1;
            // Who left at the last rotation, in small steps: each is one
            // short script, and Redis serves everyone else in between.
            loop {
                let drained: usize = redis
                    .bounded(|mut connection| {
                        let keys = keys.clone();
                        async move {
                            let mut invocation = redis.scripts.drain_leaving.prepare_invoke();
                            for key in &keys {
                                invocation.key(key);
                            }
                            Ok(invocation
                                .arg(redis.publish)
                                .arg(kind.as_str())
                                .arg(DRAIN_STEP)
                                .invoke_async(&mut connection)
                                .await?)
                        }
                    })
                    .await?;
                if drained < DRAIN_STEP {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        Ok(marked_all_along)
    }

    fn stats(&self) -> super::Stats {
        let (filter_skipped, filter_checked) = self.filter.counts();
        super::Stats {
            queue_names: self.queue.depth(),
            filter_skipped,
            filter_checked,
            rotations: [0, 1].map(|k| self.redis.rotations[k].load(Ordering::Relaxed)),
        }
    }

    fn describe(&self) -> String {
        let address = self.redis.target.address();
        match self.redis.target.mode {
            RedisMode::Single => format!("Redis at {address}"),
            RedisMode::Cluster => format!("Redis Cluster at {address} (seed node)"),
            RedisMode::Sentinel => format!(
                "Redis master {:?} via Sentinel at {address}",
                self.redis.target.sentinel_master
            ),
        }
    }

    fn close(&self) {
        self.stop.cancel();
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
