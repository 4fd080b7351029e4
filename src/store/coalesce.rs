//! The report queue: turns many concurrent reports into few Redis calls,
//! and pushes back when Redis cannot keep up.
//!
//! Under load, many callers report at once, each one name. Sent one by one,
//! each costs a script call in Redis and a round trip; the Redis side, not
//! gRPC, becomes the limit. Here reports queue for a moment while a call is
//! in flight and go out together in the next one: Redis runs one script for
//! tens of names, and a lone report still goes out at once.
//!
//! Overload must not feed itself, so:
//! - the queue is bounded by names, by what Redis can drain within half the
//!   Redis timeout at the pace it has recently kept (see [`Pace`]), and by
//!   memory: when it is full, a report is refused at once
//!   ([`StoreError::Overloaded`]), never queued for longer than the caller
//!   would wait;
//! - work whose caller has gone (deadline passed, call cancelled) is dropped
//!   before it reaches Redis;
//! - a report that timed out waiting is [`StoreError::Expired`], which is
//!   not a Redis failure: it does not empty the repeat filter or flip health.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
};
use std::time::Duration;

use async_trait::async_trait;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot},
    time::Instant,
};

use super::StoreError;
use super::repeat_filter::Written;
use crate::domain::{Scope, Visitors};
use crate::traces;

/// The most names one coalesced call carries. Bounded so that one script
/// call stays short on the Redis side (it runs atomically) and within Lua's
/// limit on `unpack`.
pub const MAX_NAMES_PER_CALL: usize = 1000;

/// The queue always takes this many names (64 full `ReportBatch` calls),
/// whatever the pace: what it holds before it has seen any call end, so a
/// burst of full batches from a few dozen callers at start is not refused.
/// At the pace batches run on a small machine (300k-500k names a second)
/// that is 130-220 ms of Redis work, under the default 500 ms timeout.
pub const QUEUE_FLOOR_NAMES: usize = 65_536;

/// The queue never holds more names than this, however fast Redis drains
/// it: a bound on memory (about 20 MB of names).
pub const QUEUE_CEILING_NAMES: usize = 262_144;

/// The pace is trusted only while calls keep ending: a Redis that stopped
/// answering drains nothing, whatever it did before.
const PACE_FRESH_FOR: Duration = Duration::from_secs(1);

/// Sends one coalesced batch to the store.
#[async_trait]
pub trait SendBatch: Send + Sync + 'static {
    async fn send(&self, batch: &[(Scope, Visitors)]) -> Result<Written, StoreError>;
}

pub struct ReportQueue {
    queue: mpsc::UnboundedSender<Waiting>,
    queued: Arc<AtomicUsize>,
    pace: Arc<Pace>,
    /// How long one call to the store may take: a caller whose report
    /// was sent and is still waiting past its deadline is waiting on the
    /// store, not on the queue.
    timeout: Duration,
}

struct Waiting {
    scope: Scope,
    visitors: Visitors,
    deadline: Instant,
    /// Set once the report is in a call to the store.
    sent: Arc<AtomicBool>,
    done: oneshot::Sender<Result<Arc<Written>, Arc<StoreError>>>,
    /// Its caller's traced call, if traces are on.
    caller: traces::Caller,
}

impl Waiting {
    fn names(&self) -> usize {
        self.visitors.len()
    }

    /// Whether anyone still waits for this: the call is not cancelled and
    /// its deadline has not passed.
    fn wanted(&self, now: Instant) -> bool {
        !self.done.is_closed() && now < self.deadline
    }
}

impl ReportQueue {
    /// `in_flight` is how many coalesced calls may be outstanding at once
    /// (about the number of Redis connections).
    pub fn new(sender: Arc<dyn SendBatch>, in_flight: usize, timeout: Duration) -> Self {
        let (queue, waiting) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let pace = Arc::new(Pace::new(in_flight.max(1)));
        tokio::spawn(dispatch(
            sender,
            waiting,
            Arc::new(Semaphore::new(in_flight.max(1))),
            queued.clone(),
            pace.clone(),
        ));
        Self {
            queue,
            queued,
            pace,
            timeout,
        }
    }

