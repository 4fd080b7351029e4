//! Builds the application from [`Settings`] and runs it until a shutdown
//! signal. Listeners are bound in [`Application::build`], so a test can bind
//! port 0, read the real port, and call the server with no sleeps.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use futures_util::{FutureExt, StreamExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, server::TcpIncoming};
use tonic_health::ServingStatus;

use crate::ageing::Aged;
use crate::auth::{AuthLayer, TokenFile};
use crate::error::OutageLog;
use crate::guests::GuestPrivacy;
use crate::limits::RequestSizeLayer;
use crate::metrics::{self, Metrics};
use crate::proto::{self, server::presence_server::PresenceServer};
use crate::service::PresenceService;
use crate::settings::{SettingError, Settings};
use crate::store::{MemoryStore, RedisStore, RedisStoreConfig, Store, memory::MemoryStoreConfig};
use crate::tls::{self, ServerTls};
use crate::traces::GrpcTraceLayer;
use crate::watch::WatchHub;
use crate::{health, keeper, reload};

/// Probes idle client connections, so that the sockets of clients that
/// vanished without closing (a crashed node, a dropped NAT entry) are freed.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// The largest request accepted: well above the largest valid call (a
/// `ReportBatch` of 1000 names of 256 bytes is about 260 KB), far below
/// what would let one client take the server's memory.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// After the shutdown grace, how long the rest of the shutdown may take.
const SHUTDOWN_TAIL: Duration = Duration::from_millis(500);

/// The running service: the gRPC server with health and reflection, the
/// health follower, the keeper, the watch hub and the metrics endpoint.
pub struct Application {
    grpc_listener: TcpListener,
    metrics_listener: TcpListener,
    store: Arc<dyn Store>,
    settings: Settings,
    security: Security,
}

