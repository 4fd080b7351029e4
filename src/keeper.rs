//! Background upkeep, in every replica: ageing the rooms (the sweep) and
//! pruning last seen, in small steps.
//!
//! Each step is one bounded piece of work (a hundred rooms, five hundred
//! stale entries), each a short script, so Redis never stalls for long; and
//! between steps the keeper pauses for about as long as the step took, so
//! upkeep takes at most about half of one Redis connection's time, however
//! much is waiting. Steps are idempotent, so replicas may overlap: the
//! sweep of each interval is taken by one replica, and pruning is harmless
//! twice.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::Store;

/// How often the keeper looks for work when there is none.
const IDLE: Duration = Duration::from_secs(1);

/// Runs until `stop` is cancelled.
pub async fn run(store: Arc<dyn Store>, metrics: Metrics, stop: CancellationToken) {
    loop {
        let began = Instant::now();
        let step = tokio::select! {
            step = store.maintain() => step,
            () = stop.cancelled() => return,
        };
        let pause = match step {
            Ok(done) => {
                metrics.maintained(done.rooms_swept, done.last_seen_pruned);
                if done.more {
                    began.elapsed().max(Duration::from_millis(1))
                } else {
                    IDLE
                }
            }
            Err(error) => {
                tracing::debug!(%error, "upkeep step failed; trying again soon");
                IDLE
            }
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = stop.cancelled() => return,
        }
    }
}
