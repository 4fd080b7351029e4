//! Where the Redis store gets its connections: a `bb8-redis` pool for a
//! single Redis or a Sentinel-managed master, one self-routing connection
//! for a Redis Cluster; and, for the pub/sub bus, a subscriber connection
//! of the same kind.
//!
//! Every connection is made with the store's timeout for connecting and for
//! each response, so `PRESENCE_REDIS_TIMEOUT` holds in every mode (the
//! client library's own defaults are 1 s and 500 ms).

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};
use std::time::Duration;

use bb8_redis::{bb8, bb8::ManageConnection};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Pipeline, ProtocolVersion,
    RedisError, RedisFuture, TlsCertificates, Value,
    aio::{AsyncPushSender, ConnectionLike, MultiplexedConnection},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
};

use crate::locks::lock;
use crate::store::StoreError;

/// How Redis is deployed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RedisMode {
    /// One Redis server (or a proxy in front of several).
    #[default]
    Single,
    /// A Redis Cluster; the URL is one of its nodes, the rest are found.
    Cluster,
    /// A master watched by Redis Sentinel; the URL is one of the sentinels,
    /// the rest (and the master) are learnt from it.
    Sentinel,
}

/// Where Redis is and how to reach it.
#[derive(Clone)]
pub struct RedisTarget {
    pub info: ConnectionInfo,
    pub mode: RedisMode,
    /// Sentinel mode: the name of the master the sentinels watch.
    pub sentinel_master: String,
    /// Connecting, and every response, each within this.
    pub timeout: Duration,
    /// `rediss://` with a private CA: the certificates every connection
    /// trusts (the cluster client is given them apart).
    pub certificates: Option<TlsCertificates>,
}

impl RedisTarget {
    pub fn parse(url: &str, mode: RedisMode, sentinel_master: &str, timeout: Duration) -> Result<Self, RedisError> {
        Ok(Self {
            info: url.into_connection_info()?,
            mode,
            sentinel_master: sentinel_master.to_owned(),
            timeout,
            certificates: None,
        })
    }

    /// With a `rediss://` URL, trusts the CA certificates in `pem`
    /// (PRESENCE_REDIS_CA) instead of the system's, on every connection:
    /// to the server, to a cluster's nodes, to the sentinels and to the
    /// master they name.
    pub fn with_ca(mut self, pem: Option<&[u8]>) -> Result<Self, RedisError> {
        let Some(pem) = pem else { return Ok(self) };
        let certificates = TlsCertificates {
            client_tls: None,
            root_cert: Some(pem.to_vec()),
        };
        self.info = Client::build_with_tls(self.info, certificates.clone())?
            .get_connection_info()
            .clone();
        self.certificates = Some(certificates);
        Ok(self)
    }

    /// The address, without credentials, for logs.
    pub fn address(&self) -> String {
        self.info.addr().to_string()
    }

