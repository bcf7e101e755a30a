//! The async client: a cheap handle ([`Client`]) that talks over a channel to
//! one event loop task, which owns the socket, the timers and the protocol session.
//!
//! The loop `select!`s over the network, the command channel and the heart-beat
//! deadline. When the connection drops, every request still waiting for a
//! receipt fails with [`Error::ConnectionLost`] (outcome unknown, never
//! success), the loop reconnects over the failover list with backoff, restores
//! the subscriptions, and carries on with the requests that arrived meanwhile.
//! Transactions and deliveries belong to one connection (an *epoch*): using
//! them after a reconnect gives [`Error::Stale`] instead of confusing the
//! broker.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::codec::Framed;

use crate::codec::{Command, Frame, Headers, Limits, Received, StompCodec, Version};
use crate::error::{BrokerError, CodecError, Error};
use crate::session::{AckId, Inbound, Session, Timer};
use crate::uri::{BrokerAddr, BrokerUri, Scheme};

/// How a subscription acknowledges messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// The broker considers a message consumed once dispatched (at-most-once).
    Auto,
    /// ACK of one message acknowledges it and every earlier one.
    Client,
    /// ACK acknowledges exactly one message (what an inbox wants).
    ClientIndividual,
}

impl AckMode {
    /// The `ack` header value.
    pub fn as_str(self) -> &'static str {
        match self {
            AckMode::Auto => "auto",
            AckMode::Client => "client",
            AckMode::ClientIndividual => "client-individual",
        }
    }
}

/// Client settings. Build with [`Config::new`] and the `with_*` methods.
#[derive(Clone)]
pub struct Config {
    /// Where the broker is, and how to reconnect.
    pub uri: BrokerUri,
    /// `login` header.
    pub login: Option<String>,
    passcode: Option<String>,
    /// `host` header (virtual host). Default: the host of the address in use.
    pub virtual_host: Option<String>,
    /// `client-id` header (needed for durable topic subscriptions).
    pub client_id: Option<String>,
    /// Versions offered, the best one is chosen by the broker.
    pub versions: Vec<Version>,
    /// Heart-beat we ask for: (we send every, we want to hear every).
    /// ActiveMQ enforces the first strictly. Zero turns a direction off.
    pub heart_beat: (Duration, Duration),
    /// Allowed lateness of the broker's heart-beats, as a factor (default 2.0).
    pub heart_beat_grace: f64,
    /// How long to wait for TCP connect plus CONNECTED (default 10 s).
    pub connect_timeout: Duration,
    /// How long a request waits for its receipt (default 30 s).
    pub receipt_timeout: Duration,
    /// Codec limits.
    pub limits: Limits,
    /// PEM file with CA certificates to trust for `stomp+ssl` (else the
    /// system's roots).
    pub tls_ca_file: Option<PathBuf>,
    /// TLS server name to verify (default: the address's host).
    pub tls_server_name: Option<String>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("uri", &self.uri.to_string())
            .field("login", &self.login)
            .field("passcode", &self.passcode.as_ref().map(|_| "<redacted>"))
            .field("virtual_host", &self.virtual_host)
            .field("client_id", &self.client_id)
            .field("versions", &self.versions)
            .field("heart_beat", &self.heart_beat)
            .field("heart_beat_grace", &self.heart_beat_grace)
            .field("connect_timeout", &self.connect_timeout)
            .field("receipt_timeout", &self.receipt_timeout)
            .field("limits", &self.limits)
            .field("tls_ca_file", &self.tls_ca_file)
            .finish()
    }
}

impl Config {
    /// Settings for `uri` with defaults for the rest.
    pub fn new(uri: BrokerUri) -> Config {
        Config {
            uri,
            login: None,
            passcode: None,
            virtual_host: None,
            client_id: None,
            versions: vec![Version::V1_2, Version::V1_1, Version::V1_0],
            heart_beat: (Duration::from_secs(10), Duration::from_secs(10)),
            heart_beat_grace: 2.0,
            connect_timeout: Duration::from_secs(10),
            receipt_timeout: Duration::from_secs(30),
            limits: Limits::default(),
            tls_ca_file: None,
            tls_server_name: None,
        }
    }

    /// Parses `uri` (see [`BrokerUri`]) and applies defaults.
    pub fn parse(uri: &str) -> Result<Config, Error> {
        Ok(Config::new(BrokerUri::parse(uri)?))
    }

    /// Sets login and passcode. The passcode never appears in `Debug` output.
    pub fn with_credentials(
        mut self,
        login: impl Into<String>,
        passcode: impl Into<String>,
    ) -> Config {
        self.login = Some(login.into());
        self.passcode = Some(passcode.into());
        self
    }

    /// Sets the client id.
    pub fn with_client_id(mut self, id: impl Into<String>) -> Config {
        self.client_id = Some(id.into());
        self
    }

