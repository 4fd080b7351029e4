//! Securing a deployment, black-box on the real binary: TLS and mutual TLS
//! on the gRPC port, certificates and tokens rotated under a running
//! server, the plaintext health port, tokens and their roles, the guest
//! address modes, and the settings that must stop it at start.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    time::Duration,
};

use presence::proto::v1::{
    CheckOnlineRequest, CountOnlineRequest, LeaveRequest, ListOnlineRequest, ListOnlineResponse, ListRoomsRequest,
    ReportBatchRequest, ReportGuestRequest, ReportUserRequest, WatchOnlineRequest, presence_client::PresenceClient,
};
use tempfile::TempDir;
use tonic::{
    Code, Request, Status,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::{
    binary::{Binary, command as presence},
    certs::TestCerts,
    helpers::{eventually, unique},
    redis_server::RedisServer,
};

const WITHIN: Duration = Duration::from_secs(20);

/// Tokens long enough for the file's rules; unique to each test.
fn token(role: &str) -> String {
    format!("{role}-{}-0123456789abcdef0123456789abcdef", unique("token"))
}

/// A running `presence` and where it listens.
struct Server {
    process: Binary,
    grpc: String,
    health: Option<String>,
    metrics: String,
}

impl Server {
    /// Starts it with these variables on top of the defaults (loopback,
    /// free ports, JSON logs, the in-memory store), and waits until it says
    /// it is serving.
    async fn start(env: &[(&str, OsString)]) -> Self {
        let mut command = presence();
        for (name, value) in env {
            command.env(name, value);
        }
        let mut process = Binary::spawn(command);
        let serving = process.wait_for_log("serving").await;
        let field = |name: &str| serving[name].as_str().map(str::to_owned);
        Self {
            grpc: field("grpc_address").expect("the gRPC address is logged"),
            health: field("health_address"),
            metrics: field("metrics").expect("the metrics URL is logged"),
            process,
        }
    }

    fn health_address(&self) -> &str {
        self.health.as_deref().expect("a health port")
    }

    async fn scrape(&self) -> String {
        let address = self.metrics.trim_start_matches("http://").trim_end_matches("/metrics");
        crate::helpers::scrape_metrics(address).await
    }
}

fn os(value: impl Into<OsString>) -> OsString {
    value.into()
}

fn path(value: &Path) -> OsString {
    value.as_os_str().to_owned()
}

/// A token file in `dir`, with these `(role, token)` lines.
fn token_file(dir: &Path, tokens: &[(&str, &str)]) -> PathBuf {
    let file = dir.join("tokens");
    write_tokens(&file, tokens);
    file
}

fn write_tokens(file: &Path, tokens: &[(&str, &str)]) {
    let mut text = String::from("# role token\n\n");
    for (role, token) in tokens {
        text.push_str(&format!("{role} {token}\n"));
    }
    // Written aside and renamed: a reader never sees half a file.
    let part = file.with_extension("part");
    std::fs::write(&part, text).expect("token file written");
    std::fs::rename(&part, file).expect("token file in place");
}

async fn plain_channel(address: &str) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{address}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// A new TLS connection trusting `ca`, presenting `identity` if given.
async fn tls_channel(
    address: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Channel, tonic::transport::Error> {
    let read = |p: &Path| std::fs::read(p).expect("a test PEM file");
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(read(cert), read(key)));
    }
    Endpoint::from_shared(format!("https://{address}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// `message` with `authorization: Bearer <token>` when a token is given.
fn authorized<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().expect("a valid header value");
        request.metadata_mut().insert("authorization", value);
    }
    request
}

async fn report(channel: &Channel, token: Option<&str>, name: &str) -> Result<(), Status> {
    let request = ReportUserRequest {
        username: name.to_owned(),
        ..Default::default()
    };
    PresenceClient::new(channel.clone())
        .report_user(authorized(request, token))
        .await
        .map(|_| ())
}

async fn list(channel: &Channel, token: Option<&str>) -> Result<ListOnlineResponse, Status> {
    PresenceClient::new(channel.clone())
        .list_online(authorized(ListOnlineRequest::default(), token))
        .await
        .map(|r| r.into_inner())
}

async fn health(channel: &Channel, service: &str) -> Result<ServingStatus, Status> {
    let request = HealthCheckRequest {
        service: service.to_owned(),
    };
    Ok(HealthClient::new(channel.clone())
        .check(request)
        .await?
        .into_inner()
        .status())
}

/// Connecting and one call: what a client sees of the server.
async fn reachable_with_tls(address: &str, ca: &Path, identity: Option<(&Path, &Path)>) -> Result<(), String> {
    let channel = tls_channel(address, ca, identity).await.map_err(|e| e.to_string())?;
    health(&channel, "").await.map(|_| ()).map_err(|e| e.to_string())
}

fn tls_env(certs: &TestCerts) -> Vec<(&'static str, OsString)> {
    vec![
        ("PRESENCE_TLS_CERT", path(&certs.server_cert())),
        ("PRESENCE_TLS_KEY", path(&certs.server_key())),
        ("PRESENCE_HEALTH_LISTEN", os("127.0.0.1:0")),
    ]
}

#[tokio::test]
async fn a_plaintext_client_gets_nothing_from_the_tls_port_and_a_tls_client_is_served() {
    let certs = TestCerts::generate();
    let server = Server::start(&tls_env(&certs)).await;

    // Plaintext HTTP/2 to a TLS port: refused, whether at connect or call.
    let plaintext = match plain_channel(&server.grpc).await {
        Ok(channel) => report(&channel, None, "plain").await.map_err(|s| s.to_string()),
        Err(error) => Err(error.to_string()),
    };
    assert!(plaintext.is_err(), "a plaintext client was served by the TLS port");

    // The failed handshake did not stop the accept loop.
    let channel = tls_channel(&server.grpc, &certs.ca(), None)
        .await
        .expect("TLS connects");
    report(&channel, None, "over-tls").await.expect("a report over TLS");
    assert_eq!(list(&channel, None).await.expect("a list over TLS").users, ["over-tls"]);

    // A client that trusts another CA does not trust this server.
    let distrust = reachable_with_tls(&server.grpc, &certs.other_ca(), None).await;
    assert!(distrust.is_err(), "a client trusting another CA accepted the server");
}

#[tokio::test]
async fn with_mutual_tls_a_client_of_another_ca_or_without_a_certificate_is_refused() {
    let certs = TestCerts::generate();
    let mut env = tls_env(&certs);
    env.push(("PRESENCE_TLS_CLIENT_CA", path(&certs.ca())));
    let server = Server::start(&env).await;

    let ours = (certs.client_cert(), certs.client_key());
    let theirs = (certs.other_client_cert(), certs.other_client_key());
    reachable_with_tls(&server.grpc, &certs.ca(), Some((&ours.0, &ours.1)))
        .await
        .expect("a client certificate of the client CA is accepted");
    let wrong_ca = reachable_with_tls(&server.grpc, &certs.ca(), Some((&theirs.0, &theirs.1))).await;
    assert!(wrong_ca.is_err(), "a client certificate of another CA was accepted");
    let none = reachable_with_tls(&server.grpc, &certs.ca(), None).await;
    assert!(none.is_err(), "a client without a certificate was accepted");
    // And the server goes on accepting good clients.
    reachable_with_tls(&server.grpc, &certs.ca(), Some((&ours.0, &ours.1)))
        .await
        .expect("still serving");
}

#[tokio::test]
async fn a_report_token_reports_but_cannot_read_and_a_read_token_does_both() {
    let dir = TempDir::new().expect("a temporary directory");
    let (reporter, reader) = (token("report"), token("read"));
    let tokens = token_file(dir.path(), &[("report", &reporter), ("read", &reader)]);
    let server = Server::start(&[("PRESENCE_AUTH_TOKENS_FILE", path(&tokens))]).await;
    let channel = plain_channel(&server.grpc).await.expect("connects");
    let mut client = PresenceClient::new(channel.clone());
    let report_token = Some(reporter.as_str());

    // A report token may report and leave.
    report(&channel, report_token, "alice")
        .await
        .expect("ReportUser with a report token");
    let guest = ReportGuestRequest {
        ip_address: "10.0.0.1".into(),
        ..Default::default()
    };
    client
        .report_guest(authorized(guest, report_token))
        .await
        .expect("ReportGuest");
    let batch = ReportBatchRequest {
        usernames: vec!["bob".into()],
        ..Default::default()
    };
    client
        .report_batch(authorized(batch, report_token))
        .await
        .expect("ReportBatch");
    let leave = LeaveRequest {
        usernames: vec!["bob".into()],
        ..Default::default()
    };
    client.leave(authorized(leave, report_token)).await.expect("Leave");

    // ...and nothing that shows who is online.
    let denied = |result: Result<(), Status>, what: &str| {
        let status = result.expect_err(what);
        assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
        assert!(
            !status.message().contains(&reporter),
            "{what}: the token is in the message"
        );
    };
    denied(list(&channel, report_token).await.map(|_| ()), "ListOnline");
    let count = client.count_online(authorized(CountOnlineRequest::default(), report_token));
    denied(count.await.map(|_| ()), "CountOnline");
    let check = CheckOnlineRequest {
        usernames: vec!["alice".into()],
        ..Default::default()
    };
    denied(
        client.check_online(authorized(check, report_token)).await.map(|_| ()),
        "CheckOnline",
    );
    let rooms = client.list_rooms(authorized(ListRoomsRequest::default(), report_token));
    denied(rooms.await.map(|_| ()), "ListRooms");
    let watch = client.watch_online(authorized(WatchOnlineRequest::default(), report_token));
    denied(watch.await.map(|_| ()), "WatchOnline");

    // A read token does everything.
    let read_token = Some(reader.as_str());
    report(&channel, read_token, "carol")
        .await
        .expect("a read token may report");
    let online = list(&channel, read_token).await.expect("a read token lists");
    assert_eq!(online.users, ["alice", "carol"]);
    assert_eq!(online.guests, ["10.0.0.1"]);

    // No token, an unknown one, or a malformed header: UNAUTHENTICATED,
    // and the same message whatever the reason.
    let mut messages = Vec::new();
    for attempt in [None, Some("not-a-token-0123456789abcdef0123456789")] {
        let status = report(&channel, attempt, "mallory").await.expect_err("refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        messages.push(status.message().to_owned());
    }
    let mut basic = Request::new(ListOnlineRequest::default());
    let header = format!("Basic {reader}").parse().expect("a header value");
    basic.metadata_mut().insert("authorization", header);
    let status = client.list_online(basic).await.expect_err("not a bearer token");
    assert_eq!(status.code(), Code::Unauthenticated);
    messages.push(status.message().to_owned());
    assert!(messages.windows(2).all(|w| w[0] == w[1]), "{messages:?}");
    assert!(!messages[0].contains(&reader) && !messages[0].contains(&reporter));

    // Health needs no token.
    assert_eq!(
        health(&channel, "").await.expect("health is open"),
        ServingStatus::Serving
    );

    // Reflection (v1 and v1alpha) needs a read token.
    reflection_needs_a_read_token(&channel, &reporter, &reader).await;

    // Refusals are counted like other outcomes, and no token is a label.
    let metrics = server.scrape().await;
    for expected in [
        "grpc_method=\"ListOnline\",grpc_code=\"PermissionDenied\"} 1",
        "grpc_method=\"ReportUser\",grpc_code=\"Unauthenticated\"} 2",
        "grpc_method=\"WatchOnline\",grpc_code=\"PermissionDenied\"} 1",
    ] {
        assert!(metrics.contains(expected), "missing {expected:?} in:\n{metrics}");
    }
    assert!(!metrics.contains(&reader) && !metrics.contains(&reporter));
}

async fn reflection_needs_a_read_token(channel: &Channel, reporter: &str, reader: &str) {
    use tonic_reflection::pb::{v1, v1alpha};
    let v1_request = |token: &str| {
        let message = v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        };
        authorized(tokio_stream_once(message), Some(token))
    };
    let mut v1_client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let status = v1_client
        .server_reflection_info(v1_request(reporter))
        .await
        .expect_err("a report token may not reflect");
    assert_eq!(status.code(), Code::PermissionDenied);
    let mut stream = v1_client
        .server_reflection_info(v1_request(reader))
        .await
        .expect("a read token may reflect")
        .into_inner();
    let answer = stream.message().await.expect("an answer").expect("a message");
    assert!(format!("{answer:?}").contains("presence.v1.Presence"), "{answer:?}");

    let alpha_request = |token: &str| {
        let message = v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        };
        authorized(tokio_stream_once(message), Some(token))
    };
    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let status = alpha
        .server_reflection_info(alpha_request(reporter))
        .await
        .expect_err("a report token may not reflect (v1alpha)");
    assert_eq!(status.code(), Code::PermissionDenied);
    alpha
        .server_reflection_info(alpha_request(reader))
        .await
        .expect("a read token may reflect (v1alpha)");
}

