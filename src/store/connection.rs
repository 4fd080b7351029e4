//! Where the Redis store gets its connections: a `bb8-redis` pool for a
//! single Redis, one self-routing connection for a Redis Cluster.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};
use std::time::Duration;

use bb8_redis::{RedisConnectionManager, bb8, bb8::ManageConnection};
use redis::{
    Cmd, ConnectionInfo, Pipeline, RedisError, RedisFuture, Value,
    aio::{ConnectionLike, MultiplexedConnection},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
};

use super::StoreError;

/// How Redis is deployed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RedisMode {
    /// One Redis server (or a proxy in front of several).
    #[default]
    Single,
    /// A Redis Cluster; the URL is one of its nodes, the rest are found.
    Cluster,
}

/// One connection to Redis, whichever way it is deployed. Both kinds are
/// multiplexed and cheap to clone; every script call goes through this.
#[derive(Clone)]
pub enum RedisConnection {
    Single(MultiplexedConnection),
    /// Routes each call to the node owning its keys' slot, and follows
    /// MOVED, ASK and topology changes by itself.
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Single(c) => c.req_packed_command(cmd),
            RedisConnection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConnection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Single(c) => c.get_db(),
            RedisConnection::Cluster(c) => c.get_db(),
        }
    }
}

/// The source of connections, and the way a broken one gets replaced.
pub enum Connections {
    /// Each call checks a multiplexed connection out, clones it and hands
    /// the pooled one back at once: the clone pipelines the call with every
    /// other on that connection instead of holding it for a round trip.
    Pool { pool: bb8::Pool<TrackedManager>, size: u32 },
    /// The cluster connection already multiplexes to every node, so one is
    /// kept, made on first use and remade after it fails.
    Cluster {
        // Boxed: the client is large, and this enum is otherwise small.
        client: Box<ClusterClient>,
        connection: Mutex<Option<ClusterConnection>>,
    },
}

/// What to mark if the call on a checked-out connection breaks it.
pub enum Checkout {
    Pooled(BrokenFlag),
    Cluster,
}

impl Connections {
    /// Builds the source without connecting: the service starts, and says
    /// it is not ready, while Redis is down.
    pub fn new(info: ConnectionInfo, mode: RedisMode, pool_size: u32, timeout: Duration) -> Result<Self, RedisError> {
        Ok(match mode {
            RedisMode::Single => Connections::Pool {
                pool: bb8::Pool::builder()
                    .max_size(pool_size)
                    .connection_timeout(timeout)
                    .test_on_check_out(false)
                    .build_unchecked(TrackedManager(RedisConnectionManager::new(info)?)),
                size: pool_size,
            },
            RedisMode::Cluster => Connections::Cluster {
                client: Box::new(
                    ClusterClient::builder([info])
                        .connection_timeout(timeout)
                        .response_timeout(timeout)
                        .build()?,
                ),
                connection: Mutex::new(None),
            },
        })
    }

    /// A connection that has not been seen to fail.
    pub async fn checkout(&self) -> Result<(RedisConnection, Checkout), StoreError> {
        match self {
            Connections::Pool { pool, size } => {
                // A broken connection is dropped as its guard goes, and the
                // pool connects a new one in its place.
                for _ in 0..=*size {
                    let pooled = pool.get().await.map_err(|e| match e {
                        bb8::RunError::User(e) => StoreError::Redis(e),
                        bb8::RunError::TimedOut => StoreError::Pool("timed out connecting".to_owned()),
                    })?;
                    if !pooled.broken.is_set() {
                        let connection = RedisConnection::Single(pooled.connection.clone());
                        return Ok((connection, Checkout::Pooled(pooled.broken.clone())));
                    }
                }
                Err(StoreError::Pool("every pooled connection is broken".to_owned()))
            }
            Connections::Cluster { client, connection } => {
                if let Some(existing) = lock(connection).clone() {
                    return Ok((RedisConnection::Cluster(existing), Checkout::Cluster));
                }
                let fresh = client.get_async_connection().await?;
                *lock(connection) = Some(fresh.clone());
                Ok((RedisConnection::Cluster(fresh), Checkout::Cluster))
            }
        }
    }

    /// Makes sure the connection a failed call used is not used again.
    pub fn mark_broken(&self, checkout: &Checkout) {
        match (self, checkout) {
            (_, Checkout::Pooled(flag)) => flag.mark(),
            (Connections::Cluster { connection, .. }, Checkout::Cluster) => *lock(connection) = None,
            (Connections::Pool { .. }, Checkout::Cluster) => {}
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded value is a cache of a connection: usable even if a
    // holder panicked.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

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
