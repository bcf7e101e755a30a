//! The async client: a cheap handle ([`Client`]) that talks over a channel to
//! one event loop task, which owns the socket, the timers and the protocol session.
//!
//! The rooms:
//! - `config`: [`Config`] (the builder) and [`ServerInfo`];
//! - `connector`: the failover list, the handshake, and the one connect loop
//!   for start-up and reconnect;
//! - `connection`: one live connection: its writes, with a stall limit, and
//!   its reads;
//! - `event_loop`: the task that `select!`s over the network, the requests, the
//!   heart-beat deadline and a sweep timer, and carries out what the session
//!   decides;
//! - `backlog`: the requests that wait for a connection;
//! - `delivery` and `sink`: how a delivered message reaches its
//!   subscription's stream, within its bounds;
//! - `subscription`: [`Subscribe`], [`Subscription`]; `message`: [`Message`];
//! - `transaction`: [`Transaction`].
//!
//! When the connection drops, every request still waiting for a receipt fails
//! with [`Error::ConnectionLost`] (outcome unknown, never success), or with
//! [`Error::Broker`] when the broker closed it after refusing a frame. The loop
//! reconnects over the failover list with backoff, restores the subscriptions,
//! and carries on with the requests that arrived meanwhile — each of which
//! waits for the connection only until its deadline ([`Config::receipt_timeout`])
//! and is withdrawn, never written later, when its caller gives up.
//! Transactions and deliveries belong to one connection (an *epoch*): using
//! them after a reconnect gives [`Error::Stale`] instead of confusing the
//! broker.

mod backlog;
mod config;
mod connection;
mod connector;
mod delivery;
mod event_loop;
mod message;
mod sink;
mod subscription;
mod transaction;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

pub use config::{Config, ServerInfo};
pub use message::Message;
pub use subscription::{
    AckMode, DEFAULT_BUFFER_BYTES, DEFAULT_QUEUE_BYTES, Subscribe, Subscription,
};
pub use transaction::Transaction;

use crate::codec::{Command, Frame};
use crate::error::Error;
pub(crate) use connection::Transport;
use connector::{Connector, Phase};
use event_loop::EventLoop;
use sink::Sink;

pub(crate) type Reply = oneshot::Sender<Result<(), Error>>;

/// What the event loop is asked to do; each variant says what its caller waits for.
pub(crate) enum Request {
    /// A frame with a `receipt`: the caller waits for the broker's answer.
    Confirmed {
        frame: Frame,
        receipt: String,
        /// The connection it belongs to, if any (a transaction's, a delivery's).
        epoch: Option<u64>,
        what: &'static str,
        reply: Reply,
        deadline: Instant,
    },
    /// A frame whose caller waits until it is written to a live connection.
    Written {
        frame: Frame,
        epoch: Option<u64>,
        what: &'static str,
        reply: Reply,
        deadline: Instant,
    },
    /// A frame of an open transaction or delivery that nobody waits for; it
    /// is dropped if its connection is gone.
    Queued {
        frame: Frame,
        epoch: u64,
        what: &'static str,
    },
    /// A SUBSCRIBE with a receipt; the subscription exists once confirmed.
    Subscribe {
        id: String,
        frame: Frame,
        sink: Sink,
        receipt: String,
        reply: Reply,
        deadline: Instant,
    },
    /// End a subscription (no receipt).
    Unsubscribe { id: String },
    /// DISCONNECT and stop.
    Disconnect { reply: Reply },
}

impl Request {
    fn reply(&self) -> Option<&Reply> {
        match self {
            Request::Confirmed { reply, .. }
            | Request::Written { reply, .. }
            | Request::Subscribe { reply, .. }
            | Request::Disconnect { reply } => Some(reply),
            Request::Queued { .. } | Request::Unsubscribe { .. } => None,
        }
    }

    /// Until when the request may wait for a connection.
    fn deadline(&self) -> Option<Instant> {
        match self {
            Request::Confirmed { deadline, .. }
            | Request::Written { deadline, .. }
            | Request::Subscribe { deadline, .. } => Some(*deadline),
            _ => None,
        }
    }

    /// True for a COMMIT with a caller waiting for its receipt.
    fn commits(&self) -> bool {
        matches!(self, Request::Confirmed { frame, .. } if frame.command() == Command::Commit)
    }

