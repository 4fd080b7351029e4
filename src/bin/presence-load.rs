//! `presence-load`: a load generator for Presence, built on the project's own
//! generated tonic client, so what it measures is what a Rust caller gets.
//!
//! It keeps `--concurrency` callers in flight, spread over `--connections`
//! HTTP/2 connections (one connection is driven by one task on each side, so
//! a single one would measure that task, not the service). After `--warmup`,
//! it times every call for `--duration` or `--requests`, then prints ONE line
//! of JSON on stdout:
//!
//! ```text
//! {"workload":"report-unique","concurrency":50,"connections":4,"requests":123456,"seconds":10.001,
//!  "rps":12344.3,"names_per_sec":12344.3,"p50_ms":3.1,"p99_ms":7.9,"p999_ms":12.0,"errors":{}}
//! ```
//!
//! A run in which any call failed is not a result: the line is still printed
//! (with the failures counted by gRPC code in `errors`), and the exit status
//! is 1.
//!
//! Workloads:
//! - `health`: `grpc.health.v1.Health/Check` for `--service` (default `""`),
//!   which does no Redis work: the gRPC ceiling the other figures are compared
//!   to.
//! - `report-unique`, `report-zipf`, `report-guest`, `report-batch`: the
//!   report calls, with never-repeating names, Zipf-distributed names, unique
//!   IPv4/IPv6 guests, and `--batch-size` unique names per call.
//! - `report-room`: unique `ReportUser` names, call i into room
//!   `{room-prefix}-{i % rooms:06}`: reports that also keep room counts.
//! - `list`: `ListOnline` with `--limit`.
//! - `count`: `CountOnline`.
//! - `check`: `CheckOnline` of `--check-size` names drawn uniformly from the
//!   `--people` names `{prefix}-{i:08}` that `populate` creates; names/s is
//!   calls × size, and `online_fraction` says how many were online.
//! - `walk`: ONE caller pages through `ListOnline` with page size `--limit`
//!   from the first page until `next_page_token` is "", walk after walk for
//!   the duration (or `--requests` walks). The latency fields are per page;
//!   `walk_seconds` is the median walk, and a name listed twice within one
//!   walk is counted in `duplicates` and fails the run.
//! - `list-rooms`: `ListRooms` with `--limit` and `--order`.
//! - `populate`: puts `--people` users online as fast as it can, with
//!   `ReportBatch` calls of `--batch-size` (default 1000) names
//!   `{prefix}-{i:08}`; with `--rooms N`, batch i goes into room
//!   `{room-prefix}-{i % N:06}`, with `--room R` all go into R.
//! - `wait-serving`: polls `Health/Check` for `--service` (default
//!   `presence.v1.Presence`) until it is SERVING or `--duration` (default 10s)
//!   passes, and reports the wall-clock time of the first SERVING answer, so a
//!   script can measure start-up time from the moment it spawned the server.
//!
//! `--room R` gives the room of the report, list, count and check calls.
//!
//! Open loop (`--rate R`, for overload): calls start on a fixed schedule, R
//! per second, whatever the answers, with at most `--concurrency` in flight;
//! a start that finds every slot taken is not made and is counted in
//! `not_started`. Latency is measured from the scheduled start, so time spent
//! queued in this client counts (no coordinated omission). `ok_p99_ms` is the
//! p99 of the calls that succeeded, `error_p99_ms` that of the failed ones
//! (how fast a refusal comes back).
//!
//! `--retries N` (closed loop): a call refused with UNAVAILABLE is made again
//! after a short jittered backoff, up to N times, as a client that must not
//! lose its reports does; `retried` counts the refused attempts and
//! `retried_p50_ms`/`retried_p99_ms`/`retried_max_ms` say how fast the
//! refusals came (a service that pushes back at once answers in well under
//! its Redis timeout).
//!
//! It sends traffic only to `--target` and stops by itself: every run is
//! bounded by its duration or request count, and every call by
//! `--call-timeout`.
//!
//! A secured server: `--target https://...` with `--tls-ca` (the CA that
//! signed the server's certificate), and a bearer token in `PRESENCE_TOKEN`
//! (or `--token`), sent on every Presence call.

mod common;