/// A client stream of one message.
fn tokio_stream_once<T: Send + 'static>(message: T) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::iter([message])
}

#[tokio::test]
async fn a_rotated_certificate_is_used_for_new_connections_without_a_restart() {
    let old = TestCerts::generate();
    let new = TestCerts::generate();
    // The server's files live apart, as a mounted Secret would.
    let mounted = TempDir::new().expect("a temporary directory");
    let (cert, key) = (mounted.path().join("tls.crt"), mounted.path().join("tls.key"));
    std::fs::copy(old.server_cert(), &cert).expect("cert in place");
    std::fs::copy(old.server_key(), &key).expect("key in place");
    let server = Server::start(&[("PRESENCE_TLS_CERT", path(&cert)), ("PRESENCE_TLS_KEY", path(&key))]).await;
    reachable_with_tls(&server.grpc, &old.ca(), None)
        .await
        .expect("the first certificate is served");
    assert!(reachable_with_tls(&server.grpc, &new.ca(), None).await.is_err());
    let kept = tls_channel(&server.grpc, &old.ca(), None).await.expect("connects");

    // cert-manager renews: the key first, then the certificate. In between
    // the pair does not match, and the old one stays in use.
    std::fs::copy(new.server_key(), &key).expect("new key");
    std::fs::copy(new.server_cert(), &cert).expect("new cert");
    eventually("new connections to get the new certificate", WITHIN, || async {
        reachable_with_tls(&server.grpc, &new.ca(), None).await.ok()
    })
    .await;
    assert!(
        reachable_with_tls(&server.grpc, &old.ca(), None).await.is_err(),
        "the old certificate is still served"
    );
    // A connection made before goes on.
    health(&kept, "").await.expect("an existing connection is not cut");
}

