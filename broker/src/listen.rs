//! The unix-socket listener: safe stale-socket handling, mode and group.

use std::{
    io,
    os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use tokio::net::UnixListener;

/// The identity of the socket file we created. Dropping it removes our socket,
/// and never one that another daemon bound after us.
#[derive(Debug)]
pub struct SocketGuard {
    path: PathBuf,
    dev_ino: (u64, u64),
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.dev_ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Binds `path`. An existing socket that answers is a live daemon: refuse. One that
/// refuses connections is stale: replace it. Anything that is not a socket: refuse.
pub fn bind_unix(
    path: &Path,
    mode: u32,
    group: Option<&str>,
) -> Result<(UnixListener, SocketGuard), String> {
    let shown = path.display();
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("creating socket directory {}: {e}", parent.display()))?;
            // Only the socket's own mode should decide who connects.
            let _ = std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755));
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(format!(
                    "{shown}: another keybrokerd is already serving on this socket"
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(socket = %shown, "removing stale socket");
                std::fs::remove_file(path)
                    .map_err(|e| format!("removing stale socket {shown}: {e}"))?;
            }
            Err(e) => {
                return Err(format!(
                    "{shown}: exists and cannot be probed ({e}); not touching it"
                ))
            }
        },
        Ok(_) => {
            return Err(format!(
                "{shown}: exists and is not a socket; refusing to remove it"
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{shown}: {e}")),
    }
    // Create the socket with no access for anyone, then open it up to `mode`:
    // no window in which a wider mode exists.
    // SAFETY: umask is process-wide; we bind during start-up before serving.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|e| format!("binding {shown}: {e}"))?;
    if let Some(group) = group {
        let gid = group_id(group)?;
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(|e| format!("chgrp {group} {shown}: {e}"))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {mode:o} {shown}: {e}"))?;
    let m = std::fs::symlink_metadata(path).map_err(|e| format!("{shown}: {e}"))?;
    Ok((
        listener,
        SocketGuard {
            path: path.to_path_buf(),
            dev_ino: (m.dev(), m.ino()),
        },
    ))
}

fn group_id(name: &str) -> Result<u32, String> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    let cname =
        std::ffi::CString::new(name).map_err(|_| format!("group {name:?}: invalid name"))?;
    // SAFETY: getgrnam returns a pointer into static storage; we read gr_gid at once,
    // during single-threaded start-up.
    let gr = unsafe { libc::getgrnam(cname.as_ptr()) };
    if gr.is_null() {
        return Err(format!("socket_group {name:?}: no such group"));
    }
    Ok(unsafe { (*gr).gr_gid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn never_deletes_a_live_socket_and_replaces_a_stale_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.sock");
        let first = bind_unix(&path, 0o600, None).unwrap();
        let err = bind_unix(&path, 0o600, None).unwrap_err();
        assert!(err.contains("already serving"), "{err}");
        // A crashed daemon: the listener is gone, its socket file stays behind.
        let (listener, guard) = first;
        drop(listener);
        std::mem::forget(guard);
        assert!(path.exists());
        let (_listener, second) = bind_unix(&path, 0o640, None).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        drop(second);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn sets_the_socket_group() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.sock");
        // SAFETY: getgid cannot fail.
        let gid = unsafe { libc::getgid() };
        let _bound = bind_unix(&path, 0o660, Some(&gid.to_string())).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().gid(), gid);
        let err =
            bind_unix(&dir.path().join("h.sock"), 0o660, Some("no-such-group-kb")).unwrap_err();
        assert!(err.contains("no such group"), "{err}");
    }

    #[test]
    fn refuses_to_replace_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-a-socket");
        std::fs::write(&path, b"data").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = rt.block_on(async { bind_unix(&path, 0o600, None).unwrap_err() });
        assert!(err.contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
    }
}
