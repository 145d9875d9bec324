//! The daemon's TOML config (DESIGN.md §6) and the embedded default used when
//! no file is given. Unknown keys are an error, not silently ignored.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// The whole config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listener and state settings.
    #[serde(default)]
    pub server: ServerConfig,
    /// Keys by alias: `[keys.NAME] ref = "…"`.
    #[serde(default)]
    pub keys: BTreeMap<String, KeyConfig>,
    /// Policy rules; none means nobody may sign (default deny).
    #[serde(default)]
    pub policy: Vec<RuleConfig>,
    /// Rate limits; none by default.
    #[serde(default)]
    pub limits: Option<LimitsConfig>,
    /// Trusted issuers of bearer OIDC ID tokens; none by default.
    #[serde(default)]
    pub oidc: Vec<crate::oidc::OidcConfig>,
    /// An RFC 3161 time-stamp authority for Sigstore bundles; none by default.
    #[serde(default)]
    pub timestamp: Option<TimestampConfig>,
}

/// `[timestamp]`: the time-stamp authority whose RFC 3161 token over each
/// bundle signature makes its signing time provable without a transparency
/// log (verifiers refuse a bundle with neither).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimestampConfig {
    /// The TSA's endpoint, `https://` (plain `http://` only to a loopback address).
    pub url: String,
    /// The TSA's certificate chain (PEM), leaf first and root last: the same
    /// chain a verifier's trusted root lists for it. Only the root: the
    /// token's own certificate must chain to it.
    pub ca_chain: PathBuf,
    /// Seconds to wait for the TSA's answer (default 10).
    pub timeout_secs: Option<u64>,
}

/// `[limits]`: token buckets for signatures (SignImage and Sign).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Each caller identity (uid, certificate SAN) on its own.
    pub per_caller: Option<LimitConfig>,
    /// Each key alias, all callers together (protects the backend's quota).
    pub per_key: Option<LimitConfig>,
}

/// One token bucket: `per_second` sustained, `burst` at once (default: one
/// second's worth).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// Sustained signatures per second.
    pub per_second: f64,
    /// Bucket size.
    pub burst: Option<u32>,
}

/// `[server]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Unix socket path; default: `keybroker_proto::default_socket_path()`.
    pub socket: Option<PathBuf>,
    /// Socket permission bits as an octal string; default "0660".
    pub socket_mode: Option<String>,
    /// Group that owns the socket (members may connect).
    pub socket_group: Option<String>,
    /// Data directory (dev key of the embedded default); default `keybroker_proto::default_data_dir()`.
    pub data_dir: Option<PathBuf>,
    /// Audit log path (JSON lines, hash-chained, fsynced before each answer).
    pub audit_log: Option<PathBuf>,
    /// Largest request accepted, bytes; default 64 KiB.
    pub max_request_bytes: Option<usize>,
    /// The TCP listener, mutual TLS only (there is no plaintext signing listener).
    pub tls: Option<TlsConfig>,
    /// Plain-HTTP Prometheus endpoint (`GET /metrics`), e.g. "127.0.0.1:9464".
    pub metrics_listen: Option<String>,
    /// Connections open at once, all callers together (default 1024).
    pub max_connections: Option<usize>,
    /// Connections open at once per caller uid on the unix socket (default 256).
    pub max_connections_per_caller: Option<usize>,
    /// Milliseconds a new connection may stay silent (default 10000).
    pub handshake_timeout_ms: Option<u64>,
    /// Seconds an established connection may receive nothing (default 300;
    /// HTTP/2 keepalive pings count).
    pub idle_timeout_secs: Option<u64>,
    /// Concurrent requests per connection (default 64).
    pub max_streams_per_connection: Option<u32>,
    /// Largest request metadata (header list), bytes (default 16 KiB).
    pub max_header_bytes: Option<u32>,
    /// KeyBroker calls in flight at once per listener (default 512).
    pub max_in_flight: Option<usize>,
    /// KeyBroker calls in flight at once per caller (default 128).
    pub max_in_flight_per_caller: Option<usize>,
}

/// `[server.tls]`: a TCP listener that requires a client certificate issued by
/// `client_ca_file`; the caller's identity is that certificate's SANs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Address to listen on, e.g. "0.0.0.0:8443".
    pub listen: String,
    /// Server certificate chain (PEM).
    pub cert_file: PathBuf,
    /// Server private key (PEM).
    pub key_file: PathBuf,
    /// CA bundle (PEM) that client certificates must chain to.
    pub client_ca_file: PathBuf,
    /// Optional plaintext listener serving only grpc.health.v1 (for probes that
    /// cannot do mTLS, such as the kubelet's gRPC probe). Never signs.
    pub health_listen: Option<String>,
}

