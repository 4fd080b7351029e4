//! The test infrastructure itself, black-box: what the launcher starts is
//! what the other tests believe they get (TLS, extra arguments, a restart
//! on the same address, a cluster and a Sentinel set that fail over).

use std::{path::Path, process::Command, time::Duration};

use crate::{
    certs::TestCerts,
    launcher::{free_ports, redis_cli, tcp_connection},
    redis_cluster::RedisCluster,
    redis_sentinel::RedisSentinel,
    redis_server::RedisServer,
};

fn run(command: &mut Command) -> (bool, String) {
    let output = command.output().expect("the command runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text.trim().to_owned())
}

fn config_get(server: &RedisServer, name: &str) -> String {
    let mut connection = server.connection().expect("a connection");
    let (_, value): (String, String) = redis::cmd("CONFIG")
        .arg("GET")
        .arg(name)
        .query(&mut connection)
        .expect("CONFIG GET answers");
    value
}

#[test]
fn free_ports_are_distinct_below_the_ephemeral_range_with_their_bus_ports() {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").expect("the ephemeral range");
    let low: u16 = range
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a number");
    let mut ports = free_ports(8, true);
    for &port in &ports {
        assert!((10_000..low - 10_000).contains(&port), "{port}, bus port under {low}");
        assert!(!ports.contains(&(port + 10_000)), "{port}'s bus port is another port");
    }
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 8);
    assert!(!ports.contains(&6379));
}

#[test]
fn a_redis_started_with_extra_arguments_runs_with_them() {
    let redis = RedisServer::start_with(["--maxmemory", "1mb", "--maxmemory-policy", "noeviction"]);
    assert!(redis.url().starts_with("unix:///"), "{}", redis.url());
    assert_eq!(config_get(&redis, "maxmemory"), "1048576");
    assert_eq!(config_get(&redis, "maxmemory-policy"), "noeviction");
}

#[test]
fn a_tcp_redis_with_a_password_restarts_empty_on_the_same_port() {
    let mut redis = RedisServer::builder().tcp().password("infra-pw").start();
    let port = redis.port();
    assert_eq!(redis.url(), format!("redis://:infra-pw@127.0.0.1:{port}"));
    let (ok, answer) = run(redis_cli().args(["-p", &port.to_string(), "PING"]));
    assert!(ok && answer.contains("NOAUTH"), "no password, no service: {answer}");
    let mut connection = redis.connection().expect("a connection with the password");
    redis::cmd("SET").arg("k").arg("v").exec(&mut connection).expect("SET");

    redis.restart();

    assert_eq!(redis.port(), port);
    let mut connection = redis.connection().expect("a connection after the restart");
    let value: Option<String> = redis::cmd("GET").arg("k").query(&mut connection).expect("GET");
    assert_eq!(value, None, "a restarted Redis keeps nothing");
}

#[test]
fn the_test_pki_signs_the_server_and_client_with_one_ca_and_the_other_client_with_another() {
    let certs = TestCerts::generate();
    let verify = |ca: &Path, cert: &Path| run(Command::new("openssl").arg("verify").arg("-CAfile").arg(ca).arg(cert)).0;
    assert!(verify(&certs.ca(), &certs.server_cert()));
    assert!(verify(&certs.ca(), &certs.client_cert()));
    assert!(!verify(&certs.ca(), &certs.other_client_cert()));
    assert!(verify(&certs.other_ca(), &certs.other_client_cert()));
    assert!(!verify(&certs.other_ca(), &certs.server_cert()));
    let public_key = |args: &[&str], file: &Path| run(Command::new("openssl").args(args).arg(file)).1;
    for (cert, key) in [
        (certs.server_cert(), certs.server_key()),
        (certs.client_cert(), certs.client_key()),
        (certs.other_client_cert(), certs.other_client_key()),
    ] {
        assert_eq!(
            public_key(&["x509", "-noout", "-pubkey", "-in"], &cert),
            public_key(&["pkey", "-pubout", "-in"], &key),
            "{} matches {}",
            key.display(),
            cert.display()
        );
    }
}

