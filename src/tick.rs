//! The tick: the scheduler, inside every replica, that rotates *current*
//! into *old* once per interval.
//!
//! Every replica runs it; the store's lease makes sure the rotation happens
//! once per interval in total. A replica that finds the lease taken sleeps
//! until the lease ends and tries again, so the rotation happens within a
//! few milliseconds of being due, whichever replica does it.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::Store;

/// After a failed attempt (Redis down), try again this soon, or after one
/// interval if that is shorter.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

/// The shortest wait between attempts. The lease's TTL is in whole
/// milliseconds, so a replica may wake a hair before it ends; this keeps
/// that from becoming a busy loop.
const MIN_WAIT: Duration = Duration::from_millis(5);

/// Rotates whenever a rotation is due, until `stop` is cancelled.
pub async fn run(store: Arc<dyn Store>, interval: Duration, metrics: Metrics, stop: CancellationToken) {
    loop {
        let attempt = tokio::select! {
            result = store.rotate_if_due(interval) => result,
            () = stop.cancelled() => return,
        };
        let wait = match attempt {
            Ok(rotation) => {
                for done in rotation.kinds.iter().filter(|k| k.rotated) {
                    metrics.rotated(done.kind);
                    tracing::debug!(kind = %done.kind, "rotated current into old");
                }
                rotation.next_due_in().unwrap_or(interval)
            }
            Err(error) => {
                metrics.redis_error("rotate");
                tracing::warn!(%error, "tick failed; trying again soon");
                RETRY_AFTER_ERROR.min(interval)
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait.max(MIN_WAIT)) => {}
            () = stop.cancelled() => return,
        }
    }
}