/// `[keys.NAME]`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Key reference (DESIGN.md §4).
    #[serde(rename = "ref")]
    pub reference: String,
    /// Environment variable holding the password of an encrypted key.
    pub password_env: Option<String>,
    /// File holding the password of an encrypted key (trailing newline ignored).
    pub password_file: Option<PathBuf>,
    /// PEM public key of this key, for backend credentials that may sign but not
    /// read the key (e.g. a Vault token with only `transit/sign`). Must match.
    pub public_key_file: Option<PathBuf>,
    /// Vault / OpenBao settings for `hashivault://` and `openbao://` keys.
    #[serde(default)]
    pub vault: Option<VaultKeyConfig>,
    /// GitLab settings for `gitlab://` keys.
    #[serde(default)]
    pub gitlab: Option<GitLabKeyConfig>,
    /// Kubernetes settings for `k8s://` keys.
    #[serde(default)]
    pub kubernetes: Option<KubernetesKeyConfig>,
    /// Google Cloud KMS settings for `gcpkms://` keys.
    #[serde(default)]
    pub gcp: Option<GcpKeyConfig>,
}

/// `[keys.NAME.gcp]`: where Cloud KMS is and whose credentials to use. Unset:
/// `KEYBROKER_GCP_KMS_ENDPOINT` (else cloudkms.googleapis.com) and Application
/// Default Credentials.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcpKeyConfig {
    /// gRPC endpoint URL (`http://` only to loopback).
    pub endpoint: Option<String>,
    /// Service-account (or authorized_user) JSON file; overrides ADC.
    pub credentials_file: Option<PathBuf>,
    /// Per-request timeout in milliseconds (default 10000).
    pub timeout_ms: Option<u64>,
    /// Seconds an unpinned key's newest version is used before it is looked up
    /// again (default 300).
    pub version_ttl_secs: Option<u64>,
}

/// `[keys.NAME.gitlab]`: where the CI/CD variables live. Unset fields fall back
/// to `GITLAB_HOST` (else gitlab.com) and `GITLAB_TOKEN`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitLabKeyConfig {
    /// Host name (https) or full URL.
    pub host: Option<String>,
    /// Environment variable holding the token.
    pub token_env: Option<String>,
    /// File holding the token (trailing newline ignored).
    pub token_file: Option<PathBuf>,
    /// Seconds a decrypted key is used before the variables are read again (default 60).
    pub cache_ttl_secs: Option<u64>,
    /// Per-request timeout in milliseconds (default 10000).
    pub timeout_ms: Option<u64>,
}

/// `[keys.NAME.kubernetes]`: which cluster holds the secret. Unset: kube's
/// inference (`KUBECONFIG`, `~/.kube/config`, then the pod's service account).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesKeyConfig {
    /// A kubeconfig file.
    pub kubeconfig: Option<PathBuf>,
    /// A context of the kubeconfig other than its current one.
    pub context: Option<String>,
}

/// `[keys.NAME.vault]`: where the transit key lives. Unset fields fall back to
/// `VAULT_ADDR`, `VAULT_TOKEN`, `VAULT_NAMESPACE`, `TRANSIT_SECRET_ENGINE_PATH`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultKeyConfig {
    /// Server address.
    pub address: Option<String>,
    /// Transit mount (default "transit").
    pub mount: Option<String>,
    /// Vault Enterprise namespace.
    pub namespace: Option<String>,
    /// Environment variable holding the token.
    pub token_env: Option<String>,
    /// File holding the token (trailing newline ignored).
    pub token_file: Option<PathBuf>,
    /// Pin a key version.
    pub key_version: Option<u64>,
    /// Per-request timeout in milliseconds (default 10000).
    pub timeout_ms: Option<u64>,
    /// Log in with AppRole instead of a token.
    pub approle: Option<AppRoleConfig>,
    /// Log in with the Kubernetes auth method (the pod's service-account token).
    pub kubernetes: Option<KubernetesAuthConfig>,
}

/// `[keys.NAME.vault.kubernetes]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesAuthConfig {
    /// Auth mount (default "kubernetes").
    pub mount: Option<String>,
    /// Vault role bound to the daemon's service account.
    pub role: String,
    /// Service-account token file (default
    /// /var/run/secrets/kubernetes.io/serviceaccount/token), read at each login.
    pub token_path: Option<PathBuf>,
}

