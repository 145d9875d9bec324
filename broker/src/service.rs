//! The gRPC service: translate proto ↔ domain, ask policy, call the provider.
//! No business logic beyond that.

use std::{collections::BTreeMap, sync::Arc};

use keybroker_proto::v1::{
    key_broker_server::KeyBroker, AttestImageRequest, AttestImageResponse, KeyInfo,
    ListKeysRequest, ListKeysResponse, PublicKeyRequest, PublicKeyResponse, SignImageRequest,
    SignImageResponse, SignMessageRequest, SignMessageResponse, SignRequest, SignResponse,
};
use keybroker_providers::{PublicKey, Sha256Digest, ALGORITHM};
use tonic::{Request, Response, Status};

use crate::{
    attest,
    audit::AuditLog,
    identity::Caller,
    keys::KeyEntry,
    message, payload,
    policy::{Action, Policy},
    status,
};

const MAX_ALIAS_LEN: usize = 128;
const MAX_ANNOTATIONS: usize = 64;
const MAX_ANNOTATION_BYTES: usize = 4096;

/// Immutable state shared by every request.
#[derive(Debug)]
pub struct State {
    /// Keys by alias.
    pub keys: BTreeMap<String, Arc<KeyEntry>>,
    /// The compiled policy.
    pub policy: Policy,
    /// Rate limits (reset by a reload).
    pub limits: crate::limits::Limiter,
    /// Trusted OIDC issuers.
    pub oidc: crate::oidc::Issuers,
    /// The `[timestamp]` authority, if one is configured.
    pub timestamp: Option<Arc<crate::timestamp::Tsa>>,
    /// Where decisions are recorded; `None` when `server.audit_log` is unset.
    /// Survives reloads (the daemon carries it into each new state).
    pub audit: Option<Arc<AuditLog>>,
}

/// One audit record under construction (audit.rs writes it and chains it).
struct Audit {
    log: Option<Arc<AuditLog>>,
    record: serde_json::Map<String, serde_json::Value>,
    /// For the metrics: the RPC, and the key alias if the broker has it (an
    /// unknown alias is counted as "(unknown)", so callers cannot mint labels).
    rpc: &'static str,
    metrics_key: String,
}

impl Audit {
    fn new(state: &State, rpc: &'static str, caller: &Caller, key: &str) -> Self {
        use serde_json::json;
        let mut record = serde_json::Map::new();
        if state.audit.is_some() {
            let now = time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            record.insert("time".into(), json!(now));
            record.insert("rpc".into(), json!(rpc));
            record.insert("caller".into(), caller.audit_json());
            record.insert("key".into(), json!(key));
            if let Some(entry) = state.keys.get(key) {
                record.insert("key_id".into(), json!(entry.provider.key_id()));
            }
        }
        Audit {
            log: state.audit.clone(),
            record,
            rpc,
            metrics_key: if state.keys.contains_key(key) {
                key.to_string()
            } else {
                "(unknown)".to_string()
            },
        }
    }

    fn set(&mut self, k: &str, v: impl Into<serde_json::Value>) {
        if self.log.is_some() {
            self.record.insert(k.into(), v.into());
        }
    }

    /// Writes the record with its decision; durable when this returns Ok.
    async fn write(&mut self, decision: &str, reason: Option<String>) -> Result<(), Status> {
        let Some(log) = self.log.take() else {
            crate::metrics::count_request(self.rpc, &self.metrics_key, decision);
            return Ok(());
        };
        let mut record = std::mem::take(&mut self.record);
        record.insert("decision".into(), decision.into());
        if let Some(r) = reason {
            record.insert("reason".into(), r.into());
        }
        let (rpc, key) = (self.rpc, std::mem::take(&mut self.metrics_key));
        match log.append(record).await {
            Ok(()) => {
                crate::metrics::count_request(rpc, &key, decision);
                Ok(())
            }
            Err(e) => {
                crate::metrics::count_request(rpc, &key, "audit_failed");
                Err(Status::unavailable(format!(
                    "audit log unavailable, so no signature was issued: {e}"
                )))
            }
        }
    }

    /// Records a refusal; the caller gets `status` either way (a failing audit
    /// log is logged, it does not turn a denial into something else).
    async fn refuse(&mut self, decision: &str, status: Status) -> Status {
        if let Err(e) = self
            .write(decision, Some(status.message().to_string()))
            .await
        {
            tracing::error!("{}", e.message());
        }
        status
    }
}