#[tokio::test]
async fn a_token_rotated_in_the_file_is_honoured_without_a_restart() {
    let dir = TempDir::new().expect("a temporary directory");
    let (old, new) = (token("report"), token("report"));
    let tokens = token_file(dir.path(), &[("report", &old)]);
    let mut server = Server::start(&[("PRESENCE_AUTH_TOKENS_FILE", path(&tokens))]).await;
    let channel = plain_channel(&server.grpc).await.expect("connects");
    report(&channel, Some(&old), "a").await.expect("the old token works");
    let refused = report(&channel, Some(&new), "b").await.expect_err("not yet");
    assert_eq!(refused.code(), Code::Unauthenticated);

    // Add the new one, move to it, remove the old one.
    write_tokens(&tokens, &[("report", &old), ("report", &new)]);
    eventually("the new token to be accepted", WITHIN, || async {
        report(&channel, Some(&new), "b").await.ok()
    })
    .await;
    report(&channel, Some(&old), "a")
        .await
        .expect("both work while rotating");
    write_tokens(&tokens, &[("report", &new)]);
    eventually("the old token to be refused", WITHIN, || async {
        report(&channel, Some(&old), "a")
            .await
            .err()
            .filter(|s| s.code() == Code::Unauthenticated)
    })
    .await;
    report(&channel, Some(&new), "b").await.expect("the new token works");

    // A broken file does not lock callers out: the tokens in use stay.
    std::fs::write(&tokens, "report\n").expect("a malformed file");
    server
        .process
        .wait_for_log("token file changed but cannot be used; keeping the tokens in use")
        .await;
    report(&channel, Some(&new), "b")
        .await
        .expect("still the last good tokens");
}

