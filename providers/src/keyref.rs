//! Key references: the cosign-compatible spellings of DESIGN.md §4, parsed in one place.

use std::{fmt, path::PathBuf};

use crate::{Error, Result};

/// One key source we know how to spell, and whether this binary can open it.
#[derive(Debug, Clone, Copy)]
pub struct Scheme {
    /// The scheme as written before `://`.
    pub name: &'static str,
    /// The cargo feature of `keybroker-providers` that builds it (`None`: always built).
    pub feature: Option<&'static str>,
    /// Whether this binary can open keys of this scheme.
    pub built: bool,
    /// What a reference looks like.
    pub example: &'static str,
}

/// Every scheme of DESIGN.md §4, in the order `--help` lists them.
pub const SCHEMES: &[Scheme] = &[
    Scheme {
        name: "file",
        feature: None,
        built: true,
        example: "/path/cosign.key or file:///path/cosign.key",
    },
    Scheme {
        name: "env",
        feature: None,
        built: true,
        example: "env://COSIGN_PRIVATE_KEY",
    },
    Scheme {
        name: "k8s",
        feature: Some("kubernetes"),
        built: cfg!(feature = "kubernetes"),
        example: "k8s://NAMESPACE/SECRET",
    },
    Scheme {
        name: "awskms",
        feature: Some("aws"),
        built: cfg!(feature = "aws"),
        example: "awskms:///alias/NAME",
    },
    Scheme {
        name: "gcpkms",
        feature: Some("gcp"),
        built: cfg!(feature = "gcp"),
        example: "gcpkms://projects/P/locations/L/keyRings/R/cryptoKeys/K",
    },
    Scheme {
        name: "hashivault",
        feature: Some("vault"),
        built: cfg!(feature = "vault"),
        example: "hashivault://KEY",
    },
    Scheme {
        name: "openbao",
        feature: Some("vault"),
        built: cfg!(feature = "vault"),
        example: "openbao://KEY",
    },
    Scheme {
        name: "gitlab",
        feature: Some("gitlab"),
        built: cfg!(feature = "gitlab"),
        example: "gitlab://GROUP/PROJECT",
    },
    Scheme {
        name: "github",
        feature: Some("github"),
        built: cfg!(feature = "github"),
        example: "github://OWNER/REPO[?environment=ENV]",
    },
];

/// A parsed key reference.
#[derive(Clone, PartialEq, Eq)]
pub enum KeyRef {
    /// A PEM key file on disk.
    File(PathBuf),
    /// A PEM key in an environment variable.
    Env(String),
    /// A Kubernetes secret in cosign's layout.
    Kubernetes {
        /// Namespace.
        namespace: String,
        /// Secret name.
        name: String,
    },
    /// An AWS KMS key.
    AwsKms {
        /// Endpoint override (`awskms://ENDPOINT/…`), if any.
        endpoint: Option<String>,
        /// Key id, `alias/NAME` or ARN.
        key_id: String,
    },
    /// A GCP Cloud KMS key (resource name, optionally with a pinned version).
    GcpKms {
        /// `projects/…/cryptoKeys/K[/cryptoKeyVersions/V]`.
        resource: String,
    },
    /// A Vault or OpenBao transit key.
    Vault {
        /// `hashivault` or `openbao`, as written.
        scheme: &'static str,
        /// Transit key name.
        key: String,
    },
    /// GitLab CI/CD variables of a project or group.
    GitLab {
        /// Project id, `GROUP/PROJECT` or `GROUP`.
        path: String,
    },
    /// GitHub Actions secrets of a repository, an organization, or a
    /// repository's deployment environment (`github://OWNER/REPO?environment=ENV`).
    GitHub {
        /// Owner (user or organization).
        owner: String,
        /// Repository, absent for organization secrets.
        repo: Option<String>,
        /// Deployment environment of the repository, if any (taken literally).
        environment: Option<String>,
    },
}