    /// Restricts the versions offered.
    pub fn with_versions(mut self, versions: &[Version]) -> Config {
        self.versions = versions.to_vec();
        self
    }

    /// Sets the heart-beat request.
    pub fn with_heart_beat(mut self, send_every: Duration, expect_every: Duration) -> Config {
        self.heart_beat = (send_every, expect_every);
        self
    }

    /// Sets the receipt timeout.
    pub fn with_receipt_timeout(mut self, timeout: Duration) -> Config {
        self.receipt_timeout = timeout;
        self
    }

    /// Trusts the CA certificates in this PEM file for TLS.
    pub fn with_tls_ca_file(mut self, path: impl Into<PathBuf>) -> Config {
        self.tls_ca_file = Some(path.into());
        self
    }

    fn heart_beat_ms(&self) -> (u64, u64) {
        (
            self.heart_beat.0.as_millis() as u64,
            self.heart_beat.1.as_millis() as u64,
        )
    }
}

/// What the broker said about itself in CONNECTED.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// Negotiated version.
    pub version: Version,
    /// `server` header, e.g. `ActiveMQ/5.17.2`.
    pub server: Option<String>,
    /// `session` header.
    pub session: Option<String>,
    /// `heart-beat` header.
    pub heart_beat: Option<String>,
    /// The address connected to.
    pub addr: String,
}

type Reply = oneshot::Sender<Result<(), Error>>;

enum Request {
    Frame {
        frame: Frame,
        receipt: Option<String>,
        epoch: Option<u64>,
        what: &'static str,
        reply: Option<Reply>,
    },
    Subscribe {
        id: String,
        frame: Frame,
        sink: mpsc::Sender<Message>,
        receipt: String,
        reply: Reply,
    },
    Unsubscribe {
        id: String,
    },
    Disconnect {
        reply: Reply,
    },
}

struct Shared {
    config: Config,
    epoch: AtomicU64,
    counter: AtomicU64,
    closed: AtomicBool,
    info: Mutex<Option<ServerInfo>>,
    reason: Mutex<Option<String>>,
}

/// A STOMP connection handle. Cloning is cheap; all clones share one
/// connection. The connection closes when [`Client::disconnect`] is called or
/// the last handle (including subscriptions and messages) is dropped.
#[derive(Clone)]
pub struct Client {
    tx: mpsc::Sender<Request>,
    shared: Arc<Shared>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("uri", &self.shared.config.uri.to_string())
            .field("epoch", &self.shared.epoch.load(Ordering::Relaxed))
            .finish()
    }
}

