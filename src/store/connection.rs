use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use bb8_redis::{RedisConnectionManager, bb8::ManageConnection};
use redis::{RedisError, aio::MultiplexedConnection};

/// A pooled, multiplexed Redis connection that remembers it broke.
///
/// Testing every connection with a PING as it leaves the pool would cost a
/// round trip per call, doubling Redis's work. Instead a call that sees the
/// connection fail marks it, and the pool drops it the next time it is
/// handed back or checked out.
pub struct TrackedConnection {
    pub connection: MultiplexedConnection,
    pub broken: BrokenFlag,
}

/// Shared by every clone of one pooled connection.
#[derive(Clone, Default)]
pub struct BrokenFlag(Arc<AtomicBool>);

impl BrokenFlag {
    pub fn mark(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// `bb8-redis`'s manager, with [`TrackedConnection`]s.
pub struct TrackedManager(pub RedisConnectionManager);

impl ManageConnection for TrackedManager {
    type Connection = TrackedConnection;
    type Error = RedisError;

    async fn connect(&self) -> Result<TrackedConnection, RedisError> {
        Ok(TrackedConnection {
            connection: self.0.connect().await?,
            broken: BrokenFlag::default(),
        })
    }

    async fn is_valid(&self, tracked: &mut TrackedConnection) -> Result<(), RedisError> {
        self.0.is_valid(&mut tracked.connection).await
    }

    fn has_broken(&self, tracked: &mut TrackedConnection) -> bool {
        tracked.broken.is_set()
    }
}
