//! Compiles `proto/` with `protox`, a pure-Rust protobuf compiler, so that a
//! fresh `cargo build` needs no system `protoc`.
//!
//! Besides the generated code it writes the file descriptor set that server
//! reflection serves, so `grpcurl` works with no `.proto` file at hand.
//! The generated server and client use `crate::codec::LeanCodec` (prost's,
//! with a smaller first encode buffer per call).
//!
//! The proto is compiled twice: once for the messages and the client
//! (`crate::proto::v1`), once for the server (`crate::proto::server`), which
//! has no messages of its own. It takes every message from `v1` except
//! `ListOnlineResponse`, which it sends as `crate::encoded::EncodedListOnline`:
//! the same bytes on the wire, encoded once for every caller that shares a
//! read.

use std::{env, error::Error, fs, path::PathBuf};

use prost::Message as _;

const PROTO_ROOT: &str = "proto";
const PROTO_FILES: &[&str] = &["proto/presence/v1/presence.proto"];

/// The messages the server sends in a form of its own (see above).
const SERVER_OWN: &[(&str, &str)] = &[("ListOnlineResponse", "crate::encoded::EncodedListOnline")];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");

    let descriptors = protox::compile(PROTO_FILES, [PROTO_ROOT])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out_dir.join("presence_descriptor.bin"), descriptors.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .codec_path("crate::codec::LeanCodec")
        .compile_fds(descriptors.clone())?;

    let server_dir = out_dir.join("server");
    fs::create_dir_all(&server_dir)?;
    let mut server = tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .codec_path("crate::codec::LeanCodec")
        .out_dir(&server_dir);
    for file in descriptors.file.iter().filter(|file| file.package() == "presence.v1") {
        let names = file
            .message_type
            .iter()
            .map(|m| m.name())
            .chain(file.enum_type.iter().map(|e| e.name()));
        for name in names {
            let rust = match SERVER_OWN.iter().find(|(own, _)| *own == name) {
                Some((_, path)) => (*path).to_owned(),
                None => format!("crate::proto::v1::{name}"),
            };
            server = server.extern_path(format!(".presence.v1.{name}"), rust);
        }
    }
    server.compile_fds(descriptors)?;
    Ok(())
}
