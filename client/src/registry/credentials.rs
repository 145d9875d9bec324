//! Registry credentials: explicit flags first, then docker's config
//! (`$DOCKER_CONFIG/config.json` or `~/.docker/config.json`): `auths`, and
//! `credHelpers` / `credsStore` through `docker-credential-*` helpers.

use std::{fmt, path::PathBuf, process::Stdio};

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use serde::Deserialize;
use zeroize::Zeroizing;

/// A username and password (or identity token). Never printed.
#[derive(Clone)]
pub struct Credentials {
    /// Username.
    pub username: String,
    /// Password or token.
    pub password: Zeroizing<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({}, [redacted])", self.username)
    }
}

#[derive(Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: std::collections::HashMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: std::collections::HashMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

#[derive(Deserialize)]
struct HelperReply {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

fn docker_config_path() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// Looks up credentials for `registry` (as written in references) in docker's config.
pub fn from_docker_config(registry: &str) -> Option<Credentials> {
    let text = std::fs::read_to_string(docker_config_path()?).ok()?;
    let config: DockerConfig = serde_json::from_str(&text).ok()?;
    let names: Vec<String> = if registry == "index.docker.io" {
        vec![
            "https://index.docker.io/v1/".into(),
            "index.docker.io".into(),
            "docker.io".into(),
        ]
    } else {
        vec![
            registry.to_string(),
            format!("https://{registry}"),
            format!("http://{registry}"),
        ]
    };
    for name in &names {
        if let Some(helper) = config.cred_helpers.get(name) {
            return from_helper(helper, name);
        }
    }
    for name in &names {
        if let Some(e) = config.auths.get(name) {
            if let Some(c) = decode_entry(e) {
                return Some(c);
            }
        }
    }
    let store = config.creds_store.as_deref()?;
    names.iter().find_map(|n| from_helper(store, n))
}

fn decode_entry(e: &AuthEntry) -> Option<Credentials> {
    if let (Some(u), Some(p)) = (&e.username, &e.password) {
        return Some(Credentials {
            username: u.clone(),
            password: Zeroizing::new(p.clone()),
        });
    }
    let raw = Zeroizing::new(B64.decode(e.auth.as_deref()?).ok()?);
    let text = std::str::from_utf8(&raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some(Credentials {
        username: u.to_string(),
        password: Zeroizing::new(p.to_string()),
    })
}

fn from_helper(helper: &str, server: &str) -> Option<Credentials> {
    use std::io::Write;
    let mut child = std::process::Command::new(format!("docker-credential-{helper}"))
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(server.as_bytes()).ok()?;
    let out = child.wait_with_output().ok()?;
    if !out.status.success() {
        return None;
    }
    let out = Zeroizing::new(out.stdout);
    let reply: HelperReply = serde_json::from_slice(&out).ok()?;
    Some(Credentials {
        username: reply.username,
        password: Zeroizing::new(reply.secret),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_auth_entries_and_hides_passwords() {
        let e = AuthEntry {
            auth: Some(B64.encode("alice:s3cr:et")),
            ..Default::default()
        };
        let c = decode_entry(&e).unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "s3cr:et")
        );
        assert!(!format!("{c:?}").contains("s3cr"));
    }
}
