//! A fault-injecting TCP proxy for tests: put it between a client and a broker
//! (or an application and a database server) and switch faults while traffic
//! flows.
//!
//! Why our own: the Rust port of Toxiproxy (`noxious`) runs as a server behind an
//! HTTP API, was last released in 2021 against tokio-util 0.6, and has no fault
//! that stops *reading* one direction (the one that fills a client's send buffer,
//! as a broker frozen in a GC pause does). `tc netem` needs a network namespace
//! per test and cannot hold bytes at the application level either. The faults
//! here are a few lines each on top of two copy loops.
//!
//! | fault | what the peers see |
//! |---|---|
//! | [`latency`](FaultProxy::set_latency) | every chunk delayed |
//! | [`bandwidth`](FaultProxy::set_bandwidth) | bytes trickle at a rate per direction |
//! | [`blackhole`](FaultProxy::blackhole) | connection open, bytes read and dropped both ways (a half-open link) |
//! | [`freeze`](FaultProxy::freeze) | one direction not read at all: the sender's buffers fill, its writes stall |
//! | [`cut`](FaultProxy::cut) | every connection closed (FIN) |
//! | [`reset`](FaultProxy::reset) | every connection reset (RST) |
//! | [`reset_mid_frame`](FaultProxy::reset_mid_frame) | the next chunk in one direction is forwarded in part, then RST |
//! | [`refuse`](FaultProxy::refuse) | new connections accepted and reset at once |
//!
//! Faults set with [`blackhole`](FaultProxy::blackhole) and
//! [`freeze`](FaultProxy::freeze) apply to current and new connections until
//! [`pass`](FaultProxy::pass); [`blackhole_existing`](FaultProxy::blackhole_existing)
//! holds only the connections open now, so a client can reconnect through the
//! proxy while its old connection lingers at the server.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::HarnessError;

/// A direction of traffic through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client (who connects to the proxy) to the server behind it.
    ToServer,
    /// From the server back to the client.
    ToClient,
}

/// The faults in force, per direction where it matters.
#[derive(Debug, Clone, Default, PartialEq)]
struct Faults {
    latency: Duration,
    /// Bytes per second per direction; `None` is unlimited.
    bandwidth: Option<u64>,
    blackhole: bool,
    frozen_to_server: bool,
    frozen_to_client: bool,
}

impl Faults {
    fn frozen(&self, direction: Direction) -> bool {
        match direction {
            Direction::ToServer => self.frozen_to_server,
            Direction::ToClient => self.frozen_to_client,
        }
    }
}

/// One proxied connection's own switches.
#[derive(Debug, Default)]
struct Link {
    /// Blackholed on its own (see [`FaultProxy::blackhole_existing`]).
    blackhole: AtomicBool,
    /// Forward part of the next chunk in this direction, then reset.
    reset_to_server: AtomicBool,
    reset_to_client: AtomicBool,
}

/// How a connection is to end when the proxy ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Open,
    Close,
    Reset,
}

struct Shared {
    upstream: Mutex<SocketAddr>,
    faults: watch::Sender<Faults>,
    refuse: AtomicBool,
    links: Mutex<Vec<(Arc<Link>, watch::Sender<End>)>>,
    accepted: AtomicU64,
    bytes_to_server: AtomicU64,
    bytes_to_client: AtomicU64,
}

