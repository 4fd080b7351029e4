//! `presence-watch-load`: how fast joins reach many `WatchOnline` watchers.
//!
//! It opens `--watchers` streams watching `--room`, spread over
//! `--connections` HTTP/2 connections (default: one per 200 watchers, below
//! the service's 256 streams per connection), and waits until every one has
//! its first snapshot. Then a joiner reports `--join-rate` new users a second
//! into the room for `--duration`, open loop, each with its own `ReportUser`
//! call. The joiner has its own thread, runtime and connections, so that
//! neither side starves the other of CPU on the client: what is measured is
//! the service's delivery, not the joiner's backlog.
//!
//! For every (watcher, join) pair it times how long after the join's call was
//! sent the watcher got a change naming it, and prints ONE line of JSON:
//!
//! ```text
//! {"workload":"watch","watchers":10000,"connections":50,"join_rate":1000,"joins_ok":10000,
//!  "pairs_expected":100000000,"pairs_seen":100000000,"seen_fraction":1.0,
//!  "within_2x_interval_fraction":1.0,"p50_ms":520,"p99_ms":1010,"max_ms":1090,...}
//! ```
//!
//! A pair never seen (the watcher's stream failed, or it got a resync
//! snapshot in place of the change) counts as not within any bound. With
//! `--service-pid`, it also reads the service's CPU time over the joins (and
//! the settle time after them) and its memory from /proc.
//!
//! Exits 1 if a watcher could not start or its stream failed, or a join
//! failed. Traffic goes to `--target` only; the run is bounded by
//! `--snapshot-timeout`, `--duration` and `--settle`.
//!
//! Watchers decode only what they need, walking each message's bytes in
//! place (the joined user names as slices, and the resync flag): with
//! 10,000 watchers and 1,000 joins a second the client reads ten million
//! names a second, and on a small machine sharing its cores with the
//! service, a decode into `String`s would measure the client.

mod common;

use common::{chain, code_name, json_string};
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use clap::Parser;
use presence::proto::v1::{ReportUserRequest, WatchOnlineRequest, presence_client::PresenceClient};
use prost::bytes::{Buf, Bytes};
use tokio_util::sync::CancellationToken;
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    transport::{Channel, Endpoint},
};

/// Latency histogram resolution and range: 1 ms buckets up to two minutes
/// (a later sighting lands in the last bucket, and is reported as `max_ms`
/// exactly, which is kept apart).
const BUCKETS: usize = 120_000;

/// Histogram shards, so that watchers on different threads rarely add to
/// the same cache lines.
const SHARDS: usize = 8;

#[derive(Debug, Parser)]
#[command(about = "WatchOnline fan-out load: many watchers of one room while users join (loopback targets only).")]
struct Args {
    /// The server to call, e.g. http://127.0.0.1:50051.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,

    /// The room watched and joined ("" is the site).
    #[arg(long, default_value = "bench-watch")]
    room: String,

    /// Watchers of the room, each its own stream.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=200_000))]
    watchers: u32,

    /// HTTP/2 connections the watchers are spread over (default: one per 200).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=5000))]
    connections: Option<u32>,

    /// New users a second the joiner reports into the room.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    join_rate: u32,

    /// HTTP/2 connections of the joiner.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    joiner_connections: u32,

    /// How long users join.
    #[arg(long, default_value = "10s")]
    duration: humantime::Duration,

    /// The service's PRESENCE_WATCH_INTERVAL: the bound is twice this.
    #[arg(long, default_value = "1s")]
    watch_interval: humantime::Duration,

    /// How long to wait after the last join for it to arrive (default: four
    /// watch intervals and 2 s).
    #[arg(long)]
    settle: Option<humantime::Duration>,

    /// How long every watcher may take to get its first snapshot.
    #[arg(long, default_value = "60s")]
    snapshot_timeout: humantime::Duration,

    /// The start of every joining name, `{prefix}-{i}` (default: `w` and six
    /// digits unique to this run, so names are 9 to 14 bytes long).
    #[arg(long)]
    name_prefix: Option<String>,

    /// The service's process id: its CPU time over the joins and its memory
    /// are read from /proc.
    #[arg(long)]
    service_pid: Option<u32>,
}

