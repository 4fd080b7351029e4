//! Presence: who is online right now, served over gRPC.
//!
//! Callers report the signed-in users and anonymous guests they see; Presence
//! answers who was seen in the last one to two tick intervals. The recipe is
//! the classic one with two sets per kind, *current* and *old*: a report adds
//! to *current*, a tick makes *current* the new *old*, and who is online is
//! their union. See the README for the guarantees and the Redis key layout.
//!
//! A map of the crate, from the wire inwards:
//!
//! - [`startup`]: builds the [`Application`] from [`Settings`], binds its
//!   listeners and runs it until a shutdown signal; [`shutdown`] waits for
//!   SIGTERM or SIGINT.
//! - `service`: the `presence.v1.Presence` gRPC service. It turns wire
//!   requests into domain values and store errors into gRPC statuses (`error`).
//! - [`domain`]: the values that exist past the edge, parsed, never merely
//!   validated: a [`domain::Username`] and a [`domain::GuestAddress`].
//! - [`store`]: the [`store::Store`] trait in domain terms, with a Redis
//!   implementation on a `bb8-redis` pool and an in-memory one.
//! - [`keyspace`]: every Redis key name and server-side script, in one place.
//! - `tick`: the scheduler that rotates *current* into *old* once per interval,
//!   however many replicas share one Redis.
//! - `backend_health`: follows the store and flips the gRPC health status.
//! - `metrics`: Prometheus counters and histograms, served over HTTP.
//! - [`settings`] and [`telemetry`]: configuration and logs.

mod backend_health;
pub mod domain;
mod error;
pub mod keyspace;
mod metrics;
pub mod proto;
mod service;
pub mod settings;
pub mod shutdown;
pub mod startup;
pub mod store;
pub mod telemetry;
mod tick;

pub use settings::Settings;
pub use startup::Application;