impl KeyRef {
    /// Parses a reference. A string without `scheme://` is a file path.
    pub fn parse(reference: &str) -> Result<Self> {
        let invalid = |reason: &str| Error::InvalidReference {
            reference: reference.to_string(),
            reason: reason.to_string(),
        };
        if reference.is_empty() {
            return Err(invalid("empty"));
        }
        let Some((scheme, rest)) = reference.split_once("://") else {
            return Ok(KeyRef::File(PathBuf::from(reference)));
        };
        let nonempty_segments = |n: usize| -> Result<Vec<String>> {
            let parts: Vec<String> = rest.split('/').map(str::to_string).collect();
            if parts.len() != n || parts.iter().any(String::is_empty) {
                return Err(invalid(&format!("expected {n} non-empty path segment(s)")));
            }
            Ok(parts)
        };
        match scheme {
            "file" => {
                if !rest.starts_with('/') {
                    return Err(invalid("file:// needs an absolute path (file:///path)"));
                }
                Ok(KeyRef::File(PathBuf::from(rest)))
            }
            "env" => {
                let var = nonempty_segments(1)?.remove(0);
                Ok(KeyRef::Env(var))
            }
            "k8s" => {
                let mut p = nonempty_segments(2)?;
                let name = p.remove(1);
                Ok(KeyRef::Kubernetes {
                    namespace: p.remove(0),
                    name,
                })
            }
            "awskms" => {
                let (endpoint, key_id) = rest.split_once('/').ok_or_else(|| {
                    invalid("expected awskms:///KEY_ID, awskms:///alias/NAME or awskms://ENDPOINT/KEY_ID")
                })?;
                if key_id.is_empty() {
                    return Err(invalid("missing key id"));
                }
                let endpoint = (!endpoint.is_empty()).then(|| endpoint.to_string());
                Ok(KeyRef::AwsKms {
                    endpoint,
                    key_id: key_id.to_string(),
                })
            }
            "gcpkms" => {
                let p: Vec<&str> = rest.split('/').collect();
                let shape_ok = (p.len() == 8 || p.len() == 10)
                    && p[0] == "projects"
                    && p[2] == "locations"
                    && p[4] == "keyRings"
                    && p[6] == "cryptoKeys"
                    && (p.len() == 8 || p[8] == "cryptoKeyVersions")
                    && p.iter().all(|s| !s.is_empty());
                if !shape_ok {
                    return Err(invalid(
                        "expected gcpkms://projects/P/locations/L/keyRings/R/cryptoKeys/K[/cryptoKeyVersions/V]",
                    ));
                }
                Ok(KeyRef::GcpKms {
                    resource: rest.to_string(),
                })
            }
            "hashivault" | "openbao" => {
                let key = nonempty_segments(1)?.remove(0);
                let scheme = if scheme == "openbao" {
                    "openbao"
                } else {
                    "hashivault"
                };
                Ok(KeyRef::Vault { scheme, key })
            }
            "gitlab" => {
                if rest.is_empty() || rest.split('/').any(str::is_empty) {
                    return Err(invalid(
                        "expected gitlab://PROJECT_ID, gitlab://GROUP/PROJECT or gitlab://GROUP",
                    ));
                }
                Ok(KeyRef::GitLab {
                    path: rest.to_string(),
                })
            }
            "github" => {
                let (path, query) = match rest.split_once('?') {
                    Some((p, q)) => (p, Some(q)),
                    None => (rest, None),
                };
                let environment = match query {
                    None => None,
                    Some(q) => match q.strip_prefix("environment=") {
                        Some(env) if !env.is_empty() && !env.contains(['&', '/']) => {
                            Some(env.to_string())
                        }
                        _ => {
                            return Err(invalid(
                                "the only query is ?environment=ENV (a deployment environment of the repository)",
                            ))
                        }
                    },
                };
                let parts: Vec<&str> = path.split('/').collect();
                match parts.as_slice() {
                    [owner] if !owner.is_empty() && environment.is_none() => Ok(KeyRef::GitHub {
                        owner: owner.to_string(),
                        repo: None,
                        environment,
                    }),
                    [_] if environment.is_some() => Err(invalid(
                        "environments belong to a repository: github://OWNER/REPO?environment=ENV",
                    )),
                    [owner, repo] if !owner.is_empty() && !repo.is_empty() => Ok(KeyRef::GitHub {
                        owner: owner.to_string(),
                        repo: Some(repo.to_string()),
                        environment,
                    }),
                    _ => Err(invalid(
                        "expected github://OWNER/REPO, github://OWNER/REPO?environment=ENV or github://OWNER",
                    )),
                }
            }
            other => Err(Error::UnknownScheme {
                scheme: other.to_string(),
                known: SCHEMES
                    .iter()
                    .map(|s| format!("{}://", s.name))
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// The scheme name (`file` for plain paths).
    pub fn scheme(&self) -> &'static str {
        match self {
            KeyRef::File(_) => "file",
            KeyRef::Env(_) => "env",
            KeyRef::Kubernetes { .. } => "k8s",
            KeyRef::AwsKms { .. } => "awskms",
            KeyRef::GcpKms { .. } => "gcpkms",
            KeyRef::Vault { scheme, .. } => scheme,
            KeyRef::GitLab { .. } => "gitlab",
            KeyRef::GitHub { .. } => "github",
        }
    }
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // A path holding "://" would read back as a scheme: keep its file:// form
            // (such a path can only have come from file://, so it is absolute).
            KeyRef::File(p) if p.to_string_lossy().contains("://") => {
                write!(f, "file://{}", p.display())
            }
            KeyRef::File(p) => write!(f, "{}", p.display()),
            KeyRef::Env(v) => write!(f, "env://{v}"),
            KeyRef::Kubernetes { namespace, name } => write!(f, "k8s://{namespace}/{name}"),
            KeyRef::AwsKms { endpoint, key_id } => {
                write!(f, "awskms://{}/{key_id}", endpoint.as_deref().unwrap_or(""))
            }
            KeyRef::GcpKms { resource } => write!(f, "gcpkms://{resource}"),
            KeyRef::Vault { scheme, key } => write!(f, "{scheme}://{key}"),
            KeyRef::GitLab { path } => write!(f, "gitlab://{path}"),
            KeyRef::GitHub {
                owner,
                repo: Some(r),
                environment: None,
            } => write!(f, "github://{owner}/{r}"),
            KeyRef::GitHub {
                owner,
                repo: Some(r),
                environment: Some(e),
            } => write!(f, "github://{owner}/{r}?environment={e}"),
            KeyRef::GitHub {
                owner, repo: None, ..
            } => write!(f, "github://{owner}"),
        }
    }
}

impl fmt::Debug for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyRef({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the keyref fuzz target: printed as a plain path, this read
    /// back as an unknown scheme `/etc/e`.
    #[test]
    fn a_file_path_holding_a_scheme_separator_prints_as_file_url() {
        let r = KeyRef::parse("file:///etc/e:///release.key").unwrap();
        assert_eq!(r, KeyRef::File(PathBuf::from("/etc/e:///release.key")));
        assert_eq!(r.to_string(), "file:///etc/e:///release.key");
        assert_eq!(KeyRef::parse(&r.to_string()).unwrap(), r);
    }

    #[test]
    fn parses_every_scheme_of_the_design() {
        let cases = [
            ("/etc/keys/cosign.key", "/etc/keys/cosign.key"),
            ("file:///etc/keys/cosign.key", "/etc/keys/cosign.key"),
            ("env://COSIGN_PRIVATE_KEY", "env://COSIGN_PRIVATE_KEY"),
            ("k8s://signing/release", "k8s://signing/release"),
            ("awskms:///alias/release", "awskms:///alias/release"),
            (
                "awskms:///arn:aws:kms:us-east-1:1:key/abc",
                "awskms:///arn:aws:kms:us-east-1:1:key/abc",
            ),
            (
                "awskms://localhost:4566/1234",
                "awskms://localhost:4566/1234",
            ),
            (
                "gcpkms://projects/p/locations/l/keyRings/r/cryptoKeys/k",
                "gcpkms://projects/p/locations/l/keyRings/r/cryptoKeys/k",
            ),
            (
                "gcpkms://projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/3",
                "gcpkms://projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/3",
            ),
            ("hashivault://release", "hashivault://release"),
            ("openbao://release", "openbao://release"),
            ("gitlab://group/project", "gitlab://group/project"),
            ("gitlab://1234", "gitlab://1234"),
            ("github://owner/repo", "github://owner/repo"),
            ("github://owner", "github://owner"),
            (
                "github://owner/repo?environment=production",
                "github://owner/repo?environment=production",
            ),
        ];
        for (input, shown) in cases {
            let parsed = KeyRef::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(parsed.to_string(), shown, "{input}");
        }
        assert_eq!(
            KeyRef::parse("awskms://localhost:4566/alias/x").unwrap(),
            KeyRef::AwsKms {
                endpoint: Some("localhost:4566".into()),
                key_id: "alias/x".into()
            }
        );
    }

    #[test]
    fn github_environment_is_part_of_the_reference() {
        assert_eq!(
            KeyRef::parse("github://acme/app?environment=prod").unwrap(),
            KeyRef::GitHub {
                owner: "acme".into(),
                repo: Some("app".into()),
                environment: Some("prod".into()),
            }
        );
        assert_eq!(
            KeyRef::parse("github://acme").unwrap(),
            KeyRef::GitHub {
                owner: "acme".into(),
                repo: None,
                environment: None,
            }
        );
    }

    #[test]
    fn unknown_scheme_lists_the_known_ones() {
        let err = KeyRef::parse("azurekms://vault/key")
            .unwrap_err()
            .to_string();
        assert!(err.contains("azurekms"), "{err}");
        for s in SCHEMES {
            assert!(
                err.contains(&format!("{}://", s.name)),
                "{err} lacks {}",
                s.name
            );
        }
    }

    #[test]
    fn rejects_malformed_references() {
        for bad in [
            "",
            "k8s://only-namespace",
            "k8s://ns/name/extra",
            "env://",
            "gcpkms://projects/p/cryptoKeys/k",
            "hashivault://",
            "file://relative/path",
            "github://",
            "github://owner?environment=prod",
            "github://owner/repo?environment=",
            "github://owner/repo?env=prod",
            "github://owner/repo/extra",
            "awskms://",
        ] {
            assert!(KeyRef::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
