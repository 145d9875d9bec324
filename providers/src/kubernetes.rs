//! Kubernetes secrets in cosign's layout (`k8s://NAMESPACE/SECRET`): data keys
//! `cosign.key` (cosign-encrypted PEM), `cosign.password` and `cosign.pub`.
//!
//! [`KubernetesKey`] is the signing source. A background task lists the one
//! secret (`fieldSelector=metadata.name=SECRET`, so an RBAC rule restricted by
//! `resourceNames` allows it) and watches it from the list's resourceVersion;
//! when the watch ends (server timeout, `410 Gone`, a broken connection) it lists
//! again, with jittered backoff after errors. Every change is decrypted off the
//! async threads and swapped in atomically, so the next request signs with the
//! rotated key without a restart. A deleted secret, or one that no longer
//! decrypts, drops the last key (AWS-LC cleanses it once in-flight signatures
//! finish) and fails requests with NOT_FOUND / FAILED_PRECONDITION; an API
//! server that is merely unreachable keeps the last key it showed.
//!
//! The key version is the secret's `resourceVersion`; a server that gives none
//! gets a hash of the public key instead (never a hash of the secret data,
//! which would let anyone holding `cosign.key` test password guesses offline).
//!
//! [`create_secret`] is `keybroker generate-key-pair k8s://…`: like cosign's
//! `pkg/cosign/kubernetes/secret.go`, it creates the secret or updates it
//! keeping its other data keys, and marks it `immutable: true` when the server
//! is Kubernetes 1.21 or newer.
//!
//! Kubernetes connection: an explicit kubeconfig path and/or context
//! ([`KubernetesOptions`]), else kube's inference (`KUBECONFIG`,
//! `~/.kube/config`, then the in-cluster service account).

use std::{collections::BTreeMap, fmt, path::PathBuf, sync::Arc, time::Duration};

use futures_util::StreamExt as _;
use k8s_openapi::{api::core::v1::Secret, ByteString};
use kube_client::{
    api::{
        DeleteParams, ListParams, ObjectMeta, PostParams, Preconditions, WatchEvent, WatchParams,
    },
    config::{KubeConfigOptions, Kubeconfig},
    Api, Client, Config,
};
use tokio::sync::watch;
use zeroize::{Zeroize, Zeroizing};

use crate::{
    Capabilities, Error, KeyProvider, P256Signer, Password, PublicKey, Result, Sha256Digest,
    Signature,
};

/// The Kubernetes client crates this module is built on, for callers that
/// manage secrets themselves (tests, tools) with the same versions.
pub use {k8s_openapi, kube_client};

/// The data keys cosign stores a key pair under.
pub mod data_keys {
    /// The cosign-encrypted private key (PEM).
    pub const PRIVATE_KEY: &str = "cosign.key";
    /// Its password.
    pub const PASSWORD: &str = "cosign.password";
    /// The public key (PEM).
    pub const PUBLIC_KEY: &str = "cosign.pub";
}

