//! What a failed publish does to its rows, and how a relay gives rows back.
//!
//! The decision is [`decide`], a pure function of the failure's kind, the
//! rows and their retry budget; the batch path, the lone-row path and the
//! hand-off path all ask it, and the methods here carry its verdict out.
//!
//! ```text
//!  kind          one row                      several rows
//!  Closed        give back, stop              give back, stop
//!  Unavailable   give back, back off          give back, back off
//!  Unauthorized  defer the destination        one by one
//!  Rejected      retry after backoff, or      one by one
//!                park once attempts are spent
//! ```
//!
//! Every row a relay lets go of without a verdict of its own (a batch read
//! ahead of a failed one, rows held back behind a key, what is in hand at
//! shutdown) goes through [`Relay::give_back`].

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Claimed, PublishError, PublishErrorKind, Publisher, Relay, RelayCounter, Step};
use crate::backend::Backend;
use crate::backoff::Backoff;
use crate::error::Error;
use crate::event::OutboxMessage;
use crate::failpoint;
use crate::names::{ms, now_ms};

/// What a failed publish means for the rows it carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// The transport stopped for good: give the rows back and stop the relay.
    Stop,
    /// The broker could not be reached: give the rows back, no attempt
    /// spent; the whole relay backs off.
    GiveBack,
    /// The broker refuses the row's destination to the relay's user: defer
    /// the destination's rows, no attempt spent.
    Defer,
    /// The broker refused a batch of several rows: publish them one by one
    /// to find the culprits.
    OneByOne,
    /// The broker rejected the row and it has attempts left: due again
    /// `after` from now.
    Retry {
        /// The backoff before its next attempt.
        after: Duration,
    },
    /// The broker rejected the row and this was its last attempt: park it
    /// as `FAILED`.
    Park {
        /// Written as its next attempt time, as for a retry; a replay sets
        /// its own.
        after: Duration,
    },
}

/// How many rejections a row may take, and how long it waits after each.
#[derive(Debug, Clone, Copy)]
pub(super) struct Budget {
    /// Attempts before a row is parked ([`RelayConfig::max_attempts`](super::RelayConfig::max_attempts)).
    pub(super) max_attempts: u32,
    /// The wait after a rejection ([`RelayConfig::retry_backoff`](super::RelayConfig::retry_backoff)).
    pub(super) backoff: Backoff,
}

/// The verdict on `rows`, whose publish failed with `kind`. A verdict on one
/// row's rejection counts the attempt it spent: with `max_attempts` reached
/// it parks the row, else it retries after the backoff of its attempts so
/// far (drawn with the backoff's jitter).
pub(super) fn decide(kind: PublishErrorKind, rows: &[OutboxMessage], budget: &Budget) -> Verdict {
    match (kind, rows) {
        (PublishErrorKind::Closed, _) => Verdict::Stop,
        (PublishErrorKind::Unavailable, _) => Verdict::GiveBack,
        (PublishErrorKind::Unauthorized, [_]) => Verdict::Defer,
        (_, [row]) => {
            let after = budget
                .backoff
                .delay(u32::try_from(row.attempts).unwrap_or(u32::MAX));
            if row.attempts.saturating_add(1) >= i64::from(budget.max_attempts) {
                Verdict::Park { after }
            } else {
                Verdict::Retry { after }
            }
        }
        _ => Verdict::OneByOne,
    }
}

