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
    audit::AuditLog,
    identity::Caller,
    keys::KeyEntry,
    payload,
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
    /// Where decisions are recorded; `None` when `server.audit_log` is unset.
    /// Survives reloads (the daemon carries it into each new state).
    pub audit: Option<Arc<AuditLog>>,
}

/// One audit record under construction (audit.rs writes it and chains it).
struct Audit<'a> {
    log: Option<&'a Arc<AuditLog>>,
    record: serde_json::Map<String, serde_json::Value>,
    /// For the metrics: the RPC, and the key alias if the broker has it (an
    /// unknown alias is counted as "(unknown)", so callers cannot mint labels).
    rpc: &'static str,
    metrics_key: String,
}

impl<'a> Audit<'a> {
    fn new(state: &'a State, rpc: &'static str, caller: &Caller, key: &str) -> Self {
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
            log: state.audit.as_ref(),
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
    async fn write(mut self, decision: &str, reason: Option<String>) -> Result<(), Status> {
        let Some(log) = self.log else {
            crate::metrics::count_request(self.rpc, &self.metrics_key, decision);
            return Ok(());
        };
        self.record.insert("decision".into(), decision.into());
        if let Some(r) = reason {
            self.record.insert("reason".into(), r.into());
        }
        let (rpc, key) = (self.rpc, std::mem::take(&mut self.metrics_key));
        match log.append(self.record).await {
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
    async fn refuse(self, decision: &str, status: Status) -> Status {
        if let Err(e) = self
            .write(decision, Some(status.message().to_string()))
            .await
        {
            tracing::error!("{}", e.message());
        }
        status
    }
}

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
        let caller = caller(&req)?;
        let state = self.state.load_full();
        let token = id_token(&state, &req).await?;
        let r = req.into_inner();
        let mut audit = Audit::new(&state, "SignImage", &caller, &r.key);
        if let Some(t) = &token {
            audit.set(
                "oidc",
                serde_json::json!({"iss": t.issuer, "sub": t.subject}),
            );
        }
        audit.set("image", r.docker_reference.clone());
        audit.set("digest", r.manifest_digest.clone());
        let entry = match state.key(&r.key) {
            Ok(e) => e,
            Err(s) => return Err(audit.refuse("denied", s).await),
        };
        // A malformed request is refused before the policy, but still recorded
        // (a forged keybroker.dev/* annotation is worth an audit line).
        let annotations =
            match validate_sign_image(&r.docker_reference, &r.manifest_digest, r.annotations) {
                Ok(a) => a,
                Err(s) => return Err(audit.refuse("invalid", s).await),
            };
        let mut annotations = annotations;
        audit.set("annotations", serde_json::json!(annotations));
        if let Err(d) = state.policy.check_with_token(
            &caller,
            token.as_ref(),
            &Action::SignImage {
                key: &r.key,
                image: &r.docker_reference,
                annotations: &annotations,
            },
        ) {
            return Err(audit.refuse("denied", deny(&caller, &r.key, d)).await);
        }
        if let Err(l) = state.limits.check(&caller.payload_identity(), &r.key) {
            return Err(audit.refuse("rate_limited", status::from_limited(&l)).await);
        }
        annotations.insert(
            payload::CALLER_ANNOTATION.to_string(),
            caller.payload_identity(),
        );
        if let Some(t) = &token {
            annotations.insert(
                payload::OIDC_ANNOTATION.to_string(),
                format!("iss={} sub={}", t.issuer, t.subject),
            );
        }
        let body = payload::simple_signing(&r.docker_reference, &r.manifest_digest, &annotations);
        let payload_digest = Sha256Digest::of(&body);
        audit.set("payload_sha256", hex::encode(payload_digest.as_bytes()));
        let started = std::time::Instant::now();
        let signed = entry.provider.sign_digest(&payload_digest).await;
        crate::metrics::observe_backend(&r.key, signed.is_ok(), started.elapsed());
        let sig = match signed {
            Ok(s) => s,
            Err(e) => return Err(audit.refuse("failed", status::from_provider(&e)).await),
        };
        audit.set("key_version", sig.key_version.clone());
        // The record is on disk before the signature leaves the daemon.
        audit.write("allowed", None).await?;
        tracing::info!(%caller, key = %r.key, image = %r.docker_reference, digest = %r.manifest_digest, "signed image");
        let key = signed_key_info(entry, &sig.key_version).await?;
        Ok(Response::new(SignImageResponse {
            payload: body,
            signature: sig.der,
            key: Some(key),
        }))
    }

    async fn sign(&self, req: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let caller = caller(&req)?;
        let state = self.state.load_full();
        let token = id_token(&state, &req).await?;
        let r = req.into_inner();
        let mut audit = Audit::new(&state, "Sign", &caller, &r.key);
        if let Some(t) = &token {
            audit.set(
                "oidc",
                serde_json::json!({"iss": t.issuer, "sub": t.subject}),
            );
        }
        let entry = match state.key(&r.key) {
            Ok(e) => e,
            Err(s) => return Err(audit.refuse("denied", s).await),
        };
        let digest = match Sha256Digest::try_from(r.digest.as_slice()) {
            Ok(d) => d,
            Err(e) => return Err(audit.refuse("invalid", status::from_provider(&e)).await),
        };
        audit.set(
            "digest",
            format!("sha256:{}", hex::encode(digest.as_bytes())),
        );
        if let Err(d) = state.policy.check_with_token(
            &caller,
            token.as_ref(),
            &Action::SignDigest { key: &r.key },
        ) {
            return Err(audit.refuse("denied", deny(&caller, &r.key, d)).await);
        }
        if let Err(l) = state.limits.check(&caller.payload_identity(), &r.key) {
            return Err(audit.refuse("rate_limited", status::from_limited(&l)).await);
        }
        let started = std::time::Instant::now();
        let signed = entry.provider.sign_digest(&digest).await;
        crate::metrics::observe_backend(&r.key, signed.is_ok(), started.elapsed());
        let sig = match signed {
            Ok(s) => s,
            Err(e) => return Err(audit.refuse("failed", status::from_provider(&e)).await),
        };
        audit.set("key_version", sig.key_version.clone());
        audit.write("allowed", None).await?;
        tracing::debug!(%caller, key = %r.key, ?digest, "signed digest");
        let key = signed_key_info(entry, &sig.key_version).await?;
        Ok(Response::new(SignResponse {
            signature: sig.der,
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
        _req: Request<SignMessageRequest>,
    ) -> Result<Response<SignMessageResponse>, Status> {
        Err(Status::unimplemented("SignMessage is not built yet"))
    }

    async fn attest_image(
        &self,
        _req: Request<AttestImageRequest>,
    ) -> Result<Response<AttestImageResponse>, Status> {
        Err(Status::unimplemented("AttestImage is not built yet"))
    }
}