/// How long a request waits for the first read of a secret.
pub const DEFAULT_FIRST_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Server-side watch timeout asked for (the API server ends the watch then and
/// the watcher lists again).
const WATCH_TIMEOUT_SECS: u32 = 290;

/// Where the Kubernetes API is. Unset: kube's inference (`KUBECONFIG`,
/// `~/.kube/config`, in-cluster service account). Holds no secret.
#[derive(Debug, Clone, Default)]
pub struct KubernetesOptions {
    /// A kubeconfig file to use instead of the inferred configuration.
    pub kubeconfig: Option<PathBuf>,
    /// A context of the kubeconfig other than its current one.
    pub context: Option<String>,
    /// How long a request waits for the first read of the secret (default 10 s).
    pub first_read_timeout: Option<Duration>,
}

/// A Kubernetes API client for `options`.
pub async fn client(options: &KubernetesOptions) -> Result<Client> {
    let config = if options.kubeconfig.is_some() || options.context.is_some() {
        let kubeconfig = match &options.kubeconfig {
            Some(path) => Kubeconfig::read_from(path)
                .map_err(|e| Error::Other(format!("kubeconfig {}: {e}", path.display())))?,
            None => {
                Kubeconfig::read().map_err(|e| Error::Other(format!("reading kubeconfig: {e}")))?
            }
        };
        let kco = KubeConfigOptions {
            context: options.context.clone(),
            ..Default::default()
        };
        Config::from_custom_kubeconfig(kubeconfig, &kco)
            .await
            .map_err(|e| Error::Other(format!("kubeconfig: {e}")))?
    } else {
        Config::infer().await.map_err(|e| {
            Error::Other(format!(
                "no Kubernetes configuration (set KUBECONFIG, or run in a pod with a service account): {e}"
            ))
        })?
    };
    Client::try_from(config).map_err(|e| Error::Other(format!("Kubernetes client: {e}")))
}

/// Maps a kube error on `what` (names only) to the closest case.
fn api_error(what: &str, err: kube_client::Error) -> Error {
    match err {
        kube_client::Error::Api(status) => {
            let msg = format!(
                "{what}: the Kubernetes API answered {} {} ({})",
                status.code, status.reason, status.message
            );
            match status.code {
                404 => Error::NotFound(msg),
                401 => Error::PermissionDenied(format!(
                    "{msg}; the credentials of the kubeconfig or service account were refused"
                )),
                403 => Error::PermissionDenied(format!(
                    "{msg}; grant get, list and watch on this secret (deploy/kubernetes/rbac-secrets.yaml)"
                )),
                429 => Error::ResourceExhausted(msg),
                500..=599 => Error::Unavailable(msg),
                _ => Error::Other(msg),
            }
        }
        other => Error::Unavailable(format!("{what}: Kubernetes API: {other}")),
    }
}

fn is_gone(err: &kube_client::Error) -> bool {
    matches!(err, kube_client::Error::Api(s) if s.code == 410)
}

/// The key version reported when the server gives no resourceVersion: the
/// first 16 hex digits of the SHA-256 of the public key PEM.
pub fn key_version_of(public_pem: &str) -> String {
    Sha256Digest::of(public_pem.as_bytes()).to_hex()[..16].to_string()
}

/// A decrypted key and the version it came with.
struct Loaded {
    signer: Arc<P256Signer>,
    version: String,
    /// SHA-256 over the three data values, to skip decrypting an unchanged
    /// secret again. Kept in memory only, never reported.
    fingerprint: [u8; 32],
}

/// Why there is no key to sign with, kept so every request can get its own error.
#[derive(Clone)]
enum Failure {
    NotFound(String),
    KeyFormat(String),
    PermissionDenied(String),
    Unavailable(String),
    Other(String),
}

impl Failure {
    fn from_error(e: Error) -> Self {
        match e {
            Error::NotFound(m) => Failure::NotFound(m),
            Error::KeyFormat(m) => Failure::KeyFormat(m),
            Error::WrongPassword => Failure::KeyFormat(e.to_string()),
            Error::PermissionDenied(m) => Failure::PermissionDenied(m),
            Error::Unavailable(m) | Error::ResourceExhausted(m) => Failure::Unavailable(m),
            other => Failure::Other(other.to_string()),
        }
    }
    fn to_error(&self) -> Error {
        match self {
            Failure::NotFound(m) => Error::NotFound(m.clone()),
            Failure::KeyFormat(m) => Error::KeyFormat(m.clone()),
            Failure::PermissionDenied(m) => Error::PermissionDenied(m.clone()),
            Failure::Unavailable(m) => Error::Unavailable(m.clone()),
            Failure::Other(m) => Error::Other(m.clone()),
        }
    }
}

/// What the watcher last saw.
#[derive(Clone)]
enum State {
    /// No answer from the API server yet.
    Starting,
    /// The key to sign with.
    Ready(Arc<Loaded>),
    /// No usable key (deleted, malformed, refused, unreachable at start).
    Failed(Failure),
}

/// Aborts the watcher when the key is dropped (e.g. replaced by a config reload).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A cosign key pair in a Kubernetes secret, watched for rotation and deletion.
pub struct KubernetesKey {
    id: String,
    state: watch::Receiver<State>,
    first_read_timeout: Duration,
    _watcher: AbortOnDrop,
}

impl fmt::Debug for KubernetesKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &*self.state.borrow() {
            State::Starting => "starting".to_string(),
            State::Ready(l) => format!("ready (version {})", l.version),
            State::Failed(_) => "failed".to_string(),
        };
        f.debug_struct("KubernetesKey")
            .field("id", &self.id)
            .field("state", &state)
            .finish()
    }
}