/// One signing request on its way: who asks, the state it started with (a
/// reload does not change it), and its audit record. Every signing RPC goes
/// `begin` → `entry` → its own validation (`invalid`) → `authorize` → `sign`,
/// so each refusal and each signature is recorded the same way.
struct Call {
    caller: Caller,
    token: Option<crate::oidc::Token>,
    state: Arc<State>,
    audit: Audit,
    key: String,
}

impl Call {
    /// The requested key; an unknown alias is refused (and recorded).
    async fn entry(&mut self) -> Result<Arc<KeyEntry>, Status> {
        match self.state.key(&self.key) {
            Ok(e) => Ok(e.clone()),
            Err(s) => Err(self.audit.refuse("denied", s).await),
        }
    }

    /// Records a malformed request and returns its status.
    async fn invalid(&mut self, status: Status) -> Status {
        self.audit.refuse("invalid", status).await
    }

    /// The policy decision for one action; a denial is logged, recorded, and
    /// its message prefixed with `context` when that is not empty.
    async fn check(&mut self, action: &Action<'_>, context: &str) -> Result<(), Status> {
        match self
            .state
            .policy
            .check_with_token(&self.caller, self.token.as_ref(), action)
        {
            Ok(()) => Ok(()),
            Err(d) => {
                let mut status = deny(&self.caller, &self.key, d);
                if !context.is_empty() {
                    status = Status::new(status.code(), format!("{context}{}", status.message()));
                }
                Err(self.audit.refuse("denied", status).await)
            }
        }
    }

    /// The caller's and the key's rate limits.
    async fn limit(&mut self) -> Result<(), Status> {
        match self
            .state
            .limits
            .check(&self.caller.payload_identity(), &self.key)
        {
            Ok(()) => Ok(()),
            Err(l) => Err(self
                .audit
                .refuse("rate_limited", status::from_limited(&l))
                .await),
        }
    }

    /// Policy, then rate limits.
    async fn authorize(&mut self, action: &Action<'_>) -> Result<(), Status> {
        self.check(action, "").await?;
        self.limit().await
    }

    /// Signs a SHA-256 digest with the key; the record is on disk before the
    /// signature leaves the daemon. Returns the DER signature and key info.
    async fn sign(
        self,
        entry: &KeyEntry,
        digest: &Sha256Digest,
    ) -> Result<(Vec<u8>, KeyInfo), Status> {
        let (der, key, _) = self.sign_stamped(entry, digest, false).await?;
        Ok((der, key))
    }

    /// [`Call::sign`], and when `stamp` is set an RFC 3161 timestamp over the
    /// signature, obtained before the record is written: a signature whose
    /// promised timestamp failed is refused (and recorded as such), not handed out.
    async fn sign_stamped(
        mut self,
        entry: &KeyEntry,
        digest: &Sha256Digest,
        stamp: bool,
    ) -> Result<(Vec<u8>, KeyInfo, Vec<u8>), Status> {
        let started = std::time::Instant::now();
        let signed = entry.provider.sign_digest(digest).await;
        crate::metrics::observe_backend(&self.key, signed.is_ok(), started.elapsed());
        let sig = match signed {
            Ok(s) => s,
            Err(e) => return Err(self.audit.refuse("failed", status::from_provider(&e)).await),
        };
        self.audit.set("key_version", sig.key_version.clone());
        let timestamp = if stamp {
            self.timestamp(&sig.der).await?
        } else {
            Vec::new()
        };
        self.audit.write("allowed", None).await?;
        let key = signed_key_info(entry, &sig.key_version).await?;
        Ok((sig.der, key, timestamp))
    }

    /// An RFC 3161 timestamp over `signature` from the configured timestamp
    /// authority — its TimeStampResp (DER), what a bundle's `signedTimestamp`
    /// holds — checked as a verifier will check it; empty when none is
    /// configured. A TSA that fails makes the whole call UNAVAILABLE
    /// (recorded as "failed"): a bundle without the timestamp it was promised
    /// is worse than a retry, and a strict verifier would refuse it anyway.
    async fn timestamp(&mut self, signature: &[u8]) -> Result<Vec<u8>, Status> {
        let Some(tsa) = self.state.timestamp.clone() else {
            return Ok(Vec::new());
        };
        match tsa.stamp(signature).await {
            Ok(stamp) => {
                self.audit.set(
                    "timestamp",
                    serde_json::json!({
                        "tsa": tsa.url(),
                        "gen_time": stamp.gen_time,
                        "serial": stamp.serial,
                    }),
                );
                Ok(stamp.response)
            }
            Err(why) => {
                tracing::warn!(tsa = tsa.url(), "timestamp failed: {why}");
                self.audit.set(
                    "timestamp",
                    serde_json::json!({"tsa": tsa.url(), "error": why}),
                );
                let status = Status::unavailable(format!(
                    "timestamp authority {}: {why}; no signature handed out",
                    tsa.url()
                ));
                Err(self.audit.refuse("failed", status).await)
            }
        }
    }
}