use common::{chain, code_name, json_string};
use std::{
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use clap::{Parser, ValueEnum};
use presence::proto::v1::{
    CheckOnlineRequest, CountOnlineRequest, ListOnlineRequest, ListRoomsRequest, ReportBatchRequest,
    ReportGuestRequest, ReportUserRequest, RoomOrder, presence_client::PresenceClient,
};
use tokio::sync::Semaphore;
use tonic::{
    Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

/// --retries: the first pause before a refused call is made again, and the
/// longest, as the pause doubles.
const RETRY_BACKOFF_FIRST: Duration = Duration::from_millis(5);
const RETRY_BACKOFF_MAX: Duration = Duration::from_millis(200);

/// `ReportBatch` takes at most this many entries; `populate` sends full ones.
const MAX_BATCH: u32 = 1000;

/// How often `wait-serving` asks. Short, so the start-up time it measures is
/// the server's and not the poll interval's.
const WAIT_SERVING_POLL: Duration = Duration::from_millis(1);

#[derive(Debug, Parser)]
#[command(about = "Load generator for the Presence gRPC service (loopback targets only).")]
struct Args {
    /// The server to call, e.g. http://127.0.0.1:50051.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,

    /// What to call.
    #[arg(long, value_enum)]
    workload: Workload,

    /// Calls in flight at once, each from its own task.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    concurrency: u32,

    /// HTTP/2 connections the callers are spread over.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
    connections: u32,

    /// How long to measure, after the warm-up (default 10s, unless --requests).
    #[arg(long, conflicts_with = "requests")]
    duration: Option<humantime::Duration>,

    /// How many calls to measure, after the warm-up.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    requests: Option<u64>,

    /// How long to call before measuring (connections warm, pools full).
    #[arg(long, default_value = "1s")]
    warmup: humantime::Duration,

    /// report-zipf: how many distinct names to draw from.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    names: u64,

    /// report-zipf: the exponent s; name k (from 1) is drawn with weight 1/k^s.
    #[arg(long, default_value_t = 1.0)]
    zipf_s: f64,

    /// report-batch and populate: user names per call (default 100 for
    /// report-batch, 1000 for populate).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=MAX_BATCH as i64))]
    batch_size: Option<u32>,

    /// list, walk, list-rooms: the `limit` (page size) of each call.
    #[arg(long, default_value_t = 50)]
    limit: u32,

    /// populate: how many users to put online; check: how many names
    /// `{prefix}-{i:08}` to draw from.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    people: u64,

    /// The start of every generated name (default: the workload's short name
    /// and, for never-repeating names, an id unique to this run; "pop" for
    /// populate and check, so check asks about the names populate made).
    #[arg(long, alias = "prefix")]
    name_prefix: Option<String>,

    /// The room of the report, list, count and check calls ("" for the site).
    #[arg(long, default_value = "")]
    room: String,

    /// report-room (default 1000) and populate (default: no rooms): how many
    /// rooms `{room-prefix}-{i % rooms:06}` the reports are spread over.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    rooms: Option<u64>,

    /// The start of the room names of --rooms.
    #[arg(long, default_value = "room")]
    room_prefix: String,

    /// check: user names per CheckOnline call.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=MAX_BATCH as i64))]
    check_size: u32,

    /// list-rooms: the order of the rooms.
    #[arg(long, value_enum, default_value_t = Order::Name)]
    order: Order,

    /// Open loop: start this many calls per second on a fixed schedule,
    /// whatever the answers, at most --concurrency in flight.
    #[arg(long)]
    rate: Option<f64>,

    /// health and wait-serving: the service to ask about (default "" for
    /// health, "presence.v1.Presence" for wait-serving).
    #[arg(long)]
    service: Option<String>,

    /// The longest any one call may take before it counts as an error.
    #[arg(long, default_value = "5s")]
    call_timeout: humantime::Duration,

    /// Closed loop: a call refused with UNAVAILABLE (the service pushing
    /// back) is made again, the same request, up to this many more times,
    /// after a backoff of 5 ms doubling to 200 ms (jittered), as a client
    /// that must not lose its reports does. The refused attempts are counted
    /// in `retried`, with their latencies, not in `errors`; a call refused
    /// every time is an error. A call's latency is its last attempt's.
    #[arg(long, default_value_t = 0)]
    retries: u32,

    /// Also tell the server --call-timeout as each Presence call's deadline
    /// (`grpc-timeout`), as real clients do, so it can drop work whose
    /// caller has given up. Off by default: the header costs a little, and
    /// the long-standing figures were measured without it.
    #[arg(long)]
    deadline: bool,

    /// TLS: the PEM CA that signed the server's certificate (with an
    /// https:// target).
    #[arg(long)]
    tls_ca: Option<PathBuf>,

    /// A bearer token for every Presence call (Health needs none).
    #[arg(long, env = "PRESENCE_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Workload {
    Health,
    ReportUnique,
    ReportZipf,
    ReportGuest,
    ReportBatch,
    ReportRoom,
    List,
    Count,
    Check,
    Walk,
    ListRooms,
    Populate,
    WaitServing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Order {
    Name,
    MostOnline,
}

impl Order {
    fn name(self) -> &'static str {
        match self {
            Order::Name => "name",
            Order::MostOnline => "most-online",
        }
    }

    fn proto(self) -> RoomOrder {
        match self {
            Order::Name => RoomOrder::Name,
            Order::MostOnline => RoomOrder::MostOnline,
        }
    }
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Health => "health",
            Workload::ReportUnique => "report-unique",
            Workload::ReportZipf => "report-zipf",
            Workload::ReportGuest => "report-guest",
            Workload::ReportBatch => "report-batch",
            Workload::ReportRoom => "report-room",
            Workload::List => "list",
            Workload::Count => "count",
            Workload::Check => "check",
            Workload::Walk => "walk",
            Workload::ListRooms => "list-rooms",
            Workload::Populate => "populate",
            Workload::WaitServing => "wait-serving",
        }
    }

    /// Whether each call reports names, so names per second means something.
    fn reports_names(self) -> bool {
        !matches!(
            self,
            Workload::Health | Workload::List | Workload::Count | Workload::ListRooms | Workload::WaitServing
        )
    }

    /// Names per call, where a call carries several.
    fn batch_size(self, args: &Args) -> u32 {
        match self {
            Workload::Populate => args.batch_size.unwrap_or(MAX_BATCH),
            _ => args.batch_size.unwrap_or(100),
        }
    }
}

