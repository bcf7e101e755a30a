//! Session rules without IO: receipts, subscriptions, acks and heart-beat
//! bookkeeping. The connection's event loop feeds it frames and the clock and
//! writes whatever it returns.
//!
//! ```text
//!  request ──► stamp(receipt?) ──► pending[receipt-id] ──┬─ RECEIPT ─────► Confirmed(token)
//!                                                        ├─ ERROR(id) ───► Rejected(token, error)
//!                                                        └─ conn lost ───► drain(): outcome unknown
//!  ERROR without a matching receipt-id ──► Fatal (the broker closes the socket after it)
//!  MESSAGE ──► Delivery(subscription id)
//! ```
//!
//! Heart-beats (STOMP §heart-beating): the client asks `cx,cy`; the server
//! answers `sx,sy`. The client writes at least every `max(cx, sy)` (we write at
//! half of that, because ActiveMQ enforces its read side with no slack) and
//! expects bytes at least every `max(sx, cy)`, times the grace factor.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use crate::codec::{Command, Frame, Version};
use crate::error::BrokerError;

/// Negotiated heart-beat intervals; `None` means off in that direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeartBeat {
    pub(crate) send_every: Option<Duration>,
    pub(crate) read_timeout: Option<Duration>,
}

/// Negotiates heart-beats from what we asked (`ours`, ms) and the server's header.
pub(crate) fn negotiate_heart_beat(
    ours: (u64, u64),
    theirs: Option<&str>,
    grace: f64,
) -> HeartBeat {
    let (sx, sy) = theirs
        .and_then(|h| {
            let (a, b) = h.split_once(',')?;
            Some((a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?))
        })
        .unwrap_or((0, 0));
    let (cx, cy) = ours;
    let send = (cx > 0 && sy > 0)
        .then(|| Duration::from_millis(cx.max(sy) / 2).max(Duration::from_millis(1)));
    let read = (sx > 0 && cy > 0)
        .then(|| Duration::from_millis(((sx.max(cy)) as f64 * grace.max(1.0)) as u64));
    HeartBeat {
        send_every: send,
        read_timeout: read,
    }
}

/// What an incoming frame means for the session.
#[derive(Debug)]
pub(crate) enum Inbound<T> {
    /// A MESSAGE for subscription `subscription`.
    Delivery { subscription: String, frame: Frame },
    /// The broker confirmed the request that stored `T`.
    Confirmed(T),
    /// The broker refused the request that stored `T`.
    Rejected(T, BrokerError),
    /// An ERROR that matches no request: the session is over.
    Fatal(BrokerError),
    /// A receipt for nothing we wait on (e.g. after its caller timed out).
    Ignored,
    /// A frame a server must not send now.
    Unexpected(Command),
}

/// Timer outcomes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Timer {
    /// Write a heart-beat EOL now.
    SendHeartBeat,
    /// Nothing arrived for longer than the read timeout.
    PeerSilent(Duration),
    /// Nothing due.
    Idle,
}

/// The ack identity of a delivered message, per version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AckId {
    pub(crate) version: Version,
    pub(crate) ack: Option<String>,
    pub(crate) message_id: Option<String>,
    pub(crate) subscription: String,
}

impl AckId {
    pub(crate) fn of(version: Version, subscription: &str, frame: &Frame) -> AckId {
        AckId {
            version,
            ack: frame.header("ack").map(str::to_owned),
            message_id: frame.header("message-id").map(str::to_owned),
            subscription: subscription.to_owned(),
        }
    }

    /// ACK or NACK: 1.2 uses the MESSAGE's `ack` value as `id`; 1.1 wants
    /// `message-id` and `subscription`; 1.0 only `message-id`.
    pub(crate) fn frame(&self, command: Command, transaction: Option<&str>) -> Frame {
        let mut frame = Frame::new(command);
        match self.version {
            Version::V1_2 => {
                let id = self
                    .ack
                    .clone()
                    .or_else(|| self.message_id.clone())
                    .unwrap_or_default();
                frame = frame.with_header("id", id);
            }
            Version::V1_1 => {
                frame = frame
                    .with_header("message-id", self.message_id.clone().unwrap_or_default())
                    .with_header("subscription", self.subscription.clone());
            }
            Version::V1_0 => {
                frame =
                    frame.with_header("message-id", self.message_id.clone().unwrap_or_default());
            }
        }
        if let Some(tx) = transaction {
            frame = frame.with_header("transaction", tx.to_owned());
        }
        frame
    }
}

/// One connection's protocol state. `T` is what a waiting caller is answered
/// with; `S` is where a subscription's messages go.
#[derive(Debug)]
pub(crate) struct Session<T, S> {
    version: Version,
    /// Receipt id → who waits for it, and until when.
    pending: HashMap<String, (T, Instant)>,
    /// Subscription id → its SUBSCRIBE frame (re-sent after a reconnect) and sink.
    subscriptions: BTreeMap<String, (Frame, S)>,
    heart_beat: HeartBeat,
    last_read: Instant,
    last_write: Instant,
}