/// `SignImageRequest.format` for cosign's classic simple-signing payload (the default).
pub const FORMAT_SIMPLE_SIGNING: &str = "simple-signing";
/// `SignImageRequest.format` for cosign v3's in-toto statement in DSSE (a Sigstore bundle).
pub const FORMAT_SIGSTORE_BUNDLE: &str = "sigstore-bundle";

/// The KeyBroker service.
#[derive(Debug, Clone)]
pub struct BrokerService {
    state: crate::SharedState,
}

impl BrokerService {
    /// Wraps the (reloadable) state.
    pub fn new(state: crate::SharedState) -> Self {
        BrokerService { state }
    }

    /// Starts a signing request: header, caller, ID token, audit record.
    async fn begin<T>(
        &self,
        req: &Request<T>,
        rpc: &'static str,
        key: &str,
    ) -> Result<Call, Status> {
        let caller = caller(req)?;
        let state = self.state.load_full();
        let token = id_token(&state, req).await?;
        let mut audit = Audit::new(&state, rpc, &caller, key);
        if let Some(t) = &token {
            audit.set(
                "oidc",
                serde_json::json!({"iss": t.issuer, "sub": t.subject}),
            );
        }
        Ok(Call {
            caller,
            token,
            state,
            audit,
            key: key.to_string(),
        })
    }
}

impl State {
    fn key(&self, alias: &str) -> Result<&Arc<KeyEntry>, Status> {
        if alias.is_empty() || alias.len() > MAX_ALIAS_LEN {
            return Err(Status::invalid_argument(format!(
                "key alias must be 1..={MAX_ALIAS_LEN} bytes"
            )));
        }
        self.keys.get(alias).ok_or_else(|| {
            Status::not_found(format!(
                "no key {alias:?} in this broker (keybroker keys lists them)"
            ))
        })
    }
}

/// The checks of a SignImage request that need no policy: reference, digest,
/// annotation count, sizes and the reserved `keybroker.dev/` prefix.
fn validate_sign_image(
    docker_reference: &str,
    manifest_digest: &str,
    raw: std::collections::HashMap<String, String>,
) -> Result<BTreeMap<String, String>, Status> {
    payload::validate_docker_reference(docker_reference).map_err(Status::invalid_argument)?;
    payload::validate_manifest_digest(manifest_digest).map_err(Status::invalid_argument)?;
    if raw.len() > MAX_ANNOTATIONS {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_ANNOTATIONS} annotations"
        )));
    }
    let mut annotations = BTreeMap::new();
    for (k, v) in raw {
        if k.is_empty() || k.len() + v.len() > MAX_ANNOTATION_BYTES {
            return Err(Status::invalid_argument(format!(
                "annotation {k:?}: empty key or over {MAX_ANNOTATION_BYTES} bytes"
            )));
        }
        if k.starts_with(payload::RESERVED_PREFIX) {
            return Err(Status::invalid_argument(format!(
                "annotation {k:?}: keys under {} are set by the broker, not by callers",
                payload::RESERVED_PREFIX
            )));
        }
        annotations.insert(k, v);
    }
    Ok(annotations)
}

/// The checks of an AttestImage request that need no policy; the predicate object.
fn validate_attest_image(r: &AttestImageRequest) -> Result<serde_json::Value, String> {
    payload::validate_docker_reference(&r.docker_reference)?;
    payload::validate_manifest_digest(&r.manifest_digest)?;
    attest::validate_predicate_type(&r.predicate_type)?;
    attest::parse_predicate(&r.predicate)
}