impl KubernetesKey {
    /// Starts watching secret `name` of `namespace`. Returns at once; the first
    /// request waits for the first read (up to `first_read_timeout`).
    pub async fn open(namespace: &str, name: &str, options: &KubernetesOptions) -> Result<Self> {
        let client = client(options).await?;
        Ok(Self::with_client(client, namespace, name, options))
    }

    /// As [`open`](Self::open), with a client of the caller's.
    pub fn with_client(
        client: Client,
        namespace: &str,
        name: &str,
        options: &KubernetesOptions,
    ) -> Self {
        let id = format!("k8s://{namespace}/{name}");
        let (tx, rx) = watch::channel(State::Starting);
        let watcher = Watcher {
            api: Api::namespaced(client, namespace),
            id: id.clone(),
            name: name.to_string(),
            tx,
        };
        KubernetesKey {
            id,
            state: rx,
            first_read_timeout: options
                .first_read_timeout
                .unwrap_or(DEFAULT_FIRST_READ_TIMEOUT),
            _watcher: AbortOnDrop(tokio::spawn(watcher.run())),
        }
    }

    async fn current(&self) -> Result<Arc<Loaded>> {
        let mut rx = self.state.clone();
        let waited = tokio::time::timeout(
            self.first_read_timeout,
            rx.wait_for(|s| !matches!(s, State::Starting)),
        )
        .await;
        match waited {
            Err(_) => Err(Error::Unavailable(format!(
                "{}: no answer from the Kubernetes API within {:?}",
                self.id, self.first_read_timeout
            ))),
            Ok(Err(_)) => Err(Error::Unavailable(format!(
                "{}: the secret's watcher stopped",
                self.id
            ))),
            Ok(Ok(state)) => match &*state {
                State::Ready(loaded) => Ok(loaded.clone()),
                State::Failed(f) => Err(f.to_error()),
                State::Starting => Err(Error::Unavailable(format!("{}: starting", self.id))),
            },
        }
    }
}

#[async_trait::async_trait]
impl KeyProvider for KubernetesKey {
    fn key_id(&self) -> &str {
        &self.id
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            sign: true,
            public_key: true,
        }
    }
    async fn sign_digest(&self, digest: &Sha256Digest) -> Result<Signature> {
        let loaded = self.current().await?;
        Ok(Signature {
            der: loaded.signer.sign_digest(digest)?,
            key_version: loaded.version.clone(),
        })
    }
    async fn public_key(&self) -> Result<PublicKey> {
        let loaded = self.current().await?;
        Ok(PublicKey {
            pem: loaded.signer.public_key_pem().to_string(),
            key_version: loaded.version.clone(),
        })
    }
}

/// Exponential backoff with jitter, 200 ms doubling to 30 s.
struct Backoff(u32);

impl Backoff {
    fn next(&mut self) -> Duration {
        let base = 200u64.saturating_mul(1 << self.0.min(8)).min(30_000);
        self.0 = self.0.saturating_add(1);
        let mut jitter = [0u8; 2];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut jitter);
        let jitter = u64::from(u16::from_le_bytes(jitter)) % (base / 2 + 1);
        Duration::from_millis(base / 2 + jitter)
    }
    fn reset(&mut self) {
        self.0 = 0;
    }
}

/// The background task behind one [`KubernetesKey`].
struct Watcher {
    api: Api<Secret>,
    id: String,
    name: String,
    tx: watch::Sender<State>,
}

/// How one list-and-watch round ended.
enum RoundEnd {
    /// The watch ended normally or expired (410): list again at once.
    Expired,
    /// An error: list again after a backoff.
    Failed(Error),
}

impl Watcher {
    async fn run(self) {
        let mut backoff = Backoff(0);
        loop {
            match self.round(&mut backoff).await {
                RoundEnd::Expired => {}
                RoundEnd::Failed(e) => {
                    let delay = backoff.next();
                    tracing::warn!(key = %self.id, error = %e, retry_in = ?delay, "watching the Kubernetes secret failed");
                    self.report_unreachable(e);
                    tokio::time::sleep(delay).await;
                }
            }
            if self.tx.is_closed() {
                return;
            }
        }
    }