/// What the security settings load: the gRPC port's TLS, the token file,
/// the guest mode, and the plaintext health port's listener.
struct Security {
    tls: Option<Arc<ServerTls>>,
    tokens: Option<Arc<TokenFile>>,
    guests: GuestPrivacy,
    health_listener: Option<TcpListener>,
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
    #[error("{0}")]
    Setting(#[from] SettingError),
}

impl Application {
    /// Chooses the store and binds both listeners. Does not connect to
    /// Redis: the service starts, not ready, while Redis is down.
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        // rustls's provider, chosen once for the process (the Redis client
        // builds its TLS configuration from the default).
        tls::install_default_provider();
        let secured = &settings.security;
        let tls = secured.tls_files().map(ServerTls::load).transpose()?.map(Arc::new);
        let tokens = secured
            .auth_tokens_file
            .as_deref()
            .map(TokenFile::load)
            .transpose()?
            .map(Arc::new);
        let guests = GuestPrivacy::new(secured.guest_addresses, secured.guest_hash_key_file.as_deref())?;
        let tls_ca = secured.redis_ca_pem(settings.redis_url.as_ref())?;
        let store: Arc<dyn Store> = match &settings.redis_url {
            Some(url) => Arc::new(RedisStore::start(RedisStoreConfig {
                url: url.expose().to_owned(),
                mode: settings.redis_mode,
                sentinel_master: settings.redis_sentinel_master.clone(),
                pool_size: settings.redis_pool_size,
                timeout: settings.redis_timeout,
                key_prefix: settings.key_prefix.clone(),
                interval: settings.tick_interval,
                last_seen: settings.last_seen(),
                tls_ca,
            })?),
            None => Arc::new(MemoryStore::new(MemoryStoreConfig {
                interval: settings.tick_interval,
                last_seen_retention: settings.last_seen().map(|(_, retention)| retention),
            })),
        };
        let health_listener = match settings.security.health_listen {
            Some(address) => Some(bind(address).await?),
            None => None,
        };
        Ok(Self {
            grpc_listener: bind(settings.listen).await?,
            metrics_listener: bind(settings.metrics_listen).await?,
            store,
            settings,
            security: Security {
                tls,
                tokens,
                guests,
                health_listener,
            },
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

    /// The plaintext health port, if there is one.
    pub fn health_address(&self) -> Option<SocketAddr> {
        let listener = self.security.health_listener.as_ref()?;
        listener.local_addr().ok().or(self.settings.security.health_listen)
    }

    /// Serves until `shutdown` completes, then shuts down gracefully: both
    /// health statuses go NOT_SERVING, watch streams end, the server stops
    /// accepting, and in-flight calls get up to the shutdown grace to
    /// finish. Whatever clients do, it returns within the grace and a
    /// fraction of a second.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> Result<(), StartupError> {
        let grpc_address = self.grpc_address();
        let metrics_address = self.metrics_address();
        let health_address = self.health_address();
        let Self {
            grpc_listener,
            metrics_listener,
            store,
            settings,
            security,
        } = self;

        let metrics = Metrics::new();
        metrics.set_tick_interval(settings.tick_interval);
        let outage = OutageLog::default();
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_not_serving::<PresenceServer<PresenceService>>().await;

        let background = CancellationToken::new();
        let follower = tokio::spawn(health::follow(
            store.clone(),
            health.clone(),
            metrics.clone(),
            outage.clone(),
            background.clone(),
        ));
        let keeper = tokio::spawn(keeper::run(store.clone(), metrics.clone(), background.clone()));
        let metrics_stop = CancellationToken::new();
        let metrics_server = tokio::spawn(metrics::serve(
            metrics_listener,
            metrics.clone(),
            metrics_stop.clone().cancelled_owned(),
        ));
        let watches = Arc::new(WatchHub::new(
            store.clone(),
            settings.watch_interval,
            settings.tick_interval,
            metrics.clone(),
            background.clone(),
        ));

        // Nagle's algorithm would hold small responses back until the
        // client's delayed ACK, 40 ms later. (Server::tcp_nodelay does not
        // apply to a listener bound by the caller; this does.)
        let counted = metrics.clone();
        let (age, grace) = (settings.max_connection_age, settings.max_connection_age_grace);
        let incoming = TcpIncoming::from(grpc_listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(TCP_KEEPALIVE));
        let presence = PresenceServer::new(
            PresenceService::new(store.clone(), metrics.clone(), watches, outage, settings.redis_timeout)
                .with_guests(security.guests.clone())
                .with_list_cache(settings.list_cache)
                .with_max_in_flight(settings.max_in_flight as usize),
        )
        .max_decoding_message_size(MAX_REQUEST_BYTES);
        let drain = CancellationToken::new();
        let router = Server::builder()
            .max_concurrent_streams(settings.max_concurrent_streams)
            // HTTP/2 pings on every client connection: a peer that does not
            // answer within the timeout is gone, so a dead connection is
            // noticed within interval + timeout (under a minute by default).
            .http2_keepalive_interval(Some(settings.http2_keepalive_interval))
            .http2_keepalive_timeout(Some(settings.http2_keepalive_timeout))
            // GOAWAY at the age; the grace is enforced by `Aged`.
            .max_connection_age(settings.max_connection_age)
            // Outermost, so a call's span sees the status its client gets
            // (a refused token included).
            .layer(GrpcTraceLayer::new())
            .layer(AuthLayer::new(security.tokens.clone(), metrics.clone()))
            .layer(RequestSizeLayer::new(MAX_REQUEST_BYTES))
            .add_service(health_service.clone())
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?)
            .add_service(presence);
        let server = match &security.tls {
            Some(tls) => router
                .serve_with_incoming_shutdown(
                    tls::incoming(incoming, tls.clone()).map(aged(counted, age, grace)),
                    drain.clone().cancelled_owned(),
                )
                .boxed(),
            None => router
                .serve_with_incoming_shutdown(incoming.map(aged(counted, age, grace)), drain.clone().cancelled_owned())
                .boxed(),
        };
        tokio::pin!(server);
        let health_server = security.health_listener.map(|listener| {
            tokio::spawn(
                Server::builder()
                    .add_service(health_service)
                    .serve_with_incoming_shutdown(
                        TcpIncoming::from(listener).with_nodelay(Some(true)),
                        drain.clone().cancelled_owned(),
                    ),
            )
        });
        let reloads = watch_files(&security.tls, &security.tokens, &background);
        if security.tls.is_some() && health_address.is_none() {
            tracing::warn!(
                "TLS is on and PRESENCE_HEALTH_LISTEN is unset: \
                 probes that cannot do TLS (Kubernetes' gRPC probe) cannot reach Health"
            );
        }

        // The signal handlers are installed when the shutdown future is first
        // polled: poll it once before saying "serving", so that a signal sent
        // on seeing that line finds them (and is not the default action,
        // which kills the process at once).
        tokio::pin!(shutdown);
        let signalled_already = shutdown.as_mut().now_or_never().is_some();
        tracing::info!(
            %grpc_address,
            metrics = %metrics::url(metrics_address),
            health_address = health_address.map(tracing::field::display),
            tls = match &security.tls {
                Some(tls) if tls.is_mutual() => "mutual",
                Some(_) => "on",
                None => "off",
            },
            tokens = security.tokens.is_some(),
            guest_addresses = security.guests.name(),
            store = %store.describe(),
            tick_interval = %humantime::format_duration(settings.tick_interval),
            "serving"
        );

        if !signalled_already {
            tokio::select! {
                result = &mut server => {
                    background.cancel();
                    drain.cancel();
                    metrics_stop.cancel();
                    store.close();
                    result?;
                    return Ok(());
                }
                () = &mut shutdown => {}
            }
        }

        tracing::info!(
            grace = %humantime::format_duration(settings.shutdown_grace),
            "shutting down: NOT_SERVING, draining in-flight calls"
        );
        // Stop the follower first, so it cannot flip the status back; this
        // also ends every watch stream.
        background.cancel();
        let _ = tokio::time::timeout(SHUTDOWN_TAIL, async { tokio::join!(follower, keeper, reloads) }).await;
        health.set_service_status("", ServingStatus::NotServing).await;
        health.set_not_serving::<PresenceServer<PresenceService>>().await;
        metrics.set_ready(false);
        drain.cancel();

        match tokio::time::timeout(settings.shutdown_grace, &mut server).await {
            Ok(result) => result?,
            Err(_) => tracing::warn!("shutdown grace elapsed; closing the calls still open"),
        }
        if let Some(health_server) = health_server {
            // Its calls are quick: it has drained with the main port.
            let _ = tokio::time::timeout(SHUTDOWN_TAIL, health_server).await;
        }
        metrics_stop.cancel();
        let _ = tokio::time::timeout(SHUTDOWN_TAIL, metrics_server).await;
        store.close();
        tracing::info!("stopped");
        Ok(())
    }
}

/// Re-reads the TLS files and the token file as they change, until
/// `stop`.
fn watch_files(
    tls: &Option<Arc<ServerTls>>,
    tokens: &Option<Arc<TokenFile>>,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let (tls, tokens) = (tls.clone(), tokens.clone());
    tokio::spawn(reload::poll(stop.clone(), move || {
        if let Some(tls) = &tls {
            tls.reload_if_changed();
        }
        if let Some(tokens) = &tokens {
            tokens.reload_if_changed();
        }
    }))
}

/// Reflection advertises the public services only, listed by name, with
/// the health service's descriptors too so `grpcurl` can call it.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(proto::server::presence_server::SERVICE_NAME)
        .with_service_name("grpc.health.v1.Health")
}

/// Counts each connection accepted, and closes it past its age and grace.
fn aged<IO>(
    metrics: Metrics,
    age: Duration,
    grace: Duration,
) -> impl FnMut(std::io::Result<IO>) -> std::io::Result<Aged<IO>> {
    move |accepted| {
        accepted.map(|stream| {
            metrics.connection_accepted();
            Aged::new(stream, age, grace)
        })
    }
}

async fn bind(address: SocketAddr) -> Result<TcpListener, StartupError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| StartupError::Bind { address, source })
}