/// Refuses a call without `keybroker-request: true` (see keybroker_proto::REQUEST_HEADER).
fn require_header<T>(req: &Request<T>) -> Result<(), Status> {
    match req.metadata().get(keybroker_proto::REQUEST_HEADER) {
        Some(v) if v == keybroker_proto::REQUEST_HEADER_VALUE => Ok(()),
        _ => Err(Status::invalid_argument(format!(
            "missing the \"{}: {}\" request header (keybroker clients send it; with grpcurl add -H '{}: {}')",
            keybroker_proto::REQUEST_HEADER,
            keybroker_proto::REQUEST_HEADER_VALUE,
            keybroker_proto::REQUEST_HEADER,
            keybroker_proto::REQUEST_HEADER_VALUE
        ))),
    }
}

fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    require_header(req)?;
    Caller::from_request(req)
        .ok_or_else(|| Status::unauthenticated("caller identity unavailable (no peer credentials)"))
}

/// The verified ID token of a request (`authorization: Bearer …`), if it sent
/// one. A token that does not verify is an error, never "no token".
async fn id_token<T>(
    state: &State,
    req: &Request<T>,
) -> Result<Option<crate::oidc::Token>, Status> {
    let Some(v) = req.metadata().get("authorization") else {
        return Ok(None);
    };
    let v = v
        .to_str()
        .map_err(|_| Status::unauthenticated("authorization header is not ASCII"))?;
    let token = v
        .strip_prefix("Bearer ")
        .ok_or_else(|| Status::unauthenticated("authorization must be \"Bearer ID-TOKEN\""))?;
    match state.oidc.verify(token.trim()).await {
        Ok(t) => Ok(Some(t)),
        Err(crate::oidc::TokenError::Invalid(m)) => Err(Status::unauthenticated(m)),
        Err(crate::oidc::TokenError::Unavailable(m)) => Err(Status::unavailable(m)),
    }
}

fn key_info(entry: &KeyEntry, public: PublicKey) -> KeyInfo {
    KeyInfo {
        alias: entry.alias.clone(),
        key_id: entry.provider.key_id().to_string(),
        version: public.key_version,
        public_key_pem: public.pem,
        algorithm: ALGORITHM.to_string(),
    }
}

/// Key info for a fresh signature: the public key of the version that signed.
async fn signed_key_info(entry: &KeyEntry, sig_version: &str) -> Result<KeyInfo, Status> {
    let public = entry
        .public_for_version(sig_version)
        .await
        .map_err(|e| status::from_provider(&e))?;
    Ok(key_info(entry, public))
}

fn deny(caller: &Caller, key: &str, d: crate::policy::Denied) -> Status {
    tracing::warn!(%caller, exe = caller.executable().as_deref().unwrap_or("?"), key, reason = %d, "denied");
    status::from_denied(&d)
}

#[tonic::async_trait]
impl KeyBroker for BrokerService {
    async fn sign_image(
        &self,
        req: Request<SignImageRequest>,
    ) -> Result<Response<SignImageResponse>, Status> {
        let mut call = self.begin(&req, "SignImage", &req.get_ref().key).await?;
        let r = req.into_inner();
        call.audit.set("image", r.docker_reference.clone());
        call.audit.set("digest", r.manifest_digest.clone());
        let entry = call.entry().await?;
        let bundle = match r.format.as_str() {
            "" | FORMAT_SIMPLE_SIGNING => false,
            FORMAT_SIGSTORE_BUNDLE => true,
            other => {
                let m = format!(
                    "unknown format {other:?}: expected {FORMAT_SIMPLE_SIGNING:?} or {FORMAT_SIGSTORE_BUNDLE:?}"
                );
                return Err(call.invalid(Status::invalid_argument(m)).await);
            }
        };
        if bundle {
            call.audit.set("format", FORMAT_SIGSTORE_BUNDLE);
        }
        // A malformed request is refused before the policy, but still recorded
        // (a forged keybroker.dev/* annotation is worth an audit line).
        let mut annotations =
            match validate_sign_image(&r.docker_reference, &r.manifest_digest, r.annotations) {
                Ok(a) => a,
                Err(s) => return Err(call.invalid(s).await),
            };
        call.audit
            .set("annotations", serde_json::json!(annotations));
        call.authorize(&Action::SignImage {
            key: &r.key,
            image: &r.docker_reference,
            annotations: &annotations,
        })
        .await?;
        annotations.insert(
            payload::CALLER_ANNOTATION.to_string(),
            call.caller.payload_identity(),
        );
        if let Some(t) = &call.token {
            annotations.insert(
                payload::OIDC_ANNOTATION.to_string(),
                format!("iss={} sub={}", t.issuer, t.subject),
            );
        }
        let caller = call.caller.clone();
        if bundle {
            // cosign v3's statement: annotations on the subject, no name.
            let statement = attest::sign_statement(&r.manifest_digest, &annotations);
            let pae = attest::pae(attest::PAYLOAD_TYPE, &statement);
            let digest = Sha256Digest::of(&pae);
            call.audit.set(
                "statement_sha256",
                hex::encode(Sha256Digest::of(&statement).as_bytes()),
            );
            call.audit.set("pae_sha256", hex::encode(digest.as_bytes()));
            let (signature, key, timestamp) = call.sign_stamped(&entry, &digest, true).await?;
            tracing::info!(%caller, key = %r.key, image = %r.docker_reference, digest = %r.manifest_digest, "signed image (sigstore bundle)");
            return Ok(Response::new(SignImageResponse {
                envelope: attest::envelope(&statement, &signature),
                payload: statement,
                signature,
                key: Some(key),
                timestamp,
            }));
        }
        let body = payload::simple_signing(&r.docker_reference, &r.manifest_digest, &annotations);
        let payload_digest = Sha256Digest::of(&body);
        call.audit
            .set("payload_sha256", hex::encode(payload_digest.as_bytes()));
        let (signature, key) = call.sign(&entry, &payload_digest).await?;
        tracing::info!(%caller, key = %r.key, image = %r.docker_reference, digest = %r.manifest_digest, "signed image");
        Ok(Response::new(SignImageResponse {
            payload: body,
            signature,
            key: Some(key),
            ..Default::default()
        }))
    }

