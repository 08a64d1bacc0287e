//! Compiles `proto/ai.proto` into Rust types, a tonic client and server, and a
//! file descriptor set for gRPC reflection. Uses the vendored `protoc`, so no
//! system package is needed.

use std::error::Error;

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=proto/ai.proto");
    #[cfg(feature = "proto")]
    compile_proto()?;
    Ok(())
}

/// Generates the protocol types (only with the `proto` feature, whose build
/// dependencies these are).
#[cfg(feature = "proto")]
fn compile_proto() -> Result<(), Box<dyn Error>> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // Payload chunks are `bytes::Bytes`: handed between layers without copies.
    config.bytes(["."]);
    // Small per-stream buffers: see `proto::WireCodec`.
    tonic_prost_build::configure()
        .codec_path("crate::proto::WireCodec")
        // Methods a server does not implement answer UNIMPLEMENTED (the
        // optional `call` on test servers and the benchmark's floor).
        .generate_default_stubs(true)
        .file_descriptor_set_path(out_dir.join("ai_descriptor.bin"))
        .compile_with_config(config, &["proto/ai.proto"], &["proto"])?;
    Ok(())
}
