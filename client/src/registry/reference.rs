//! Image references: `[REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST]`, normalized the
//! way docker and cosign do (Docker Hub → `index.docker.io`, `library/` for
//! single-name images).

use std::fmt;

use crate::Error;

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Registry host as written in references (`index.docker.io` for Docker Hub).
    pub registry: String,
    /// Repository path (`library/alpine`).
    pub repository: String,
    /// Tag, if any.
    pub tag: Option<String>,
    /// Digest (`sha256:…`), if any.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses a reference.
    pub fn parse(input: &str) -> Result<Self, Error> {
        let bad = |reason: &str| Error::InvalidReference {
            reference: input.to_string(),
            reason: reason.to_string(),
        };
        let (name, digest) = match input.split_once('@') {
            Some((n, d)) => {
                let hex = d
                    .strip_prefix("sha256:")
                    .ok_or_else(|| bad("only sha256 digests are supported"))?;
                if hex.len() != 64
                    || !hex
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
                {
                    return Err(bad("digest must be sha256:<64 lower-case hex>"));
                }
                (n, Some(d.to_string()))
            }
            None => (input, None),
        };
        let last_slash = name.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match name[last_slash..].rfind(':') {
            Some(i) => (
                &name[..last_slash + i],
                Some(name[last_slash + i + 1..].to_string()),
            ),
            None => (name, None),
        };
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
                && !t.starts_with(['.', '-']);
            if !ok {
                return Err(bad("invalid tag"));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_string(), rest.to_string())
            }
            _ => ("index.docker.io".to_string(), name.to_string()),
        };
        let registry = if registry == "docker.io" {
            "index.docker.io".to_string()
        } else {
            registry
        };
        let repository = if registry == "index.docker.io" && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let repo_ok = !repository.is_empty()
            && repository.split('/').all(|seg| {
                !seg.is_empty()
                    && seg.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            });
        if !repo_ok {
            return Err(bad("repository must be lower-case path segments"));
        }
        Ok(ImageRef {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// `REGISTRY/REPOSITORY`, cosign's docker-reference.
    pub fn docker_reference(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The host the registry API is served on (Docker Hub's differs from its name).
    pub fn api_host(&self) -> &str {
        if self.registry == "index.docker.io" {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }

    /// The same image pinned to `digest` (the tag kept for messages).
    pub fn with_digest(&self, digest: &str) -> ImageRef {
        ImageRef {
            digest: Some(digest.to_string()),
            ..self.clone()
        }
    }

    /// What to ask the registry for: the digest if known, else the tag, else `latest`.
    pub fn manifest_reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.docker_reference())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn normalizes_like_docker() {
        let r = ImageRef::parse("alpine").unwrap();
        assert_eq!(r.docker_reference(), "index.docker.io/library/alpine");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        let r = ImageRef::parse("127.0.0.1:5000/app/api:v1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "app/api", Some("v1"))
        );
        let r = ImageRef::parse(&format!("localhost/app@{D}")).unwrap();
        assert_eq!(r.digest.as_deref(), Some(D));
        assert_eq!(r.manifest_reference(), D);
        let r = ImageRef::parse(&format!("ghcr.io/o/r:t@{D}")).unwrap();
        assert_eq!(r.tag.as_deref(), Some("t"));
        assert_eq!(
            ImageRef::parse("docker.io/x/y").unwrap().registry,
            "index.docker.io"
        );
    }

    #[test]
    fn rejects_bad_references() {
        for bad in [
            "",
            "UPPER/case",
            "reg.io/app@sha256:abc",
            "reg.io/app:",
            "reg.io//x",
            "reg.io/app@md5:00",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
    }
}