/// A codec that sends the request as prost does and hands back each
/// response's raw bytes, which [`read_event`] walks without allocating.
#[derive(Default)]
struct RawCodec;

struct RequestEncoder;

struct RawDecoder;

impl Codec for RawCodec {
    type Encode = WatchOnlineRequest;
    type Decode = Bytes;
    type Encoder = RequestEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        RequestEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

impl Encoder for RequestEncoder {
    type Item = WatchOnlineRequest;
    type Error = Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        prost::Message::encode(&item, dst).map_err(|e| Status::internal(e.to_string()))
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// What a `WatchOnlineResponse` was.
#[derive(Debug, PartialEq)]
enum Event {
    Snapshot { resync: bool },
    Changes,
    Other,
}

/// Reads one varint at `pos`.
fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0_u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*pos)?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// The fields of one protobuf message: (field number, wire type, the
/// length-delimited payload or the varint value). None on malformed input.
fn fields(buf: &[u8], mut each: impl FnMut(u64, &[u8], u64)) -> Option<()> {
    let mut pos = 0;
    while pos < buf.len() {
        let key = varint(buf, &mut pos)?;
        match key & 7 {
            0 => {
                let value = varint(buf, &mut pos)?;
                each(key >> 3, &[], value);
            }
            1 => pos += 8,
            2 => {
                let len = usize::try_from(varint(buf, &mut pos)?).ok()?;
                let payload = buf.get(pos..pos.checked_add(len)?)?;
                pos += len;
                each(key >> 3, payload, 0);
            }
            5 => pos += 4,
            _ => return None,
        }
    }
    (pos == buf.len()).then_some(())
}

/// Walks a `WatchOnlineResponse` (snapshot = 1 with resync = 5; changes = 2
/// with joined_users = 1), calling `joined` with each joined user name.
fn read_event(message: &[u8], mut joined: impl FnMut(&[u8])) -> Option<Event> {
    let mut event = Event::Other;
    let mut ok = true;
    fields(message, |field, payload, _| match field {
        1 => {
            let mut resync = false;
            ok &= fields(payload, |f, _, v| {
                if f == 5 {
                    resync = v != 0;
                }
            })
            .is_some();
            event = Event::Snapshot { resync };
        }
        2 => {
            ok &= fields(payload, |f, name, _| {
                if f == 1 {
                    joined(name);
                }
            })
            .is_some();
            event = Event::Changes;
        }
        _ => {}
    })?;
    ok.then_some(event)
}

/// What the joiner and the watchers share.
struct Shared {
    base: Instant,
    /// `{prefix}-` as bytes, to recognise our joins.
    prefix: Vec<u8>,
    /// Per join: when its call was sent, in ns since `base`, plus one (0:
    /// not sent yet).
    sent_at: Vec<AtomicU64>,
    /// Latency histogram of seen pairs, in 1 ms buckets, sharded.
    histogram: Vec<Vec<AtomicU64>>,
    max_us: AtomicU64,
    pairs_seen: AtomicU64,
    /// Names of ours seen before the joiner recorded sending them (should
    /// not happen) or out of range.
    pairs_odd: AtomicU64,
    /// Watchers that have their first snapshot.
    ready: AtomicU64,
    resyncs: AtomicU64,
    messages: AtomicU64,
    /// Watch streams that failed or ended, by gRPC code (or `ENDED`).
    stream_errors: Mutex<BTreeMap<&'static str, u64>>,
}

impl Shared {
    /// Counters at zero for `joins` joins of names starting with `prefix`.
    fn new(prefix: &str, joins: usize) -> Self {
        Self {
            base: Instant::now(),
            prefix: prefix.as_bytes().to_vec(),
            sent_at: (0..joins).map(|_| AtomicU64::new(0)).collect(),
            histogram: (0..SHARDS)
                .map(|_| (0..BUCKETS).map(|_| AtomicU64::new(0)).collect())
                .collect(),
            max_us: AtomicU64::new(0),
            pairs_seen: AtomicU64::new(0),
            pairs_odd: AtomicU64::new(0),
            ready: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            stream_errors: Mutex::default(),
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn stream_error(&self, code: &'static str) {
        let mut errors = self.stream_errors.lock().unwrap_or_else(|p| p.into_inner());
        *errors.entry(code).or_default() += 1;
    }

    /// The join index of a name of ours, if it is one.
    fn join_index(&self, name: &[u8]) -> Option<usize> {
        let digits = name.strip_prefix(self.prefix.as_slice())?;
        if digits.is_empty() || digits.len() > 12 {
            return None;
        }
        let mut index = 0_usize;
        for &d in digits {
            if !d.is_ascii_digit() {
                return None;
            }
            index = index * 10 + usize::from(d - b'0');
        }
        Some(index)
    }

    /// Records a message a watcher got now: what it was, and for changes,
    /// how long after its call each join of ours came.
    fn seen(&self, shard: usize, message: &[u8]) -> Option<Event> {
        let now = self.now_ns();
        let histogram = &self.histogram[shard % SHARDS];
        let (mut seen, mut odd, mut max_us) = (0, 0, 0);
        let event = read_event(message, |name| {
            let Some(index) = self.join_index(name) else { return };
            let sent = self.sent_at.get(index).map_or(0, |s| s.load(Ordering::Acquire));
            if sent == 0 {
                odd += 1;
                return;
            }
            let us = now.saturating_sub(sent - 1) / 1000;
            max_us = max_us.max(us);
            let bucket = usize::try_from(us / 1000).unwrap_or(usize::MAX).min(BUCKETS - 1);
            histogram[bucket].fetch_add(1, Ordering::Relaxed);
            seen += 1;
        });
        self.pairs_seen.fetch_add(seen, Ordering::Relaxed);
        if odd > 0 {
            self.pairs_odd.fetch_add(odd, Ordering::Relaxed);
        }
        self.max_us.fetch_max(max_us, Ordering::Relaxed);
        event
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let connections = args.connections.unwrap_or(args.watchers.div_ceil(200));
    let run_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() % 1_000_000);
    // Short by default, as user names are: every watcher's stream keeps a
    // buffer as large as the largest message it got (tonic's encode
    // buffer), so name length shows in the service's memory.
    let prefix = format!("{}-", args.name_prefix.clone().unwrap_or(format!("w{run_id:06}")));
    let joins = (u64::from(args.join_rate) as f64 * args.duration.as_secs_f64()).ceil() as usize;
    let shared = Arc::new(Shared::new(&prefix, joins));

    // The watchers' runtime: every core, as a real client process would.
    let watchers_rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("presence-watch-load: cannot start a runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let stop = CancellationToken::new();
    let started = Instant::now();
    let tasks = match watchers_rt.block_on(start_watchers(&args, connections, &shared, &stop)) {
        Ok(tasks) => tasks,
        Err(error) => {
            eprintln!("presence-watch-load: cannot connect to {}: {error}", args.target);
            println!("{{\"workload\":\"watch\",\"error\":{}}}", json_string(&error));
            return ExitCode::FAILURE;
        }
    };
    // Every watcher has its snapshot (or failed) before anyone joins.
    let deadline = started + *args.snapshot_timeout;
    while Instant::now() < deadline {
        let ready = shared.ready.load(Ordering::Relaxed);
        let failed: u64 = shared.stream_errors.lock().map_or(0, |e| e.values().sum());
        if ready + failed >= u64::from(args.watchers) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let snapshot_seconds = started.elapsed().as_secs_f64();
    let watchers_ready = shared.ready.load(Ordering::Relaxed);
    let rss_watching = args.service_pid.and_then(|pid| proc_status_mb(pid, "VmRSS"));
    let cpu_before = args.service_pid.and_then(proc_cpu_seconds);
    let own_cpu_before = proc_cpu_seconds(std::process::id());

    // The joiner: its own thread, runtime and connections.
    let joiner = {
        let shared = shared.clone();
        let target = args.target.clone();
        let room = args.room.clone();
        let (rate, conns) = (args.join_rate, args.joiner_connections);
        std::thread::spawn(move || -> Result<Joined, String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(join(target, room, rate, conns, joins, shared))
        })
    };
    let joined = match joiner.join() {
        Ok(Ok(joined)) => joined,
        Ok(Err(error)) => {
            eprintln!("presence-watch-load: the joiner failed: {error}");
            Joined {
                ok: 0,
                errors: BTreeMap::from([("JOINER_FAILED", 1)]),
                lag_max_ms: 0.0,
            }
        }
        Err(_) => Joined {
            ok: 0,
            errors: BTreeMap::from([("JOINER_PANICKED", 1)]),
            lag_max_ms: 0.0,
        },
    };
    let settle = args
        .settle
        .map_or(*args.watch_interval * 4 + Duration::from_secs(2), |s| *s);
    std::thread::sleep(settle);
    let cpu_after = args.service_pid.and_then(proc_cpu_seconds);
    let own_cpu_after = proc_cpu_seconds(std::process::id());
    let rss_end = args.service_pid.and_then(|pid| proc_status_mb(pid, "VmRSS"));
    let hwm_end = args.service_pid.and_then(|pid| proc_status_mb(pid, "VmHWM"));
    stop.cancel();
    watchers_rt.block_on(async {
        for task in tasks {
            let _ = task.await;
        }
    });
    drop(watchers_rt);

    let line = summary(Summary {
        args: &args,
        connections,
        shared: &shared,
        joined: &joined,
        watchers_ready,
        snapshot_seconds,
        service_cpu: cpu_before.zip(cpu_after).map(|(a, b)| b - a),
        own_cpu: own_cpu_before.zip(own_cpu_after).map(|(a, b)| b - a),
        rss_watching,
        rss_end,
        hwm_end,
    });
    println!("{line}");
    let stream_failed = !shared.stream_errors.lock().is_ok_and(|e| e.is_empty());
    if stream_failed || !joined.errors.is_empty() || watchers_ready < u64::from(args.watchers) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn endpoint(target: &str) -> Result<Endpoint, String> {
    // No call timeout: a watch stream lasts the whole run.
    Ok(Endpoint::from_shared(target.to_owned())
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2)))
}

async fn start_watchers(
    args: &Args,
    connections: u32,
    shared: &Arc<Shared>,
    stop: &CancellationToken,
) -> Result<Vec<tokio::task::JoinHandle<()>>, String> {
    let endpoint = endpoint(&args.target)?;
    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(endpoint.connect().await.map_err(|e| chain(&e))?);
    }
    Ok((0..args.watchers as usize)
        .map(|id| {
            let channel = channels[id % channels.len()].clone();
            tokio::spawn(watcher(id, channel, args.room.clone(), shared.clone(), stop.clone()))
        })
        .collect())
}

/// One watcher: a stream, read until the run stops.
async fn watcher(id: usize, channel: Channel, room: String, shared: Arc<Shared>, stop: CancellationToken) {
    let mut grpc = tonic::client::Grpc::new(channel);
    let opened = async {
        grpc.ready().await.map_err(|_| Code::Unavailable)?;
        let codec = RawCodec;
        let path = PathAndQuery::from_static("/presence.v1.Presence/WatchOnline");
        let request = tonic::Request::new(WatchOnlineRequest { room });
        grpc.server_streaming(request, path, codec)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| s.code())
    };
    let mut stream = tokio::select! {
        opened = opened => match opened {
            Ok(stream) => stream,
            Err(code) => return shared.stream_error(code_name(code)),
        },
        () = stop.cancelled() => return,
    };
    let mut first = true;
    loop {
        let message = tokio::select! {
            message = stream.message() => message,
            () = stop.cancelled() => return,
        };
        match message {
            Ok(Some(message)) => {
                shared.messages.fetch_add(1, Ordering::Relaxed);
                match shared.seen(id, &message) {
                    Some(Event::Snapshot { resync }) => {
                        if first {
                            first = false;
                            shared.ready.fetch_add(1, Ordering::Relaxed);
                        } else if resync {
                            shared.resyncs.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Some(Event::Changes | Event::Other) => {}
                    None => return shared.stream_error("MALFORMED"),
                }
            }
            Ok(None) => return shared.stream_error("ENDED"),
            Err(status) => return shared.stream_error(code_name(status.code())),
        }
    }
}

/// What the joiner did.
struct Joined {
    ok: u64,
    errors: BTreeMap<&'static str, u64>,
    /// How far behind its schedule the joiner sent a call, at most.
    lag_max_ms: f64,
}

/// Reports `joins` new users into the room at `rate` a second, each call
/// sent on schedule whatever the ones before it are doing.
async fn join(
    target: String,
    room: String,
    rate: u32,
    connections: u32,
    joins: usize,
    shared: Arc<Shared>,
) -> Result<Joined, String> {
    let endpoint = endpoint(&target)?.timeout(Duration::from_secs(10));
    let mut clients = Vec::new();
    for _ in 0..connections {
        clients.push(PresenceClient::new(endpoint.connect().await.map_err(|e| chain(&e))?));
    }
    let prefix = String::from_utf8_lossy(&shared.prefix).into_owned();
    let start = tokio::time::Instant::now();
    let mut lag_max = Duration::ZERO;
    let mut calls = Vec::with_capacity(joins);
    for index in 0..joins {
        let due = start + Duration::from_secs_f64(index as f64 / f64::from(rate));
        tokio::time::sleep_until(due).await;
        lag_max = lag_max.max(tokio::time::Instant::now().saturating_duration_since(due));
        let mut client = clients[index % clients.len()].clone();
        let request = ReportUserRequest {
            username: format!("{prefix}{index}"),
            room: room.clone(),
        };
        // Stored before the call: a watcher may see the join before the
        // call's answer is back.
        shared.sent_at[index].store(shared.now_ns() + 1, Ordering::Release);
        calls.push(tokio::spawn(
            async move { client.report_user(request).await.map(|_| ()) },
        ));
    }
    let mut joined = Joined {
        ok: 0,
        errors: BTreeMap::new(),
        lag_max_ms: lag_max.as_secs_f64() * 1000.0,
    };
    for call in calls {
        match call.await {
            Ok(Ok(())) => joined.ok += 1,
            Ok(Err(status)) => *joined.errors.entry(code_name(status.code())).or_default() += 1,
            Err(_) => *joined.errors.entry("TASK_FAILED").or_default() += 1,
        }
    }
    Ok(joined)
}

struct Summary<'a> {
    args: &'a Args,
    connections: u32,
    shared: &'a Shared,
    joined: &'a Joined,
    watchers_ready: u64,
    snapshot_seconds: f64,
    service_cpu: Option<f64>,
    own_cpu: Option<f64>,
    rss_watching: Option<f64>,
    rss_end: Option<f64>,
    hwm_end: Option<f64>,
}

/// The one line of JSON a run prints.
fn summary(s: Summary<'_>) -> String {
    let shared = s.shared;
    let mut counts = vec![0_u64; BUCKETS];
    for shard in &shared.histogram {
        for (total, bucket) in counts.iter_mut().zip(shard) {
            *total += bucket.load(Ordering::Relaxed);
        }
    }
    let seen: u64 = counts.iter().sum();
    let expected = s.joined.ok * s.watchers_ready;
    // Percentiles over all expected pairs: a pair never seen ranks above
    // every seen one, so a missing delivery can only raise them.
    let percentile = |q: f64| -> Option<f64> {
        if expected == 0 {
            return None;
        }
        let rank = ((q * expected as f64).ceil() as u64).clamp(1, expected);
        let mut below = 0;
        for (ms, count) in counts.iter().enumerate() {
            below += count;
            if below >= rank {
                return Some(ms as f64 + 1.0);
            }
        }
        None
    };
    let bound_ms = (s.args.watch_interval.as_millis() * 2) as usize;
    let within: u64 = counts.iter().take(bound_ms.min(BUCKETS)).sum();
    let fraction = |n: u64| if expected > 0 { n as f64 / expected as f64 } else { 0.0 };
    let opt = |v: Option<f64>, decimals: usize| v.map_or("null".to_owned(), |v| format!("{v:.decimals$}"));
    let mut line = String::new();
    let _ = write!(
        line,
        "{{\"workload\":\"watch\",\"room\":{},\"watchers\":{},\"watchers_ready\":{},\"connections\":{},\
         \"snapshot_seconds\":{:.3},\"join_rate\":{},\"join_seconds\":{:.3},\"joins_ok\":{},\"join_lag_max_ms\":{:.1},\
         \"watch_interval_ms\":{},\"pairs_expected\":{expected},\"pairs_seen\":{seen},\"pairs_odd\":{},\
         \"seen_fraction\":{:.6},\"within_2x_interval_fraction\":{:.6},\"p50_ms\":{},\"p99_ms\":{},\"max_ms\":{},\
         \"resyncs\":{},\"messages\":{},\"service_cpu_seconds\":{},\"load_cpu_seconds\":{},\
         \"service_rss_watching_mb\":{},\"service_rss_end_mb\":{},\"service_hwm_mb\":{}",
        json_string(&s.args.room),
        s.args.watchers,
        s.watchers_ready,
        s.connections,
        s.snapshot_seconds,
        s.args.join_rate,
        s.args.duration.as_secs_f64(),
        s.joined.ok,
        s.joined.lag_max_ms,
        s.args.watch_interval.as_millis(),
        shared.pairs_odd.load(Ordering::Relaxed),
        fraction(seen),
        fraction(within),
        opt(percentile(0.50), 0),
        opt(percentile(0.99), 0),
        if seen > 0 {
            format!("{:.1}", shared.max_us.load(Ordering::Relaxed) as f64 / 1000.0)
        } else {
            "null".to_owned()
        },
        shared.resyncs.load(Ordering::Relaxed),
        shared.messages.load(Ordering::Relaxed),
        opt(s.service_cpu, 2),
        opt(s.own_cpu, 2),
        opt(s.rss_watching, 1),
        opt(s.rss_end, 1),
        opt(s.hwm_end, 1),
    );
    line.push_str(",\"join_errors\":");
    push_counts(&mut line, &s.joined.errors);
    line.push_str(",\"stream_errors\":");
    let errors = shared.stream_errors.lock().map(|e| e.clone()).unwrap_or_default();
    push_counts(&mut line, &errors);
    line.push('}');
    line
}

fn push_counts(line: &mut String, counts: &BTreeMap<&'static str, u64>) {
    line.push('{');
    for (i, (code, count)) in counts.iter().enumerate() {
        let _ = write!(line, "{}{}:{count}", if i > 0 { "," } else { "" }, json_string(code));
    }
    line.push('}');
}

/// A process's user + system CPU time in seconds, from /proc/PID/stat
/// (Linux; clock ticks of 1/100 s, as on every mainstream Linux build).
fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count from after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// A `Vm*` line of /proc/PID/status, in MB.
fn proc_status_mb(pid: u32, key: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use presence::proto::v1::{OnlineChanges, OnlineSnapshot, WatchOnlineResponse, watch_online_response};

    fn encoded(event: watch_online_response::Event) -> Vec<u8> {
        prost::Message::encode_to_vec(&WatchOnlineResponse { event: Some(event) })
    }

    #[test]
    fn the_walk_finds_what_prost_encoded() {
        let changes = encoded(watch_online_response::Event::Changes(OnlineChanges {
            joined_users: vec!["w000001-7".to_owned(), "ada".to_owned()],
            left_users: vec!["bob".to_owned()],
            joined_guests: vec!["10.0.0.1".to_owned()],
            user_count: 300,
            ..Default::default()
        }));
        let mut names = Vec::new();
        let event = read_event(&changes, |name| names.push(String::from_utf8_lossy(name).into_owned()));
        assert_eq!(event, Some(Event::Changes));
        assert_eq!(names, ["w000001-7", "ada"]);

        let snapshot = encoded(watch_online_response::Event::Snapshot(OnlineSnapshot {
            users: vec!["ada".to_owned()],
            user_count: 1,
            resync: true,
            ..Default::default()
        }));
        assert_eq!(read_event(&snapshot, |_| {}), Some(Event::Snapshot { resync: true }));
        assert_eq!(read_event(&changes[..changes.len() - 1], |_| {}), None, "truncated");
    }

    #[test]
    fn join_indexes_are_read_from_our_names_only() {
        let shared = Shared::new("w000001-", 0);
        assert_eq!(shared.join_index(b"w000001-42"), Some(42));
        assert_eq!(shared.join_index(b"w000001-"), None);
        assert_eq!(shared.join_index(b"w000002-42"), None);
        assert_eq!(shared.join_index(b"w000001-4x"), None);
    }
}
