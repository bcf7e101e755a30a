//! Getting a connection: which address to try next and after which delay (one
//! plan for start-up and reconnect alike), the TCP/TLS/CONNECT handshake, and
//! the one connect loop that runs them, for start-up and reconnect alike,
//! while the requests that arrive meanwhile are served by a [`Standby`].
//!
//! ```text
//!  attempt 0 1 2 3 …       start-up                     reconnect after losing address i
//!  address               0 1 … n-1 0 1 …                i+1 i+2 … (wrapping)
//!  delay before          0, d(0), d(1), …               d(0), d(1), …   (each with jitter)
//!  limit                 (startupMaxReconnectAttempts+1)·n   maxReconnectAttempts
//! ```
//!
//! A connection that ended on bytes the decoder could not read (a malformed
//! frame) counts as a failed attempt: the reconnect after it goes on along the
//! schedule (d(s-1), d(s), … after s such connections in a row) instead of
//! starting again from d(0), so a peer that sends the same bad frame on every
//! connection is retried at the backoff's pace, not in a loop. A connection
//! that ends any other way starts the schedule afresh.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::codec::Framed;

use super::connection::{Conn, Connection, Progress, Tracked, Transport};
use super::{Config, sweep_every};
use crate::codec::{Command, Frame, Received, StompCodec, Version};
use crate::error::{BrokerError, CodecError, Error, SessionError};
use crate::uri::{BrokerAddr, ReconnectPolicy, Scheme};

/// The client while no connection is up: it serves the requests that arrive
/// and takes a fresh connection into use.
pub(crate) trait Standby {
    /// Serves one request, or at `tick` withdraws the waiting requests past
    /// their deadline; true once the client was closed.
    fn serve_one(&mut self, tick: Instant) -> impl Future<Output = bool> + Send;

    /// Takes a fresh connection into use (negotiation, restored
    /// subscriptions); an error fails that attempt.
    fn open(
        &mut self,
        handshake: Handshake,
    ) -> impl Future<Output = Result<Connection, Error>> + Send;
}

/// Which connection the plan is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// The first connection, inside [`Client::connect`](super::Client::connect).
    Startup,
    /// After a connection was lost.
    Reconnect,
}

/// One attempt: where and after how long.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Plan {
    pub(crate) index: usize,
    pub(crate) addr: BrokerAddr,
    pub(crate) delay: Duration,
}

/// The failover list and where in it the client is.
#[derive(Debug)]
pub(crate) struct Connector {
    addrs: Vec<BrokerAddr>,
    policy: ReconnectPolicy,
    /// The address of the current (or last) connection.
    current: usize,
    /// Connections in a row that ended on a decode error.
    unreadable: u32,
}

impl Connector {
    /// The list of `addrs`, shuffled once when the policy says `randomize`.
    pub(crate) fn new(addrs: &[BrokerAddr], policy: &ReconnectPolicy) -> Connector {
        let mut addrs = addrs.to_vec();
        if policy.randomize {
            shuffle(&mut addrs, seed());
        }
        Connector {
            addrs,
            policy: policy.clone(),
            current: 0,
            unreadable: 0,
        }
    }

    /// The plan for attempt `attempt` (0-based) of `phase`, or `None` once the
    /// policy's attempts are spent.
    pub(crate) fn plan(&self, attempt: u32, phase: Phase) -> Option<Plan> {
        let n = self.addrs.len();
        if n == 0 {
            return None;
        }
        let limit = match phase {
            Phase::Startup => self
                .policy
                .startup_attempts
                .map(|a| (u64::from(a) + 1) * n as u64),
            Phase::Reconnect => self.policy.max_attempts.map(u64::from),
        };
        if limit.is_some_and(|limit| u64::from(attempt) >= limit) {
            return None;
        }
        let index = match phase {
            Phase::Startup => attempt as usize % n,
            // Move on from the address that failed us.
            Phase::Reconnect => (self.current + 1 + attempt as usize) % n,
        };
        let delay = match (phase, attempt) {
            (Phase::Startup, 0) => Duration::ZERO,
            (Phase::Startup, a) => jitter(self.policy.delay(a - 1), a),
            (Phase::Reconnect, a) => {
                // The first such connection reconnects as any lost one does.
                let step = a.saturating_add(self.unreadable.saturating_sub(1));
                jitter(self.policy.delay(step), step)
            }
        };
        Some(Plan {
            index,
            addr: self.addrs[index].clone(),
            delay,
        })
    }

