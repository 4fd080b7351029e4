//! Black-box tests of the service over gRPC: the real server on port 0, a
//! private `redis-server` per test, the generated tonic client. One binary,
//! one module per surface.

mod backends;
mod binary;
mod certs;
mod cluster;
mod helpers;
mod infra;
mod launcher;
mod lists;
mod observability;
mod outage;
mod process;
mod redis_cluster;
mod redis_sentinel;
mod redis_server;
mod redis_tls;
mod reflection;
mod replicas;
mod robustness;
mod rooms;
mod security;
mod sentinel;
mod shutdown;
mod traces;
mod watch;