#[tokio::test]
async fn the_health_port_answers_probes_in_plaintext_and_serves_nothing_else() {
    let certs = TestCerts::generate();
    let dir = TempDir::new().expect("a temporary directory");
    let reader = token("read");
    let mut env = tls_env(&certs);
    env.push((
        "PRESENCE_AUTH_TOKENS_FILE",
        path(&token_file(dir.path(), &[("read", &reader)])),
    ));
    let mut server = Server::start(&env).await;

    // What Kubernetes' gRPC probe does: plaintext, no token.
    let probe = plain_channel(server.health_address())
        .await
        .expect("the health port connects");
    assert_eq!(health(&probe, "").await.expect("liveness"), ServingStatus::Serving);
    eventually("readiness on the health port", WITHIN, || async {
        (health(&probe, "presence.v1.Presence").await.ok()? == ServingStatus::Serving).then_some(())
    })
    .await;
    // Health alone: the service is not reachable past TLS and tokens there.
    let status = list(&probe, Some(&reader))
        .await
        .expect_err("no Presence on the health port");
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");

    // The gRPC port serves Health too, over TLS and without a token.
    let channel = tls_channel(&server.grpc, &certs.ca(), None)
        .await
        .expect("TLS connects");
    assert_eq!(
        health(&channel, "").await.expect("health on the gRPC port"),
        ServingStatus::Serving
    );

    // Both ports follow the graceful shutdown.
    server.process.signal("TERM");
    let status = server.process.wait_for_exit(WITHIN).await;
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(
        plain_channel(server.health_address()).await.is_err(),
        "the health port outlived the process"
    );
}