impl Client {
    /// Connects to the first reachable address of `config.uri` and starts the
    /// event loop.
    pub async fn connect(config: Config) -> Result<Client, Error> {
        if config.uri.addrs.is_empty() {
            return Err(Error::Uri(crate::error::UriError::Empty));
        }
        let mut session = Session::new(Instant::now());
        let passes = config
            .uri
            .reconnect
            .startup_attempts
            .map_or(u32::MAX, |n| n.saturating_add(1));
        let mut last = None;
        let mut attempt = 0u32;
        'outer: for pass in 0..passes {
            for addr in &config.uri.addrs {
                if pass > 0 || attempt > 0 {
                    tokio::time::sleep(config.uri.reconnect.delay(attempt.saturating_sub(1))).await;
                }
                attempt += 1;
                match establish(addr, &config, &mut session).await {
                    Ok((conn, info)) => {
                        last = Some(Ok((conn, info)));
                        break 'outer;
                    }
                    Err(e @ Error::ConnectRejected(_)) => return Err(e),
                    Err(e) => last = Some(Err(e)),
                }
            }
        }
        let (conn, info) = match last {
            Some(Ok(ok)) => ok,
            Some(Err(e)) => return Err(e),
            None => return Err(Error::Closed),
        };
        let (tx, rx) = mpsc::channel(1024);
        let shared = Arc::new(Shared {
            config,
            epoch: AtomicU64::new(0),
            counter: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            info: Mutex::new(Some(info)),
            reason: Mutex::new(None),
        });
        let event_loop = EventLoop {
            rx,
            handle: tx.downgrade(),
            shared: shared.clone(),
            session,
            sinks: HashMap::new(),
            backlog: VecDeque::new(),
        };
        tokio::spawn(event_loop.run(conn));
        Ok(Client { tx, shared })
    }

    /// What the broker said in its latest CONNECTED frame.
    pub fn server_info(&self) -> Option<ServerInfo> {
        self.shared.info.lock().ok().and_then(|i| i.clone())
    }

    /// The negotiated version of the current connection.
    pub fn version(&self) -> Version {
        self.server_info().map_or(Version::V1_2, |i| i.version)
    }

    /// How many connections were lost so far (0 on the first connection).
    pub fn epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::Acquire)
    }

    /// True once the client stopped for good.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire) || self.tx.is_closed()
    }

    /// Why the client stopped, if it stopped on an error.
    pub fn close_reason(&self) -> Option<String> {
        self.shared.reason.lock().ok().and_then(|r| r.clone())
    }

    fn next_id(&self, prefix: &str) -> String {
        format!(
            "{prefix}-{}",
            self.shared.counter.fetch_add(1, Ordering::Relaxed) + 1
        )
    }

    async fn submit(&self, request: Request) -> Result<(), Error> {
        self.tx.send(request).await.map_err(|_| Error::Closed)
    }

    /// Sends a frame and waits for the broker's receipt.
    async fn request(
        &self,
        frame: Frame,
        epoch: Option<u64>,
        what: &'static str,
    ) -> Result<(), Error> {
        let receipt = self.next_id("r");
        let (reply, answer) = oneshot::channel();
        self.submit(Request::Frame {
            frame,
            receipt: Some(receipt.clone()),
            epoch,
            what,
            reply: Some(reply),
        })
        .await?;
        self.await_receipt(answer, receipt).await
    }

    async fn await_receipt(
        &self,
        answer: oneshot::Receiver<Result<(), Error>>,
        receipt: String,
    ) -> Result<(), Error> {
        let after = self.shared.config.receipt_timeout;
        match tokio::time::timeout(after, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::ConnectionLost),
            Err(_) => Err(Error::ReceiptTimeout { receipt, after }),
        }
    }

    /// Sends a frame once it is written to the socket, without a receipt.
    async fn fire(
        &self,
        frame: Frame,
        epoch: Option<u64>,
        what: &'static str,
    ) -> Result<(), Error> {
        let (reply, answer) = oneshot::channel();
        self.submit(Request::Frame {
            frame,
            receipt: None,
            epoch,
            what,
            reply: Some(reply),
        })
        .await?;
        answer.await.map_err(|_| Error::ConnectionLost)?
    }

    /// Sends a message and waits for the broker's receipt. Only a returned
    /// `Ok` means the broker has the message (and stored it, if persistent).
    pub async fn send(&self, message: impl Into<Frame>) -> Result<(), Error> {
        let frame = into_send(message.into());
        self.request(frame, None, "send").await
    }

    /// Sends a message without asking for a receipt. On ActiveMQ a failed send
    /// without a receipt is dropped silently: use only where loss is fine.
    pub async fn send_unconfirmed(&self, message: impl Into<Frame>) -> Result<(), Error> {
        let frame = into_send(message.into());
        self.fire(frame, None, "send").await
    }

    /// Starts a transaction (BEGIN).
    pub async fn begin(&self) -> Result<Transaction, Error> {
        let id = self.next_id("tx");
        let epoch = self.epoch();
        self.queue(Frame::begin(id.clone()), Some(epoch), "transaction")
            .await?;
        Ok(Transaction {
            client: self.clone(),
            id,
            epoch,
            finished: false,
        })
    }

    /// Queues a frame for writing without waiting for the write.
    async fn queue(
        &self,
        frame: Frame,
        epoch: Option<u64>,
        what: &'static str,
    ) -> Result<(), Error> {
        self.submit(Request::Frame {
            frame,
            receipt: None,
            epoch,
            what,
            reply: None,
        })
        .await
    }

    /// Subscribes and waits until the broker confirmed the subscription.
    pub async fn subscribe(&self, options: Subscribe) -> Result<Subscription, Error> {
        let id = options.id.clone().unwrap_or_else(|| self.next_id("sub"));
        let mut frame = Frame::subscribe(
            options.destination.clone(),
            id.clone(),
            options.ack.as_str(),
        );
        if let Some(selector) = &options.selector {
            frame = frame.with_header("selector", selector.clone());
        }
        // With client acks the broker stops at the prefetch, so a buffer of the
        // same size never fills and the socket is always read.
        let prefetch = options.prefetch.or_else(|| {
            (options.ack != AckMode::Auto)
                .then(|| u32::try_from(options.buffer).unwrap_or(u32::MAX))
        });
        if let Some(prefetch) = prefetch {
            frame = frame.with_header("activemq.prefetchSize", prefetch);
        }
        if let Some(name) = &options.durable_name {
            frame = frame
                .with_header("activemq.subscriptionName", name.clone())
                .with_header("durable-subscription-name", name.clone());
        }
        for (k, v) in &options.headers {
            frame = frame.with_header(k.clone(), v.clone());
        }
        let capacity = options.buffer.max(1);
        let (sink, rx) = mpsc::channel(capacity);
        let receipt = self.next_id("r");
        let (reply, answer) = oneshot::channel();
        self.submit(Request::Subscribe {
            id: id.clone(),
            frame,
            sink,
            receipt: receipt.clone(),
            reply,
        })
        .await?;
        self.await_receipt(answer, receipt).await?;
        Ok(Subscription {
            id,
            destination: options.destination,
            rx,
            client: self.clone(),
            active: true,
        })
    }

    /// Sends DISCONNECT with a receipt and closes the connection. Requests
    /// still waiting for receipts fail with [`Error::ConnectionLost`].
    pub async fn disconnect(&self) -> Result<(), Error> {
        let (reply, answer) = oneshot::channel();
        if self.tx.send(Request::Disconnect { reply }).await.is_err() {
            return Ok(());
        }
        answer.await.unwrap_or(Ok(()))
    }
}

