//! `WatchOnline`: live joins and leaves, fanned out to every watcher of a
//! scope on this replica from one Redis subscription.
//!
//! Per watched scope there is one feed task. It follows the scope's change
//! messages (one subscription per replica, however many watchers), batches
//! them for [`WatchHub`]'s interval, fetches the counts once, and publishes
//! one shared message on broadcast channels. Each watcher's stream reads
//! its channel and clones a message only as the transport takes it, so a
//! slow watcher holds no more than the channel's few shared messages: when
//! it falls behind, it gets a fresh snapshot (`resync`) instead.
//!
//! A scope's watchers are spread over lanes of at most [`LANE_WATCHERS`]
//! (a broadcast channel each, made as watchers come), and a flush goes
//! out lane by lane (a fan-out task per scope), each lane once the one
//! before has taken it, looked at every millisecond. Waking ten thousand
//! watchers at once puts ten thousand encodes in the runtime's queue ahead
//! of every report, whose wait for Redis then runs out behind them (tens to
//! hundreds of 10,000 joins refused in a load test). Lane by lane, a report
//! waits behind one lane's encodes at most, and the millisecond pauses are
//! part of it: a build that went on the instant a lane was read had
//! refusals again (BENCHMARKS.md).
//!
//! Exactly what a watcher has seen is tracked by sequence numbers: each
//! change message carries one per kind and scope, a snapshot says up to
//! which it includes, and a watcher applies only what comes after. A gap
//! in the numbers (a lost message, a reconnect) makes everyone resync.

