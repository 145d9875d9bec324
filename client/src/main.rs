//! keybroker: sign container images through keybrokerd, in cosign's format.

use std::{
    collections::HashMap,
    io::IsTerminal,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
};

use clap::{Args as ClapArgs, Parser, Subcommand};
use futures::StreamExt;
use keybroker_client::{
    attest::{attest_image, Storage},
    broker, ci_env,
    cosign::attestation::{build_predicate, predicate_type_uri, SLSA1_PREDICATE_TYPE},
    formats::{verify_image_attestations, verify_signatures, Format, Prefer, Verified},
    migrate::{migrate_image, Outcome},
    provenance::now_rfc3339,
    provision::{create_vault_key, write_public, VaultTarget},
    registry::{Credentials, ImageRef, Registry, RegistryOptions, RetryPolicy},
    sign::sign_image,
    Error,
};
use keybroker_proto::v1::{ListKeysRequest, PublicKeyRequest};
use keybroker_providers::{cosign_key, open_local, KeyRef, P256Signer, Password};
use zeroize::Zeroizing;

/// Sign container images through keybrokerd and store the signatures in the
/// registry in cosign's format (the `sha256-<digest>.sig` tag), so cosign and
/// other sigstore verifiers accept them. The client never holds the signing key.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(ClapArgs, Debug)]
struct Global {
    /// keybrokerd's unix socket [default: $KEYBROKER_SOCKET, else the daemon's default path]
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// keybrokerd's mutual-TLS listener, https://HOST:PORT, instead of the socket.
    /// The client certificate (--tls-cert/--tls-key) is your identity to its policy.
    #[arg(long, global = true, env = "KEYBROKER_URL", conflicts_with = "socket")]
    broker: Option<String>,
    /// Client certificate (PEM) for --broker
    #[arg(long, global = true, env = "KEYBROKER_TLS_CERT", requires = "broker")]
    tls_cert: Option<PathBuf>,
    /// Client private key (PEM) for --broker
    #[arg(long, global = true, env = "KEYBROKER_TLS_KEY", requires = "broker")]
    tls_key: Option<PathBuf>,
    /// CA certificate (PEM) that issued keybrokerd's server certificate, for --broker
    #[arg(long, global = true, env = "KEYBROKER_TLS_CA", requires = "broker")]
    tls_ca: Option<PathBuf>,
    /// Registry username (default: from docker's config.json / credential helpers)
    #[arg(long, global = true, env = "KEYBROKER_REGISTRY_USERNAME")]
    registry_username: Option<String>,
    /// Registry password or token (prefer the environment variable)
    #[arg(
        long,
        global = true,
        env = "KEYBROKER_REGISTRY_PASSWORD",
        hide_env_values = true
    )]
    registry_password: Option<String>,
    /// Speak plain HTTP to this registry host (loopback hosts always use HTTP). Repeatable.
    #[arg(long = "plain-http", global = true, value_name = "HOST")]
    plain_http: Vec<String>,
    /// Print the number of registry requests made, on stderr
    #[arg(long, global = true)]
    stats: bool,
    /// Retries of a failed registry step (transport error, 429, 5xx), with
    /// jittered backoff; 0 disables [default: $KEYBROKER_REGISTRY_RETRIES, else 4]
    #[arg(long, global = true, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=20))]
    registry_retries: Option<u32>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Sign images with a broker key and store the signatures next to them.
    ///
    /// Each IMAGE is REGISTRY/REPO[:TAG][@sha256:DIGEST]; tags are resolved to the
    /// manifest digest, which is what gets signed. Existing signatures are kept.
    Sign {
        /// Images to sign
        #[arg(required = true)]
        images: Vec<String>,
        /// Key alias in the broker (`keybroker keys` lists them)
        #[arg(long)]
        key: String,
        /// Annotation for the payload's "optional" section, KEY=VALUE. Repeatable.
        #[arg(short = 'a', long = "annotations", value_name = "KEY=VALUE")]
        annotations: Vec<String>,
        /// Add commit, branch (or tag), repo and build-url annotations from the CI
        /// environment (GitHub Actions, GitLab CI, Jenkins, or the git checkout
        /// in the current directory); -a values win over them.
        #[arg(long)]
        ci_annotations: bool,
        /// Images signed concurrently
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
        jobs: u16,
        /// Storage format: classic (cosign v2's .sig/.att tags), bundle (cosign
        /// v3's Sigstore bundle as an OCI referrer), or both. Default both:
        /// verifiable by cosign v2 and v3, sigstore-rs and sigstore-js/-go.
        #[arg(long, value_enum, env = "KEYBROKER_FORMAT", default_value = "both")]
        format: Format,
    },
    /// Verify an image's signatures against a public key; prints the verified
    /// payloads (classic) and statements (bundles) as JSON, and on stderr the
    /// format each came from.
    Verify {
        /// Image to verify
        image: String,
        /// PEM public key file, or a broker key alias
        #[arg(long)]
        key: String,
        /// Which format to read: bundle (as cosign v3: bundles if the image has
        /// any, else .sig), classic (.sig if present, else bundles), or any
        /// (both; one verified signature in either is enough)
        #[arg(long, value_enum, default_value = "bundle")]
        prefer: Prefer,
    },
    /// Attest images: sign an in-toto statement about each with a broker key and
    /// store the DSSE envelope in cosign's `.att` layout.
    ///
    /// The broker builds the statement (subject: the repository and the image's
    /// digest), checks its image policy, audits and signs. Existing attestations
    /// are kept; --replace drops those of the same predicate type.
    #[command(group(clap::ArgGroup::new("what").required(true).args(["predicate", "provenance"])))]
    Attest {
        /// Images to attest
        #[arg(required = true)]
        images: Vec<String>,
        /// Key alias in the broker
        #[arg(long)]
        key: String,
        /// Predicate file (for --type custom any content; else JSON)
        #[arg(long, conflicts_with = "provenance")]
        predicate: Option<PathBuf>,
        /// Predicate type: slsaprovenance, slsaprovenance02, slsaprovenance1,
        /// link, spdx, spdxjson, cyclonedx, vuln, openvex, custom, or a URI
        #[arg(long = "type", default_value = "custom", conflicts_with = "provenance")]
        predicate_type: String,
        /// Generate a SLSA Provenance v1 predicate (https://slsa.dev/provenance/v1)
        /// from the CI environment instead of reading one
        #[arg(long)]
        provenance: bool,
        /// Replace stored attestations of the same predicate type (classic .att only;
        /// bundles are referrers, one per attestation)
        #[arg(long)]
        replace: bool,
        /// Storage format: classic (cosign v2's .sig/.att tags), bundle (cosign
        /// v3's Sigstore bundle as an OCI referrer), or both. Default both:
        /// verifiable by cosign v2 and v3, sigstore-rs and sigstore-js/-go.
        #[arg(long, value_enum, env = "KEYBROKER_FORMAT", default_value = "both")]
        format: Format,
    },
    /// Verify an image's attestations against a public key; prints each verified
    /// in-toto statement as one JSON line.
    VerifyAttestation {
        /// Image to verify
        image: String,
        /// PEM public key file, or a broker key alias
        #[arg(long)]
        key: String,
        /// Only statements of this predicate type (cosign name or URI)
        #[arg(long = "type")]
        predicate_type: Option<String>,
        /// Which format to read: bundle (as cosign v3), classic, or any
        #[arg(long, value_enum, default_value = "bundle")]
        prefer: Prefer,
    },
    /// List everything attached to an image: classic signatures and
    /// attestations, Sigstore bundles, other OCI referrers; with format,
    /// predicate type, key hint and time. Verifies nothing.
    Tree {
        /// Image to inspect
        image: String,
        /// Print JSON instead of the tree
        #[arg(long)]
        json: bool,
    },
    /// Give images signed in one format a signature in the other, through the
    /// broker (its policy and audit apply). Only images carrying a signature
    /// by KEY in the source format are re-signed; images already carrying one
    /// in the target format are left alone, so running it again changes nothing.
    Migrate {
        /// Images to migrate
        #[arg(required = true)]
        images: Vec<String>,
        /// Broker key alias: its signatures are migrated, and it signs
        #[arg(long)]
        key: String,
        /// Target format: bundle (classic → bundle, cosign v2 → v3) or classic
        #[arg(long, value_enum, default_value = "bundle")]
        to: keybroker_client::migrate::Target,
    },
    /// Print a key's public key (PEM).
    PublicKey {
        /// Broker key alias, or a key reference to read directly (file path,
        /// env://VAR; gitlab://… and github://… read COSIGN_PUBLIC_KEY)
        #[arg(long)]
        key: String,
        /// Write to this file instead of stdout
        #[arg(long)]
        outfile: Option<PathBuf>,
    },
    /// List the broker keys this caller may use.
    Keys,
    /// Work with keybrokerd's audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Check that keybrokerd answers on its socket (exit 0 when SERVING).
    ///
    /// Asks the daemon's standard gRPC health service; needs no policy rule, so
    /// it suits liveness/readiness probes (Kubernetes exec probes, systemd checks).
    Health {
        /// Service to ask about; default: the whole server
        #[arg(long, default_value = "")]
        service: String,
        /// Give up after this many seconds
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
    /// Generate an encrypted key pair in cosign's format (cosign.key + cosign.pub).
    ///
    /// Without a reference: cosign.key (encrypted; password from COSIGN_PASSWORD or
    /// asked for on the terminal) and cosign.pub in the current directory.
    /// With hashivault://NAME or openbao://NAME: creates an ecdsa-p256 transit key
    /// (VAULT_ADDR, VAULT_TOKEN, TRANSIT_SECRET_ENGINE_PATH) and writes cosign.pub.
    /// With gitlab://PROJECT_ID, gitlab://GROUP/PROJECT or gitlab://GROUP
    /// (GITLAB_TOKEN, GITLAB_HOST) or github://OWNER/REPO[?environment=ENV] or
    /// github://ORG (GITHUB_TOKEN, GITHUB_API_URL / GITHUB_HOST): stores
    /// COSIGN_PRIVATE_KEY, COSIGN_PASSWORD and COSIGN_PUBLIC_KEY as CI/CD
    /// variables / Actions secrets (on GitHub also the variable
    /// COSIGN_PUBLIC_KEY) and writes cosign.pub; --force replaces a stored pair.
    /// With k8s://NAMESPACE/SECRET (KUBECONFIG, ~/.kube/config or in-cluster):
    /// stores cosign.key, cosign.password and cosign.pub in the secret, creating
    /// it or keeping its other data keys, immutable where the cluster supports it.
    GenerateKeyPair {
        /// Where to create the key: omitted for files in the current directory
        reference: Option<String>,
        /// File name prefix of the key pair
        #[arg(long, default_value = "cosign")]
        output_key_prefix: String,
        /// Overwrite existing files
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        ci: keybroker_client::provision::ci::CiFlags,
    },
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Check the hash chain of audit log files (oldest first, rotated files
    /// included) and report the first broken link.
    ///
    /// Prints the record count and the chain's head hash; keep that hash
    /// somewhere else to detect later removal of the newest records.
    Verify {
        /// Audit log files, oldest first
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keybroker: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keybroker: {e}");
            ExitCode::FAILURE
        }
    }
}