impl<T, S> Session<T, S> {
    pub(crate) fn new(now: Instant) -> Session<T, S> {
        Session {
            version: Version::V1_2,
            pending: HashMap::new(),
            subscriptions: BTreeMap::new(),
            heart_beat: HeartBeat {
                send_every: None,
                read_timeout: None,
            },
            last_read: now,
            last_write: now,
        }
    }

    pub(crate) fn version(&self) -> Version {
        self.version
    }

    /// Takes the server's CONNECTED frame; returns the negotiated version.
    pub(crate) fn connected(
        &mut self,
        frame: &Frame,
        asked: &[Version],
        heart_beat: (u64, u64),
        grace: f64,
        now: Instant,
    ) -> Result<Version, String> {
        let version = match frame.header("version") {
            // A 1.0 server sends no version header.
            None => Version::V1_0,
            Some(v) => Version::parse(v)
                .ok_or_else(|| format!("server chose unknown STOMP version {v:?}"))?,
        };
        if !asked.contains(&version) {
            return Err(format!(
                "server chose STOMP {version}, which was not offered"
            ));
        }
        self.version = version;
        self.heart_beat = negotiate_heart_beat(heart_beat, frame.header("heart-beat"), grace);
        self.last_read = now;
        self.last_write = now;
        Ok(version)
    }

    /// The negotiated heart-beats of the current connection.
    pub(crate) fn heart_beat(&self) -> HeartBeat {
        self.heart_beat
    }

    /// Adds a `receipt` header and remembers `token` until it is answered or
    /// `deadline` passes.
    pub(crate) fn expect_receipt(
        &mut self,
        frame: Frame,
        id: String,
        token: T,
        deadline: Instant,
    ) -> Frame {
        let frame = frame.with_header("receipt", id.clone());
        self.pending.insert(id, (token, deadline));
        frame
    }

    /// Takes out the requests whose deadline passed at `now`, with their receipt ids.
    pub(crate) fn expired(&mut self, now: Instant) -> Vec<(String, T)> {
        let due: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        due.into_iter()
            .filter_map(|id| self.pending.remove(&id).map(|(t, _)| (id, t)))
            .collect()
    }

    /// Records a subscription so it is restored after a reconnect.
    pub(crate) fn subscribed(&mut self, id: &str, frame: &Frame, sink: S) {
        self.subscriptions
            .insert(id.to_owned(), (frame.clone(), sink));
    }

    /// Forgets a subscription (and drops its sink); false if it was unknown.
    pub(crate) fn unsubscribed(&mut self, id: &str) -> bool {
        self.subscriptions.remove(id).is_some()
    }

    /// Keeps only the subscriptions whose sink passes `keep`.
    pub(crate) fn retain_subscriptions(&mut self, mut keep: impl FnMut(&S) -> bool) {
        self.subscriptions.retain(|_, (_, sink)| keep(sink));
    }

    /// Where messages of subscription `id` go.
    pub(crate) fn sink(&self, id: &str) -> Option<&S> {
        self.subscriptions.get(id).map(|(_, sink)| sink)
    }

    /// Subscription ids and SUBSCRIBE frames to send on a fresh connection.
    pub(crate) fn resubscribe(&self) -> Vec<(String, Frame)> {
        self.subscriptions
            .iter()
            .map(|(id, (frame, _))| (id.clone(), frame.clone()))
            .collect()
    }

    /// Classifies a frame from the server.
    pub(crate) fn on_frame(&mut self, frame: Frame) -> Inbound<T> {
        match frame.command() {
            Command::Message => {
                let subscription = frame.header("subscription").unwrap_or_default().to_owned();
                Inbound::Delivery {
                    subscription,
                    frame,
                }
            }
            Command::Receipt => match frame
                .header("receipt-id")
                .and_then(|id| self.pending.remove(id))
            {
                Some((token, _)) => Inbound::Confirmed(token),
                None => Inbound::Ignored,
            },
            Command::Error => {
                let error = BrokerError::from_frame(&frame);
                match error
                    .receipt_id
                    .as_deref()
                    .and_then(|id| self.pending.remove(id))
                {
                    Some((token, _)) => Inbound::Rejected(token, error),
                    None => Inbound::Fatal(error),
                }
            }
            other => Inbound::Unexpected(other),
        }
    }

    /// The connection is gone: every waiting request's outcome is unknown.
    pub(crate) fn drain_pending(&mut self) -> Vec<T> {
        self.pending.drain().map(|(_, (t, _))| t).collect()
    }

