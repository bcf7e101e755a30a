//! Session rules without IO: receipts, subscriptions, acks, heart-beat
//! bookkeeping and the blame for a connection's end. The connection's event
//! loop feeds it frames, requests and the clock; the session decides, and
//! returns a [`Reaction`]: what to write, whom to answer, what to deliver.
//! It never awaits, so every rule is tested here without a broker.
//!
//! ```text
//!  request ──► request()/subscribe(): receipt header, pending[receipt-id] ──┬─ RECEIPT ───► answer Ok
//!                                                                          ├─ ERROR(id) ─► answer Rejected; a refused
//!                                                                          │               SUBSCRIBE leaves nothing
//!                                                                          ├─ expire() ──► answer ReceiptTimeout; an
//!                                                                          │               unconfirmed SUBSCRIBE is
//!                                                                          │               UNSUBSCRIBEd
//!                                                                          └─ end() ─────► answer ConnectionLost, or
//!                                                                                          Broker(refusal)
//!  ERROR without a matching receipt-id ──► noted; a close right after it is a refusal (see `end`)
//!  MESSAGE ──► deliver to its subscription's sink (unknown subscription: dropped)
//!  any other server frame ──► SessionError::UnexpectedFrame
//! ```
//!
//! Waiters of a subscription the session restores after a reconnect are its
//! own: a refused restore ends that subscription, a lost one is restored
//! again on the next connection, an unanswered one is kept.

mod ack;
mod end;
mod heart_beat;
mod reaction;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use crate::codec::{Command, Frame, Version};
use crate::error::{BrokerError, Error, SessionError};

pub(crate) use ack::AckId;
pub(crate) use end::{Ended, LAST_WORDS, Refusals};
pub(crate) use heart_beat::{HeartBeat, Timer, negotiate_heart_beat};
pub(crate) use reaction::{Answer, Delivery, Reaction};

use heart_beat::Clock;

/// Who waits for a receipt.
#[derive(Debug)]
enum Waiter<T> {
    /// A caller; for a SUBSCRIBE, the id of the subscription it creates.
    Caller {
        caller: T,
        subscription: Option<String>,
    },
    /// A subscription the session restored after a reconnect.
    Restore { subscription: String },
}

/// One client's protocol state across its connections. `T` is a caller
/// waiting for an answer; `S` is where a subscription's messages go.
#[derive(Debug)]
pub(crate) struct Session<T, S> {
    version: Version,
    /// Receipt id → who waits for it, and until when.
    pending: HashMap<String, (Waiter<T>, Instant)>,
    /// Subscription id → its SUBSCRIBE frame (re-sent after a reconnect) and sink.
    subscriptions: BTreeMap<String, (Frame, S)>,
    clock: Clock,
    refusals: Refusals,
}

impl<T, S> Session<T, S> {
    pub(crate) fn new(now: Instant) -> Session<T, S> {
        Session {
            version: Version::V1_2,
            pending: HashMap::new(),
            subscriptions: BTreeMap::new(),
            clock: Clock::new(now),
            refusals: Refusals::default(),
        }
    }

    /// Takes the server's CONNECTED frame; returns the negotiated version.
    pub(crate) fn connected(
        &mut self,
        frame: &Frame,
        asked: &[Version],
        heart_beat: (u64, u64),
        grace: f64,
        now: Instant,
    ) -> Result<Version, SessionError> {
        let version = match frame.header("version") {
            // A 1.0 server sends no version header.
            None => Version::V1_0,
            Some(v) => {
                Version::parse(v).ok_or_else(|| SessionError::UnknownVersion(v.to_owned()))?
            }
        };
        if !asked.contains(&version) {
            return Err(SessionError::VersionNotOffered(version));
        }
        self.version = version;
        let heart_beat = negotiate_heart_beat(heart_beat, frame.header("heart-beat"), grace);
        self.clock.start(heart_beat, now);
        Ok(version)
    }

    /// The negotiated heart-beats of the current connection.
    pub(crate) fn heart_beat(&self) -> HeartBeat {
        self.clock.heart_beat
    }

    /// A caller's frame that asks for a receipt: adds the `receipt` header
    /// and remembers `caller` until the broker answers or `deadline` passes.
    pub(crate) fn request(
        &mut self,
        frame: Frame,
        receipt: String,
        caller: T,
        deadline: Instant,
    ) -> Frame {
        let waiter = Waiter::Caller {
            caller,
            subscription: None,
        };
        self.expect_receipt(frame, receipt, waiter, deadline)
    }

    /// A caller's SUBSCRIBE: the subscription exists from now on (its
    /// messages may come before the receipt), and ends again unless the
    /// broker confirms it by `deadline`.
    pub(crate) fn subscribe(
        &mut self,
        id: String,
        frame: Frame,
        sink: S,
        receipt: String,
        caller: T,
        deadline: Instant,
    ) -> Frame {
        self.subscriptions.insert(id.clone(), (frame.clone(), sink));
        let waiter = Waiter::Caller {
            caller,
            subscription: Some(id),
        };
        self.expect_receipt(frame, receipt, waiter, deadline)
    }