#[test]
fn bad_security_settings_stop_it_at_start_with_status_2_naming_the_setting() {
    let dir = TempDir::new().expect("a temporary directory");
    let secret = "s3cret-0123456789abcdef0123456789abcdef";
    let malformed = dir.path().join("tokens");
    std::fs::write(&malformed, format!("read {secret}\nreport\n")).expect("written");
    let misplaced = dir.path().join("misplaced");
    std::fs::write(&misplaced, format!("{secret} read\n")).expect("written");
    let short_key = dir.path().join("short-key");
    std::fs::write(&short_key, "  0123456789  \n").expect("written");
    let not_pem = dir.path().join("not-pem");
    std::fs::write(&not_pem, secret).expect("written");
    let missing = dir.path().join("missing.pem");

    let cases: Vec<(Vec<(&str, OsString)>, &str)> = vec![
        (
            vec![
                ("PRESENCE_TLS_CERT", path(&missing)),
                ("PRESENCE_TLS_KEY", path(&missing)),
            ],
            "PRESENCE_TLS_CERT",
        ),
        (vec![("PRESENCE_TLS_CERT", path(&not_pem))], "--tls-key"),
        (
            vec![
                ("PRESENCE_TLS_CERT", path(&not_pem)),
                ("PRESENCE_TLS_KEY", path(&not_pem)),
            ],
            "PRESENCE_TLS_CERT",
        ),
        (vec![("PRESENCE_AUTH_TOKENS_FILE", path(&malformed))], "line 2"),
        (vec![("PRESENCE_AUTH_TOKENS_FILE", path(&misplaced))], "line 1"),
        (
            vec![("PRESENCE_AUTH_TOKENS_FILE", path(&missing))],
            "PRESENCE_AUTH_TOKENS_FILE",
        ),
        (
            vec![("PRESENCE_GUEST_ADDRESSES", os("hashed"))],
            "PRESENCE_GUEST_HASH_KEY_FILE",
        ),
        (
            vec![
                ("PRESENCE_GUEST_ADDRESSES", os("hashed")),
                ("PRESENCE_GUEST_HASH_KEY_FILE", path(&short_key)),
            ],
            "at least 32",
        ),
        (vec![("PRESENCE_GUEST_ADDRESSES", os("anonymous"))], "--guest-addresses"),
        (vec![("PRESENCE_REDIS_CA", path(&missing))], "PRESENCE_REDIS_CA"),
        (vec![("PRESENCE_HEALTH_LISTEN", os("nowhere"))], "--health-listen"),
    ];
    for (env, named) in cases {
        let mut command = presence();
        for (name, value) in &env {
            command.env(name, value);
        }
        let output = command.output().expect("presence runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{env:?} was accepted: {stderr}");
        assert!(stderr.contains(named), "{env:?}: {named:?} not in {stderr}");
        assert!(!stderr.contains(secret), "{env:?}: a secret is in {stderr}");
    }
}