/// `[keys.NAME.vault.approle]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppRoleConfig {
    /// Auth mount (default "approle").
    pub mount: Option<String>,
    /// Role id.
    pub role_id: String,
    /// Environment variable holding the secret id.
    pub secret_id_env: Option<String>,
    /// File holding the secret id (trailing newline ignored).
    pub secret_id_file: Option<PathBuf>,
}

impl std::fmt::Debug for KeyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Only names of where secrets live, never the secrets.
        f.debug_struct("KeyConfig")
            .field("ref", &self.reference)
            .field("password_env", &self.password_env)
            .field("password_file", &self.password_file)
            .field("vault", &self.vault)
            .field("gitlab", &self.gitlab)
            .field("kubernetes", &self.kubernetes)
            .field("gcp", &self.gcp)
            .finish()
    }
}

/// `[[policy]]`: who may sign with which keys, for which images.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// `uid:N`, `gid:N`, or `*`.
    pub callers: Vec<String>,
    /// Key aliases, or `*`.
    pub keys: Vec<String>,
    /// Repository globs (`*` within a path segment, `**` across segments). Empty: none.
    #[serde(default)]
    pub images: Vec<String>,
    /// Annotations every SignImage request must carry.
    #[serde(default)]
    pub require_annotations: Vec<String>,
    /// Whether raw `Sign` of an arbitrary digest is allowed.
    #[serde(default)]
    pub allow_raw_digest: bool,
    /// ID token claims the caller must present (values: `*` globs). Non-empty
    /// means a verified token is required for this rule.
    #[serde(default)]
    pub claims: BTreeMap<String, String>,
}