    fn expect_receipt(
        &mut self,
        frame: Frame,
        receipt: String,
        waiter: Waiter<T>,
        deadline: Instant,
    ) -> Frame {
        let frame = frame.with_header("receipt", receipt.clone());
        self.pending.insert(receipt, (waiter, deadline));
        frame
    }

    /// A user ends a subscription: the UNSUBSCRIBE to write, or `None` when
    /// the session knows no such subscription.
    pub(crate) fn unsubscribe(&mut self, id: String) -> Option<Frame> {
        self.forget(&id).then(|| Frame::unsubscribe(id))
    }

    /// Forgets a subscription (and drops its sink); false if it was unknown.
    pub(crate) fn forget(&mut self, id: &str) -> bool {
        self.subscriptions.remove(id).is_some()
    }

    /// The caller of a confirmed SUBSCRIBE could not be answered: it gave up
    /// meanwhile, so the subscription ends at once (the UNSUBSCRIBE to write).
    pub(crate) fn caller_gone(&mut self, subscription: String) -> Option<Frame> {
        self.unsubscribe(subscription)
    }

    /// The stream of a subscription is gone: it ends (the UNSUBSCRIBE to write).
    pub(crate) fn stream_gone(&mut self, subscription: String) -> Frame {
        self.forget(&subscription);
        Frame::unsubscribe(subscription)
    }

    /// Keeps only the subscriptions whose sink passes `keep`.
    pub(crate) fn retain_subscriptions(&mut self, mut keep: impl FnMut(&S) -> bool) {
        self.subscriptions.retain(|_, (_, sink)| keep(sink));
    }

    /// The SUBSCRIBE frames to send on a fresh connection, each with a
    /// receipt (`receipt` names it after the subscription id) that is
    /// awaited until `deadline`: a refused one ends that subscription
    /// instead of the connection.
    pub(crate) fn restore(
        &mut self,
        mut receipt: impl FnMut(&str) -> String,
        deadline: Instant,
    ) -> Vec<Frame> {
        let frames: Vec<(String, Frame)> = self
            .subscriptions
            .iter()
            .map(|(id, (frame, _))| (id.clone(), frame.clone()))
            .collect();
        frames
            .into_iter()
            .map(|(id, frame)| {
                let receipt = receipt(&id);
                let waiter = Waiter::Restore { subscription: id };
                self.expect_receipt(frame, receipt, waiter, deadline)
            })
            .collect()
    }

    /// What a frame from the server calls for. `now` dates an ERROR that
    /// names no request (see [`Session::broke`]).
    pub(crate) fn on_frame(
        &mut self,
        frame: Frame,
        now: Instant,
    ) -> Result<Reaction<T, S>, SessionError>
    where
        S: Clone,
    {
        let mut reaction = Reaction::none();
        match frame.command() {
            Command::Message => reaction.deliver = self.delivery(frame),
            Command::Receipt => {
                // A receipt for nothing we wait on (e.g. after its caller
                // timed out) is ignored.
                let waiter = frame
                    .header("receipt-id")
                    .and_then(|id| self.pending.remove(id));
                if let Some((waiter, _)) = waiter {
                    self.confirmed(waiter, &mut reaction);
                }
            }
            Command::Error => {
                let error = BrokerError::from_frame(&frame);
                let waiter = error
                    .receipt_id
                    .as_deref()
                    .and_then(|id| self.pending.remove(id));
                match waiter {
                    Some((waiter, _)) => self.rejected(waiter, error, &mut reaction),
                    None => {
                        tracing::warn!(%error, "ERROR frame from the broker that names no request");
                        self.refusals.note(error, now);
                        reaction.unsolicited_error = true;
                    }
                }
            }
            other => return Err(SessionError::UnexpectedFrame(other)),
        }
        Ok(reaction)
    }

    fn delivery(&self, frame: Frame) -> Option<Delivery<S>>
    where
        S: Clone,
    {
        let subscription = frame.header("subscription").unwrap_or_default().to_owned();
        let Some((_, sink)) = self.subscriptions.get(&subscription) else {
            tracing::debug!(%subscription, "message for an unknown subscription dropped");
            return None;
        };
        Some(Delivery {
            sink: sink.clone(),
            ack: AckId::of(self.version, &subscription, &frame),
            subscription,
            frame,
        })
    }

    /// A receipt arrived.
    fn confirmed(&mut self, waiter: Waiter<T>, reaction: &mut Reaction<T, S>) {
        match waiter {
            Waiter::Caller {
                caller,
                subscription,
            } => reaction.answers.push(Answer::ok(caller, subscription)),
            Waiter::Restore { subscription } => {
                tracing::debug!(%subscription, "subscription restored");
            }
        }
    }