/// A multi-thread runtime: the callers and the h2 connection tasks run on
/// every core, as they would in a real client process.
/// The generator shares the machine with the service and Redis, so its
/// own cost is a confound in every figure: glibc's allocator spent ~17 %
/// of its CPU decoding pages of names (one allocation per name). mimalloc,
/// as in the service, keeps it out of the way.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if args.workload == Workload::WaitServing {
        return wait_serving(&args).await;
    }
    let deadline = args.deadline.then_some(*args.call_timeout);
    let bearer = match Bearer::new(args.token.as_deref(), deadline) {
        Ok(bearer) => bearer,
        Err(error) => {
            eprintln!("presence-load: {error}");
            return ExitCode::from(2);
        }
    };
    let channels = match connect(&args).await {
        Ok(channels) => channels,
        Err(error) => {
            eprintln!("presence-load: cannot connect to {}: {error}", args.target);
            println!(
                "{{\"workload\":{},\"error\":{}}}",
                json_string(args.workload.name()),
                json_string(&error)
            );
            return ExitCode::FAILURE;
        }
    };
    if let Err(problem) = check_args(&args) {
        eprintln!("presence-load: {problem}");
        return ExitCode::from(2);
    }
    let plan = Arc::new(Plan::new(&args));
    let schedule = Arc::new(Schedule::new(&args));
    let workers: Vec<Worker> = (0..u64::from(args.concurrency))
        .map(|id| {
            let channel = channels[(id % channels.len() as u64) as usize].clone();
            Worker {
                presence: PresenceClient::with_interceptor(channel.clone(), bearer.clone()),
                health: HealthClient::new(channel),
                plan: plan.clone(),
                rng: SplitMix64::new(plan.run_id ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            }
        })
        .collect();

    let mut total = if args.workload == Workload::Walk {
        // One caller: a walk is one client reading a list page after page.
        let mut workers = workers;
        match workers.pop() {
            Some(worker) => run_walker(worker, &schedule).await,
            None => Tally::default(),
        }
    } else if let Some(rate) = args.rate {
        run_open_loop(workers, schedule.clone(), rate).await
    } else {
        let mut total = Tally::default();
        let tasks: Vec<_> = workers
            .into_iter()
            .map(|worker| tokio::spawn(run_worker(worker, schedule.clone())))
            .collect();
        for task in tasks {
            match task.await {
                Ok(tally) => total.merge(tally),
                Err(error) => {
                    eprintln!("presence-load: a caller task failed: {error}");
                    *total.errors.entry("TASK_FAILED").or_default() += 1;
                }
            }
        }
        total
    };
    let seconds = total.last_done.map_or(0.0, |done| {
        done.saturating_duration_since(schedule.measure_from).as_secs_f64()
    });
    println!("{}", summary(&args, &mut total, seconds));
    // A duplicate in a walk breaks the paging promise: the run is no result.
    if total.errors.is_empty() && total.duplicates == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Refuses combinations that would measure something other than asked.
fn check_args(args: &Args) -> Result<(), String> {
    if let Some(rate) = args.rate {
        if !(rate.is_finite() && rate > 0.0) {
            return Err("--rate must be a positive number of calls per second".to_owned());
        }
        if matches!(args.workload, Workload::Walk | Workload::Populate) {
            return Err(format!("--rate does not apply to {}", args.workload.name()));
        }
        if args.retries > 0 {
            return Err("--retries is for the closed loop, not with --rate".to_owned());
        }
    }
    if args.retries > 0 && args.workload == Workload::Walk {
        return Err("--retries does not apply to walk".to_owned());
    }
    if args.rooms.is_some() && args.workload == Workload::Populate && !args.room.is_empty() {
        return Err("populate takes --rooms or --room, not both".to_owned());
    }
    Ok(())
}

/// Opens `--connections` HTTP/2 connections. Each `Endpoint::connect` is a
/// connection of its own; the callers share them round-robin.
async fn connect(args: &Args) -> Result<Vec<Channel>, String> {
    let endpoint = endpoint(args)?;
    let mut channels = Vec::new();
    for _ in 0..args.connections {
        channels.push(endpoint.connect().await.map_err(|e| chain(&e))?);
    }
    Ok(channels)
}

fn endpoint(args: &Args) -> Result<Endpoint, String> {
    let mut endpoint = Endpoint::from_shared(args.target.clone())
        .map_err(|e| chain(&e))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .timeout(*args.call_timeout);
    if let Some(ca) = &args.tls_ca {
        let pem = std::fs::read(ca).map_err(|e| format!("cannot read --tls-ca {}: {e}", ca.display()))?;
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
        endpoint = endpoint.tls_config(tls).map_err(|e| chain(&e))?;
    }
    Ok(endpoint)
}

/// Adds `authorization: Bearer <token>` to every call, if there is a token,
/// and the deadline (`grpc-timeout`), if --deadline.
#[derive(Clone)]
struct Bearer {
    token: Option<MetadataValue<Ascii>>,
    deadline: Option<Duration>,
}

impl Bearer {
    fn new(token: Option<&str>, deadline: Option<Duration>) -> Result<Self, String> {
        let token = token
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| "the token is not a valid header value".to_owned())
            })
            .transpose()?;
        Ok(Self { token, deadline })
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.token {
            request.metadata_mut().insert("authorization", value.clone());
        }
        if let Some(deadline) = self.deadline {
            request.set_timeout(deadline);
        }
        Ok(request)
    }
}

/// What every caller needs to build its requests, computed once.
struct Plan {
    workload: Workload,
    /// Seeds the random draws and makes never-repeating names unique across runs.
    run_id: u64,
    prefix: String,
    service: String,
    batch_size: u32,
    limit: u32,
    people: u64,
    /// --retries: how many times a call refused with UNAVAILABLE is made again.
    retries: u32,
    room: String,
    /// report-room and populate: how many rooms the calls are spread over.
    rooms: Option<u64>,
    room_prefix: String,
    check_size: u32,
    order: Order,
    /// report-zipf: the cumulative distribution over names, for a binary search.
    zipf_cdf: Vec<f64>,
}

