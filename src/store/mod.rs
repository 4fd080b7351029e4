//! Where presence is kept: the [`Store`] trait in domain terms, and its two
//! implementations.
//!
//! - [`RedisStore`]: the production store, shared by every replica.
//! - [`MemoryStore`]: the default when no Redis is configured, so that a
//!   newcomer can run the service at once. It lives in one process: replicas
//!   do not share it.
//!
//! - [`Coalescing`]: in front of Redis, sends the reports of concurrent
//!   callers together, in one script call.
//! - [`RepeatFilter`]: in front of Redis, skips reports that cannot change
//!   anything (a name already put into *current* since the last rotation).
//!
//! Both keep, per kind, two disjoint sets (*current* and *old*) and rotate
//! under a lease of one interval; one shared test suite (`tests/store.rs`)
//! holds them to the same behaviour.

mod coalesce;
mod connection;
mod memory;
mod recent;
mod redis;

use std::time::Duration;

use async_trait::async_trait;

pub use self::coalesce::Coalescing;
pub use self::connection::RedisMode;
pub use self::memory::MemoryStore;
pub use self::recent::RepeatFilter;
pub use self::redis::{RedisStore, RedisStoreConfig};
use crate::domain::{ListLimit, Online, Visitors};
use crate::keyspace::Kind;

/// Presence storage, in domain terms. Every call is bounded in time: a slow
/// or missing backend gives [`StoreError`], never a hang.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Records that these visitors were seen now. All or nothing.
    async fn report(&self, visitors: &Visitors) -> Result<(), StoreError>;

    /// Who is online: the first `limit` names of each kind, and the totals.
    async fn list_online(&self, limit: ListLimit) -> Result<Online, StoreError>;

    /// Rotates each kind whose last rotation, by anyone, is at least
    /// `interval` ago. Says how long until the next rotation may be due.
    async fn rotate_if_due(&self, interval: Duration) -> Result<Rotation, StoreError>;

    /// A word for logs: which backend this is.
    fn describe(&self) -> String;
}

/// What one call to [`Store::rotate_if_due`] did, kind by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    pub kinds: Vec<KindRotation>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindRotation {
    pub kind: Kind,
    /// Whether this call rotated the kind (not if anyone had, lately).
    pub rotated: bool,
    /// How long until the kind's next rotation is due: no one can rotate
    /// it sooner, since the last rotation's lease lasts until then.
    pub next_due_in: Duration,
}

impl Rotation {
    /// How long until the earliest next rotation of any kind is due.
    pub fn next_due_in(&self) -> Option<Duration> {
        self.kinds.iter().map(|k| k.next_due_in).min()
    }
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
    /// The coalescer's dispatcher is gone (only while shutting down).
    #[error("the report queue is closed")]
    QueueClosed,
    /// One failure seen by every report that shared the failed call.
    #[error(transparent)]
    Shared(std::sync::Arc<StoreError>),
}

impl StoreError {
    /// Whether the connection that saw this error should be replaced: any
    /// I/O trouble, or a hang. A script error leaves it usable.
    pub fn breaks_connection(&self) -> bool {
        match self {
            StoreError::Timeout(_) | StoreError::Pool(_) => true,
            StoreError::Redis(e) => e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error(),
            // Whoever made the shared call has dealt with its connection.
            StoreError::Shared(_) | StoreError::QueueClosed => false,
        }
    }
}

/// Merges two sorted lists of distinct names into the first `limit`, sorted.
///
/// Both stores keep *current* and *old* disjoint and each sorted, so who is
/// online is their merge, never needing a dedup or a full sort.
pub(crate) fn merge_sorted(a: Vec<String>, b: Vec<String>, limit: ListLimit) -> Vec<String> {
    let cap = limit.map_or(usize::MAX, |l| l.get());
    let mut merged = Vec::with_capacity((a.len() + b.len()).min(cap));
    let mut a = a.into_iter().peekable();
    let mut b = b.into_iter().peekable();
    while merged.len() < cap {
        let next = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if x.as_bytes() <= y.as_bytes() => a.next(),
            (Some(_), Some(_)) => b.next(),
            (Some(_), None) => a.next(),
            (None, Some(_)) => b.next(),
            (None, None) => None,
        };
        match next {
            Some(name) => merged.push(name),
            None => break,
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroUsize;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn merging_interleaves_two_sorted_lists_in_byte_order() {
        let merged = merge_sorted(names(&["a", "c", "é"]), names(&["B", "b", "d"]), None);
        assert_eq!(merged, names(&["B", "a", "b", "c", "d", "é"]));
    }

    #[test]
    fn merging_stops_at_the_limit() {
        let merged = merge_sorted(names(&["a", "c"]), names(&["b", "d"]), NonZeroUsize::new(3));
        assert_eq!(merged, names(&["a", "b", "c"]));
    }

    #[test]
    fn merging_with_an_empty_side_returns_the_other() {
        assert_eq!(merge_sorted(vec![], names(&["x"]), None), names(&["x"]));
        assert_eq!(merge_sorted(names(&["x"]), vec![], None), names(&["x"]));
    }
}
