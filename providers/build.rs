//! Generates the Google Cloud KMS gRPC client (feature `gcp`) from our subset of
//! Google's `google.cloud.kms.v1` protos (`proto/google/cloud/kms/v1/`). Without
//! the feature this script does nothing and needs no build dependency. As in
//! `proto/build.rs`, the vendored `protoc` is used (no system protoc here).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    #[cfg(feature = "gcp")]
    gcp()?;
    Ok(())
}

#[cfg(feature = "gcp")]
fn gcp() -> Result<(), Box<dyn std::error::Error>> {
    const PROTO: &str = "proto/google/cloud/kms/v1/kms_subset.proto";
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let well_known = protoc_bin_vendored::include_path()?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(
            &[std::path::PathBuf::from(PROTO)],
            &["proto".into(), well_known],
        )?;
    println!("cargo:rerun-if-changed={PROTO}");
    Ok(())
}