fn registry(g: &Global) -> Result<Registry, Error> {
    let credentials = match (&g.registry_username, &g.registry_password) {
        (Some(u), Some(p)) => Some(Credentials {
            username: u.clone(),
            password: Zeroizing::new(p.clone()),
        }),
        (None, None) => None,
        _ => {
            return Err(Error::Other(
                "--registry-username and --registry-password go together".into(),
            ))
        }
    };
    let registry = Registry::new(RegistryOptions {
        credentials,
        plain_http: g.plain_http.clone(),
    })?;
    Ok(match g.registry_retries {
        Some(retries) => registry.with_retry_policy(RetryPolicy {
            retries,
            ..RetryPolicy::default()
        }),
        None => registry,
    })
}

async fn run(cli: Cli) -> Result<(), Error> {
    let g = &cli.global;
    let socket = match &g.broker {
        None => broker::Target::Unix(broker::socket_path(g.socket.as_deref())),
        Some(url) => match (&g.tls_cert, &g.tls_key, &g.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => broker::Target::Tls {
                url: url.clone(),
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            },
            _ => {
                return Err(Error::Other(
                    "--broker needs --tls-cert, --tls-key and --tls-ca (keybrokerd's TCP listener is mutual TLS only)".into(),
                ))
            }
        },
    };
    match cli.command {
        Command::Sign {
            images,
            key,
            annotations,
            ci_annotations,
            jobs,
            format,
        } => {
            let mut annotations = parse_annotations(&annotations)?;
            if ci_annotations {
                let ci = ci_env::detect(&ci_env::process_env(), Path::new("."))?;
                for (k, v) in ci_env::annotations(&ci) {
                    annotations.entry(k).or_insert(v);
                }
            }
            let registry = Arc::new(registry(g)?);
            let client = broker::connect(&socket).await?;
            let result = sign_all(
                client,
                registry.clone(),
                images,
                key,
                annotations,
                jobs.into(),
                format,
            )
            .await;
            if g.stats {
                eprintln!("registry requests: {}", registry.request_count());
            }
            result
        }
        Command::Verify { image, key, prefer } => {
            let registry = registry(g)?;
            let img = ImageRef::parse(&image)?;
            let pem = verification_key(&socket, &key).await?;
            let verified = verify_signatures(&registry, &img, &pem, prefer).await?;
            eprintln!("Verification for {img} --\nThe following checks were performed on each of these signatures:\n  - The signatures were verified against the specified public key\n  - The signed payload or statement names the image's digest");
            for v in &verified {
                eprintln!("  verified: {}{}", v.source, describe_bundle(v));
            }
            let payloads: Vec<_> = verified.into_iter().map(|v| v.content).collect();
            println!("{}", serde_json::Value::from(payloads));
            if g.stats {
                eprintln!("registry requests: {}", registry.request_count());
            }
            Ok(())
        }
        Command::Attest {
            images,
            key,
            predicate,
            predicate_type,
            provenance,
            replace,
            format,
        } => {
            let (type_uri, body) = if provenance {
                let ci = ci_env::detect(&ci_env::process_env(), Path::new("."))?;
                eprintln!(
                    "provenance: {} build of {} at {}",
                    ci.system.name(),
                    ci.repository,
                    ci.commit
                );
                (
                    SLSA1_PREDICATE_TYPE.to_string(),
                    keybroker_client::provenance::slsa_v1(&ci, &now_rfc3339()),
                )
            } else {
                let path = predicate.unwrap_or_default();
                let raw = std::fs::read(&path)
                    .map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
                (
                    predicate_type_uri(&predicate_type)?,
                    build_predicate(&predicate_type, &raw, &now_rfc3339())?,
                )
            };
            let registry = registry(g)?;
            let mut client = broker::connect(&socket).await?;
            let mut failed = 0usize;
            for image in &images {
                match attest_image(
                    &mut client,
                    &registry,
                    image,
                    &key,
                    &type_uri,
                    &body,
                    Storage { format, replace },
                )
                .await
                {
                    Ok(a) => {
                        if a.written {
                            eprintln!(
                                "attested {} ({}) with {} in .att",
                                a.image, a.predicate_type, a.key_id
                            );
                        } else if format.classic() {
                            eprintln!(
                                "{} already carries this attestation in .att; nothing written there",
                                a.image
                            );
                        }
                        if let Some((referrer, via)) = &a.bundle {
                            eprintln!(
                                "attested {} ({}) with {} as bundle {referrer} ({})",
                                a.image,
                                a.predicate_type,
                                a.key_id,
                                via.as_str()
                            );
                        }
                        println!("{}", a.image);
                    }
                    Err(e) => {
                        failed += 1;
                        eprintln!("{image}: {e}");
                    }
                }
            }
            if g.stats {
                eprintln!("registry requests: {}", registry.request_count());
            }
            match failed {
                0 => Ok(()),
                n => Err(Error::Other(format!(
                    "{n} of {} images failed to attest",
                    images.len()
                ))),
            }
        }
        Command::VerifyAttestation {
            image,
            key,
            predicate_type,
            prefer,
        } => {
            let registry = registry(g)?;
            let img = ImageRef::parse(&image)?;
            let pem = verification_key(&socket, &key).await?;
            let want = predicate_type
                .as_deref()
                .map(predicate_type_uri)
                .transpose()?;
            let verified =
                verify_image_attestations(&registry, &img, &pem, want.as_deref(), prefer).await?;
            eprintln!("Verification for {img} --\nThe following checks were performed on each of these attestations:\n  - The DSSE signatures were verified against the specified public key\n  - The statement subject is the image's digest");
            for v in verified {
                eprintln!("  verified: {}{}", v.source, describe_bundle(&v));
                println!("{}", v.content);
            }
            if g.stats {
                eprintln!("registry requests: {}", registry.request_count());
            }
            Ok(())
        }
        Command::PublicKey { key, outfile } => {
            let pem = if key.contains("://") || Path::new(&key).exists() {
                let key_ref = KeyRef::parse(&key)?;
                match keybroker_client::provision::ci::public_key(&key_ref).await? {
                    Some(pem) => pem,
                    None => {
                        let password = std::env::var("COSIGN_PASSWORD").ok().map(Password::new);
                        let provider = open_local(&key_ref, password.as_ref())?;
                        provider.public_key().await?.pem
                    }
                }
            } else {
                let mut client = broker::connect(&socket).await?;
                client
                    .public_key(PublicKeyRequest { key })
                    .await?
                    .into_inner()
                    .key
                    .unwrap_or_default()
                    .public_key_pem
            };
            match outfile {
                Some(path) => std::fs::write(&path, pem)
                    .map_err(|e| Error::Other(format!("{}: {e}", path.display()))),
                None => {
                    print!("{pem}");
                    Ok(())
                }
            }
        }
        Command::Tree { image, json } => {
            let registry = registry(g)?;
            let t = keybroker_client::tree::tree(&registry, &image).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&t)
                        .map_err(|e| Error::Other(format!("tree: {e}")))?
                );
            } else {
                print!("{}", keybroker_client::tree::render(&t));
            }
            if g.stats {
                eprintln!("registry requests: {}", registry.request_count());
            }
            Ok(())
        }
        Command::Migrate { images, key, to } => {
            let registry = registry(g)?;
            let mut client = broker::connect(&socket).await?;
            let pem = verification_key(&socket, &key).await?;
            let (mut migrated, mut already, mut skipped, mut failed) = (0, 0, 0, 0);
            for image in &images {
                match migrate_image(&mut client, &registry, image, &key, &pem, to).await {
                    Ok((name, Outcome::Migrated)) => {
                        migrated += 1;
                        eprintln!("migrated {name}: now signed by {key} in the {to:?} format too");
                        println!("{name}");
                    }
                    Ok((name, Outcome::AlreadyThere)) => {
                        already += 1;
                        eprintln!(
                            "{name}: already signed by {key} in the {to:?} format; nothing written"
                        );
                    }
                    Ok((name, Outcome::NoSource(why))) => {
                        skipped += 1;
                        eprintln!("{name}: no signature by {key} to migrate ({why}); left alone");
                    }
                    Err(e) => {
                        failed += 1;
                        eprintln!("{image}: {e}");
                    }
                }
            }
            eprintln!("migrate: {migrated} migrated, {already} already done, {skipped} without a signature to migrate, {failed} failed");
            if g.stats {
                eprintln!("registry requests: {}", registry.request_count());
            }
            match failed {
                0 => Ok(()),
                n => Err(Error::Other(format!(
                    "{n} of {} images failed to migrate",
                    images.len()
                ))),
            }
        }
        Command::Audit(AuditCommand::Verify { files }) => {
            let paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
            let ok = keybroker_client::audit::verify_files(&paths)
                .map_err(|e| Error::Other(format!("audit log: {e}")))?;
            println!(
                "ok: {} records, chain from {} to head {}",
                ok.records, ok.starts_from, ok.head
            );
            Ok(())
        }
        Command::Health { service, timeout } => {
            broker::health(&socket, &service, std::time::Duration::from_secs(timeout)).await?;
            println!("SERVING");
            Ok(())
        }
        Command::Keys => {
            let mut client = broker::connect(&socket).await?;
            let keys = client
                .list_keys(ListKeysRequest {})
                .await?
                .into_inner()
                .keys;
            if keys.is_empty() {
                eprintln!("the broker's policy lets this caller use no keys");
            }
            for k in keys {
                let version = if k.version.is_empty() {
                    "-"
                } else {
                    &k.version
                };
                println!("{}\t{}\t{}\t{}", k.alias, k.algorithm, version, k.key_id);
            }
            Ok(())
        }
        Command::GenerateKeyPair {
            reference,
            output_key_prefix,
            force,
            ci,
        } => generate_key_pair(reference.as_deref(), &output_key_prefix, force, &ci).await,
    }
}