/// Everyone listed, with a read token if tokens are on.
async fn guests_of(channel: &Channel) -> Vec<String> {
    list(channel, None).await.expect("a list").guests
}

async fn report_guests(channel: &Channel, addresses: &[&str]) {
    let mut client = PresenceClient::new(channel.clone());
    for address in addresses {
        let request = ReportGuestRequest {
            ip_address: (*address).to_owned(),
            ..Default::default()
        };
        client.report_guest(request).await.expect("a guest report");
    }
}

async fn check_guests(channel: &Channel, addresses: &[&str]) -> Vec<(String, bool)> {
    let request = CheckOnlineRequest {
        ip_addresses: addresses.iter().map(|a| (*a).to_owned()).collect(),
        ..Default::default()
    };
    let mut client = PresenceClient::new(channel.clone());
    let response = client.check_online(request).await.expect("a check").into_inner();
    response.guests.into_iter().map(|g| (g.ip_address, g.online)).collect()
}

async fn leave_guests(channel: &Channel, addresses: &[&str]) {
    let request = LeaveRequest {
        ip_addresses: addresses.iter().map(|a| (*a).to_owned()).collect(),
        ..Default::default()
    };
    PresenceClient::new(channel.clone())
        .leave(request)
        .await
        .expect("a leave");
}

#[tokio::test]
async fn plain_guests_are_stored_as_their_canonical_address() {
    let server = Server::start(&[("PRESENCE_GUEST_ADDRESSES", os("plain"))]).await;
    let channel = plain_channel(&server.grpc).await.expect("connects");
    report_guests(&channel, &["203.0.113.77", "::FFFF:203.0.113.78", "2001:DB8::0:1"]).await;
    assert_eq!(
        guests_of(&channel).await,
        ["2001:db8::1", "203.0.113.77", "203.0.113.78"]
    );
}

#[tokio::test]
async fn truncated_guests_are_stored_as_their_network_and_found_by_any_address_in_it() {
    let server = Server::start(&[("PRESENCE_GUEST_ADDRESSES", os("truncated"))]).await;
    let channel = plain_channel(&server.grpc).await.expect("connects");
    report_guests(
        &channel,
        &[
            "203.0.113.77",
            "::ffff:203.0.113.200",
            "2001:db8:85a3:8d3:1319:8a2e:370:7348",
            "198.51.100.1",
        ],
    )
    .await;
    assert_eq!(
        guests_of(&channel).await,
        ["198.51.100.0", "2001:db8:85a3::", "203.0.113.0"]
    );
    let count = PresenceClient::new(channel.clone())
        .count_online(CountOnlineRequest::default())
        .await
        .expect("a count")
        .into_inner();
    assert_eq!(count.guest_count, 3, "one per network");
    // A check or a leave by any address of the network finds it.
    assert_eq!(
        check_guests(&channel, &["203.0.113.5", "192.0.2.1"]).await,
        [("203.0.113.0".to_owned(), true), ("192.0.2.0".to_owned(), false)]
    );
    leave_guests(&channel, &["2001:db8:85a3::1"]).await;
    assert_eq!(guests_of(&channel).await, ["198.51.100.0", "203.0.113.0"]);
}

