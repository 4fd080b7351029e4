//! The Rust side of `scripts/lib/private_redis.py`, the one launcher of
//! private Redis processes that tests, scripts and the benchmark share:
//! running it, reading the line it announces itself with, owning the process
//! it becomes, and waiting with a deadline.

use std::{
    cell::Cell,
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

/// How long the launcher may take to announce itself, and Redis to answer.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

/// `python3 scripts/lib/private_redis.py`, ready for a subcommand.
pub fn launcher() -> Command {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/lib/private_redis.py");
    let mut command = Command::new("python3");
    command.arg(script);
    command
}

/// `redis-cli` ($REDIS_CLI, as scripts/lib/tools.sh sets it, or from PATH).
pub fn redis_cli() -> Command {
    Command::new(std::env::var("REDIS_CLI").unwrap_or_else(|_| "redis-cli".to_owned()))
}

/// `count` distinct free loopback ports, below the kernel's ephemeral range;
/// with `with_bus`, each one's cluster bus port (+10000) is free too.
pub fn free_ports(count: usize, with_bus: bool) -> Vec<u16> {
    let mut command = launcher();
    command.args(["free-port", "--count", &count.to_string()]);
    if with_bus {
        command.arg("--with-bus");
    }
    let output = command.output().expect("the launcher runs (python3 is needed)");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "free-port failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let ports: Vec<u16> = text
        .split_whitespace()
        .map(|p| p.parse().expect("free-port prints port numbers"))
        .collect();
    assert_eq!(ports.len(), count, "free-port printed {text:?}");
    ports
}

/// Runs a launcher subcommand that execs Redis (`server`, `sentinel`) and
/// reads the line it announces itself with; returns the process, which is
/// then Redis itself, and its TCP port if it has one. Whether it answers is
/// for the caller to check.
pub fn spawn(args: &[String]) -> Result<(Process, Option<u16>), String> {
    let mut child = launcher()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run the launcher ({e}); python3 is needed"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    // A thread, so that reading the line can have a deadline.
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = sender.send(BufReader::new(stdout).read_line(&mut line).map(|_| line));
    });
    let mut process = Process::new(child);
    let line = match receiver.recv_timeout(START_TIMEOUT) {
        Ok(Ok(line)) if !line.is_empty() => line,
        Ok(_) => {
            // Its stdout is closed: it has ended, or is about to.
            let _ = process.child.wait();
            return Err(format!("the launcher printed nothing: {}", process.stderr()));
        }
        Err(_) => return Err(format!("the launcher said nothing within {START_TIMEOUT:?}")),
    };
    let json: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| format!("the launcher printed {line:?}: {e}"))?;
    if json["pid"].as_u64() != Some(u64::from(process.id())) {
        return Err(format!("the launcher announced another process: {line:?}"));
    }
    Ok((process, json["port"].as_u64().and_then(|p| u16::try_from(p).ok())))
}

/// A process this test started. Dropping it kills and reaps it; nothing else
/// is ever signalled.
pub struct Process {
    child: Child,
    paused: Cell<bool>,
}

impl Process {
    fn new(child: Child) -> Self {
        Self {
            child,
            paused: Cell::new(false),
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// `Some(why)` once the process has ended.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!("{status}; stderr: {}", self.stderr())),
            Ok(None) => None,
            Err(e) => Some(format!("cannot tell whether it runs: {e}")),
        }
    }

    fn stderr(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            // Only after it has exited: a live process would block this read.
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                let _ = stderr.read_to_string(&mut text);
            }
        }
        text.trim().to_owned()
    }

    /// SIGSTOP: it holds its connections and answers nothing.
    pub fn pause(&self) {
        self.signal("STOP");
        self.paused.set(true);
    }

    /// SIGCONT.
    pub fn resume(&self) {
        self.signal("CONT");
        self.paused.set(false);
    }

    fn signal(&self, signal: &str) {
        assert!(send_signal(self.id(), signal), "kill -{signal} {} failed", self.id());
    }
}

/// `kill -SIGNAL PID`; whether it was delivered.
pub fn send_signal(pid: u32, signal: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success())
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.paused.get() {
            // A stopped process would be killed too, but let it go on first,
            // so nothing is left stopped if the kill were refused.
            send_signal(self.id(), "CONT");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it gives `Some`, failing the test after `within`.
pub fn wait_until<T>(what: &str, within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A connection to a node on a loopback TCP port, with timeouts so that a
/// dead or stopped node cannot hang the test.
pub fn tcp_connection(port: u16) -> redis::RedisResult<redis::Connection> {
    let connection = redis::Client::open(format!("redis://127.0.0.1:{port}"))?
        .get_connection_with_timeout(Duration::from_secs(1))?;
    connection.set_read_timeout(Some(Duration::from_secs(2)))?;
    connection.set_write_timeout(Some(Duration::from_secs(2)))?;
    Ok(connection)
}

/// `INFO <section>` of a node as `field:value` lines.
pub fn info(port: u16, section: &str) -> redis::RedisResult<String> {
    redis::cmd("INFO").arg(section).query(&mut tcp_connection(port)?)
}
