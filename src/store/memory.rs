use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use tokio::{sync::mpsc, time::Instant};

use super::{Change, Maintenance, Probe, Snapshot, Store, StoreError};
use crate::domain::{
    Counts, Kind, KindPage, Room, RoomCount, RoomOrder, RoomsPage, RoomsPageToken, Scope, Visitors, page_of,
};
use crate::locks::lock;

/// How many change messages a follower may have waiting before it is told
/// it missed some (and resyncs): the bound on a slow follower's memory.
const FOLLOWER_BACKLOG: usize = 1024;

/// Names per change message, as in Redis's small steps.
const NAMES_PER_MESSAGE: usize = 1000;

/// What the in-memory store needs to know.
#[derive(Debug, Clone)]
pub struct MemoryStoreConfig {
    /// *T*: the length of an interval.
    pub interval: Duration,
    /// How long last seen is kept; `None` turns it off.
    pub last_seen_retention: Option<Duration>,
}

/// The in-memory store: the same two-set algorithm as Redis, in one process.
///
/// A std mutex, not a tokio one: no lock is held across an `.await`, and
/// each critical section is a few set operations. Intervals are counted on
/// a clock that starts at the wall-clock time of creation and then follows
/// tokio's monotonic clock, so tests can move time with `tokio::time`.
pub struct MemoryStore {
    config: MemoryStoreConfig,
    origin: (Instant, u64),
    state: Mutex<State>,
    /// Site-wide rotations, by kind.
    rotations: [AtomicU64; 2],
}

#[derive(Default)]
struct State {
    site: Sets,
    rooms: BTreeMap<Room, Sets>,
    last_seen: HashMap<String, u64>,
    followers: HashMap<Scope, mpsc::Sender<Change>>,
}

/// One scope's sets, both kinds.
#[derive(Default)]
struct Sets {
    users: KindSets,
    guests: KindSets,
}

impl Sets {
    fn of(&mut self, kind: Kind) -> &mut KindSets {
        match kind {
            Kind::Users => &mut self.users,
            Kind::Guests => &mut self.guests,
        }
    }
}

/// One kind's sets. `current` and `old` are kept disjoint, as in Redis.
#[derive(Default)]
struct KindSets {
    current: BTreeSet<String>,
    old: BTreeSet<String>,
    /// The start (Unix ms) of the interval `current` belongs to.
    interval: Option<u64>,
    seq: u64,
}

impl KindSets {
    /// Brings the sets into the interval starting at `start`; returns who
    /// left and whether it rotated.
    fn catch_up(&mut self, start: u64, period: u64) -> (Vec<String>, bool) {
        match self.interval {
            Some(since) if since >= start => (Vec::new(), false),
            Some(since) => {
                let current = std::mem::take(&mut self.current);
                let mut left: Vec<String> = if since + period >= start {
                    std::mem::replace(&mut self.old, current).into_iter().collect()
                } else {
                    let mut gone: Vec<String> = std::mem::take(&mut self.old).into_iter().collect();
                    gone.extend(current);
                    gone
                };
                left.sort();
                self.interval = Some(start);
                (left, true)
            }
            None => {
                self.interval = Some(start);
                (Vec::new(), false)
            }
        }
    }

    fn count(&self) -> u64 {
        (self.current.len() + self.old.len()) as u64
    }

    fn contains(&self, name: &str) -> bool {
        self.current.contains(name) || self.old.contains(name)
    }

    /// Adds names; returns those newly listed.
    fn add(&mut self, names: &[&str]) -> Vec<String> {
        let mut joined = Vec::new();
        for &name in names {
            if self.current.contains(name) {
                continue;
            }
            if !self.old.remove(name) {
                joined.push(name.to_owned());
            }
            self.current.insert(name.to_owned());
        }
        joined
    }

    /// Removes names; returns those that were listed.
    fn remove(&mut self, names: &[&str]) -> Vec<String> {
        names
            .iter()
            .filter(|name| self.current.remove(**name) | self.old.remove(**name))
            .map(|name| (*name).to_owned())
            .collect()
    }

