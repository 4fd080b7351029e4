//! Code generated from `proto/` by `build.rs`. Wire types stay here; the rest
//! of the crate converts them to domain values at the edge.

#![allow(clippy::all, missing_docs)]

/// `presence.v1`: the messages and the client.
pub mod v1 {
    tonic::include_proto!("presence.v1");
}

/// The server of `presence.v1`. It sends `ListOnlineResponse` encoded once
/// per shared read ([`crate::encoded::EncodedListOnline`]); every other
/// message is `v1`'s.
pub mod server {
    include!(concat!(env!("OUT_DIR"), "/server/presence.v1.rs"));
}

/// The encoded file descriptor set of `proto/`, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/presence_descriptor.bin"));
