//! Generates the keybroker.v1 code. There is no system `protoc` on our build
//! machines, so the vendored compiler is used; the file descriptor set is kept
//! for gRPC server reflection.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded.
    unsafe { env::set_var("PROTOC", protoc) };
    let out = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Decode errors are the caller's mistake: INVALID_ARGUMENT (src/codec.rs).
        .codec_path("crate::codec::Codec")
        .file_descriptor_set_path(out.join("keybroker_descriptor.bin"))
        .compile_protos(&["keybroker/v1/broker.proto"], &["."])?;
    println!("cargo:rerun-if-changed=keybroker/v1/broker.proto");
    Ok(())
}