fn into_send(frame: Frame) -> Frame {
    if frame.command() == Command::Send {
        frame
    } else {
        let (_, headers, body) = frame.into_parts();
        Frame::from_parts(Command::Send, headers, body)
    }
}

/// Options of a subscription.
#[derive(Debug, Clone)]
pub struct Subscribe {
    destination: String,
    id: Option<String>,
    ack: AckMode,
    selector: Option<String>,
    prefetch: Option<u32>,
    durable_name: Option<String>,
    headers: Vec<(String, String)>,
    buffer: usize,
}

impl Subscribe {
    /// Subscribes to `destination` (`/queue/…` or `/topic/…`) with
    /// `client-individual` acks.
    pub fn new(destination: impl Into<String>) -> Subscribe {
        Subscribe {
            destination: destination.into(),
            id: None,
            ack: AckMode::ClientIndividual,
            selector: None,
            prefetch: None,
            durable_name: None,
            headers: Vec::new(),
            buffer: 256,
        }
    }

    /// The ack mode. `Auto` is at-most-once on ActiveMQ.
    pub fn ack(mut self, mode: AckMode) -> Subscribe {
        self.ack = mode;
        self
    }

    /// A fixed subscription id (default: generated).
    pub fn id(mut self, id: impl Into<String>) -> Subscribe {
        self.id = Some(id.into());
        self
    }

    /// A JMS selector, e.g. `type = 'user.created'`.
    pub fn selector(mut self, selector: impl Into<String>) -> Subscribe {
        self.selector = Some(selector.into());
        self
    }

    /// `activemq.prefetchSize`: how many unacknowledged messages the broker
    /// dispatches ahead. Also sizes the local buffer unless set otherwise.
    pub fn prefetch(mut self, n: u32) -> Subscribe {
        self.prefetch = Some(n);
        self.buffer = n.max(1) as usize;
        self
    }

    /// A durable topic subscription under `name` (needs a client id).
    pub fn durable(mut self, name: impl Into<String>) -> Subscribe {
        self.durable_name = Some(name.into());
        self
    }

    /// Any other SUBSCRIBE header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Subscribe {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Messages buffered locally (default 256; with client acks also the
    /// default prefetch). When an `auto` subscription's buffer is full the
    /// client stops reading the socket, which also delays receipts on this
    /// connection: read `auto` subscriptions promptly, or give them their own
    /// client.
    pub fn buffer(mut self, n: usize) -> Subscribe {
        self.buffer = n.max(1);
        self
    }
}

/// A stream of [`Message`]s of one subscription. Ends when the client closes.
/// Dropping it unsubscribes.
pub struct Subscription {
    id: String,
    destination: String,
    rx: mpsc::Receiver<Message>,
    client: Client,
    active: bool,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .field("destination", &self.destination)
            .finish()
    }
}

impl Subscription {
    /// The subscription id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The destination.
    pub fn destination(&self) -> &str {
        &self.destination
    }

    /// The next message, or `None` once the client closed.
    pub async fn next_message(&mut self) -> Option<Message> {
        self.rx.recv().await
    }

    /// A message that has already arrived, without waiting; `None` when none
    /// is waiting (or the client closed).
    pub fn try_next_message(&mut self) -> Option<Message> {
        self.rx.try_recv().ok()
    }

    /// Ends the subscription.
    pub async fn unsubscribe(mut self) -> Result<(), Error> {
        self.active = false;
        self.client
            .submit(Request::Unsubscribe {
                id: self.id.clone(),
            })
            .await
    }
}

impl Stream for Subscription {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.active {
            let _ = self.client.tx.try_send(Request::Unsubscribe {
                id: self.id.clone(),
            });
        }
    }
}

/// A delivered message.
pub struct Message {
    frame: Frame,
    ack: AckId,
    epoch: u64,
    client: Client,
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("frame", &self.frame)
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl Message {
    /// The MESSAGE frame.
    pub fn frame(&self) -> &Frame {
        &self.frame
    }

    /// The headers.
    pub fn headers(&self) -> &Headers {
        self.frame.headers()
    }

    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.frame.header(name)
    }

    /// The body.
    pub fn body(&self) -> &Bytes {
        self.frame.body()
    }

    /// `destination` header.
    pub fn destination(&self) -> Option<&str> {
        self.frame.header("destination")
    }

    /// `message-id` header.
    pub fn message_id(&self) -> Option<&str> {
        self.frame.header("message-id")
    }

