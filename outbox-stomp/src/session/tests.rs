use std::time::Duration;

use tokio::time::Instant;

use super::*;

impl<T, S> Session<T, S> {
    /// Number of requests waiting for a receipt.
    fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Where messages of subscription `id` go.
    fn sink(&self, id: &str) -> Option<&S> {
        self.subscriptions.get(id).map(|(_, sink)| sink)
    }
}

impl<T, S> Reaction<T, S> {
    /// True when there is nothing to do.
    fn is_empty(&self) -> bool {
        self.write.is_empty()
            && self.answers.is_empty()
            && self.deliver.is_none()
            && !self.unsolicited_error
    }
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

fn receipt(id: &str) -> Frame {
    Frame::new(Command::Receipt).with_header("receipt-id", id.to_owned())
}

fn error(receipt_id: Option<&str>, message: &str) -> Frame {
    let frame = Frame::new(Command::Error).with_header("message", message.to_owned());
    match receipt_id {
        Some(id) => frame.with_header("receipt-id", id.to_owned()),
        None => frame,
    }
}

fn message(subscription: &str) -> Frame {
    Frame::new(Command::Message)
        .with_header("subscription", subscription.to_owned())
        .with_header("message-id", "m1")
        .with_header("ack", "a1")
}

/// The callers answered, with their results shown as text, sorted.
fn answered(answers: Vec<Answer<u32>>) -> Vec<(u32, String)> {
    let mut shown: Vec<(u32, String)> = answers
        .into_iter()
        .map(|a| (a.caller, format!("{:?}", a.result)))
        .collect();
    shown.sort();
    shown
}

fn commands(frames: &[Frame]) -> Vec<(Command, Option<&str>)> {
    frames
        .iter()
        .map(|f| (f.command(), f.header("id")))
        .collect()
}

#[test]
fn a_request_past_its_deadline_is_handed_back_once_and_its_late_receipt_ignored() {
    let start = Instant::now();
    let mut s: Session<u32, ()> = Session::new(start);
    let soon = start + Duration::from_secs(1);
    let after = Duration::from_secs(1);
    s.request(Frame::send("/queue/a", "x"), "late".into(), 1, soon);
    s.request(Frame::send("/queue/a", "y"), "fine".into(), 2, far());
    assert!(s.expire(start, after).is_empty());
    let expired = s.expire(soon, after);
    assert!(expired.write.is_empty());
    assert_eq!(expired.answers.len(), 1);
    assert!(matches!(
        &expired.answers[0],
        Answer { caller: 1, result: Err(Error::ReceiptTimeout { receipt, after: a }), .. }
            if receipt == "late" && *a == after
    ));
    assert!(s.expire(soon, after).is_empty());
    let late = s.on_frame(receipt("late"), soon).unwrap();
    assert!(late.is_empty());
    assert_eq!(s.pending_len(), 1);
}

#[test]
fn a_forgotten_subscription_has_no_sink_and_is_not_restored() {
    let now = Instant::now();
    let mut s: Session<u32, u8> = Session::new(now);
    let frame = Frame::subscribe("/queue/a", "1", "auto");
    s.subscribe("1".into(), frame, 9, "r".into(), 1, far());
    assert_eq!(s.sink("1"), Some(&9));
    assert!(s.forget("1"));
    assert!(!s.forget("1"));
    assert_eq!(s.sink("1"), None);
    assert!(s.restore(|id| format!("restore-{id}"), far()).is_empty());
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
    let now = Instant::now();
    let mut s: Session<u32, ()> = Session::new(now);
    let id = "r-1".to_owned();
    let frame = s.request(Frame::send("/queue/a", "x"), id.clone(), 7u32, far());
    assert_eq!(frame.header("receipt"), Some(id.as_str()));
    let reaction = s.on_frame(receipt(&id), now).unwrap();
    assert!(reaction.write.is_empty() && reaction.deliver.is_none());
    assert!(matches!(
        reaction.answers.as_slice(),
        [Answer {
            caller: 7,
            result: Ok(()),
            subscription: None
        }]
    ));
    assert_eq!(s.pending_len(), 0);
}

#[test]
fn error_with_receipt_id_rejects_only_that_request() {
    let now = Instant::now();
    let mut s: Session<u32, ()> = Session::new(now);
    s.request(Frame::send("/queue/a", "x"), "r-1".into(), 1u32, far());
    s.request(Frame::send("/queue/b", "y"), "r-2".into(), 2u32, far());
    let reaction = s.on_frame(error(Some("r-2"), "not allowed"), now).unwrap();
    assert!(!reaction.unsolicited_error);
    match reaction.answers.as_slice() {
        [
            Answer {
                caller: 2,
                result: Err(Error::Rejected(e)),
                ..
            },
        ] => assert_eq!(e.message, "not allowed"),
        other => panic!("unexpected {other:?}"),
    }
    let reaction = s.on_frame(receipt("r-1"), now).unwrap();
    assert!(matches!(
        reaction.answers.as_slice(),
        [Answer {
            caller: 1,
            result: Ok(()),
            ..
        }]
    ));
}

#[test]
fn error_without_a_known_receipt_is_fatal() {
    let now = Instant::now();
    let mut s: Session<u32, ()> = Session::new(now);
    let reaction = s.on_frame(error(None, "bye"), now).unwrap();
    assert!(reaction.unsolicited_error && reaction.answers.is_empty());
    let ended = s.broke(Error::ConnectionLost, now);
    assert!(matches!(ended, Ended::Refused(e) if e.message == "bye"));
}

#[test]
fn lost_connection_hands_back_every_waiting_request() {
    let mut s: Session<u32, ()> = Session::new(Instant::now());
    s.request(Frame::send("/queue/a", "x"), "a".into(), 1u32, far());
    s.request(Frame::send("/queue/a", "y"), "b".into(), 2u32, far());
    let lost = answered(s.end(0, &Ended::Lost(Error::ConnectionLost)));
    let callers: Vec<u32> = lost.iter().map(|(c, _)| *c).collect();
    assert_eq!(callers, [1, 2]);
    assert!(lost.iter().all(|(_, r)| r == "Err(ConnectionLost)"));
    assert_eq!(s.pending_len(), 0);
}

#[test]
fn subscriptions_are_restored_after_reconnect_and_forgotten_after_unsubscribe() {
    let mut s: Session<u32, ()> = Session::new(Instant::now());
    let a = Frame::subscribe("/queue/a", "1", "client-individual");
    s.subscribe("1".into(), a, (), "r1".into(), 1, far());
    let b = Frame::subscribe("/queue/b", "2", "auto");
    s.subscribe("2".into(), b, (), "r2".into(), 2, far());
    assert_eq!(s.restore(|id| format!("restore-{id}"), far()).len(), 2);
    assert!(s.unsubscribe("1".into()).is_some());
    let again = s.restore(|id| format!("again-{id}"), far());
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].header("id"), Some("2"));
    assert_eq!(again[0].header("destination"), Some("/queue/b"));
    assert_eq!(again[0].header("receipt"), Some("again-2"));
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
    assert_eq!(
        s.connected(&connected("1.2", "0,0"), &[Version::V1_0], (0, 0), 2.0, now),
        Err(SessionError::VersionNotOffered(Version::V1_2))
    );
    let mut s: Session<(), ()> = Session::new(now);
    let bare = Frame::new(Command::Connected);
    assert_eq!(
        s.connected(&bare, &Version::ALL, (0, 0), 2.0, now),
        Ok(Version::V1_0)
    );
}

