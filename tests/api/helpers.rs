//! What every test needs: a running service on port 0, clients for it,
//! and polling with a deadline instead of sleeps.

use std::{
    future::Future,
    net::SocketAddr,
    time::{Duration, Instant},
};

use presence::{
    Application, Settings,
    proto::v1::{
        CheckOnlineRequest, CheckOnlineResponse, CountOnlineRequest, LeaveRequest, ListOnlineRequest,
        ListOnlineResponse, ReportGuestRequest, ReportUserRequest, presence_client::PresenceClient,
    },
    settings::RedisUrl,
};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

/// A client of one running service, wherever it runs (in this process or
/// as the real binary): the calls, health, and the metrics endpoint.
pub struct Api {
    pub grpc_address: SocketAddr,
    pub metrics_address: SocketAddr,
    pub client: PresenceClient<Channel>,
    pub health: HealthClient<Channel>,
}

impl Api {
    pub fn new(grpc_address: SocketAddr, metrics_address: SocketAddr) -> Self {
        let channel = Channel::from_shared(format!("http://{grpc_address}"))
            .expect("a valid URI")
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy();
        Self {
            grpc_address,
            metrics_address,
            client: PresenceClient::new(channel.clone()),
            health: HealthClient::new(channel),
        }
    }
}

/// A service running inside the test process. Dropping it shuts it down.
pub struct TestApp {
    api: Api,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl std::ops::Deref for TestApp {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

/// Settings for a test: loopback, free ports, and the given store. The
/// Redis timeout is longer than the default: on a busy CI machine a test
/// about something else must not fail on a slow answer (tests of the
/// timeout set their own).
pub fn settings(redis_url: Option<String>) -> Settings {
    Settings {
        redis_url: redis_url.map(RedisUrl::new),
        redis_timeout: Duration::from_secs(2),
        ..Settings::for_tests()
    }
}

pub async fn spawn_app(settings: Settings) -> TestApp {
    // PRESENCE_TEST_LOG=presence=debug shows the service's logs (off by
    // default: tests stay quiet).
    if let Ok(filter) = std::env::var("PRESENCE_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
    let application = Application::build(settings).await.expect("the application builds");
    let grpc_address = application.grpc_address();
    let metrics_address = application.metrics_address();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        application
            .run_until_stopped(shutdown)
            .await
            .expect("the application runs");
    });
    TestApp {
        api: Api::new(grpc_address, metrics_address),
        stop: Some(stop),
        task,
    }
}

/// Everyone online in a scope, read page by page to the end: users,
/// guests, and the counts of the last page.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[allow(dead_code)]
pub struct Everyone {
    pub users: Vec<String>,
    pub guests: Vec<String>,
    pub user_count: u64,
    pub guest_count: u64,
    pub pages: usize,
}

#[allow(dead_code)]
impl Api {
    pub async fn report_user(&self, name: &str) -> Result<(), tonic::Status> {
        self.report_user_in(name, "").await
    }

    pub async fn report_user_in(&self, name: &str, room: &str) -> Result<(), tonic::Status> {
        let request = ReportUserRequest {
            username: name.to_owned(),
            room: room.to_owned(),
        };
        self.client.clone().report_user(request).await.map(|_| ())
    }

    pub async fn report_guest(&self, address: &str) -> Result<(), tonic::Status> {
        self.report_guest_in(address, "").await
    }

    pub async fn report_guest_in(&self, address: &str, room: &str) -> Result<(), tonic::Status> {
        let request = ReportGuestRequest {
            ip_address: address.to_owned(),
            room: room.to_owned(),
        };
        self.client.clone().report_guest(request).await.map(|_| ())
    }

    /// The first page of the site, `limit` names of each kind.
    pub async fn list(&self, limit: u32) -> Result<ListOnlineResponse, tonic::Status> {
        self.page("", limit, "").await
    }

    pub async fn page(&self, room: &str, limit: u32, token: &str) -> Result<ListOnlineResponse, tonic::Status> {
        let request = ListOnlineRequest {
            limit,
            page_token: token.to_owned(),
            room: room.to_owned(),
        };
        self.client.clone().list_online(request).await.map(|r| r.into_inner())
    }

    /// Walks every page of a scope, `limit` at a time.
    pub async fn everyone_in(&self, room: &str, limit: u32) -> Result<Everyone, tonic::Status> {
        let mut everyone = Everyone::default();
        let mut token = String::new();
        loop {
            let page = self.page(room, limit, &token).await?;
            everyone.pages += 1;
            everyone.users.extend(page.users);
            everyone.guests.extend(page.guests);
            everyone.user_count = page.user_count;
            everyone.guest_count = page.guest_count;
            if page.next_page_token.is_empty() {
                return Ok(everyone);
            }
            assert!(everyone.pages < 100_000, "the walk never ends");
            token = page.next_page_token;
        }
    }

