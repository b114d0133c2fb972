//! A loopback TCP proxy in front of kube-apiserver, so a test can do to every client connection
//! what an API VIP failover or a dead load balancer does: stall it or reset it.
//!
//! Pods and agents get kubeconfigs that point here ([`ControlPlane::client_url`]); the
//! simulators and the control plane's own components talk to kube-apiserver directly, so a
//! frozen proxy stalls the agents under test and nothing the bed itself needs.
//!
//! TLS passes through untouched (the serving certificate names 127.0.0.1, whatever the port).
//!
//! - **Freeze** stops moving bytes in both directions while every socket stays open:
//!   [`Freeze::All`] stalls established and new connections alike (a black hole);
//!   [`Freeze::Established`] stalls only the connections open at that moment while new ones
//!   work, as after a VIP moves to another API server and the old connections are left
//!   half-open. Limitation: the proxy's own kernel still acknowledges what clients send and
//!   answers TCP keepalive probes, so a frozen connection is only detectable by
//!   application-level timeouts, as with a hung server process, not by TCP keepalive.
//! - **Thaw** resumes forwarding, bytes held back included.
//! - **Reset** closes every open connection with an RST (`SO_LINGER` 0) on both sides.
//!
//! [`ControlPlane::client_url`]: crate::controlplane::ControlPlane::client_url

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Which connections a freeze stalls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freeze {
    /// Every connection, open now or opened while frozen.
    All,
    /// Only the connections open at the moment of the freeze; new ones are forwarded.
    Established,
}

impl std::str::FromStr for Freeze {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(Self::All),
            "established" => Ok(Self::Established),
            other => Err(format!(
                "unknown freeze scope {other:?}: use all or established"
            )),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct State {
    /// The freeze in force and the first connection id it does not cover (for `Established`).
    frozen: Option<(Freeze, u64)>,
    /// Bumped by every reset; a connection opened under an older value is reset.
    resets: u64,
}

impl State {
    fn stalls(&self, conn: u64) -> bool {
        match self.frozen {
            None => false,
            Some((Freeze::All, _)) => true,
            Some((Freeze::Established, first_new)) => conn < first_new,
        }
    }
}

struct Shared {
    upstream: SocketAddr,
    state: watch::Sender<State>,
    next_conn: AtomicU64,
    open: AtomicUsize,
    accepted: AtomicU64,
}

/// The running proxy; dropping it closes the listener and every connection.
pub struct ApiProxy {
    port: u16,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for ApiProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiProxy")
            .field("port", &self.port)
            .field("upstream", &self.shared.upstream)
            .finish_non_exhaustive()
    }
}

impl Drop for ApiProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a test can do to the proxy from anywhere (cheap to clone).
#[derive(Clone)]
pub struct ProxyControl {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ProxyControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyControl")
            .field("state", &*self.shared.state.borrow())
            .finish()
    }
}

impl ProxyControl {
    /// Stops forwarding on the connections `scope` names; sockets stay open.
    pub fn freeze(&self, scope: Freeze) {
        let first_new = self.shared.next_conn.load(Ordering::SeqCst);
        self.shared
            .state
            .send_modify(|s| s.frozen = Some((scope, first_new)));
        tracing::info!(?scope, "API proxy frozen");
    }

    /// Resumes forwarding on every connection.
    pub fn thaw(&self) {
        self.shared.state.send_modify(|s| s.frozen = None);
        tracing::info!("API proxy thawed");
    }

    /// Resets (RST) every connection open now; later connections are not affected.
    pub fn reset(&self) {
        self.shared.state.send_modify(|s| s.resets += 1);
        tracing::info!("API proxy reset every connection");
    }

    /// The freeze in force, if any.
    pub fn frozen(&self) -> Option<Freeze> {
        self.shared.state.borrow().frozen.map(|(f, _)| f)
    }