#[test]
fn a_version_the_client_does_not_know_is_a_typed_session_error() {
    let now = Instant::now();
    let mut s: Session<(), ()> = Session::new(now);
    assert_eq!(
        s.connected(&connected("9.9", "0,0"), &Version::ALL, (0, 0), 2.0, now),
        Err(SessionError::UnknownVersion("9.9".to_owned()))
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
fn a_peer_is_not_silent_while_the_client_itself_stopped_reading() {
    let start = Instant::now();
    let mut s: Session<(), ()> = Session::new(start);
    let hb = connected("1.2", "1000,0");
    s.connected(&hb, &Version::ALL, (0, 1000), 2.0, start)
        .unwrap();
    let late = start + Duration::from_millis(2500);
    assert_eq!(s.on_timer(late, false), Timer::Idle);
    // The read clock started again when the client held back.
    assert_eq!(
        s.on_timer(late + Duration::from_millis(1999), true),
        Timer::Idle
    );
    assert_eq!(
        s.on_timer(late + Duration::from_millis(2000), true),
        Timer::PeerSilent(Duration::from_millis(2000))
    );
}

#[test]
fn ack_frames_use_the_header_of_each_version() {
    let message = message("s1");
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

#[test]
fn a_message_goes_to_its_subscriptions_sink_with_the_ack_id_of_the_connection() {
    let now = Instant::now();
    let mut s: Session<u32, u8> = Session::new(now);
    s.connected(&connected("1.1", "0,0"), &Version::ALL, (0, 0), 2.0, now)
        .unwrap();
    let frame = Frame::subscribe("/queue/a", "s1", "client-individual");
    s.subscribe("s1".into(), frame, 7, "r".into(), 1, far());
    let reaction = s.on_frame(message("s1"), now).unwrap();
    let delivery = reaction.deliver.expect("a delivery");
    assert_eq!((delivery.subscription.as_str(), delivery.sink), ("s1", 7));
    assert_eq!(delivery.ack.version, Version::V1_1);
    assert_eq!(delivery.ack.message_id.as_deref(), Some("m1"));
    assert!(reaction.write.is_empty() && reaction.answers.is_empty());
}

#[test]
fn a_message_for_an_unknown_subscription_is_dropped() {
    let now = Instant::now();
    let mut s: Session<u32, u8> = Session::new(now);
    assert!(s.on_frame(message("nobody"), now).unwrap().is_empty());
}

#[test]
fn a_frame_a_server_must_not_send_is_a_session_error() {
    let now = Instant::now();
    let mut s: Session<u32, ()> = Session::new(now);
    for command in [Command::Connected, Command::Send, Command::Subscribe] {
        let result = s.on_frame(Frame::new(command), now);
        assert_eq!(
            result.err(),
            Some(SessionError::UnexpectedFrame(command)),
            "{command}"
        );
    }
}

#[test]
fn a_confirmed_subscribe_whose_caller_is_gone_is_unsubscribed() {
    let now = Instant::now();
    let mut s: Session<u32, ()> = Session::new(now);
    let frame = Frame::subscribe("/queue/a", "s1", "auto");
    s.subscribe("s1".into(), frame, (), "r".into(), 1, far());
    let reaction = s.on_frame(receipt("r"), now).unwrap();
    let [answer] = <[Answer<u32>; 1]>::try_from(reaction.answers).unwrap();
    assert_eq!(answer.subscription.as_deref(), Some("s1"));
    let unsubscribe = s.caller_gone("s1".into()).expect("an UNSUBSCRIBE");
    assert_eq!(
        commands(&[unsubscribe]),
        [(Command::Unsubscribe, Some("s1"))]
    );
    // Already gone: nothing more to write.
    assert!(s.caller_gone("s1".into()).is_none());
}

#[test]
fn a_subscription_whose_stream_is_gone_is_unsubscribed_and_forgotten() {
    let mut s: Session<u32, ()> = Session::new(Instant::now());
    let frame = Frame::subscribe("/queue/a", "s1", "auto");
    s.subscribe("s1".into(), frame, (), "r".into(), 1, far());
    let unsubscribe = s.stream_gone("s1".into());
    assert_eq!(
        commands(&[unsubscribe]),
        [(Command::Unsubscribe, Some("s1"))]
    );
    assert_eq!(s.sink("s1"), None);
}

#[test]
fn a_refused_subscribe_fails_its_caller_and_leaves_no_subscription() {
    let now = Instant::now();
    let mut s: Session<u32, ()> = Session::new(now);
    let frame = Frame::subscribe("/queue/secret", "s1", "auto");
    s.subscribe("s1".into(), frame, (), "r".into(), 1, far());
    let reaction = s.on_frame(error(Some("r"), "not authorized"), now).unwrap();
    assert!(reaction.write.is_empty());
    assert!(matches!(
        reaction.answers.as_slice(),
        [Answer {
            caller: 1,
            result: Err(Error::Rejected(_)),
            subscription: None
        }]
    ));
    assert_eq!(s.sink("s1"), None);
    assert!(s.restore(|id| id.to_owned(), far()).is_empty());
}

#[test]
fn an_unconfirmed_subscribe_past_its_deadline_is_unsubscribed_and_its_caller_timed_out() {
    let start = Instant::now();
    let mut s: Session<u32, ()> = Session::new(start);
    let soon = start + Duration::from_secs(1);
    let frame = Frame::subscribe("/queue/a", "s1", "auto");
    s.subscribe("s1".into(), frame, (), "r".into(), 1, soon);
    let reaction = s.expire(soon, Duration::from_secs(1));
    assert_eq!(
        commands(&reaction.write),
        [(Command::Unsubscribe, Some("s1"))]
    );
    assert!(matches!(
        reaction.answers.as_slice(),
        [Answer {
            caller: 1,
            result: Err(Error::ReceiptTimeout { .. }),
            ..
        }]
    ));
    assert_eq!(s.sink("s1"), None);
}

#[test]
fn an_expired_subscribe_the_user_already_ended_writes_nothing_more() {
    let start = Instant::now();
    let mut s: Session<u32, ()> = Session::new(start);
    let soon = start + Duration::from_secs(1);
    let frame = Frame::subscribe("/queue/a", "s1", "auto");
    s.subscribe("s1".into(), frame, (), "r".into(), 1, soon);
    assert!(s.unsubscribe("s1".into()).is_some());
    let reaction = s.expire(soon, Duration::from_secs(1));
    assert!(reaction.write.is_empty());
    assert_eq!(reaction.answers.len(), 1);
}

#[test]
fn a_restored_subscription_is_kept_without_receipt_and_after_a_loss_but_ends_when_refused() {
    let start = Instant::now();
    let mut s: Session<u32, ()> = Session::new(start);
    for id in ["a", "b", "c"] {
        let frame = Frame::subscribe(format!("/queue/{id}"), id, "auto");
        s.subscribe(id.into(), frame, (), format!("r-{id}"), 1, far());
        let _ = s.on_frame(receipt(&format!("r-{id}")), start).unwrap();
    }
    let soon = start + Duration::from_secs(1);
    let restored = s.restore(|id| format!("restore-{id}"), soon);
    assert_eq!(restored.len(), 3);
    // Refused: that subscription ends, and no caller is answered.
    let refused = s.on_frame(error(Some("restore-a"), "no"), start).unwrap();
    assert!(refused.answers.is_empty() && refused.write.is_empty());
    // Unanswered by its deadline: kept.
    let expired = s.expire(soon, Duration::from_secs(1));
    assert!(expired.is_empty());
    assert_eq!(s.restore(|id| format!("again-{id}"), far()).len(), 2);
    // Lost with the connection: nobody to answer, restored next time.
    assert!(s.end(0, &Ended::Lost(Error::ConnectionLost)).is_empty());
    let next: Vec<Option<String>> = s
        .restore(|id| id.to_owned(), far())
        .iter()
        .map(|f| f.header("id").map(str::to_owned))
        .collect();
    assert_eq!(next, [Some("b".to_owned()), Some("c".to_owned())]);
}

#[test]
fn a_lost_connection_forgets_a_subscription_the_broker_never_confirmed() {
    let mut s: Session<u32, ()> = Session::new(Instant::now());
    let frame = Frame::subscribe("/queue/a", "s1", "auto");
    s.subscribe("s1".into(), frame, (), "r".into(), 1, far());
    let lost = s.end(0, &Ended::Lost(Error::ConnectionLost));
    assert_eq!(lost.len(), 1);
    assert_eq!(s.sink("s1"), None);
}

#[test]
fn a_close_right_after_an_unsolicited_error_blames_that_error_and_later_is_a_loss() {
    let now = Instant::now();
    let mut s: Session<u32, ()> = Session::new(now);
    let _ = s.on_frame(error(None, "header too long"), now).unwrap();
    let right_after = now + LAST_WORDS;
    assert!(matches!(
        s.broke(Error::ConnectionLost, right_after),
        Ended::Refused(e) if e.message == "header too long"
    ));
    let _ = s.on_frame(error(None, "kept open"), now).unwrap();
    let later = now + LAST_WORDS + Duration::from_millis(1);
    assert!(matches!(
        s.broke(Error::HeartBeatTimeout(Duration::from_secs(1)), later),
        Ended::Lost(Error::HeartBeatTimeout(_))
    ));
    // Nothing noted: a plain loss.
    assert!(matches!(
        s.broke(Error::ConnectionLost, later),
        Ended::Lost(Error::ConnectionLost)
    ));
}

#[test]
fn the_first_unsolicited_error_names_the_refusal_until_its_window_passes() {
    let now = Instant::now();
    let mut s: Session<u32, ()> = Session::new(now);
    let _ = s.on_frame(error(None, "first"), now).unwrap();
    let _ = s.on_frame(error(None, "second"), now + LAST_WORDS).unwrap();
    assert!(matches!(
        s.broke(Error::ConnectionLost, now + LAST_WORDS),
        Ended::Refused(e) if e.message == "first"
    ));
    let _ = s.on_frame(error(None, "old"), now).unwrap();
    let past = now + LAST_WORDS + Duration::from_millis(1);
    let _ = s.on_frame(error(None, "new"), past).unwrap();
    assert!(matches!(
        s.broke(Error::ConnectionLost, past),
        Ended::Refused(e) if e.message == "new"
    ));
}

#[test]
fn a_refused_connection_fails_its_requests_with_the_refusal_and_its_late_transactions_too() {
    let now = Instant::now();
    let mut s: Session<u32, ()> = Session::new(now);
    s.request(Frame::send("/queue/a", "x"), "a".into(), 1, far());
    let _ = s.on_frame(error(None, "frame too large"), now).unwrap();
    let ended = s.broke(Error::ConnectionLost, now);
    let answers = s.end(4, &ended);
    assert!(matches!(
        answers.as_slice(),
        [Answer { caller: 1, result: Err(Error::Broker(e)), .. }] if e.message == "frame too large"
    ));
    assert!(
        matches!(s.stale(4, "transaction"), Error::Broker(e) if e.message == "frame too large")
    );
    assert!(matches!(s.stale(4, "delivery"), Error::Stale("delivery")));
    assert!(matches!(
        s.stale(3, "transaction"),
        Error::Stale("transaction")
    ));
}

#[test]
fn an_unsolicited_error_of_one_connection_is_not_blamed_for_the_next_ones_end() {
    let now = Instant::now();
    let mut s: Session<u32, ()> = Session::new(now);
    let _ = s.on_frame(error(None, "kept open"), now).unwrap();
    let ended = Ended::Lost(Error::HeartBeatTimeout(Duration::from_secs(1)));
    assert!(s.end(0, &ended).is_empty());
    assert!(matches!(
        s.broke(Error::ConnectionLost, now),
        Ended::Lost(Error::ConnectionLost)
    ));
    assert!(matches!(s.stale(0, "transaction"), Error::Stale(_)));
}

#[test]
fn only_the_latest_refused_connections_are_remembered() {
    let now = Instant::now();
    let mut s: Session<u32, ()> = Session::new(now);
    for epoch in 0..9 {
        let _ = s
            .on_frame(error(None, &format!("refused {epoch}")), now)
            .unwrap();
        let ended = s.broke(Error::ConnectionLost, now);
        assert!(s.end(epoch, &ended).is_empty());
    }
    assert!(matches!(s.stale(0, "transaction"), Error::Stale(_)));
    assert!(matches!(s.stale(1, "transaction"), Error::Broker(e) if e.message == "refused 1"));
    assert!(matches!(s.stale(8, "transaction"), Error::Broker(e) if e.message == "refused 8"));
}
