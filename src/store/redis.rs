use std::{future::Future, time::Duration};

use async_trait::async_trait;
use redis::{IntoConnectionInfo, Script};
use tokio::time::{Instant, timeout_at};

use super::connection::{Connections, RedisConnection, RedisMode};
use super::{KindRotation, Rotation, Store, StoreError, merge_sorted};
use crate::domain::{ListLimit, Online, OnlineList, Visitors};
use crate::keyspace::{self, KeyPrefix, Keyspace, Kind};

/// What a [`RedisStore`] needs to know.
#[derive(Debug, Clone)]
pub struct RedisStoreConfig {
    /// `redis://[user:password@]host:port[/db]` or `unix:///path/to/socket`.
    pub url: String,
    pub mode: RedisMode,
    /// Connections in the pool. Each is multiplexed: many calls share it.
    pub pool_size: u32,
    /// The longest any one store call may take, connecting included.
    pub timeout: Duration,
    pub key_prefix: KeyPrefix,
}

/// The Redis store: the two-set algorithm, on a single Redis through a
/// `bb8-redis` pool or on a Redis Cluster.
///
/// Every call is bounded by the timeout. A call that sees its connection
/// fail or hang marks it broken, and it is replaced (see [`Connections`]):
/// that is how the store recovers by itself after Redis restarts.
pub struct RedisStore {
    connections: Connections,
    keys: Keyspace,
    timeout: Duration,
    report_script: Script,
    list_script: Script,
    rotate_script: Script,
    /// Stored in the rotation lease, so an operator can see who rotated.
    lease_holder: String,
    /// The address without credentials, for logs.
    address: String,
}

impl RedisStore {
    /// Builds the store without connecting: the service starts, and reports
    /// itself not ready, even while Redis is down.
    pub fn new(config: RedisStoreConfig) -> Result<Self, redis::RedisError> {
        let info = config.url.as_str().into_connection_info()?;
        let address = info.addr().to_string();
        let connections = Connections::new(info, config.mode, config.pool_size, config.timeout)?;
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "presence".to_owned());
        Ok(Self {
            connections,
            keys: Keyspace::new(&config.key_prefix),
            timeout: config.timeout,
            report_script: Script::new(keyspace::REPORT_SCRIPT),
            list_script: Script::new(keyspace::LIST_SCRIPT),
            rotate_script: Script::new(keyspace::ROTATE_SCRIPT),
            lease_holder: format!("{host}/{}", std::process::id()),
            address,
        })
    }

    /// Runs one store operation on a connection, within the time bound. A
    /// connection that failed or hung is marked broken, so the next call
    /// gets a fresh one.
    async fn bounded<T, F, Fut>(&self, operation: F) -> Result<T, StoreError>
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

    async fn report_kind(&self, mut connection: RedisConnection, kind: Kind, names: &[&str]) -> Result<(), StoreError> {
        if names.is_empty() {
            return Ok(());
        }
        let keys = self.keys.of(kind);
        self.report_script
            .key(&keys.current)
            .key(&keys.old)
            .arg(names)
            .invoke_async::<()>(&mut connection)
            .await?;
        Ok(())
    }

    async fn list_kind(
        &self,
        mut connection: RedisConnection,
        kind: Kind,
        limit: ListLimit,
    ) -> Result<OnlineList, StoreError> {
        let keys = self.keys.of(kind);
        let (total, current, old): (u64, Vec<String>, Vec<String>) = self
            .list_script
            .key(&keys.current)
            .key(&keys.old)
            .arg(limit.map_or(0, |l| l.get()))
            .invoke_async(&mut connection)
            .await?;
        Ok(OnlineList {
            names: merge_sorted(current, old, limit),
            total,
        })
    }

    async fn rotate_kind(
        &self,
        mut connection: RedisConnection,
        kind: Kind,
        interval: Duration,
    ) -> Result<KindRotation, StoreError> {
        let keys = self.keys.of(kind);
        let interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX).max(1);
        let (rotated, next_due_ms): (i64, i64) = self
            .rotate_script
            .key(&keys.current)
            .key(&keys.old)
            .key(&keys.rotation_lease)
            .arg(interval_ms)
            .arg(&self.lease_holder)
            .invoke_async(&mut connection)
            .await?;
        Ok(KindRotation {
            kind,
            rotated: rotated == 1,
            next_due_in: Duration::from_millis(u64::try_from(next_due_ms).unwrap_or(interval_ms)),
        })
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn report(&self, visitors: &Visitors) -> Result<(), StoreError> {
        let users: Vec<&str> = visitors.users.iter().map(|u| u.as_str()).collect();
        let guests: Vec<&str> = visitors.guests.iter().map(|g| g.as_str()).collect();
        self.bounded(|connection| async {
            // The two kinds live in different cluster slots, so they are two
            // scripts; both go out at once on the multiplexed connection.
            tokio::try_join!(
                self.report_kind(connection.clone(), Kind::Users, &users),
                self.report_kind(connection, Kind::Guests, &guests),
            )?;
            Ok(())
        })
        .await
    }

    async fn list_online(&self, limit: ListLimit) -> Result<Online, StoreError> {
        self.bounded(|connection| async move {
            let (users, guests) = tokio::try_join!(
                self.list_kind(connection.clone(), Kind::Users, limit),
                self.list_kind(connection, Kind::Guests, limit),
            )?;
            Ok(Online { users, guests })
        })
        .await
    }

    async fn rotate_if_due(&self, interval: Duration) -> Result<Rotation, StoreError> {
        self.bounded(|connection| async move {
            let mut kinds = Vec::with_capacity(Kind::ALL.len());
            for kind in Kind::ALL {
                kinds.push(self.rotate_kind(connection.clone(), kind, interval).await?);
            }
            Ok(Rotation { kinds })
        })
        .await
    }

    fn describe(&self) -> String {
        match self.connections {
            Connections::Pool { .. } => format!("Redis at {}", self.address),
            Connections::Cluster { .. } => format!("Redis Cluster at {} (seed node)", self.address),
        }
    }
}
