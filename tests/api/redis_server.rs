//! A private `redis-server` for one test, started by the shared launcher
//! (`scripts/lib/private_redis.py`). It owns the process and a temporary
//! directory, keeps nothing on disk, listens only on loopback (a unix socket
//! in that directory by default, or a TCP port below the ephemeral range,
//! plain or TLS; never 6379), and is killed and reaped when dropped.

use std::{path::PathBuf, process::Command, time::Duration};

use tempfile::TempDir;

use crate::{
    certs::TestCerts,
    launcher::{self, Process, START_TIMEOUT},
};

#[derive(Clone)]
enum Listen {
    UnixSocket,
    /// The port is picked by the launcher at the first start, then kept.
    Tcp(Option<u16>),
    Tls(Option<u16>, TestCerts),
}

/// Options beyond the defaults of [`RedisServer::start`].
pub struct RedisServerBuilder {
    listen: Listen,
    password: Option<String>,
    args: Vec<String>,
}

impl RedisServerBuilder {
    /// A TCP port, picked free, instead of a unix socket.
    pub fn tcp(mut self) -> Self {
        self.listen = Listen::Tcp(None);
        self
    }

    /// This TCP port, e.g. one of a set picked together.
    pub fn port(mut self, port: u16) -> Self {
        self.listen = match self.listen {
            Listen::Tls(_, certs) => Listen::Tls(Some(port), certs),
            _ => Listen::Tcp(Some(port)),
        };
        self
    }

    /// TLS only, with the server certificate of `certs`; clients need not
    /// present one unless the args say `--tls-auth-clients yes`.
    pub fn tls(mut self, certs: &TestCerts) -> Self {
        let port = match self.listen {
            Listen::Tcp(port) | Listen::Tls(port, _) => port,
            Listen::UnixSocket => None,
        };
        self.listen = Listen::Tls(port, certs.clone());
        self
    }

    /// `--requirepass`; the URL carries it, so it must be URL-safe.
    pub fn password(mut self, password: &str) -> Self {
        self.password = Some(password.to_owned());
        self
    }

    /// Extra `redis-server` arguments, e.g. `["--maxmemory", "1mb"]`.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn start(self) -> RedisServer {
        let dir = tempfile::tempdir().expect("a temporary directory for redis-server");
        let mut server = RedisServer {
            process: None,
            listen: self.listen,
            password: self.password,
            args: self.args,
            dir,
        };
        server.launch();
        server
    }
}

pub struct RedisServer {
    // Declared before `dir`, so the process is gone before its directory.
    process: Option<Process>,
    listen: Listen,
    password: Option<String>,
    args: Vec<String>,
    dir: TempDir,
}

impl RedisServer {
    /// On a unix socket in its own directory.
    pub fn start() -> Self {
        Self::builder().start()
    }

    /// On a free loopback TCP port.
    pub fn start_tcp() -> Self {
        Self::builder().tcp().start()
    }

    /// On a unix socket, with extra `redis-server` arguments.
    pub fn start_with<I, S>(args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::builder().args(args).start()
    }

    /// TLS only, on a free port: `rediss://127.0.0.1:P`.
    pub fn start_tls(certs: &TestCerts) -> Self {
        Self::builder().tls(certs).start()
    }

