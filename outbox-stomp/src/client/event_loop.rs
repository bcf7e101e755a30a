//! The one task that owns the socket: it `select!`s over the network, the
//! requests of the [`Client`] handles, the heart-beat deadline and a sweep
//! timer, and reconnects when the connection is lost. What a frame, a timer
//! or the end of a connection calls for is the session's decision (a
//! [`Reaction`]); the loop does the IO: it writes, answers and delivers.
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

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::backlog::Backlog;
use super::connection::{Connection, WriteFailure};
use super::connector::{Connector, Handshake, Phase, Standby, closed_by_peer, link_error};
use super::delivery::{Blocked, Offer, offer, room};
use super::sink::Sink;
use super::{Client, Reply, Request, ServerInfo, Shared};
use crate::codec::{Frame, Received};
use crate::error::{CodecError, Error};
use crate::session::{Answer, Ended, Reaction, Session, Timer};

pub(crate) struct EventLoop {
    rx: mpsc::Receiver<Request>,
    /// For the handles inside delivered messages; weak so that the loop ends
    /// when the user drops every handle.
    handle: mpsc::WeakSender<Request>,
    shared: Arc<Shared>,
    session: Session<Reply, Sink>,
    /// Requests that arrived while disconnected, for the next connection.
    backlog: Backlog,
    /// A message its subscription had no room for: the socket is not read
    /// until it has.
    blocked: Option<Blocked>,
}

impl EventLoop {
    pub(crate) fn new(
        rx: mpsc::Receiver<Request>,
        handle: mpsc::WeakSender<Request>,
        shared: Arc<Shared>,
    ) -> EventLoop {
        EventLoop {
            rx,
            handle,
            session: Session::new(Instant::now()),
            backlog: Backlog::new(shared.clone()),
            blocked: None,
            shared,
        }
    }

