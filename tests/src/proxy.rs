//! A TCP proxy in front of etcd's client ports, so that one agent can be cut off from etcd
//! while the others still reach it: give that member the proxy's endpoints instead of etcd's
//! (see [`crate::MemberOptions::through_etcd_proxy`]).
//!
//! The proxy runs on its own thread and runtime, so a test that blocks its own runtime (or
//! panics) cannot stall it. Three modes:
//!
//! - open: bytes flow both ways; the upstream connection is made per client connection.
//! - severed: every current connection is closed and new ones are accepted and closed at
//!   once, as when the member's host refuses connections: the agent's calls fail fast.
//! - blackholed: nothing is forwarded any more but connections stay open and new ones are
//!   accepted and left unanswered, as in a network partition: the agent's calls hang until
//!   its own timeouts. Healing resumes the held connections where they stopped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    Open,
    Severed,
    Blackholed,
}

/// A proxy for every client URL of an etcd; stopped (all connections closed) on drop.
#[derive(Debug)]
pub struct EtcdProxy {
    /// (listening port, upstream address) per etcd member.
    routes: Vec<(u16, SocketAddr)>,
    mode: watch::Sender<ProxyMode>,
    accepted: Arc<AtomicU64>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// `http://127.0.0.1:2379` -> `127.0.0.1:2379`.
fn upstream_addr(url: &str) -> Result<SocketAddr> {
    let hostport = url
        .strip_prefix("http://")
        .with_context(|| format!("etcd endpoint {url:?} is not http://host:port"))?
        .trim_end_matches('/');
    hostport
        .parse()
        .with_context(|| format!("etcd endpoint {url:?} is not http://<ip>:<port>"))
}

impl EtcdProxy {
    /// Listens on a free loopback port per URL in `upstreams` (etcd client URLs) and forwards
    /// to them; starts open.
    pub fn start(upstreams: &[String]) -> Result<EtcdProxy> {
        if upstreams.is_empty() {
            bail!("an etcd proxy needs at least one upstream");
        }
        let mut listeners = Vec::with_capacity(upstreams.len());
        let mut routes = Vec::with_capacity(upstreams.len());
        for url in upstreams {
            let upstream = upstream_addr(url)?;
            // Port 0: the kernel picks a free port, no race with other test processes.
            let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
                .context("cannot bind the etcd proxy to a loopback port")?;
            listener.set_nonblocking(true)?;
            routes.push((listener.local_addr()?.port(), upstream));
            listeners.push((listener, upstream));
        }
        let (mode, mode_rx) = watch::channel(ProxyMode::Open);
        let accepted = Arc::new(AtomicU64::new(0));
        let (shutdown, shutdown_rx) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot build the etcd proxy's runtime")?;
        let counter = accepted.clone();
        let thread = std::thread::Builder::new()
            .name("etcd-proxy".into())
            .spawn(move || {
                runtime.block_on(async move {
                    for (listener, upstream) in listeners {
                        match TcpListener::from_std(listener) {
                            Ok(l) => {
                                tokio::spawn(accept_loop(
                                    l,
                                    upstream,
                                    mode_rx.clone(),
                                    counter.clone(),
                                ));
                            }
                            Err(e) => eprintln!("pgherd harness: etcd proxy cannot listen: {e}"),
                        }
                    }
                    let _ = shutdown_rx.await;
                });
                // Dropping the runtime cancels every connection task, closing its sockets.
                drop(runtime);
            })
            .context("cannot start the etcd proxy thread")?;
        Ok(EtcdProxy {
            routes,
            mode,
            accepted,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// The proxy's client URLs, one per etcd member, to put in a member's `etcd.endpoints`.
    pub fn endpoints(&self) -> Vec<String> {
        self.routes
            .iter()
            .map(|(port, _)| format!("http://127.0.0.1:{port}"))
            .collect()
    }

    /// Closes every connection and refuses new ones (accepts and closes them at once).
    pub fn sever(&self) {
        self.mode.send_replace(ProxyMode::Severed);
    }

    /// Stops forwarding without closing anything: requests hang, as in a partition.
    pub fn blackhole(&self) {
        self.mode.send_replace(ProxyMode::Blackholed);
    }

    /// Forwards again (held connections resume; severed ones are gone for good).
    pub fn heal(&self) {
        self.mode.send_replace(ProxyMode::Open);
    }

    pub fn mode(&self) -> ProxyMode {
        *self.mode.borrow()
    }

    /// Client connections accepted so far: proves that a member really goes through the
    /// proxy.
    pub fn connections_accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for EtcdProxy {
    fn drop(&mut self) {
        self.mode.send_replace(ProxyMode::Severed);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: watch::Receiver<ProxyMode>,
    accepted: Arc<AtomicU64>,
) {
    loop {
        let socket = match listener.accept().await {
            Ok((socket, _)) => socket,
            Err(e) => {
                // Out of file descriptors and the like: keep serving after a pause.
                eprintln!("pgherd harness: etcd proxy accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        accepted.fetch_add(1, Ordering::SeqCst);
        if *mode.borrow() == ProxyMode::Severed {
            // Refused: a reset rather than an orderly close, as from a closed port.
            let _ = socket.set_zero_linger();
            drop(socket);
            continue;
        }
        tokio::spawn(connection(socket, upstream, mode.clone()));
    }
}

/// Waits until the proxy is open (`true`) or severed or gone (`false`).
async fn wait_open(mode: &mut watch::Receiver<ProxyMode>) -> bool {
    loop {
        match *mode.borrow_and_update() {
            ProxyMode::Open => return true,
            ProxyMode::Severed => return false,
            ProxyMode::Blackholed => {}
        }
        if mode.changed().await.is_err() {
            return false;
        }
    }
}

/// Resolves once the proxy is severed or gone.
async fn wait_severed(mode: &mut watch::Receiver<ProxyMode>) {
    loop {
        if *mode.borrow_and_update() == ProxyMode::Severed {
            return;
        }
        if mode.changed().await.is_err() {
            return;
        }
    }
}

async fn connection(client: TcpStream, upstream: SocketAddr, mut mode: watch::Receiver<ProxyMode>) {
    let _ = client.set_nodelay(true);
    // A connection accepted while blackholed reaches etcd only once healed.
    if !wait_open(&mut mode).await {
        let _ = client.set_zero_linger();
        return;
    }
    let server = match TcpStream::connect(upstream).await {
        Ok(s) => s,
        // etcd is down: close the client's connection as etcd's closed port would.
        Err(_) => {
            let _ = client.set_zero_linger();
            return;
        }
    };
    let _ = server.set_nodelay(true);
    let _ = client.set_zero_linger();
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // The first direction to fail (severed, reset) ends both: the halves drop and close.
    let _ = tokio::try_join!(
        pump(client_read, server_write, mode.clone()),
        pump(server_read, client_write, mode),
    );
}

/// Copies `from` to `to` while the proxy is open; holds while blackholed; fails when severed.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut mode: watch::Receiver<ProxyMode>,
) -> std::io::Result<()> {
    let severed = || std::io::Error::other("severed by the test");
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !wait_open(&mut mode).await {
            return Err(severed());
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => r?,
            changed = mode.changed() => {
                if changed.is_err() {
                    return Err(severed());
                }
                continue;
            }
        };
        if n == 0 {
            // Half-close: pass the FIN on and let the other direction finish.
            let _ = to.shutdown().await;
            return Ok(());
        }
        // Read while open; hold it if the proxy was blackholed meanwhile.
        if !wait_open(&mut mode).await {
            return Err(severed());
        }
        let mut sever = mode.clone();
        tokio::select! {
            r = to.write_all(&buf[..n]) => r?,
            _ = wait_severed(&mut sever) => return Err(severed()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls_parse() {
        assert_eq!(
            upstream_addr("http://127.0.0.1:2379").unwrap(),
            "127.0.0.1:2379".parse::<SocketAddr>().unwrap()
        );
        assert!(upstream_addr("https://127.0.0.1:2379").is_err());
        assert!(upstream_addr("http://localhost:2379").is_err());
    }
}