impl Plan {
    fn new(args: &Args) -> Self {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let run_id = SplitMix64::new(now.as_nanos() as u64 ^ u64::from(std::process::id())).next_u64();
        let prefix = args.name_prefix.clone().unwrap_or_else(|| match args.workload {
            Workload::ReportZipf => "zipf".to_owned(),
            Workload::Populate | Workload::Check => "pop".to_owned(),
            Workload::ReportBatch => format!("b-{:012x}", run_id >> 16),
            _ => format!("u-{:012x}", run_id >> 16),
        });
        let zipf_cdf = if args.workload == Workload::ReportZipf {
            zipf_cdf(args.names, args.zipf_s)
        } else {
            Vec::new()
        };
        Self {
            workload: args.workload,
            run_id,
            prefix,
            service: args.service.clone().unwrap_or_default(),
            batch_size: args.workload.batch_size(args),
            limit: args.limit,
            people: args.people,
            retries: args.retries,
            room: args.room.clone(),
            rooms: match args.workload {
                Workload::ReportRoom => Some(args.rooms.unwrap_or(1000)),
                _ => args.rooms,
            },
            room_prefix: args.room_prefix.clone(),
            check_size: args.check_size,
            order: args.order,
            zipf_cdf,
        }
    }

    /// The room of call (or batch) `i`: spread over --rooms, else --room.
    fn room_of(&self, i: u64) -> String {
        match self.rooms {
            Some(rooms) => format!("{}-{:06}", self.room_prefix, i % rooms),
            None => self.room.clone(),
        }
    }
}

/// The Zipf distribution over `n` names as a cumulative table: entry k is the
/// probability of drawing one of the first k+1 names. Drawing is then a
/// uniform number and a binary search, O(log n) and exact.
fn zipf_cdf(n: u64, s: f64) -> Vec<f64> {
    let mut cdf = Vec::with_capacity(n as usize);
    let mut sum = 0.0;
    for k in 1..=n {
        sum += 1.0 / (k as f64).powf(s);
        cdf.push(sum);
    }
    for c in &mut cdf {
        *c /= sum;
    }
    cdf
}

/// When to measure and when to stop, shared by every caller.
struct Schedule {
    /// Calls that start before this are warm-up: made, but not timed.
    measure_from: Instant,
    /// Duration mode: no call starts after this.
    stop_at: Option<Instant>,
    /// Request mode: how many timed calls may still start.
    budget: Option<AtomicU64>,
    /// Numbers every call, warm-up included, so generated names never repeat.
    sequence: AtomicU64,
}

impl Schedule {
    fn new(args: &Args) -> Self {
        let start = Instant::now();
        // populate is a chore, not a measurement: no warm-up, one call per batch.
        let (warmup, requests) = match args.workload {
            Workload::Populate => (
                Duration::ZERO,
                Some(args.people.div_ceil(u64::from(args.workload.batch_size(args)))),
            ),
            _ => (*args.warmup, args.requests),
        };
        let measure_from = start + warmup;
        let stop_at = match requests {
            Some(_) => None,
            None => Some(measure_from + args.duration.map_or(Duration::from_secs(10), |d| *d)),
        };
        Self {
            measure_from,
            stop_at,
            budget: requests.map(AtomicU64::new),
            sequence: AtomicU64::new(0),
        }
    }

    /// Whether a call starting at `now` may go ahead.
    fn may_start(&self, now: Instant, timed: bool) -> bool {
        if self.stop_at.is_some_and(|stop| now >= stop) {
            return false;
        }
        match (&self.budget, timed) {
            (Some(budget), true) => budget
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| left.checked_sub(1))
                .is_ok(),
            _ => true,
        }
    }
}

/// What one caller saw; merged into one at the end.
#[derive(Default)]
struct Tally {
    /// Timed calls, failed ones included.
    requests: u64,
    /// --retries: latency of each timed attempt refused with UNAVAILABLE
    /// and then made again, in microseconds: how fast a push-back comes.
    retried_us: Vec<u32>,
    /// Names reported by the timed calls that succeeded.
    names: u64,
    /// Latency of each timed call that succeeded, in microseconds.
    latencies_us: Vec<u32>,
    /// Failed calls (warm-up included), by gRPC code.
    errors: BTreeMap<&'static str, u64>,
    /// When the last timed call ended.
    last_done: Option<Instant>,
    /// list, count, walk: the largest `user_count` answered, to check what
    /// was measured.
    user_count: u64,
    /// Latency of each timed call that failed, in microseconds: how fast a
    /// refusal comes back.
    error_latencies_us: Vec<u32>,
    /// check: names asked about, and of those, how many were online.
    checked: u64,
    online: u64,
    /// Open loop: scheduled starts that found every slot taken.
    not_started: u64,
    /// walk: each whole walk's seconds, names and pages.
    walk_seconds: Vec<f64>,
    walk_names: Vec<u64>,
    walk_pages: Vec<u64>,
    /// walk: names listed more than once within one walk, over all walks.
    duplicates: u64,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.requests += other.requests;
        self.names += other.names;
        self.latencies_us.extend(other.latencies_us);
        for (code, count) in other.errors {
            *self.errors.entry(code).or_default() += count;
        }
        self.last_done = self.last_done.max(other.last_done);
        self.user_count = self.user_count.max(other.user_count);
        self.error_latencies_us.extend(other.error_latencies_us);
        self.checked += other.checked;
        self.online += other.online;
        self.not_started += other.not_started;
        self.walk_seconds.extend(other.walk_seconds);
        self.walk_names.extend(other.walk_names);
        self.walk_pages.extend(other.walk_pages);
        self.duplicates += other.duplicates;
        self.retried_us.extend(other.retried_us);
    }

    /// Counts one timed call that started at `started` and ended at `done`.
    fn record(&mut self, outcome: &Result<Answer, &'static str>, started: Instant, done: Instant) {
        let micros = u32::try_from(done.saturating_duration_since(started).as_micros()).unwrap_or(u32::MAX);
        match outcome {
            Ok(answer) => {
                self.latencies_us.push(micros);
                self.names += answer.names;
                self.user_count = self.user_count.max(answer.user_count);
                self.checked += answer.checked;
                self.online += answer.online;
            }
            Err(_) => self.error_latencies_us.push(micros),
        }
        self.requests += 1;
        self.last_done = self.last_done.max(Some(done));
    }
}

