use std::{
    collections::HashSet,
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use tokio::time::Instant;

use super::{Rotation, Store, StoreError};
use crate::domain::{ListLimit, Online, Visitors};
use crate::keyspace::Kind;

/// The most names remembered per kind; the bound keeps memory flat however
/// many people are online. When it is reached the filter starts over: the
/// names that are reported often are back after their next report, while
/// names seen once (the many that filled it) are gone.
pub const REMEMBERED_PER_KIND: usize = 1 << 17;

/// Skips the Redis work of reports that cannot change anything.
///
/// Real traffic repeats itself: an active user is reported on every page
/// view. Once this replica has put a name into *current*, reporting it again
/// before the next rotation changes nothing, so it needs no round trip.
///
/// **Why it is safe.** The tick tells this filter when each kind's rotation
/// lease ends, and no replica can rotate before then. A name written during
/// the lease is in *current* until the next rotation and stays listed one
/// interval after that, so a report skipped at any moment before the lease
/// ends is still listed for at least one interval: the contract holds. The
/// filter forgets everything at each new lease, when its estimate of the
/// lease's end has passed, and on any store error (Redis may have restarted
/// empty). Replicas need no coordination: each trusts only the shared lease.
///
/// What it cannot see: someone deleting the keys or the lease by hand
/// without Redis failing. Then a remembered name may go unlisted until the
/// lease this replica knows of ends (at most one interval).
pub struct RepeatFilter<S> {
    inner: S,
    users: Mutex<Remembered>,
    guests: Mutex<Remembered>,
    skipped: AtomicU64,
}

/// What one kind's filter knows.
#[derive(Debug, Default)]
struct Remembered {
    /// Bumped whenever what is remembered stops being true.
    generation: u64,
    /// No rotation can happen before this: the known lease lasts until then.
    safe_until: Option<Instant>,
    /// Names put into *current* since the lease began.
    names: HashSet<String>,
}

impl Remembered {
    fn holds_at(&self, now: Instant) -> bool {
        self.safe_until.is_some_and(|until| now < until)
    }

    fn forget(&mut self) {
        self.generation += 1;
        self.safe_until = None;
        self.names.clear();
    }

    /// Learns that the kind's lease ends no sooner than `ends`. An end an
    /// interval later than the one known means a new lease: a rotation.
    fn learn_lease(&mut self, ends: Instant, interval: Duration) {
        match self.safe_until {
            Some(known) if ends < known + interval / 2 => self.safe_until = Some(known.min(ends)),
            _ => {
                self.forget();
                self.safe_until = Some(ends);
            }
        }
    }
}

impl<S: Store> RepeatFilter<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            users: Mutex::default(),
            guests: Mutex::default(),
            skipped: AtomicU64::new(0),
        }
    }

    /// How many names were not sent to the store, since the start.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    fn remembered(&self, kind: Kind) -> MutexGuard<'_, Remembered> {
        let lock = match kind {
            Kind::Users => &self.users,
            Kind::Guests => &self.guests,
        };
        // What is remembered is only ever a hint; a poisoned lock is reset.
        lock.lock().unwrap_or_else(|poisoned| {
            let mut remembered = poisoned.into_inner();
            remembered.forget();
            remembered
        })
    }

    fn forget_all(&self) {
        for kind in Kind::ALL {
            self.remembered(kind).forget();
        }
    }

    /// The names of `kind` not known to be in *current*, and the
    /// generation that knowledge belongs to.
    fn unknown<T: AsRef<str> + Clone>(&self, kind: Kind, names: &[T], now: Instant) -> (Vec<T>, u64) {
        let remembered = self.remembered(kind);
        let fresh = if remembered.holds_at(now) {
            names
                .iter()
                .filter(|name| !remembered.names.contains(name.as_ref()))
                .cloned()
                .collect()
        } else {
            names.to_vec()
        };
        (fresh, remembered.generation)
    }

    fn remember<T: AsRef<str>>(&self, kind: Kind, names: &[T], generation: u64, now: Instant) {
        let mut remembered = self.remembered(kind);
        if remembered.generation != generation || !remembered.holds_at(now) {
            return;
        }
        for name in names {
            if remembered.names.len() >= REMEMBERED_PER_KIND {
                remembered.names.clear();
            }
            remembered.names.insert(name.as_ref().to_owned());
        }
    }
}

#[async_trait]
impl<S: Store> Store for RepeatFilter<S> {
    async fn report(&self, visitors: &Visitors) -> Result<(), StoreError> {
        let now = Instant::now();
        let (users, users_generation) = self.unknown(Kind::Users, &visitors.users, now);
        let (guests, guests_generation) = self.unknown(Kind::Guests, &visitors.guests, now);
        let fresh = Visitors { users, guests };
        let skipped = visitors.users.len() + visitors.guests.len() - fresh.users.len() - fresh.guests.len();
        self.skipped.fetch_add(skipped as u64, Ordering::Relaxed);
        if fresh.is_empty() {
            return Ok(());
        }
        match self.inner.report(&fresh).await {
            Ok(()) => {
                // Remembered only if the write surely landed before the
                // lease ended: it did if its answer came back before.
                let answered = Instant::now();
                self.remember(Kind::Users, &fresh.users, users_generation, answered);
                self.remember(Kind::Guests, &fresh.guests, guests_generation, answered);
                Ok(())
            }
            Err(error) => {
                self.forget_all();
                Err(error)
            }
        }
    }