fn hmac_hex(key: &[u8], address: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    ring::hmac::sign(&key, address.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every key and value Redis holds, as text.
fn everything_in(redis: &RedisServer) -> String {
    let mut connection = redis.connection().expect("a connection to the test Redis");
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut connection).expect("KEYS");
    let mut dump = String::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE").arg(&key).query(&mut connection).expect("TYPE");
        let mut read = |command: &str, args: &[&str]| -> Vec<String> {
            redis::cmd(command)
                .arg(&key)
                .arg(args)
                .query(&mut connection)
                .unwrap_or_else(|e| panic!("{command} {key}: {e}"))
        };
        let values = match kind.as_str() {
            "zset" => read("ZRANGE", &["0", "-1", "WITHSCORES"]),
            "set" => read("SMEMBERS", &[]),
            "hash" => read("HGETALL", &[]),
            "list" => read("LRANGE", &["0", "-1"]),
            "string" => read("GET", &[]),
            other => panic!("{key}: a {other} this test cannot read"),
        };
        dump.push_str(&format!("{key} = {values:?}\n"));
    }
    dump
}

#[tokio::test]
async fn hashed_guests_are_one_keyed_digest_on_every_replica_and_no_address_reaches_redis() {
    let redis = RedisServer::start();
    let dir = TempDir::new().expect("a temporary directory");
    let key = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
    let key_file = dir.path().join("guest-key");
    std::fs::write(&key_file, format!("{key}\n")).expect("written");
    let env = [
        ("PRESENCE_REDIS_URL", os(redis.url())),
        ("PRESENCE_GUEST_ADDRESSES", os("hashed")),
        ("PRESENCE_GUEST_HASH_KEY_FILE", path(&key_file)),
    ];
    let first = Server::start(&env).await;
    let second = Server::start(&env).await;
    let one = plain_channel(&first.grpc).await.expect("connects");
    let two = plain_channel(&second.grpc).await.expect("connects");
    eventually("both replicas ready", WITHIN, || async {
        (health(&one, "presence.v1.Presence").await.ok()? == ServingStatus::Serving
            && health(&two, "presence.v1.Presence").await.ok()? == ServingStatus::Serving)
            .then_some(())
    })
    .await;

    // One guest, spelt two ways, on two replicas: one stored value.
    report_guests(&one, &["203.0.113.77"]).await;
    report_guests(&two, &["::ffff:203.0.113.77", "2001:db8::1"]).await;
    let mut expected = vec![
        hmac_hex(key.as_bytes(), "203.0.113.77"),
        hmac_hex(key.as_bytes(), "2001:db8::1"),
    ];
    expected.sort();
    assert_eq!(guests_of(&one).await, expected);
    assert_eq!(guests_of(&two).await, expected);
    let checked = check_guests(&two, &["203.0.113.77", "203.0.113.78"]).await;
    assert_eq!(
        checked,
        [
            (hmac_hex(key.as_bytes(), "203.0.113.77"), true),
            (hmac_hex(key.as_bytes(), "203.0.113.78"), false)
        ]
    );
    let dump = everything_in(&redis);
    assert!(
        dump.contains(&expected[0]),
        "the stored values are not in the dump:\n{dump}"
    );
    for address in ["203.0.113.77", "2001:db8::1"] {
        assert!(!dump.contains(address), "{address} reached Redis:\n{dump}");
    }
    leave_guests(&one, &["203.0.113.77"]).await;
    assert_eq!(guests_of(&two).await, [hmac_hex(key.as_bytes(), "2001:db8::1")]);
}

#[test]
fn help_documents_every_security_setting_with_its_variable() {
    let output = presence().arg("--help").output().expect("presence runs");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for variable in [
        "PRESENCE_TLS_CERT",
        "PRESENCE_TLS_KEY",
        "PRESENCE_TLS_CLIENT_CA",
        "PRESENCE_HEALTH_LISTEN",
        "PRESENCE_AUTH_TOKENS_FILE",
        "PRESENCE_REDIS_CA",
        "PRESENCE_GUEST_ADDRESSES",
        "PRESENCE_GUEST_HASH_KEY_FILE",
    ] {
        assert!(help.contains(variable), "{variable} missing from --help:\n{help}");
    }
}
