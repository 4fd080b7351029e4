//! A private Redis Cluster on loopback ports: every node is a
//! [`RedisServer`] started by the shared launcher, on ports it picked with
//! their bus ports (+10000) free, joined with `redis-cli --cluster create`.
//! Dropping it kills and reaps every node.

use std::time::Duration;

use redis::Value;

use crate::{
    launcher::{free_ports, info, redis_cli, tcp_connection, wait_until},
    redis_server::RedisServer,
};

const SLOTS: u32 = 16384;
/// Forming a cluster, or failing over, takes a few seconds; this is ample.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);
/// How soon a silent master is taken for dead, when replicas can replace it:
/// low, so a failover test takes seconds. Without replicas the default
/// (15 s) stays, so a slow machine cannot mark a master failed and leave its
/// slots unserved.
const FAILOVER_NODE_TIMEOUT_MS: u32 = 1000;

pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

/// A slot range and the port of the master serving it.
struct SlotRange {
    first: u32,
    last: u32,
    master: u16,
}

impl RedisCluster {
    /// Three masters, no replicas.
    pub fn start() -> Self {
        Self::create(3, 0, None)
    }

    /// Three masters with one replica each (six nodes), quick to fail over.
    pub fn start_with_replicas() -> Self {
        Self::create(3, 1, Some(FAILOVER_NODE_TIMEOUT_MS))
    }

    fn create(masters: usize, replicas_per_master: usize, node_timeout_ms: Option<u32>) -> Self {
        let mut args = vec!["--cluster-enabled".to_owned(), "yes".to_owned()];
        if let Some(ms) = node_timeout_ms {
            args.extend(["--cluster-node-timeout".to_owned(), ms.to_string()]);
        }
        let count = masters * (1 + replicas_per_master);
        let nodes: Vec<RedisServer> = free_ports(count, true)
            .into_iter()
            .map(|port| RedisServer::builder().port(port).args(args.clone()).start())
            .collect();
        let cluster = Self { nodes };

        let output = redis_cli()
            .args(["--cluster", "create"])
            .args(cluster.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())))
            .args(["--cluster-replicas", &replicas_per_master.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        cluster.wait_until_healthy();
        // A replica that never synced may not be allowed to take over.
        for port in cluster.live_ports() {
            wait_until(
                &format!("node {port} to be a master or a synced replica"),
                CLUSTER_TIMEOUT,
                || {
                    let replication = info(port, "replication").ok()?;
                    (replication.contains("role:master") || replication.contains("master_link_status:up")).then_some(())
                },
            );
        }
        cluster
    }

    /// One live node's URL: the service finds the others from it.
    pub fn seed_url(&self) -> String {
        let port = self.live_ports().first().copied().expect("a live node");
        format!("redis://127.0.0.1:{port}")
    }

    /// Every node's port, live or killed, masters and replicas.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(RedisServer::port).collect()
    }

    fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .map(RedisServer::port)
            .collect()
    }

    /// The masters serving slots now, as a live node sees them, sorted.
    pub fn master_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.slot_ranges().iter().map(|r| r.master).collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// The port of the master that holds `key` now.
    pub fn node_of_key(&self, key: &str) -> u16 {
        self.master_of_slot(self.slot_of_key(key))
    }

    /// `CLUSTER KEYSLOT`.
    pub fn slot_of_key(&self, key: &str) -> u32 {
        self.ask(|c| redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query(c))
    }

    /// The port of the master serving `slot` now.
    pub fn master_of_slot(&self, slot: u32) -> u16 {
        self.slot_ranges()
            .iter()
            .find(|r| (r.first..=r.last).contains(&slot))
            .map(|r| r.master)
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
    }

    /// Kills one node at once (SIGKILL), as a crash would.
    pub fn kill_node(&mut self, port: u16) {
        self.nodes
            .iter_mut()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no node of this cluster on port {port}"))
            .kill();
    }

    /// Kills the master serving `slot`; returns its port.
    pub fn kill_master_of_slot(&mut self, slot: u32) -> u16 {
        let port = self.master_of_slot(slot);
        self.kill_node(port);
        port
    }

    /// Waits until every live node says `cluster_state:ok` and sees every
    /// slot served by a live master.
    pub fn wait_until_healthy(&self) {
        let live = self.live_ports();
        wait_until("the cluster to be healthy", CLUSTER_TIMEOUT, || {
            live.iter()
                .all(|&port| {
                    let state_ok = info_cluster(port).is_ok_and(|i| i.contains("cluster_state:ok"));
                    state_ok
                        && slot_ranges_seen_by(port).is_ok_and(|ranges| {
                            let served: u32 = ranges.iter().map(|r| r.last - r.first + 1).sum();
                            served == SLOTS && ranges.iter().all(|r| live.contains(&r.master))
                        })
                })
                .then_some(())
        });
    }

    fn slot_ranges(&self) -> Vec<SlotRange> {
        self.ask(slot_ranges_of)
    }

    /// Runs `query` on the first live node that answers it.
    fn ask<T>(&self, mut query: impl FnMut(&mut redis::Connection) -> redis::RedisResult<T>) -> T {
        let mut errors = Vec::new();
        for port in self.live_ports() {
            match tcp_connection(port).and_then(|mut c| query(&mut c)) {
                Ok(answer) => return answer,
                Err(e) => errors.push(format!("{port}: {e}")),
            }
        }
        panic!("no live node answered: {errors:?}");
    }
}

fn info_cluster(port: u16) -> redis::RedisResult<String> {
    redis::cmd("CLUSTER").arg("INFO").query(&mut tcp_connection(port)?)
}

fn slot_ranges_seen_by(port: u16) -> redis::RedisResult<Vec<SlotRange>> {
    slot_ranges_of(&mut tcp_connection(port)?)
}

/// `CLUSTER SLOTS`: `[[first, last, [ip, port, id, ...], replicas...], ...]`.
fn slot_ranges_of(connection: &mut redis::Connection) -> redis::RedisResult<Vec<SlotRange>> {
    let entries: Vec<Vec<Value>> = redis::cmd("CLUSTER").arg("SLOTS").query(connection)?;
    let malformed = || redis::RedisError::from((redis::ErrorKind::Parse, "unexpected CLUSTER SLOTS reply"));
    entries
        .iter()
        .map(|entry| match entry.as_slice() {
            [Value::Int(first), Value::Int(last), Value::Array(master), ..] => match master.as_slice() {
                [_, Value::Int(port), ..] => Ok(SlotRange {
                    first: u32::try_from(*first).map_err(|_| malformed())?,
                    last: u32::try_from(*last).map_err(|_| malformed())?,
                    master: u16::try_from(*port).map_err(|_| malformed())?,
                }),
                _ => Err(malformed()),
            },
            _ => Err(malformed()),
        })
        .collect()
}