use std::{
    collections::{HashMap, hash_map::Entry},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::Stream;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use crate::domain::{Counts, Kind, Scope};
use crate::error::ApiError;
use crate::locks::lock;
use crate::metrics::{CallType, Metrics};
use crate::proto::server::presence_server;
use crate::proto::v1::{OnlineChanges, OnlineSnapshot, WatchOnlineResponse, watch_online_response};
use crate::store::{Change, SNAPSHOT_NAMES, Store, StoreError};

/// Flushed messages a watcher may be behind before it must resync; also
/// the flushes a scope's fan-out may be behind before its watchers resync.
const BACKLOG: usize = 16;

/// The most watchers in one lane: see the module docs. A scope with fewer
/// watchers has one lane, so a room watched by one page costs one channel.
const LANE_WATCHERS: usize = 256;

/// The longest a flush waits for one lane's watchers to take it before it
/// goes on to the next: a watcher that does not read (a stalled client)
/// must not hold the others back for long.
const LANE_WAIT: Duration = Duration::from_millis(5);

/// Names a feed holds between two flushes; past this, everyone resyncs
/// (a rotation of a million names is a snapshot, not a million leaves).
const MAX_PENDING_NAMES: usize = 10_000;

/// How often a watched scope is marked as watched (and its rotation's
/// leavers announced), at most: more often with short intervals, so that a
/// rotation is announced soon after it happens.
const KEEP_WATCHED_EVERY: Duration = Duration::from_secs(1);

const SERVICE: &str = presence_server::SERVICE_NAME;
const METHOD: &str = "WatchOnline";

/// Every watched scope on this replica.
pub struct WatchHub {
    store: Arc<dyn Store>,
    interval: Duration,
    /// How often a watched scope is kept watched: see [`KEEP_WATCHED_EVERY`].
    keep_every: Duration,
    metrics: Metrics,
    feeds: Mutex<HashMap<Scope, Arc<Feed>>>,
    /// Shutdown: every stream ends with UNAVAILABLE, at once.
    stop: CancellationToken,
}

/// One watched scope: its lanes of flushed changes, and where watchers ask
/// for snapshots.
struct Feed {
    /// Its lanes, in the order a flush goes out; never fewer, while the
    /// feed lasts.
    lanes: Mutex<Vec<broadcast::Sender<Arc<Flush>>>>,
    snapshots: mpsc::UnboundedSender<oneshot::Sender<Result<Arc<Snap>, ApiError>>>,
}

impl Feed {
    fn new(snapshots: mpsc::UnboundedSender<oneshot::Sender<Result<Arc<Snap>, ApiError>>>) -> Self {
        Self {
            lanes: Mutex::default(),
            snapshots,
        }
    }

    fn lanes(&self) -> std::sync::MutexGuard<'_, Vec<broadcast::Sender<Arc<Flush>>>> {
        lock(&self.lanes)
    }

    /// A new watcher's subscription, in the first lane with room (a new
    /// lane if none has).
    fn subscribe(&self) -> broadcast::Receiver<Arc<Flush>> {
        let mut lanes = self.lanes();
        if let Some(lane) = lanes.iter().find(|lane| lane.receiver_count() < LANE_WATCHERS) {
            return lane.subscribe();
        }
        let (lane, changes) = broadcast::channel(BACKLOG);
        lanes.push(lane);
        changes
    }

    fn watchers(&self) -> usize {
        self.lanes().iter().map(broadcast::Sender::receiver_count).sum()
    }

    /// Hands a flush to every lane in turn, each once the lane before has
    /// taken it (every watcher's stream has read it; checked each
    /// millisecond, which leaves the runtime to other calls meanwhile) or
    /// after [`LANE_WAIT`]. The flushes of one scope go out in order: one
    /// task runs this for them all.
    async fn fan_out(&self, flush: Arc<Flush>) {
        let lanes = self.lanes().clone();
        for lane in &lanes {
            if lane.receiver_count() == 0 || lane.send(flush.clone()).is_err() {
                continue;
            }
            let until = tokio::time::Instant::now() + LANE_WAIT;
            // `len` also counts older flushes a lagging watcher has not
            // read; the wait is bounded all the same.
            while !lane.is_empty() && tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

/// What a feed publishes at each flush.
enum Flush {
    /// Changes with sequence numbers after `from` and up to `to`, by kind;
    /// `message` is the diff of all of them, `raw` the changes themselves
    /// (for a watcher whose snapshot already holds some of them).
    Changes {
        from: [u64; 2],
        to: [u64; 2],
        message: WatchOnlineResponse,
        raw: Vec<Change>,
        counts: Counts,
    },
    /// Changes were lost: every watcher starts again from a snapshot.
    Resync,
}

/// A snapshot and the sequence numbers it includes, by kind.
struct Snap {
    seqs: [u64; 2],
    message: OnlineSnapshot,
}

impl WatchHub {
    /// `interval`: how often watchers get changes; `tick`: the store's
    /// interval *T*.
    pub fn new(
        store: Arc<dyn Store>,
        interval: Duration,
        tick: Duration,
        metrics: Metrics,
        stop: CancellationToken,
    ) -> Self {
        Self {
            store,
            interval,
            keep_every: KEEP_WATCHED_EVERY.min(tick / 4),
            metrics,
            feeds: Mutex::default(),
            stop,
        }
    }

    fn feeds(&self) -> std::sync::MutexGuard<'_, HashMap<Scope, Arc<Feed>>> {
        lock(&self.feeds)
    }

    /// A watcher's stream: a snapshot, then changes, until the client goes
    /// or the server shuts down.
    pub fn watch(self: &Arc<Self>, scope: Scope) -> impl Stream<Item = Result<WatchOnlineResponse, Status>> + use<> {
        // Subscribed before the snapshot is asked for, so nothing after
        // the snapshot can be missed.
        let (feed, changes) = {
            let mut feeds = self.feeds();
            let feed = match feeds.entry(scope.clone()) {
                Entry::Occupied(existing) => existing.get().clone(),
                Entry::Vacant(vacant) => {
                    let feed = self.start_feed(scope.clone());
                    vacant.insert(feed).clone()
                }
            };
            let changes = feed.subscribe();
            (feed, changes)
        };
        self.metrics.watch_opened();
        let state = Watcher {
            feed,
            changes,
            seqs: [0; 2],
            snapshot: Some(false),
            stop: self.stop.clone(),
            metrics: self.metrics.clone(),
            ended: false,
            started: tokio::time::Instant::now(),
        };
        futures_util::stream::unfold(state, |mut watcher| async move {
            let item = watcher.next().await?;
            Some((item, watcher))
        })
    }

    fn start_feed(self: &Arc<Self>, scope: Scope) -> Arc<Feed> {
        let (snapshots, requests) = mpsc::unbounded_channel();
        let feed = Arc::new(Feed::new(snapshots));
        let (flushes, mut to_fan_out) = mpsc::channel::<Arc<Flush>>(BACKLOG);
        let (fan_out_feed, stop) = (feed.clone(), self.stop.clone());
        // Ends when the feed task drops `flushes`, or at shutdown.
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    flush = to_fan_out.recv() => match flush {
                        Some(flush) => fan_out_feed.fan_out(flush).await,
                        None => break,
                    },
                    () = stop.cancelled() => break,
                }
            }
        });
        tokio::spawn(self.clone().run_feed(scope, feed.clone(), flushes, requests));
        feed
    }

    /// The feed task of one scope. Ends when it has had no watcher for a
    /// whole interval, or at shutdown.
    async fn run_feed(
        self: Arc<Self>,
        scope: Scope,
        feed: Arc<Feed>,
        flushes: mpsc::Sender<Arc<Flush>>,
        mut requests: mpsc::UnboundedReceiver<oneshot::Sender<Result<Arc<Snap>, ApiError>>>,
    ) {
        let mut following = self.store.follow(&scope).await.ok();
        // Marked as watched before any snapshot is read: a change after the
        // snapshot is then always announced.
        let mut marked = self.store.keep_watched(&scope).await.is_ok();
        let mut pending = Pending::default();
        let mut ticks = tokio::time::interval(self.interval.min(self.keep_every));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_kept = marked.then(tokio::time::Instant::now);
        // The scheduled instant of the tick that last flushed (the first
        // tick's, to begin with). Ticks, not the clock after a flush, are
        // compared: a flush ends a little after its tick, so measured from
        // its end the next tick would be a hair short of the interval, be
        // skipped, and changes would come every other interval.
        let mut last_flush: Option<tokio::time::Instant> = None;
        let mut idle_since: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                request = requests.recv() => {
                    let Some(first) = request else { break };
                    // Everyone asking now shares one read.
                    let mut waiting = vec![first];
                    while let Ok(more) = requests.try_recv() {
                        waiting.push(more);
                    }
                    // Marked as watched before the snapshot is read, or no
                    // snapshot at all: the store cannot be followed now.
                    if !marked {
                        match self.store.keep_watched(&scope).await {
                            Ok(_) => {
                                marked = true;
                                last_kept = Some(tokio::time::Instant::now());
                            }
                            Err(error) => {
                                let error = Arc::new(error);
                                for reply in waiting {
                                    let _ = reply.send(Err(ApiError::from(StoreError::Shared(error.clone()))));
                                }
                                continue;
                            }
                        }
                    }
                    let snap = self.snapshot(&scope).await.map(Arc::new).map_err(Arc::new);
                    for reply in waiting {
                        let _ = reply.send(match &snap {
                            Ok(snap) => Ok(snap.clone()),
                            Err(error) => Err(ApiError::from(StoreError::Shared(error.clone()))),
                        });
                    }
                }
                change = recv(&mut following) => match change {
                    Some(change) => pending.add(change),
                    None => {
                        // Not following (Redis away when we started, or the
                        // bus dropped us): try again, and resync everyone.
                        following = None;
                        pending.gap = true;
                    }
                },
                at = ticks.tick() => {
                    if following.is_none() {
                        following = self.store.follow(&scope).await.ok();
                        if following.is_some() {
                            pending.gap = true;
                        }
                    }
                    if last_kept.is_none_or(|at| at.elapsed() >= self.keep_every) {
                        match self.store.keep_watched(&scope).await {
                            // The mark lapsed: changes went unannounced.
                            Ok(all_along) => {
                                if !all_along && marked {
                                    pending.gap = true;
                                }
                                marked = true;
                            }
                            Err(error) => tracing::debug!(%error, "cannot mark a watched scope"),
                        }
                        last_kept = Some(tokio::time::Instant::now());
                    }
                    match last_flush {
                        Some(flushed) if at.saturating_duration_since(flushed) < self.interval => {}
                        Some(_) => {
                            self.flush(&scope, &flushes, &mut pending).await;
                            last_flush = Some(at);
                        }
                        None => last_flush = Some(at),
                    }
                    if feed.watchers() > 0 {
                        idle_since = None;
                    }
                    let idle = *idle_since.get_or_insert_with(tokio::time::Instant::now);
                    if idle.elapsed() >= self.interval.max(Duration::from_secs(1)) {
                        let mut feeds = self.feeds();
                        // Checked under the lock new watchers subscribe under.
                        if feed.watchers() == 0 {
                            feeds.remove(&scope);
                            break;
                        }
                    }
                }
                () = self.stop.cancelled() => break,
            }
        }
        // Dropped first: the store only forgets a follower that has gone.
        drop(following);
        self.store.unfollow(&scope).await;
    }

    async fn flush(&self, scope: &Scope, flushes: &mpsc::Sender<Arc<Flush>>, pending: &mut Pending) {
        if pending.gap {
            if flushes.try_send(Arc::new(Flush::Resync)).is_ok() {
                *pending = Pending::default();
            }
            return;
        }
        if pending.raw.is_empty() {
            return;
        }
        let raw = std::mem::take(&mut pending.raw);
        let (from, to) = (pending.from, pending.to);
        pending.from = pending.to;
        pending.names = 0;
        let counts = match self.counts(scope).await {
            Ok(counts) => counts,
            Err(_) => {
                pending.gap = flushes.try_send(Arc::new(Flush::Resync)).is_err();
                return;
            }
        };
        let message = changes_message(&raw, [0; 2], counts);
        let flush = Arc::new(Flush::Changes {
            from,
            to,
            message,
            raw,
            counts,
        });
        // A fan-out this far behind: its watchers start again from a
        // snapshot at the next flush.
        if flushes.try_send(flush).is_err() {
            pending.gap = true;
        }
    }

    async fn counts(&self, scope: &Scope) -> Result<Counts, StoreError> {
        let (users, guests) = self.store.pages(scope, (None, 0), (None, 0)).await?;
        Ok(Counts {
            users: users.total,
            guests: guests.total,
        })
    }

    async fn snapshot(&self, scope: &Scope) -> Result<Snap, StoreError> {
        let (users, guests) = tokio::try_join!(
            self.store.snapshot(scope, Kind::Users, SNAPSHOT_NAMES),
            self.store.snapshot(scope, Kind::Guests, SNAPSHOT_NAMES),
        )?;
        Ok(Snap {
            seqs: [users.seq, guests.seq],
            message: OnlineSnapshot {
                users: users.names,
                guests: guests.names,
                user_count: users.total,
                guest_count: guests.total,
                resync: false,
            },
        })
    }
}

