//! Where presence is kept: the [`Store`] trait in domain terms, and its two
//! implementations.
//!
//! - [`RedisStore`]: the production store, shared by every replica. Its
//!   report path has two helpers of its own: the report queue
//!   ([`coalesce`]), which sends the reports of concurrent callers together,
//!   and the repeat filter ([`repeat_filter`]), which skips reports that
//!   cannot change anything. Both live inside the Redis store, next to what
//!   they rely on (Redis's intervals, the pub/sub bus), rather than as
//!   layers wired together at startup.
//! - [`MemoryStore`]: the default when no Redis is configured, so that a
//!   newcomer can run the service at once. It lives in one process: replicas
//!   do not share it.
//!
//! Both keep, per scope (the site, each room) and kind, two disjoint sets,
//! *current* and *old*, for intervals of length *T* on one clock, and bring
//! a scope into the current interval whenever they touch it. One shared
//! black-box suite (`tests/api/backends.rs`) holds them to the same
//! behaviour.

mod coalesce;

mod redis;
mod repeat_filter;

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio::time::Instant;

pub mod memory;
pub use self::memory::MemoryStore;
pub use self::redis::{RedisMode, RedisStore, RedisStoreConfig};
use crate::domain::{Counts, Kind, KindPage, RoomOrder, RoomsPage, RoomsPageToken, Scope, Visitors};

/// How much a watcher's first message shows of each kind.
pub const SNAPSHOT_NAMES: usize = 1000;

/// Presence storage, in domain terms. Every call is bounded in time: a slow
/// or missing backend gives [`StoreError`], never a hang.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Records that these visitors were seen now, in `scope` (and so on
    /// the site). Gives up, without sending anything, once `deadline` has
    /// passed.
    async fn report(&self, scope: &Scope, visitors: Visitors, deadline: Instant) -> Result<(), StoreError>;

    /// Takes visitors off the lists of `scope` (the site: of every room
    /// too). Once it returns, no replica skips a report of these names.
    async fn leave(&self, scope: &Scope, visitors: &Visitors) -> Result<(), StoreError>;

    /// A page of users and one of guests in `scope`, each given as (after,
    /// size): up to `size` names after `after`, in byte order, and the
    /// exact total; `size` 0 is a count. A list or a count asks for both
    /// kinds every time, so a store reads both at once where it can (one
    /// Redis round trip).
    async fn pages(
        &self,
        scope: &Scope,
        users: (Option<&str>, usize),
        guests: (Option<&str>, usize),
    ) -> Result<(KindPage, KindPage), StoreError>;

    /// Whether each name of `kind` is online in `scope`, in order.
    async fn check(&self, scope: &Scope, kind: Kind, names: &[&str]) -> Result<Vec<bool>, StoreError>;

    /// Whether each user is online in `scope`, in order, and when each was
    /// last seen (Unix ms), if within the retention.
    async fn check_users(&self, scope: &Scope, users: &[&str]) -> Result<(Vec<bool>, Vec<Option<u64>>), StoreError>;

    /// One page of the rooms with someone online, with exact counts.
    async fn rooms(
        &self,
        order: RoomOrder,
        after: Option<&RoomsPageToken>,
        size: usize,
    ) -> Result<RoomsPage, StoreError>;

    /// The health check, once a second: proves the store answers and takes
    /// writes, brings the site into the current interval, and gives the
    /// figures for the gauges.
    async fn probe(&self) -> Result<Probe, StoreError>;

    /// One bounded step of background work (ageing rooms, pruning last
    /// seen). Says whether more is waiting, so the caller can pace itself.
    async fn maintain(&self) -> Result<Maintenance, StoreError>;

    /// Starts following the changes of `scope`: joins and leaves arrive on
    /// the receiver until [`Store::unfollow`].
    async fn follow(&self, scope: &Scope) -> Result<mpsc::Receiver<Change>, StoreError>;

    /// Stops following `scope`, once the receiver [`Store::follow`] gave
    /// has been dropped (a newer follower of the scope is kept).
    async fn unfollow(&self, scope: &Scope);

    /// The count and first `n` names of one kind, with the sequence number
    /// of the last change they include.
    async fn snapshot(&self, scope: &Scope, kind: Kind, n: usize) -> Result<Snapshot, StoreError>;

    /// Called every second while a replica has watchers of `scope` (and
    /// once before the first snapshot): keeps the scope marked as watched,
    /// brings it into the current interval, and announces (in small steps)
    /// who left at its last rotation. Answers whether the scope was marked
    /// all along: if not, changes went unannounced meanwhile.
    async fn keep_watched(&self, scope: &Scope) -> Result<bool, StoreError>;

    /// A word for logs: which backend this is.
    fn describe(&self) -> String;

    /// Figures for the gauges, read once a second.
    fn stats(&self) -> Stats {
        Stats::default()
    }

    /// Stops the store's own background tasks.
    fn close(&self) {}
}