/// Rows a relay holds and lets go of: their lease is dropped, their
/// attempts stay, and any relay may claim them again.
#[derive(Clone, Copy)]
pub(super) enum GiveBack<'a> {
    /// A batch's own rows, named by id and token: never other rows of its
    /// token.
    Batch(&'a Claimed),
    /// The rows `ids` held under `token`.
    Rows {
        /// The token holding them.
        token: &'a str,
        /// The rows.
        ids: &'a [i64],
    },
    /// Every row held under a token: for the shared hand-off token, also
    /// the rows handed off but not yet read.
    Token(&'a str),
}

impl<DB: Backend, P: Publisher> Relay<DB, P> {
    /// Gives `rows` back, keeping `reason` as their last error (`None` keeps
    /// the one they had), on `conn` if the caller holds a connection, else
    /// on one of the pool's.
    pub(super) async fn give_back(
        &self,
        conn: Option<&mut DB::Connection>,
        rows: GiveBack<'_>,
        reason: Option<&str>,
    ) -> Result<(), Error> {
        let store = self.outbox.store();
        let mut pooled;
        let conn = match conn {
            Some(conn) => conn,
            None => {
                pooled = store.acquire().await?;
                &mut *pooled
            }
        };
        match rows {
            GiveBack::Batch(claimed) => {
                let ids: Vec<i64> = claimed.ids().collect();
                store
                    .release_ids(conn, &claimed.token, &ids, reason, now_ms())
                    .await
            }
            GiveBack::Rows { token, ids } => {
                store.release_ids(conn, token, ids, reason, now_ms()).await
            }
            GiveBack::Token(token) => store.release_token(conn, token, reason, now_ms()).await,
        }
    }

    /// What a batch whose publish failed gives back: its own rows, or, for
    /// a handed-off batch, every row under the shared token, so other relays
    /// may take the rows handed off but not yet read while this one waits
    /// for the broker. Every row of the token only while this relay holds
    /// its `relay_id`'s lock (one that lost it may no longer speak for the
    /// token's rows) and no published row waits for its mark under it.
    fn failed_rows<'a>(&self, claimed: &'a Claimed) -> GiveBack<'a> {
        if claimed.handed_off
            && self.owned.load(Ordering::Acquire)
            && !self.unmarked.load(Ordering::Acquire)
        {
            GiveBack::Token(&claimed.token)
        } else {
            GiveBack::Batch(claimed)
        }
    }

    /// The retry budget of this relay's rows.
    fn budget(&self) -> Budget {
        Budget {
            max_attempts: self.config.max_attempts,
            backoff: self.config.retry_backoff,
        }
    }

    /// Settles a batch whose publish failed.
    pub(super) async fn publish_failed(
        &self,
        claimed: &Claimed,
        error: PublishError,
    ) -> Result<Step, Error> {
        let n = claimed.batch.len();
        match decide(error.kind, &claimed.batch, &self.budget()) {
            Verdict::Stop => self.closed(claimed, &error).await,
            Verdict::GiveBack => {
                tracing::warn!(%error, rows = n, "broker unavailable; batch released");
                self.unavailable(claimed, &error).await
            }
            Verdict::OneByOne => {
                tracing::warn!(%error, rows = n, "batch rejected; publishing one by one");
                self.one_by_one(claimed).await
            }
            verdict => {
                // A verdict on one row: the batch is that row.
                for m in &claimed.batch {
                    self.settle_row(&claimed.token, m, verdict, &error).await?;
                }
                Ok(Step::Published(n))
            }
        }
    }

    /// The broker could not be reached: count it, report it, give the batch
    /// back (the whole relay backs off next).
    async fn unavailable(&self, claimed: &Claimed, error: &PublishError) -> Result<Step, Error> {
        self.metrics.add(RelayCounter::Unavailable, 1);
        self.metrics.status.broker_failed(&error.message);
        let rows = self.failed_rows(claimed);
        self.give_back(None, rows, Some(&error.message)).await?;
        Ok(Step::Unavailable)
    }

    /// The transport stopped for good: give the rows back (another relay may
    /// publish them) and stop.
    async fn closed(&self, claimed: &Claimed, error: &PublishError) -> Result<Step, Error> {
        let rows = self.failed_rows(claimed);
        if let Err(release) = self.give_back(None, rows, Some(&error.message)).await {
            // The rows stay leased until the lease runs out; the relay stops anyway.
            tracing::warn!(error = %release, "could not give back a batch while stopping");
        }
        Ok(Step::Stopped(error.message.clone()))
    }

    /// After a rejected batch: find the culprits by publishing each row alone.
    /// A row whose destination is refused to the relay's user defers that
    /// destination; the batch's later rows of it are not tried.
    async fn one_by_one(&self, claimed: &Claimed) -> Result<Step, Error> {
        let token = claimed.token.as_str();
        // Keys whose later rows wait behind one of theirs (per-key order).
        let mut blocked: HashSet<&str> = HashSet::new();
        let mut refused: HashSet<&str> = HashSet::new();
        for m in &claimed.batch {
            if m.key.as_deref().is_some_and(|k| blocked.contains(k)) {
                continue;
            }
            // Row by row the batch can outlast its lease: each row's lease
            // is made whole first, and a row whose lease ran out (another
            // relay's by now) is left to that relay, its key's later rows
            // behind it; so are the rows of a refused destination.
            let held = refused.contains(m.destination.as_str())
                || !self.renew_for_one_publish(token, m.id).await?;
            if !held {
                let Err(error) = self.publish_one(token, m).await? else {
                    continue;
                };
                match decide(error.kind, std::slice::from_ref(m), &self.budget()) {
                    Verdict::Stop => return self.closed(claimed, &error).await,
                    Verdict::GiveBack => return self.unavailable(claimed, &error).await,
                    verdict => {
                        self.settle_row(token, m, verdict, &error).await?;
                        if verdict == Verdict::Defer {
                            refused.insert(&m.destination);
                        }
                    }
                }
            }
            if let Some(key) = &m.key {
                blocked.insert(key);
            }
        }
        // Rows held back behind a rejected row of their key.
        self.give_back(None, GiveBack::Batch(claimed), None).await?;
        Ok(Step::Published(claimed.batch.len()))
    }

    /// Publishes `m` alone and, once the broker confirmed it, marks it
    /// published; the broker's error if it failed.
    async fn publish_one(
        &self,
        token: &str,
        m: &OutboxMessage,
    ) -> Result<Result<(), PublishError>, Error> {
        if let Err(error) = self.publish(std::slice::from_ref(m)).await {
            return Ok(Err(error));
        }
        failpoint::hit("relay.after_receipt");
        let store = self.outbox.store();
        let now = crate::clock::now(store.pool()).await;
        let mut conn = store.acquire().await?;
        store.mark_published(&mut conn, token, &[m.id], now).await?;
        self.metrics.add(RelayCounter::Published, 1);
        self.metrics.status.succeeded();
        self.metrics
            .status
            .destinations_accepted(std::iter::once(m.destination.as_str()));
        Ok(Ok(()))
    }

    /// Sets row `id`'s lease to a whole [`RelayConfig::lease`] from now (on
    /// the database's clock) if `token` still holds it unexpired; `false` if
    /// not.
    async fn renew_for_one_publish(&self, token: &str, id: i64) -> Result<bool, Error> {
        let store = self.outbox.store();
        let now = crate::clock::now(store.pool()).await;
        let lease = i64::try_from(self.config.lease.as_millis()).unwrap_or(i64::MAX);
        let mut conn = store.acquire().await?;
        let renewed = store
            .renew_lease(&mut conn, token, &[id], now, now.saturating_add(lease))
            .await?;
        Ok(renewed == 1)
    }

    /// Carries out `verdict` on the lone row `m` held under `token`: defers
    /// its destination, or records its rejection. The verdicts on a whole
    /// batch (stop, give back, one by one) are the caller's to carry out.
    async fn settle_row(
        &self,
        token: &str,
        m: &OutboxMessage,
        verdict: Verdict,
        error: &PublishError,
    ) -> Result<(), Error> {
        match verdict {
            Verdict::Defer => self.defer(token, m, error).await,
            Verdict::Retry { after } => self.reject(token, m, false, after, error).await,
            Verdict::Park { after } => self.reject(token, m, true, after, error).await,
            Verdict::Stop | Verdict::GiveBack | Verdict::OneByOne => Ok(()),
        }
    }

    /// The broker refused `m`'s destination to the relay's user: every
    /// waiting row of that destination (free, or held by this claim) is due
    /// again after a backoff that grows with each refusal in a row, its
    /// attempts untouched. Other destinations go on; the broker's
    /// authorisation may allow it again at any time.
    async fn defer(
        &self,
        token: &str,
        m: &OutboxMessage,
        error: &PublishError,
    ) -> Result<(), Error> {
        let refusals = self
            .metrics
            .status
            .destination_refused(&m.destination, &error.message);
        let delay = self.config.outage_backoff.delay(refusals.saturating_sub(1));
        let now = crate::clock::now(self.outbox.pool()).await;
        let rows = self
            .outbox
            .store()
            .defer_destination(token, &m.destination, now + ms(delay), &error.message, now)
            .await?;
        self.metrics.add(RelayCounter::Deferred, rows);
        tracing::warn!(
            destination = m.destination,
            rows,
            refusals,
            ?delay,
            %error,
            "the broker refuses the destination to the relay's user; its rows are deferred, no attempt spent"
        );
        Ok(())
    }

    /// Records the broker's rejection of `m`: parked as `FAILED` (`park`),
    /// else due again `after` from now. Counted as the table has it: a row
    /// no longer held under `token` changes nothing.
    async fn reject(
        &self,
        token: &str,
        m: &OutboxMessage,
        park: bool,
        after: Duration,
        error: &PublishError,
    ) -> Result<(), Error> {
        let now = crate::clock::now(self.outbox.pool()).await;
        let next = now + ms(after);
        let (store, max) = (self.outbox.store(), self.config.max_attempts);
        let recorded = if park {
            store
                .park_rejected(token, m.id, max, &error.message, next, now)
                .await?
        } else {
            store
                .retry_rejected(token, m.id, max, &error.message, next, now)
                .await?
        };
        match (recorded, park) {
            (true, true) => {
                tracing::error!(event_id = m.event_id, %error, "event parked as FAILED");
                self.metrics.add(RelayCounter::Failed, 1);
            }
            (true, false) => {
                tracing::warn!(event_id = m.event_id, %error, "event rejected; will retry");
                self.metrics.add(RelayCounter::Retried, 1);
            }
            (false, _) => {
                tracing::debug!(event_id = m.event_id, %error, "rejected row no longer held; nothing recorded");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Budget, Verdict, decide};
    use crate::backoff::Backoff;
    use crate::error::PublishErrorKind::{Closed, Rejected, Unauthorized, Unavailable};
    use crate::event::OutboxMessage;

    fn row(id: i64, attempts: i64) -> OutboxMessage {
        OutboxMessage {
            id,
            event_id: format!("e{id}"),
            event_type: "Test".into(),
            destination: "/queue/test".into(),
            key: None,
            headers: Vec::new(),
            content: bytes::Bytes::new(),
            content_type: "application/json".into(),
            attempts,
            create_time: 0,
        }
    }

    fn budget(max_attempts: u32) -> Budget {
        Budget {
            max_attempts,
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
        }
    }

    #[test]
    fn a_closed_transport_stops_and_an_unreachable_broker_gives_back_whatever_the_rows() {
        for rows in [vec![row(1, 0)], vec![row(1, 9), row(2, 0)]] {
            assert_eq!(decide(Closed, &rows, &budget(3)), Verdict::Stop);
            assert_eq!(decide(Unavailable, &rows, &budget(3)), Verdict::GiveBack);
        }
    }

    #[test]
    fn a_refused_destination_defers_a_lone_row_whatever_its_attempts() {
        for attempts in [0, 2, 100] {
            let verdict = decide(Unauthorized, &[row(1, attempts)], &budget(3));
            assert_eq!(verdict, Verdict::Defer, "attempts {attempts}");
        }
    }

    #[test]
    fn a_batch_of_several_rows_refused_or_rejected_goes_one_by_one() {
        let rows = [row(1, 2), row(2, 0)];
        assert_eq!(decide(Rejected, &rows, &budget(3)), Verdict::OneByOne);
        assert_eq!(decide(Unauthorized, &rows, &budget(3)), Verdict::OneByOne);
        assert_eq!(decide(Rejected, &[], &budget(3)), Verdict::OneByOne);
    }

    #[test]
    fn a_rejected_row_is_parked_when_this_attempt_reaches_the_budget() {
        // (attempts so far, max_attempts, parked)
        for (attempts, max, parked) in [
            (0, 1, true),
            (0, 3, false),
            (1, 3, false),
            (2, 3, true),
            (7, 3, true),
            (0, 0, true),
            (-1, 1, false),
        ] {
            let verdict = decide(Rejected, &[row(1, attempts)], &budget(max));
            let is_park = matches!(verdict, Verdict::Park { .. });
            assert_eq!(
                is_park, parked,
                "attempts {attempts}, max {max}: {verdict:?}"
            );
        }
    }

    #[test]
    fn a_rejected_row_waits_the_backoff_of_its_attempts_so_far() {
        // Base 1 s doubling up to 60 s, with jitter in [0.5, 1].
        for (attempts, full) in [(0, 1_000), (1, 2_000), (3, 8_000), (20, 60_000)] {
            let verdict = decide(Rejected, &[row(1, attempts)], &budget(100));
            let Verdict::Retry { after } = verdict else {
                panic!("attempts {attempts}: {verdict:?}");
            };
            let after = after.as_millis();
            assert!(
                (full / 2..=full).contains(&after),
                "attempts {attempts}: {after} ms"
            );
        }
        let Verdict::Park { after } = decide(Rejected, &[row(1, 4)], &budget(5)) else {
            panic!("the fifth rejection of five parks the row");
        };
        assert!((8_000..=16_000).contains(&after.as_millis()));
    }
}