    /// Everyone online site-wide, all pages.
    pub async fn everyone(&self) -> Result<Everyone, tonic::Status> {
        self.everyone_in("", 1000).await
    }

    pub async fn count(&self, room: &str) -> Result<(u64, u64), tonic::Status> {
        let request = CountOnlineRequest { room: room.to_owned() };
        let counts = self.client.clone().count_online(request).await?.into_inner();
        Ok((counts.user_count, counts.guest_count))
    }

    pub async fn check(
        &self,
        room: &str,
        users: &[&str],
        guests: &[&str],
    ) -> Result<CheckOnlineResponse, tonic::Status> {
        let request = CheckOnlineRequest {
            usernames: users.iter().map(|s| (*s).to_owned()).collect(),
            ip_addresses: guests.iter().map(|s| (*s).to_owned()).collect(),
            room: room.to_owned(),
        };
        self.client.clone().check_online(request).await.map(|r| r.into_inner())
    }

    pub async fn leave(&self, room: &str, users: &[&str], guests: &[&str]) -> Result<(), tonic::Status> {
        let request = LeaveRequest {
            usernames: users.iter().map(|s| (*s).to_owned()).collect(),
            ip_addresses: guests.iter().map(|s| (*s).to_owned()).collect(),
            room: room.to_owned(),
        };
        self.client.clone().leave(request).await.map(|_| ())
    }

    pub async fn health_of(&self, service: &str) -> Result<ServingStatus, tonic::Status> {
        let request = HealthCheckRequest {
            service: service.to_owned(),
        };
        let response = self.health.clone().check(request).await?;
        Ok(response.into_inner().status())
    }

    /// Waits until the health of `service` is `expected`.
    pub async fn wait_for_health(&self, service: &str, expected: ServingStatus) {
        eventually(
            &format!("health of {service:?} to be {expected:?}"),
            Duration::from_secs(10),
            || async { matches!(self.health_of(service).await, Ok(status) if status == expected).then_some(()) },
        )
        .await
    }

    /// Reports `name` until this replica's repeat filter skips it: from then
    /// on, a report of it would be answered from memory if nothing stopped
    /// it. (The skip counter follows the filter once a second.)
    pub async fn until_skipped(&self, name: &str) {
        let series = "presence_repeat_filter_skipped_total";
        let before = self.metric(series).await;
        eventually("a repeat report to be skipped", Duration::from_secs(10), || async {
            self.report_user(name).await.ok()?;
            (self.metric(series).await > before).then_some(())
        })
        .await;
    }

    /// After its keys vanished behind the service's back at `since` (a
    /// flush), reports `name` until it is listed again, and asserts that
    /// took under 2 s: the repeat filter must notice and stop skipping it.
    pub async fn assert_listed_again_within_2_seconds(&self, name: &str, since: Instant) {
        eventually("the name to be listed again", Duration::from_secs(10), || async {
            self.report_user(name).await.ok()?;
            self.everyone()
                .await
                .ok()?
                .users
                .contains(&name.to_owned())
                .then_some(())
        })
        .await;
        assert!(
            since.elapsed() < Duration::from_secs(2),
            "listed again only after {:?}",
            since.elapsed()
        );
    }

    /// The value of one series in the metrics (0 if absent).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.scrape().await;
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0.0, |value| value.trim().parse().expect("a number"))
    }

    /// The metrics endpoint's text.
    pub async fn scrape(&self) -> String {
        let response = scrape_metrics(self.metrics_address).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        response
    }
}

/// The whole HTTP response of `GET /metrics` at `address` (`host:port`),
/// over a plain socket: the tests need no HTTP client for one request.
pub async fn scrape_metrics(address: impl tokio::net::ToSocketAddrs) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("metrics port open");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .expect("request sent");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("response read");
    response
}

impl TestApp {
    /// Sends the shutdown signal, as SIGTERM would, without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits for the application to have stopped, failing after `within`.
    pub async fn wait_stopped(mut self, within: Duration) {
        self.begin_shutdown();
        let task = &mut self.task;
        tokio::time::timeout(within, task)
            .await
            .expect("the application stops in time")
            .expect("the application ends without panicking");
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A service that is ready: SERVING for `presence.v1.Presence`.
pub async fn spawn_ready_app(settings: Settings) -> TestApp {
    let app = spawn_app(settings).await;
    app.wait_for_health("presence.v1.Presence", ServingStatus::Serving)
        .await;
    app
}

/// `count` ready services with the same settings (replicas sharing one
/// Redis).
pub async fn spawn_replicas(count: usize, settings: Settings) -> Vec<TestApp> {
    let mut apps = Vec::with_capacity(count);
    for _ in 0..count {
        apps.push(spawn_ready_app(settings.clone()).await);
    }
    apps
}

/// Polls `check` until it gives `Some`, failing the test after `within`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A name no other test uses.
pub fn unique(name: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{name}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}
