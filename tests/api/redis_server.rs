//! A private `redis-server` for one test: it owns the child process and a
//! temporary directory, listens only on a unix socket there (never on 6379,
//! never on shared data), keeps nothing on disk, and is killed and reaped
//! when dropped.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tempfile::TempDir;

pub struct RedisServer {
    child: Option<Child>,
    dir: TempDir,
}

impl RedisServer {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory for redis-server");
        let mut server = Self { child: None, dir };
        server.launch();
        server
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// The URL the service connects with. It stays the same across a
    /// restart, as a real Redis address would.
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    fn launch(&mut self) {
        let program = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned());
        let child = Command::new(&program)
            .args(["--port", "0", "--unixsocket"])
            .arg(self.socket())
            .args(["--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--dir"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program} ({e}); scripts/test installs it"));
        self.child = Some(child);
        self.wait_until_it_answers();
    }

    fn wait_until_it_answers(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.ping().is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server did not answer within 10s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn ping(&self) -> redis::RedisResult<()> {
        let mut connection = self.connection()?;
        redis::cmd("PING").query(&mut connection)
    }

    /// A direct connection, for checking what the service stored.
    pub fn connection(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection_with_timeout(Duration::from_secs(2))
    }

    /// Kills the server at once, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(self.socket());
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing
    /// answers, as with a Redis stuck on a slow command or a dead host.
    pub fn pause(&self) {
        self.send_signal("STOP");
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        self.send_signal("CONT");
    }

    fn send_signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("redis-server is running");
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Starts it again on the same socket, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.send_signal("CONT");
        }
        self.kill();
    }
}