    async fn sign(&self, req: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let mut call = self.begin(&req, "Sign", &req.get_ref().key).await?;
        let r = req.into_inner();
        let entry = call.entry().await?;
        let digest = match Sha256Digest::try_from(r.digest.as_slice()) {
            Ok(d) => d,
            Err(e) => return Err(call.invalid(status::from_provider(&e)).await),
        };
        call.audit.set(
            "digest",
            format!("sha256:{}", hex::encode(digest.as_bytes())),
        );
        call.authorize(&Action::SignDigest { key: &r.key }).await?;
        let caller = call.caller.clone();
        let (signature, key) = call.sign(&entry, &digest).await?;
        tracing::debug!(%caller, key = %r.key, ?digest, "signed digest");
        Ok(Response::new(SignResponse {
            signature,
            key: Some(key),
        }))
    }

    async fn public_key(
        &self,
        req: Request<PublicKeyRequest>,
    ) -> Result<Response<PublicKeyResponse>, Status> {
        // Public keys are public: any caller who can reach the socket may read them.
        require_header(&req)?;
        let state = self.state.load_full();
        let entry = state.key(&req.get_ref().key)?;
        let public = entry
            .public_key()
            .await
            .map_err(|e| status::from_provider(&e))?;
        Ok(Response::new(PublicKeyResponse {
            key: Some(key_info(entry, public)),
        }))
    }

    async fn list_keys(
        &self,
        req: Request<ListKeysRequest>,
    ) -> Result<Response<ListKeysResponse>, Status> {
        let caller = caller(&req)?;
        let state = self.state.load_full();
        let token = id_token(&state, &req).await?;
        let keys = state
            .keys
            .values()
            .filter(|e| state.policy.may_use_key(&caller, token.as_ref(), &e.alias))
            // No backend calls here: a key whose backend has not answered yet is
            // listed without a public key.
            .map(|e| {
                let public = e.cached_public().unwrap_or(PublicKey {
                    pem: String::new(),
                    key_version: String::new(),
                });
                key_info(e, public)
            })
            .collect();
        Ok(Response::new(ListKeysResponse { keys }))
    }

