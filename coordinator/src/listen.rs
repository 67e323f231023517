//! Claiming the listening address for this process alone.
//!
//! The router runs one event loop per core, each with its own listening
//! socket on the same address (`SO_REUSEPORT`, as nginx's `reuseport`), so
//! that the kernel spreads new connections over them. But the kernel lets
//! any process of the same user join such a group: a second router started
//! on the same port would silently take half of the connections, with a
//! registry of its own. Two checks, made before the group is bound, keep
//! the group this process's own:
//!
//! 1. **The port lock**, an abstract Unix socket named after the port
//!    (`@llm-router/port/<port>`), bound before any TCP socket. Binding a
//!    name that is taken fails; the kernel releases the name when its
//!    holder exits or is killed (`kill -9` included), so it can never be
//!    left stale; it leaves nothing on disk; and it belongs to the network
//!    namespace, as the port itself does. Of two routers starting at the
//!    same moment on one port, exactly one gets it. The other learns the
//!    holder's PID from the socket's peer credentials and says so.
//! 2. **The probe**: a socket bound to the address *without*
//!    `SO_REUSEPORT` fails while anything listens there, whatever options
//!    that listener used. So any other program on the port (nginx, an
//!    Ollama, a router of an older version) stops start-up too, before the
//!    group exists.
//!
//! Once both pass, the group is bound. Another router cannot join it,
//! because it would need the lock first; and no other program can either,
//! except one of the same user that skips such checks and binds with
//! `SO_REUSEPORT` in the microseconds between the probe and the bind.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{self, sockopt, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
use tokio::net::TcpListener;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "port {port} is already served by another llm-router{holder}; stop it, or start this one with another --port"
    )]
    PortTakenByRouter { port: u16, holder: HolderPid },
    #[error(
        "{address} is already in use by another program; stop it, or start the router with another --port or --host"
    )]
    AddressInUse { address: SocketAddr },
    #[error("cannot listen on {address}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot take the lock for port {port}")]
    Lock {
        port: u16,
        #[source]
        source: nix::Error,
    },
}

/// The PID holding a port lock, when the kernel says it.
#[derive(Debug, Clone, Copy)]
pub struct HolderPid(pub Option<i32>);

impl std::fmt::Display for HolderPid {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(pid) => write!(formatter, " (PID {pid})"),
            None => Ok(()),
        }
    }
}

/// This process's claim on a port; the kernel drops it when the process ends.
#[derive(Debug)]
pub struct PortLock {
    _socket: OwnedFd,
}

/// Binds the first socket of this process's listening group on `address`,
/// after taking the port's lock and checking that nothing else listens
/// there (see the module's documentation). Keep the lock for as long as
/// the router serves. Port 0 takes a free port, then its lock.
pub fn listen_exclusively(address: SocketAddr) -> Result<(TcpListener, PortLock), ListenError> {
    if address.port() == 0 {
        let listener = bind_reusing_port(address).map_err(|source| bind_error(address, source))?;
        let port = listener
            .local_addr()
            .map_err(|source| ListenError::Bind { address, source })?
            .port();
        return Ok((listener, PortLock::take(port)?));
    }
    let lock = PortLock::take(address.port())?;
    probe_exclusive_bind(address)?;
    let listener = bind_reusing_port(address).map_err(|source| bind_error(address, source))?;
    Ok((listener, lock))
}

/// A listening socket with `SO_REUSEPORT`, so that several of this
/// process's event loops can share one address and the kernel balances
/// connections over them.
pub fn bind_reusing_port(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.set_nodelay(true)?;
    socket.bind(address)?;
    socket.listen(1024)
}

impl PortLock {
    fn take(port: u16) -> Result<Self, ListenError> {
        let name = lock_name(port);
        let address = UnixAddr::new_abstract(name.as_bytes())
            .map_err(|source| ListenError::Lock { port, source })?;
        let socket = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|source| ListenError::Lock { port, source })?;
        match socket::bind(socket.as_raw_fd(), &address) {
            Ok(()) => {}
            Err(nix::errno::Errno::EADDRINUSE) => {
                return Err(ListenError::PortTakenByRouter {
                    port,
                    holder: HolderPid(lock_holder(&address)),
                })
            }
            Err(source) => return Err(ListenError::Lock { port, source }),
        }
        // Listening lets a second router ask who holds the lock (its
        // connection carries this process's credentials).
        let backlog = Backlog::new(16).map_err(|source| ListenError::Lock { port, source })?;
        socket::listen(&socket, backlog).map_err(|source| ListenError::Lock { port, source })?;
        Ok(PortLock { _socket: socket })
    }
}

fn lock_name(port: u16) -> String {
    format!("llm-router/port/{port}")
}

/// The PID of the process listening on a port lock, from the credentials
/// the kernel gives a connection to it. Non-blocking: a full queue (many
/// refused starts) only means the PID goes unsaid.
fn lock_holder(address: &UnixAddr) -> Option<i32> {
    let socket = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .ok()?;
    socket::connect(socket.as_raw_fd(), address).ok()?;
    let credentials = socket::getsockopt(&socket, sockopt::PeerCredentials).ok()?;
    Some(credentials.pid())
}

/// Fails if anything listens on `address`: a bind without `SO_REUSEPORT`
/// conflicts with every listener, reuse-port or not. `SO_REUSEADDR` only
/// lets it pass over connections of an earlier run in TIME_WAIT.
fn probe_exclusive_bind(address: SocketAddr) -> Result<(), ListenError> {
    let socket = match address {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(|source| ListenError::Bind { address, source })?;
    socket
        .set_reuseaddr(true)
        .map_err(|source| ListenError::Bind { address, source })?;
    socket
        .bind(address)
        .map_err(|source| bind_error(address, source))
}

fn bind_error(address: SocketAddr, source: std::io::Error) -> ListenError {
    if source.kind() == std::io::ErrorKind::AddrInUse {
        ListenError::AddressInUse { address }
    } else {
        ListenError::Bind { address, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_claim_on_a_port_is_refused_and_names_this_process() {
        let (listener, _lock) =
            listen_exclusively(SocketAddr::from(([127, 0, 0, 1], 0))).expect("first claim");
        let address = listener.local_addr().expect("address");
        match listen_exclusively(address) {
            Err(ListenError::PortTakenByRouter { port, holder }) => {
                assert_eq!(port, address.port());
                assert_eq!(holder.0, Some(std::process::id() as i32));
            }
            other => panic!("expected the port lock to refuse, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_port_served_by_another_program_is_refused() {
        // A listener that uses SO_REUSEPORT itself, as a router without the
        // lock would: the probe still sees it.
        let other = bind_reusing_port(SocketAddr::from(([127, 0, 0, 1], 0))).expect("other");
        let address = other.local_addr().expect("address");
        match listen_exclusively(address) {
            Err(ListenError::AddressInUse { address: refused }) => assert_eq!(refused, address),
            other => panic!("expected the probe to refuse, got {other:?}"),
        }
    }
}
