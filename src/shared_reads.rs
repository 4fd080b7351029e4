//! Single-flight for reads that many callers ask at once (a "who's online"
//! box drawn on every page view asks the same first page thousands of times
//! a second), without ever answering from the past.
//!
//! The contract is that a name is listed once its report has returned OK. A
//! read that was already running when a caller asked may have started
//! before that caller's report landed, so its answer cannot be handed to
//! that caller. What can be shared is a read that *starts after* the caller
//! asked. So, per key:
//!
//! - nobody reading: the caller starts a read, and others may join it until
//!   it actually starts;
//! - a read running: the caller joins (or makes) the *next* read, which
//!   starts when the running one ends. Everyone who asks while a read runs
//!   shares that one next read, so there is at most one read running and
//!   one waiting per key, however many callers.
//!
//! A caller waits at most one read longer than alone, and Redis sees at most
//! two reads per key at a time instead of one per caller.
//!
//! Optionally ([`SharedReads::with_cache`]), an answer is kept and given
//! again for a stated age, counted from when its read *started*: that is an
//! answer from the past, which a site opts into (`PRESENCE_LIST_CACHE`).
//!
//! Reads are futures shared by whoever waits on them ([`Shared`]): if the
//! caller that made one goes away, any other waiter drives it, and a read
//! nobody waits on any more is driven by the next caller of its key.

use std::{
    collections::HashMap,
    future::Future,
    hash::Hash,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use tokio::time::Instant;

use crate::locks::lock;
use crate::store::StoreError;

/// The most answers kept by the opt-in cache. Keys are pages (a scope, a
/// kind, a cursor, a size), so a walk through a large list would otherwise
/// keep every page it saw.
const MAX_CACHED: usize = 4096;

/// What a read gives: errors are shared as one `Arc` by all who waited.
type Answer<T> = Result<T, Arc<StoreError>>;

/// Concurrent identical reads, shared as described in the module docs.
pub struct SharedReads<K, T> {
    state: Arc<Mutex<State<K, T>>>,
    cache_for: Option<Duration>,
}

struct State<K, T> {
    reads: HashMap<K, Pending<T>>,
    cached: HashMap<K, (Instant, T)>,
    next_id: u64,
}

/// The newest read of a key that has not landed yet.
struct Pending<T> {
    id: u64,
    /// Whether its Redis work has begun: from then on, a new caller may
    /// not join it.
    started: bool,
    read: Shared<BoxFuture<'static, Answer<T>>>,
}

impl<K, T> SharedReads<K, T>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    T: Clone + Send + Sync + 'static,
{
    pub fn new() -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                reads: HashMap::new(),
                cached: HashMap::new(),
                next_id: 0,
            })),
            cache_for: None,
        }
    }

    /// Gives answers again for up to `age` after their read started
    /// (`Duration::ZERO`: never, the default).
    pub fn with_cache(self, age: Duration) -> Self {
        Self {
            cache_for: (!age.is_zero()).then_some(age),
            ..self
        }
    }

    /// The answer for `key`: from a read that starts after this call began
    /// (shared with others who asked meanwhile), or from the cache if one
    /// is on and fresh. `read` is called only if this caller's read is the
    /// one that runs.
    pub async fn read<F, Fut>(&self, key: K, read: F) -> Result<T, StoreError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let shared = {
            let mut state = lock(&self.state);
            if let Some(age) = self.cache_for
                && let Some((taken, answer)) = state.cached.get(&key)
                && taken.elapsed() <= age
            {
                return Ok(answer.clone());
            }
            match state.reads.get(&key) {
                Some(pending) if !pending.started => pending.read.clone(),
                running => {
                    let before = running.map(|p| p.read.clone());
                    self.start(&mut state, key, before, read)
                }
            }
        };
        shared.await.map_err(StoreError::Shared)
    }

    /// Makes the next read of `key`: it waits for `before` (the running
    /// read, if any), marks itself started, reads, and lands its answer.
    fn start<F, Fut>(
        &self,
        state: &mut State<K, T>,
        key: K,
        before: Option<Shared<BoxFuture<'static, Answer<T>>>>,
        read: F,
    ) -> Shared<BoxFuture<'static, Answer<T>>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let id = state.next_id;
        state.next_id += 1;
        let weak: Weak<Mutex<State<K, T>>> = Arc::downgrade(&self.state);
        let cache_for = self.cache_for;
        let own_key = key.clone();
        let future = async move {
            if let Some(before) = before {
                // Its outcome is not ours: we only must not start before it ends.
                let _ = before.await;
            }
            if let Some(state) = weak.upgrade()
                && let Some(pending) = lock(&state).reads.get_mut(&own_key)
                && pending.id == id
            {
                pending.started = true;
            }
            let began = Instant::now();
            let answer = read().await.map_err(Arc::new);
            if let Some(state) = weak.upgrade() {
                let mut state = lock(&state);
                if state.reads.get(&own_key).is_some_and(|p| p.id == id) {
                    state.reads.remove(&own_key);
                }
                if let (Some(age), Ok(value)) = (cache_for, &answer) {
                    if state.cached.len() >= MAX_CACHED {
                        state.cached.retain(|_, (taken, _)| taken.elapsed() <= age);
                        if state.cached.len() >= MAX_CACHED {
                            state.cached.clear();
                        }
                    }
                    state.cached.insert(own_key, (began, value.clone()));
                }
            }
            answer
        }
        .boxed()
        .shared();
        state.reads.insert(
            key,
            Pending {
                id,
                started: false,
                read: future.clone(),
            },
        );
        future
    }
}