impl Config {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("config {}: {e}", path.display()))
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        for (alias, key) in &self.keys {
            keybroker_providers::KeyRef::parse(&key.reference)
                .map_err(|e| format!("[keys.{alias}]: {e}"))?;
            if key.password_env.is_some() && key.password_file.is_some() {
                return Err(format!(
                    "[keys.{alias}]: set password_env or password_file, not both"
                ));
            }
            let is_gitlab = key.reference.starts_with("gitlab://");
            if key.gitlab.is_some() && !is_gitlab {
                return Err(format!(
                    "[keys.{alias}]: a [keys.{alias}.gitlab] section needs a gitlab:// ref"
                ));
            }
            if is_gitlab && (key.password_env.is_some() || key.password_file.is_some()) {
                return Err(format!(
                    "[keys.{alias}]: a gitlab:// key's password is its COSIGN_PASSWORD CI/CD variable; remove password_env / password_file"
                ));
            }
            if key.gcp.is_some() && !key.reference.starts_with("gcpkms://") {
                return Err(format!(
                    "[keys.{alias}]: a [keys.{alias}.gcp] section needs a gcpkms:// ref"
                ));
            }
            let is_k8s = key.reference.starts_with("k8s://");
            if key.kubernetes.is_some() && !is_k8s {
                return Err(format!(
                    "[keys.{alias}]: a [keys.{alias}.kubernetes] section needs a k8s:// ref"
                ));
            }
            if is_k8s && (key.password_env.is_some() || key.password_file.is_some()) {
                return Err(format!(
                    "[keys.{alias}]: a k8s:// key's password is the secret's cosign.password; remove password_env / password_file"
                ));
            }
            if let Some(g) = &key.gitlab {
                if g.token_env.is_some() && g.token_file.is_some() {
                    return Err(format!(
                        "[keys.{alias}.gitlab]: set token_env or token_file, not both"
                    ));
                }
            }
        }
        for (i, rule) in self.policy.iter().enumerate() {
            for k in &rule.keys {
                if k != "*" && !self.keys.contains_key(k) {
                    return Err(format!(
                        "[[policy]] #{}: key {k:?} is not defined under [keys]",
                        i + 1
                    ));
                }
            }
            for c in &rule.callers {
                crate::policy::CallerMatcher::parse(c)
                    .map_err(|e| format!("[[policy]] #{}: {e}", i + 1))?;
            }
        }
        if let Some(mode) = &self.server.socket_mode {
            parse_mode(mode)?;
        }
        if let Some(t) = &self.timestamp {
            crate::timestamp::tsa_url(&t.url).map_err(|e| format!("[timestamp]: {e}"))?;
            if matches!(t.timeout_secs, Some(0)) {
                return Err("[timestamp]: timeout_secs must be at least 1".into());
            }
        }
        Ok(())
    }

    /// The socket permission bits.
    pub fn socket_mode(&self) -> u32 {
        self.server
            .socket_mode
            .as_deref()
            .and_then(|m| parse_mode(m).ok())
            .unwrap_or(0o660)
    }

    /// The socket path.
    pub fn socket_path(&self) -> PathBuf {
        self.server
            .socket
            .clone()
            .unwrap_or_else(keybroker_proto::default_socket_path)
    }

    /// The largest request accepted.
    pub fn max_request_bytes(&self) -> usize {
        self.server.max_request_bytes.unwrap_or(64 * 1024)
    }

    /// Connection limits: `[server]` settings over the defaults.
    pub fn conn_limits(&self) -> crate::conn::ConnLimits {
        let d = crate::conn::ConnLimits::default();
        let s = &self.server;
        crate::conn::ConnLimits {
            max_connections: s.max_connections.unwrap_or(d.max_connections).max(1),
            max_connections_per_caller: s
                .max_connections_per_caller
                .unwrap_or(d.max_connections_per_caller)
                .max(1),
            handshake_timeout: s
                .handshake_timeout_ms
                .map(std::time::Duration::from_millis)
                .unwrap_or(d.handshake_timeout),
            idle_timeout: s
                .idle_timeout_secs
                .map(std::time::Duration::from_secs)
                .unwrap_or(d.idle_timeout),
            max_streams_per_connection: s
                .max_streams_per_connection
                .unwrap_or(d.max_streams_per_connection)
                .max(1),
            max_header_bytes: s.max_header_bytes.unwrap_or(d.max_header_bytes).max(1024),
            max_in_flight: s.max_in_flight.unwrap_or(d.max_in_flight).max(1),
            max_in_flight_per_caller: s
                .max_in_flight_per_caller
                .unwrap_or(d.max_in_flight_per_caller)
                .max(1),
        }
    }

    /// The embedded default: one dev key in `data_dir`, and a rule letting `uid`
    /// sign anything with it (raw digests included). Meant for a developer's machine.
    pub fn embedded_default(data_dir: &Path, uid: u32) -> Self {
        let mut keys = BTreeMap::new();
        keys.insert(
            "dev".to_string(),
            KeyConfig {
                reference: data_dir.join(DEV_KEY_FILE).display().to_string(),
                password_env: None,
                password_file: None,
                public_key_file: None,
                vault: None,
                gitlab: None,
                kubernetes: None,
                gcp: None,
            },
        );
        Config {
            server: ServerConfig {
                data_dir: Some(data_dir.to_path_buf()),
                socket_mode: Some("0600".into()),
                ..Default::default()
            },
            keys,
            policy: vec![RuleConfig {
                callers: vec![format!("uid:{uid}")],
                keys: vec!["*".into()],
                images: vec!["**".into()],
                require_annotations: vec![],
                allow_raw_digest: true,
                claims: BTreeMap::new(),
            }],
            limits: None,
            oidc: Vec::new(),
            timestamp: None,
        }
    }
}

/// File name of the embedded default's dev key inside the data dir.
pub const DEV_KEY_FILE: &str = "dev-signing.key";