    fn config(&self) -> AsyncConnectionConfig {
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
    }
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
    pub fn new(target: &RedisTarget, pool_size: u32) -> Result<Self, RedisError> {
        Ok(match target.mode {
            RedisMode::Single | RedisMode::Sentinel => Connections::Pool {
                pool: bb8::Pool::builder()
                    .max_size(pool_size)
                    .connection_timeout(target.timeout)
                    .test_on_check_out(false)
                    .build_unchecked(TrackedManager::new(target)?),
                size: pool_size,
            },
            RedisMode::Cluster => Connections::Cluster {
                client: Box::new(cluster_client(target, None)?),
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

    /// Whether keys of different hash slots must go in separate calls.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Connections::Cluster { .. })
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

fn cluster_client(target: &RedisTarget, push: Option<Arc<dyn AsyncPushSender>>) -> Result<ClusterClient, RedisError> {
    let mut builder = ClusterClient::builder([target.info.clone()])
        .connection_timeout(target.timeout)
        .response_timeout(target.timeout)
        // Retries past a node restart would hide the failure from the
        // caller and from the repeat filter; the store's timeout bounds
        // every call anyway.
        .retries(1);
    if let Some(certificates) = &target.certificates {
        builder = builder.certs(certificates.clone());
    }
    if let Some(push) = push {
        builder = builder
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(PushSender(push));
    }
    builder.build()
}

/// Forwards to a shared push sender (the builder wants an owned one).
struct PushSender(Arc<dyn AsyncPushSender>);

impl AsyncPushSender for PushSender {
    fn send(&self, info: redis::PushInfo) -> Result<(), redis::aio::SendError> {
        self.0.send(info)
    }
}

/// A connection for the pub/sub bus, made afresh after each failure.
pub enum Subscriber {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Subscriber {
    /// Connects with RESP3, delivering every pushed message to `push`.
    pub async fn connect(target: &RedisTarget, push: Arc<dyn AsyncPushSender>) -> Result<Self, StoreError> {
        let connect = async {
            match target.mode {
                RedisMode::Cluster => {
                    let client = cluster_client(target, Some(push))?;
                    Ok(Subscriber::Cluster(client.get_async_connection().await?))
                }
                RedisMode::Single | RedisMode::Sentinel => {
                    let info = match target.mode {
                        RedisMode::Sentinel => Sentinels::new(target).resolve_master().await?,
                        _ => target.info.clone(),
                    };
                    let settings = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
                    let client = Client::open(info.set_redis_settings(settings))?;
                    let config = target.config().set_push_sender(PushSender(push));
                    Ok(Subscriber::Single(
                        client.get_multiplexed_async_connection_with_config(&config).await?,
                    ))
                }
            }
        };
        tokio::time::timeout(target.timeout, connect)
            .await
            .map_err(|_| StoreError::Timeout(target.timeout))?
    }

    /// Subscribes to channels: sharded ones in a cluster (each on the node
    /// owning its slot), plain ones otherwise, matching how scripts publish.
    pub async fn subscribe(&mut self, channels: &[String]) -> Result<(), RedisError> {
        if channels.is_empty() {
            return Ok(());
        }
        match self {
            Subscriber::Single(c) => c.subscribe(channels).await,
            Subscriber::Cluster(c) => c.ssubscribe(channels).await,
        }
    }

    pub async fn unsubscribe(&mut self, channels: &[String]) -> Result<(), RedisError> {
        if channels.is_empty() {
            return Ok(());
        }
        match self {
            Subscriber::Single(c) => c.unsubscribe(channels).await,
            Subscriber::Cluster(c) => c.sunsubscribe(channels).await,
        }
    }
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

/// Makes the pool's connections: to the one Redis, or to whichever node
/// the sentinels name as master now. (`bb8-redis`'s own manager cannot set
/// timeouts, nor follow a failover.)
pub struct TrackedManager {
    target: RedisTarget,
    sentinels: Option<Sentinels>,
}

impl TrackedManager {
    fn new(target: &RedisTarget) -> Result<Self, RedisError> {
        // Checked now, so that a bad URL stops the process at start.
        Client::open(target.info.clone())?;
        Ok(Self {
            target: target.clone(),
            sentinels: (target.mode == RedisMode::Sentinel).then(|| Sentinels::new(target)),
        })
    }
}

impl ManageConnection for TrackedManager {
    type Connection = TrackedConnection;
    type Error = RedisError;

    async fn connect(&self) -> Result<TrackedConnection, RedisError> {
        let info = match &self.sentinels {
            Some(sentinels) => sentinels.resolve_master().await?,
            None => self.target.info.clone(),
        };
        let client = Client::open(info)?;
        let mut connection = client
            .get_multiplexed_async_connection_with_config(&self.target.config())
            .await?;
        if self.sentinels.is_some() {
            // During a failover the sentinels may still name the old
            // master for a moment: only a node that says it is the master
            // will do.
            let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut connection).await?;
            if !matches!(role.first(), Some(Value::BulkString(r)) if r == b"master") {
                return Err(RedisError::from((
                    redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
                    "the node the sentinels named is not the master (yet)",
                )));
            }
        }
        Ok(TrackedConnection {
            connection,
            broken: BrokenFlag::default(),
        })
    }

    async fn is_valid(&self, tracked: &mut TrackedConnection) -> Result<(), RedisError> {
        redis::cmd("PING").query_async::<()>(&mut tracked.connection).await
    }

    fn has_broken(&self, tracked: &mut TrackedConnection) -> bool {
        tracked.broken.is_set()
    }
}

/// The sentinels of one master: the one named in the URL, and those it
/// told us of, so that losing the named one later does not matter.
#[derive(Clone)]
pub struct Sentinels {
    known: Arc<Mutex<Vec<(String, u16)>>>,
    target: RedisTarget,
}

impl Sentinels {
    fn new(target: &RedisTarget) -> Self {
        let first = match target.info.addr() {
            ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => vec![(host.clone(), *port)],
            _ => Vec::new(),
        };
        Self {
            known: Arc::new(Mutex::new(first)),
            target: target.clone(),
        }
    }

    /// Asks the sentinels, in turn, where the master is; learns the other
    /// sentinels from the first that answers.
    pub async fn resolve_master(&self) -> Result<ConnectionInfo, RedisError> {
        let sentinels = lock(&self.known).clone();
        let mut last_error = RedisError::from((redis::ErrorKind::EmptySentinelList, "no sentinel known"));
        for (host, port) in sentinels {
            match self.ask(&host, port).await {
                Ok(master) => return Ok(master),
                Err(error) => last_error = error,
            }
        }
        Err(last_error)
    }

    async fn ask(&self, host: &str, port: u16) -> Result<ConnectionInfo, RedisError> {
        // The URL's user, password and database are the master's; a
        // sentinel is asked without them.
        let sentinel = self
            .with_addr(host, port)
            .set_redis_settings(redis::RedisConnectionInfo::default());
        let client = Client::open(sentinel)?;
        let mut connection = client
            .get_multiplexed_async_connection_with_config(&self.target.config())
            .await?;
        let master = &self.target.sentinel_master;
        let address: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(master)
            .query_async(&mut connection)
            .await?;
        let Some((master_host, master_port)) = address else {
            return Err(RedisError::from((
                redis::ErrorKind::MasterNameNotFoundBySentinel,
                "the sentinel does not know this master name",
            )));
        };
        let others: Vec<std::collections::HashMap<String, String>> = redis::cmd("SENTINEL")
            .arg("sentinels")
            .arg(master)
            .query_async(&mut connection)
            .await
            .unwrap_or_default();
        let mut known = lock(&self.known);
        for other in others {
            let (Some(ip), Some(port)) = (other.get("ip"), other.get("port").and_then(|p| p.parse().ok())) else {
                continue;
            };
            if !known.iter().any(|(h, p)| h == ip && *p == port) {
                known.push((ip.clone(), port));
            }
        }
        drop(known);
        Ok(self.with_addr(&master_host, master_port))
    }

    /// The URL's settings (TLS included) with another host and port.
    fn with_addr(&self, host: &str, port: u16) -> ConnectionInfo {
        let addr = match self.target.info.addr() {
            ConnectionAddr::TcpTls {
                insecure, tls_params, ..
            } => ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host.to_owned(), port),
        };
        self.target.info.clone().set_addr(addr)
    }
}