/// What a successful call tells the tally.
#[derive(Default)]
struct Answer {
    names: u64,
    user_count: u64,
    /// check: names asked about, and how many of them were online.
    checked: u64,
    online: u64,
}

/// One caller: a client per service on its share of the connections.
#[derive(Clone)]
struct Worker {
    presence: PresenceClient<InterceptedService<Channel, Bearer>>,
    health: HealthClient<Channel>,
    plan: Arc<Plan>,
    rng: SplitMix64,
}

impl Worker {
    /// Makes one call of the workload. `seq` is unique to the call in this run.
    /// A failure is named by its gRPC code (or `NOT_SERVING` for a health
    /// answer other than SERVING).
    async fn call(&mut self, seq: u64) -> Result<Answer, &'static str> {
        let plan = &*self.plan;
        let one = Answer {
            names: 1,
            ..Answer::default()
        };
        match plan.workload {
            Workload::Health | Workload::WaitServing => {
                let request = HealthCheckRequest {
                    service: plan.service.clone(),
                };
                let status = self.health.check(request).await.map_err(failed)?.into_inner().status;
                if status != ServingStatus::Serving as i32 {
                    return Err("NOT_SERVING");
                }
                Ok(Answer { names: 0, ..one })
            }
            Workload::ReportUnique | Workload::ReportRoom => {
                let username = format!("{}-{seq}", plan.prefix);
                let room = plan.room_of(seq);
                self.presence
                    .report_user(ReportUserRequest { username, room })
                    .await
                    .map_err(failed)?;
                Ok(one)
            }
            Workload::ReportZipf => {
                let u = self.rng.next_f64();
                let rank = plan.zipf_cdf.partition_point(|&c| c < u).min(plan.zipf_cdf.len() - 1);
                let username = format!("{}-{rank}", plan.prefix);
                self.presence
                    .report_user(ReportUserRequest {
                        username,
                        room: plan.room.clone(),
                    })
                    .await
                    .map_err(failed)?;
                Ok(one)
            }
            Workload::ReportGuest => {
                let ip_address = guest_address(plan.run_id, seq);
                self.presence
                    .report_guest(ReportGuestRequest {
                        ip_address,
                        room: plan.room.clone(),
                    })
                    .await
                    .map_err(failed)?;
                Ok(one)
            }
            Workload::ReportBatch | Workload::Populate => {
                let size = u64::from(plan.batch_size);
                let first = seq * size;
                let end = match plan.workload {
                    Workload::Populate => (first + size).min(plan.people),
                    _ => first + size,
                };
                let usernames: Vec<String> = (first..end).map(|i| format!("{}-{i:08}", plan.prefix)).collect();
                let names = usernames.len() as u64;
                let request = ReportBatchRequest {
                    usernames,
                    ip_addresses: Vec::new(),
                    room: plan.room_of(seq),
                };
                self.presence.report_batch(request).await.map_err(failed)?;
                Ok(Answer { names, ..one })
            }
            Workload::List => {
                let response = self
                    .presence
                    .list_online(ListOnlineRequest {
                        limit: plan.limit,
                        page_token: String::new(),
                        room: plan.room.clone(),
                    })
                    .await
                    .map_err(failed)?
                    .into_inner();
                Ok(Answer {
                    user_count: response.user_count,
                    ..Answer::default()
                })
            }
            Workload::Count => {
                let response = self
                    .presence
                    .count_online(CountOnlineRequest {
                        room: plan.room.clone(),
                    })
                    .await
                    .map_err(failed)?
                    .into_inner();
                Ok(Answer {
                    user_count: response.user_count,
                    ..Answer::default()
                })
            }
            Workload::Check => {
                let usernames: Vec<String> = (0..plan.check_size)
                    .map(|_| format!("{}-{:08}", plan.prefix, self.rng.next_u64() % plan.people))
                    .collect();
                let asked = usernames.len() as u64;
                let response = self
                    .presence
                    .check_online(CheckOnlineRequest {
                        usernames,
                        ip_addresses: Vec::new(),
                        room: plan.room.clone(),
                    })
                    .await
                    .map_err(failed)?
                    .into_inner();
                // An answer that does not say one status per name is wrong.
                if response.users.len() as u64 != asked {
                    return Err("WRONG_ANSWER");
                }
                Ok(Answer {
                    names: asked,
                    checked: asked,
                    online: response.users.iter().filter(|u| u.online).count() as u64,
                    ..Answer::default()
                })
            }
            Workload::ListRooms => {
                let response = self
                    .presence
                    .list_rooms(ListRoomsRequest {
                        limit: plan.limit,
                        page_token: String::new(),
                        order: plan.order.proto() as i32,
                    })
                    .await
                    .map_err(failed)?
                    .into_inner();
                Ok(Answer {
                    names: response.rooms.len() as u64,
                    ..Answer::default()
                })
            }
            Workload::Walk => {
                // A walk is paged by run_walker; a lone call is its first page.
                let page = self.page(String::new()).await?;
                Ok(Answer {
                    user_count: page.user_count,
                    ..Answer::default()
                })
            }
        }
    }
}