    /// Number of requests waiting for a receipt.
    #[cfg(test)]
    pub(crate) fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Bytes arrived.
    pub(crate) fn on_read(&mut self, now: Instant) {
        self.last_read = now;
    }

    /// Bytes were written.
    pub(crate) fn on_write(&mut self, now: Instant) {
        self.last_write = now;
    }

    /// Restarts the read clock, e.g. after the client itself stopped reading.
    pub(crate) fn reset_read_clock(&mut self, now: Instant) {
        self.last_read = now;
    }

    /// When the next timer is due, if any.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let send = self.heart_beat.send_every.map(|d| self.last_write + d);
        let read = self.heart_beat.read_timeout.map(|d| self.last_read + d);
        match (send, read) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// What is due at `now`.
    pub(crate) fn poll_timers(&self, now: Instant) -> Timer {
        if let Some(limit) = self.heart_beat.read_timeout
            && now.saturating_duration_since(self.last_read) >= limit
        {
            return Timer::PeerSilent(limit);
        }
        if let Some(every) = self.heart_beat.send_every
            && now.saturating_duration_since(self.last_write) >= every
        {
            return Timer::SendHeartBeat;
        }
        Timer::Idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    #[test]
    fn a_request_past_its_deadline_is_handed_back_once_and_its_late_receipt_ignored() {
        let start = Instant::now();
        let mut s: Session<u32, ()> = Session::new(start);
        let soon = start + Duration::from_secs(1);
        s.expect_receipt(Frame::send("/queue/a", "x"), "late".into(), 1, soon);
        s.expect_receipt(Frame::send("/queue/a", "y"), "fine".into(), 2, far());
        assert!(s.expired(start).is_empty());
        assert_eq!(s.expired(soon), [("late".to_owned(), 1)]);
        assert!(s.expired(soon).is_empty());
        let receipt = Frame::new(Command::Receipt).with_header("receipt-id", "late");
        assert!(matches!(s.on_frame(receipt), Inbound::Ignored));
        assert_eq!(s.pending_len(), 1);
    }

    #[test]
    fn a_forgotten_subscription_has_no_sink_and_is_not_restored() {
        let mut s: Session<(), u8> = Session::new(Instant::now());
        s.subscribed("1", &Frame::subscribe("/queue/a", "1", "auto"), 9);
        assert_eq!(s.sink("1"), Some(&9));
        assert!(s.unsubscribed("1"));
        assert!(!s.unsubscribed("1"));
        assert_eq!(s.sink("1"), None);
        assert!(s.resubscribe().is_empty());
    }

    #[test]
    fn the_read_timeout_allows_the_grace_factor_on_top_of_the_slower_interval() {
        // ActiveMQ's keep-alive can stay silent for about twice its interval.
        let hb = negotiate_heart_beat((1000, 1000), Some("1000,1000"), 2.5);
        assert_eq!(hb.read_timeout, Some(Duration::from_millis(2500)));
    }

    fn connected(version: &str, hb: &str) -> Frame {
        Frame::new(Command::Connected)
            .with_header("version", version.to_owned())
            .with_header("heart-beat", hb.to_owned())
    }

    #[test]
    fn receipt_answers_the_request_that_asked_for_it() {
        let mut s: Session<u32, ()> = Session::new(Instant::now());
        let id = "r-1".to_owned();
        let frame = s.expect_receipt(Frame::send("/queue/a", "x"), id.clone(), 7u32, far());
        assert_eq!(frame.header("receipt"), Some(id.as_str()));
        let receipt = Frame::new(Command::Receipt).with_header("receipt-id", id);
        assert!(matches!(s.on_frame(receipt), Inbound::Confirmed(7)));
        assert_eq!(s.pending_len(), 0);
    }

    #[test]
    fn error_with_receipt_id_rejects_only_that_request() {
        let mut s: Session<u32, ()> = Session::new(Instant::now());
        let (first, second) = ("r-1".to_owned(), "r-2".to_owned());
        s.expect_receipt(Frame::send("/queue/a", "x"), first.clone(), 1u32, far());
        s.expect_receipt(Frame::send("/queue/b", "y"), second.clone(), 2u32, far());
        let error = Frame::new(Command::Error)
            .with_header("receipt-id", second)
            .with_header("message", "not allowed");
        match s.on_frame(error) {
            Inbound::Rejected(2, e) => assert_eq!(e.message, "not allowed"),
            other => panic!("unexpected {other:?}"),
        }
        let receipt = Frame::new(Command::Receipt).with_header("receipt-id", first);
        assert!(matches!(s.on_frame(receipt), Inbound::Confirmed(1)));
    }

    #[test]
    fn error_without_a_known_receipt_is_fatal() {
        let mut s: Session<u32, ()> = Session::new(Instant::now());
        let error = Frame::new(Command::Error).with_header("message", "bye");
        assert!(matches!(s.on_frame(error), Inbound::Fatal(e) if e.message == "bye"));
    }

    #[test]
    fn lost_connection_hands_back_every_waiting_request() {
        let mut s: Session<u32, ()> = Session::new(Instant::now());
        s.expect_receipt(Frame::send("/queue/a", "x"), "a".into(), 1u32, far());
        s.expect_receipt(Frame::send("/queue/a", "y"), "b".into(), 2u32, far());
        let mut lost = s.drain_pending();
        lost.sort();
        assert_eq!(lost, [1, 2]);
    }

    #[test]
    fn subscriptions_are_restored_after_reconnect_and_forgotten_after_unsubscribe() {
        let mut s: Session<(), ()> = Session::new(Instant::now());
        s.subscribed(
            "1",
            &Frame::subscribe("/queue/a", "1", "client-individual"),
            (),
        );
        s.subscribed("2", &Frame::subscribe("/queue/b", "2", "auto"), ());
        assert_eq!(s.resubscribe().len(), 2);
        assert!(s.unsubscribed("1"));
        let again = s.resubscribe();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].0, "2");
        assert_eq!(again[0].1.header("destination"), Some("/queue/b"));
    }

    #[test]
    fn version_is_taken_from_connected_and_must_have_been_offered() {
        let now = Instant::now();
        let mut s: Session<(), ()> = Session::new(now);
        assert_eq!(
            s.connected(&connected("1.1", "0,0"), &Version::ALL, (0, 0), 2.0, now),
            Ok(Version::V1_1)
        );
        let mut s: Session<(), ()> = Session::new(now);
        assert!(
            s.connected(&connected("1.2", "0,0"), &[Version::V1_0], (0, 0), 2.0, now)
                .is_err()
        );
        let mut s: Session<(), ()> = Session::new(now);
        let bare = Frame::new(Command::Connected);
        assert_eq!(
            s.connected(&bare, &Version::ALL, (0, 0), 2.0, now),
            Ok(Version::V1_0)
        );
    }

    #[test]
    fn heart_beats_follow_the_larger_interval_of_each_direction() {
        let hb = negotiate_heart_beat((4000, 6000), Some("10000,2000"), 1.5);
        assert_eq!(hb.send_every, Some(Duration::from_millis(2000)));
        assert_eq!(hb.read_timeout, Some(Duration::from_millis(15000)));
        let off = negotiate_heart_beat((4000, 6000), Some("0,0"), 1.5);
        assert_eq!(off.send_every, None);
        assert_eq!(off.read_timeout, None);
        assert_eq!(
            negotiate_heart_beat((0, 0), Some("5,5"), 2.0).send_every,
            None
        );
    }

    #[test]
    fn silent_peer_is_reported_after_the_read_timeout() {
        let start = Instant::now();
        let mut s: Session<(), ()> = Session::new(start);
        s.connected(
            &connected("1.2", "1000,1000"),
            &Version::ALL,
            (1000, 1000),
            2.0,
            start,
        )
        .unwrap();
        assert_eq!(s.poll_timers(start), Timer::Idle);
        assert_eq!(
            s.poll_timers(start + Duration::from_millis(500)),
            Timer::SendHeartBeat
        );
        s.on_write(start + Duration::from_millis(500));
        s.on_read(start + Duration::from_millis(1500));
        s.on_write(start + Duration::from_millis(1900));
        assert_eq!(
            s.poll_timers(start + Duration::from_millis(2000)),
            Timer::Idle
        );
        assert_eq!(
            s.poll_timers(start + Duration::from_millis(3500)),
            Timer::PeerSilent(Duration::from_millis(2000))
        );
        assert!(s.next_deadline().is_some());
    }

    #[test]
    fn ack_frames_use_the_header_of_each_version() {
        let message = Frame::new(Command::Message)
            .with_header("message-id", "m1")
            .with_header("ack", "a1")
            .with_header("subscription", "s1");
        let v12 = AckId::of(Version::V1_2, "s1", &message).frame(Command::Ack, None);
        assert_eq!(v12.headers().iter().collect::<Vec<_>>(), [("id", "a1")]);
        let v11 = AckId::of(Version::V1_1, "s1", &message).frame(Command::Nack, Some("t1"));
        assert_eq!(
            v11.headers().iter().collect::<Vec<_>>(),
            [
                ("message-id", "m1"),
                ("subscription", "s1"),
                ("transaction", "t1")
            ]
        );
        let v10 = AckId::of(Version::V1_0, "s1", &message).frame(Command::Ack, None);
        assert_eq!(
            v10.headers().iter().collect::<Vec<_>>(),
            [("message-id", "m1")]
        );
    }
}