/// What the health check found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Probe {
    /// Site-wide counts.
    pub counts: Counts,
    /// Rooms with someone online, if the store knows at once.
    pub rooms: Option<u64>,
}

/// The store's own figures, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Names waiting in the report queue.
    pub queue_names: usize,
    /// Names the repeat filter skipped, and looked at, since the start.
    pub filter_skipped: u64,
    pub filter_checked: u64,
    /// Site-wide rotations this replica did, by kind, since the start.
    pub rotations: [u64; 2],
}

/// What one step of background work did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Maintenance {
    pub rooms_swept: u64,
    pub last_seen_pruned: u64,
    /// More work is waiting: call again soon.
    pub more: bool,
}

/// One message of a scope's change stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Names newly listed (`joined`) or no longer listed, in sequence.
    Names {
        kind: Kind,
        joined: bool,
        seq: u64,
        names: Vec<String>,
    },
    /// Messages may have been lost (a reconnect, an overflow): whoever
    /// follows must start again from a snapshot.
    Gap,
}

/// The start of a watch: see [`Store::snapshot`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub seq: u64,
    pub total: u64,
    pub names: Vec<String>,
}

/// Why the store could not answer. All of these mean "try again later": the
/// service maps them to `UNAVAILABLE` and logs the detail.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("no Redis connection could be had: {0}")]
    Pool(String),
    #[error("Redis failed: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("Redis answered something unexpected: {0}")]
    Protocol(String),
    /// The report queue is full: the service is past what Redis can take.
    /// Not a Redis failure: it says nothing of Redis's health.
    #[error("overloaded: the report queue is full")]
    Overloaded,
    /// The caller's deadline passed while the work waited in the queue.
    /// Not a Redis failure either.
    #[error("the deadline passed while the report waited")]
    Expired,
    /// The report queue is gone (only while shutting down).
    #[error("the report queue is closed")]
    QueueClosed,
    /// One failure seen by every report that shared the failed call.
    #[error(transparent)]
    Shared(std::sync::Arc<StoreError>),
}

impl StoreError {
    /// Whether the connection that saw this error should be replaced: any
    /// I/O trouble, a hang, or a server that no longer takes writes (a
    /// master demoted to replica). A script error leaves it usable.
    pub fn breaks_connection(&self) -> bool {
        match self {
            StoreError::Timeout(_) | StoreError::Pool(_) => true,
            StoreError::Redis(e) => {
                e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_unrecoverable_error()
                    || e.kind() == ::redis::ErrorKind::Server(::redis::ServerErrorKind::ReadOnly)
            }
            StoreError::Shared(_)
            | StoreError::QueueClosed
            | StoreError::Overloaded
            | StoreError::Expired
            | StoreError::Protocol(_) => false,
        }
    }

    /// Whether this says something about Redis's health (as opposed to
    /// this service's own load): only those count as Redis errors, flip
    /// readiness, or make the repeat filter forget.
    pub fn is_backend_failure(&self) -> bool {
        match self {
            StoreError::Overloaded | StoreError::Expired | StoreError::QueueClosed => false,
            StoreError::Shared(inner) => inner.is_backend_failure(),
            _ => true,
        }
    }
}