    async fn sign_message(
        &self,
        req: Request<SignMessageRequest>,
    ) -> Result<Response<SignMessageResponse>, Status> {
        use message::Kind;
        let mut call = self.begin(&req, "SignMessage", &req.get_ref().key).await?;
        let r = req.into_inner();
        let digest = Sha256Digest::of(&r.message);
        call.audit
            .set("message_sha256", hex::encode(digest.as_bytes()));
        let entry = call.entry().await?;
        let kind = match message::classify(&r.message) {
            Ok(k) => k,
            Err(m) => return Err(call.invalid(Status::invalid_argument(m)).await),
        };
        call.audit.set("kind", kind.name());
        match &kind {
            Kind::SimpleSigning(img) => {
                let image = img.repository.as_deref().unwrap_or_default();
                call.audit.set("image", image);
                call.audit.set("digest", img.digest.clone());
                call.audit
                    .set("annotations", serde_json::json!(img.annotations));
                call.check(
                    &Action::SignImage {
                        key: &r.key,
                        image,
                        annotations: &img.annotations,
                    },
                    "",
                )
                .await?;
            }
            Kind::InToto {
                predicate_type,
                subjects,
            } => {
                call.audit.set("predicate_type", predicate_type.clone());
                call.audit.set(
                    "subjects",
                    subjects
                        .iter()
                        .map(|s| {
                            serde_json::json!({
                                "image": s.repository,
                                "digest": s.digest,
                                "annotations": s.annotations,
                            })
                        })
                        .collect::<Vec<_>>(),
                );
                // Every subject must be allowed.
                for s in subjects {
                    let context = match &s.repository {
                        Some(_) => String::new(),
                        None => format!(
                            "subject {} names no repository (cosign 3 signs the digest alone), so only a rule whose images glob matches every repository (\"**\") admits it: ",
                            s.digest
                        ),
                    };
                    let image = s.repository.as_deref().unwrap_or_default();
                    let action = if predicate_type == message::COSIGN_SIGN_V1 {
                        Action::SignImage {
                            key: &r.key,
                            image,
                            annotations: &s.annotations,
                        }
                    } else {
                        Action::AttestImage { key: &r.key, image }
                    };
                    call.check(&action, &context).await?;
                }
            }
            Kind::Raw(why) => {
                call.audit.set("raw_reason", why.clone());
                call.check(
                    &Action::SignDigest { key: &r.key },
                    &format!("the message is {why}, so signing it is raw signing: "),
                )
                .await?;
            }
        }
        call.limit().await?;
        let caller = call.caller.clone();
        let (signature, key) = call.sign(&entry, &digest).await?;
        tracing::info!(%caller, key = %r.key, kind = kind.name(), "signed message");
        Ok(Response::new(SignMessageResponse {
            signature,
            key: Some(key),
            kind: kind.name().to_string(),
        }))
    }

    async fn attest_image(
        &self,
        req: Request<AttestImageRequest>,
    ) -> Result<Response<AttestImageResponse>, Status> {
        let mut call = self.begin(&req, "AttestImage", &req.get_ref().key).await?;
        let r = req.into_inner();
        call.audit.set("image", r.docker_reference.clone());
        call.audit.set("digest", r.manifest_digest.clone());
        call.audit.set("predicate_type", r.predicate_type.clone());
        let entry = call.entry().await?;
        let mut predicate = match validate_attest_image(&r) {
            Ok(p) => p,
            Err(m) => return Err(call.invalid(Status::invalid_argument(m)).await),
        };
        if r.predicate_type == attest::SLSA_PROVENANCE_V1 {
            let authenticated = attest::authenticated_builder(&call.caller, call.token.as_ref());
            let Some(fields) = predicate.as_object_mut() else {
                let m = "a SLSA provenance predicate must be a JSON object";
                return Err(call.invalid(Status::invalid_argument(m)).await);
            };
            match attest::apply_builder(fields, authenticated, &call.caller.payload_identity()) {
                Ok(d) => {
                    call.audit.set("builder_id", d.id);
                    call.audit.set("builder_id_source", d.source.as_str());
                    call.audit.set("claimed_builder_id", d.claimed);
                }
                Err(m) => return Err(call.invalid(Status::invalid_argument(m)).await),
            }
        }
        call.authorize(&Action::AttestImage {
            key: &r.key,
            image: &r.docker_reference,
        })
        .await?;
        let statement = attest::statement(
            &r.docker_reference,
            &r.manifest_digest,
            &r.predicate_type,
            &predicate,
        );
        let pae = attest::pae(attest::PAYLOAD_TYPE, &statement);
        let digest = Sha256Digest::of(&pae);
        call.audit.set(
            "statement_sha256",
            hex::encode(Sha256Digest::of(&statement).as_bytes()),
        );
        call.audit.set("pae_sha256", hex::encode(digest.as_bytes()));
        let caller = call.caller.clone();
        let (signature, key, timestamp) = call.sign_stamped(&entry, &digest, r.timestamp).await?;
        tracing::info!(%caller, key = %r.key, image = %r.docker_reference, digest = %r.manifest_digest, predicate_type = %r.predicate_type, "attested image");
        Ok(Response::new(AttestImageResponse {
            envelope: attest::envelope(&statement, &signature),
            key: Some(key),
            statement,
            timestamp,
        }))
    }
}
