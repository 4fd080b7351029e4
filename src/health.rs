//! Follows the store and tells Kubernetes through the gRPC health service.
//!
//! `presence.v1.Presence` is SERVING only while the store answers and takes
//! writes, so a pod that cannot reach Redis (or whose Redis refuses writes:
//! a read-only replica, a full Redis) leaves the Service's endpoints
//! (readiness), while the overall status `""` stays SERVING and the pod is
//! not restarted (liveness): a restart would not bring Redis back.
//!
//! The same check, once a second, brings the site into the current
//! interval (so rotations happen on time with no traffic) and refreshes the
//! gauges.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::domain::Kind;
use crate::error::OutageLog;
use crate::metrics::Metrics;
use crate::proto::server::presence_server::SERVICE_NAME;
use crate::store::Store;

/// How often the store is checked. The status follows within about this
/// plus the store's timeout, both ways.
pub const CHECK_PERIOD: Duration = Duration::from_secs(1);

/// Checks the store every [`CHECK_PERIOD`] until `stop` is cancelled.
pub async fn follow(
    store: Arc<dyn Store>,
    health: HealthReporter,
    metrics: Metrics,
    outage: OutageLog,
    stop: CancellationToken,
) {
    let mut serving = None;
    let mut ticks = tokio::time::interval(CHECK_PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = stop.cancelled() => return,
        }
        let answers = tokio::select! {
            result = store.probe() => match result {
                Ok(probe) => {
                    outage.answered();
                    for kind in Kind::ALL {
                        metrics.set_online(kind, probe.counts.of(kind));
                    }
                    if let Some(rooms) = probe.rooms {
                        metrics.set_rooms_online(rooms);
                    }
                    true
                }
                Err(error) => {
                    metrics.redis_error("health_check");
                    outage.failed("health check", &error);
                    false
                }
            },
            () = stop.cancelled() => return,
        };
        let stats = store.stats();
        metrics.set_queue_names(stats.queue_names);
        metrics.set_filter_totals(stats.filter_skipped, stats.filter_checked);
        metrics.set_rotations(stats.rotations);
        if serving != Some(answers) {
            let status = if answers {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status(SERVICE_NAME, status).await;
            metrics.set_ready(answers);
            tracing::info!(service = SERVICE_NAME, ?status, "health changed");
            serving = Some(answers);
        }
    }
}
