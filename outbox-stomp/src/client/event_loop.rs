//! The one task that owns the socket: it `select!`s over the network, the
//! requests of the [`Client`] handles, the heart-beat deadline and a sweep
//! timer, and reconnects when the connection is lost.
//!
//! ```text
//!           connect(Startup) ──► serve ──► Lost / Refused ──► connect(Reconnect) ──► serve …
//!                                  │                               │ (requests wait in the backlog
//!                                  └─ Closed / Fatal ──► stop      │  until their deadline)
//!                                                                  └─ attempts spent / login refused ──► stop
//! ```
//!
//! Bounds: a request waits for a connection at most until its deadline (then
//! it is withdrawn, never written), a request whose caller has gone is never
//! written, a receipt not answered by its deadline is given up, and a write
//! that moves no byte for the stall limit ends the connection. So nothing grows
//! with the length of an outage, and no caller waits for ever.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::connector::{
    Conn, Connector, Phase, Progress, WriteFailure, closed_by_peer, establish, guarded, link_error,
};
use super::subscription::Queue;
use super::{Client, Message, Reply, Request, ServerInfo, Shared};
use crate::codec::{Command, Frame, Received};
use crate::error::{BrokerError, CodecError, Error};
use crate::session::{AckId, Inbound, Session, Timer};

use super::subscription::Charge;
pub(crate) use super::subscription::Sink;

/// Who waits for a receipt.
pub(crate) enum Waiter {
    /// A caller; for a SUBSCRIBE, the id of the subscription it creates.
    Caller {
        reply: Reply,
        subscription: Option<String>,
    },
    /// A subscription the loop restored after a reconnect.
    Restore { subscription: String },
}

/// Why one connection ended.
enum Ended {
    /// Closed on purpose; stop.
    Closed,
    /// Lost; reconnect.
    Lost(Error),
    /// The broker refused a frame with an ERROR and closed; reconnect.
    Refused(BrokerError),
    /// Unrecoverable; stop.
    Fatal(Error),
}

/// How many refused connections are remembered for their late requests.
const REFUSALS_KEPT: usize = 8;

/// How long the broker may take to say why it closed after a failed write.
const LAST_WORDS: Duration = Duration::from_millis(250);

pub(crate) struct EventLoop {
    rx: mpsc::Receiver<Request>,
    /// For the handles inside delivered messages; weak so that the loop ends
    /// when the user drops every handle.
    handle: mpsc::WeakSender<Request>,
    shared: Arc<Shared>,
    session: Session<Waiter, Sink>,
    connector: Connector,
    /// Requests that arrived while disconnected, for the next connection.
    backlog: VecDeque<Request>,
    /// Connections (epochs) the broker closed after an ERROR, and that error.
    refused: VecDeque<(u64, BrokerError)>,
    /// Write progress of the current connection.
    progress: Arc<Progress>,
    /// How long a write may move no byte.
    stall: Duration,
    /// The address of the current connection.
    addr: String,
    /// An ERROR that matched no receipt, and until when a close counts as
    /// its consequence.
    refusal: Option<(BrokerError, Instant)>,
}

impl EventLoop {
    pub(crate) fn new(
        rx: mpsc::Receiver<Request>,
        handle: mpsc::WeakSender<Request>,
        shared: Arc<Shared>,
    ) -> EventLoop {
        let uri = &shared.config.uri;
        let connector = Connector::new(&uri.addrs, &uri.reconnect);
        EventLoop {
            rx,
            handle,
            session: Session::new(Instant::now()),
            connector,
            backlog: VecDeque::new(),
            refused: VecDeque::new(),
            progress: Arc::new(Progress::new()),
            stall: shared.config.receipt_timeout,
            addr: String::new(),
            refusal: None,
            shared,
        }
    }

