use std::{
    collections::BTreeSet,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use async_trait::async_trait;
use tokio::time::Instant;

use super::{KindRotation, Rotation, Store, StoreError, merge_sorted};
use crate::domain::{ListLimit, Online, OnlineList, Visitors};
use crate::keyspace::Kind;

/// The in-memory store: the same two-set algorithm as Redis, in one process.
///
/// A std mutex, not a tokio one: no lock is held across an `.await`, and
/// each critical section is a few set operations. A rotation moves the
/// stale set out and drops it after the lock is released, so a large drop
/// never blocks reporters.
#[derive(Debug, Default)]
pub struct MemoryStore {
    users: Mutex<Sets>,
    guests: Mutex<Sets>,
}

/// One kind's sets. `current` and `old` are kept disjoint, as in Redis.
#[derive(Debug, Default)]
struct Sets {
    current: BTreeSet<String>,
    old: BTreeSet<String>,
    last_rotation: Option<Instant>,
}

impl Sets {
    fn report(&mut self, name: &str) {
        if !self.current.contains(name) {
            self.old.remove(name);
            self.current.insert(name.to_owned());
        }
    }

    fn list(&self, limit: ListLimit) -> OnlineList {
        let take = limit.map_or(usize::MAX, |l| l.get());
        let current = self.current.iter().take(take).cloned().collect();
        let old = self.old.iter().take(take).cloned().collect();
        OnlineList {
            names: merge_sorted(current, old, limit),
            total: (self.current.len() + self.old.len()) as u64,
        }
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn sets(&self, kind: Kind) -> MutexGuard<'_, Sets> {
        let lock = match kind {
            Kind::Users => &self.users,
            Kind::Guests => &self.guests,
        };
        // A panic while holding the lock cannot leave the sets half-updated
        // in a way that matters for presence, so a poisoned lock is used as is.
        lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn report(&self, visitors: &Visitors) -> Result<(), StoreError> {
        if !visitors.users.is_empty() {
            let mut sets = self.sets(Kind::Users);
            visitors.users.iter().for_each(|u| sets.report(u.as_str()));
        }
        if !visitors.guests.is_empty() {
            let mut sets = self.sets(Kind::Guests);
            visitors.guests.iter().for_each(|g| sets.report(g.as_str()));
        }
        Ok(())
    }

    async fn list_online(&self, limit: ListLimit) -> Result<Online, StoreError> {
        Ok(Online {
            users: self.sets(Kind::Users).list(limit),
            guests: self.sets(Kind::Guests).list(limit),
        })
    }

    async fn rotate_if_due(&self, interval: Duration) -> Result<Rotation, StoreError> {
        let now = Instant::now();
        let mut kinds = Vec::with_capacity(Kind::ALL.len());
        for kind in Kind::ALL {
            let mut sets = self.sets(kind);
            let since = sets.last_rotation.map(|at| now.saturating_duration_since(at));
            if let Some(since) = since.filter(|since| *since < interval) {
                kinds.push(KindRotation {
                    kind,
                    rotated: false,
                    next_due_in: interval - since,
                });
                continue;
            }
            sets.last_rotation = Some(now);
            let current = std::mem::take(&mut sets.current);
            let stale = std::mem::replace(&mut sets.old, current);
            drop(sets);
            drop(stale);
            kinds.push(KindRotation {
                kind,
                rotated: true,
                next_due_in: interval,
            });
        }
        Ok(Rotation { kinds })
    }

    fn describe(&self) -> String {
        "in-memory store (one process only: replicas do not share it)".to_owned()
    }
}
