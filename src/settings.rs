//! Configuration: one typed tree, from flags or `PRESENCE_*` environment
//! variables, checked when the process starts so a bad value stops it with a
//! clear message instead of failing later.

use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{CommandFactory, Parser, ValueEnum};
use redis::IntoConnectionInfo;

pub use crate::guests::GuestAddressMode;
use crate::keyspace::KeyPrefix;
use crate::store::RedisMode;

/// Who is online, over gRPC. With no arguments it serves on 0.0.0.0:50051
/// with the in-memory store.
#[derive(Debug, Clone, Parser)]
#[command(name = "presence", version, about, long_about = None)]
pub struct Settings {
    /// Address the gRPC server listens on.
    #[arg(long, env = "PRESENCE_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,

    /// Redis to keep presence in (`redis://host:6379`, `unix:///path`).
    /// Unset: the in-memory store, for one process only.
    #[arg(long, env = "PRESENCE_REDIS_URL", hide_env_values = true, value_parser = keep_redis_url)]
    pub redis_url: Option<RedisUrl>,

    /// `single`: one Redis (or a proxy). `cluster`: a Redis Cluster, with
    /// the URL naming one of its nodes. `sentinel`: a master watched by
    /// Redis Sentinel, with the URL naming one of the sentinels (user,
    /// password and db are the master's).
    #[arg(long, env = "PRESENCE_REDIS_MODE", value_enum, default_value_t = RedisMode::Single)]
    pub redis_mode: RedisMode,

    /// Sentinel mode: the name of the master the sentinels watch.
    #[arg(long, env = "PRESENCE_REDIS_SENTINEL_MASTER", default_value = "mymaster")]
    pub redis_sentinel_master: String,

    /// How often *current* becomes *old*: a name stays listed for one to
    /// two intervals after it was last seen (`2s`, `300s`, `5m`).
    #[arg(long, env = "PRESENCE_TICK_INTERVAL", default_value = "5m", value_parser = parse_tick_interval)]
    pub tick_interval: Duration,

    /// First part of every Redis key, so deployments can share one Redis.
    #[arg(long, env = "PRESENCE_KEY_PREFIX", default_value = "presence")]
    pub key_prefix: KeyPrefix,

    /// Address the Prometheus `/metrics` endpoint listens on.
    #[arg(long, env = "PRESENCE_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: SocketAddr,

    /// Redis connections in the pool; each is multiplexed by many calls.
    #[arg(long, env = "PRESENCE_REDIS_POOL_SIZE", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub redis_pool_size: u32,

    /// The longest one Redis call may take, connecting included; past it
    /// the client gets UNAVAILABLE.
    #[arg(long, env = "PRESENCE_REDIS_TIMEOUT", default_value = "500ms", value_parser = parse_redis_timeout)]
    pub redis_timeout: Duration,

    /// How precisely last seen is kept: a user's repeated reports within it
    /// may skip the Redis write.
    #[arg(long, env = "PRESENCE_LAST_SEEN_PRECISION", default_value = "1m", value_parser = parse_last_seen_precision)]
    pub last_seen_precision: Duration,

    /// How long a user's last seen is kept; `0` turns last seen off (and
    /// all its cost).
    #[arg(long, env = "PRESENCE_LAST_SEEN_RETENTION", default_value = "7d", value_parser = parse_last_seen_retention)]
    pub last_seen_retention: Duration,

    /// Lists, counts and lists of rooms may be answered from a read up to
    /// this old (`0`, the default: never from the past; concurrent
    /// identical lists still share one Redis read). For sites that draw a
    /// "who's online" box on every page view.
    #[arg(long, env = "PRESENCE_LIST_CACHE", default_value = "0", value_parser = parse_list_cache)]
    pub list_cache: Duration,

    /// How often a WatchOnline stream gets the changes, at most.
    #[arg(long, env = "PRESENCE_WATCH_INTERVAL", default_value = "1s", value_parser = parse_watch_interval)]
    pub watch_interval: Duration,

    /// The most calls in flight on one HTTP/2 connection.
    #[arg(long, env = "PRESENCE_MAX_CONCURRENT_STREAMS", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub max_concurrent_streams: u32,

    /// After this, a client connection is sent GOAWAY, so clients reconnect
    /// and spread over new replicas (gRPC's MaxConnectionAge).
    #[arg(long, env = "PRESENCE_MAX_CONNECTION_AGE", default_value = "10m", value_parser = parse_connection_age)]
    pub max_connection_age: Duration,

