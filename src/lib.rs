//! Presence: who is online right now, served over gRPC.
//!
//! Callers report the signed-in users and anonymous guests they see, on the
//! site or in a room; Presence answers who was seen in the last one to two
//! tick intervals, page by page, and streams who joins and leaves. The
//! recipe is the classic one with two sets per kind, *current* and *old*:
//! a report adds to *current*, each interval *current* becomes *old*, and
//! who is online is their union. See the README for the guarantees and the
//! Redis key layout.
//!
//! A map of the crate, from the wire inwards:
//!
//! - [`startup`]: builds the [`Application`] from [`Settings`], binds its
//!   listeners and runs it until a shutdown signal; [`shutdown`] waits for
//!   SIGTERM or SIGINT. `limits` maps an oversized request to the status
//!   gRPC clients expect; `ageing` closes connections past their age and
//!   grace.
//! - `service`: the `presence.v1.Presence` gRPC service. It turns wire
//!   requests into domain values and failures into gRPC statuses (`error`),
//!   within each client's deadline. `shared_reads` lets concurrent
//!   identical lists and counts share one Redis read (and, opt-in, a
//!   short cache); `encoded` lets them share the page's encoding too.
//! - `watch`: `WatchOnline`, one subscription per watched scope fanned out
//!   to every watcher on the replica.
//! - `codec`: prost's gRPC codec, with a small first encode buffer per call
//!   (a watch stream keeps its buffer for hours).
//! - [`domain`]: the values that exist past the edge, parsed, never merely
//!   validated: a [`domain::Username`], a [`domain::GuestAddress`], a
//!   [`domain::Scope`] (the site or a room), page sizes and page tokens.
//! - [`store`]: the [`store::Store`] trait in domain terms, with a Redis
//!   implementation (its report queue, repeat filter and pub/sub bus
//!   inside) and an in-memory one.
//! - [`keyspace`]: every Redis key name and server-side script, in one place.
//! - `health`: follows the store, flips the gRPC health status, and keeps
//!   the gauges; `keeper`: ages rooms and prunes last seen, in small steps.
//! - `metrics`: Prometheus counters and histograms, served over HTTP.
//! - `locks`: std locks taken as they are after a panic, one helper each.
//! - [`settings`] and [`telemetry`]: configuration, logs and traces;
//!   [`traces`]: OpenTelemetry spans for each call and its Redis round
//!   trips, off unless the standard `OTEL_*` variables ask for them.
//! - Securing it: `tls` (the gRPC port's TLS, certificates rotating under
//!   a running server), `auth` (bearer tokens with the roles `report` and
//!   `read`, one tower layer), `guests` (what is stored of a guest's
//!   address: plain, truncated or hashed); `reload` re-reads their files.

mod ageing;
mod auth;
mod codec;
pub mod domain;
mod encoded;
mod error;
#[cfg(test)]
mod fuzz;
mod guests;
mod health;
mod keeper;
pub mod keyspace;
mod limits;
mod locks;
mod metrics;
pub mod proto;
mod reload;
mod service;
pub mod settings;
mod shared_reads;
pub mod shutdown;
pub mod startup;
pub mod store;
pub mod telemetry;
mod tls;
pub mod traces;
mod watch;

pub use settings::Settings;
pub use startup::Application;
