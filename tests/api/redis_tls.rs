//! `rediss://` with a private CA (PRESENCE_REDIS_CA), black-box on the real
//! binary: a TLS-only `redis-server`, and a Sentinel deployment whose
//! sentinels and master speak only TLS, all with a CA the test makes.

use std::{ffi::OsString, time::Duration};

use presence::proto::v1::{ListOnlineRequest, ReportUserRequest, presence_client::PresenceClient};
use tempfile::TempDir;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::{
    binary::{Binary, command as presence},
    certs::TestCerts,
    helpers::eventually,
    launcher::{self, Process},
    redis_server::RedisServer,
};

const WITHIN: Duration = Duration::from_secs(20);

/// Starts `presence` with these variables and connects to it.
async fn start(env: &[(&str, OsString)]) -> (Binary, Channel) {
    let mut command = presence();
    for (name, value) in env {
        command.env(name, value);
    }
    let mut server = Binary::spawn(command);
    let serving = server.wait_for_log("serving").await;
    let address = serving["grpc_address"].as_str().expect("the address is logged");
    let channel = Channel::from_shared(format!("http://{address}"))
        .expect("a URI")
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connects");
    (server, channel)
}

async fn ready(channel: &Channel) {
    eventually("readiness (the store answers over TLS)", WITHIN, || async {
        let request = HealthCheckRequest {
            service: "presence.v1.Presence".into(),
        };
        let status = HealthClient::new(channel.clone()).check(request).await.ok()?;
        (status.into_inner().status() == ServingStatus::Serving).then_some(())
    })
    .await;
}

async fn report(channel: &Channel, name: &str) -> Result<(), tonic::Status> {
    let request = ReportUserRequest {
        username: name.to_owned(),
        ..Default::default()
    };
    PresenceClient::new(channel.clone())
        .report_user(request)
        .await
        .map(|_| ())
}

async fn users(channel: &Channel) -> Vec<String> {
    PresenceClient::new(channel.clone())
        .list_online(ListOnlineRequest::default())
        .await
        .expect("a list")
        .into_inner()
        .users
}

#[tokio::test]
async fn rediss_to_a_single_redis_trusts_the_private_ca_it_is_given() {
    let certs = TestCerts::generate();
    let redis = RedisServer::start_tls(&certs);
    assert!(redis.url().starts_with("rediss://"));

    let (_server, channel) = start(&[
        ("PRESENCE_REDIS_URL", redis.url().into()),
        ("PRESENCE_REDIS_CA", certs.ca().into()),
    ])
    .await;
    ready(&channel).await;
    report(&channel, "over-rediss").await.expect("stored over TLS");
    assert_eq!(users(&channel).await, ["over-rediss"]);

    // Without the CA, the server's certificate is not trusted: no call
    // reaches Redis.
    let (_untrusting, channel) = start(&[("PRESENCE_REDIS_URL", redis.url().into())]).await;
    let refused = report(&channel, "nope").await.expect_err("an untrusted Redis");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
}

#[tokio::test]
async fn rediss_through_sentinels_reaches_the_master_over_tls() {
    let certs = TestCerts::generate();
    let master = RedisServer::builder()
        .tls(&certs)
        .args(["--tls-replication", "yes"])
        .start();
    let sentinel_dir = TempDir::new().expect("a temporary directory");
    let (_sentinel, port): (Process, Option<u16>) = launcher::spawn(&[
        "sentinel".into(),
        "--master-port".into(),
        master.port().to_string(),
        "--quorum".into(),
        "1".into(),
        "--dir".into(),
        sentinel_dir.path().display().to_string(),
        "--tls-dir".into(),
        certs.dir().display().to_string(),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    let port = port.expect("the sentinel's port");

    let (_server, channel) = start(&[
        ("PRESENCE_REDIS_URL", format!("rediss://127.0.0.1:{port}").into()),
        ("PRESENCE_REDIS_MODE", "sentinel".into()),
        ("PRESENCE_REDIS_CA", certs.ca().into()),
    ])
    .await;
    ready(&channel).await;
    report(&channel, "via-sentinel")
        .await
        .expect("stored on the master over TLS");
    assert_eq!(users(&channel).await, ["via-sentinel"]);
    let stored = master
        .redis_cli()
        .args(["--scan", "--pattern", "*users*"])
        .output()
        .expect("redis-cli runs");
    assert!(
        !String::from_utf8_lossy(&stored.stdout).trim().is_empty(),
        "nothing on the master"
    );
}