impl<K, T> Default for SharedReads<K, T>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    T: Clone + Send + Sync + 'static,
{
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use tokio::sync::Notify;

    use super::*;

    /// A read that counts how often it ran, gives the count it saw when it
    /// began, and ends only when let go.
    #[derive(Clone, Default)]
    struct Source {
        value: Arc<AtomicU64>,
        reads: Arc<AtomicU64>,
        release: Arc<Notify>,
        gated: bool,
    }

    impl Source {
        fn gated() -> Self {
            Self {
                gated: true,
                ..Self::default()
            }
        }

        fn read(&self) -> impl FnOnce() -> BoxFuture<'static, Result<u64, StoreError>> + Send + 'static {
            let this = self.clone();
            move || {
                async move {
                    this.reads.fetch_add(1, Ordering::SeqCst);
                    let seen = this.value.load(Ordering::SeqCst);
                    if this.gated {
                        this.release.notified().await;
                    }
                    Ok(seen)
                }
                .boxed()
            }
        }
    }

    async fn until(what: &str, check: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// A caller of `reads` for key "k", in a task of its own.
    fn spawn_read(
        reads: &Arc<SharedReads<&'static str, u64>>,
        source: &Source,
    ) -> tokio::task::JoinHandle<Result<u64, StoreError>> {
        let (reads, source) = (reads.clone(), source.clone());
        tokio::spawn(async move { reads.read("k", source.read()).await })
    }

    #[tokio::test]
    async fn a_lone_read_runs_once_and_gives_its_answer() {
        let reads = SharedReads::<&str, u64>::new();
        let source = Source::default();
        source.value.store(7, Ordering::SeqCst);
        assert_eq!(reads.read("k", source.read()).await.expect("answers"), 7);
        assert_eq!(source.reads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn callers_during_a_running_read_share_one_next_read_that_sees_what_came_before_them() {
        let reads = Arc::new(SharedReads::<&str, u64>::new());
        let source = Source::gated();
        let first = spawn_read(&reads, &source);
        until("the first read to run", || source.reads.load(Ordering::SeqCst) == 1).await;
        // A report lands after the first read began: those who ask now
        // must see it, so they cannot share the first read.
        source.value.store(1, Ordering::SeqCst);
        let asked = Arc::new(AtomicU64::new(0));
        let later: Vec<_> = (0..10)
            .map(|_| {
                let (reads, source, asked) = (reads.clone(), source.clone(), asked.clone());
                tokio::spawn(async move {
                    asked.fetch_add(1, Ordering::SeqCst);
                    reads.read("k", source.read()).await
                })
            })
            .collect();
        // One runtime thread: a caller that counted itself has also taken
        // its place (both happen in its first poll, before any await).
        until("the ten to ask", || asked.load(Ordering::SeqCst) == 10).await;
        source.release.notify_one();
        assert_eq!(first.await.expect("ends").expect("answers"), 0);
        until("the next read to run", || source.reads.load(Ordering::SeqCst) == 2).await;
        source.release.notify_one();
        for caller in later {
            assert_eq!(
                caller.await.expect("ends").expect("answers"),
                1,
                "an answer from the past"
            );
        }
        assert_eq!(source.reads.load(Ordering::SeqCst), 2, "ten callers, one shared read");
    }

    #[tokio::test]
    async fn different_keys_do_not_share() {
        let reads = SharedReads::<&str, u64>::new();
        let source = Source::default();
        reads.read("a", source.read()).await.expect("answers");
        reads.read("b", source.read()).await.expect("answers");
        reads.read("a", source.read()).await.expect("answers");
        assert_eq!(source.reads.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn without_a_cache_a_later_caller_always_reads_again() {
        let reads = SharedReads::<&str, u64>::new();
        let source = Source::default();
        reads.read("k", source.read()).await.expect("answers");
        source.value.store(5, Ordering::SeqCst);
        assert_eq!(reads.read("k", source.read()).await.expect("answers"), 5);
    }

    #[tokio::test]
    async fn an_error_reaches_everyone_who_shared_the_read_and_is_not_kept() {
        let reads = SharedReads::<&str, u64>::new().with_cache(Duration::from_secs(60));
        let failing = || async { Err(StoreError::Protocol("broken".into())) };
        let error = reads.read("k", failing).await.expect_err("fails");
        assert!(error.to_string().contains("broken"), "{error}");
        let source = Source::default();
        source.value.store(3, Ordering::SeqCst);
        assert_eq!(
            reads.read("k", source.read()).await.expect("answers"),
            3,
            "an error was cached"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_cache_answers_for_its_age_and_then_reads_again() {
        let reads = SharedReads::<&str, u64>::new().with_cache(Duration::from_secs(1));
        let source = Source::default();
        reads.read("k", source.read()).await.expect("answers");
        source.value.store(9, Ordering::SeqCst);
        tokio::time::advance(Duration::from_millis(900)).await;
        assert_eq!(
            reads.read("k", source.read()).await.expect("answers"),
            0,
            "within its age"
        );
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(
            reads.read("k", source.read()).await.expect("answers"),
            9,
            "past its age"
        );
        assert_eq!(source.reads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_read_whose_caller_went_away_is_finished_by_the_next_caller() {
        let reads = Arc::new(SharedReads::<&str, u64>::new());
        let source = Source::gated();
        let abandoned = spawn_read(&reads, &source);
        until("the read to run", || source.reads.load(Ordering::SeqCst) == 1).await;
        abandoned.abort();
        let _ = abandoned.await;
        let next = spawn_read(&reads, &source);
        // The abandoned read is driven to its end, then the new one runs.
        source.release.notify_one();
        until("the next read to run", || source.reads.load(Ordering::SeqCst) == 2).await;
        source.release.notify_one();
        next.await.expect("ends").expect("answers");
    }

    #[tokio::test]
    async fn the_cache_keeps_a_bounded_number_of_answers() {
        let reads = SharedReads::<u64, u64>::new().with_cache(Duration::from_secs(60));
        let source = Source::default();
        for key in 0..(MAX_CACHED as u64 + 10) {
            reads.read(key, source.read()).await.expect("answers");
        }
        assert!(lock(&reads.state).cached.len() <= MAX_CACHED);
    }
}