/// A PEM file's contents, or the public key of a broker key alias.
async fn verification_key(socket: &broker::Target, key: &str) -> Result<String, Error> {
    if Path::new(key).exists() {
        return std::fs::read_to_string(key).map_err(|e| Error::Other(format!("{key}: {e}")));
    }
    let mut client = broker::connect(socket.clone()).await?;
    Ok(client
        .public_key(PublicKeyRequest {
            key: key.to_string(),
        })
        .await?
        .into_inner()
        .key
        .unwrap_or_default()
        .public_key_pem)
}

fn parse_annotations(raw: &[String]) -> Result<HashMap<String, String>, Error> {
    raw.iter()
        .map(|a| {
            a.split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| Error::Other(format!("annotation {a:?} must be KEY=VALUE")))
        })
        .collect()
}

async fn sign_all(
    client: broker::Client,
    registry: Arc<Registry>,
    images: Vec<String>,
    key: String,
    annotations: HashMap<String, String>,
    jobs: usize,
    format: Format,
) -> Result<(), Error> {
    let progress = (images.len() > 1 && std::io::stderr().is_terminal()).then(|| {
        let pb = indicatif::ProgressBar::new(images.len() as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} signed  {elapsed}  {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb
    });
    let total = images.len();
    let mut results = futures::stream::iter(images.into_iter().map(|image| {
        let mut client = client.clone();
        let registry = registry.clone();
        let key = key.clone();
        let annotations = annotations.clone();
        async move {
            let r = sign_image(&mut client, &registry, &image, &key, &annotations, format).await;
            (image, r)
        }
    }))
    .buffer_unordered(jobs);
    let mut failed = 0usize;
    while let Some((image, r)) = results.next().await {
        let line = match &r {
            Ok(s) => {
                let mut parts = Vec::new();
                if s.written {
                    parts.push("in .sig".to_string());
                } else if format.classic() {
                    parts.push(".sig already carries this signature".to_string());
                }
                if let Some((referrer, via)) = &s.bundle {
                    parts.push(format!("as bundle {referrer} ({})", via.as_str()));
                }
                format!("signed {} with {}: {}", s.image, s.key_id, parts.join(", "))
            }
            Err(e) => {
                failed += 1;
                format!("{image}: {e}")
            }
        };
        match &progress {
            Some(pb) => {
                pb.inc(1);
                pb.println(line);
            }
            None => eprintln!("{line}"),
        }
        if let Ok(s) = r {
            println!("{}", s.image);
        }
    }
    if let Some(pb) = progress {
        pb.finish_and_clear();
    }
    match failed {
        0 => Ok(()),
        n if total == 1 => Err(Error::Other(format!("{n} image failed to sign"))),
        n => Err(Error::Other(format!(
            "{n} of {total} images failed to sign"
        ))),
    }
}

fn password_for_new_key() -> Result<Password, Error> {
    if let Ok(p) = std::env::var("COSIGN_PASSWORD") {
        return Ok(Password::new(p));
    }
    if !std::io::stdin().is_terminal() {
        return Err(Error::Other(
            "set COSIGN_PASSWORD (no terminal to ask for a password)".into(),
        ));
    }
    let first = Zeroizing::new(
        rpassword::prompt_password("Enter password for private key: ")
            .map_err(|e| Error::Other(e.to_string()))?,
    );
    let again = Zeroizing::new(
        rpassword::prompt_password("Enter password for private key again: ")
            .map_err(|e| Error::Other(e.to_string()))?,
    );
    if *first != *again {
        return Err(Error::Other("passwords do not match".into()));
    }
    Ok(Password::new(first.as_bytes()))
}

async fn generate_key_pair(
    reference: Option<&str>,
    prefix: &str,
    force: bool,
    ci: &keybroker_client::provision::ci::CiFlags,
) -> Result<(), Error> {
    if let Some(r) = reference {
        let key_ref = KeyRef::parse(r)?;
        if keybroker_client::provision::ci::handles(&key_ref) {
            let pub_path = PathBuf::from(format!("{prefix}.pub"));
            return keybroker_client::provision::ci::generate_key_pair(
                &key_ref,
                ci,
                &pub_path,
                force,
                password_for_new_key,
            )
            .await;
        }
        return match &key_ref {
            KeyRef::Vault { key, .. } => {
                let pub_path = PathBuf::from(format!("{prefix}.pub"));
                if pub_path.exists() && !force {
                    return Err(Error::Other(format!("{} already exists; pass --force to overwrite it", pub_path.display())));
                }
                let target = VaultTarget::from_env()?;
                let token = Zeroizing::new(
                    std::env::var("VAULT_TOKEN").map_err(|_| Error::Other("set VAULT_TOKEN to a token that may create transit keys".into()))?,
                );
                let pem = create_vault_key(&target, &token, key).await?;
                write_public(&pub_path, &pem)?;
                eprintln!("Created transit key {key} (ecdsa-p256) in {} at {}\nPublic key written to {}", target.mount, target.address, pub_path.display());
                Ok(())
            }
            KeyRef::File(path) => Err(Error::Other(format!(
                "write file keys with --output-key-prefix (got {}); the reference form is for remote key sources",
                path.display()
            ))),
            KeyRef::AwsKms { .. } => Err(Error::Other(format!(
                "creating KMS keys needs the AWS SDK, which this client does not link: run `keybrokerd --create-key {r} > {prefix}.pub` where the daemon's AWS credentials are"
            ))),
            KeyRef::Kubernetes { namespace, name } => {
                let pub_path = PathBuf::from(format!("{prefix}.pub"));
                if pub_path.exists() && !force {
                    return Err(Error::Other(format!("{} already exists; pass --force to overwrite it", pub_path.display())));
                }
                let password = password_for_new_key()?;
                let made = keybroker_providers::kubernetes::create_secret(namespace, name, &password, force, &Default::default()).await?;
                write_public(&pub_path, &made.public_pem)?;
                eprintln!(
                    "{} secret {name} in namespace {namespace} ({}, {}, {}{})\nPublic key written to {}",
                    if made.updated { "Updated" } else { "Created" },
                    keybroker_providers::kubernetes::data_keys::PRIVATE_KEY,
                    keybroker_providers::kubernetes::data_keys::PASSWORD,
                    keybroker_providers::kubernetes::data_keys::PUBLIC_KEY,
                    if made.immutable { "; immutable" } else { "" },
                    pub_path.display()
                );
                Ok(())
            }
            other => Err(Error::Key(keybroker_providers::Error::NotBuilt {
                scheme: other.scheme(),
                hint: " for generate-key-pair yet (built: file keys, hashivault://, openbao://, gitlab://, github://, k8s://)".into(),
            })),
        };
    }
    let key_path = PathBuf::from(format!("{prefix}.key"));
    let pub_path = PathBuf::from(format!("{prefix}.pub"));
    for p in [&key_path, &pub_path] {
        if p.exists() && !force {
            return Err(Error::Other(format!(
                "{} already exists; pass --force to overwrite it",
                p.display()
            )));
        }
    }
    let password = password_for_new_key()?;
    let (signer, der) = P256Signer::generate()?;
    let encrypted = cosign_key::encrypt_pem(&der, password.expose())?;
    write_private(&key_path, encrypted.as_bytes())?;
    std::fs::write(&pub_path, signer.public_key_pem())
        .map_err(|e| Error::Other(format!("{}: {e}", pub_path.display())))?;
    eprintln!(
        "Private key written to {}\nPublic key written to {}",
        key_path.display(),
        pub_path.display()
    );
    Ok(())
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), Error> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
    f.write_all(data)
        .map_err(|e| Error::Other(format!("{}: {e}", path.display())))
}

/// " (timestamps: N, referrer sha256:…)" for a bundle, "" for classic.
fn describe_bundle(v: &Verified) -> String {
    if v.referrer.is_empty() {
        return String::new();
    }
    format!(
        " referrer {} with {} RFC 3161 timestamp(s)",
        v.referrer, v.timestamps
    )
}