    /// An API server that does not answer: keep a key we have (the secret was
    /// not seen to change), but let requests waiting for a first read fail.
    fn report_unreachable(&self, e: Error) {
        self.tx.send_if_modified(|s| match s {
            State::Ready(_) => false,
            _ => {
                *s = State::Failed(Failure::from_error(e));
                true
            }
        });
    }

    /// Lists only this secret: with RBAC restricted by `resourceNames`, list
    /// and watch are allowed only with this field selector.
    fn list_params(&self) -> ListParams {
        ListParams::default().fields(&format!("metadata.name={}", self.name))
    }

    fn watch_params(&self) -> WatchParams {
        WatchParams::default()
            .fields(&format!("metadata.name={}", self.name))
            .timeout(WATCH_TIMEOUT_SECS)
    }

    /// Lists the secret, then watches it from the list's resourceVersion.
    async fn round(&self, backoff: &mut Backoff) -> RoundEnd {
        let what = format!("listing secret {}", self.id);
        let list = match self.api.list(&self.list_params()).await {
            Ok(l) => l,
            Err(e) => return RoundEnd::Failed(api_error(&what, e)),
        };
        let version = list.metadata.resource_version.unwrap_or_default();
        let secret = list
            .items
            .into_iter()
            .find(|s| s.metadata.name.as_deref() == Some(&self.name));
        self.apply(secret).await;

        let what = format!("watching secret {}", self.id);
        let stream = match self.api.watch(&self.watch_params(), &version).await {
            Ok(s) => s,
            Err(e) if is_gone(&e) => return RoundEnd::Expired,
            Err(e) => return RoundEnd::Failed(api_error(&what, e)),
        };
        backoff.reset();
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(WatchEvent::Added(s)) | Ok(WatchEvent::Modified(s)) => {
                    if s.metadata.name.as_deref() == Some(&self.name) {
                        self.apply(Some(s)).await;
                    }
                }
                Ok(WatchEvent::Deleted(s)) => {
                    if s.metadata.name.as_deref() == Some(&self.name) {
                        self.apply(None).await;
                    }
                }
                Ok(WatchEvent::Bookmark(_)) => {}
                Ok(WatchEvent::Error(status)) if status.code == 410 => return RoundEnd::Expired,
                Ok(WatchEvent::Error(status)) => {
                    return RoundEnd::Failed(api_error(&what, kube_client::Error::Api(status)))
                }
                Err(e) => return RoundEnd::Failed(api_error(&what, e)),
            }
            if self.tx.is_closed() {
                return RoundEnd::Expired;
            }
        }
        RoundEnd::Expired
    }

    /// Makes `secret` (or its absence) the current state.
    async fn apply(&self, secret: Option<Secret>) {
        let Some(mut secret) = secret else {
            let was_ready = matches!(*self.tx.borrow(), State::Ready(_));
            self.tx
                .send_replace(State::Failed(Failure::NotFound(format!(
                    "{}: the secret does not exist (create it with keybroker generate-key-pair {})",
                    self.id, self.id
                ))));
            if was_ready {
                tracing::warn!(key = %self.id, "Kubernetes secret deleted; its key is dropped");
            }
            return;
        };
        let resource_version = secret.metadata.resource_version.take().unwrap_or_default();
        let data = SecretData::take(&mut secret);
        let fingerprint = data.fingerprint();
        let previous = match &*self.tx.borrow() {
            State::Ready(l) => Some(l.clone()),
            _ => None,
        };
        if let Some(prev) = previous.filter(|p| p.fingerprint == fingerprint) {
            // Same key material (a re-list, or a label change): no decryption.
            let version = if resource_version.is_empty() {
                prev.version.clone()
            } else {
                resource_version
            };
            if version != prev.version {
                self.tx.send_replace(State::Ready(Arc::new(Loaded {
                    signer: prev.signer.clone(),
                    version,
                    fingerprint,
                })));
            }
            return;
        }
        let id = self.id.clone();
        let decrypted = tokio::task::spawn_blocking(move || data.decrypt(&id)).await;
        let state = match decrypted {
            Ok(Ok(signer)) => {
                let version = if resource_version.is_empty() {
                    key_version_of(signer.public_key_pem())
                } else {
                    resource_version
                };
                tracing::info!(key = %self.id, version = %version, "Kubernetes secret read; signing with its key");
                State::Ready(Arc::new(Loaded {
                    signer: Arc::new(signer),
                    version,
                    fingerprint,
                }))
            }
            Ok(Err(e)) => {
                tracing::warn!(key = %self.id, error = %e, "Kubernetes secret holds no usable key");
                State::Failed(Failure::from_error(e))
            }
            Err(e) => State::Failed(Failure::Other(format!("{}: decrypting: {e}", self.id))),
        };
        self.tx.send_replace(state);
    }
}