    fn epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::Acquire)
    }

    fn sweep_every(&self) -> Duration {
        super::sweep_every(&self.shared.config)
    }

    pub(crate) async fn run(mut self, first: Conn) {
        let mut conn = first;
        let error = loop {
            let ended = self.serve(&mut conn).await;
            self.shared.connected.store(false, Ordering::Release);
            self.refusal = None;
            let epoch = self.epoch();
            self.connector
                .ended(matches!(ended, Ended::Lost(Error::Codec(_))));
            if let Ended::Refused(e) = &ended {
                if self.refused.len() == REFUSALS_KEPT {
                    self.refused.pop_front();
                }
                self.refused.push_back((epoch, e.clone()));
            }
            // The epoch moves on before any waiter is answered, so a caller
            // that starts again at once belongs to the next connection.
            self.shared.epoch.fetch_add(1, Ordering::AcqRel);
            match ended {
                Ended::Closed => {
                    self.lost(|| Error::ConnectionLost);
                    break None;
                }
                Ended::Fatal(e) => {
                    self.lost(|| Error::ConnectionLost);
                    break Some(e);
                }
                Ended::Lost(e) => {
                    tracing::warn!(error = %e, "STOMP connection lost; reconnecting");
                    self.lost(|| Error::ConnectionLost);
                }
                Ended::Refused(e) => {
                    tracing::warn!(error = %e, "broker refused a frame and closed the connection; reconnecting");
                    self.lost(|| Error::Broker(e.clone()));
                }
            }
            match self.connect(Phase::Reconnect).await {
                Ok(Some(next)) => conn = next,
                Ok(None) => break None,
                Err(e) => break Some(e),
            }
        };
        if let Some(error) = error {
            tracing::error!(error = %error, "STOMP client stopped");
            if let Ok(mut reason) = self.shared.reason.lock() {
                *reason = Some(error.to_string());
            }
        }
        self.shared.closed.store(true, Ordering::Release);
        self.rx.close();
        while let Ok(request) = self.rx.try_recv() {
            request.fail(Error::Closed);
        }
        for request in self.backlog.drain(..) {
            request.fail(Error::Closed);
        }
        self.note_backlog();
    }

    /// The one connect loop for start-up and reconnect: tries the plan's
    /// addresses with backoff and jitter, serving requests meanwhile, until one
    /// connects, the attempts run out, or a login is refused. `Ok(None)`: the
    /// client was closed meanwhile.
    pub(crate) async fn connect(&mut self, phase: Phase) -> Result<Option<Conn>, Error> {
        let mut attempt: u32 = 0;
        let mut last: Option<Error> = None;
        loop {
            let Some(plan) = self.connector.plan(attempt, phase) else {
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
            if self.offline_until(Instant::now() + plan.delay).await {
                return Ok(None);
            }
            let shared = self.shared.clone();
            let handshake = establish(plan.addr.clone(), &shared.config);
            let mut handshake = std::pin::pin!(handshake);
            let result = loop {
                let tick = Instant::now() + self.sweep_every();
                tokio::select! {
                    result = &mut handshake => break result,
                    closed = self.offline_step(tick) => if closed { return Ok(None) },
                }
            };
            let error = match result {
                Ok((conn, connected, progress)) => {
                    match self.opened(conn, &connected, progress, &plan).await {
                        Ok(conn) => {
                            if phase == Phase::Reconnect {
                                tracing::info!(addr = %self.addr, attempt, "STOMP reconnected");
                            }
                            return Ok(Some(conn));
                        }
                        Err(e) => e,
                    }
                }
                Err(Error::ConnectRejected(e)) if e.is_login_refused() => {
                    return Err(Error::ConnectRejected(e));
                }
                Err(e) => e,
            };
            tracing::debug!(error = %error, attempt, addr = %plan.addr, "STOMP connect attempt failed");
            last = Some(error);
        }
    }

    /// Takes a fresh connection into use: negotiation, bookkeeping, restored
    /// subscriptions.
    async fn opened(
        &mut self,
        mut conn: Conn,
        connected: &Frame,
        progress: Arc<Progress>,
        plan: &super::connector::Plan,
    ) -> Result<Conn, Error> {
        let config = &self.shared.config;
        let version = self
            .session
            .connected(
                connected,
                &config.versions,
                config.heart_beat_ms(),
                config.heart_beat_grace,
                Instant::now(),
            )
            .map_err(Error::Protocol)?;
        conn.codec_mut().set_version(version);
        self.addr = plan.addr.to_string();
        self.progress = progress;
        self.stall = config
            .write_timeout
            .or(self.session.heart_beat().read_timeout)
            .unwrap_or(config.receipt_timeout);
        let info = ServerInfo {
            version,
            server: connected.header("server").map(str::to_owned),
            session: connected.header("session").map(str::to_owned),
            heart_beat: connected.header("heart-beat").map(str::to_owned),
            addr: self.addr.clone(),
        };
        tracing::debug!(addr = %self.addr, %version, "STOMP session open");
        if let Err(e) = self.restore(&mut conn).await {
            self.session.drain_pending();
            return Err(e);
        }
        if let Ok(mut slot) = self.shared.info.lock() {
            *slot = Some(info);
        }
        self.connector.connected(plan);
        self.shared.connected.store(true, Ordering::Release);
        Ok(conn)
    }

    /// Sends the SUBSCRIBE frames of the live subscriptions again, each with a
    /// receipt: a refused one ends that subscription instead of the connection.
    async fn restore(&mut self, conn: &mut Conn) -> Result<(), Error> {
        let deadline = Instant::now() + self.shared.config.receipt_timeout;
        // A subscription whose stream is gone needs no restoring.
        self.session.retain_subscriptions(|sink| !sink.is_closed());
        for (id, frame) in self.session.resubscribe() {
            let receipt = format!("restore-{id}-{}", self.shared.next_number());
            let frame = self.session.expect_receipt(
                frame,
                receipt,
                Waiter::Restore { subscription: id },
                deadline,
            );
            let written = guarded(conn.feed(frame), &self.progress, self.stall).await;
            written.map_err(|e| self.write_error(e))?;
        }
        let flushed = guarded(SinkExt::<Frame>::flush(conn), &self.progress, self.stall).await;
        flushed.map_err(|e| self.write_error(e))
    }

    /// Waits until `wake`, serving requests; true when asked to close.
    async fn offline_until(&mut self, wake: Instant) -> bool {
        loop {
            let now = Instant::now();
            if now >= wake {
                return false;
            }
            if self.offline_step(wake.min(now + self.sweep_every())).await {
                return true;
            }
        }
    }

    /// Serves one request, or sweeps the backlog at `tick`; true when asked to close.
    async fn offline_step(&mut self, tick: Instant) -> bool {
        tokio::select! {
            request = self.rx.recv() => match request {
                None => true,
                Some(request) => self.offline(request),
            },
            _ = tokio::time::sleep_until(tick) => {
                self.sweep_backlog(Instant::now());
                false
            }
        }
    }

    /// Handles a request while disconnected; returns true when asked to close.
    fn offline(&mut self, request: Request) -> bool {
        let Some(request) = self.current(request) else {
            return false;
        };
        match request {
            Request::Unsubscribe { id } => {
                self.session.unsubscribed(&id);
            }
            Request::Disconnect { reply } => {
                let _ = reply.send(Ok(()));
                return true;
            }
            other => {
                self.backlog.push_back(other);
                self.note_backlog();
            }
        }
        false
    }

    fn note_backlog(&self) {
        self.shared
            .waiting
            .store(self.backlog.len(), Ordering::Relaxed);
    }

    /// Withdraws waiting requests whose caller has gone or whose deadline passed.
    fn sweep_backlog(&mut self, now: Instant) {
        let waited = self.shared.config.receipt_timeout;
        let mut kept = VecDeque::with_capacity(self.backlog.len());
        for request in self.backlog.drain(..) {
            if request.abandoned() {
                continue;
            }
            if request.deadline().is_some_and(|d| d <= now) {
                request.fail(Error::NotConnected { waited });
                continue;
            }
            kept.push_back(request);
        }
        self.backlog = kept;
        self.note_backlog();
    }

    /// Settles a request that belongs to a connection that is gone (its
    /// caller learns why); passes the others on.
    fn current(&self, request: Request) -> Option<Request> {
        let epoch = self.epoch();
        match request {
            Request::Confirmed {
                epoch: Some(e),
                what,
                reply,
                ..
            }
            | Request::Written {
                epoch: Some(e),
                what,
                reply,
                ..
            } if e != epoch => {
                let _ = reply.send(Err(self.stale(e, what)));
                None
            }
            Request::Queued { epoch: e, what, .. } if e != epoch => {
                tracing::trace!(what, "frame of a lost connection dropped");
                None
            }
            other => Some(other),
        }
    }

    /// The error for a request of a connection that is gone: for a
    /// transaction of a connection the broker closed after an ERROR, that
    /// refusal.
    fn stale(&self, epoch: u64, what: &'static str) -> Error {
        // A transaction on a connection the broker closed after refusing a
        // frame was refused with it; anything else is merely stale.
        let refusal = (what == "transaction")
            .then(|| self.refused.iter().find(|(e, _)| *e == epoch))
            .flatten();
        refusal.map_or(Error::Stale(what), |(_, refusal)| {
            Error::Broker(refusal.clone())
        })
    }

    /// Answers every request waiting for a receipt of the lost connection; a
    /// subscription whose SUBSCRIBE was not confirmed is forgotten.
    fn lost(&mut self, error: impl Fn() -> Error) {
        for waiter in self.session.drain_pending() {
            match waiter {
                Waiter::Caller {
                    reply,
                    subscription,
                } => {
                    self.caller_failed(reply, subscription, error());
                }
                // Restored again on the next connection.
                Waiter::Restore { .. } => {}
            }
        }
    }

    async fn serve(&mut self, conn: &mut Conn) -> Ended {
        let mut parked: Option<(Sink, Message)> = None;
        let mut written: Vec<Reply> = Vec::new();
        if let Err(ended) = self.serve_backlog(conn, &mut written).await {
            return ended;
        }
        // One timer for the whole connection, reset when it fires.
        let sweep = tokio::time::sleep(self.sweep_every());
        tokio::pin!(sweep);
        let shared = self.shared.clone();
        loop {
            let deadline = self.session.next_deadline();
            let served = tokio::select! {
                biased;
                _ = shared.end.notified() => self.end_asked(),
                room = room(&parked), if parked.is_some() => {
                    match (parked.take(), room) {
                        (Some((sink, message)), Ok(Room::Queue)) => {
                            if let Queue::Full(message) = sink.try_queue(message) {
                                parked = Some((sink, *message));
                            }
                        }
                        (Some((_, mut message)), Ok(Room::Stream(charge, slot))) => {
                            if charge.is_some() {
                                message.charge = charge;
                            }
                            slot.send(message);
                        }
                        _ => {}
                    }
                    // The client, not the broker, was the slow one.
                    self.session.reset_read_clock(Instant::now());
                    Ok(())
                }
                request = self.rx.recv() => match request {
                    Some(request) => self.serve_requests(conn, request, &mut written).await,
                    None => return self.goodbye(conn).await,
                },
                item = conn.next(), if parked.is_none() => {
                    self.serve_inbound(conn, item, &mut parked, &mut written).await
                }
                _ = sleep_until(deadline), if deadline.is_some() => {
                    self.serve_timers(conn, parked.is_some()).await
                }
                _ = &mut sweep => {
                    let now = Instant::now();
                    sweep.as_mut().reset(now + self.sweep_every());
                    self.serve_sweep(conn, now, &mut written).await
                }
            };
            if let Err(ended) = served {
                return ended;
            }
        }
    }

    /// A user asked to end a connection: this one, if it is the one named.
    fn end_asked(&self) -> Result<(), Ended> {
        let asked = self.shared.end_asked.lock().ok().and_then(|mut a| a.take());
        match asked {
            Some((epoch, reason)) if epoch == self.epoch() => {
                Err(Ended::Lost(Error::EndedByClient { reason }))
            }
            _ => Ok(()),
        }
    }

    /// Requests that waited for this connection go first.
    async fn serve_backlog(
        &mut self,
        conn: &mut Conn,
        written: &mut Vec<Reply>,
    ) -> Result<(), Ended> {
        self.sweep_backlog(Instant::now());
        while let Some(request) = self.backlog.pop_front() {
            self.note_backlog();
            self.handle(conn, request, written).await?;
        }
        self.flush(conn, written).await
    }

    /// `first` and whatever else is queued, batched into the same write.
    async fn serve_requests(
        &mut self,
        conn: &mut Conn,
        first: Request,
        written: &mut Vec<Reply>,
    ) -> Result<(), Ended> {
        let mut next = Some(first);
        let mut batched = 0;
        while let Some(request) = next.take() {
            self.handle(conn, request, written).await?;
            batched += 1;
            if batched < 1024 {
                next = self.rx.try_recv().ok();
            }
        }
        self.flush(conn, written).await
    }

    /// A frame or a heart-beat from the broker, or the end of the link.
    async fn serve_inbound(
        &mut self,
        conn: &mut Conn,
        item: Option<Result<Received, CodecError>>,
        parked: &mut Option<(Sink, Message)>,
        written: &mut Vec<Reply>,
    ) -> Result<(), Ended> {
        let now = Instant::now();
        let frame = match item {
            None => return Err(self.ended(closed_by_peer(&self.addr, ""))),
            Some(Err(e)) => return Err(self.ended(link_error(&self.addr, e))),
            Some(Ok(Received::HeartBeat)) => {
                self.session.on_read(now);
                return Ok(());
            }
            Some(Ok(Received::Frame(frame))) => frame,
        };
        self.session.on_read(now);
        match self.inbound(frame, parked)? {
            Some(reply) => self.send_now(conn, reply, written).await,
            None => Ok(()),
        }
    }

    /// Heart-beats: the broker silent too long, or one of ours due.
    async fn serve_timers(&mut self, conn: &mut Conn, parked: bool) -> Result<(), Ended> {
        let now = Instant::now();
        match self.session.poll_timers(now) {
            Timer::PeerSilent(after) if !parked => Err(Ended::Lost(Error::HeartBeatTimeout(after))),
            Timer::PeerSilent(_) => {
                self.session.reset_read_clock(now);
                Ok(())
            }
            Timer::SendHeartBeat => {
                let io = conn.get_mut();
                let beat = async {
                    tokio::io::AsyncWriteExt::write_all(io, b"\n")
                        .await
                        .map_err(CodecError::Io)
                };
                if let Err(e) = guarded(beat, &self.progress, self.stall).await {
                    return Err(self.write_failed(conn, e).await);
                }
                self.session.on_write(now);
                Ok(())
            }
            Timer::Idle => Ok(()),
        }
    }

    /// Gives up receipts past their deadline (and unsubscribes what a
    /// caller gave up on).
    async fn serve_sweep(
        &mut self,
        conn: &mut Conn,
        now: Instant,
        written: &mut Vec<Reply>,
    ) -> Result<(), Ended> {
        for frame in self.expire(now) {
            self.send_now(conn, frame, written).await?;
        }
        Ok(())
    }

    /// Remembers an ERROR that named no request. The first one names the
    /// cause: ActiveMQ may send another while it reads the rest of the refused
    /// frame as a new one.
    fn note_refusal(&mut self, error: BrokerError) {
        let now = Instant::now();
        if self.refusal.as_ref().is_none_or(|(_, until)| *until < now) {
            self.refusal = Some((error, now + LAST_WORDS));
        }
    }

    /// The connection broke: a refusal if the broker closed it right after an
    /// unsolicited ERROR, else a lost connection.
    fn ended(&mut self, error: Error) -> Ended {
        match self.refusal.take() {
            Some((refusal, until)) if Instant::now() <= until => Ended::Refused(refusal),
            _ => Ended::Lost(error),
        }
    }

    /// Gives up the receipts whose deadline passed; returns UNSUBSCRIBE frames
    /// for subscriptions whose caller gave up before the broker confirmed them.
    fn expire(&mut self, now: Instant) -> Vec<Frame> {
        let after = self.shared.config.receipt_timeout;
        let mut unsubscribe = Vec::new();
        for (receipt, waiter) in self.session.expired(now) {
            match waiter {
                Waiter::Caller {
                    reply,
                    subscription,
                } => {
                    let timeout = Error::ReceiptTimeout { receipt, after };
                    // The broker may yet confirm it: end it there too.
                    if let Some(id) = self.caller_failed(reply, subscription, timeout) {
                        unsubscribe.push(Frame::unsubscribe(id));
                    }
                }
                Waiter::Restore { subscription } => {
                    tracing::warn!(%subscription, "no receipt for a restored subscription; keeping it");
                }
            }
        }
        unsubscribe
    }

    /// Writes one frame of the loop's own and flushes.
    async fn send_now(
        &mut self,
        conn: &mut Conn,
        frame: Frame,
        written: &mut Vec<Reply>,
    ) -> Result<(), Ended> {
        self.write(conn, frame).await?;
        self.flush(conn, written).await
    }

    fn inbound(
        &mut self,
        frame: Frame,
        parked: &mut Option<(Sink, Message)>,
    ) -> Result<Option<Frame>, Ended> {
        match self.session.on_frame(frame) {
            Inbound::Delivery {
                subscription,
                frame,
            } => {
                let Some(sink) = self.session.sink(&subscription) else {
                    tracing::debug!(%subscription, "message for an unknown subscription dropped");
                    return Ok(None);
                };
                // Every user handle is gone: nobody can ack, the broker redelivers.
                let Some(tx) = self.handle.upgrade() else {
                    return Ok(None);
                };
                // Queued messages are charged in order by the task that
                // hands them out, so a later one never takes the budget an
                // earlier one waits for.
                let charge = match sink.is_queued() {
                    true => None,
                    false => sink.try_charge(&frame),
                };
                let message = Message {
                    ack: AckId::of(self.session.version(), &subscription, &frame),
                    charge,
                    frame,
                    epoch: self.epoch(),
                    client: Client {
                        tx,
                        shared: self.shared.clone(),
                    },
                };
                if sink.is_queued() {
                    // The broker bounds these by the prefetch and the queue
                    // by bytes: the socket is read on, and only this
                    // subscription waits, until its queue too is full.
                    match sink.try_queue(message) {
                        Queue::Queued => {}
                        Queue::Full(message) => *parked = Some((sink.clone(), *message)),
                        Queue::Closed => {
                            self.session.unsubscribed(&subscription);
                            return Ok(Some(Frame::unsubscribe(subscription)));
                        }
                    }
                    return Ok(None);
                }
                if message.charge.is_none() && !sink.is_closed() {
                    // Over the byte budget: stop reading until enough is dropped.
                    *parked = Some((sink.clone(), message));
                    return Ok(None);
                }
                match sink.sender().try_send(message) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(message)) => {
                        *parked = Some((sink.clone(), message))
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        self.session.unsubscribed(&subscription);
                        return Ok(Some(Frame::unsubscribe(subscription)));
                    }
                }
                Ok(None)
            }
            Inbound::Confirmed(waiter) => Ok(self.confirmed(waiter)),
            Inbound::Rejected(waiter, error) => {
                self.rejected(waiter, error);
                Ok(None)
            }
            Inbound::Fatal(error) => {
                // ActiveMQ closes the connection after an ERROR for a frame it
                // will not take; for other errors it keeps it. Only a close
                // that follows makes this a refusal of what was in flight.
                tracing::warn!(%error, "ERROR frame from the broker that names no request");
                self.note_refusal(error);
                Ok(None)
            }
            Inbound::Ignored => Ok(None),
            Inbound::Unexpected(command) => Err(Ended::Lost(Error::Protocol(format!(
                "unexpected {command} frame"
            )))),
        }
    }

    /// A receipt arrived. A subscription whose caller gave up meanwhile is
    /// ended at once (the returned UNSUBSCRIBE).
    fn confirmed(&mut self, waiter: Waiter) -> Option<Frame> {
        match waiter {
            Waiter::Caller {
                reply,
                subscription,
            } => {
                if reply.send(Ok(())).is_err()
                    && let Some(id) = subscription
                    && self.session.unsubscribed(&id)
                {
                    return Some(Frame::unsubscribe(id));
                }
                None
            }
            Waiter::Restore { subscription } => {
                tracing::debug!(%subscription, "subscription restored");
                None
            }
        }
    }

    /// Answers a caller's failed request; a SUBSCRIBE among them leaves no
    /// subscription behind. Returns the id of a subscription it forgot.
    fn caller_failed(
        &mut self,
        reply: Reply,
        subscription: Option<String>,
        error: Error,
    ) -> Option<String> {
        let _ = reply.send(Err(error));
        subscription.filter(|id| self.session.unsubscribed(id))
    }

    /// An ERROR named a receipt: that request failed. A refused SUBSCRIBE
    /// leaves nothing behind to restore.
    fn rejected(&mut self, waiter: Waiter, error: BrokerError) {
        match waiter {
            Waiter::Caller {
                reply,
                subscription,
            } => {
                self.caller_failed(reply, subscription, Error::Rejected(error));
            }
            Waiter::Restore { subscription } => {
                tracing::error!(%subscription, %error, "the broker refused to restore a subscription; it ends");
                self.session.unsubscribed(&subscription);
            }
        }
    }

    async fn handle(
        &mut self,
        conn: &mut Conn,
        request: Request,
        written: &mut Vec<Reply>,
    ) -> Result<(), Ended> {
        let Some(request) = self.current(request) else {
            return Ok(());
        };
        // A frame this connection cannot carry fails its own request, never
        // the connection or the client.
        let unencodable = match &request {
            Request::Confirmed { frame, .. }
            | Request::Written { frame, .. }
            | Request::Queued { frame, .. } => {
                crate::codec::encodable(conn.codec().version(), frame).err()
            }
            _ => None,
        };
        if let Some(error) = unencodable {
            if let Request::Queued { what, .. } = request {
                // Nobody waits for it, and its transaction must not commit
                // without it: the connection ends, so the broker aborts it.
                tracing::warn!(what, %error, "a queued frame cannot be encoded; ending the connection");
                return Err(Ended::Lost(Error::Unencodable(error)));
            }
            request.fail(Error::Unencodable(error));
            return Ok(());
        }
        let Some(request) = self.still_wanted(conn, request, written).await? else {
            return Ok(());
        };
        let frame = match request {
            Request::Confirmed {
                frame,
                receipt,
                reply,
                deadline,
                ..
            } => {
                let waiter = Waiter::Caller {
                    reply,
                    subscription: None,
                };
                self.session
                    .expect_receipt(frame, receipt, waiter, deadline)
            }
            Request::Written { frame, reply, .. } => {
                written.push(reply);
                frame
            }
            Request::Queued { frame, .. } => frame,
            Request::Subscribe {
                id,
                frame,
                sink,
                receipt,
                reply,
                deadline,
            } => {
                self.session.subscribed(&id, &frame, sink);
                let waiter = Waiter::Caller {
                    reply,
                    subscription: Some(id),
                };
                self.session
                    .expect_receipt(frame, receipt, waiter, deadline)
            }
            Request::Unsubscribe { id } => {
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
        self.write(conn, frame).await
    }

    /// Waits until the write buffer has room for a caller's frame (for a
    /// COMMIT: until everything before it is written), then looks at the
    /// caller once more, so what is checked is what gets written: a request
    /// whose caller has gone or whose deadline passed is withdrawn and never
    /// written (`None`). A withdrawn COMMIT is replaced by an ABORT of its
    /// transaction: its SENDs may be at the broker already, and must not stay
    /// open there for the rest of the connection.
    async fn still_wanted(
        &mut self,
        conn: &mut Conn,
        request: Request,
        written: &mut Vec<Reply>,
    ) -> Result<Option<Request>, Ended> {
        if request.reply().is_none() {
            return Ok(Some(request));
        }
        if request.commits() {
            self.flush(conn, written).await?;
        } else {
            self.ready(conn).await?;
        }
        let late = request.deadline().is_some_and(|d| d <= Instant::now());
        if !late && !request.abandoned() {
            return Ok(Some(request));
        }
        let abort = request.commits().then(|| request.transaction()).flatten();
        tracing::debug!(
            late,
            transaction = abort.as_deref(),
            "request withdrawn before it was written"
        );
        if late {
            request.fail(Error::Withdrawn {
                waited: self.shared.config.receipt_timeout,
            });
        }
        if let Some(id) = abort {
            self.write(conn, Frame::abort(id)).await?;
        }
        Ok(None)
    }

    /// Waits until the connection's write buffer takes another frame.
    async fn ready(&mut self, conn: &mut Conn) -> Result<(), Ended> {
        let ready = std::future::poll_fn(|cx| {
            futures_util::Sink::<Frame>::poll_ready(std::pin::Pin::new(&mut *conn), cx)
        });
        match guarded(ready, &self.progress, self.stall).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.write_failed(conn, e).await),
        }
    }

    async fn write(&mut self, conn: &mut Conn, frame: Frame) -> Result<(), Ended> {
        match guarded(conn.feed(frame), &self.progress, self.stall).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.write_failed(conn, e).await),
        }
    }

    async fn flush(&mut self, conn: &mut Conn, written: &mut Vec<Reply>) -> Result<(), Ended> {
        let flushed = guarded(SinkExt::<Frame>::flush(conn), &self.progress, self.stall).await;
        match flushed {
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
                Err(self.write_failed(conn, e).await)
            }
        }
    }

    fn write_error(&self, failure: WriteFailure) -> Error {
        match failure {
            WriteFailure::Stalled => Error::WriteStalled {
                addr: self.addr.clone(),
                after: self.stall,
            },
            WriteFailure::Codec(CodecError::Io(source)) => Error::Write {
                addr: self.addr.clone(),
                source,
            },
            WriteFailure::Codec(other) => Error::Codec(other),
        }
    }

    /// Why a failed write ends the connection. A broker that refuses a frame
    /// writes an ERROR and closes, so a write may fail before that ERROR is
    /// read: look for it briefly before calling the connection lost.
    async fn write_failed(&mut self, conn: &mut Conn, failure: WriteFailure) -> Ended {
        let socket = matches!(failure, WriteFailure::Codec(CodecError::Io(_)));
        let encoding =
            matches!(failure, WriteFailure::Codec(ref e) if !matches!(e, CodecError::Io(_)));
        let error = self.write_error(failure);
        if encoding {
            // A frame we could not encode is the caller's mistake, but its reply is
            // already registered; closing is the only safe answer.
            return Ended::Fatal(error);
        }
        if socket && let Some(refusal) = self.last_words(conn).await {
            self.note_refusal(refusal);
        }
        self.ended(error)
    }

    /// Reads what the broker sent before it closed: receipts still count, an
    /// ERROR without a receipt id is returned. Messages are left to redelivery.
    async fn last_words(&mut self, conn: &mut Conn) -> Option<BrokerError> {
        let read = async {
            while let Some(Ok(item)) = conn.next().await {
                let Received::Frame(frame) = item else {
                    continue;
                };
                if !matches!(frame.command(), Command::Receipt | Command::Error) {
                    continue;
                }
                match self.session.on_frame(frame) {
                    Inbound::Confirmed(waiter) => {
                        self.confirmed(waiter);
                    }
                    Inbound::Rejected(waiter, error) => self.rejected(waiter, error),
                    Inbound::Fatal(error) => return Some(error),
                    _ => {}
                }
            }
            None
        };
        tokio::time::timeout(LAST_WORDS, read).await.ok().flatten()
    }

    /// DISCONNECT with a receipt, waiting briefly for it.
    async fn goodbye(&mut self, conn: &mut Conn) -> Ended {
        let frame = Frame::disconnect().with_header("receipt", "disconnect");
        let wait_for = self
            .shared
            .config
            .receipt_timeout
            .min(Duration::from_secs(5));
        if guarded(conn.send(frame), &self.progress, self.stall)
            .await
            .is_ok()
        {
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
            let _ = tokio::time::timeout(wait_for, wait).await;
        }
        let shutdown = tokio::io::AsyncWriteExt::shutdown(conn.get_mut());
        let _ = tokio::time::timeout(wait_for, shutdown).await;
        Ended::Closed
    }
}

/// Room for a parked message.
enum Room {
    /// In its subscription's queue (client acks): offer it again.
    Queue,
    /// In its subscription's stream: its share of the byte budget and a
    /// place in the channel.
    Stream(Option<Charge>, mpsc::OwnedPermit<Message>),
}

/// Waits for room for the parked message: in its subscription's queue where
/// it has one, else its share of the byte budget and a place in its
/// subscription's channel.
async fn room(parked: &Option<(Sink, Message)>) -> Result<Room, ()> {
    match parked {
        Some((sink, message)) if sink.is_queued() => {
            sink.queue_room(message).await?;
            Ok(Room::Queue)
        }
        Some((sink, message)) => {
            let (charge, slot) = sink.room(message).await?;
            Ok(Room::Stream(charge, slot))
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
