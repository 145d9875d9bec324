//! Phase 5: the client, `keybroker sign` of 100 distinct images in one invocation
//! against the local registry: wall time and registry requests per image.

use std::{path::Path, time::Instant};

use keybroker_client::registry::{ImageRef, Registry, RegistryOptions};

use crate::BoxError;

const IMAGES: usize = 100;
const JOBS: &str = "16";

async fn push_image(reg: &Registry, image: &str, nonce: &str) -> Result<(), BoxError> {
    let img = ImageRef::parse(image)?;
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Labels":{{"n":"{nonce}"}}}},"rootfs":{{"type":"layers","diff_ids":[]}}}}"#
    );
    let digest = reg.push_blob(&img, config.as_bytes()).await?;
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","size":{},"digest":"{digest}"}},"layers":[]}}"#,
        config.len()
    );
    reg.put_manifest(
        &img,
        "v1",
        manifest.as_bytes(),
        "application/vnd.oci.image.manifest.v1+json",
    )
    .await?;
    Ok(())
}

pub async fn run(registry: &str, socket: &Path, keybroker: &Path) -> Result<(), BoxError> {
    let reg = Registry::new(RegistryOptions::default())?;
    let run_id = std::process::id();
    let images: Vec<String> = (0..IMAGES)
        .map(|i| format!("{registry}/bench/r{run_id}/img{i}:v1"))
        .collect();
    for (i, image) in images.iter().enumerate() {
        push_image(&reg, image, &format!("{run_id}-{i}")).await?;
    }
    let started = Instant::now();
    let out = tokio::process::Command::new(keybroker)
        .arg("--socket")
        .arg(socket)
        .args(["--stats", "sign", "--key", "file", "--jobs", JOBS])
        .args(&images)
        .output()
        .await?;
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!("keybroker sign failed: {stderr}").into());
    }
    let requests: u64 = stderr
        .lines()
        .find_map(|l| l.strip_prefix("registry requests: "))
        .and_then(|n| n.trim().parse().ok())
        .ok_or("keybroker did not report its request count")?;
    println!("## Client: `keybroker sign` of {IMAGES} images (tags), --jobs {JOBS}\n");
    println!(
        "- total: {:.2} s ({:.0} images/s)",
        elapsed.as_secs_f64(),
        IMAGES as f64 / elapsed.as_secs_f64()
    );
    println!(
        "- registry requests: {requests} ({:.1} per image)\n",
        requests as f64 / IMAGES as f64
    );
    Ok(())
}