    fn page(&self, after: Option<&str>, size: usize) -> KindPage {
        let from = |set: &BTreeSet<String>| -> Vec<String> {
            match after {
                Some(after) => set
                    .range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
                    .take(size)
                    .cloned()
                    .collect(),
                None => set.iter().take(size).cloned().collect(),
            }
        };
        page_of(from(&self.current), from(&self.old), size, self.count())
    }
}

impl MemoryStore {
    pub fn new(config: MemoryStoreConfig) -> Self {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self {
            config,
            origin: (Instant::now(), unix_ms),
            state: Mutex::default(),
            rotations: Default::default(),
        }
    }

    fn now_ms(&self) -> u64 {
        let elapsed = u64::try_from(self.origin.0.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.origin.1.saturating_add(elapsed)
    }

    fn period_ms(&self) -> u64 {
        u64::try_from(self.config.interval.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the sets half-updated
        // in a way that matters for presence.
        lock(&self.state)
    }

    /// The sets of one kind in a scope, brought into the current interval;
    /// who left at a rotation is announced to a follower. `None` for a room
    /// that does not exist (and is not created by reading it).
    fn touch<'a>(&self, state: &'a mut State, scope: &Scope, kind: Kind, create: bool) -> Option<&'a mut KindSets> {
        let period = self.period_ms();
        let now = self.now_ms();
        let start = now - now % period;
        let follower = state.followers.get(scope).cloned();
        let sets = match scope {
            Scope::Site => &mut state.site,
            Scope::Room(room) => {
                if create {
                    state.rooms.entry(room.clone()).or_default()
                } else {
                    state.rooms.get_mut(room)?
                }
            }
        };
        let kind_sets = sets.of(kind);
        let (left, rotated) = kind_sets.catch_up(start, period);
        if rotated && scope == &Scope::Site {
            self.rotations[kind as usize].fetch_add(1, Ordering::Relaxed);
        }
        if let Some(follower) = follower {
            announce(&follower, kind_sets, kind, false, left);
        }
        Some(kind_sets)
    }

    fn counts(&self, state: &mut State, scope: &Scope) -> Counts {
        let mut counts = Counts::default();
        for kind in Kind::ALL {
            if let Some(sets) = self.touch(state, scope, kind, false) {
                counts.set(kind, sets.count());
            }
        }
        counts
    }

    fn add_to(&self, state: &mut State, scope: &Scope, kind: Kind, names: &[&str]) {
        if names.is_empty() {
            return;
        }
        let follower = state.followers.get(scope).cloned();
        if let Some(sets) = self.touch(state, scope, kind, true) {
            let joined = sets.add(names);
            if let Some(follower) = follower {
                announce(&follower, sets, kind, true, joined);
            }
        }
    }

    fn remove_from(&self, state: &mut State, scope: &Scope, kind: Kind, names: &[&str]) {
        let follower = state.followers.get(scope).cloned();
        if let Some(sets) = self.touch(state, scope, kind, false) {
            let left = sets.remove(names);
            if let Some(follower) = follower {
                announce(&follower, sets, kind, false, left);
            }
        }
    }

    /// Rooms nobody is in any more, and nobody follows, are dropped.
    fn drop_empty_rooms(&self, state: &mut State) -> u64 {
        let rooms: Vec<Room> = state.rooms.keys().cloned().collect();
        let mut dropped = 0;
        for room in rooms {
            let scope = Scope::Room(room.clone());
            let counts = self.counts(state, &scope);
            if counts == Counts::default() && !state.followers.contains_key(&scope) {
                state.rooms.remove(&room);
                dropped += 1;
            }
        }
        dropped
    }
}