impl Worker {
    /// One ListOnline page of the walk, from `page_token`.
    async fn page(&mut self, page_token: String) -> Result<presence::proto::v1::ListOnlineResponse, &'static str> {
        let request = ListOnlineRequest {
            limit: self.plan.limit,
            page_token,
            room: self.plan.room.clone(),
        };
        Ok(self.presence.list_online(request).await.map_err(failed)?.into_inner())
    }
}

/// Calls until the schedule says stop, timing the calls it should.
async fn run_worker(mut worker: Worker, schedule: Arc<Schedule>) -> Tally {
    let mut tally = Tally::default();
    loop {
        let started = Instant::now();
        let timed = started >= schedule.measure_from;
        if !schedule.may_start(started, timed) {
            return tally;
        }
        let seq = schedule.sequence.fetch_add(1, Ordering::Relaxed);
        let mut retries_left = worker.plan.retries;
        let mut backoff = RETRY_BACKOFF_FIRST;
        let (outcome, tried) = loop {
            let tried = Instant::now();
            let outcome = worker.call(seq).await;
            if retries_left == 0 || outcome.as_ref().err() != Some(&"UNAVAILABLE") {
                break (outcome, tried);
            }
            retries_left -= 1;
            if timed {
                let micros = u32::try_from(tried.elapsed().as_micros()).unwrap_or(u32::MAX);
                tally.retried_us.push(micros);
            }
            // Jittered, so refused callers do not come back in step.
            tokio::time::sleep(backoff.mul_f64(0.5 + 0.5 * worker.rng.next_f64())).await;
            backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
        };
        let done = Instant::now();
        if let Err(code) = outcome {
            *tally.errors.entry(code).or_default() += 1;
        }
        if timed {
            // The last attempt's own latency: what the service took to
            // answer, without the refusals and pauses before it.
            tally.record(&outcome, tried, done);
        }
    }
}

/// Open loop: call k is due at `measure_from - warmup + k / rate`, whatever
/// the answers; it starts if one of the --concurrency slots is free, and is
/// counted as not started otherwise. Each call is timed from when it was due.
async fn run_open_loop(workers: Vec<Worker>, schedule: Arc<Schedule>, rate: f64) -> Tally {
    let slots = workers.len();
    let semaphore = Arc::new(Semaphore::new(slots));
    let shared = Arc::new(Mutex::new(Tally::default()));
    let origin = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut next: u64 = 0;
    'schedule: loop {
        // Every call due by now, each with its own due time: the timer's
        // granularity (about a millisecond) bunches starts, never skews latency.
        let now = Instant::now();
        let due_by_now = (now.saturating_duration_since(origin).as_secs_f64() * rate) as u64;
        while next <= due_by_now {
            let due = origin + interval.mul_f64(next as f64);
            next += 1;
            let timed = due >= schedule.measure_from;
            if !schedule.may_start(due, timed) {
                break 'schedule;
            }
            let Ok(permit) = semaphore.clone().try_acquire_owned() else {
                if timed {
                    lock(&shared).not_started += 1;
                }
                continue;
            };
            let seq = schedule.sequence.fetch_add(1, Ordering::Relaxed);
            let mut worker = workers[(seq % slots as u64) as usize].clone();
            worker.rng = SplitMix64::new(worker.plan.run_id ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let shared = shared.clone();
            tokio::spawn(async move {
                let outcome = worker.call(seq).await;
                let done = Instant::now();
                let mut tally = lock(&shared);
                if let Err(code) = outcome {
                    *tally.errors.entry(code).or_default() += 1;
                }
                if timed {
                    tally.record(&outcome, due, done);
                }
                drop(permit);
            });
        }
        let due = origin + interval.mul_f64(next as f64);
        tokio::time::sleep_until(due.into()).await;
    }
    // Every slot back: every call started has ended.
    let all = u32::try_from(slots).unwrap_or(u32::MAX);
    if semaphore.acquire_many(all).await.is_err() {
        eprintln!("presence-load: the call slots were closed early");
    }
    std::mem::take(&mut *lock(&shared))
}

/// The shared tally, even if a task panicked while holding it (its counts
/// are still right: every update is a whole one).
fn lock(tally: &Mutex<Tally>) -> std::sync::MutexGuard<'_, Tally> {
    tally.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The walk: one caller pages through ListOnline from "" until the token is
