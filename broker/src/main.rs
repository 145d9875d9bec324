//! keybrokerd: signs for callers who never hold a key.

use std::{
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
};

use clap::Parser;
use keybroker_broker::{activation, build_state, config, harden_process, keys, listen};
use keybroker_providers::{pem, P256Signer};

/// The keybroker signing daemon.
///
/// Serves the keybroker.v1 gRPC API on a unix socket. Keys and policy come from a
/// TOML config; without one, keybrokerd runs on an embedded default: a dev key in
/// its data directory and a rule that lets the current user sign with it.
///
/// Under systemd it takes its socket from socket activation (keybroker.socket)
/// and reports readiness (Type=notify); SIGHUP reloads the config, keeping the
/// old one if the new one is invalid; SIGTERM stops after in-flight requests.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Config file (TOML). Default: the embedded developer default.
    #[arg(long, short, env = "KEYBROKERD_CONFIG")]
    config: Option<PathBuf>,
    /// Validate this config file (keys included) and exit.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,
    /// Create this key in its backend (awskms://…/alias/NAME, hashivault://NAME,
    /// openbao://NAME, gcpkms://…/keyRings/R/cryptoKeys/NAME), print its public
    /// key (PEM) and exit. Uses the same credentials the daemon would (AWS chain;
    /// VAULT_ADDR, VAULT_TOKEN; Google Application Default Credentials).
    #[arg(long, value_name = "REF", conflicts_with_all = ["config", "check_config"])]
    create_key: Option<String>,
    /// Override the socket path of the config.
    #[arg(long, env = "KEYBROKER_SOCKET")]
    socket: Option<PathBuf>,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(&args.log_format);
    harden_process();
    // Before any thread exists: taking the socket unsets LISTEN_* in our environment.
    let inherited = match activation::inherited_unix_listener() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keybrokerd: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args, inherited)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYBROKER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(
    args: Args,
    inherited: Option<std::os::unix::net::UnixListener>,
) -> Result<(), String> {
    if let Some(reference) = &args.create_key {
        let key_ref = keybroker_providers::KeyRef::parse(reference).map_err(|e| e.to_string())?;
        let public = keybroker_providers::create_key(&key_ref, &Default::default())
            .await
            .map_err(|e| e.to_string())?;
        print!("{}", public.pem);
        tracing::info!(key = %key_ref, "created");
        return Ok(());
    }
    if let Some(path) = &args.check_config {
        let cfg = config::Config::load(path)?;
        build_state(&cfg, keys::Startup::Strict).await?;
        if let Some(t) = &cfg.server.tls {
            // Reads and parses certificate, key and client CA as the listener would.
            tonic::transport::Server::builder()
                .tls_config(keybroker_broker::tls_server_config(t)?)
                .map_err(|e| keybroker_broker::tls_error(&e))?;
        }
        println!(
            "{}: ok ({} keys, {} policy rules)",
            path.display(),
            cfg.keys.len(),
            cfg.policy.len()
        );
        return Ok(());
    }
    let mut cfg = match &args.config {
        Some(path) => config::Config::load(path)?,
        None => embedded_default()?,
    };
    if let Some(socket) = args.socket {
        cfg.server.socket = Some(socket);
    }
    let audit = match &cfg.server.audit_log {
        Some(path) => {
            let log = Arc::new(keybroker_broker::audit::AuditLog::open(path)?);
            tracing::info!(path = %path.display(), "audit log open");
            Some(log)
        }
        None => {
            tracing::warn!("no server.audit_log: signing decisions are not recorded");
            None
        }
    };
    let mut first = build_state(&cfg, keys::Startup::Lenient).await?;
    first.audit = audit;
    let state = keybroker_broker::shared(first);
    prefetch_jwks(&state);
    let (listener, _guard, shown) = match inherited {
        // systemd owns the socket file (mode, group, removal): keybroker.socket.
        Some(std_listener) => (
            tokio::net::UnixListener::from_std(std_listener)
                .map_err(|e| format!("socket activation: {e}"))?,
            None,
            "inherited from systemd".to_string(),
        ),
        None => {
            let socket_path = cfg.socket_path();
            let (l, guard) = listen::bind_unix(
                &socket_path,
                cfg.socket_mode(),
                cfg.server.socket_group.as_deref(),
            )?;
            (l, Some(guard), socket_path.display().to_string())
        }
    };
    tracing::info!(socket = %shown, keys = state.load().keys.len(), "keybrokerd serving");
    activation::notify_ready();
    tokio::spawn(reload_on_sighup(
        args.config.clone(),
        cfg.clone(),
        state.clone(),
    ));
    // The TCP listener is mutual TLS or nothing; bound before READY=1 so a bad
    // certificate or a busy port fails the start, not the first request.
    let tls = match &cfg.server.tls {
        Some(t) => {
            let server_config = keybroker_broker::tls_server_config(t)?;
            let l = tokio::net::TcpListener::bind(&t.listen)
                .await
                .map_err(|e| format!("server.tls.listen {}: {e}", t.listen))?;
            tracing::info!(listen = %t.listen, "mTLS listener (client certificates from server.tls.client_ca_file)");
            let health = match &t.health_listen {
                Some(h) => {
                    let hl = tokio::net::TcpListener::bind(h)
                        .await
                        .map_err(|e| format!("server.tls.health_listen {h}: {e}"))?;
                    tracing::info!(listen = %h, "plaintext health-only listener");
                    Some(hl)
                }
                None => None,
            };
            Some((l, server_config, health))
        }
        None => None,
    };
    let metrics = match &cfg.server.metrics_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("server.metrics_listen {addr}: {e}"))?;
            tracing::info!(listen = %addr, "Prometheus metrics at /metrics");
            Some(l)
        }
        None => None,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    if let Some(l) = metrics {
        tokio::spawn(keybroker_broker::metrics::serve(
            l,
            state.clone(),
            stopped(stop_rx.clone()),
        ));
    }
    tokio::spawn(async move {
        shutdown_signal().await;
        activation::notify_stopping();
        let _ = stop_tx.send(true);
    });
    let max = cfg.max_request_bytes();
    let unix = keybroker_broker::serve_with(
        listener,
        state.clone(),
        max,
        cfg.conn_limits(),
        stopped(stop_rx.clone()),
    );
    let (tls_server, health_server) = match tls {
        Some((l, server_config, health)) => (
            Some(keybroker_broker::serve_tls(
                l,
                server_config,
                state.clone(),
                max,
                cfg.conn_limits(),
                stopped(stop_rx.clone()),
            )),
            health.map(|h| keybroker_broker::serve_health_only(h, stopped(stop_rx.clone()))),
        ),
        None => (None, None),
    };
    let all = async {
        tokio::try_join!(
            unix,
            async {
                match tls_server {
                    Some(f) => f.await,
                    None => Ok(()),
                }
            },
            async {
                match health_server {
                    Some(f) => f.await,
                    None => Ok(()),
                }
            }
        )
    };
    // In-flight requests get a grace period; idle clients that never hang up do not
    // keep the daemon alive.
    let mut grace_rx = stop_rx.clone();
    tokio::select! {
        r = all => { r?; }
        _ = async { let _ = grace_rx.wait_for(|s| *s).await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
            tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; stopping anyway");
        }
    }
    tracing::info!("keybrokerd stopped");
    Ok(())
}

