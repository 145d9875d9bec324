//! systemd integration: socket activation (`LISTEN_FDS`) and readiness
//! notification (`NOTIFY_SOCKET`). Both are no-ops when systemd (or
//! `systemd-socket-activate`) did not start us, so the same binary runs anywhere.

use std::os::unix::net::UnixListener as StdUnixListener;

/// The listening unix socket systemd passed us, if it passed one.
///
/// Exactly one `SOCK_STREAM` `AF_UNIX` listener is accepted (keybroker.socket
/// declares one); anything else is a configuration error, not something to
/// guess about. The `LISTEN_*` variables are removed so children never see them.
pub fn inherited_unix_listener() -> Result<Option<StdUnixListener>, String> {
    let mut fds = listenfd::ListenFd::from_env();
    match fds.len() {
        0 => Ok(None),
        1 => {
            let listener = fds
                .take_unix_listener(0)
                .map_err(|e| format!("socket activation: fd 3 is not a listening unix socket: {e}"))?
                .ok_or_else(|| "socket activation: fd 3 was already taken".to_string())?;
            listener
                .set_nonblocking(true)
                .map_err(|e| format!("socket activation: {e}"))?;
            Ok(Some(listener))
        }
        n => Err(format!(
            "socket activation: systemd passed {n} sockets; keybrokerd serves exactly one (ListenStream= once in keybroker.socket)"
        )),
    }
}

/// Tells systemd we are ready (`Type=notify`). Without `NOTIFY_SOCKET` this does
/// nothing; a failure to notify is logged, never fatal.
pub fn notify_ready() {
    notify(&[sd_notify::NotifyState::Ready], "READY=1");
}

/// `RELOADING=1` (with the monotonic timestamp systemd wants) before a reload.
pub fn notify_reloading() {
    let mut state = vec![sd_notify::NotifyState::Reloading];
    if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
        state.push(now);
    }
    notify(&state, "RELOADING=1");
}

/// `STOPPING=1` when shutting down.
pub fn notify_stopping() {
    notify(&[sd_notify::NotifyState::Stopping], "STOPPING=1");
}

fn notify(state: &[sd_notify::NotifyState<'_>], what: &str) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!("could not send {what} to systemd: {e}");
    }
}
