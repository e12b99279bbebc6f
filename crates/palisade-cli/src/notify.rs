//! The systemd readiness protocol (`Type=notify`): one datagram to
//! `$NOTIFY_SOCKET`. Without the variable (not under systemd) nothing is sent.

/// The listeners accept: `systemctl start` returns, dependants start.
pub fn ready() {
    send("READY=1");
}

/// Draining has begun.
pub fn stopping() {
    send("STOPPING=1");
}

fn send(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send_to(&path, state) {
        tracing::warn!(
            "cannot notify systemd ({state}) at {}: {e}",
            path.to_string_lossy()
        );
    }
}

#[cfg(target_os = "linux")]
fn send_to(path: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt as _;
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let bytes = path.as_bytes();
    // "@name" is a socket in the abstract namespace.
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(path)?,
    };
    let socket = UnixDatagram::unbound()?;
    socket.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn send_to(_: &std::ffi::OsStr, _: &str) -> std::io::Result<()> {
    Ok(())
}