/// SIGHUP: read the config again and swap in new keys and policy. Requests in
/// flight finish with the old ones. An invalid new config (or a key that no longer
/// opens) is rejected and the running one kept. Listener settings (socket path,
/// mode, group, request size, audit log path) need a restart; the audit log
/// file itself is re-opened, for log rotation.
async fn reload_on_sighup(
    path: Option<PathBuf>,
    running: config::Config,
    state: keybroker_broker::SharedState,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler; config reload is unavailable");
        return;
    };
    let mut running = running;
    while hup.recv().await.is_some() {
        activation::notify_reloading();
        // logrotate moves the file away and sends SIGHUP: continue the chain in
        // a new file at the configured path.
        if let Some(log) = state.load().audit.clone() {
            if let Err(e) = log.reopen().await {
                tracing::error!("SIGHUP: {e}; records keep going to the file opened before");
            }
        }
        let loaded = match &path {
            Some(p) => config::Config::load(p),
            None => embedded_default(),
        };
        let result = match loaded {
            Ok(new_cfg) => match build_state(&new_cfg, keys::Startup::Lenient).await {
                Ok(mut new_state) => {
                    // The audit log outlives configs: same file, same chain.
                    new_state.audit = state.load().audit.clone();
                    Ok((new_cfg, new_state))
                }
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        match result {
            Ok((new_cfg, new_state)) => {
                if new_cfg.server != running.server {
                    tracing::warn!(
                        "[server] settings changed; they take effect at the next restart"
                    );
                }
                tracing::info!(
                    keys = new_state.keys.len(),
                    rules = new_cfg.policy.len(),
                    "SIGHUP: config reloaded"
                );
                state.store(Arc::new(new_state));
                prefetch_jwks(&state);
                running = new_cfg;
            }
            Err(e) => tracing::error!("SIGHUP: new config rejected, keeping the running one: {e}"),
        }
        activation::notify_ready();
    }
}

const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// SIGTERM or SIGINT: stop accepting, let in-flight requests finish.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop keybrokerd with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

/// The embedded default config, creating the dev key (0600, in a 0700 data dir)
/// on first start.
fn embedded_default() -> Result<config::Config, String> {
    let data_dir = keybroker_proto::default_data_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&data_dir)
        .map_err(|e| format!("creating data dir {}: {e}", data_dir.display()))?;
    let key_path = data_dir.join(config::DEV_KEY_FILE);
    if !key_path.exists() {
        write_dev_key(&key_path)?;
        tracing::info!(key = %key_path.display(), "generated a dev signing key (embedded default)");
    }
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    Ok(config::Config::embedded_default(&data_dir, uid))
}

fn write_dev_key(path: &Path) -> Result<(), String> {
    use std::io::Write;
    let (_, der) = P256Signer::generate().map_err(|e| e.to_string())?;
    let text = zeroize::Zeroizing::new(pem::encode("PRIVATE KEY", &der));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Fetches the `jwks_url` of every `[[oidc]]` issuer in the background, so the
/// first token does not wait for it (a failure is retried on first use).
fn prefetch_jwks(state: &keybroker_broker::SharedState) {
    let current = state.load_full();
    if !current.oidc.is_empty() {
        tokio::spawn(async move { current.oidc.prefetch().await });
    }
}