/// "", walk after walk. Warm-up fetches first pages only (a whole walk of a
/// million names would outlast it). Each page is a timed call; a walk whose
/// page failed is not counted as a walk.
async fn run_walker(mut worker: Worker, schedule: &Schedule) -> Tally {
    let mut tally = Tally::default();
    while Instant::now() < schedule.measure_from {
        if let Err(code) = worker.page(String::new()).await {
            *tally.errors.entry(code).or_default() += 1;
        }
    }
    loop {
        let started = Instant::now();
        if !schedule.may_start(started, true) {
            return tally;
        }
        let mut users: Vec<String> = Vec::new();
        let mut guests: Vec<String> = Vec::new();
        let mut token = String::new();
        let mut pages = 0_u64;
        let mut most_pages = u64::MAX;
        let complete = loop {
            let page_started = Instant::now();
            let outcome = worker.page(std::mem::take(&mut token)).await;
            let done = Instant::now();
            let page = match outcome {
                Ok(page) => page,
                Err(code) => {
                    *tally.errors.entry(code).or_default() += 1;
                    tally.record(&Err(code), page_started, done);
                    break false;
                }
            };
            let answer = Answer {
                names: (page.users.len() + page.guests.len()) as u64,
                user_count: page.user_count,
                ..Answer::default()
            };
            tally.record(&Ok(answer), page_started, done);
            pages += 1;
            if pages == 1 {
                // A walk that goes on far past what the counts allow is a
                // token that loops: stop it instead of running for ever.
                let per_page = u64::from(worker.plan.limit.clamp(1, 1000));
                most_pages = 2 * (page.user_count + page.guest_count) / per_page + 10;
            }
            users.extend(page.users);
            guests.extend(page.guests);
            if page.next_page_token.is_empty() {
                break true;
            }
            if pages >= most_pages {
                *tally.errors.entry("WALK_DID_NOT_END").or_default() += 1;
                break false;
            }
            token = page.next_page_token;
        };
        let seconds = started.elapsed().as_secs_f64();
        if complete {
            // Counted after the clock stopped, so checking costs the walk nothing.
            let repeated = duplicates(&users) + duplicates(&guests);
            tally.duplicates += repeated;
            if repeated > 0 {
                *tally.errors.entry("DUPLICATE_NAME").or_default() += repeated;
            }
            tally.walk_seconds.push(seconds);
            tally.walk_names.push((users.len() + guests.len()) as u64);
            tally.walk_pages.push(pages);
        }
    }
}

/// How many entries repeat an earlier one.
fn duplicates(names: &[String]) -> u64 {
    let mut seen = HashSet::with_capacity(names.len());
    names.iter().filter(|name| !seen.insert(name.as_str())).count() as u64
}

/// A unique guest per call: even calls an IPv4 address, odd ones an IPv6
/// address in `fd00::/8` (never IPv4-mapped, which would fold into IPv4).
fn guest_address(run_id: u64, seq: u64) -> String {
    if seq.is_multiple_of(2) {
        Ipv4Addr::from((run_id as u32).wrapping_add((seq / 2) as u32)).to_string()
    } else {
        let bits = (0xfd_u128 << 120) | (u128::from(run_id >> 8) << 64) | u128::from(seq / 2);
        Ipv6Addr::from(bits).to_string()
    }
}

/// The one line of JSON a run prints.
fn summary(args: &Args, total: &mut Tally, seconds: f64) -> String {
    total.latencies_us.sort_unstable();
    let per_sec = |n: u64| if seconds > 0.0 { n as f64 / seconds } else { 0.0 };
    let plan_batch = args.workload.batch_size(args);
    let concurrency = if args.workload == Workload::Walk {
        1
    } else {
        args.concurrency
    };
    let mut line = String::new();
    let _ = write!(
        line,
        "{{\"workload\":{},\"concurrency\":{},\"connections\":{},\"requests\":{},\"seconds\":{:.3},\"rps\":{:.1}",
        json_string(args.workload.name()),
        concurrency,
        args.connections,
        total.requests,
        seconds,
        per_sec(total.requests),
    );
    if args.workload.reports_names() {
        let _ = write!(line, ",\"names_per_sec\":{:.1}", per_sec(total.names));
    } else {
        line.push_str(",\"names_per_sec\":null");
    }
    for (key, q) in [("p50_ms", 0.50), ("p99_ms", 0.99), ("p999_ms", 0.999)] {
        match percentile(&total.latencies_us, q) {
            Some(us) => {
                let _ = write!(line, ",\"{key}\":{:.3}", f64::from(us) / 1000.0);
            }
            None => {
                let _ = write!(line, ",\"{key}\":null");
            }
        }
    }
    let ok = total.latencies_us.len() as u64;
    let _ = write!(line, ",\"ok\":{ok},\"ok_rps\":{:.1}", per_sec(ok));
    total.error_latencies_us.sort_unstable();
    for (key, samples) in [
        ("ok_p99_ms", &total.latencies_us),
        ("error_p99_ms", &total.error_latencies_us),
    ] {
        let _ = write!(line, ",\"{key}\":{}", ms(percentile(samples, 0.99)));
    }
    if args.retries > 0 {
        total.retried_us.sort_unstable();
        let _ = write!(
            line,
            ",\"retries\":{},\"retried\":{},\"retried_p50_ms\":{},\"retried_p99_ms\":{},\"retried_max_ms\":{}",
            args.retries,
            total.retried_us.len(),
            ms(percentile(&total.retried_us, 0.5)),
            ms(percentile(&total.retried_us, 0.99)),
            ms(total.retried_us.last().copied()),
        );
    }
    if args.deadline {
        let _ = write!(line, ",\"deadline_ms\":{}", args.call_timeout.as_millis());
    }
    if let Some(rate) = args.rate {
        let _ = write!(
            line,
            ",\"offered_rate\":{rate},\"in_flight_cap\":{},\"not_started\":{}",
            args.concurrency, total.not_started
        );
    }
    if !args.room.is_empty() {
        let _ = write!(line, ",\"room\":{}", json_string(&args.room));
    }
    match args.workload {
        Workload::ReportBatch | Workload::Populate => {
            let _ = write!(line, ",\"batch_size\":{plan_batch}");
            if let Some(rooms) = args.rooms {
                let _ = write!(line, ",\"rooms\":{rooms}");
            }
        }
        Workload::ReportRoom => {
            let _ = write!(line, ",\"rooms\":{}", args.rooms.unwrap_or(1000));
        }
        Workload::Count => {
            let _ = write!(line, ",\"user_count\":{}", total.user_count);
        }
        Workload::Check => {
            let fraction = if total.checked > 0 {
                total.online as f64 / total.checked as f64
            } else {
                0.0
            };
            let _ = write!(
                line,
                ",\"check_size\":{},\"people\":{},\"online_fraction\":{fraction:.4}",
                args.check_size, args.people
            );
        }
        Workload::Walk => {
            let _ = write!(
                line,
                ",\"limit\":{},\"user_count\":{},\"walks\":{},\"walk_seconds\":{},\"names_per_walk\":{},\"pages_per_walk\":{},\"duplicates\":{}",
                args.limit,
                total.user_count,
                total.walk_seconds.len(),
                median_f64(&total.walk_seconds).map_or("null".to_owned(), |s| format!("{s:.3}")),
                median_u64(&total.walk_names).map_or("null".to_owned(), |n| n.to_string()),
                median_u64(&total.walk_pages).map_or("null".to_owned(), |n| n.to_string()),
                total.duplicates,
            );
        }
        Workload::ListRooms => {
            let _ = write!(line, ",\"limit\":{},\"order\":\"{}\"", args.limit, args.order.name());
        }
        Workload::ReportZipf => {
            let _ = write!(line, ",\"names\":{},\"zipf_s\":{}", args.names, args.zipf_s);
        }
        Workload::List => {
            let _ = write!(line, ",\"limit\":{},\"user_count\":{}", args.limit, total.user_count);
        }
        _ => {}
    }
    if args.workload == Workload::Populate {
        let _ = write!(line, ",\"people\":{}", args.people);
    }
    line.push_str(",\"errors\":{");
    for (i, (code, count)) in total.errors.iter().enumerate() {
        let _ = write!(line, "{}{}:{count}", if i > 0 { "," } else { "" }, json_string(code));
    }
    line.push_str("}}");
    line
}