    /// The attempt of `plan` succeeded.
    pub(crate) fn connected(&mut self, plan: &Plan) {
        self.current = plan.index;
    }

    /// The current connection ended: `unreadable` when on bytes the decoder
    /// could not read, which counts as one more failed attempt for the delays
    /// of the reconnect (not for its limit); any other end resets the count.
    pub(crate) fn ended(&mut self, unreadable: bool) {
        self.unreadable = if unreadable {
            self.unreadable.saturating_add(1)
        } else {
            0
        };
    }

    /// The one connect loop for start-up and reconnect: tries the plan's
    /// addresses with backoff and jitter, the `standby` serving requests
    /// meanwhile, until one connects, the attempts run out, or a login is
    /// refused. `Ok(None)`: the client was closed meanwhile.
    pub(crate) async fn connect(
        &mut self,
        phase: Phase,
        config: &Config,
        standby: &mut impl Standby,
    ) -> Result<Option<Connection>, Error> {
        let mut attempt: u32 = 0;
        let mut last: Option<Error> = None;
        loop {
            let Some(plan) = self.plan(attempt, phase) else {
                let last = last.unwrap_or(Error::ConnectionLost);
                return Err(match phase {
                    Phase::Startup => last,
                    Phase::Reconnect => Error::ReconnectExhausted {
                        attempts: attempt,
                        last: Box::new(last),
                    },
                });
            };
            attempt += 1;
            if wait(standby, config, Instant::now() + plan.delay).await {
                return Ok(None);
            }
            let error = match try_connect(&plan, config, standby).await {
                Ok(Some(connection)) => {
                    self.connected(&plan);
                    if phase == Phase::Reconnect {
                        tracing::info!(addr = %plan.addr, attempt, "STOMP reconnected");
                    }
                    return Ok(Some(connection));
                }
                Ok(None) => return Ok(None),
                Err(Error::ConnectRejected(e)) if e.is_login_refused() => {
                    return Err(Error::ConnectRejected(e));
                }
                Err(e) => e,
            };
            tracing::debug!(error = %error, attempt, addr = %plan.addr, "STOMP connect attempt failed");
            last = Some(error);
        }
    }
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x9E37_79B9_7F4A_7C15)
        | 1
}

/// Fisher–Yates with xorshift: enough to spread clients over brokers.
fn shuffle<T>(items: &mut [T], mut state: u64) {
    for i in (1..items.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        items.swap(i, (state % (i as u64 + 1)) as usize);
    }
}

/// Spreads reconnect attempts of many clients: up to 20% less than `delay`.
fn jitter(delay: Duration, salt: u32) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ salt.wrapping_mul(2_654_435_761);
    let cut = delay.as_secs_f64() * 0.2 * (nanos % 1000) as f64 / 1000.0;
    delay.saturating_sub(Duration::from_secs_f64(cut))
}

/// Waits until `wake`, the `standby` serving requests; true when the client
/// was closed meanwhile.
async fn wait(standby: &mut impl Standby, config: &Config, wake: Instant) -> bool {
    loop {
        let now = Instant::now();
        if now >= wake {
            return false;
        }
        if standby.serve_one(wake.min(now + sweep_every(config))).await {
            return true;
        }
    }
}

/// One attempt: the handshake with `plan`'s address, the `standby` serving
/// requests meanwhile, and the connection taken into use. `Ok(None)`: the
/// client was closed meanwhile.
async fn try_connect(
    plan: &Plan,
    config: &Config,
    standby: &mut impl Standby,
) -> Result<Option<Connection>, Error> {
    let mut handshake = std::pin::pin!(establish(plan.addr.clone(), config));
    let handshake = loop {
        let tick = Instant::now() + sweep_every(config);
        tokio::select! {
            result = &mut handshake => break result?,
            closed = standby.serve_one(tick) => if closed { return Ok(None) },
        }
    };
    standby.open(handshake).await.map(Some)
}

