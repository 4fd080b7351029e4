use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{Rotation, Store, StoreError};
use crate::domain::{ListLimit, Online, Visitors};

/// The most names one coalesced call carries. Bounded so that one script
/// call stays short on the Redis side (it runs atomically) and within Lua's
/// limit on `unpack`.
pub const MAX_NAMES_PER_CALL: usize = 1000;

/// Reports waiting for a coalesced call, before callers get pushed back.
const QUEUE_DEPTH: usize = 4096;

/// Turns many concurrent reports into few store calls.
///
/// Under load, many callers report at once, each one name. Sent one by one,
/// each costs a script call in Redis and a round trip; the Redis side, not
/// gRPC, becomes the limit. Here reports queue for a moment while a call is
/// in flight and go out together in the next one: Redis runs one script for
/// tens of names, and a lone report still goes out at once.
///
/// All-or-nothing holds per report: each caller's names travel in one call,
/// and each caller learns that call's outcome.
pub struct Coalescing<S> {
    inner: Arc<S>,
    queue: mpsc::Sender<Waiting>,
    timeout: Duration,
}

struct Waiting {
    visitors: Visitors,
    done: oneshot::Sender<Result<(), Arc<StoreError>>>,
}

impl<S: Store> Coalescing<S> {
    /// `in_flight` is how many coalesced calls may be outstanding at once
    /// (about the number of Redis connections); `timeout` bounds a caller's
    /// whole wait, queueing included.
    pub fn new(inner: S, in_flight: usize, timeout: Duration) -> Self {
        let inner = Arc::new(inner);
        let (queue, waiting) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(dispatch(
            inner.clone(),
            waiting,
            Arc::new(Semaphore::new(in_flight.max(1))),
        ));
        Self { inner, queue, timeout }
    }
}

/// Collects what is waiting into calls, and sends each call as soon as a
/// slot is free. Ends when every [`Coalescing`] handle is gone.
async fn dispatch<S: Store>(inner: Arc<S>, mut waiting: mpsc::Receiver<Waiting>, slots: Arc<Semaphore>) {
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
        let mut names = first.names();
        let mut batch = vec![first];
        while names < MAX_NAMES_PER_CALL {
            match waiting.try_recv() {
                Ok(next) if names + next.names() <= MAX_NAMES_PER_CALL => {
                    names += next.names();
                    batch.push(next);
                }
                // Never split one caller's report: it starts the next call.
                Ok(next) => {
                    carried = Some(next);
                    break;
                }
                Err(_) => break,
            }
        }
        send(inner.clone(), batch, slot);
    }
}

impl Waiting {
    fn names(&self) -> usize {
        self.visitors.users.len() + self.visitors.guests.len()
    }
}

fn send<S: Store>(inner: Arc<S>, batch: Vec<Waiting>, slot: tokio::sync::OwnedSemaphorePermit) {
    tokio::spawn(async move {
        let mut merged = Visitors::default();
        let mut callers = Vec::with_capacity(batch.len());
        for mut waiting in batch {
            merged.users.append(&mut waiting.visitors.users);
            merged.guests.append(&mut waiting.visitors.guests);
            callers.push(waiting.done);
        }
        let outcome = inner.report(&merged).await.map_err(Arc::new);
        drop(slot);
        for caller in callers {
            let _ = caller.send(outcome.clone());
        }
    });
}

#[async_trait]
impl<S: Store> Store for Coalescing<S> {
    async fn report(&self, visitors: &Visitors) -> Result<(), StoreError> {
        let (done, outcome) = oneshot::channel();
        let waiting = Waiting {
            visitors: visitors.clone(),
            done,
        };
        let call = async {
            self.queue.send(waiting).await.map_err(|_| StoreError::QueueClosed)?;
            match outcome.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(shared)) => Err(StoreError::Shared(shared)),
                Err(_) => Err(StoreError::QueueClosed),
            }
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| StoreError::Timeout(self.timeout))?
    }

    async fn list_online(&self, limit: ListLimit) -> Result<Online, StoreError> {
        self.inner.list_online(limit).await
    }

    async fn rotate_if_due(&self, interval: Duration) -> Result<Rotation, StoreError> {
        self.inner.rotate_if_due(interval).await
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

    #[tokio::test]
    async fn concurrent_reports_are_all_stored_and_all_answered() {
        let store = Arc::new(Coalescing::new(MemoryStore::new(), 2, Duration::from_secs(5)));
        let mut calls = Vec::new();
        for i in 0..500 {
            let store = store.clone();
            calls.push(tokio::spawn(async move {
                let name = Username::parse(format!("user{i:03}")).expect("a valid name");
                let visitors = Visitors {
                    users: vec![name],
                    guests: Vec::new(),
                };
                store.report(&visitors).await
            }));
        }
        for call in calls {
            call.await.expect("the task ends").expect("the report is stored");
        }
        let online = store.list_online(None).await.expect("lists");
        assert_eq!(online.users.total, 500);
        assert_eq!(online.users.names.first().map(String::as_str), Some("user000"));
    }

    #[tokio::test]
    async fn a_report_of_the_maximum_size_goes_through_alone() {
        let store = Coalescing::new(MemoryStore::new(), 1, Duration::from_secs(5));
        let users = (0..MAX_NAMES_PER_CALL)
            .map(|i| Username::parse(format!("u{i}")).expect("a valid name"))
            .collect();
        let visitors = Visitors {
            users,
            guests: Vec::new(),
        };
        store.report(&visitors).await.expect("stored");
        assert_eq!(store.list_online(None).await.expect("lists").users.total, 1000);
    }
}
