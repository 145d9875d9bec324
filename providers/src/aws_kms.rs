//! AWS KMS keys (`awskms:///KEY_ID`, `awskms:///alias/NAME`, `awskms:///arn:…`,
//! `awskms://ENDPOINT/…`).
//!
//! `Sign` with `MessageType=DIGEST` and `ECDSA_SHA_256` (KMS returns ASN.1 DER);
//! `GetPublicKey` returns SPKI DER, rendered as PEM. Region and credentials come
//! from the standard AWS chain (environment, profile, web identity, IMDS); the
//! endpoint from the reference or `AWS_ENDPOINT_URL`. The SDK's own retries are
//! off: the broker's retry wrapper is the one bounded policy.

use std::{fmt, time::Duration};

use aws_sdk_kms::{
    error::{ProvideErrorMetadata, SdkError},
    primitives::Blob,
    types::{MessageType, SigningAlgorithmSpec},
    Client,
};

use crate::{
    ecdsa::normalize_public_pem, pem, Capabilities, Error, KeyProvider, PublicKey, Result,
    Sha256Digest, Signature,
};

/// Per-request timeout of KMS calls.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A KMS asymmetric `ECC_NIST_P256` `SIGN_VERIFY` key.
pub struct AwsKmsKey {
    client: Client,
    kms_key_id: String,
    id: String,
}

impl fmt::Debug for AwsKmsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKmsKey").field("id", &self.id).finish()
    }
}

/// The endpoint URL for `awskms://ENDPOINT/…`: plain HTTP on loopback (test
/// servers), HTTPS elsewhere.
fn endpoint_url(endpoint: &str) -> String {
    if endpoint.contains("://") {
        return endpoint.to_string();
    }
    let host = endpoint
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(endpoint);
    if host == "localhost" || host.starts_with("127.") || host == "[::1]" {
        format!("http://{endpoint}")
    } else {
        format!("https://{endpoint}")
    }
}

/// Maps an SDK error to ours: the service's code and message, never credentials.
fn map_err<E, R>(what: &str, e: SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: fmt::Debug,
{
    match &e {
        SdkError::ServiceError(se) => {
            let err = se.err();
            let code = err.code().unwrap_or("Unknown");
            let msg = format!("{what}: {code}: {}", err.message().unwrap_or(""));
            match code {
                "NotFoundException" => Error::NotFound(msg),
                "AccessDeniedException"
                | "UnrecognizedClientException"
                | "InvalidSignatureException" => Error::PermissionDenied(msg),
                "ThrottlingException" | "LimitExceededException" => Error::ResourceExhausted(msg),
                "KMSInternalException"
                | "DependencyTimeoutException"
                | "KeyUnavailableException" => Error::Unavailable(msg),
                "ValidationException"
                | "InvalidKeyUsageException"
                | "UnsupportedOperationException" => Error::InvalidArgument(msg),
                "DisabledException" | "KMSInvalidStateException" => Error::KeyFormat(msg),
                _ => Error::Other(msg),
            }
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Error::Unavailable(format!(
                "{what}: {}",
                std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| e.to_string())
            ))
        }
        _ => Error::Other(format!("{what}: {e}")),
    }
}

