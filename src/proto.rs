//! Code generated from `proto/` by `build.rs`. Wire types stay here; the rest
//! of the crate converts them to domain values at the edge.

#![allow(clippy::all, missing_docs)]

/// `presence.v1`: the service and its messages.
pub mod v1 {
    tonic::include_proto!("presence.v1");
}

/// The encoded file descriptor set of `proto/`, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/presence_descriptor.bin"));