fn parse_mode(mode: &str) -> Result<u32, String> {
    let m = u32::from_str_radix(mode.trim_start_matches("0o"), 8)
        .map_err(|_| format!("socket_mode {mode:?} is not an octal mode like \"0660\""))?;
    if m > 0o777 {
        return Err(format!("socket_mode {mode:?} is out of range"));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_design_example() {
        let c = Config::parse(
            r#"
            [server]
            socket = "/run/keybroker/keybroker.sock"
            socket_group = "keybroker"
            audit_log = "/var/lib/keybroker/audit.jsonl"

            [keys.release]
            ref = "awskms:///alias/release-signing"

            [[policy]]
            callers = ["uid:1001", "gid:2000"]
            keys = ["release"]
            images = ["registry.example.com/app/*"]
            require_annotations = ["commit", "repo"]
            "#,
        )
        .unwrap();
        assert_eq!(
            c.keys["release"].reference,
            "awskms:///alias/release-signing"
        );
        assert_eq!(c.socket_mode(), 0o660);
    }

    #[test]
    fn rejects_unknown_fields_and_dangling_keys() {
        assert!(Config::parse("[server]\nsokcet = \"/x\"")
            .unwrap_err()
            .contains("sokcet"));
        let err = Config::parse("[[policy]]\ncallers=[\"uid:1\"]\nkeys=[\"nope\"]").unwrap_err();
        assert!(err.contains("nope"), "{err}");
        let err = Config::parse("[keys.a]\nref=\"azure://x\"").unwrap_err();
        assert!(err.contains("unknown key scheme"), "{err}");
        let err = Config::parse("[[policy]]\ncallers=[\"root\"]\nkeys=[]").unwrap_err();
        assert!(err.contains("root"), "{err}");
    }

    #[test]
    fn gitlab_key_section() {
        let c = Config::parse(
            r#"
            [keys.ci]
            ref = "gitlab://acme/app"
            [keys.ci.gitlab]
            host = "gitlab.example.com"
            token_file = "/etc/keybroker/gitlab-token"
            cache_ttl_secs = 30
            "#,
        )
        .unwrap();
        let g = c.keys["ci"].gitlab.as_ref().unwrap();
        assert_eq!(g.cache_ttl_secs, Some(30));
        for (bad, why) in [
            ("[keys.a]\nref=\"gitlab://g/p\"\n[keys.a.gitlab]\ntoken=\"x\"", "token"),
            ("[keys.a]\nref=\"/k.key\"\n[keys.a.gitlab]\nhost=\"h\"", "gitlab:// ref"),
            ("[keys.a]\nref=\"gitlab://g/p\"\npassword_env=\"P\"", "COSIGN_PASSWORD"),
            ("[keys.a]\nref=\"gitlab://g/p\"\n[keys.a.gitlab]\ntoken_env=\"A\"\ntoken_file=\"/b\"", "not both"),
        ] {
            let err = Config::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn kubernetes_key_section() {
        let c = Config::parse(
            r#"
            [keys.k]
            ref = "k8s://signing/cosign"
            [keys.k.kubernetes]
            kubeconfig = "/etc/keybroker/kubeconfig"
            context = "prod"
            "#,
        )
        .unwrap();
        let k = c.keys["k"].kubernetes.as_ref().unwrap();
        assert_eq!(
            k.kubeconfig.as_deref(),
            Some(Path::new("/etc/keybroker/kubeconfig"))
        );
        assert_eq!(k.context.as_deref(), Some("prod"));
        for (bad, why) in [
            (
                "[keys.a]\nref=\"k8s://n/s\"\n[keys.a.kubernetes]\ntoken=\"x\"",
                "token",
            ),
            (
                "[keys.a]\nref=\"/k.key\"\n[keys.a.kubernetes]\ncontext=\"c\"",
                "k8s:// ref",
            ),
            (
                "[keys.a]\nref=\"k8s://n/s\"\npassword_env=\"P\"",
                "cosign.password",
            ),
        ] {
            let err = Config::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn timestamp_section() {
        let c = Config::parse(
            r#"
            [timestamp]
            url = "https://timestamp.example.com/api/v1/timestamp"
            ca_chain = "/etc/keybroker/tsa-chain.pem"
            "#,
        )
        .unwrap();
        let t = c.timestamp.as_ref().unwrap();
        assert_eq!(t.ca_chain, Path::new("/etc/keybroker/tsa-chain.pem"));
        assert_eq!(t.timeout_secs, None);
        assert!(Config::parse("").unwrap().timestamp.is_none());
        for ok in [
            "http://127.0.0.1:3000/",
            "http://[::1]/tsa",
            "http://localhost:8080",
        ] {
            let text = format!("[timestamp]\nurl = \"{ok}\"\nca_chain = \"/c.pem\"");
            assert!(Config::parse(&text).is_ok(), "{ok}");
        }
        for (bad, why) in [
            (
                "url = \"http://tsa.example.com/\"\nca_chain = \"/c.pem\"",
                "https://",
            ),
            (
                "url = \"ftp://127.0.0.1/\"\nca_chain = \"/c.pem\"",
                "https://",
            ),
            ("url = \"not a url\"\nca_chain = \"/c.pem\"", "not a url"),
            ("url = \"https://t.example\"", "ca_chain"),
            (
                "url = \"https://t.example\"\nca_chain = \"/c\"\ntimeout_secs = 0",
                "timeout_secs",
            ),
            (
                "url = \"https://t.example\"\nca_chain = \"/c\"\ncert = \"x\"",
                "cert",
            ),
        ] {
            let err = Config::parse(&format!("[timestamp]\n{bad}")).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
