//! Compiles `proto/` with `protox`, a pure-Rust protobuf compiler, so that a
//! fresh `cargo build` needs no system `protoc`.
//!
//! Besides the generated code it writes the file descriptor set that server
//! reflection serves, so `grpcurl` works with no `.proto` file at hand.
//! The generated server and client use `crate::codec::LeanCodec` (prost's,
//! with a smaller first encode buffer per call).

use std::{env, error::Error, fs, path::PathBuf};

use prost::Message as _;

const PROTO_ROOT: &str = "proto";
const PROTO_FILES: &[&str] = &["proto/presence/v1/presence.proto"];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");

    let descriptors = protox::compile(PROTO_FILES, [PROTO_ROOT])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out_dir.join("presence_descriptor.bin"), descriptors.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::LeanCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