/// Sends names to a follower in messages of bounded size; a follower that
/// cannot take them is told it missed some.
fn announce(follower: &mpsc::Sender<Change>, sets: &mut KindSets, kind: Kind, joined: bool, names: Vec<String>) {
    for chunk in names.chunks(NAMES_PER_MESSAGE) {
        sets.seq += 1;
        let change = Change::Names {
            kind,
            joined,
            seq: sets.seq,
            names: chunk.to_vec(),
        };
        if follower.try_send(change).is_err() {
            let _ = follower.try_send(Change::Gap);
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn report(&self, scope: &Scope, visitors: Visitors, _deadline: Instant) -> Result<(), StoreError> {
        let now = self.now_ms();
        let mut state = self.state();
        for kind in Kind::ALL {
            let names = visitors.names(kind);
            self.add_to(&mut state, &Scope::Site, kind, &names);
            if scope != &Scope::Site {
                self.add_to(&mut state, scope, kind, &names);
            }
        }
        if self.config.last_seen_retention.is_some() {
            for user in &visitors.users {
                state.last_seen.insert(user.as_str().to_owned(), now);
            }
        }
        Ok(())
    }

    async fn leave(&self, scope: &Scope, visitors: &Visitors) -> Result<(), StoreError> {
        let mut state = self.state();
        let rooms: Vec<Scope> = match scope {
            Scope::Site => state.rooms.keys().cloned().map(Scope::Room).collect(),
            Scope::Room(_) => Vec::new(),
        };
        for kind in Kind::ALL {
            let names = visitors.names(kind);
            self.remove_from(&mut state, scope, kind, &names);
            for room in &rooms {
                self.remove_from(&mut state, room, kind, &names);
            }
        }
        Ok(())
    }

    async fn pages(
        &self,
        scope: &Scope,
        users: (Option<&str>, usize),
        guests: (Option<&str>, usize),
    ) -> Result<(KindPage, KindPage), StoreError> {
        let mut state = self.state();
        let mut page = |kind, (after, size): (Option<&str>, usize)| match self.touch(&mut state, scope, kind, false) {
            Some(sets) => sets.page(after, size),
            None => KindPage {
                names: Vec::new(),
                total: 0,
                done: true,
            },
        };
        Ok((page(Kind::Users, users), page(Kind::Guests, guests)))
    }

    async fn check(&self, scope: &Scope, kind: Kind, names: &[&str]) -> Result<Vec<bool>, StoreError> {
        let mut state = self.state();
        Ok(match self.touch(&mut state, scope, kind, false) {
            Some(sets) => names.iter().map(|name| sets.contains(name)).collect(),
            None => vec![false; names.len()],
        })
    }

    async fn check_users(&self, scope: &Scope, users: &[&str]) -> Result<(Vec<bool>, Vec<Option<u64>>), StoreError> {
        let online = self.check(scope, Kind::Users, users).await?;
        let Some(retention) = self.config.last_seen_retention else {
            return Ok((online, vec![None; users.len()]));
        };
        let cutoff = self
            .now_ms()
            .saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
        let state = self.state();
        let seen = users
            .iter()
            .map(|user| state.last_seen.get(*user).copied().filter(|at| *at >= cutoff))
            .collect();
        Ok((online, seen))
    }

    async fn rooms(
        &self,
        order: RoomOrder,
        after: Option<&RoomsPageToken>,
        size: usize,
    ) -> Result<RoomsPage, StoreError> {
        let mut state = self.state();
        let names: Vec<Room> = state.rooms.keys().cloned().collect();
        let mut rooms: Vec<RoomCount> = names
            .into_iter()
            .map(|room| {
                let counts = self.counts(&mut state, &Scope::Room(room.clone()));
                RoomCount {
                    room: room.as_str().to_owned(),
                    counts,
                }
            })
            .filter(|room| room.counts != Counts::default())
            .collect();
        // The same orders as the Redis index: by name, or busiest first
        // with ties by name.
        let key = |r: &RoomCount| (std::cmp::Reverse(r.counts.users), r.room.clone());
        match order {
            RoomOrder::Name => rooms.sort_by(|a, b| a.room.as_bytes().cmp(b.room.as_bytes())),
            RoomOrder::MostOnline => rooms.sort_by_key(key),
        }
        let start = match after {
            None => 0,
            Some(RoomsPageToken::ByName { after }) => rooms.partition_point(|r| r.room.as_str() <= after.as_str()),
            Some(RoomsPageToken::ByUsers { users, after }) => {
                rooms.partition_point(|r| key(r) <= (std::cmp::Reverse(*users), after.clone()))
            }
        };
        let page: Vec<RoomCount> = rooms.iter().skip(start).take(size).cloned().collect();
        let next = if start + page.len() < rooms.len() {
            page.last().map(|last| match order {
                RoomOrder::Name => RoomsPageToken::ByName {
                    after: last.room.clone(),
                },
                RoomOrder::MostOnline => RoomsPageToken::ByUsers {
                    users: last.counts.users,
                    after: last.room.clone(),
                },
            })
        } else {
            None
        };
        Ok(RoomsPage { rooms: page, next })
    }

    async fn probe(&self) -> Result<Probe, StoreError> {
        let mut state = self.state();
        let mut probe = Probe::default();
        for kind in Kind::ALL {
            let sets = self.touch(&mut state, &Scope::Site, kind, true);
            probe.counts.set(kind, sets.map_or(0, |s| s.count()));
        }
        let rooms: Vec<Room> = state.rooms.keys().cloned().collect();
        let online = rooms
            .into_iter()
            .filter(|room| self.counts(&mut state, &Scope::Room(room.clone())) != Counts::default())
            .count();
        probe.rooms = Some(online as u64);
        Ok(probe)
    }

    fn stats(&self) -> super::Stats {
        super::Stats {
            rotations: [0, 1].map(|k| self.rotations[k].load(Ordering::Relaxed)),
            ..super::Stats::default()
        }
    }

    async fn maintain(&self) -> Result<Maintenance, StoreError> {
        let mut state = self.state();
        let rooms_swept = self.drop_empty_rooms(&mut state);
        let mut last_seen_pruned = 0;
        if let Some(retention) = self.config.last_seen_retention {
            let cutoff = self
                .now_ms()
                .saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
            let before = state.last_seen.len();
            state.last_seen.retain(|_, at| *at >= cutoff);
            last_seen_pruned = (before - state.last_seen.len()) as u64;
        }
        Ok(Maintenance {
            rooms_swept,
            last_seen_pruned,
            more: false,
        })
    }

    async fn follow(&self, scope: &Scope) -> Result<mpsc::Receiver<Change>, StoreError> {
        let (sender, receiver) = mpsc::channel(FOLLOWER_BACKLOG);
        self.state().followers.insert(scope.clone(), sender);
        Ok(receiver)
    }

    async fn unfollow(&self, scope: &Scope) {
        // Only a follower that has gone: a newer one may have taken its place.
        let mut state = self.state();
        if state.followers.get(scope).is_some_and(mpsc::Sender::is_closed) {
            state.followers.remove(scope);
        }
    }

    async fn snapshot(&self, scope: &Scope, kind: Kind, n: usize) -> Result<Snapshot, StoreError> {
        let mut state = self.state();
        Ok(match self.touch(&mut state, scope, kind, false) {
            Some(sets) => {
                let page = sets.page(None, n);
                Snapshot {
                    seq: sets.seq,
                    total: page.total,
                    names: page.names,
                }
            }
            None => Snapshot::default(),
        })
    }

    async fn keep_watched(&self, scope: &Scope) -> Result<bool, StoreError> {
        let mut state = self.state();
        for kind in Kind::ALL {
            self.touch(&mut state, scope, kind, false);
        }
        // A follower hears every change from the moment it follows.
        Ok(true)
    }

    fn describe(&self) -> String {
        "in-memory store (one process only: replicas do not share it)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{GuestAddress, Username};

    const T: Duration = Duration::from_secs(60);

    fn store() -> MemoryStore {
        MemoryStore::new(MemoryStoreConfig {
            interval: T,
            last_seen_retention: Some(Duration::from_secs(3600)),
        })
    }

    fn users(names: &[&str]) -> Visitors {
        Visitors {
            users: names
                .iter()
                .map(|n| Username::parse((*n).to_owned()).expect("valid"))
                .collect(),
            guests: Vec::new(),
        }
    }

    fn room(name: &str) -> Scope {
        Scope::parse(name.to_owned()).expect("a valid room")
    }

    async fn users_page(store: &MemoryStore, scope: &Scope, after: Option<&str>, size: usize) -> KindPage {
        store.pages(scope, (after, size), (None, 0)).await.expect("pages").0
    }

    async fn listed(store: &MemoryStore, scope: &Scope) -> Vec<String> {
        users_page(store, scope, None, 1000).await.names
    }

    #[tokio::test(start_paused = true)]
    async fn a_name_is_listed_through_the_next_interval_and_gone_after() {
        let store = store();
        store
            .report(&Scope::Site, users(&["ada"]), Instant::now())
            .await
            .expect("stored");
        tokio::time::advance(T).await;
        assert_eq!(listed(&store, &Scope::Site).await, ["ada"]);
        tokio::time::advance(T).await;
        assert!(listed(&store, &Scope::Site).await.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_report_into_a_room_is_listed_in_the_room_and_on_the_site() {
        let store = store();
        store
            .report(&room("r"), users(&["ada"]), Instant::now())
            .await
            .expect("stored");
        assert_eq!(listed(&store, &room("r")).await, ["ada"]);
        assert_eq!(listed(&store, &Scope::Site).await, ["ada"]);
        assert!(listed(&store, &room("other")).await.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn leaving_the_site_leaves_every_room_and_leaving_a_room_only_that_room() {
        let store = store();
        store
            .report(&room("a"), users(&["ada", "bob"]), Instant::now())
            .await
            .expect("stored");
        store
            .report(&room("b"), users(&["ada"]), Instant::now())
            .await
            .expect("stored");
        store.leave(&room("a"), &users(&["bob"])).await.expect("left");
        assert_eq!(listed(&store, &room("a")).await, ["ada"]);
        assert_eq!(listed(&store, &Scope::Site).await, ["ada", "bob"]);
        store.leave(&Scope::Site, &users(&["ada"])).await.expect("left");
        assert!(listed(&store, &room("a")).await.is_empty());
        assert!(listed(&store, &room("b")).await.is_empty());
        assert_eq!(listed(&store, &Scope::Site).await, ["bob"]);
    }

    #[tokio::test(start_paused = true)]
    async fn pages_go_on_by_name_across_a_rotation() {
        let store = store();
        store
            .report(&Scope::Site, users(&["a", "b", "c", "d"]), Instant::now())
            .await
            .expect("stored");
        let first = users_page(&store, &Scope::Site, None, 2).await;
        assert_eq!(first.names, ["a", "b"]);
        tokio::time::advance(T).await;
        let second = users_page(&store, &Scope::Site, Some("b"), 2).await;
        assert_eq!(second.names, ["c", "d"]);
        assert_eq!(second.total, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn rooms_are_listed_busiest_first_and_empty_ones_are_dropped() {
        let store = store();
        store
            .report(&room("quiet"), users(&["a"]), Instant::now())
            .await
            .expect("stored");
        store
            .report(&room("busy"), users(&["a", "b"]), Instant::now())
            .await
            .expect("stored");
        let page = store.rooms(RoomOrder::MostOnline, None, 10).await.expect("lists");
        let names: Vec<&str> = page.rooms.iter().map(|r| r.room.as_str()).collect();
        assert_eq!(names, ["busy", "quiet"]);
        tokio::time::advance(2 * T).await;
        assert!(
            store
                .rooms(RoomOrder::Name, None, 10)
                .await
                .expect("lists")
                .rooms
                .is_empty()
        );
        store.maintain().await.expect("maintains");
        assert!(store.state().rooms.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_hears_joins_and_the_leaves_of_a_rotation() {
        let store = store();
        let mut changes = store.follow(&Scope::Site).await.expect("follows");
        let guest = Visitors {
            users: Vec::new(),
            guests: vec![GuestAddress::parse("10.0.0.1").expect("valid")],
        };
        store.report(&Scope::Site, guest, Instant::now()).await.expect("stored");
        let joined = changes.recv().await.expect("a change");
        assert!(matches!(
            joined,
            Change::Names {
                kind: Kind::Guests,
                joined: true,
                seq: 1,
                ..
            }
        ));
        tokio::time::advance(2 * T).await;
        store.keep_watched(&Scope::Site).await.expect("kept");
        let left = changes.recv().await.expect("a change");
        assert_eq!(
            left,
            Change::Names {
                kind: Kind::Guests,
                joined: false,
                seq: 2,
                names: vec!["10.0.0.1".into()]
            }
        );
    }
}