async fn recv(following: &mut Option<mpsc::Receiver<Change>>) -> Option<Change> {
    match following {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

/// Changes received since the last flush.
#[derive(Default)]
struct Pending {
    raw: Vec<Change>,
    names: usize,
    /// The last sequence number seen before `raw`, and the last in it.
    from: [u64; 2],
    to: [u64; 2],
    /// Whether the numbers have been seen yet (the first message sets them).
    started: [bool; 2],
    gap: bool,
}

impl Pending {
    fn add(&mut self, change: Change) {
        let Change::Names {
            kind, seq, ref names, ..
        } = change
        else {
            self.gap = true;
            return;
        };
        let k = kind as usize;
        if self.started[k] && seq <= self.to[k] {
            return;
        }
        if self.started[k] && seq != self.to[k] + 1 {
            self.gap = true;
            return;
        }
        if !self.started[k] {
            self.started[k] = true;
            self.from[k] = seq - 1;
        }
        self.to[k] = seq;
        self.names += names.len();
        self.raw.push(change);
        if self.names > MAX_PENDING_NAMES {
            self.gap = true;
        }
    }
}

/// The net effect of changes after the sequence numbers `after`: a name
/// that joined and left (or left and came back) within them is not
/// mentioned.
fn changes_message(raw: &[Change], after: [u64; 2], counts: Counts) -> WatchOnlineResponse {
    let mut net: [HashMap<&str, bool>; 2] = Default::default();
    for change in raw {
        let Change::Names {
            kind,
            joined,
            seq,
            names,
        } = change
        else {
            continue;
        };
        if *seq <= after[*kind as usize] {
            continue;
        }
        let net = &mut net[*kind as usize];
        for name in names {
            match net.get(name.as_str()) {
                // The opposite of what we had: back where it started.
                Some(was) if *was != *joined => {
                    net.remove(name.as_str());
                }
                Some(_) => {}
                None => {
                    net.insert(name, *joined);
                }
            }
        }
    }
    let split = |net: &HashMap<&str, bool>, joined: bool| {
        let mut names: Vec<String> = net
            .iter()
            .filter(|(_, j)| **j == joined)
            .map(|(n, _)| (*n).to_owned())
            .collect();
        names.sort();
        names
    };
    WatchOnlineResponse {
        event: Some(watch_online_response::Event::Changes(OnlineChanges {
            joined_users: split(&net[0], true),
            left_users: split(&net[0], false),
            joined_guests: split(&net[1], true),
            left_guests: split(&net[1], false),
            user_count: counts.users,
            guest_count: counts.guests,
        })),
    }
}

fn is_empty(message: &WatchOnlineResponse) -> bool {
    match &message.event {
        Some(watch_online_response::Event::Changes(c)) => {
            c.joined_users.is_empty()
                && c.left_users.is_empty()
                && c.joined_guests.is_empty()
                && c.left_guests.is_empty()
        }
        _ => false,
    }
}

/// One watcher's stream state.
struct Watcher {
    feed: Arc<Feed>,
    changes: broadcast::Receiver<Arc<Flush>>,
    /// What this watcher has seen, by kind.
    seqs: [u64; 2],
    /// A snapshot is due: `Some(resync)`.
    snapshot: Option<bool>,
    stop: CancellationToken,
    metrics: Metrics,
    ended: bool,
    started: tokio::time::Instant,
}

impl Watcher {
    async fn next(&mut self) -> Option<Result<WatchOnlineResponse, Status>> {
        if self.ended {
            return None;
        }
        loop {
            if let Some(resync) = self.snapshot {
                let (reply, answer) = oneshot::channel();
                if self.feed.snapshots.send(reply).is_err() {
                    return self.end(ApiError::ShuttingDown);
                }
                let snap = tokio::select! {
                    snap = answer => snap,
                    () = self.stop.cancelled() => return self.end(ApiError::ShuttingDown),
                };
                let snap = match snap {
                    Ok(Ok(snap)) => snap,
                    Ok(Err(error)) => return self.end(error),
                    Err(_) => return self.end(ApiError::ShuttingDown),
                };
                self.snapshot = None;
                self.seqs = snap.seqs;
                let mut message = snap.message.clone();
                message.resync = resync;
                self.metrics
                    .msg_sent(SERVICE, METHOD, if resync { "resync" } else { "snapshot" });
                return Some(Ok(WatchOnlineResponse {
                    event: Some(watch_online_response::Event::Snapshot(message)),
                }));
            }
            let flush = tokio::select! {
                flush = self.changes.recv() => flush,
                () = self.stop.cancelled() => return self.end(ApiError::ShuttingDown),
            };
            match flush {
                Ok(flush) => match &*flush {
                    Flush::Resync => self.snapshot = Some(true),
                    Flush::Changes {
                        from,
                        to,
                        message,
                        raw,
                        counts,
                    } => {
                        if (0..2).all(|k| to[k] <= self.seqs[k]) {
                            continue;
                        }
                        let message = if (0..2).all(|k| from[k] >= self.seqs[k]) {
                            message.clone()
                        } else {
                            changes_message(raw, self.seqs, *counts)
                        };
                        self.seqs = [self.seqs[0].max(to[0]), self.seqs[1].max(to[1])];
                        if is_empty(&message) {
                            continue;
                        }
                        self.metrics.msg_sent(SERVICE, METHOD, "changes");
                        return Some(Ok(message));
                    }
                },
                Err(broadcast::error::RecvError::Lagged(_)) => self.snapshot = Some(true),
                Err(broadcast::error::RecvError::Closed) => return self.end(ApiError::ShuttingDown),
            }
        }
    }

    fn end(&mut self, error: ApiError) -> Option<Result<WatchOnlineResponse, Status>> {
        self.ended = true;
        Some(Err(error.into()))
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.metrics.watch_closed();
        let code = if self.ended { Code::Unavailable } else { Code::Cancelled };
        self.metrics
            .rpc_handled(CallType::ServerStream, SERVICE, METHOD, code, self.started.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn change(kind: Kind, joined: bool, seq: u64, names: &[&str]) -> Change {
        Change::Names {
            kind,
            joined,
            seq,
            names: names.iter().map(|n| (*n).to_owned()).collect(),
        }
    }

    fn parts(message: &WatchOnlineResponse) -> (Vec<String>, Vec<String>, Vec<String>) {
        match &message.event {
            Some(watch_online_response::Event::Changes(c)) => {
                (c.joined_users.clone(), c.left_users.clone(), c.joined_guests.clone())
            }
            _ => panic!("not changes"),
        }
    }

    #[test]
    fn a_name_that_joins_and_leaves_between_two_flushes_is_not_mentioned() {
        let raw = [
            change(Kind::Users, true, 1, &["ada", "bob"]),
            change(Kind::Users, false, 2, &["bob", "cy"]),
            change(Kind::Guests, true, 1, &["10.0.0.1"]),
        ];
        let (joined, left, guests) = parts(&changes_message(&raw, [0, 0], Counts::default()));
        assert_eq!(joined, ["ada"]);
        assert_eq!(left, ["cy"]);
        assert_eq!(guests, ["10.0.0.1"]);
    }

    #[test]
    fn changes_a_snapshot_already_holds_are_not_sent_again() {
        let raw = [
            change(Kind::Users, true, 5, &["ada"]),
            change(Kind::Users, true, 6, &["bob"]),
        ];
        let (joined, ..) = parts(&changes_message(&raw, [5, 0], Counts::default()));
        assert_eq!(joined, ["bob"]);
    }

    #[test]
    fn a_jump_in_sequence_numbers_is_a_gap() {
        let mut pending = Pending::default();
        pending.add(change(Kind::Users, true, 3, &["a"]));
        pending.add(change(Kind::Users, true, 4, &["b"]));
        assert!(!pending.gap);
        assert_eq!((pending.from, pending.to), ([2, 0], [4, 0]));
        pending.add(change(Kind::Users, true, 6, &["c"]));
        assert!(pending.gap);
    }

    fn flush(to: u64) -> Arc<Flush> {
        Arc::new(Flush::Changes {
            from: [to - 1, 0],
            to: [to, 0],
            message: WatchOnlineResponse::default(),
            raw: Vec::new(),
            counts: Counts::default(),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_flush_goes_out_lane_by_lane_and_a_stalled_watcher_holds_nobody_back() {
        let (snapshots, _requests) = mpsc::unbounded_channel();
        let feed = Arc::new(Feed::new(snapshots));
        // The first watcher (lane 0) never reads.
        let _stalled = feed.subscribe();
        assert_eq!(feed.lanes().len(), 1, "a lane is made only when needed");
        // Readers that found a later lane already handed the flush they
        // were reading.
        let early = Arc::new(AtomicUsize::new(0));
        let readers: Vec<_> = (1..3 * LANE_WATCHERS + 5)
            .map(|i| {
                let lane = i / LANE_WATCHERS;
                let mut changes = feed.subscribe();
                let (feed, early) = (feed.clone(), early.clone());
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    for _ in 0..2 {
                        let flush = changes.recv().await.expect("a flush");
                        if feed.lanes()[lane + 1..].iter().any(|later| !later.is_empty()) {
                            early.fetch_add(1, Ordering::SeqCst);
                        }
                        if let Flush::Changes { to, .. } = &*flush {
                            seen.push(to[0]);
                        }
                    }
                    seen
                })
            })
            .collect();
        for to in [1, 2] {
            tokio::time::timeout(Duration::from_secs(5), feed.fan_out(flush(to)))
                .await
                .expect("the stalled watcher does not hold the flush up");
        }
        for reader in readers {
            let seen = tokio::time::timeout(Duration::from_secs(5), reader)
                .await
                .expect("every reading watcher gets both flushes")
                .expect("the reader ran");
            assert_eq!(seen, [1, 2]);
        }
        assert_eq!(feed.lanes().len(), 4, "lanes of at most {LANE_WATCHERS}");
        assert_eq!(early.load(Ordering::SeqCst), 0, "a later lane had the flush first");
    }

    #[test]
    fn too_many_pending_names_is_a_gap_not_a_growing_buffer() {
        let mut pending = Pending::default();
        let names: Vec<String> = (0..=MAX_PENDING_NAMES).map(|i| format!("n{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        pending.add(change(Kind::Users, false, 1, &names));
        assert!(pending.gap);
    }
}
