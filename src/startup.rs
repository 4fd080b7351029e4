//! Builds the application from [`Settings`] and runs it until a shutdown
//! signal. Listeners are bound in [`Application::build`], so a test can bind
//! port 0, read the real port, and call the server with no sleeps.

use std::{future::Future, net::SocketAddr, sync::Arc};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, server::TcpIncoming};
use tonic_health::ServingStatus;

use crate::proto::{self, v1::presence_server::PresenceServer};
use crate::service::PresenceService;
use crate::settings::Settings;
use crate::store::{Coalescing, MemoryStore, RedisStore, RedisStoreConfig, RepeatFilter, Store};
use crate::{backend_health, metrics, metrics::Metrics, tick};

/// Probes idle client connections, so that the sockets of clients that
/// vanished without closing (a crashed node, a dropped NAT entry) are freed.
const TCP_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(60);

/// The running service: the gRPC server with health and reflection, the
/// tick, the backend health follower and the metrics endpoint.
pub struct Application {
    grpc_listener: TcpListener,
    metrics_listener: TcpListener,
    store: Arc<dyn Store>,
    settings: Settings,
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot use the Redis URL: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("cannot build server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("the gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

impl Application {
    /// Chooses the store and binds both listeners. Does not connect to
    /// Redis: the service starts, not ready, while Redis is down.
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        let store: Arc<dyn Store> = match &settings.redis_url {
            Some(url) => {
                let redis = RedisStore::new(RedisStoreConfig {
                    url: url.expose().to_owned(),
                    mode: settings.redis_mode,
                    pool_size: settings.redis_pool_size,
                    timeout: settings.redis_timeout,
                    key_prefix: settings.key_prefix.clone(),
                })?;
                let in_flight = usize::try_from(settings.redis_pool_size).unwrap_or(1);
                Arc::new(RepeatFilter::new(Coalescing::new(
                    redis,
                    in_flight,
                    settings.redis_timeout,
                )))
            }
            None => Arc::new(MemoryStore::new()),
        };
        Self::with_store(settings, store).await
    }

    /// Like [`Application::build`], with a store of the caller's choosing.
    pub async fn with_store(settings: Settings, store: Arc<dyn Store>) -> Result<Self, StartupError> {
        Ok(Self {
            grpc_listener: bind(settings.listen).await?,
            metrics_listener: bind(settings.metrics_listen).await?,
            store,
            settings,
        })
    }

    pub fn grpc_address(&self) -> SocketAddr {
        self.grpc_listener.local_addr().unwrap_or(self.settings.listen)
    }

    pub fn metrics_address(&self) -> SocketAddr {
        self.metrics_listener
            .local_addr()
            .unwrap_or(self.settings.metrics_listen)
    }

    /// Serves until `shutdown` completes, then shuts down gracefully: both
    /// health statuses go NOT_SERVING, the server stops accepting, and
    /// in-flight calls get up to the shutdown grace to finish.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> Result<(), StartupError> {
        let grpc_address = self.grpc_address();
        let metrics_address = self.metrics_address();
        let Self {
            grpc_listener,
            metrics_listener,
            store,
            settings,
        } = self;

        let metrics = Metrics::new();
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_not_serving::<PresenceServer<PresenceService>>().await;

        let background = CancellationToken::new();
        let tick = tokio::spawn(tick::run(
            store.clone(),
            settings.tick_interval,
            metrics.clone(),
            background.clone(),
        ));
        let follower = tokio::spawn(backend_health::follow(
            store.clone(),
            health.clone(),
            metrics.clone(),
            background.clone(),
        ));
        let metrics_server = tokio::spawn(metrics::serve(
            metrics_listener,
            metrics.clone(),
            background.clone().cancelled_owned(),
        ));

        // Nagle's algorithm would hold small responses back until the
        // client's delayed ACK, 40 ms later. (Server::tcp_nodelay does not
        // apply to a listener bound by the caller; this does.)
        let incoming = TcpIncoming::from(grpc_listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(TCP_KEEPALIVE));
        let drain = CancellationToken::new();
        let server = Server::builder()
            .add_service(health_service)
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?)
            .add_service(PresenceServer::new(PresenceService::new(store.clone(), metrics)))
            .serve_with_incoming_shutdown(incoming, drain.clone().cancelled_owned());
        tokio::pin!(server);

        tracing::info!(
            %grpc_address,
            metrics = %metrics::url(metrics_address),
            store = %store.describe(),
            tick_interval = %humantime::format_duration(settings.tick_interval),
            "serving"
        );

        tokio::select! {
            result = &mut server => {
                background.cancel();
                result?;
                return Ok(());
            }
            () = shutdown => {}
        }

        tracing::info!(
            grace = %humantime::format_duration(settings.shutdown_grace),
            "shutting down: NOT_SERVING, draining in-flight calls"
        );
        // Stop the follower first, so it cannot flip the status back.
        background.cancel();
        let _ = tokio::join!(tick, follower, metrics_server);
        health.set_service_status("", ServingStatus::NotServing).await;
        health.set_not_serving::<PresenceServer<PresenceService>>().await;
        drain.cancel();

        match tokio::time::timeout(settings.shutdown_grace, &mut server).await {
            Ok(result) => result?,
            Err(_) => tracing::warn!("shutdown grace elapsed; closing the calls still open"),
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Reflection advertises the public services only, listed by name, with
/// the health service's descriptors too so `grpcurl` can call it.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(proto::v1::presence_server::SERVICE_NAME)
        .with_service_name("grpc.health.v1.Health")
}

async fn bind(address: SocketAddr) -> Result<TcpListener, StartupError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| StartupError::Bind { address, source })
}