    async fn list_online(&self, limit: ListLimit) -> Result<Online, StoreError> {
        let result = self.inner.list_online(limit).await;
        if result.is_err() {
            self.forget_all();
        }
        result
    }

    async fn rotate_if_due(&self, interval: Duration) -> Result<Rotation, StoreError> {
        // The lease's remaining time is measured by Redis after this; the
        // end estimated from this instant is never later than the real one.
        let sent = Instant::now();
        let result = self.inner.rotate_if_due(interval).await;
        match &result {
            Ok(rotation) => {
                for kind in &rotation.kinds {
                    self.remembered(kind.kind)
                        .learn_lease(sent + kind.next_due_in, interval);
                }
            }
            Err(_) => self.forget_all(),
        }
        result
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Username;
    use crate::store::MemoryStore;

    const T: Duration = Duration::from_secs(60);

    fn user(name: &str) -> Visitors {
        Visitors {
            users: vec![Username::parse(name.to_owned()).expect("a valid name")],
            guests: Vec::new(),
        }
    }

    async fn report(filter: &RepeatFilter<MemoryStore>, name: &str) {
        filter.report(&user(name)).await.expect("the memory store answers");
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_skipped_before_a_lease_is_known() {
        let filter = RepeatFilter::new(MemoryStore::new());
        report(&filter, "ada").await;
        report(&filter, "ada").await;
        assert_eq!(filter.skipped(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_repeat_during_the_lease_is_skipped_and_the_name_stays_listed() {
        let filter = RepeatFilter::new(MemoryStore::new());
        filter.rotate_if_due(T).await.expect("rotates");
        report(&filter, "ada").await;
        report(&filter, "ada").await;
        report(&filter, "bob").await;
        assert_eq!(filter.skipped(), 1);
        let online = filter.list_online(None).await.expect("lists");
        assert_eq!(online.users.names, ["ada", "bob"]);
    }

    #[tokio::test(start_paused = true)]
    async fn once_the_lease_has_ended_a_repeat_goes_to_the_store_again() {
        let filter = RepeatFilter::new(MemoryStore::new());
        filter.rotate_if_due(T).await.expect("rotates");
        report(&filter, "ada").await;
        tokio::time::advance(T).await;
        report(&filter, "ada").await;
        assert_eq!(filter.skipped(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_lease_forgets_the_names_of_the_last() {
        let filter = RepeatFilter::new(MemoryStore::new());
        filter.rotate_if_due(T).await.expect("rotates");
        report(&filter, "ada").await;
        tokio::time::advance(T).await;
        let rotation = filter.rotate_if_due(T).await.expect("rotates");
        assert!(rotation.kinds.iter().all(|k| k.rotated));
        report(&filter, "ada").await;
        assert_eq!(
            filter.skipped(),
            0,
            "ada is in old now: the report must move her to current"
        );
        report(&filter, "ada").await;
        assert_eq!(filter.skipped(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn seeing_the_same_lease_again_keeps_what_is_remembered() {
        let filter = RepeatFilter::new(MemoryStore::new());
        filter.rotate_if_due(T).await.expect("rotates");
        report(&filter, "ada").await;
        tokio::time::advance(T / 3).await;
        let rotation = filter.rotate_if_due(T).await.expect("answers");
        assert!(rotation.kinds.iter().all(|k| !k.rotated));
        report(&filter, "ada").await;
        assert_eq!(filter.skipped(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn when_full_it_starts_over_so_new_regulars_are_remembered() {
        let filter = RepeatFilter::new(MemoryStore::new());
        filter.rotate_if_due(T).await.expect("rotates");
        for i in 0..REMEMBERED_PER_KIND {
            report(&filter, &format!("once{i}")).await;
        }
        report(&filter, "regular").await;
        report(&filter, "regular").await;
        assert_eq!(filter.skipped(), 1);
    }

    #[test]
    fn the_lease_estimate_only_ever_moves_earlier_within_one_lease() {
        let mut remembered = Remembered::default();
        let start = Instant::now();
        remembered.learn_lease(start + T, T);
        remembered.learn_lease(start + T + Duration::from_millis(3), T);
        assert_eq!(remembered.safe_until, Some(start + T));
        let generation = remembered.generation;
        remembered.learn_lease(start + 2 * T, T);
        assert_eq!(remembered.generation, generation + 1);
    }
}
