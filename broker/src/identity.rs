//! Who is calling: taken from the transport, never from the request. On the unix
//! socket, the kernel's peer credentials (SO_PEERCRED); on the TCP listener, the
//! client certificate that mutual TLS verified against the configured CA.

use std::fmt;

/// What the kernel says about a unix-socket peer, read once when it connects:
/// SO_PEERCRED (uid, gid, pid) and SO_PEERGROUPS (supplementary groups).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// Pid, if the kernel reports it.
    pub pid: Option<i32>,
    /// Supplementary groups (empty where the kernel cannot tell).
    pub groups: Vec<u32>,
}

/// Linux's SO_PEERGROUPS (asm-generic; not exported by the libc crate here).
const SO_PEERGROUPS: libc::c_int = 59;

impl PeerInfo {
    /// Reads the peer of a connected unix stream.
    pub fn of(stream: &tokio::net::UnixStream) -> std::io::Result<PeerInfo> {
        use std::os::fd::AsRawFd;
        let cred = stream.peer_cred()?;
        let fd = stream.as_raw_fd();
        let mut groups = vec![0 as libc::gid_t; 64];
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: fd is a live socket; buf and len describe a writable buffer.
        let mut rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ERANGE) {
            // len now holds the size needed.
            groups = vec![0; len as usize / std::mem::size_of::<libc::gid_t>() + 1];
            len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
            // SAFETY: as above, with the larger buffer.
            rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    SO_PEERGROUPS,
                    groups.as_mut_ptr().cast(),
                    &mut len,
                )
            };
        }
        if rc == -1 {
            // Kernels before 4.13: no supplementary groups, primary gid only.
            groups.clear();
        } else {
            groups.truncate(len as usize / std::mem::size_of::<libc::gid_t>());
        }
        Ok(PeerInfo {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
            groups,
        })
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A local process on the unix socket.
    Unix {
        /// Effective uid of the peer process at connect time.
        uid: u32,
        /// Effective gid of the peer process at connect time.
        gid: u32,
        /// Peer pid, when the kernel reports it.
        pid: Option<i32>,
        /// Supplementary groups at connect time (SO_PEERGROUPS).
        groups: Vec<u32>,
    },
    /// A remote client on the mTLS listener.
    Certificate(CertIdentity),
}

/// What a verified client certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CertIdentity {
    /// URI subject alternative names (SPIFFE IDs are URIs: `spiffe://…`).
    pub uris: Vec<String>,
    /// DNS subject alternative names.
    pub dns: Vec<String>,
    /// The subject's distinguished name, for logs and audit only (never matched:
    /// SANs are what certificate authorities vouch for today).
    pub subject: String,
}

impl CertIdentity {
    /// Reads the SANs of a DER certificate (the leaf the TLS layer verified).
    pub fn from_der(der: &[u8]) -> Result<CertIdentity, String> {
        use x509_cert::{
            der::Decode,
            ext::pkix::{name::GeneralName, SubjectAltName},
            Certificate,
        };
        let cert = Certificate::from_der(der).map_err(|e| format!("client certificate: {e}"))?;
        let tbs = cert.tbs_certificate();
        let mut id = CertIdentity {
            subject: tbs.subject().to_string(),
            ..Default::default()
        };
        for ext in tbs.extensions().into_iter().flatten() {
            if ext.extn_id != const_oid_san() {
                continue;
            }
            let san = SubjectAltName::from_der(ext.extn_value.as_bytes())
                .map_err(|e| format!("client certificate SAN: {e}"))?;
            for name in san.0 {
                match name {
                    GeneralName::UniformResourceIdentifier(u) => id.uris.push(u.to_string()),
                    GeneralName::DnsName(d) => id.dns.push(d.to_string()),
                    _ => {}
                }
            }
        }
        Ok(id)
    }
}

fn const_oid_san() -> x509_cert::der::oid::ObjectIdentifier {
    // id-ce-subjectAltName
    x509_cert::der::oid::ObjectIdentifier::new_unwrap("2.5.29.17")
}

impl Caller {
    /// The caller of a request: peer credentials on our unix listener, the
    /// verified client certificate on the TLS listener. `None` when the
    /// transport told us nothing (the request is then refused).
    pub fn from_request<T>(req: &tonic::Request<T>) -> Option<Caller> {
        if let Some(p) = req.extensions().get::<PeerInfo>() {
            return Some(Caller::Unix {
                uid: p.uid,
                gid: p.gid,
                pid: p.pid,
                groups: p.groups.clone(),
            });
        }
        if let Some(info) = req
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
        {
            let cred = info.peer_cred?;
            return Some(Caller::Unix {
                uid: cred.uid(),
                gid: cred.gid(),
                pid: cred.pid(),
                groups: Vec::new(),
            });
        }
        let certs = req.peer_certs()?;
        let leaf = certs.first()?;
        match CertIdentity::from_der(leaf.as_ref()) {
            Ok(id) => Some(Caller::Certificate(id)),
            Err(e) => {
                tracing::warn!("{e}");
                None
            }
        }
    }

    /// The executable of a local peer, where /proc lets us read it (for logs and
    /// audit; informational only, a pid can be reused).
    pub fn executable(&self) -> Option<String> {
        let Caller::Unix { pid: Some(pid), .. } = self else {
            return None;
        };
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .map(|p| p.display().to_string())
    }

    /// The identity recorded in signed payloads (`keybroker.dev/caller`).
    pub fn payload_identity(&self) -> String {
        match self {
            Caller::Unix { uid, gid, .. } => format!("unix:uid={uid},gid={gid}"),
            Caller::Certificate(c) => match (c.uris.first(), c.dns.first()) {
                (Some(uri), _) => format!("x509:uri={uri}"),
                (None, Some(dns)) => format!("x509:dns={dns}"),
                (None, None) => format!("x509:subject={}", c.subject),
            },
        }
    }

    /// The caller as an audit record field.
    pub fn audit_json(&self) -> serde_json::Value {
        match self {
            Caller::Unix {
                uid,
                gid,
                pid,
                groups,
            } => serde_json::json!({
                "uid": uid,
                "gid": gid,
                "groups": groups,
                "pid": pid,
                "exe": self.executable(),
                "identity": self.payload_identity(),
            }),
            Caller::Certificate(c) => serde_json::json!({
                "x509_uris": c.uris,
                "x509_dns": c.dns,
                "x509_subject": c.subject,
                "identity": self.payload_identity(),
            }),
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Unix { uid, gid, pid, .. } => {
                write!(f, "uid={uid} gid={gid}")?;
                if let Some(pid) = pid {
                    write!(f, " pid={pid}")?;
                }
                Ok(())
            }
            Caller::Certificate(_) => f.write_str(&self.payload_identity()),
        }
    }
}