    /// Client connections open right now.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Client connections accepted since start.
    pub fn accepted_connections(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl ApiProxy {
    /// Listens on a free loopback port and forwards each connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            upstream,
            state: watch::channel(State::default()).0,
            next_conn: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Self { port, shared, task })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn control(&self) -> ProxyControl {
        ProxyControl {
            shared: self.shared.clone(),
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Dropping the set (this task aborted with the proxy) ends every connection.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        match accepted {
            Ok((stream, _)) => {
                let id = shared.next_conn.fetch_add(1, Ordering::SeqCst);
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                conns.spawn(serve(shared.clone(), stream, id));
            }
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!(error = %e, "API proxy accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

struct OpenGuard<'a>(&'a AtomicUsize);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve(shared: Arc<Shared>, client: TcpStream, id: u64) {
    shared.open.fetch_add(1, Ordering::SeqCst);
    let _open = OpenGuard(&shared.open);
    let mut state = shared.state.subscribe();
    let resets_at_start = state.borrow().resets;
    // A connection made while everything is frozen is held before it reaches the API server.
    let mut flowing = state.clone();
    let connected = tokio::select! {
        r = async {
            wait_flowing(&mut flowing, id).await;
            TcpStream::connect(shared.upstream).await
        } => r,
        () = wait_reset(&mut state, resets_at_start) => {
            rst(&client);
            return;
        }
    };
    let upstream = match connected {
        Ok(s) => s,
        // The API server is stopped: the client sees its connection closed, as from a load
        // balancer without a backend.
        Err(e) => {
            tracing::debug!(error = %e, "API proxy: upstream refused");
            rst(&client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client, upstream) = (Arc::new(client), Arc::new(upstream));
    let pumps = async {
        tokio::join!(
            pump(&client, &upstream, &shared, id),
            pump(&upstream, &client, &shared, id)
        )
    };
    tokio::select! {
        _ = pumps => {}
        () = wait_reset(&mut state, resets_at_start) => {
            rst(&client);
            rst(&upstream);
        }
    }
}

/// Waits while `conn` is stalled by a freeze.
async fn wait_flowing(state: &mut watch::Receiver<State>, conn: u64) {
    let _ = state.wait_for(|s| !s.stalls(conn)).await;
}

async fn wait_reset(state: &mut watch::Receiver<State>, since: u64) {
    if state.wait_for(|s| s.resets != since).await.is_err() {
        // The proxy is gone; its task ends this connection.
        std::future::pending::<()>().await;
    }
}

/// Copies `from` → `to` until EOF or an error, pausing whenever this connection is frozen.
async fn pump(from: &TcpStream, to: &TcpStream, shared: &Shared, conn: u64) {
    let mut state = shared.state.subscribe();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        wait_flowing(&mut state, conn).await;
        if from.readable().await.is_err() {
            return;
        }
        let n = match from.try_read(&mut buf) {
            Ok(0) => {
                // Half-close: pass the EOF on so the peer sees the same.
                let _ = nix::sys::socket::shutdown(
                    std::os::fd::AsRawFd::as_raw_fd(to),
                    nix::sys::socket::Shutdown::Write,
                );
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        };
        let mut sent = 0;
        while sent < n {
            // Bytes read just before a freeze are held back too.
            wait_flowing(&mut state, conn).await;
            if to.writable().await.is_err() {
                return;
            }
            match to.try_write(&buf[sent..n]) {
                Ok(k) => sent += k,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    }
}

/// Makes the socket's close send an RST instead of a FIN.
fn rst(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    if let Err(e) =
        nix::sys::socket::setsockopt(&stream.as_fd(), nix::sys::socket::sockopt::Linger, &linger)
    {
        tracing::debug!(error = %e, "SO_LINGER 0 failed; the close sends a FIN");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An upstream that echoes every byte back.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    async fn echo(s: &mut TcpStream, msg: &[u8], timeout: Duration) -> Option<Vec<u8>> {
        s.write_all(msg).await.ok()?;
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(timeout, s.read_exact(&mut buf))
            .await
            .ok()?
            .ok()?;
        Some(buf)
    }

    #[test]
    fn freeze_scopes_cover_the_right_connections() {
        let rules = [
            (None, 0, false),
            (Some((Freeze::All, 3)), 0, true),
            (Some((Freeze::All, 3)), 7, true),
            (Some((Freeze::Established, 3)), 2, true),
            (Some((Freeze::Established, 3)), 3, false),
        ];
        for (frozen, conn, stalls) in rules {
            let s = State { frozen, resets: 0 };
            assert_eq!(s.stalls(conn), stalls, "{frozen:?} conn {conn}");
        }
    }

    #[tokio::test]
    async fn forwards_freezes_thaws_and_resets() {
        let proxy = ApiProxy::start(echo_server().await).await.unwrap();
        let ctl = proxy.control();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, proxy.port()));
        let short = Duration::from_millis(300);
        let mut old = TcpStream::connect(addr).await.unwrap();
        assert_eq!(
            echo(&mut old, b"a", short).await.as_deref(),
            Some(&b"a"[..])
        );

        ctl.freeze(Freeze::Established);
        assert_eq!(
            echo(&mut old, b"b", short).await,
            None,
            "frozen yet forwarded"
        );
        let mut new = TcpStream::connect(addr).await.unwrap();
        assert_eq!(
            echo(&mut new, b"c", short).await.as_deref(),
            Some(&b"c"[..]),
            "a connection made after an Established freeze must work"
        );
        ctl.thaw();
        // The byte held back arrives after the thaw.
        let mut held = [0u8; 1];
        tokio::time::timeout(short, old.read_exact(&mut held))
            .await
            .expect("held byte arrives")
            .unwrap();
        assert_eq!(&held, b"b");

        ctl.freeze(Freeze::All);
        assert_eq!(echo(&mut new, b"d", short).await, None);
        ctl.reset();
        let mut rest = [0u8; 8];
        let read = tokio::time::timeout(short, old.read(&mut rest))
            .await
            .expect("reset ends the read");
        assert!(
            matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "want an RST, got {read:?}"
        );
        ctl.thaw();
        let mut after = TcpStream::connect(addr).await.unwrap();
        assert_eq!(
            echo(&mut after, b"e", short).await.as_deref(),
            Some(&b"e"[..])
        );
        assert_eq!(ctl.accepted_connections(), 3);
    }
}