impl AwsKmsKey {
    /// Loads region and credentials from the standard chain; makes no request.
    pub async fn open(endpoint: Option<&str>, key_id: &str) -> Result<Self> {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .operation_attempt_timeout(TIMEOUT)
                    .build(),
            );
        if let Some(ep) = endpoint {
            loader = loader.endpoint_url(endpoint_url(ep));
        }
        let config = loader.load().await;
        if config.region().is_none() {
            return Err(Error::InvalidArgument(format!(
                "awskms:///{key_id}: no AWS region (set AWS_REGION or a profile region)"
            )));
        }
        let id = format!("awskms://{}/{key_id}", endpoint.unwrap_or(""));
        Ok(AwsKmsKey {
            client: Client::new(&config),
            kms_key_id: key_id.to_string(),
            id,
        })
    }

    /// Creates an `ECC_NIST_P256` `SIGN_VERIFY` key and points `alias/NAME` at it;
    /// returns the new key's id. An alias that already exists is refused before
    /// any key is created.
    pub async fn create(endpoint: Option<&str>, alias: &str) -> Result<String> {
        let key = AwsKmsKey::open(endpoint, alias).await?;
        let alias_name = if alias.starts_with("alias/") {
            alias.to_string()
        } else {
            format!("alias/{alias}")
        };
        match key.client.describe_key().key_id(&alias_name).send().await {
            Ok(_) => {
                return Err(Error::InvalidArgument(format!(
                    "{alias_name} already exists; not creating another key"
                )))
            }
            Err(e) => match map_err("DescribeKey", e) {
                Error::NotFound(_) => {}
                other => return Err(other),
            },
        }
        let created = key
            .client
            .create_key()
            .key_spec(aws_sdk_kms::types::KeySpec::EccNistP256)
            .key_usage(aws_sdk_kms::types::KeyUsageType::SignVerify)
            .description("keybroker signing key")
            .send()
            .await
            .map_err(|e| map_err("CreateKey", e))?;
        let key_id = created
            .key_metadata()
            .map(|m| m.key_id().to_string())
            .ok_or_else(|| Error::Other("CreateKey returned no key id".into()))?;
        let alias_name = if alias.starts_with("alias/") {
            alias.to_string()
        } else {
            format!("alias/{alias}")
        };
        key.client
            .create_alias()
            .alias_name(alias_name)
            .target_key_id(&key_id)
            .send()
            .await
            .map_err(|e| map_err("CreateAlias", e))?;
        Ok(key_id)
    }
}

#[async_trait::async_trait]
impl KeyProvider for AwsKmsKey {
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
        let out = self
            .client
            .sign()
            .key_id(&self.kms_key_id)
            .message(Blob::new(digest.as_bytes().to_vec()))
            .message_type(MessageType::Digest)
            .signing_algorithm(SigningAlgorithmSpec::EcdsaSha256)
            .send()
            .await
            .map_err(|e| map_err(&format!("Sign with {}", self.id), e))?;
        let der = out
            .signature()
            .map(|b| b.as_ref().to_vec())
            .ok_or_else(|| Error::Other("KMS Sign returned no signature".into()))?;
        // KMS keys have no user-visible versions; the key ARN is reported instead.
        Ok(Signature {
            der,
            key_version: String::new(),
        })
    }

    async fn public_key(&self) -> Result<PublicKey> {
        let out = self
            .client
            .get_public_key()
            .key_id(&self.kms_key_id)
            .send()
            .await
            .map_err(|e| map_err(&format!("GetPublicKey of {}", self.id), e))?;
        // moto leaves KeySpec empty on some calls: the DER itself is checked below.
        if let Some(spec) = out.key_spec() {
            if spec.as_str() != "ECC_NIST_P256" && !spec.as_str().is_empty() {
                return Err(Error::KeyFormat(format!(
                    "{} is {}; keybroker needs ECC_NIST_P256",
                    self.id,
                    spec.as_str()
                )));
            }
        }
        let der = out
            .public_key()
            .ok_or_else(|| Error::Other("KMS GetPublicKey returned no key".into()))?;
        let pem = normalize_public_pem(&pem::encode("PUBLIC KEY", der.as_ref()))?;
        Ok(PublicKey {
            pem,
            key_version: String::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_default_to_https_except_loopback() {
        assert_eq!(endpoint_url("127.0.0.1:4566"), "http://127.0.0.1:4566");
        assert_eq!(endpoint_url("localhost:4566"), "http://localhost:4566");
        assert_eq!(
            endpoint_url("kms.eu-west-1.amazonaws.com"),
            "https://kms.eu-west-1.amazonaws.com"
        );
        assert_eq!(endpoint_url("http://x:1"), "http://x:1");
    }
}