    /// How long calls on an aged connection may take to finish before it
    /// is closed (gRPC's MaxConnectionAgeGrace).
    #[arg(long, env = "PRESENCE_MAX_CONNECTION_AGE_GRACE", default_value = "30s", value_parser = parse_shutdown_grace)]
    pub max_connection_age_grace: Duration,

    /// How often an idle client connection is pinged (HTTP/2 PING).
    #[arg(long, env = "PRESENCE_HTTP2_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = parse_keepalive)]
    pub http2_keepalive_interval: Duration,

    /// A connection whose client does not answer a ping within this is
    /// closed: a dead client is noticed within interval + timeout.
    #[arg(long, env = "PRESENCE_HTTP2_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = parse_keepalive)]
    pub http2_keepalive_timeout: Duration,

    /// After SIGTERM or SIGINT, how long in-flight calls may take to finish.
    #[arg(long, env = "PRESENCE_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_shutdown_grace)]
    pub shutdown_grace: Duration,

    /// Log lines for people (`text`) or for log collectors (`json`).
    /// Filter with RUST_LOG (default `info`).
    #[arg(long, env = "PRESENCE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(flatten)]
    pub security: SecuritySettings,
}

impl Settings {
    /// Last seen, if on: (precision, retention).
    pub fn last_seen(&self) -> Option<(Duration, Duration)> {
        (!self.last_seen_retention.is_zero()).then_some((self.last_seen_precision, self.last_seen_retention))
    }

    /// Reads flags and environment; on a bad value, prints why and exits
    /// with status 2.
    pub fn from_env_and_args() -> Self {
        Self::try_from_args(std::env::args_os()).unwrap_or_else(|error| error.exit())
    }

    pub fn try_from_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let settings = Self::try_parse_from(args)?;
        settings.check_redis_url()?;
        settings
            .security
            .check(settings.redis_url.as_ref())
            .map_err(|e| Self::command().error(clap::error::ErrorKind::ValueValidation, e))?;
        Ok(settings)
    }

    /// Checked after parsing, not in a value parser, because clap quotes a
    /// refused value in its message, and this one may hold a password.
    fn check_redis_url(&self) -> Result<(), clap::Error> {
        let Some(url) = &self.redis_url else { return Ok(()) };
        if url.expose().into_connection_info().is_ok() {
            return Ok(());
        }
        Err(Self::command().error(
            clap::error::ErrorKind::ValueValidation,
            "invalid value for '--redis-url' (PRESENCE_REDIS_URL): not a Redis URL; \
             expected redis://[user:password@]host:port[/db] or unix:///path \
             (the value is not shown: it may hold a password)",
        ))
    }

    /// Settings for a test or an embedding: loopback, any free ports, the
    /// in-memory store, and the defaults for the rest.
    pub fn for_tests() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            redis_url: None,
            redis_mode: RedisMode::Single,
            redis_sentinel_master: "mymaster".to_owned(),
            tick_interval: Duration::from_secs(300),
            key_prefix: KeyPrefix::default(),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            redis_pool_size: 4,
            redis_timeout: Duration::from_millis(500),
            last_seen_precision: Duration::from_secs(60),
            last_seen_retention: Duration::from_secs(7 * 24 * 3600),
            list_cache: Duration::ZERO,
            watch_interval: Duration::from_secs(1),
            max_concurrent_streams: 256,
            max_connection_age: Duration::from_secs(600),
            max_connection_age_grace: Duration::from_secs(30),
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(20),
            shutdown_grace: Duration::from_secs(10),
            log_format: LogFormat::Text,
            security: SecuritySettings::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Who may connect and call, and what is kept of guests: TLS on the gRPC
/// port, a plaintext health port for probes, bearer tokens, TLS to Redis,
/// and the guest address mode. The files are read (and checked) at start;
/// the TLS files and the token file are re-read when they change.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SecuritySettings {
    /// PEM certificate (chain) of the gRPC port. Set with --tls-key: the
    /// port then speaks only TLS. Re-read when the file changes.
    #[arg(long, env = "PRESENCE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "PRESENCE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA: clients must present a certificate it signed (mutual TLS).
    #[arg(long, env = "PRESENCE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// A plaintext port serving grpc.health.v1.Health alone, for probes
    /// that cannot do TLS or send tokens (Kubernetes' gRPC probe).
    #[arg(long, env = "PRESENCE_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,

    /// Bearer tokens, one a line as `ROLE TOKEN` (ROLE `report` or
    /// `read`). Set: every call but Health needs one. Re-read when the file
    /// changes.
    #[arg(long, env = "PRESENCE_AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<PathBuf>,

    /// PEM CA that signed the Redis servers' certificates (rediss:// URLs),
    /// if not a public one.
    #[arg(long, env = "PRESENCE_REDIS_CA")]
    pub redis_ca: Option<PathBuf>,

    /// What is stored of a guest: `plain` (the address), `truncated` (its
    /// /24 or /48 network) or `hashed` (a keyed HMAC-SHA-256).
    #[arg(long, env = "PRESENCE_GUEST_ADDRESSES", value_enum, default_value_t = GuestAddressMode::Plain)]
    pub guest_addresses: GuestAddressMode,

    /// The key of `hashed` guest addresses (at least 32 bytes; surrounding
    /// whitespace is trimmed). The same on every replica.
    #[arg(long, env = "PRESENCE_GUEST_HASH_KEY_FILE")]
    pub guest_hash_key_file: Option<PathBuf>,
}