/// The three data values of a secret, zeroized on drop.
struct SecretData {
    key: Option<Zeroizing<Vec<u8>>>,
    password: Option<Zeroizing<Vec<u8>>>,
    public: Option<Zeroizing<Vec<u8>>>,
}

impl SecretData {
    /// Moves the cosign values out of `secret` and wipes every data value it held.
    fn take(secret: &mut Secret) -> Self {
        let mut data = secret.data.take().unwrap_or_default();
        let mut take = |k: &str| data.remove(k).map(|ByteString(v)| Zeroizing::new(v));
        let out = SecretData {
            key: take(data_keys::PRIVATE_KEY),
            password: take(data_keys::PASSWORD),
            public: take(data_keys::PUBLIC_KEY),
        };
        for (_, ByteString(mut v)) in data {
            v.zeroize();
        }
        if let Some(mut s) = secret.string_data.take() {
            for v in s.values_mut() {
                v.zeroize();
            }
        }
        out
    }

    fn fingerprint(&self) -> [u8; 32] {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        for v in [&self.key, &self.password, &self.public] {
            match v {
                Some(v) => {
                    h.update((v.len() as u64).to_be_bytes());
                    h.update(v.as_slice());
                }
                None => h.update(u64::MAX.to_be_bytes()),
            }
        }
        h.finalize().into()
    }

    /// Decrypts `cosign.key` with `cosign.password`; checks `cosign.pub` if present.
    fn decrypt(&self, id: &str) -> Result<P256Signer> {
        let missing = |k: &str| {
            Error::KeyFormat(format!(
                "{id}: the secret has no data key {k} (cosign's layout: {}, {}, {}; keybroker generate-key-pair {id} writes it)",
                data_keys::PRIVATE_KEY,
                data_keys::PASSWORD,
                data_keys::PUBLIC_KEY
            ))
        };
        let key = self
            .key
            .as_ref()
            .ok_or_else(|| missing(data_keys::PRIVATE_KEY))?;
        let password = self
            .password
            .as_ref()
            .ok_or_else(|| missing(data_keys::PASSWORD))?;
        let pem = std::str::from_utf8(key).map_err(|_| {
            Error::KeyFormat(format!("{id}: {} is not PEM text", data_keys::PRIVATE_KEY))
        })?;
        let password = Password::new(password.to_vec());
        let signer = P256Signer::from_pem(pem, Some(&password)).map_err(|e| match e {
            Error::WrongPassword => Error::KeyFormat(format!(
                "{id}: {} does not decrypt with {} (wrong password or corrupted key)",
                data_keys::PRIVATE_KEY,
                data_keys::PASSWORD
            )),
            Error::KeyFormat(m) => {
                Error::KeyFormat(format!("{id}: {}: {m}", data_keys::PRIVATE_KEY))
            }
            other => other,
        })?;
        if let Some(public) = &self.public {
            let stored = std::str::from_utf8(public)
                .ok()
                .and_then(|p| crate::ecdsa::normalize_public_pem(p).ok());
            if stored.as_deref() != Some(signer.public_key_pem()) {
                return Err(Error::KeyFormat(format!(
                    "{id}: {} does not match the public key of {}",
                    data_keys::PUBLIC_KEY,
                    data_keys::PRIVATE_KEY
                )));
            }
        }
        Ok(signer)
    }
}

