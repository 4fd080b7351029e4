//! A private, highly-available Redis: a master, one replica, and three
//! Sentinels monitoring them as `mymaster` with quorum 2 and short timeouts,
//! all started by the shared launcher on loopback ports. Dropping it kills
//! and reaps exactly the processes it started.

use std::time::Duration;

use tempfile::TempDir;

use crate::{
    launcher::{self, Process, info, tcp_connection, wait_until},
    redis_server::RedisServer,
};

pub const MASTER_NAME: &str = "mymaster";
const SENTINELS: usize = 3;
/// Sentinels find each other every 2 s, and replicas sync at once.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

struct Sentinel {
    // Declared before `dir`, so the process is gone before its directory.
    process: Option<Process>,
    port: u16,
    dir: TempDir,
}

pub struct RedisSentinel {
    servers: Vec<RedisServer>,
    sentinels: Vec<Sentinel>,
}

impl RedisSentinel {
    pub fn start() -> Self {
        let master = RedisServer::start_tcp();
        let replica = RedisServer::builder()
            .tcp()
            .args(["--replicaof", "127.0.0.1", &master.port().to_string()])
            .start();
        let sentinels = (0..SENTINELS).map(|_| start_sentinel(master.port())).collect();
        let sentinel = Self {
            servers: vec![master, replica],
            sentinels,
        };
        let replica_port = sentinel.servers[1].port();
        wait_until("the replica to sync with its master", READY_TIMEOUT, || {
            info(replica_port, "replication")
                .ok()?
                .contains("master_link_status:up")
                .then_some(())
        });
        // A failover needs every sentinel to know the replica and the others.
        for s in &sentinel.sentinels {
            wait_until(
                &format!("sentinel {} to see the replica and the other sentinels", s.port),
                READY_TIMEOUT,
                || {
                    let fields: Vec<String> = redis::cmd("SENTINEL")
                        .arg("MASTER")
                        .arg(MASTER_NAME)
                        .query(&mut tcp_connection(s.port).ok()?)
                        .ok()?;
                    let field = |name: &str| fields.iter().position(|f| f == name).and_then(|i| fields.get(i + 1));
                    let others = (SENTINELS - 1).to_string();
                    (field("num-slaves").is_some_and(|n| n == "1")
                        && field("num-other-sentinels").is_some_and(|n| *n == others))
                    .then_some(())
                },
            );
        }
        sentinel
    }

    /// Sentinel `i`'s URL (0, 1 or 2).
    pub fn sentinel_url(&self, i: usize) -> String {
        format!("redis://127.0.0.1:{}", self.sentinels[i].port)
    }

    /// The master's port, as the first live sentinel reports it.
    pub fn master_port(&self) -> u16 {
        self.sentinels
            .iter()
            .filter(|s| s.process.is_some())
            .find_map(|s| reported_master(s.port))
            .expect("a live sentinel reports the master")
    }

    /// Kills the current master at once (SIGKILL); returns its port.
    pub fn kill_master(&mut self) -> u16 {
        let port = self.master_port();
        self.servers
            .iter_mut()
            .find(|s| s.port() == port)
            .unwrap_or_else(|| panic!("the master on {port} is not one of ours"))
            .kill();
        port
    }

    /// Waits until the live sentinels all report a master other than
    /// `old_port`, and that node says it is a master; returns its port.
    pub fn wait_for_promotion(&self, old_port: u16, within: Duration) -> u16 {
        wait_until(&format!("a master other than {old_port}"), within, || {
            let reported: Vec<Option<u16>> = self
                .sentinels
                .iter()
                .filter(|s| s.process.is_some())
                .map(|s| reported_master(s.port))
                .collect();
            let new = reported.first().copied().flatten().filter(|&p| p != old_port)?;
            let agreed = reported.iter().all(|&p| p == Some(new));
            let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut tcp_connection(new).ok()?).ok()?;
            let is_master = matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master");
            (agreed && is_master).then_some(new)
        })
    }

    /// Kills sentinel `i` at once (SIGKILL).
    pub fn kill_sentinel(&mut self, i: usize) {
        self.sentinels[i].process = None;
    }
}

fn start_sentinel(master_port: u16) -> Sentinel {
    let dir = tempfile::tempdir().expect("a temporary directory for a sentinel");
    let args = [
        "sentinel".to_owned(),
        "--master-port".to_owned(),
        master_port.to_string(),
        "--master-name".to_owned(),
        MASTER_NAME.to_owned(),
        "--dir".to_owned(),
        dir.path().display().to_string(),
    ];
    let (process, port) = launcher::spawn(&args).unwrap_or_else(|e| panic!("{e}"));
    let port = port.expect("a sentinel listens on a port");
    let mut sentinel = Sentinel {
        process: Some(process),
        port,
        dir,
    };
    wait_until(&format!("sentinel {port} to answer"), launcher::START_TIMEOUT, || {
        if let Some(why) = sentinel.process.as_mut().and_then(Process::exited) {
            let log = std::fs::read_to_string(sentinel.dir.path().join("sentinel.log")).unwrap_or_default();
            panic!("sentinel {port} exited ({why}):\n{log}");
        }
        // It answers, and it is ours: on a port, someone else's could answer.
        let pid = sentinel.process.as_ref().map(Process::id)?;
        info(port, "server")
            .ok()?
            .lines()
            .any(|l| l.trim() == format!("process_id:{pid}"))
            .then_some(())
    });
    sentinel
}

/// `SENTINEL get-master-addr-by-name`, from one sentinel.
fn reported_master(sentinel_port: u16) -> Option<u16> {
    let address: Vec<String> = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(MASTER_NAME)
        .query(&mut tcp_connection(sentinel_port).ok()?)
        .ok()?;
    address.get(1)?.parse().ok()
}