/// A TCP proxy on a free loopback port that forwards to one upstream address
/// and injects faults on demand. Dropping it stops the listener and closes
/// every connection.
///
/// ```no_run
/// # async fn demo(broker: std::net::SocketAddr) -> Result<(), outbox_test_harness::HarnessError> {
/// use outbox_test_harness::{Direction, FaultProxy};
/// let proxy = FaultProxy::start(broker).await?;
/// let uri = proxy.stomp_uri(); // point the client here
/// proxy.freeze(Direction::ToServer); // the broker stops reading
/// proxy.pass(); // back to normal
/// # Ok(()) }
/// ```
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream())
            .field("faults", &*self.shared.faults.borrow())
            .finish()
    }
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards each connection to
    /// `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<FaultProxy, HarnessError> {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| HarnessError::io("binding the fault proxy on 127.0.0.1", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| HarnessError::io("reading the fault proxy's address", e))?;
        let shared = Arc::new(Shared {
            upstream: Mutex::new(upstream),
            faults: watch::Sender::new(Faults::default()),
            refuse: AtomicBool::new(false),
            links: Mutex::new(Vec::new()),
            accepted: AtomicU64::new(0),
            bytes_to_server: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(FaultProxy {
            addr,
            shared,
            accept,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `stomp://127.0.0.1:PORT` of the proxy.
    pub fn stomp_uri(&self) -> String {
        format!("stomp://{}", self.addr)
    }

    /// Connections accepted so far (refused ones included).
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.prune();
        self.links().len()
    }

    /// Bytes forwarded so far in `direction`.
    pub fn forwarded(&self, direction: Direction) -> u64 {
        match direction {
            Direction::ToServer => self.shared.bytes_to_server.load(Ordering::Relaxed),
            Direction::ToClient => self.shared.bytes_to_client.load(Ordering::Relaxed),
        }
    }

    /// Sends new connections to `upstream` from now on (open ones stay where
    /// they are): a server that changes under the client, e.g. one that refuses
    /// its login.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        if let Ok(mut slot) = self.shared.upstream.lock() {
            *slot = upstream;
        }
    }

    /// Delays every chunk by `latency` (zero turns it off).
    pub fn set_latency(&self, latency: Duration) {
        self.shared.faults.send_modify(|f| f.latency = latency);
    }

    /// Limits each direction of each connection to `bytes_per_second`
    /// (`None`: unlimited).
    pub fn set_bandwidth(&self, bytes_per_second: Option<u64>) {
        self.shared
            .faults
            .send_modify(|f| f.bandwidth = bytes_per_second.map(|b| b.max(1)));
    }

    /// Keeps every connection (and new ones) open but forwards nothing either
    /// way: bytes are read and dropped, as on a half-open link.
    pub fn blackhole(&self) {
        self.shared.faults.send_modify(|f| f.blackhole = true);
    }

    /// Blackholes only the connections open now; new ones pass.
    pub fn blackhole_existing(&self) {
        for (link, _) in self.links().iter() {
            link.blackhole.store(true, Ordering::Release);
        }
        // Wake the copy loops so they see it.
        self.shared.faults.send_modify(|_| {});
    }

    /// Stops reading `direction` on every connection (and new ones): the
    /// sender's socket buffers fill and its writes stall.
    pub fn freeze(&self, direction: Direction) {
        self.shared.faults.send_modify(|f| match direction {
            Direction::ToServer => f.frozen_to_server = true,
            Direction::ToClient => f.frozen_to_client = true,
        });
    }

    /// Clears latency, bandwidth, blackhole, freeze and refusal: traffic flows
    /// normally again (connections blackholed on their own stay so).
    pub fn pass(&self) {
        self.shared.refuse.store(false, Ordering::Release);
        self.shared.faults.send_replace(Faults::default());
    }

    /// Closes every open connection (FIN both ways).
    pub fn cut(&self) {
        self.end_all(End::Close);
    }

    /// Resets every open connection (RST both ways).
    pub fn reset(&self) {
        self.end_all(End::Reset);
    }

    /// Arms every open connection: the next chunk in `direction` is forwarded
    /// in part (half of it, at least one byte), then both sides are reset.
    pub fn reset_mid_frame(&self, direction: Direction) {
        for (link, _) in self.links().iter() {
            match direction {
                Direction::ToServer => link.reset_to_server.store(true, Ordering::Release),
                Direction::ToClient => link.reset_to_client.store(true, Ordering::Release),
            }
        }
    }

    /// While `true`, new connections are accepted and reset at once, as by a
    /// host with nothing listening.
    pub fn refuse(&self, refuse: bool) {
        self.shared.refuse.store(refuse, Ordering::Release);
    }

    fn links(&self) -> std::sync::MutexGuard<'_, Vec<(Arc<Link>, watch::Sender<End>)>> {
        self.shared
            .links
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn prune(&self) {
        self.links().retain(|(_, end)| !end.is_closed());
    }

    fn end_all(&self, how: End) {
        self.prune();
        for (_, end) in self.links().iter() {
            let _ = end.send(how);
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.end_all(End::Close);
    }
}

impl Shared {
    fn upstream(&self) -> SocketAddr {
        *self
            .upstream
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        if shared.refuse.load(Ordering::Acquire) {
            reset_now(&client);
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(shared.upstream()).await else {
                reset_now(&client);
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let link = Arc::new(Link::default());
            let (end_tx, end_rx) = watch::channel(End::Open);
            if let Ok(mut links) = shared.links.lock() {
                links.push((link.clone(), end_tx));
            }
            proxy_connection(client, server, link, end_rx, shared).await;
        });
    }
}

fn reset_now(stream: &TcpStream) {
    // SO_LINGER 0: close() sends RST instead of FIN.
    let _ = stream.set_zero_linger();
}

async fn proxy_connection(
    client: TcpStream,
    server: TcpStream,
    link: Arc<Link>,
    mut end: watch::Receiver<End>,
    shared: Arc<Shared>,
) {
    // The copy loops borrow the sockets, so nothing shuts a socket down behind
    // our back: a reset reaches the peers as RST alone, not FIN then RST.
    let how = {
        let up = pump(Direction::ToServer, &client, &server, &link, &shared);
        let down = pump(Direction::ToClient, &server, &client, &link, &shared);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                reset = &mut up, if !up_done => {
                    up_done = true;
                    if reset { break End::Reset; }
                    if down_done { break End::Close; }
                }
                reset = &mut down, if !down_done => {
                    down_done = true;
                    if reset { break End::Reset; }
                    if up_done { break End::Close; }
                }
                changed = end.changed() => {
                    let how = if changed.is_err() { End::Close } else { *end.borrow() };
                    if how != End::Open { break how; }
                }
            }
        }
    };
    if how == End::Reset {
        let _ = client.set_zero_linger();
        let _ = server.set_zero_linger();
    }
    // Dropping closes both sockets: FIN, or RST after zero linger.
}

