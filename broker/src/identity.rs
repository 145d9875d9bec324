//! Who is calling: taken from the kernel (SO_PEERCRED on the unix socket), never
//! from the request.

use std::fmt;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Effective uid of the peer process at connect time.
    pub uid: u32,
    /// Effective gid of the peer process at connect time.
    pub gid: u32,
    /// Peer pid, when the kernel reports it.
    pub pid: Option<i32>,
}

impl Caller {
    /// The caller of a request on our unix listener, from tonic's connect info.
    pub fn from_request<T>(req: &tonic::Request<T>) -> Option<Caller> {
        let info = req
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()?;
        let cred = info.peer_cred?;
        Some(Caller {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
        })
    }

    /// The executable of the peer, where /proc lets us read it (for logs and audit;
    /// informational only, a pid can be reused).
    pub fn executable(&self) -> Option<String> {
        let pid = self.pid?;
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .map(|p| p.display().to_string())
    }

    /// The identity recorded in signed payloads (`keybroker.dev/caller`).
    pub fn payload_identity(&self) -> String {
        format!("unix:uid={},gid={}", self.uid, self.gid)
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid={} gid={}", self.uid, self.gid)?;
        if let Some(pid) = self.pid {
            write!(f, " pid={pid}")?;
        }
        Ok(())
    }
}