/// What [`create_secret`] did.
#[derive(Debug, Clone)]
pub struct CreatedSecret {
    /// The new public key (PEM).
    pub public_pem: String,
    /// The secret existed and was updated (its other data keys kept).
    pub updated: bool,
    /// The secret is marked `immutable: true` (Kubernetes ≥ 1.21).
    pub immutable: bool,
}

/// Whether the server supports immutable secrets (Kubernetes ≥ 1.21), as cosign decides.
async fn immutable_supported(client: &Client) -> Result<bool> {
    let info = client
        .apiserver_version()
        .await
        .map_err(|e| api_error("reading the Kubernetes server version", e))?;
    let num = |s: &str| -> Option<u32> {
        s.trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse()
            .ok()
    };
    Ok(match (num(&info.major), num(&info.minor)) {
        (Some(major), Some(minor)) => major > 1 || (major == 1 && minor >= 21),
        _ => false,
    })
}

/// Generates a P-256 key pair, encrypts it with `password` in cosign's format
/// and stores it in secret `name` of `namespace` (`cosign.key`, `cosign.password`,
/// `cosign.pub`): creates the secret, or updates it keeping its other data keys
/// and metadata. A secret that already holds `cosign.key` is replaced only with
/// `force`; an immutable one is then deleted and created again.
pub async fn create_secret(
    namespace: &str,
    name: &str,
    password: &Password,
    force: bool,
    options: &KubernetesOptions,
) -> Result<CreatedSecret> {
    let id = format!("k8s://{namespace}/{name}");
    let client = client(options).await?;
    let immutable = immutable_supported(&client).await?;
    let api: Api<Secret> = Api::namespaced(client, namespace);

    let (signer, der) = P256Signer::generate()?;
    let encrypted = Zeroizing::new(crate::cosign_key::encrypt_pem(&der, password.expose())?);
    let public_pem = signer.public_key_pem().to_string();
    let mut cosign_data = BTreeMap::new();
    cosign_data.insert(
        data_keys::PRIVATE_KEY.to_string(),
        ByteString(encrypted.as_bytes().to_vec()),
    );
    cosign_data.insert(
        data_keys::PASSWORD.to_string(),
        ByteString(password.expose().to_vec()),
    );
    cosign_data.insert(
        data_keys::PUBLIC_KEY.to_string(),
        ByteString(public_pem.clone().into_bytes()),
    );

    let existing = api
        .get_opt(name)
        .await
        .map_err(|e| api_error(&format!("reading secret {id}"), e))?;
    let result = match existing {
        None => {
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    namespace: Some(namespace.to_string()),
                    ..Default::default()
                },
                data: Some(cosign_data),
                immutable: immutable.then_some(true),
                ..Default::default()
            };
            let r = api
                .create(&PostParams::default(), &secret)
                .await
                .map(|_| false)
                .map_err(|e| api_error(&format!("creating secret {id}"), e));
            wipe(secret);
            r
        }
        Some(mut old) => {
            let mut data = old.data.take().unwrap_or_default();
            if data.contains_key(data_keys::PRIVATE_KEY) && !force {
                wipe_map(data);
                wipe_map(cosign_data);
                return Err(Error::InvalidArgument(format!(
                    "{id} already holds a key pair ({}); pass --force to replace it",
                    data_keys::PRIVATE_KEY
                )));
            }
            let was_immutable = old.immutable == Some(true);
            data.extend(cosign_data);
            let mut metadata = old.metadata.clone();
            if was_immutable {
                // Kubernetes refuses any change to an immutable secret's data:
                // replace it (only if it is still the object we read).
                metadata.resource_version = None;
                metadata.uid = None;
                metadata.creation_timestamp = None;
                metadata.managed_fields = None;
            }
            let secret = Secret {
                metadata,
                data: Some(data),
                immutable: immutable.then_some(true),
                type_: old.type_.clone(),
                ..Default::default()
            };
            let r = if was_immutable {
                let dp = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: old.metadata.uid.clone(),
                        resource_version: old.metadata.resource_version.clone(),
                    }),
                    ..Default::default()
                };
                match api.delete(name, &dp).await {
                    Ok(_) => api
                        .create(&PostParams::default(), &secret)
                        .await
                        .map(|_| true)
                        .map_err(|e| api_error(&format!("re-creating immutable secret {id}"), e)),
                    Err(e) => Err(api_error(&format!("deleting immutable secret {id}"), e)),
                }
            } else {
                api.replace(name, &PostParams::default(), &secret)
                    .await
                    .map(|_| true)
                    .map_err(|e| api_error(&format!("updating secret {id}"), e))
            };
            wipe(secret);
            r
        }
    };
    Ok(CreatedSecret {
        public_pem,
        updated: result?,
        immutable,
    })
}