    /// The transaction a frame belongs to, if it names one.
    fn transaction(&self) -> Option<String> {
        match self {
            Request::Confirmed { frame, .. }
            | Request::Written { frame, .. }
            | Request::Queued { frame, .. } => frame.header("transaction").map(str::to_owned),
            _ => None,
        }
    }

    /// True when its caller stopped waiting.
    fn abandoned(&self) -> bool {
        self.reply().is_some_and(|reply| reply.is_closed())
    }

    /// Answers the caller, if any, with `error`.
    fn fail(self, error: Error) {
        match self {
            Request::Confirmed { reply, .. }
            | Request::Written { reply, .. }
            | Request::Subscribe { reply, .. }
            | Request::Disconnect { reply } => {
                let _ = reply.send(Err(error));
            }
            Request::Queued { .. } | Request::Unsubscribe { .. } => {}
        }
    }
}

pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) epoch: AtomicU64,
    counter: AtomicU64,
    pub(crate) closed: AtomicBool,
    pub(crate) connected: AtomicBool,
    /// Requests waiting for a connection.
    pub(crate) waiting: AtomicUsize,
    pub(crate) info: Mutex<Option<ServerInfo>>,
    pub(crate) reason: Mutex<Option<String>>,
    /// A connection (epoch) a user asked to end, and why; the loop is woken
    /// through `end`, outside the request channel, which may be what is stuck.
    pub(crate) end_asked: Mutex<Option<(u64, String)>>,
    pub(crate) end: tokio::sync::Notify,
}

impl Shared {
    pub(crate) fn next_number(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// How often the loop looks for requests past their deadline.
pub(crate) fn sweep_every(config: &Config) -> Duration {
    (config.receipt_timeout / 20).clamp(Duration::from_millis(10), Duration::from_millis(250))
}

/// How long past its deadline a caller waits for the loop's answer: the
/// loop answers at its next sweep.
fn answer_margin(config: &Config) -> Duration {
    sweep_every(config) * 2 + Duration::from_millis(50)
}

/// A STOMP connection handle. Cloning is cheap; all clones share one
/// connection. The connection closes when [`Client::disconnect`] is called or
/// the last handle (including subscriptions and messages) is dropped.
#[derive(Clone)]
pub struct Client {
    pub(crate) tx: mpsc::Sender<Request>,
    pub(crate) shared: Arc<Shared>,
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
    /// Connects to the first reachable address of `config.uri` (trying the
    /// list as often as `startupMaxReconnectAttempts` allows) and starts the
    /// event loop.
    pub async fn connect(config: Config) -> Result<Client, Error> {
        if config.uri.addrs.is_empty() {
            return Err(Error::Uri(crate::error::UriError::Empty));
        }
        let (tx, rx) = mpsc::channel(1024);
        let shared = Arc::new(Shared {
            config,
            epoch: AtomicU64::new(0),
            counter: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            info: Mutex::new(None),
            reason: Mutex::new(None),
            end_asked: Mutex::new(None),
            end: tokio::sync::Notify::new(),
        });
        let uri = &shared.config.uri;
        let mut connector = Connector::new(&uri.addrs, &uri.reconnect);
        let mut event_loop = EventLoop::new(rx, tx.downgrade(), shared.clone());
        let connected = connector
            .connect(Phase::Startup, &shared.config, &mut event_loop)
            .await?;
        let Some(conn) = connected else {
            return Err(Error::Closed);
        };
        tokio::spawn(event_loop.run(connector, conn));
        Ok(Client { tx, shared })
    }

    /// The longest one request can wait before it is answered or fails: the
    /// receipt timeout (for a live connection, then for the receipt) and the
    /// margin of the loop's deadline sweep.
    pub fn max_wait(&self) -> Duration {
        self.shared.config.receipt_timeout + answer_margin(&self.shared.config)
    }

    /// The settings this client was built with.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// What the broker said in its latest CONNECTED frame.
    pub fn server_info(&self) -> Option<ServerInfo> {
        self.shared.info.lock().ok().and_then(|i| i.clone())
    }

    /// The negotiated version of the current connection.
    pub fn version(&self) -> crate::codec::Version {
        self.server_info()
            .map_or(crate::codec::Version::V1_2, |i| i.version)
    }

    /// How many connections were lost so far (0 on the first connection).
    pub fn epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::Acquire)
    }