/// What the CONNECT handshake gives: the framed socket, the CONNECTED
/// frame and the socket's write progress.
pub(crate) struct Handshake {
    pub(crate) framed: Conn,
    pub(crate) connected: Frame,
    pub(crate) progress: Arc<Progress>,
    /// The address connected to.
    pub(crate) addr: String,
}

/// Opens a connection to `addr` and performs the CONNECT handshake, all
/// within the connect timeout.
pub(crate) async fn establish(addr: BrokerAddr, config: &Config) -> Result<Handshake, Error> {
    let deadline = Instant::now() + config.connect_timeout;
    let shown = addr.to_string();
    let timeout = || Error::ConnectTimeout {
        addr: shown.clone(),
        after: config.connect_timeout,
    };
    let (io, progress) = open_socket(&addr, config, deadline).await?;
    let mut framed =
        Framed::with_capacity(io, StompCodec::new(Version::V1_2, config.limits), 64 * 1024);
    tokio::time::timeout_at(deadline, framed.send(connect_frame(&addr, config)))
        .await
        .map_err(|_| timeout())?
        .map_err(|e| link_error(&shown, e))?;
    loop {
        let item = tokio::time::timeout_at(deadline, framed.next())
            .await
            .map_err(|_| timeout())?;
        let frame = match item {
            None => return Err(closed_by_peer(&shown, "during CONNECT")),
            Some(Err(e)) => return Err(link_error(&shown, e)),
            Some(Ok(Received::HeartBeat)) => continue,
            Some(Ok(Received::Frame(f))) => f,
        };
        return match frame.command() {
            Command::Connected => Ok(Handshake {
                framed,
                connected: frame,
                progress,
                addr: shown,
            }),
            Command::Error => Err(Error::ConnectRejected(BrokerError::from_frame(&frame))),
            other => Err(SessionError::ExpectedConnected(other).into()),
        };
    }
}

/// The TCP connection to `addr`, under TLS for `stomp+ssl`, and the record
/// of its write progress.
async fn open_socket(
    addr: &BrokerAddr,
    config: &Config,
    deadline: Instant,
) -> Result<(Box<dyn Transport>, Arc<Progress>), Error> {
    let timeout = || Error::ConnectTimeout {
        addr: addr.to_string(),
        after: config.connect_timeout,
    };
    let tcp = tokio::time::timeout_at(
        deadline,
        TcpStream::connect((addr.host.as_str(), addr.port)),
    )
    .await
    .map_err(|_| timeout())?
    .map_err(|source| Error::Connect {
        addr: addr.to_string(),
        source,
    })?;
    let _ = tcp.set_nodelay(true);
    // Progress is counted on the socket itself, under TLS: bytes taken into
    // TLS buffers are not bytes the broker read.
    let progress = Arc::new(Progress::new());
    let tracked = Tracked::new(Box::new(tcp), progress.clone());
    let io: Box<dyn Transport> = match addr.scheme {
        Scheme::Tcp => Box::new(tracked),
        Scheme::Tls => tokio::time::timeout_at(deadline, crate::tls::wrap(tracked, addr, config))
            .await
            .map_err(|_| timeout())??,
    };
    Ok((io, progress))
}

/// The CONNECT frame for `addr`: versions, host, heart-beats and credentials.
fn connect_frame(addr: &BrokerAddr, config: &Config) -> Frame {
    let host = config
        .virtual_host
        .clone()
        .unwrap_or_else(|| addr.host.clone());
    let mut connect = Frame::connect(&config.versions, host, config.heart_beat_ms());
    if let Some(login) = &config.login {
        connect = connect.with_header("login", login.clone());
    }
    if let Some(passcode) = &config.passcode {
        connect = connect.with_header("passcode", passcode.clone());
    }
    if let Some(id) = &config.client_id {
        connect = connect.with_header("client-id", id.clone());
    }
    connect
}

/// Names the broker address in socket failures while connecting; other codec
/// errors pass through.
pub(crate) fn link_error(addr: &str, error: CodecError) -> Error {
    match error {
        CodecError::Io(source) => Error::Connect {
            addr: addr.to_owned(),
            source,
        },
        other => Error::Codec(other),
    }
}