    fn epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::Acquire)
    }

    fn sweep_every(&self) -> Duration {
        super::sweep_every(&self.shared.config)
    }

    /// Serves connection after connection until the client closes or
    /// cannot reconnect.
    pub(crate) async fn run(mut self, mut connector: Connector, first: Connection) {
        let shared = self.shared.clone();
        let mut conn = first;
        let error = loop {
            let ended = self.serve(&mut conn).await;
            self.shared.connected.store(false, Ordering::Release);
            connector.ended(matches!(ended, Ended::Lost(Error::Codec(_))));
            let answers = self.session.end(self.epoch(), &ended);
            // The epoch moves on before any waiter is answered, so a caller
            // that starts again at once belongs to the next connection.
            self.shared.epoch.fetch_add(1, Ordering::AcqRel);
            answer(&mut self.session, answers);
            match ended {
                Ended::Closed => break None,
                Ended::Fatal(e) => break Some(e),
                Ended::Lost(e) => {
                    tracing::warn!(error = %e, "STOMP connection lost; reconnecting");
                }
                Ended::Refused(e) => {
                    tracing::warn!(error = %e, "broker refused a frame and closed the connection; reconnecting");
                }
            }
            match connector
                .connect(Phase::Reconnect, &shared.config, &mut self)
                .await
            {
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
        self.backlog.fail_all(|| Error::Closed);
    }

    /// Handles a request while disconnected; returns true when asked to close.
    fn offline(&mut self, request: Request) -> bool {
        let Some(request) = self.current(request) else {
            return false;
        };
        match request {
            Request::Unsubscribe { id } => {
                self.session.forget(&id);
            }
            Request::Disconnect { reply } => {
                let _ = reply.send(Ok(()));
                return true;
            }
            other => self.backlog.push(other),
        }
        false
    }

    /// Sends the SUBSCRIBE frames of the live subscriptions again, each with a
    /// receipt: a refused one ends that subscription instead of the connection.
    async fn restore(&mut self, conn: &mut Connection) -> Result<(), Error> {
        let deadline = Instant::now() + self.shared.config.receipt_timeout;
        // A subscription whose stream is gone needs no restoring.
        self.session.retain_subscriptions(|sink| !sink.is_closed());
        let shared = &self.shared;
        let frames = self.session.restore(
            |id| format!("restore-{id}-{}", shared.next_number()),
            deadline,
        );
        for frame in frames {
            if let Err(e) = conn.feed(frame).await {
                return Err(conn.error(e));
            }
        }
        conn.flush().await.map_err(|e| conn.error(e))
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
                let _ = reply.send(Err(self.session.stale(e, what)));
                None
            }
            Request::Queued { epoch: e, what, .. } if e != epoch => {
                tracing::trace!(what, "frame of a lost connection dropped");
                None
            }
            other => Some(other),
        }
    }

    /// Serves one connection until it ends.
    async fn serve(&mut self, conn: &mut Connection) -> Ended {
        let ended = self.serve_until_ended(conn).await;
        conn.forget_written();
        self.blocked = None;
        ended
    }

    async fn serve_until_ended(&mut self, conn: &mut Connection) -> Ended {
        if let Err(ended) = self.serve_backlog(conn).await {
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
                room = room(&self.blocked), if self.blocked.is_some() => {
                    if let (Some(blocked), Ok(room)) = (self.blocked.take(), room) {
                        self.blocked = blocked.place(room);
                    }
                    // The client, not the broker, was the slow one.
                    self.session.reset_read_clock(Instant::now());
                    Ok(())
                }
                request = self.rx.recv() => match request {
                    Some(request) => self.serve_requests(conn, request).await,
                    None => return self.goodbye(conn).await,
                },
                item = conn.next(), if self.blocked.is_none() => {
                    self.serve_inbound(conn, item).await
                }
                _ = sleep_until(deadline), if deadline.is_some() => {
                    self.serve_timers(conn).await
                }
                _ = &mut sweep => {
                    let now = Instant::now();
                    sweep.as_mut().reset(now + self.sweep_every());
                    let after = self.shared.config.receipt_timeout;
                    let expired = self.session.expire(now, after);
                    self.apply(conn, expired).await
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
    async fn serve_backlog(&mut self, conn: &mut Connection) -> Result<(), Ended> {
        self.backlog.sweep(Instant::now());
        while let Some(request) = self.backlog.pop() {
            self.handle(conn, request).await?;
        }
        self.flush(conn).await
    }

    /// `first` and whatever else is queued, batched into the same write.
    async fn serve_requests(&mut self, conn: &mut Connection, first: Request) -> Result<(), Ended> {
        let mut next = Some(first);
        let mut batched = 0;
        while let Some(request) = next.take() {
            self.handle(conn, request).await?;
            batched += 1;
            if batched < 1024 {
                next = self.rx.try_recv().ok();
            }
        }
        self.flush(conn).await
    }

    /// A frame or a heart-beat from the broker, or the end of the link.
    async fn serve_inbound(
        &mut self,
        conn: &mut Connection,
        item: Option<Result<Received, CodecError>>,
    ) -> Result<(), Ended> {
        let now = Instant::now();
        let frame = match item {
            None => return Err(self.session.broke(closed_by_peer(conn.addr(), ""), now)),
            Some(Err(e)) => return Err(self.session.broke(link_error(conn.addr(), e), now)),
            Some(Ok(Received::HeartBeat)) => {
                self.session.on_read(now);
                return Ok(());
            }
            Some(Ok(Received::Frame(frame))) => frame,
        };
        self.session.on_read(now);
        match self.session.on_frame(frame, now) {
            Ok(reaction) => self.apply(conn, reaction).await,
            Err(e) => Err(Ended::Lost(Error::Protocol(e))),
        }
    }

    /// Heart-beats: the broker silent too long, or one of ours due.
    async fn serve_timers(&mut self, conn: &mut Connection) -> Result<(), Ended> {
        let now = Instant::now();
        match self.session.on_timer(now, self.blocked.is_none()) {
            Timer::PeerSilent(after) => Err(Ended::Lost(Error::HeartBeatTimeout(after))),
            Timer::SendHeartBeat => {
                if let Err(e) = conn.heart_beat().await {
                    return Err(self.write_failed(conn, e).await);
                }
                self.session.on_write(now);
                Ok(())
            }
            Timer::Idle => Ok(()),
        }
    }

    /// Carries out what the session decided: answers its callers, hands its
    /// message to the subscription, and writes its frames.
    async fn apply(
        &mut self,
        conn: &mut Connection,
        reaction: Reaction<Reply, Sink>,
    ) -> Result<(), Ended> {
        let Reaction {
            mut write,
            answers,
            deliver,
            ..
        } = reaction;
        write.extend(answer(&mut self.session, answers));
        // Every user handle is gone: nobody can ack, the broker redelivers.
        if let Some(delivery) = deliver
            && let Some(tx) = self.handle.upgrade()
        {
            let client = Client {
                tx,
                shared: self.shared.clone(),
            };
            match offer(delivery, client, self.epoch()) {
                Offer::Taken => {}
                Offer::Blocked(blocked) => self.blocked = Some(*blocked),
                Offer::StreamGone(id) => write.push(self.session.stream_gone(id)),
            }
        }
        if write.is_empty() {
            return Ok(());
        }
        for frame in write {
            self.write(conn, frame).await?;
        }
        self.flush(conn).await
    }

    async fn handle(&mut self, conn: &mut Connection, request: Request) -> Result<(), Ended> {
        let Some(request) = self.current(request) else {
            return Ok(());
        };
        let Some(request) = encodable(conn, request)? else {
            return Ok(());
        };
        let Some(request) = self.still_wanted(conn, request).await? else {
            return Ok(());
        };
        let frame = match request {
            Request::Confirmed {
                frame,
                receipt,
                reply,
                deadline,
                ..
            } => self.session.request(frame, receipt, reply, deadline),
            Request::Written { frame, reply, .. } => {
                conn.answer_when_flushed(reply);
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
            } => self
                .session
                .subscribe(id, frame, sink, receipt, reply, deadline),
            Request::Unsubscribe { id } => match self.session.unsubscribe(id) {
                Some(frame) => frame,
                None => return Ok(()),
            },
            Request::Disconnect { reply } => {
                let _ = self.flush(conn).await;
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
        conn: &mut Connection,
        request: Request,
    ) -> Result<Option<Request>, Ended> {
        if request.reply().is_none() {
            return Ok(Some(request));
        }
        if request.commits() {
            self.flush(conn).await?;
        } else if let Err(e) = conn.ready().await {
            return Err(self.write_failed(conn, e).await);
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

    async fn write(&mut self, conn: &mut Connection, frame: Frame) -> Result<(), Ended> {
        match conn.feed(frame).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.write_failed(conn, e).await),
        }
    }

    async fn flush(&mut self, conn: &mut Connection) -> Result<(), Ended> {
        match conn.flush().await {
            Ok(()) => {
                self.session.on_write(Instant::now());
                Ok(())
            }
            Err(e) => Err(self.write_failed(conn, e).await),
        }
    }

    /// Why a failed write ends the connection. A broker that refuses a frame
    /// writes an ERROR and closes, so a write may fail before that ERROR is
    /// read: look for it briefly before calling the connection lost.
    async fn write_failed(&mut self, conn: &mut Connection, failure: WriteFailure) -> Ended {
        let socket = matches!(failure, WriteFailure::Codec(CodecError::Io(_)));
        let encoding =
            matches!(failure, WriteFailure::Codec(ref e) if !matches!(e, CodecError::Io(_)));
        let error = conn.error(failure);
        if encoding {
            // A frame we could not encode is the caller's mistake, but its reply is
            // already registered; closing is the only safe answer.
            return Ended::Fatal(error);
        }
        if socket {
            // Receipts still count; an ERROR without a receipt id is the
            // refusal the broker closed over.
            let session = &mut self.session;
            conn.last_words(|frame| match session.on_frame(frame, Instant::now()) {
                Ok(reaction) => {
                    // The connection is gone: nothing more is written.
                    let _ = answer(session, reaction.answers);
                    reaction.unsolicited_error
                }
                Err(_) => false,
            })
            .await;
        }
        self.session.broke(error, Instant::now())
    }

    /// DISCONNECT with a receipt, waiting briefly for it.
    async fn goodbye(&mut self, conn: &mut Connection) -> Ended {
        let wait_for = self
            .shared
            .config
            .receipt_timeout
            .min(Duration::from_secs(5));
        conn.goodbye(wait_for).await;
        Ended::Closed
    }
}

impl Standby for EventLoop {
    async fn serve_one(&mut self, tick: Instant) -> bool {
        tokio::select! {
            request = self.rx.recv() => match request {
                None => true,
                Some(request) => self.offline(request),
            },
            _ = tokio::time::sleep_until(tick) => {
                self.backlog.sweep(Instant::now());
                false
            }
        }
    }

    /// Negotiation, bookkeeping, restored subscriptions.
    async fn open(&mut self, handshake: Handshake) -> Result<Connection, Error> {
        let shared = self.shared.clone();
        let config = &shared.config;
        let Handshake {
            mut framed,
            connected,
            progress,
            addr,
        } = handshake;
        let version = self.session.connected(
            &connected,
            &config.versions,
            config.heart_beat_ms(),
            config.heart_beat_grace,
            Instant::now(),
        )?;
        framed.codec_mut().set_version(version);
        let stall = config
            .write_timeout
            .or(self.session.heart_beat().read_timeout)
            .unwrap_or(config.receipt_timeout);
        let mut conn = Connection::new(framed, progress, addr, stall);
        let info = ServerInfo {
            version,
            server: connected.header("server").map(str::to_owned),
            session: connected.header("session").map(str::to_owned),
            heart_beat: connected.header("heart-beat").map(str::to_owned),
            addr: conn.addr().to_owned(),
        };
        tracing::debug!(addr = %conn.addr(), %version, "STOMP session open");
        if let Err(e) = self.restore(&mut conn).await {
            self.session.abandon_receipts();
            return Err(e);
        }
        if let Ok(mut slot) = self.shared.info.lock() {
            *slot = Some(info);
        }
        self.shared.connected.store(true, Ordering::Release);
        Ok(conn)
    }
}

/// Answers the callers; returns the UNSUBSCRIBE frames of confirmed
/// subscriptions whose caller had gone meanwhile.
fn answer(session: &mut Session<Reply, Sink>, answers: Vec<Answer<Reply>>) -> Vec<Frame> {
    answers
        .into_iter()
        .filter_map(|answer| {
            let gone = answer.caller.send(answer.result).is_err();
            let subscription = answer.subscription.filter(|_| gone)?;
            session.caller_gone(subscription)
        })
        .collect()
}

/// A frame this connection cannot carry fails its own request, never the
/// connection or the client: `None` once that request is answered.
fn encodable(conn: &Connection, request: Request) -> Result<Option<Request>, Ended> {
    let unencodable = match &request {
        Request::Confirmed { frame, .. }
        | Request::Written { frame, .. }
        | Request::Queued { frame, .. } => crate::codec::encodable(conn.version(), frame).err(),
        _ => None,
    };
    let Some(error) = unencodable else {
        return Ok(Some(request));
    };
    if let Request::Queued { what, .. } = request {
        // Nobody waits for it, and its transaction must not commit
        // without it: the connection ends, so the broker aborts it.
        tracing::warn!(what, %error, "a queued frame cannot be encoded; ending the connection");
        return Err(Ended::Lost(Error::Unencodable(error)));
    }
    request.fail(Error::Unencodable(error));
    Ok(None)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