    pub fn builder() -> RedisServerBuilder {
        RedisServerBuilder {
            listen: Listen::UnixSocket,
            password: None,
            args: Vec::new(),
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// The URL the service connects with. It stays the same across a
    /// restart, as a real Redis address would.
    pub fn url(&self) -> String {
        let auth = self.password.as_ref().map(|p| format!(":{p}@")).unwrap_or_default();
        match &self.listen {
            Listen::UnixSocket => {
                let query = self.password.as_ref().map(|p| format!("?pass={p}")).unwrap_or_default();
                format!("unix://{}{query}", self.socket().display())
            }
            Listen::Tcp(_) => format!("redis://{auth}127.0.0.1:{}", self.port()),
            Listen::Tls(..) => format!("rediss://{auth}127.0.0.1:{}", self.port()),
        }
    }

    /// The TCP port (plain or TLS). A unix-socket server has none.
    pub fn port(&self) -> u16 {
        match self.listen {
            Listen::Tcp(Some(port)) | Listen::Tls(Some(port), _) => port,
            _ => panic!("this redis-server listens on a unix socket, not a port"),
        }
    }

    /// Whether it was started and has not been killed since.
    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    fn launcher_args(&self) -> Vec<String> {
        let mut args: Vec<String> = vec!["server".into(), "--dir".into(), self.dir.path().display().to_string()];
        let port = match &self.listen {
            Listen::UnixSocket => {
                args.push("--unix-socket".into());
                None
            }
            Listen::Tcp(port) => *port,
            Listen::Tls(port, certs) => {
                args.extend(["--tls-dir".into(), certs.dir().display().to_string()]);
                *port
            }
        };
        if let Some(port) = port {
            args.extend(["--port".into(), port.to_string()]);
        }
        if let Some(password) = &self.password {
            args.extend(["--password".into(), password.clone()]);
        }
        args.push("--".into());
        args.extend(self.args.iter().cloned());
        args
    }

    fn launch(&mut self) {
        let picked = matches!(self.listen, Listen::Tcp(None) | Listen::Tls(None, _));
        // A port the launcher picked can still be taken by another test in
        // the moment before redis-server binds it; then it exits, and a new
        // port is tried. A port that must be kept (restart) is not changed.
        let attempts = if picked { 3 } else { 1 };
        let mut failure = String::new();
        for _ in 0..attempts {
            let (process, port) = launcher::spawn(&self.launcher_args()).unwrap_or_else(|e| panic!("{e}"));
            self.process = Some(process);
            match &mut self.listen {
                Listen::Tcp(listen) | Listen::Tls(listen, _) => *listen = port,
                Listen::UnixSocket => {}
            }
            match self.wait_until_it_answers() {
                Ok(()) => return,
                Err(why) => failure = why,
            }
            self.process = None;
            if picked {
                match &mut self.listen {
                    Listen::Tcp(port) | Listen::Tls(port, _) => *port = None,
                    Listen::UnixSocket => {}
                }
            }
        }
        panic!("redis-server did not start: {failure}\n{}", self.log_tail());
    }

    fn wait_until_it_answers(&mut self) -> Result<(), String> {
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        loop {
            if self.answers() {
                return Ok(());
            }
            if let Some(why) = self.process.as_mut().and_then(Process::exited) {
                return Err(format!("it exited ({why})"));
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("it did not answer within {START_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// It answers, and it is ours: on a port, someone else's Redis could
    /// answer too. A NOAUTH reply (a password among the args) counts.
    fn answers(&self) -> bool {
        let Some(pid) = self.process.as_ref().map(Process::id) else {
            return false;
        };
        let ours = |info: &str| info.lines().any(|l| l.trim() == format!("process_id:{pid}"));
        if matches!(self.listen, Listen::Tls(..)) {
            // redis-rs is built without TLS here; redis-cli has it.
            return self
                .redis_cli()
                .args(["INFO", "server"])
                .output()
                .is_ok_and(|o| ours(&String::from_utf8_lossy(&o.stdout)));
        }
        let info = self
            .connection()
            .and_then(|mut c| redis::cmd("INFO").arg("server").query::<String>(&mut c));
        match info {
            Ok(info) => ours(&info),
            Err(e) => e.code() == Some("NOAUTH"),
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "redis.log (tail):\n{}",
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }

    /// A direct connection, for checking what the service stored.
    pub fn connection(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection_with_timeout(Duration::from_secs(2))
    }

    /// `redis-cli` aimed at this server (socket or port, TLS with the test
    /// CA, password): add the command and run it.
    pub fn redis_cli(&self) -> Command {
        let mut command = launcher::redis_cli();
        match &self.listen {
            Listen::UnixSocket => {
                command.arg("-s").arg(self.socket());
            }
            Listen::Tcp(_) => {
                command.args(["-h", "127.0.0.1", "-p", &self.port().to_string()]);
            }
            Listen::Tls(_, certs) => {
                // The client certificate too, in case the args require one.
                command.args(["-h", "127.0.0.1", "-p", &self.port().to_string(), "--tls"]);
                command.arg("--cacert").arg(certs.ca());
                command.arg("--cert").arg(certs.client_cert());
                command.arg("--key").arg(certs.client_key());
            }
        }
        if let Some(password) = &self.password {
            command.args(["-a", password, "--no-auth-warning"]);
        }
        command
    }

    /// Kills the server at once, as a crash would.
    pub fn kill(&mut self) {
        // Dropping the process kills and reaps it.
        self.process = None;
        let _ = std::fs::remove_file(self.socket());
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing
    /// answers, as with a Redis stuck on a slow command or a dead host.
    pub fn pause(&self) {
        self.process.as_ref().expect("redis-server is running").pause();
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        self.process.as_ref().expect("redis-server is running").resume();
    }

    /// Starts it again on the same socket or port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }
}