    /// An ERROR named a receipt: that request failed. A refused SUBSCRIBE
    /// leaves nothing behind to restore.
    fn rejected(&mut self, waiter: Waiter<T>, error: BrokerError, reaction: &mut Reaction<T, S>) {
        match waiter {
            Waiter::Caller {
                caller,
                subscription,
            } => {
                let answer = self.failed(caller, subscription, Error::Rejected(error));
                reaction.answers.push(answer);
            }
            Waiter::Restore { subscription } => {
                tracing::error!(%subscription, %error, "the broker refused to restore a subscription; it ends");
                self.forget(&subscription);
            }
        }
    }

    /// A caller's request failed; a SUBSCRIBE among them leaves no
    /// subscription behind.
    fn failed(&mut self, caller: T, subscription: Option<String>, error: Error) -> Answer<T> {
        if let Some(id) = subscription {
            self.forget(&id);
        }
        Answer::failed(caller, error)
    }

    /// Gives up the receipts whose deadline passed at `now` (`after` is the
    /// receipt timeout they were given). A SUBSCRIBE given up on may yet be
    /// confirmed by the broker: it is ended there too.
    pub(crate) fn expire(&mut self, now: Instant, after: Duration) -> Reaction<T, S> {
        let due: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        let mut reaction = Reaction::none();
        for receipt in due {
            let Some((waiter, _)) = self.pending.remove(&receipt) else {
                continue;
            };
            match waiter {
                Waiter::Caller {
                    caller,
                    subscription,
                } => {
                    if let Some(id) = subscription.as_deref()
                        && self.forget(id)
                    {
                        reaction.write.push(Frame::unsubscribe(id.to_owned()));
                    }
                    let timeout = Error::ReceiptTimeout { receipt, after };
                    reaction.answers.push(Answer::failed(caller, timeout));
                }
                Waiter::Restore { subscription } => {
                    tracing::warn!(%subscription, "no receipt for a restored subscription; keeping it");
                }
            }
        }
        reaction
    }

    /// The connection broke with `error`: a refusal if the broker closed it
    /// right after an ERROR that named no request, else a lost connection.
    pub(crate) fn broke(&mut self, error: Error, now: Instant) -> Ended {
        self.refusals.broke(error, now)
    }

    /// Connection `epoch` ended as `ended`: every request waiting for a
    /// receipt on it fails (outcome unknown: [`Error::ConnectionLost`], or
    /// the refusal it was closed with), a subscription whose SUBSCRIBE was
    /// not confirmed is forgotten, and restored ones wait for the next
    /// connection.
    pub(crate) fn end(&mut self, epoch: u64, ended: &Ended) -> Vec<Answer<T>> {
        self.refusals.ended(epoch, ended);
        let error = || match ended {
            Ended::Refused(refusal) => Error::Broker(refusal.clone()),
            _ => Error::ConnectionLost,
        };
        let waiters: Vec<Waiter<T>> = self.pending.drain().map(|(_, (w, _))| w).collect();
        waiters
            .into_iter()
            .filter_map(|waiter| match waiter {
                Waiter::Caller {
                    caller,
                    subscription,
                } => Some(self.failed(caller, subscription, error())),
                // Restored again on the next connection.
                Waiter::Restore { .. } => None,
            })
            .collect()
    }

    /// A fresh connection could not be taken into use: its receipts are moot.
    pub(crate) fn abandon_receipts(&mut self) {
        self.pending.clear();
    }

    /// The error for a request (`what`) of connection `epoch`, which is gone.
    pub(crate) fn stale(&self, epoch: u64, what: &'static str) -> Error {
        self.refusals.stale(epoch, what)
    }

    /// Bytes arrived.
    pub(crate) fn on_read(&mut self, now: Instant) {
        self.clock.read(now);
    }

    /// Bytes were written.
    pub(crate) fn on_write(&mut self, now: Instant) {
        self.clock.wrote(now);
    }

    /// Restarts the read clock, e.g. after the client itself stopped reading.
    pub(crate) fn reset_read_clock(&mut self, now: Instant) {
        self.clock.read(now);
    }

    /// When the next timer is due, if any.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.clock.next_deadline()
    }

    /// What is due at `now`.
    pub(crate) fn poll_timers(&self, now: Instant) -> Timer {
        self.clock.poll(now)
    }

    /// What is due at `now` while the client reads the socket (`reading`) or
    /// not: a peer is silent only for as long as the client read; while the
    /// client itself holds back, the read clock starts again instead.
    pub(crate) fn on_timer(&mut self, now: Instant, reading: bool) -> Timer {
        match self.poll_timers(now) {
            Timer::PeerSilent(_) if !reading => {
                self.reset_read_clock(now);
                Timer::Idle
            }
            due => due,
        }
    }
}