    /// True if ActiveMQ marked it as a redelivery.
    pub fn redelivered(&self) -> bool {
        self.frame.header("redelivered") == Some("true")
    }

    /// The connection epoch it arrived on.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Acknowledges the message (ACK, written without a receipt). After a
    /// reconnect this fails with [`Error::Stale`]: the broker redelivers it.
    pub async fn ack(&self) -> Result<(), Error> {
        let frame = self.ack.frame(Command::Ack, None);
        self.client.fire(frame, Some(self.epoch), "delivery").await
    }

    /// Acknowledges and waits for the broker's receipt.
    pub async fn ack_confirmed(&self) -> Result<(), Error> {
        let frame = self.ack.frame(Command::Ack, None);
        self.client
            .request(frame, Some(self.epoch), "delivery")
            .await
    }

    /// Rejects the message. **On ActiveMQ a NACK sends the message to its
    /// dead-letter queue at once** (no redelivery): do not use it for retries.
    pub async fn nack(&self) -> Result<(), Error> {
        let frame = self.ack.frame(Command::Nack, None);
        self.client
            .request(frame, Some(self.epoch), "delivery")
            .await
    }

    /// Takes the frame out.
    pub fn into_frame(self) -> Frame {
        self.frame
    }
}

/// A STOMP transaction. Dropping it without commit aborts it.
pub struct Transaction {
    client: Client,
    id: String,
    epoch: u64,
    finished: bool,
}

impl fmt::Debug for Transaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction")
            .field("id", &self.id)
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl Transaction {
    /// The transaction id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Queues a SEND in this transaction. Nothing is delivered before
    /// [`Transaction::commit`] returns `Ok`.
    pub async fn send(&self, message: impl Into<Frame>) -> Result<(), Error> {
        let mut frame = into_send(message.into());
        frame.headers_mut().set("transaction", self.id.clone());
        self.client
            .queue(frame, Some(self.epoch), "transaction")
            .await
    }

    /// Queues an ACK of `message` in this transaction.
    pub async fn ack(&self, message: &Message) -> Result<(), Error> {
        if message.epoch != self.epoch {
            return Err(Error::Stale("delivery"));
        }
        let frame = message.ack.frame(Command::Ack, Some(&self.id));
        self.client
            .queue(frame, Some(self.epoch), "transaction")
            .await
    }

    /// COMMIT with a receipt: `Ok` means the broker applied the whole transaction.
    pub async fn commit(self) -> Result<(), Error> {
        self.finish(Frame::commit).await
    }

    /// ABORT with a receipt.
    pub async fn abort(self) -> Result<(), Error> {
        self.finish(Frame::abort).await
    }

    /// Ends the transaction with COMMIT or ABORT, waiting for the receipt.
    async fn finish(mut self, end: fn(String) -> Frame) -> Result<(), Error> {
        self.finished = true;
        let frame = end(self.id.clone());
        self.client
            .request(frame, Some(self.epoch), "transaction")
            .await
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.client.tx.try_send(Request::Frame {
                frame: Frame::abort(self.id.clone()),
                receipt: None,
                epoch: Some(self.epoch),
                what: "transaction",
                reply: None,
            });
        }
    }
}

/// A byte stream the client can run STOMP over.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Transport for T {}

type Conn = Framed<Box<dyn Transport>, StompCodec>;

/// Opens a connection to `addr` and performs the CONNECT handshake.
async fn establish(
    addr: &BrokerAddr,
    config: &Config,
    session: &mut Session<Reply>,
) -> Result<(Conn, ServerInfo), Error> {
    let deadline = Instant::now() + config.connect_timeout;
    let shown = addr.to_string();
    let timeout = || Error::ConnectTimeout {
        addr: shown.clone(),
        after: config.connect_timeout,
    };
    let tcp = tokio::time::timeout_at(
        deadline,
        TcpStream::connect((addr.host.as_str(), addr.port)),
    )
    .await
    .map_err(|_| timeout())?
    .map_err(|source| Error::Connect {
        addr: shown.clone(),
        source,
    })?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Transport> = match addr.scheme {
        Scheme::Tcp => Box::new(tcp),
        Scheme::Tls => tokio::time::timeout_at(deadline, crate::tls::wrap(tcp, addr, config))
            .await
            .map_err(|_| timeout())??,
    };
    let mut conn =
        Framed::with_capacity(io, StompCodec::new(Version::V1_2, config.limits), 64 * 1024);
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
    tokio::time::timeout_at(deadline, conn.send(connect))
        .await
        .map_err(|_| timeout())?
        .map_err(|e| link_error(&shown, e))?;
    loop {
        let item = tokio::time::timeout_at(deadline, conn.next())
            .await
            .map_err(|_| timeout())?;
        let frame = match item {
            None => return Err(closed_by_peer(&shown, "during CONNECT")),
            Some(Err(e)) => return Err(link_error(&shown, e)),
            Some(Ok(Received::HeartBeat)) => continue,
            Some(Ok(Received::Frame(f))) => f,
        };
        match frame.command() {
            Command::Connected => {
                let version = session
                    .connected(
                        &frame,
                        &config.versions,
                        config.heart_beat_ms(),
                        config.heart_beat_grace,
                        Instant::now(),
                    )
                    .map_err(Error::Protocol)?;
                conn.codec_mut().set_version(version);
                let info = ServerInfo {
                    version,
                    server: frame.header("server").map(str::to_owned),
                    session: frame.header("session").map(str::to_owned),
                    heart_beat: frame.header("heart-beat").map(str::to_owned),
                    addr: shown.clone(),
                };
                tracing::debug!(addr = %shown, %version, "STOMP session open");
                return Ok((conn, info));
            }
            Command::Error => {
                return Err(Error::ConnectRejected(BrokerError {
                    message: frame.header("message").unwrap_or("(no message)").to_owned(),
                    details: String::from_utf8_lossy(frame.body()).into_owned(),
                    receipt_id: None,
                }));
            }
            other => return Err(Error::Protocol(format!("expected CONNECTED, got {other}"))),
        }
    }
}