/// Milliseconds from microseconds, or null.
fn ms(us: Option<u32>) -> String {
    us.map_or("null".to_owned(), |us| format!("{:.3}", f64::from(us) / 1000.0))
}

fn median_f64(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len().checked_sub(1)? / 2).copied()
}

fn median_u64(values: &[u64]) -> Option<u64> {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    sorted.get(sorted.len().checked_sub(1)? / 2).copied()
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[u32], q: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Polls Health/Check until SERVING or the deadline, and prints when.
async fn wait_serving(args: &Args) -> ExitCode {
    let service = args
        .service
        .clone()
        .unwrap_or_else(|| "presence.v1.Presence".to_owned());
    let started = Instant::now();
    let deadline = started + args.duration.map_or(Duration::from_secs(10), |d| *d);
    let mut polls = 0_u64;
    let mut last_problem = String::from("not asked yet");
    let mut client: Option<HealthClient<Channel>> = None;
    let serving_at = loop {
        if Instant::now() >= deadline {
            break None;
        }
        polls += 1;
        if client.is_none() {
            match endpoint(args) {
                Ok(endpoint) => match endpoint.connect().await {
                    Ok(channel) => client = Some(HealthClient::new(channel)),
                    Err(error) => last_problem = format!("connect: {}", chain(&error)),
                },
                Err(error) => {
                    eprintln!("presence-load: bad --target {}: {error}", args.target);
                    return ExitCode::from(2);
                }
            }
        }
        if let Some(health) = client.as_mut() {
            let request = HealthCheckRequest {
                service: service.clone(),
            };
            match health.check(request).await {
                Ok(response) if response.get_ref().status == ServingStatus::Serving as i32 => {
                    break Some(SystemTime::now());
                }
                Ok(response) => last_problem = format!("status {}", response.get_ref().status),
                Err(status) => {
                    last_problem = format!("{}: {}", code_name(status.code()), status.message());
                    client = None;
                }
            }
        }
        tokio::time::sleep(WAIT_SERVING_POLL).await;
    };
    let unix_us = serving_at
        .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
        .map_or("null".to_owned(), |since| since.as_micros().to_string());
    println!(
        "{{\"workload\":\"wait-serving\",\"service\":{},\"serving\":{},\"serving_at_unix_us\":{unix_us},\"polls\":{polls},\"seconds\":{:.3}}}",
        json_string(&service),
        serving_at.is_some(),
        started.elapsed().as_secs_f64(),
    );
    if serving_at.is_some() {
        ExitCode::SUCCESS
    } else {
        eprintln!("presence-load: {service} not SERVING in time; last: {last_problem}");
        ExitCode::FAILURE
    }
}

fn failed(status: Status) -> &'static str {
    code_name(status.code())
}

/// SplitMix64: a tiny, fast, well-mixed generator, plenty for picking names
/// (and no extra dependency).
#[derive(Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), from the top 53 bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1_u64 << 53) as f64
    }
}
