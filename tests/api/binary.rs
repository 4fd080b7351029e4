//! The real `presence` binary as a process: started with the environment a
//! test gives it (on loopback ports chosen by the kernel, JSON logs), read
//! through its log lines, called through [`Api`], signalled, and killed if
//! the test ends early.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use crate::helpers::Api;
use crate::launcher::send_signal;

/// The binary with a clean environment: loopback listeners on ports the
/// kernel picks, JSON logs at `info`.
pub fn command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_presence"));
    command
        .env_clear()
        .env("PRESENCE_LISTEN", "127.0.0.1:0")
        .env("PRESENCE_METRICS_LISTEN", "127.0.0.1:0")
        .env("PRESENCE_LOG_FORMAT", "json")
        .env("RUST_LOG", "info");
    command
}

/// A running `presence` process.
pub struct Binary {
    child: Child,
    logs: mpsc::UnboundedReceiver<serde_json::Value>,
    /// Every log line read so far.
    pub seen: Vec<serde_json::Value>,
    api: Option<Api>,
}

impl std::ops::Deref for Binary {
    type Target = Api;
    fn deref(&self) -> &Api {
        self.api.as_ref().expect("the binary is serving (use start_serving)")
    }
}

impl Binary {
    /// Spawns it; its stderr (the logs) is read line by line.
    pub fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("presence starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (send, logs) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let event = serde_json::from_str(&line).unwrap_or(serde_json::Value::String(line));
                if send.send(event).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            logs,
            seen: Vec::new(),
            api: None,
        }
    }

    /// Spawns it with extra environment and waits for its "serving" line,
    /// which says where it listens.
    pub async fn start(env: &[(&str, &str)]) -> Self {
        let mut command = command();
        for (name, value) in env {
            command.env(name, value);
        }
        let mut binary = Self::spawn(command);
        let serving = binary.wait_for_log("serving").await;
        let address = |field: &str| -> SocketAddr {
            let text = serving[field]
                .as_str()
                .unwrap_or_else(|| panic!("{field} in {serving}"));
            let text = text.trim_start_matches("http://").trim_end_matches("/metrics");
            text.parse().unwrap_or_else(|e| panic!("{field} {text:?}: {e}"))
        };
        binary.api = Some(Api::new(address("grpc_address"), address("metrics")));
        binary
    }

    /// Waits (at most 20 s) for the log event whose message is `message`.
    pub async fn wait_for_log(&mut self, message: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(found) = self.seen.iter().find(|e| e["message"] == message) {
                return found.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.logs.recv()).await {
                Ok(Some(event)) => self.seen.push(event),
                Ok(None) => panic!("presence exited before logging {message:?}: {:?}", self.seen),
                Err(_) => panic!("no {message:?} log line within 20 s: {:?}", self.seen),
            }
        }
    }

    /// Takes in the log lines written so far.
    pub fn read_logs(&mut self) -> &[serde_json::Value] {
        while let Ok(event) = self.logs.try_recv() {
            self.seen.push(event);
        }
        &self.seen
    }

    pub fn signal(&self, signal: &str) {
        assert!(send_signal(self.child.id(), signal), "kill -{signal} failed");
    }

    /// Polls for the exit, failing after `within`.
    pub async fn wait_for_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("waitable") {
                return status;
            }
            assert!(Instant::now() < deadline, "presence did not exit within {within:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
