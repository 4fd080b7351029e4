//! Follows the store and tells Kubernetes through the gRPC health service.
//!
//! `presence.v1.Presence` is SERVING only while the store answers, so a pod
//! that cannot reach Redis leaves the Service's endpoints (readiness), while
//! the overall status `""` stays SERVING and the pod is not restarted
//! (liveness): a restart would not bring Redis back.

use std::{num::NonZeroUsize, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::keyspace::Kind;
use crate::metrics::Metrics;
use crate::proto::v1::presence_server::SERVICE_NAME;
use crate::store::Store;

/// How often the store is checked. The status follows within about this
/// plus the store's timeout, both ways.
pub const CHECK_PERIOD: Duration = Duration::from_secs(1);

/// Checks the store every [`CHECK_PERIOD`] until `stop` is cancelled. Each
/// check is a listing of one name per kind: it proves the store answers
/// and refreshes the online gauges at the cost of two small reads.
pub async fn follow(store: Arc<dyn Store>, health: HealthReporter, metrics: Metrics, stop: CancellationToken) {
    let mut serving = None;
    loop {
        let answers = tokio::select! {
            result = store.list_online(NonZeroUsize::new(1)) => match result {
                Ok(online) => {
                    metrics.set_online(Kind::Users, online.users.total);
                    metrics.set_online(Kind::Guests, online.guests.total);
                    true
                }
                Err(error) => {
                    metrics.redis_error("health_check");
                    if serving != Some(false) {
                        tracing::warn!(%error, "store does not answer");
                    }
                    false
                }
            },
            () = stop.cancelled() => return,
        };
        if serving != Some(answers) {
            let status = if answers {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status(SERVICE_NAME, status).await;
            tracing::info!(service = SERVICE_NAME, ?status, "health changed");
            serving = Some(answers);
        }
        tokio::select! {
            () = tokio::time::sleep(CHECK_PERIOD) => {}
            () = stop.cancelled() => return,
        }
    }
}
