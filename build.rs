//! Compiles `proto/ai.proto` into Rust types, a tonic client and server, and a
//! file descriptor set for gRPC reflection. Uses the vendored `protoc`, so no
//! system package is needed.

use std::{env, error::Error, path::PathBuf};

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=proto/ai.proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // Payload chunks are `bytes::Bytes`: handed between layers without copies.
    config.bytes(["."]);
    tonic_prost_build::configure().file_descriptor_set_path(out_dir.join("ai_descriptor.bin")).compile_with_config(
        config,
        &["proto/ai.proto"],
        &["proto"],
    )?;
    Ok(())
}