/// The broker closed the socket (`when` says at which step, if it matters).
pub(crate) fn closed_by_peer(addr: &str, when: &str) -> Error {
    let text = format!("broker closed the connection {when}");
    Error::Connect {
        addr: addr.to_owned(),
        source: io::Error::new(io::ErrorKind::UnexpectedEof, text.trim_end()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uri::BrokerUri;

    fn connector(uri: &str) -> Connector {
        let uri = BrokerUri::parse(uri).unwrap();
        Connector::new(&uri.addrs, &uri.reconnect)
    }

    #[test]
    fn start_up_walks_the_list_from_the_top_for_the_allowed_passes() {
        let c = connector("failover:(stomp://a:1,stomp://b:1)?startupMaxReconnectAttempts=1");
        let hosts: Vec<_> = (0..)
            .map_while(|a| c.plan(a, Phase::Startup))
            .map(|p| p.addr.host)
            .collect();
        assert_eq!(hosts, ["a", "b", "a", "b"]);
        assert_eq!(c.plan(0, Phase::Startup).unwrap().delay, Duration::ZERO);
    }

    #[test]
    fn a_reconnect_moves_on_to_the_next_address_after_the_lost_one() {
        let mut c = connector("failover:(stomp://a:1,stomp://b:1,stomp://c:1)");
        let b = c.plan(1, Phase::Startup).unwrap();
        c.connected(&b);
        let hosts: Vec<_> = (0..4)
            .map(|a| c.plan(a, Phase::Reconnect).unwrap().addr.host)
            .collect();
        assert_eq!(hosts, ["c", "a", "b", "c"]);
    }

    #[test]
    fn reconnect_attempts_stop_at_the_limit_and_delays_grow_within_the_jitter() {
        let c = connector(
            "failover:(stomp://a:1)?maxReconnectAttempts=3&initialReconnectDelay=100&maxReconnectDelay=250",
        );
        let delays: Vec<_> = (0..)
            .map_while(|a| c.plan(a, Phase::Reconnect))
            .map(|p| p.delay)
            .collect();
        assert_eq!(delays.len(), 3);
        for (delay, full) in delays.iter().zip([100u64, 200, 250]) {
            let full = Duration::from_millis(full);
            assert!(
                *delay <= full && *delay >= full.mul_f64(0.8),
                "{delay:?} vs {full:?}"
            );
        }
    }

    #[test]
    fn connections_ending_on_unreadable_bytes_go_on_along_the_backoff_and_others_start_it_afresh() {
        let mut c = connector(
            "failover:(stomp://a:1)?maxReconnectAttempts=3&initialReconnectDelay=100&maxReconnectDelay=1000",
        );
        let first = |c: &Connector| c.plan(0, Phase::Reconnect).unwrap().delay;
        let within = |delay: Duration, full: u64| {
            let full = Duration::from_millis(full);
            delay <= full && delay >= full.mul_f64(0.8)
        };
        assert!(within(first(&c), 100));
        c.ended(true);
        assert!(within(first(&c), 100));
        c.ended(true);
        assert!(within(first(&c), 200));
        c.ended(true);
        c.ended(true);
        assert!(within(first(&c), 800));
        assert!(within(c.plan(1, Phase::Reconnect).unwrap().delay, 1000));
        // The attempt limit is the policy's, however many came before.
        assert!(c.plan(3, Phase::Reconnect).is_none());
        assert!(c.plan(2, Phase::Reconnect).is_some());
        c.ended(false);
        assert!(within(first(&c), 100));
    }

    #[test]
    fn randomize_shuffles_the_list_but_keeps_every_address() {
        let mut addrs: Vec<u32> = (0..16).collect();
        shuffle(&mut addrs, 12345);
        assert_ne!(addrs, (0..16).collect::<Vec<_>>());
        addrs.sort_unstable();
        assert_eq!(addrs, (0..16).collect::<Vec<_>>());
        let c = connector("failover:(stomp://a:1,stomp://b:1,stomp://c:1)?randomize=true");
        let mut hosts: Vec<_> = (0..3)
            .map(|a| c.plan(a, Phase::Startup).unwrap().addr.host)
            .collect();
        hosts.sort();
        assert_eq!(hosts, ["a", "b", "c"]);
    }
}