impl SecuritySettings {
    /// Reads and checks every file named, as the server will at start.
    fn check(&self, redis_url: Option<&RedisUrl>) -> Result<(), SettingError> {
        self.tls_files().map(crate::tls::ServerTls::load).transpose()?;
        self.auth_tokens_file
            .as_deref()
            .map(crate::auth::TokenFile::load)
            .transpose()?;
        crate::guests::GuestPrivacy::new(self.guest_addresses, self.guest_hash_key_file.as_deref())?;
        self.redis_ca_pem(redis_url)?;
        Ok(())
    }

    /// The gRPC port's TLS files, if TLS is on.
    pub(crate) fn tls_files(&self) -> Option<crate::tls::TlsFiles> {
        Some(crate::tls::TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }

    /// The content of PRESENCE_REDIS_CA, checked: PEM certificates, and a
    /// `rediss://` URL to use them with.
    pub fn redis_ca_pem(&self, redis_url: Option<&RedisUrl>) -> Result<Option<Vec<u8>>, SettingError> {
        let Some(path) = &self.redis_ca else { return Ok(None) };
        if !redis_url.is_some_and(|url| url.expose().starts_with("rediss://")) {
            return Err(SettingError::new(
                "--redis-ca",
                "PRESENCE_REDIS_CA",
                "is used only with a rediss:// Redis URL (TLS)",
            ));
        }
        crate::tls::read_certificates(("--redis-ca", "PRESENCE_REDIS_CA"), path)?;
        crate::reload::read(path)
            .map(Some)
            .map_err(|reason| SettingError::new("--redis-ca", "PRESENCE_REDIS_CA", reason))
    }
}

/// A setting whose value parsed, but whose content cannot be used (a file
/// missing or malformed). The message names the flag and the variable, and
/// never quotes a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value for '{flag}' ({env}): {reason}")]
pub struct SettingError {
    flag: &'static str,
    env: &'static str,
    reason: String,
}

impl SettingError {
    pub fn new(flag: &'static str, env: &'static str, reason: impl Into<String>) -> Self {
        Self {
            flag,
            env,
            reason: reason.into(),
        }
    }
}

/// A Redis URL. It may hold a password, so it never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RedisUrl(<redacted>)")
    }
}

fn keep_redis_url(text: &str) -> Result<RedisUrl, std::convert::Infallible> {
    Ok(RedisUrl::new(text))
}