    /// How many names may wait now: what Redis drains in half the timeout
    /// at its recent pace (the other half is for the call itself), between
    /// the floor and the ceiling.
    pub fn capacity(&self) -> usize {
        let drained = self
            .pace
            .names_per_sec()
            .map_or(0.0, |rate| rate * self.timeout.as_secs_f64() / 2.0);
        (drained as usize).clamp(QUEUE_FLOOR_NAMES, QUEUE_CEILING_NAMES)
    }

    /// Names waiting now, for the gauge.
    pub fn depth(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Queues one caller's report and waits for the call that carries it,
    /// until `deadline` at the latest.
    pub async fn report(
        &self,
        scope: Scope,
        visitors: Visitors,
        deadline: Instant,
    ) -> Result<Arc<Written>, StoreError> {
        let names = visitors.len();
        let before = self.queued.fetch_add(names, Ordering::AcqRel);
        if before + names > self.capacity() && before > 0 {
            self.queued.fetch_sub(names, Ordering::AcqRel);
            return Err(StoreError::Overloaded);
        }
        let (done, outcome) = oneshot::channel();
        let sent = Arc::new(AtomicBool::new(false));
        let waiting = Waiting {
            scope,
            visitors,
            deadline,
            sent: sent.clone(),
            done,
            caller: traces::Caller::current(),
        };
        if self.queue.send(waiting).is_err() {
            self.queued.fetch_sub(names, Ordering::AcqRel);
            return Err(StoreError::QueueClosed);
        }
        match tokio::time::timeout_at(deadline, outcome).await {
            Ok(Ok(Ok(written))) => Ok(written),
            Ok(Ok(Err(shared))) => Err(StoreError::Shared(shared)),
            Ok(Err(_)) => Err(StoreError::QueueClosed),
            // Still in the queue: the service is behind. In a call: the
            // store is slow.
            Err(_) if sent.load(Ordering::Acquire) => Err(StoreError::Timeout(self.timeout)),
            Err(_) => Err(StoreError::Expired),
        }
    }
}

/// Collects what is waiting into calls, and sends each call as soon as a
/// slot is free. Ends when the queue's handle is gone.
async fn dispatch(
    sender: Arc<dyn SendBatch>,
    mut waiting: mpsc::UnboundedReceiver<Waiting>,
    slots: Arc<Semaphore>,
    queued: Arc<AtomicUsize>,
    pace: Arc<Pace>,
) {
    let mut carried = None;
    loop {
        let first = match carried.take() {
            Some(first) => first,
            None => match waiting.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        // Wait for a free slot first: meanwhile more reports queue up and
        // join this call. That is what makes the calls grow with the load.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let now = Instant::now();
        let mut batch = Vec::new();
        let mut names = 0;
        let mut next = Some(first);
        while let Some(item) = next.take() {
            queued.fetch_sub(item.names(), Ordering::AcqRel);
            if !item.wanted(now) {
                // Its caller has gone: it goes no further.
                let _ = item.done.send(Err(Arc::new(StoreError::Expired)));
            } else if names > 0 && names + item.names() > MAX_NAMES_PER_CALL {
                // Never split one caller's report: it starts the next call.
                queued.fetch_add(item.names(), Ordering::AcqRel);
                carried = Some(item);
                break;
            } else {
                names += item.names();
                item.sent.store(true, Ordering::Release);
                batch.push(item);
            }
            if names < MAX_NAMES_PER_CALL {
                next = waiting.try_recv().ok();
            }
        }
        if batch.is_empty() {
            continue;
        }
        send(sender.clone(), batch, names, slot, pace.clone());
    }
}

fn send(sender: Arc<dyn SendBatch>, batch: Vec<Waiting>, names: usize, slot: OwnedSemaphorePermit, pace: Arc<Pace>) {
    tokio::spawn(async move {
        let began = Instant::now();
        let mut reports = Vec::with_capacity(batch.len());
        let mut callers = Vec::with_capacity(batch.len());
        let mut traced = traces::Callers::default();
        for waiting in batch {
            reports.push((waiting.scope, waiting.visitors));
            callers.push(waiting.done);
            traced.push(waiting.caller);
        }
        let sent = traces::report_batch(traced, sender.send(&reports));
        let outcome = sent.await.map(Arc::new).map_err(Arc::new);
        if outcome.is_ok() {
            pace.ended(names, began.elapsed());
        }
        drop(slot);
        for caller in callers {
            let _ = caller.send(outcome.clone());
        }
    });
}

/// How fast the store has been draining the queue lately: an average of
/// the names per second of the calls that ended, times the calls that may
/// be in flight at once. It matters only when the queue is long, and then
/// every slot is busy with full calls, so the product is Redis's pace.
struct Pace {
    in_flight: usize,
    /// Names per second, as `f64` bits; 0 until a call has ended.
    rate: AtomicU64,
    /// When a call last ended, in ms since `epoch`.
    last_ended_ms: AtomicU64,
    epoch: Instant,
}

impl Pace {
    fn new(in_flight: usize) -> Self {
        Self {
            in_flight,
            rate: AtomicU64::new(0),
            last_ended_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// A call that carried `names` ended after `took`. Races between
    /// concurrent ends lose a sample, which an average can spare.
    fn ended(&self, names: usize, took: Duration) {
        let sample = names as f64 / took.as_secs_f64().max(1e-6) * self.in_flight as f64;
        let old = f64::from_bits(self.rate.load(Ordering::Relaxed));
        let new = if old == 0.0 {
            sample
        } else {
            old * 0.875 + sample * 0.125
        };
        self.rate.store(new.to_bits(), Ordering::Relaxed);
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ended_ms.store(now.max(1), Ordering::Relaxed);
    }

    /// The recent pace, if a call ended within [`PACE_FRESH_FOR`].
    fn names_per_sec(&self) -> Option<f64> {
        let last = self.last_ended_ms.load(Ordering::Relaxed);
        let since = self.epoch.elapsed().saturating_sub(Duration::from_millis(last));
        (last > 0 && since <= PACE_FRESH_FOR).then(|| f64::from_bits(self.rate.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Username;
    use std::sync::Mutex;

    /// Records what it was sent; each call takes `delay`.
    struct Recorder {
        calls: Mutex<Vec<usize>>,
        started: AtomicUsize,
        delay: Duration,
    }

    #[async_trait]
    impl SendBatch for Recorder {
        async fn send(&self, batch: &[(Scope, Visitors)]) -> Result<Written, StoreError> {
            self.started.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            let names = batch.iter().map(|(_, v)| v.len()).sum();
            self.calls.lock().expect("not poisoned").push(names);
            Ok(Written::default())
        }
    }

    fn recorder(delay: Duration) -> Arc<Recorder> {
        Arc::new(Recorder {
            calls: Mutex::new(Vec::new()),
            started: AtomicUsize::new(0),
            delay,
        })
    }

    fn one(i: usize) -> Visitors {
        Visitors {
            users: vec![Username::parse(format!("user{i}")).expect("valid")],
            guests: Vec::new(),
        }
    }

    fn many(n: usize) -> Visitors {
        Visitors {
            users: (0..n)
                .map(|i| Username::parse(format!("u{i}")).expect("valid"))
                .collect(),
            guests: Vec::new(),
        }
    }

    #[tokio::test]
    async fn concurrent_reports_are_all_answered_in_few_calls() {
        let sender = recorder(Duration::from_millis(5));
        let queue = Arc::new(ReportQueue::new(sender.clone(), 1, Duration::from_secs(5)));
        let deadline = Instant::now() + Duration::from_secs(10);
        let calls: Vec<_> = (0..200)
            .map(|i| {
                let queue = queue.clone();
                tokio::spawn(async move { queue.report(Scope::Site, one(i), deadline).await })
            })
            .collect();
        for call in calls {
            call.await.expect("the task ends").expect("the report is sent");
        }
        let sent = sender.calls.lock().expect("not poisoned").clone();
        assert_eq!(sent.iter().sum::<usize>(), 200);
        assert!(sent.len() < 200, "reports were coalesced: {sent:?}");
        assert_eq!(queue.depth(), 0);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let sender = recorder(Duration::from_secs(3600));
        let queue = Arc::new(ReportQueue::new(sender.clone(), 1, Duration::from_secs(5)));
        let deadline = Instant::now() + Duration::from_secs(3600);
        // One call in flight holds the only slot; the queue fills behind it
        // (and what does not fit is refused).
        let mut waiting = vec![tokio::spawn({
            let queue = queue.clone();
            async move { queue.report(Scope::Site, many(1000), deadline).await }
        })];
        eventually(|| sender.started.load(Ordering::SeqCst) == 1).await;
        for _ in 0..(QUEUE_FLOOR_NAMES / 1000 + 3) {
            let queue = queue.clone();
            waiting.push(tokio::spawn(async move {
                queue.report(Scope::Site, many(1000), deadline).await
            }));
        }
        // Whole batches only: as many as fit under the floor.
        eventually(|| queue.depth() == QUEUE_FLOOR_NAMES / 1000 * 1000).await;
        let refused = queue.report(Scope::Site, many(1000), deadline).await;
        assert!(matches!(refused, Err(StoreError::Overloaded)), "{refused:?}");
        for task in waiting {
            task.abort();
        }
    }

    #[tokio::test]
    async fn work_whose_caller_gave_up_never_reaches_the_store() {
        let sender = recorder(Duration::from_millis(200));
        let queue = Arc::new(ReportQueue::new(sender.clone(), 1, Duration::from_secs(5)));
        let far = Instant::now() + Duration::from_secs(10);
        // The first call occupies the slot for 200 ms...
        let first = tokio::spawn({
            let queue = queue.clone();
            async move { queue.report(Scope::Site, one(1), far).await }
        });
        eventually(|| sender.started.load(Ordering::SeqCst) == 1).await;
        // ...while this one waits behind it with a 50 ms deadline.
        let soon = Instant::now() + Duration::from_millis(50);
        let expired = queue.report(Scope::Site, one(2), soon).await;
        assert!(matches!(expired, Err(StoreError::Expired)), "{expired:?}");
        first.await.expect("ends").expect("sent");
        // A later report goes out alone: the expired one was dropped.
        queue.report(Scope::Site, one(3), far).await.expect("sent");
        assert_eq!(*sender.calls.lock().expect("not poisoned"), [1, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_queue_holds_what_redis_drains_in_half_the_timeout_while_it_keeps_draining() {
        // Calls of 1000 names that take 10 ms: 100k names a second.
        let sender = recorder(Duration::from_millis(10));
        let queue = ReportQueue::new(sender.clone(), 1, Duration::from_secs(2));
        assert_eq!(queue.capacity(), QUEUE_FLOOR_NAMES, "no pace seen yet");
        let deadline = Instant::now() + Duration::from_secs(60);
        for _ in 0..5 {
            queue.report(Scope::Site, many(1000), deadline).await.expect("sent");
        }
        // 100k names/s for half of 2 s.
        assert_eq!(queue.capacity(), 100_000);
        // A Redis that stops answering drains nothing: back to the floor.
        tokio::time::advance(PACE_FRESH_FOR + Duration::from_millis(1)).await;
        assert_eq!(queue.capacity(), QUEUE_FLOOR_NAMES);
    }

    #[tokio::test(start_paused = true)]
    async fn the_queue_never_holds_more_than_its_ceiling() {
        let sender = recorder(Duration::from_micros(10));
        let queue = ReportQueue::new(sender.clone(), 4, Duration::from_secs(60));
        let deadline = Instant::now() + Duration::from_secs(60);
        queue.report(Scope::Site, many(1000), deadline).await.expect("sent");
        assert_eq!(queue.capacity(), QUEUE_CEILING_NAMES);
    }

    pub(super) async fn eventually(condition: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "condition never held");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