/// Half-closes `stream` for writing (forwards an EOF).
fn shut_write(stream: &TcpStream) {
    // SAFETY: the descriptor belongs to a live `TcpStream`; shutdown(2) does
    // not close it.
    unsafe {
        libc::shutdown(stream.as_raw_fd(), libc::SHUT_WR);
    }
}

/// Writes all of `bytes` to a shared socket.
async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads what is there from a shared socket; 0 at EOF.
async fn read_some(from: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        from.readable().await?;
        match from.try_read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Copies one direction under the faults in force until EOF, an error or an
/// armed reset; true for the reset.
async fn pump(
    direction: Direction,
    from: &TcpStream,
    to: &TcpStream,
    link: &Link,
    shared: &Shared,
) -> bool {
    let mut faults = shared.faults.subscribe();
    let mut buf = vec![0u8; 16 * 1024];
    let armed = match direction {
        Direction::ToServer => &link.reset_to_server,
        Direction::ToClient => &link.reset_to_client,
    };
    let counter = match direction {
        Direction::ToServer => &shared.bytes_to_server,
        Direction::ToClient => &shared.bytes_to_client,
    };
    loop {
        // Frozen: do not read, so the sender's buffers fill.
        while faults.borrow_and_update().frozen(direction) {
            if faults.changed().await.is_err() {
                return false;
            }
        }
        let n = tokio::select! {
            read = read_some(from, &mut buf) => match read {
                Ok(0) | Err(_) => {
                    shut_write(to);
                    return false;
                }
                Ok(n) => n,
            },
            // A fault switched while waiting for bytes: look again.
            changed = faults.changed() => {
                if changed.is_err() { return false; }
                continue;
            }
        };
        // Frozen while the bytes came in: hold them until thawed.
        while faults.borrow_and_update().frozen(direction) {
            if faults.changed().await.is_err() {
                return false;
            }
        }
        let now = faults.borrow().clone();
        if now.blackhole || link.blackhole.load(Ordering::Acquire) {
            continue;
        }
        if armed.swap(false, Ordering::AcqRel) {
            let part = (n / 2).max(1);
            let _ = write_all(to, &buf[..part]).await;
            counter.fetch_add(part as u64, Ordering::Relaxed);
            return true;
        }
        if !now.latency.is_zero() {
            tokio::time::sleep(now.latency).await;
        }
        if let Some(rate) = now.bandwidth {
            // Write in slices so a slow rate trickles instead of bursting.
            let slice = ((rate / 20).max(1) as usize).min(n);
            for chunk in buf[..n].chunks(slice) {
                if write_all(to, chunk).await.is_err() {
                    return false;
                }
                counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs_f64(chunk.len() as f64 / rate as f64)).await;
            }
            continue;
        }
        if write_all(to, &buf[..n]).await.is_err() {
            return false;
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An upstream that echoes what it gets.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
        stream.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await?;
        Ok(buf.to_vec())
    }

    #[tokio::test]
    async fn a_reset_reaches_the_peer_as_a_reset_and_a_cut_as_an_end_of_file() {
        let proxy = FaultProxy::start(echo().await).await.unwrap();
        let mut reset = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut reset).await.unwrap(), b"ping");
        proxy.reset();
        let mut buf = [0u8; 16];
        let err = reset.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);

        let mut cut = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut cut).await.unwrap(), b"ping");
        proxy.cut();
        assert_eq!(cut.read(&mut buf).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_blackhole_forwards_nothing_and_pass_restores_new_traffic() {
        let proxy = FaultProxy::start(echo().await).await.unwrap();
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        proxy.blackhole();
        stream.write_all(b"lost").await.unwrap();
        let mut buf = [0u8; 4];
        let read = tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buf)).await;
        assert!(read.is_err(), "nothing comes back through a blackhole");
        proxy.pass();
        assert_eq!(round_trip(&mut stream).await.unwrap(), b"ping");
    }

    #[tokio::test]
    async fn a_refused_connection_is_reset_at_once() {
        let proxy = FaultProxy::start(echo().await).await.unwrap();
        proxy.refuse(true);
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(round_trip(&mut stream).await.is_err());
        proxy.refuse(false);
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut stream).await.unwrap(), b"ping");
    }
}
