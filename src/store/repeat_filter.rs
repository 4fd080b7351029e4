//! Skips the Redis work of reports that cannot change anything.
//!
//! Real traffic repeats itself: an active user is reported on every page
//! view. Once this replica has put a name into *current* in this interval,
//! reporting it again before the interval ends changes nothing (but last
//! seen, which may lag by its precision), so it needs no round trip.
//!
//! **When it may skip.** All of these must hold; each is a promise of the
//! README that the filter would otherwise break:
//! - *This interval.* The name was written in the interval Redis is in now,
//!   and the interval's end (on Redis's clock, as learnt by the health
//!   probe, less a margin for clock skew) has not come. A name written in an
//!   interval stays listed until the end of the next, so a report skipped
//!   before the end of the first is still listed for at least *T*.
//! - *Redis seen lately.* The replica's last ping came back less than
//!   [`FRESH_FOR`] ago (see `redis/bus.rs`): a frozen or unreachable Redis
//!   is never answered for from memory. Whenever that lapses, everything is
//!   forgotten.
//! - *Nothing forgotten since.* Every `Leave`, through any replica, makes
//!   every replica forget those names before the `Leave` returns; the probe
//!   forgets everything when a name written lately has vanished without an
//!   error (a flush, an eviction, a failover that lost writes); any failed
//!   Redis call forgets everything. A write only counts if nothing was
//!   forgotten between sending it and its answer (a generation check), so a
//!   write that raced a `Leave` is never trusted.
//! - *Last seen within its precision*, for site-wide users while last seen
//!   is on.
//!
//! Memory is bounded: names live in two generations of maps, and when the
//! young one is full the old one is dropped, so names seen often stay while
//! names seen once age out; nothing is ever rebuilt all at once.

use std::{
    collections::HashMap,
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use crate::domain::{Kind, Room, Scope, Visitors};

/// How long a ping that came back keeps the filter trusting Redis.
pub const FRESH_FOR: Duration = Duration::from_secs(1);

/// How long a replica stays registered as "may skip" after a ping: longer
/// than [`FRESH_FOR`], so that a `Leave` that waits for a replica's
/// registration to end knows that replica has stopped skipping.
pub const REGISTERED_FOR: Duration = Duration::from_millis(1500);

/// The most names remembered (both kinds, all scopes), in two generations.
pub const REMEMBERED: usize = 1 << 17;

/// Forgets everything, and answers whether to skip.
pub struct RepeatFilter {
    inner: Mutex<Inner>,
    /// Changes whenever what is remembered stops being trustworthy.
    generation: AtomicU64,
    /// Changes with every forgetting, even of a few names: a write in
    /// flight meanwhile may have raced it, so it is not remembered.
    forgets: AtomicU64,
    /// For site-wide users while last seen is on: how stale it may get.
    last_seen_precision: Option<Duration>,
    period: Duration,
    skipped: AtomicU64,
    checked: AtomicU64,
}

#[derive(Default)]
struct Inner {
    /// Until when the last ping that came back lets the filter skip.
    fresh_until: Option<Instant>,
    /// The interval Redis is in, as far as the probe knows.
    interval: Option<KnownInterval>,
    young: Names,
    old: Names,
    /// The latest site-wide write of each kind, for the probe to look for.
    latest: [Option<(String, u64, u64)>; 2],
}

#[derive(Debug, Clone, Copy)]
struct KnownInterval {
    /// Start, in Redis's Unix ms.
    start: u64,
    /// Local time before which Redis is surely still in it.
    safe_until: Instant,
}

#[derive(Default)]
struct Names {
    users: HashMap<String, Vec<Entry>>,
    guests: HashMap<String, Vec<Entry>>,
    entries: usize,
}

impl Names {
    fn of(&mut self, kind: Kind) -> &mut HashMap<String, Vec<Entry>> {
        match kind {
            Kind::Users => &mut self.users,
            Kind::Guests => &mut self.guests,
        }
    }

    fn get(&self, kind: Kind, name: &str) -> Option<&Vec<Entry>> {
        match kind {
            Kind::Users => self.users.get(name),
            Kind::Guests => self.guests.get(name),
        }
    }
}

/// One write the filter remembers: a name was put into *current* of this
/// scope, in this interval, at this generation.
#[derive(Debug, Clone)]
struct Entry {
    room: Option<Room>,
    generation: u64,
    interval: u64,
    written: Instant,
}

/// Taken before a write is sent; the write is remembered only if nothing
/// was forgotten in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    generation: u64,
    forgets: u64,
}

/// The interval each part of a batch was written in (Redis's Unix ms),
/// from the scripts' answers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    pub users: Option<u64>,
    pub guests: Option<u64>,
    pub rooms: HashMap<Room, u64>,
}

