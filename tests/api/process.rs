//! The `presence` binary as a process: configuration, startup log, and a
//! graceful exit on SIGTERM.

use std::time::Duration;

use tonic_health::pb::health_check_response::ServingStatus;

use crate::binary::Binary;
use crate::helpers::eventually;

fn presence() -> std::process::Command {
    crate::binary::command()
}

async fn health(address: &str, service: &str) -> Option<ServingStatus> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .ok()?
        .connect()
        .await
        .ok()?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let request = tonic_health::pb::HealthCheckRequest {
        service: service.to_owned(),
    };
    Some(client.check(request).await.ok()?.into_inner().status())
}

#[tokio::test]
async fn with_no_redis_it_serves_from_memory_says_so_and_exits_0_on_sigterm() {
    let mut process = Binary::spawn(presence());
    let serving = process.wait_for_log("serving").await;
    let store = serving["store"].as_str().expect("the store is logged");
    assert!(store.contains("in-memory"), "{serving}");
    let address = serving["grpc_address"]
        .as_str()
        .expect("the address is logged")
        .to_owned();

    let mut client = presence::proto::v1::presence_client::PresenceClient::connect(format!("http://{address}"))
        .await
        .expect("connects");
    let request = presence::proto::v1::ReportUserRequest {
        username: "ada".into(),
        ..Default::default()
    };
    client.report_user(request).await.expect("report accepted");
    let online = client
        .list_online(presence::proto::v1::ListOnlineRequest::default())
        .await
        .expect("listing")
        .into_inner();
    assert_eq!(online.users, ["ada"]);
    eventually("the service to be ready", Duration::from_secs(10), || async {
        (health(&address, "presence.v1.Presence").await == Some(ServingStatus::Serving)).then_some(())
    })
    .await;

    process.signal("TERM");
    process
        .wait_for_log("shutting down: NOT_SERVING, draining in-flight calls")
        .await;
    let status = process.wait_for_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[tokio::test]
async fn sigint_also_stops_it_cleanly() {
    let mut process = Binary::spawn(presence());
    process.wait_for_log("serving").await;
    process.signal("INT");
    assert_eq!(process.wait_for_exit(Duration::from_secs(15)).await.code(), Some(0));
}

#[test]
fn a_bad_setting_stops_it_with_a_clear_message() {
    let cases: [(&str, &str, &str); 5] = [
        ("PRESENCE_TICK_INTERVAL", "soon", "--tick-interval"),
        ("PRESENCE_LISTEN", "not-an-address", "--listen"),
        ("PRESENCE_REDIS_URL", "http://example", "--redis-url"),
        ("PRESENCE_KEY_PREFIX", "a{b", "--key-prefix"),
        ("PRESENCE_REDIS_POOL_SIZE", "0", "--redis-pool-size"),
    ];
    for (variable, value, flag) in cases {
        let output = presence().env(variable, value).output().expect("presence runs");
        assert!(!output.status.success(), "{variable}={value} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(flag), "{variable}={value}: {stderr}");
    }
}

#[test]
fn help_documents_every_setting_with_its_variable() {
    let output = presence().arg("--help").output().expect("presence runs");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for variable in [
        "PRESENCE_LISTEN",
        "PRESENCE_REDIS_URL",
        "PRESENCE_TICK_INTERVAL",
        "PRESENCE_KEY_PREFIX",
        "PRESENCE_METRICS_LISTEN",
        "PRESENCE_REDIS_POOL_SIZE",
        "PRESENCE_REDIS_TIMEOUT",
        "PRESENCE_SHUTDOWN_GRACE",
        "PRESENCE_LOG_FORMAT",
        "PRESENCE_LIST_CACHE",
    ] {
        assert!(help.contains(variable), "{variable} missing from --help:\n{help}");
    }
}