    /// True while a connection is up (false while reconnecting or closed).
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Acquire) && !self.is_closed()
    }

    /// Requests waiting for a connection now (while disconnected). Each has a
    /// caller waiting on it and leaves by its deadline, so this stays at the
    /// number of callers, however long an outage lasts.
    pub fn waiting_requests(&self) -> usize {
        self.shared.waiting.load(Ordering::Relaxed)
    }

    /// True once the client stopped for good.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire) || self.tx.is_closed()
    }

    /// Why the client stopped, if it stopped on an error.
    pub fn close_reason(&self) -> Option<String> {
        self.shared.reason.lock().ok().and_then(|r| r.clone())
    }

    /// Ends connection `epoch` (see [`Client::epoch`], [`Message::epoch`]) if
    /// it is still the current one, as if it was lost: the client reconnects
    /// over its failover list and restores its subscriptions, and the broker
    /// delivers again every message it delivered on it that was not
    /// acknowledged. For a delivery whose ACK cannot be sent: ActiveMQ holds
    /// it, and its prefetch slot, until its connection ends. Returns at once;
    /// a write in progress finishes (or stalls out) first.
    pub fn end_connection(&self, epoch: u64, reason: impl Into<String>) {
        if epoch != self.epoch() || self.is_closed() {
            return;
        }
        if let Ok(mut asked) = self.shared.end_asked.lock() {
            *asked = Some((epoch, reason.into()));
        }
        self.shared.end.notify_one();
    }

    fn next_id(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.shared.next_number())
    }

    /// The deadline of a request made now.
    pub(crate) fn deadline(&self) -> Instant {
        Instant::now() + self.shared.config.receipt_timeout
    }

    /// Hands `request` to the event loop, waiting at most until `deadline`.
    pub(crate) async fn submit(&self, request: Request, deadline: Instant) -> Result<(), Error> {
        match tokio::time::timeout_at(deadline, self.tx.send(request)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::NotConnected {
                waited: self.shared.config.receipt_timeout,
            }),
        }
    }

    /// Hands `request` over without waiting (from `Drop`); lost if the loop is gone.
    pub(crate) fn try_submit(&self, request: Request) {
        let _ = self.tx.try_send(request);
    }

    /// Waits for the loop's answer. The loop answers by the deadline itself;
    /// the margin only covers its sweep interval.
    async fn answer(
        &self,
        answer: oneshot::Receiver<Result<(), Error>>,
        deadline: Instant,
        receipt: String,
    ) -> Result<(), Error> {
        let margin = answer_margin(&self.shared.config);
        match tokio::time::timeout_at(deadline + margin, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) if self.is_closed() => Err(Error::Closed),
            Ok(Err(_)) => Err(Error::ConnectionLost),
            Err(_) => Err(Error::ReceiptTimeout {
                receipt,
                after: self.shared.config.receipt_timeout,
            }),
        }
    }

    /// Sends a frame and waits for the broker's receipt.
    pub(crate) async fn request(
        &self,
        frame: Frame,
        epoch: Option<u64>,
        what: &'static str,
    ) -> Result<(), Error> {
        let receipt = self.next_id("r");
        let deadline = self.deadline();
        let (reply, answer) = oneshot::channel();
        let request = Request::Confirmed {
            frame,
            receipt: receipt.clone(),
            epoch,
            what,
            reply,
            deadline,
        };
        self.submit(request, deadline).await?;
        self.answer(answer, deadline, receipt).await
    }

    /// Sends a frame and waits until it is written to a live connection.
    pub(crate) async fn written(
        &self,
        frame: Frame,
        epoch: Option<u64>,
        what: &'static str,
    ) -> Result<(), Error> {
        let deadline = self.deadline();
        let (reply, answer) = oneshot::channel();
        let request = Request::Written {
            frame,
            epoch,
            what,
            reply,
            deadline,
        };
        self.submit(request, deadline).await?;
        self.answer(answer, deadline, "(write)".to_owned()).await
    }

    /// Queues a frame of connection `epoch` without waiting for the write.
    pub(crate) async fn queue(
        &self,
        frame: Frame,
        epoch: u64,
        what: &'static str,
    ) -> Result<(), Error> {
        let request = Request::Queued { frame, epoch, what };
        self.submit(request, self.deadline()).await
    }

    /// Sends a message and waits for the broker's receipt. Only a returned
    /// `Ok` means the broker has the message (and stored it, if persistent).
    /// While disconnected it waits for a connection until the receipt timeout;
    /// [`Error::NotConnected`] then means it was never sent.
    pub async fn send(&self, message: impl Into<Frame>) -> Result<(), Error> {
        let frame = into_send(message.into());
        self.encodable(&frame)?;
        self.request(frame, None, "send").await
    }

    /// [`Error::Unencodable`] if `frame` cannot be written in the current
    /// connection's version; the event loop checks again before it writes.
    pub(crate) fn encodable(&self, frame: &Frame) -> Result<(), Error> {
        crate::codec::encodable(self.version(), frame).map_err(Error::Unencodable)
    }

    /// Sends a message without asking for a receipt; returns once it is
    /// written. On ActiveMQ a failed send without a receipt is dropped
    /// silently: use only where loss is fine.
    pub async fn send_unconfirmed(&self, message: impl Into<Frame>) -> Result<(), Error> {
        let frame = into_send(message.into());
        self.encodable(&frame)?;
        self.written(frame, None, "send").await
    }

    /// Starts a transaction (BEGIN). Returns once the BEGIN is written to a
    /// live connection, so the transaction's frames never wait in a backlog;
    /// while disconnected it waits for a connection until the receipt timeout.
    pub async fn begin(&self) -> Result<Transaction, Error> {
        let id = self.next_id("tx");
        let epoch = self.epoch();
        self.written(Frame::begin(id.clone()), Some(epoch), "transaction")
            .await?;
        Ok(Transaction {
            client: self.clone(),
            id,
            epoch,
            finished: false,
            held: Mutex::new(None),
        })
    }

    /// Subscribes and returns once the broker confirmed the SUBSCRIBE with its
    /// receipt (a Virtual Topic queue then exists). While disconnected it waits
    /// for a connection until the receipt timeout. A refused or unconfirmed
    /// SUBSCRIBE leaves no subscription behind.
    pub async fn subscribe(&self, options: Subscribe) -> Result<Subscription, Error> {
        let id = options.id_or(|| self.next_id("sub"));
        let frame = options.frame(&id);
        let (sink, rx) = options.sink();
        let receipt = self.next_id("r");
        let deadline = self.deadline();
        let (reply, answer) = oneshot::channel();
        let request = Request::Subscribe {
            id: id.clone(),
            frame,
            sink,
            receipt: receipt.clone(),
            reply,
            deadline,
        };
        self.submit(request, deadline).await?;
        self.answer(answer, deadline, receipt).await?;
        Ok(Subscription::new(
            id,
            options.destination().to_owned(),
            rx,
            self.clone(),
        ))
    }

    /// Sends DISCONNECT with a receipt and closes the connection. Requests
    /// still waiting for receipts fail with [`Error::ConnectionLost`]. Returns
    /// within the receipt timeout (plus the socket shutdown) at the latest.
    pub async fn disconnect(&self) -> Result<(), Error> {
        let (reply, answer) = oneshot::channel();
        let deadline = self.deadline();
        if self
            .submit(Request::Disconnect { reply }, deadline)
            .await
            .is_err()
        {
            return Ok(());
        }
        let limit = deadline
            + self
                .shared
                .config
                .receipt_timeout
                .min(Duration::from_secs(5));
        match tokio::time::timeout_at(limit, answer).await {
            Ok(answer) => answer.unwrap_or(Ok(())),
            Err(_) => Err(Error::ReceiptTimeout {
                receipt: "disconnect".to_owned(),
                after: self.shared.config.receipt_timeout,
            }),
        }
    }
}

pub(crate) fn into_send(frame: Frame) -> Frame {
    if frame.command() == Command::Send {
        frame
    } else {
        let (_, headers, body) = frame.into_parts();
        Frame::from_parts(Command::Send, headers, body)
    }
}
