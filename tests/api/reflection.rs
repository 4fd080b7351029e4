//! Server reflection, checked with the real `grpcurl` (1.8, which speaks
//! only v1alpha): what people will inspect the service with.

use std::process::Command;

use crate::helpers::{settings, spawn_app};

fn grpcurl() -> Command {
    let program = std::env::var("GRPCURL").unwrap_or_else(|_| "grpcurl".to_owned());
    Command::new(program)
}

fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run grpcurl ({e}); scripts/test installs it and sets GRPCURL"));
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "grpcurl failed: {text}");
    text
}

#[tokio::test]
async fn grpcurl_lists_describes_and_calls_the_service_with_no_proto_at_hand() {
    let app = spawn_app(settings(None)).await;
    let address = app.grpc_address.to_string();

    let listed = tokio::task::spawn_blocking({
        let address = address.clone();
        move || run(grpcurl().args(["-plaintext", &address, "list"]))
    })
    .await
    .expect("grpcurl ran");
    assert!(listed.lines().any(|l| l == "presence.v1.Presence"), "{listed}");
    assert!(listed.lines().any(|l| l == "grpc.health.v1.Health"), "{listed}");

    let described = tokio::task::spawn_blocking({
        let address = address.clone();
        move || run(grpcurl().args(["-plaintext", &address, "describe", "presence.v1.Presence"]))
    })
    .await
    .expect("grpcurl ran");
    assert!(described.contains("rpc ListOnline"), "{described}");

    tokio::task::spawn_blocking({
        let address = address.clone();
        move || {
            run(grpcurl().args([
                "-plaintext",
                "-d",
                r#"{"username": "grpcurl-user"}"#,
                &address,
                "presence.v1.Presence/ReportUser",
            ]))
        }
    })
    .await
    .expect("grpcurl ran");
    assert_eq!(app.list(0).await.expect("listing").users, ["grpcurl-user"]);

    let health = tokio::task::spawn_blocking(move || {
        run(grpcurl().args([
            "-plaintext",
            "-d",
            r#"{"service": ""}"#,
            &address,
            "grpc.health.v1.Health/Check",
        ]))
    })
    .await
    .expect("grpcurl ran");
    assert!(health.contains("SERVING"), "{health}");
}