fn wipe_map(data: BTreeMap<String, ByteString>) {
    for (_, ByteString(mut v)) in data {
        v.zeroize();
    }
}

fn wipe(mut secret: Secret) {
    if let Some(d) = secret.data.take() {
        wipe_map(d);
    }
}

/// Reads `cosign.pub` of `k8s://NAMESPACE/SECRET` (what `keybroker public-key` prints).
pub async fn read_public_key(
    namespace: &str,
    name: &str,
    options: &KubernetesOptions,
) -> Result<String> {
    let id = format!("k8s://{namespace}/{name}");
    let api: Api<Secret> = Api::namespaced(client(options).await?, namespace);
    let mut secret = api
        .get(name)
        .await
        .map_err(|e| api_error(&format!("reading secret {id}"), e))?;
    let data = SecretData::take(&mut secret);
    let public = data.public.as_ref().ok_or_else(|| {
        Error::NotFound(format!(
            "{id}: the secret has no data key {}",
            data_keys::PUBLIC_KEY
        ))
    })?;
    let pem = std::str::from_utf8(public).map_err(|_| {
        Error::KeyFormat(format!("{id}: {} is not PEM text", data_keys::PUBLIC_KEY))
    })?;
    crate::ecdsa::normalize_public_pem(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_bounded() {
        let mut b = Backoff(0);
        let first = b.next();
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(200));
        for _ in 0..20 {
            assert!(b.next() <= Duration::from_secs(30));
        }
        assert!(b.next() >= Duration::from_secs(15));
        b.reset();
        assert!(b.next() <= Duration::from_millis(200));
    }

    #[test]
    fn fingerprint_tells_missing_from_empty() {
        let a = SecretData {
            key: Some(Zeroizing::new(vec![])),
            password: None,
            public: None,
        };
        let b = SecretData {
            key: None,
            password: Some(Zeroizing::new(vec![])),
            public: None,
        };
        assert_ne!(a.fingerprint(), b.fingerprint());
    }

    fn status(code: u16, reason: &str) -> kube_client::Error {
        kube_client::Error::Api(Box::new(kube_client::core::Status {
            code,
            reason: reason.into(),
            message: "m".into(),
            ..Default::default()
        }))
    }

    #[test]
    fn api_errors_map_to_what_a_caller_can_act_on() {
        assert!(matches!(
            api_error("x", status(404, "NotFound")),
            Error::NotFound(_)
        ));
        // kmock has no RBAC: the 403 path is checked here.
        let e = api_error("reading secret k8s://ns/s", status(403, "Forbidden"));
        assert!(
            matches!(&e, Error::PermissionDenied(m) if m.contains("rbac-secrets.yaml") && m.contains("k8s://ns/s")),
            "{e}"
        );
        assert!(matches!(
            api_error("x", status(401, "Unauthorized")),
            Error::PermissionDenied(_)
        ));
        assert!(matches!(
            api_error("x", status(429, "TooManyRequests")),
            Error::ResourceExhausted(_)
        ));
        assert!(matches!(
            api_error("x", status(503, "ServiceUnavailable")),
            Error::Unavailable(_)
        ));
        assert!(is_gone(&status(410, "Expired")));
        assert!(!is_gone(&status(404, "NotFound")));
    }

    fn test_watcher(name: &str) -> (Watcher, watch::Receiver<State>) {
        // Never connects: apply() makes no request. https, so building the
        // client also builds the rustls connector (one crypto provider: AWS-LC).
        let config = Config::new("https://127.0.0.1:9".parse().expect("uri"));
        let client = Client::try_from(config).expect("client");
        let (tx, rx) = watch::channel(State::Starting);
        (
            Watcher {
                api: Api::namespaced(client, "ns"),
                id: format!("k8s://ns/{name}"),
                name: name.into(),
                tx,
            },
            rx,
        )
    }

    #[test]
    fn list_and_watch_select_the_one_secret() {
        // RBAC with resourceNames allows list/watch only with this selector.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        let _guard = rt.enter();
        let (w, _rx) = test_watcher("cosign");
        let req = kube_client::core::Request::new("/api/v1/namespaces/ns/secrets");
        let list = req.list(&w.list_params()).expect("list");
        assert!(
            list.uri()
                .to_string()
                .contains("fieldSelector=metadata.name%3Dcosign"),
            "{}",
            list.uri()
        );
        let watch = req.watch(&w.watch_params(), "7").expect("watch");
        let uri = watch.uri().to_string();
        assert!(
            uri.contains("fieldSelector=metadata.name%3Dcosign")
                && uri.contains("watch=true")
                && uri.contains("resourceVersion=7"),
            "{uri}"
        );
    }

    fn cosign_secret(password: &str, resource_version: Option<&str>) -> Secret {
        let (signer, der) = P256Signer::generate().expect("generate");
        let pem = crate::cosign_key::encrypt_pem(&der, password.as_bytes()).expect("encrypt");
        let mut data = BTreeMap::new();
        data.insert(data_keys::PRIVATE_KEY.into(), ByteString(pem.into_bytes()));
        data.insert(
            data_keys::PASSWORD.into(),
            ByteString(password.as_bytes().to_vec()),
        );
        data.insert(
            data_keys::PUBLIC_KEY.into(),
            ByteString(signer.public_key_pem().as_bytes().to_vec()),
        );
        Secret {
            metadata: ObjectMeta {
                name: Some("cosign".into()),
                resource_version: resource_version.map(String::from),
                ..Default::default()
            },
            data: Some(data),
            ..Default::default()
        }
    }

    fn ready(rx: &watch::Receiver<State>) -> Arc<Loaded> {
        match &*rx.borrow() {
            State::Ready(l) => l.clone(),
            _ => panic!("not ready"),
        }
    }

    #[tokio::test]
    async fn resource_version_is_the_key_version_and_deletion_drops_the_key() {
        // kmock gives no resourceVersion; this is the path a real server takes.
        let (w, rx) = test_watcher("cosign");
        let secret = cosign_secret("pw", Some("41"));
        w.apply(Some(secret.clone())).await;
        let first = ready(&rx);
        assert_eq!(first.version, "41");
        // Same data at a new resourceVersion (say, a label changed): new
        // version, same signer, no second decryption.
        let mut relabelled = secret.clone();
        relabelled.metadata.resource_version = Some("42".into());
        w.apply(Some(relabelled)).await;
        let second = ready(&rx);
        assert_eq!(second.version, "42");
        assert!(Arc::ptr_eq(&first.signer, &second.signer));
        // Deleted: requests get NotFound and the watcher holds the key no more.
        let signer = second.signer.clone();
        drop((first, second));
        w.apply(None).await;
        assert!(matches!(&*rx.borrow(), State::Failed(Failure::NotFound(_))));
        assert_eq!(
            Arc::strong_count(&signer),
            1,
            "the deleted key is still referenced"
        );
    }

    #[tokio::test]
    async fn unreachable_server_keeps_a_key_but_fails_a_first_read() {
        let (w, rx) = test_watcher("cosign");
        w.report_unreachable(Error::Unavailable("down".into()));
        assert!(matches!(
            &*rx.borrow(),
            State::Failed(Failure::Unavailable(_))
        ));
        w.apply(Some(cosign_secret("pw", Some("1")))).await;
        w.report_unreachable(Error::Unavailable("down".into()));
        assert_eq!(ready(&rx).version, "1");
    }

    #[test]
    fn failures_keep_their_kind() {
        let f = Failure::from_error(Error::NotFound("gone".into()));
        assert!(matches!(f.to_error(), Error::NotFound(m) if m == "gone"));
        let f = Failure::from_error(Error::WrongPassword);
        assert!(matches!(f.to_error(), Error::KeyFormat(_)));
    }
}
