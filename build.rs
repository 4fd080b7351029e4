//! Compiles `proto/` with `protox`, a pure-Rust protobuf compiler, so that a
//! fresh `cargo build` needs no system `protoc`.
//!
//! Besides the generated code it writes the file descriptor set that server
//! reflection serves, so `grpcurl` works with no `.proto` file at hand.
//!
//! The proto is compiled twice: once for the messages and the client
//! (`crate::proto::v1`), once for the server (`crate::proto::server`), whose
//! only messages of its own are `WatchOnlineResponse` carrying
//! `crate::encoded::EncodedChanges` in place of `OnlineChanges` (the same
//! bytes on the wire, encoded once for every watcher); every other message
//! of the server is `v1`'s.

use std::{env, error::Error, fs, path::PathBuf};

use prost::Message as _;

const PROTO_ROOT: &str = "proto";
const PROTO_FILES: &[&str] = &["proto/presence/v1/presence.proto"];

/// The messages the server module generates for itself (see above).
const SERVER_OWN: &[&str] = &["WatchOnlineResponse", "OnlineChanges"];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");

    let descriptors = protox::compile(PROTO_FILES, [PROTO_ROOT])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out_dir.join("presence_descriptor.bin"), descriptors.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(descriptors.clone())?;

    let server_dir = out_dir.join("server");
    fs::create_dir_all(&server_dir)?;
    let mut server = tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .out_dir(&server_dir)
        .extern_path(".presence.v1.OnlineChanges", "crate::encoded::EncodedChanges");
    for file in descriptors.file.iter().filter(|file| file.package() == "presence.v1") {
        let names = file
            .message_type
            .iter()
            .map(|m| m.name())
            .chain(file.enum_type.iter().map(|e| e.name()));
        for name in names.filter(|name| !SERVER_OWN.contains(name)) {
            server = server.extern_path(format!(".presence.v1.{name}"), format!("crate::proto::v1::{name}"));
        }
    }
    server.compile_fds(descriptors)?;
    Ok(())
}
