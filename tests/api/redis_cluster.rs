//! A private three-node Redis Cluster on loopback ports, made with
//! `redis-cli --cluster create`, and torn down (killed and reaped) on drop.

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tempfile::TempDir;

pub struct RedisCluster {
    nodes: Vec<Child>,
    ports: Vec<u16>,
    _dir: TempDir,
}

/// A port that is free, and whose cluster bus port (+10000) is free too.
/// Both are chosen below the kernel's ephemeral range (from 32768 here), so
/// no outgoing connection can be handed one of them between this check and
/// redis-server binding it.
fn free_port_pair(taken: &[u16]) -> u16 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut candidate = 10_000 + (seed % 12_000) as u16 + (std::process::id() % 700) as u16;
    for _ in 0..1000 {
        candidate = if candidate >= 22_700 { 10_000 } else { candidate + 1 };
        let free = |port: u16| TcpListener::bind(("127.0.0.1", port)).is_ok();
        let unused = |port: u16| {
            !taken
                .iter()
                .any(|&t| t == port || t + 10_000 == port || t == port + 10_000)
        };
        if unused(candidate) && free(candidate) && free(candidate + 10_000) {
            return candidate;
        }
    }
    panic!("no free pair of loopback ports for a cluster node");
}

impl RedisCluster {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let program = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned());
        let mut cluster = Self {
            nodes: Vec::new(),
            ports: Vec::new(),
            _dir: dir,
        };
        for _ in 0..3 {
            let port = free_port_pair(&cluster.ports);
            let config = cluster._dir.path().join(format!("nodes-{port}.conf"));
            let child = Command::new(&program)
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(&config)
                .args(["--save", "", "--appendonly", "no", "--dir"])
                .arg(cluster._dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {program} ({e})"));
            cluster.nodes.push(child);
            cluster.ports.push(port);
        }
        for port in cluster.ports.clone() {
            cluster.wait_for(port, "PONG", &["PING"]);
        }
        let cli = std::env::var("REDIS_CLI").unwrap_or_else(|_| "redis-cli".to_owned());
        let nodes: Vec<String> = cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let output = Command::new(&cli)
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cli} ({e})"));
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        for port in cluster.ports.clone() {
            cluster.wait_for(port, "cluster_state:ok", &["CLUSTER", "INFO"]);
        }
        cluster
    }

    fn wait_for(&self, port: u16, expected: &str, command: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let answer = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1)))
                .and_then(|mut c| {
                    let mut cmd = redis::cmd(command[0]);
                    for arg in &command[1..] {
                        cmd.arg(*arg);
                    }
                    cmd.query::<String>(&mut c)
                });
            if answer.as_deref().is_ok_and(|a| a.contains(expected)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {port} never answered {expected:?}: {answer:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One node's URL: the service finds the others from it.
    pub fn seed_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.ports[0])
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
            let _ = node.wait();
        }
    }
}