fn parse_duration_between(text: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let value = humantime::parse_duration(text).map_err(|e| format!("{e} (examples: 500ms, 2s, 5m)"))?;
    if value < min || value > max {
        return Err(format!(
            "must be from {} to {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(value)
}

fn parse_tick_interval(text: &str) -> Result<Duration, String> {
    parse_duration_between(text, Duration::from_millis(100), Duration::from_secs(24 * 3600))
}

fn parse_redis_timeout(text: &str) -> Result<Duration, String> {
    parse_duration_between(text, Duration::from_millis(1), Duration::from_secs(60))
}

fn parse_shutdown_grace(text: &str) -> Result<Duration, String> {
    parse_duration_between(text, Duration::ZERO, Duration::from_secs(3600))
}

fn parse_last_seen_precision(text: &str) -> Result<Duration, String> {
    parse_duration_between(text, Duration::from_millis(1), Duration::from_secs(24 * 3600))
}

fn parse_last_seen_retention(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration_between(text, Duration::ZERO, Duration::from_secs(3650 * 24 * 3600))
}

/// `0` is off; otherwise from a millisecond (enough to fold a burst of
/// identical lists into one read) to a minute (past that, "who's online"
/// is no longer now).
fn parse_list_cache(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration_between(text, Duration::from_millis(1), Duration::from_secs(60))
}

fn parse_watch_interval(text: &str) -> Result<Duration, String> {
    parse_duration_between(text, Duration::from_millis(10), Duration::from_secs(60))
}

fn parse_keepalive(text: &str) -> Result<Duration, String> {
    parse_duration_between(text, Duration::from_millis(100), Duration::from_secs(3600))
}

fn parse_connection_age(text: &str) -> Result<Duration, String> {
    parse_duration_between(text, Duration::from_secs(1), Duration::from_secs(30 * 24 * 3600))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Settings, clap::Error> {
        Settings::try_from_args(std::iter::once("presence").chain(args.iter().copied()))
    }

    #[test]
    fn the_interface_is_consistent() {
        Settings::command().debug_assert();
    }

    #[test]
    fn tick_intervals_are_read_as_human_durations() {
        for (text, secs) in [("2s", 2), ("300s", 300), ("5m", 300)] {
            let settings = parse(&["--tick-interval", text]).expect("a valid interval");
            assert_eq!(settings.tick_interval, Duration::from_secs(secs));
        }
    }

    #[test]
    fn a_tick_interval_that_is_not_a_duration_is_refused() {
        assert!(parse(&["--tick-interval", "soon"]).is_err());
        assert!(parse(&["--tick-interval", "0s"]).is_err());
    }

    #[test]
    fn a_url_that_is_not_redis_is_refused_without_echoing_it() {
        let error = parse(&["--redis-url", "http://user:hunter2@example"]).expect_err("not redis");
        assert!(!error.to_string().contains("hunter2"), "{error}");
    }

    #[test]
    fn the_redis_url_never_prints() {
        let settings = parse(&["--redis-url", "redis://:hunter2@localhost:6379"]).expect("a valid URL");
        assert!(!format!("{settings:?}").contains("hunter2"));
    }

    #[test]
    fn a_last_seen_retention_of_0_turns_last_seen_off() {
        let settings = parse(&["--last-seen-retention", "0"]).expect("valid");
        assert_eq!(settings.last_seen(), None);
        let settings = parse(&[]).expect("valid");
        assert_eq!(
            settings.last_seen(),
            Some((Duration::from_secs(60), Duration::from_secs(7 * 24 * 3600)))
        );
    }

    #[test]
    fn the_list_cache_is_off_unless_given_an_age_up_to_a_minute() {
        assert_eq!(parse(&[]).expect("valid").list_cache, Duration::ZERO);
        assert_eq!(parse(&["--list-cache", "0"]).expect("valid").list_cache, Duration::ZERO);
        let settings = parse(&["--list-cache", "250ms"]).expect("valid");
        assert_eq!(settings.list_cache, Duration::from_millis(250));
        assert!(parse(&["--list-cache", "2m"]).is_err());
        assert!(parse(&["--list-cache", "soon"]).is_err());
    }

    #[test]
    fn sentinel_is_a_redis_mode_with_a_master_name() {
        let settings = parse(&["--redis-mode", "sentinel", "--redis-sentinel-master", "main"]).expect("valid");
        assert_eq!(settings.redis_mode, RedisMode::Sentinel);
        assert_eq!(settings.redis_sentinel_master, "main");
    }

    #[test]
    fn a_key_prefix_with_a_brace_is_refused() {
        assert!(parse(&["--key-prefix", "a{b"]).is_err());
    }

    #[test]
    fn security_is_off_by_default() {
        let settings = parse(&[]).expect("valid");
        assert!(settings.security.tls_files().is_none());
        assert_eq!(settings.security.auth_tokens_file, None);
        assert_eq!(settings.security.health_listen, None);
        assert_eq!(settings.security.guest_addresses, GuestAddressMode::Plain);
    }

    #[test]
    fn tls_needs_a_certificate_and_a_key_and_a_client_ca_needs_both() {
        for args in [
            &["--tls-cert", "c.pem"][..],
            &["--tls-key", "k.pem"],
            &["--tls-client-ca", "ca.pem"],
        ] {
            let error = parse(args).expect_err("incomplete TLS");
            assert_eq!(error.exit_code(), 2, "{error}");
        }
    }

    #[test]
    fn a_redis_ca_needs_a_rediss_url_and_never_echoes_it() {
        let error = parse(&[
            "--redis-ca",
            "/nonexistent",
            "--redis-url",
            "redis://:hunter2@localhost",
        ])
        .expect_err("not TLS");
        assert!(error.to_string().contains("PRESENCE_REDIS_CA"), "{error}");
        assert!(!error.to_string().contains("hunter2"), "{error}");
        let error = parse(&["--redis-ca", "/nonexistent", "--redis-url", "rediss://localhost"]).expect_err("no file");
        assert!(error.to_string().contains("/nonexistent"), "{error}");
        assert_eq!(error.exit_code(), 2);
    }
}