impl Written {
    fn site(&self, kind: Kind) -> Option<u64> {
        match kind {
            Kind::Users => self.users,
            Kind::Guests => self.guests,
        }
    }
}

impl RepeatFilter {
    pub fn new(period: Duration, last_seen_precision: Option<Duration>) -> Self {
        Self {
            inner: Mutex::default(),
            generation: AtomicU64::new(0),
            forgets: AtomicU64::new(0),
            last_seen_precision,
            period,
            skipped: AtomicU64::new(0),
            checked: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // What is remembered is only ever a hint; a poisoned lock is reset.
        self.inner.lock().unwrap_or_else(|poisoned| {
            let mut inner = poisoned.into_inner();
            *inner = Inner::default();
            inner
        })
    }

    /// Names this filter did and did not send, since the start.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.skipped.load(Ordering::Relaxed),
            self.checked.load(Ordering::Relaxed),
        )
    }

    pub fn ticket(&self) -> Ticket {
        Ticket {
            generation: self.generation.load(Ordering::Acquire),
            forgets: self.forgets.load(Ordering::Acquire),
        }
    }

    fn still(&self, ticket: Ticket) -> bool {
        self.generation.load(Ordering::Acquire) == ticket.generation
            && self.forgets.load(Ordering::Acquire) == ticket.forgets
    }

    /// Forgets everything, at once, without rebuilding anything: entries of
    /// an older generation no longer count.
    pub fn forget_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.forgets.fetch_add(1, Ordering::AcqRel);
    }

    /// Forgets these names in `scope` (the site: in every scope). Called
    /// before a `Leave` may return, on every replica.
    pub fn forget(&self, scope: &Scope, kind: Kind, names: &[&str]) {
        // First, so that a write answered from now on is not remembered.
        self.forgets.fetch_add(1, Ordering::AcqRel);
        let mut inner = self.lock();
        let Inner { young, old, .. } = &mut *inner;
        for generation in [young, old] {
            for name in names {
                let map = generation.of(kind);
                let Some(entries) = map.get_mut(*name) else { continue };
                let before = entries.len();
                match scope {
                    Scope::Site => entries.clear(),
                    Scope::Room(room) => entries.retain(|e| e.room.as_ref() != Some(room)),
                }
                let removed = before - entries.len();
                if entries.is_empty() {
                    map.remove(*name);
                }
                generation.entries -= removed;
            }
        }
    }

    /// A ping sent at `sent` came back: Redis answers and every
    /// invalidation sent before it has been applied. If trust had lapsed
    /// meanwhile, what is remembered may be stale, so it is forgotten.
    pub fn ping_returned(&self, sent: Instant) {
        let now = Instant::now();
        let mut inner = self.lock();
        if inner.fresh_until.is_none_or(|until| until <= now) {
            self.forget_all();
        }
        let until = sent + FRESH_FOR;
        if inner.fresh_until.is_none_or(|known| known < until) {
            inner.fresh_until = Some(until);
        }
    }

    /// The probe read Redis's clock: `redis_now` and the interval start,
    /// in Redis's ms, from a request sent at `sent`. A new interval means
    /// everything written before is in *old* now: forget it.
    pub fn interval_seen(&self, sent: Instant, redis_now: u64, start: u64) {
        let period = u64::try_from(self.period.as_millis()).unwrap_or(u64::MAX);
        // The script ran after `sent`, so the interval's end comes no sooner
        // than this, locally; less a margin for clocks of other nodes.
        let left = Duration::from_millis((start + period).saturating_sub(redis_now));
        let margin = (self.period / 4).min(Duration::from_millis(250));
        let safe_until = (sent + left).checked_sub(margin).unwrap_or(sent);
        let mut inner = self.lock();
        match inner.interval {
            Some(known) if known.start == start => {
                if safe_until < known.safe_until {
                    inner.interval = Some(KnownInterval { start, safe_until });
                }
            }
            Some(known) if known.start > start => {}
            _ => {
                self.forget_all();
                inner.interval = Some(KnownInterval { start, safe_until });
            }
        }
    }

    /// A name written lately in the site's *current* of `kind`, for the
    /// probe to look for: if it has vanished, so may have others.
    pub fn sample(&self, kind: Kind) -> Option<String> {
        let generation = self.generation.load(Ordering::Acquire);
        let inner = self.lock();
        let interval = inner.interval?.start;
        match &inner.latest[kind as usize] {
            Some((name, g, i)) if *g == generation && *i == interval => Some(name.clone()),
            _ => None,
        }
    }

    /// The visitors whose report must still go to Redis.
    pub fn unknown(&self, scope: &Scope, visitors: Visitors) -> Visitors {
        let checked = visitors.len() as u64;
        self.checked.fetch_add(checked, Ordering::Relaxed);
        let now = Instant::now();
        let generation = self.generation.load(Ordering::Acquire);
        let inner = self.lock();
        let interval = match inner.interval {
            Some(known) if now < known.safe_until && inner.fresh_until.is_some_and(|until| now < until) => known.start,
            _ => return visitors,
        };
        let room = scope.room();
        let known = |kind: Kind, name: &str| {
            let precision = match (kind, room) {
                (Kind::Users, None) => self.last_seen_precision,
                _ => None,
            };
            [&inner.young, &inner.old].iter().any(|names| {
                names.get(kind, name).is_some_and(|entries| {
                    entries.iter().any(|e| {
                        e.room.as_ref() == room
                            && e.generation == generation
                            && e.interval == interval
                            && precision.is_none_or(|p| now.saturating_duration_since(e.written) < p)
                    })
                })
            })
        };
        let fresh = Visitors {
            users: visitors
                .users
                .into_iter()
                .filter(|u| !known(Kind::Users, u.as_str()))
                .collect(),
            guests: visitors
                .guests
                .into_iter()
                .filter(|g| !known(Kind::Guests, g.as_str()))
                .collect(),
        };
        self.skipped.fetch_add(checked - fresh.len() as u64, Ordering::Relaxed);
        fresh
    }

    /// Remembers a write that Redis answered, if nothing was forgotten
    /// since `ticket` and it landed in the interval the filter knows.
    pub fn remember(&self, scope: &Scope, visitors: &Visitors, written: &Written, ticket: Ticket) {
        let generation = ticket.generation;
        if !self.still(ticket) {
            return;
        }
        let now = Instant::now();
        let mut inner = self.lock();
        // Checked again under the lock: a forget may have come meanwhile.
        let Some(known) = inner.interval.map(|known| known.start) else {
            return;
        };
        if !self.still(ticket) {
            return;
        }
        for kind in Kind::ALL {
            let names = visitors.names(kind);
            // Both parts of a room report (the site's and the room's) must
            // have landed in the interval the filter knows.
            let landed = match scope {
                Scope::Site => written.site(kind),
                Scope::Room(room) => written.site(kind).filter(|s| written.rooms.get(room) == Some(s)),
            };
            if names.is_empty() || landed != Some(known) {
                continue;
            }
            if scope == &Scope::Site
                && let Some(name) = names.last()
            {
                inner.latest[kind as usize] = Some(((*name).to_owned(), generation, known));
            }
            for name in names {
                if inner.young.entries >= REMEMBERED / 2 {
                    // Names seen often are back in the young generation by
                    // now; those seen once go with the old one.
                    inner.old = std::mem::take(&mut inner.young);
                }
                let entry = Entry {
                    room: scope.room().cloned(),
                    generation,
                    interval: known,
                    written: now,
                };
                let young = &mut inner.young;
                let entries = young.of(kind).entry(name.to_owned()).or_default();
                match entries.iter_mut().find(|e| e.room == entry.room) {
                    Some(existing) => *existing = entry,
                    None => {
                        entries.push(entry);
                        young.entries += 1;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Username;

    const T: Duration = Duration::from_secs(60);
    // A multiple of T, as an interval start is.
    const START: u64 = 1_800_000_000_000;

    fn users(names: &[&str]) -> Visitors {
        Visitors {
            users: names
                .iter()
                .map(|n| Username::parse((*n).into()).expect("valid"))
                .collect(),
            guests: Vec::new(),
        }
    }

    fn room(name: &str) -> Scope {
        Scope::parse(name.into()).expect("a room")
    }

    /// A filter that trusts Redis: it knows the interval and a ping came back.
    fn trusting() -> RepeatFilter {
        let filter = RepeatFilter::new(T, None);
        filter.interval_seen(Instant::now(), START, START);
        filter.ping_returned(Instant::now());
        filter
    }

    fn write(filter: &RepeatFilter, scope: &Scope, names: &[&str]) {
        let ticket = filter.ticket();
        let mut written = Written {
            users: Some(START),
            ..Written::default()
        };
        if let Some(room) = scope.room() {
            written.rooms.insert(room.clone(), START);
        }
        filter.remember(scope, &users(names), &written, ticket);
    }

    fn sent(filter: &RepeatFilter, scope: &Scope, names: &[&str]) -> Vec<String> {
        filter
            .unknown(scope, users(names))
            .users
            .iter()
            .map(|u| u.as_str().to_owned())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_skipped_before_the_interval_and_a_ping_are_known() {
        let filter = RepeatFilter::new(T, None);
        write(&filter, &Scope::Site, &["ada"]);
        assert_eq!(sent(&filter, &Scope::Site, &["ada"]), ["ada"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_repeat_in_the_same_interval_and_scope_is_skipped() {
        let filter = trusting();
        write(&filter, &Scope::Site, &["ada"]);
        assert!(sent(&filter, &Scope::Site, &["ada"]).is_empty());
        assert_eq!(sent(&filter, &room("r"), &["ada"]), ["ada"], "another scope");
        assert_eq!(filter.counts(), (1, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_recent_ping_every_report_goes_to_redis() {
        let filter = trusting();
        write(&filter, &Scope::Site, &["ada"]);
        tokio::time::advance(FRESH_FOR).await;
        assert_eq!(sent(&filter, &Scope::Site, &["ada"]), ["ada"]);
        // And once trust comes back, what was remembered is gone.
        filter.ping_returned(Instant::now());
        assert_eq!(sent(&filter, &Scope::Site, &["ada"]), ["ada"]);
    }

    #[tokio::test(start_paused = true)]
    async fn near_the_end_of_the_interval_nothing_is_skipped() {
        let filter = trusting();
        write(&filter, &Scope::Site, &["ada"]);
        tokio::time::advance(T - Duration::from_millis(200)).await;
        filter.ping_returned(Instant::now());
        assert_eq!(sent(&filter, &Scope::Site, &["ada"]), ["ada"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_interval_forgets_what_was_written_in_the_last() {
        let filter = trusting();
        write(&filter, &Scope::Site, &["ada"]);
        filter.interval_seen(Instant::now(), START + 60_000, START + 60_000);
        assert_eq!(sent(&filter, &Scope::Site, &["ada"]), ["ada"]);
    }

    #[tokio::test(start_paused = true)]
    async fn leaving_a_room_forgets_that_room_and_leaving_the_site_forgets_every_scope() {
        let filter = trusting();
        for scope in [Scope::Site, room("a"), room("b")] {
            write(&filter, &scope, &["ada"]);
        }
        filter.forget(&room("a"), Kind::Users, &["ada"]);
        assert_eq!(sent(&filter, &room("a"), &["ada"]), ["ada"]);
        assert!(sent(&filter, &room("b"), &["ada"]).is_empty());
        filter.forget(&Scope::Site, Kind::Users, &["ada"]);
        assert_eq!(sent(&filter, &room("b"), &["ada"]), ["ada"]);
        assert_eq!(sent(&filter, &Scope::Site, &["ada"]), ["ada"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_raced_a_forget_is_not_remembered() {
        let filter = trusting();
        let ticket = filter.ticket();
        filter.forget(&Scope::Site, Kind::Users, &["bob"]);
        let written = Written {
            users: Some(START),
            ..Written::default()
        };
        filter.remember(&Scope::Site, &users(&["ada"]), &written, ticket);
        assert_eq!(sent(&filter, &Scope::Site, &["ada"]), ["ada"]);
    }

    #[tokio::test(start_paused = true)]
    async fn last_seen_is_refreshed_once_per_precision() {
        let filter = RepeatFilter::new(T, Some(Duration::from_secs(10)));
        filter.interval_seen(Instant::now(), START, START);
        filter.ping_returned(Instant::now());
        write(&filter, &Scope::Site, &["ada"]);
        assert!(sent(&filter, &Scope::Site, &["ada"]).is_empty());
        tokio::time::advance(Duration::from_secs(10)).await;
        filter.ping_returned(Instant::now());
        assert_eq!(sent(&filter, &Scope::Site, &["ada"]), ["ada"]);
    }

    #[tokio::test(start_paused = true)]
    async fn when_full_names_seen_often_stay_and_the_rest_age_out() {
        let filter = trusting();
        write(&filter, &Scope::Site, &["regular"]);
        for i in 0..REMEMBERED {
            write(&filter, &Scope::Site, &[&format!("once{i}")]);
            if i % 1000 == 0 {
                write(&filter, &Scope::Site, &["regular"]);
            }
        }
        assert!(sent(&filter, &Scope::Site, &["regular"]).is_empty());
        assert_eq!(sent(&filter, &Scope::Site, &["once0"]), ["once0"]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_sample_is_the_latest_site_write() {
        let filter = trusting();
        write(&filter, &Scope::Site, &["first"]);
        tokio::time::advance(Duration::from_millis(5)).await;
        write(&filter, &Scope::Site, &["second"]);
        write(&filter, &room("r"), &["in-a-room"]);
        assert_eq!(filter.sample(Kind::Users).as_deref(), Some("second"));
    }
}