#[test]
fn a_tls_redis_answers_over_rediss_only_to_clients_trusting_the_test_ca() {
    let certs = TestCerts::generate();
    let redis = RedisServer::start_tls(&certs);
    let port = redis.port().to_string();
    assert_eq!(redis.url(), format!("rediss://127.0.0.1:{port}"));

    let (ok, answer) = run(redis.redis_cli().arg("PING"));
    assert!(ok && answer == "PONG", "{answer}");
    let tls_cli = |ca: &Path| {
        let mut command = redis_cli();
        command
            .args(["-h", "127.0.0.1", "-p", &port, "--tls", "--cacert"])
            .arg(ca)
            .arg("PING");
        run(&mut command)
    };
    assert_eq!(tls_cli(&certs.ca()).1, "PONG");
    let (_, answer) = tls_cli(&certs.other_ca());
    assert!(answer.contains("certificate verify failed"), "{answer}");
    let (_, answer) = run(redis_cli().args(["-p", &port, "PING"]));
    assert_ne!(answer, "PONG", "plain text is refused");
}

#[test]
fn a_tls_redis_requiring_client_certificates_refuses_a_client_of_another_ca() {
    let certs = TestCerts::generate();
    let redis = RedisServer::builder()
        .tls(&certs)
        .args(["--tls-auth-clients", "yes"])
        .start();
    let port = redis.port().to_string();
    let client = |cert: &Path, key: &Path| {
        let mut command = redis_cli();
        command
            .args(["-h", "127.0.0.1", "-p", &port, "--tls", "--cacert"])
            .arg(certs.ca());
        command.arg("--cert").arg(cert).arg("--key").arg(key).arg("PING");
        run(&mut command).1
    };
    assert_eq!(client(&certs.client_cert(), &certs.client_key()), "PONG");
    assert_ne!(client(&certs.other_client_cert(), &certs.other_client_key()), "PONG");
}

#[test]
fn a_cluster_with_replicas_promotes_a_replica_when_a_master_dies() {
    let mut cluster = RedisCluster::start_with_replicas();
    assert_eq!(cluster.ports().len(), 6);
    let masters = cluster.master_ports();
    assert_eq!(masters.len(), 3, "{masters:?}");

    let key = "{infra}:who";
    let holder = cluster.node_of_key(key);
    assert!(masters.contains(&holder));
    assert_eq!(cluster.master_of_slot(cluster.slot_of_key(key)), holder);
    let mut connection = tcp_connection(holder).expect("a connection to the holder");
    redis::cmd("SET")
        .arg(key)
        .arg("here")
        .exec(&mut connection)
        .expect("SET on its master");
    let acknowledged: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query(&mut connection)
        .expect("WAIT answers");
    assert_eq!(acknowledged, 1, "the replica has the key");

    assert_eq!(cluster.kill_master_of_slot(cluster.slot_of_key(key)), holder);
    cluster.wait_until_healthy();

    let new_holder = cluster.node_of_key(key);
    assert_ne!(new_holder, holder);
    assert!(!cluster.master_ports().contains(&holder));
    assert_eq!(cluster.master_ports().len(), 3);
    let mut connection = tcp_connection(new_holder).expect("a connection to the new master");
    let value: Option<String> = redis::cmd("GET").arg(key).query(&mut connection).expect("GET");
    assert_eq!(value.as_deref(), Some("here"));
    assert_ne!(
        cluster.seed_url(),
        format!("redis://127.0.0.1:{holder}"),
        "the seed is a live node"
    );
}

#[test]
fn sentinels_promote_the_replica_when_the_master_dies_even_with_one_sentinel_down() {
    let mut sentinel = RedisSentinel::start();
    let old = sentinel.master_port();
    let (ok, answer) = run(redis_cli().args(["-u", &sentinel.sentinel_url(2), "PING"]));
    assert!(ok && answer == "PONG", "{answer}");

    sentinel.kill_sentinel(2);
    assert_eq!(sentinel.kill_master(), old);
    let new = sentinel.wait_for_promotion(old, Duration::from_secs(30));

    assert_ne!(new, old);
    assert_eq!(sentinel.master_port(), new);
}