/// Why one connection ended.
enum Ended {
    /// Closed on purpose; stop.
    Closed,
    /// Lost; reconnect.
    Lost(Error),
    /// Unrecoverable; stop.
    Fatal(Error),
}

struct EventLoop {
    rx: mpsc::Receiver<Request>,
    /// For the handles inside delivered messages; weak so that the loop ends
    /// when the user drops every handle.
    handle: mpsc::WeakSender<Request>,
    shared: Arc<Shared>,
    session: Session<Reply>,
    sinks: HashMap<String, mpsc::Sender<Message>>,
    /// Requests that arrived while disconnected, for the next connection.
    backlog: VecDeque<Request>,
}

impl EventLoop {
    fn epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::Acquire)
    }

    async fn run(mut self, first: Conn) {
        let mut conn = first;
        loop {
            let ended = self.serve(&mut conn).await;
            for reply in self.session.drain_pending() {
                let _ = reply.send(Err(Error::ConnectionLost));
            }
            let error = match ended {
                Ended::Closed => break,
                Ended::Fatal(e) => e,
                Ended::Lost(e) => {
                    tracing::warn!(error = %e, "STOMP connection lost; reconnecting");
                    self.shared.epoch.fetch_add(1, Ordering::AcqRel);
                    match self.reconnect().await {
                        Ok(Some(next)) => {
                            conn = next;
                            continue;
                        }
                        Ok(None) => break,
                        Err(e) => e,
                    }
                }
            };
            tracing::error!(error = %error, "STOMP client stopped");
            if let Ok(mut reason) = self.shared.reason.lock() {
                *reason = Some(error.to_string());
            }
            break;
        }
        self.shared.closed.store(true, Ordering::Release);
        self.rx.close();
        while let Ok(request) = self.rx.try_recv() {
            fail(request, || Error::Closed);
        }
        for request in self.backlog.drain(..) {
            fail(request, || Error::Closed);
        }
    }

    /// Waits with backoff and tries the addresses in turn. `Ok(None)`: the
    /// client was closed meanwhile.
    async fn reconnect(&mut self) -> Result<Option<Conn>, Error> {
        let policy = self.shared.config.uri.reconnect.clone();
        let addrs = self.shared.config.uri.addrs.clone();
        let mut attempt: u32 = 0;
        let mut last = Error::ConnectionLost;
        loop {
            if policy.max_attempts.is_some_and(|max| attempt >= max) {
                return Err(Error::ReconnectExhausted {
                    attempts: attempt,
                    last: Box::new(last),
                });
            }
            let delay = jitter(policy.delay(attempt), attempt);
            let wake = Instant::now() + delay;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => break,
                    request = self.rx.recv() => match request {
                        None => return Ok(None),
                        Some(request) => if self.offline(request) { return Ok(None) },
                    },
                }
            }
            let addr = &addrs[attempt as usize % addrs.len()];
            attempt += 1;
            match establish(addr, &self.shared.config, &mut self.session).await {
                Ok((mut conn, info)) => {
                    tracing::info!(addr = %info.addr, attempt, "STOMP reconnected");
                    if let Ok(mut slot) = self.shared.info.lock() {
                        *slot = Some(info);
                    }
                    let mut failed = None;
                    for frame in self.session.resubscribe() {
                        if let Err(e) = conn.feed(frame).await {
                            failed = Some(e);
                            break;
                        }
                    }
                    if failed.is_none() {
                        failed = SinkExt::<Frame>::flush(&mut conn).await.err();
                    }
                    match failed {
                        None => return Ok(Some(conn)),
                        Some(e) => last = Error::from(e),
                    }
                }
                Err(e @ Error::ConnectRejected(_)) => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, attempt, "STOMP reconnect attempt failed");
                    last = e;
                }
            }
        }
    }

    /// Handles a request while disconnected; returns true when asked to close.
    fn offline(&mut self, request: Request) -> bool {
        let epoch = self.epoch();
        match request {
            Request::Frame {
                epoch: Some(e),
                what,
                reply,
                ..
            } if e != epoch => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(Error::Stale(what)));
                }
            }
            Request::Subscribe {
                id,
                frame,
                sink,
                reply,
                ..
            } => {
                self.session.subscribed(&id, &frame);
                self.sinks.insert(id, sink);
                let _ = reply.send(Ok(()));
            }
            Request::Unsubscribe { id } => {
                self.session.unsubscribed(&id);
                self.sinks.remove(&id);
            }
            Request::Disconnect { reply } => {
                let _ = reply.send(Ok(()));
                return true;
            }
            other => self.backlog.push_back(other),
        }
        false
    }

    async fn serve(&mut self, conn: &mut Conn) -> Ended {
        let mut parked: Option<(mpsc::Sender<Message>, Message)> = None;
        let mut written: Vec<Reply> = Vec::new();
        // Requests that waited for this connection go first.
        while let Some(request) = self.backlog.pop_front() {
            if let Err(ended) = self.handle(conn, request, &mut written).await {
                return ended;
            }
        }
        if let Err(ended) = self.flush(conn, &mut written).await {
            return ended;
        }
        loop {
            let deadline = self.session.next_deadline();
            tokio::select! {
                biased;
                permit = reserve(&parked), if parked.is_some() => {
                    if let (Some((_, message)), Ok(permit)) = (parked.take(), permit) {
                        permit.send(message);
                    }
                    // The client, not the broker, was the slow one.
                    self.session.reset_read_clock(Instant::now());
                }
                request = self.rx.recv() => {
                    let Some(request) = request else {
                        return self.goodbye(conn).await;
                    };
                    // Batch whatever else is queued into the same write.
                    let mut next = Some(request);
                    let mut batched = 0;
                    while let Some(request) = next.take() {
                        if let Err(ended) = self.handle(conn, request, &mut written).await {
                            return ended;
                        }
                        batched += 1;
                        if batched < 1024 {
                            next = self.rx.try_recv().ok();
                        }
                    }
                    if let Err(ended) = self.flush(conn, &mut written).await {
                        return ended;
                    }
                }
                item = conn.next(), if parked.is_none() => {
                    let now = Instant::now();
                    match item {
                        None => return Ended::Lost(closed_by_peer(&self.addr(), "")),
                        Some(Err(e)) => return Ended::Lost(link_error(&self.addr(), e)),
                        Some(Ok(Received::HeartBeat)) => self.session.on_read(now),
                        Some(Ok(Received::Frame(frame))) => {
                            self.session.on_read(now);
                            if let Some(ended) = self.inbound(frame, &mut parked) {
                                return ended;
                            }
                        }
                    }
                }
                _ = sleep_until(deadline), if deadline.is_some() => {
                    let now = Instant::now();
                    match self.session.poll_timers(now) {
                        Timer::PeerSilent(after) if parked.is_none() => return Ended::Lost(Error::HeartBeatTimeout(after)),
                        Timer::PeerSilent(_) => self.session.reset_read_clock(now),
                        Timer::SendHeartBeat => {
                            let io = conn.get_mut();
                            let wrote = tokio::io::AsyncWriteExt::write_all(io, b"\n").await;
                            if let Err(e) = wrote {
                                return Ended::Lost(link_error(&self.addr(), e.into()));
                            }
                            self.session.on_write(now);
                        }
                        Timer::Idle => {}
                    }
                }
            }
        }
    }

    fn addr(&self) -> String {
        self.shared
            .info
            .lock()
            .ok()
            .and_then(|i| i.as_ref().map(|i| i.addr.clone()))
            .unwrap_or_default()
    }

    fn inbound(
        &mut self,
        frame: Frame,
        parked: &mut Option<(mpsc::Sender<Message>, Message)>,
    ) -> Option<Ended> {
        match self.session.on_frame(frame) {
            Inbound::Delivery {
                subscription,
                frame,
            } => {
                let Some(sink) = self.sinks.get(&subscription) else {
                    tracing::debug!(%subscription, "message for an unknown subscription dropped");
                    return None;
                };
                // Every user handle is gone: nobody can ack, the broker redelivers.
                let tx = self.handle.upgrade()?;
                let message = Message {
                    ack: AckId::of(self.session.version(), &subscription, &frame),
                    frame,
                    epoch: self.epoch(),
                    client: Client {
                        tx,
                        shared: self.shared.clone(),
                    },
                };
                match sink.try_send(message) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(message)) => {
                        *parked = Some((sink.clone(), message))
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        self.sinks.remove(&subscription);
                    }
                }
                None
            }
            Inbound::Confirmed(reply) => {
                let _ = reply.send(Ok(()));
                None
            }
            Inbound::Rejected(reply, error) => {
                let _ = reply.send(Err(Error::Rejected(error)));
                None
            }
            Inbound::Fatal(error) => {
                tracing::error!(message = %error, "unsolicited ERROR frame from the broker");
                Some(Ended::Lost(Error::Broker(error)))
            }
            Inbound::Ignored => None,
            Inbound::Unexpected(command) => Some(Ended::Lost(Error::Protocol(format!(
                "unexpected {command} frame"
            )))),
        }
    }

    async fn handle(
        &mut self,
        conn: &mut Conn,
        request: Request,
        written: &mut Vec<Reply>,
    ) -> Result<(), Ended> {
        let epoch = self.epoch();
        let frame = match request {
            Request::Frame {
                epoch: Some(e),
                what,
                reply,
                ..
            } if e != epoch => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(Error::Stale(what)));
                }
                return Ok(());
            }
            Request::Frame {
                frame,
                receipt,
                reply,
                ..
            } => match (receipt, reply) {
                (Some(id), Some(reply)) => self.session.expect_receipt(frame, id, reply),
                (_, reply) => {
                    if let Some(reply) = reply {
                        written.push(reply);
                    }
                    frame
                }
            },
            Request::Subscribe {
                id,
                frame,
                sink,
                receipt,
                reply,
            } => {
                self.session.subscribed(&id, &frame);
                self.sinks.insert(id, sink);
                self.session.expect_receipt(frame, receipt, reply)
            }
            Request::Unsubscribe { id } => {
                self.sinks.remove(&id);
                if !self.session.unsubscribed(&id) {
                    return Ok(());
                }
                Frame::unsubscribe(id)
            }
            Request::Disconnect { reply } => {
                let _ = self.flush(conn, written).await;
                let ended = self.goodbye(conn).await;
                let _ = reply.send(Ok(()));
                return Err(ended);
            }
        };
        conn.feed(frame).await.map_err(|e| self.write_failed(e))
    }

    fn write_failed(&self, e: CodecError) -> Ended {
        let socket = matches!(e, CodecError::Io(_));
        let error = link_error(&self.addr(), e);
        if socket {
            Ended::Lost(error)
        } else {
            // A frame we could not encode is the caller's mistake, but its reply is
            // already registered; closing is the only safe answer.
            Ended::Fatal(error)
        }
    }

    async fn flush(&mut self, conn: &mut Conn, written: &mut Vec<Reply>) -> Result<(), Ended> {
        match SinkExt::<Frame>::flush(conn).await {
            Ok(()) => {
                self.session.on_write(Instant::now());
                for reply in written.drain(..) {
                    let _ = reply.send(Ok(()));
                }
                Ok(())
            }
            Err(e) => {
                for reply in written.drain(..) {
                    let _ = reply.send(Err(Error::ConnectionLost));
                }
                Err(self.write_failed(e))
            }
        }
    }

    /// DISCONNECT with a receipt, waiting briefly for it.
    async fn goodbye(&mut self, conn: &mut Conn) -> Ended {
        let frame = Frame::disconnect().with_header("receipt", "disconnect");
        if conn.send(frame).await.is_ok() {
            let wait = async {
                while let Some(Ok(item)) = conn.next().await {
                    if let Received::Frame(f) = item
                        && f.command() == Command::Receipt
                        && f.header("receipt-id") == Some("disconnect")
                    {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), wait).await;
        }
        let _ = tokio::io::AsyncWriteExt::shutdown(conn.get_mut()).await;
        Ended::Closed
    }
}

/// Names the broker address in socket failures; other codec errors pass through.
fn link_error(addr: &str, error: CodecError) -> Error {
    match error {
        CodecError::Io(source) => Error::Connect {
            addr: addr.to_owned(),
            source,
        },
        other => Error::Codec(other),
    }
}

/// The broker closed the socket (`when` says at which step, if it matters).
fn closed_by_peer(addr: &str, when: &str) -> Error {
    let text = format!("broker closed the connection {when}");
    Error::Connect {
        addr: addr.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, text.trim_end()),
    }
}

async fn reserve(
    parked: &Option<(mpsc::Sender<Message>, Message)>,
) -> Result<mpsc::OwnedPermit<Message>, ()> {
    match parked {
        Some((sink, _)) => sink.clone().reserve_owned().await.map_err(|_| ()),
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn fail(request: Request, error: impl Fn() -> Error) {
    match request {
        Request::Frame {
            reply: Some(reply), ..
        }
        | Request::Subscribe { reply, .. }
        | Request::Disconnect { reply } => {
            let _ = reply.send(Err(error()));
        }
        _ => {}
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
