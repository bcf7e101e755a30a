//! What a failed publish does to its rows: retried, parked, deferred, or
//! given back to the claim.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use tracing::Instrument;

use super::{Claimed, Count, PublishError, PublishErrorKind, Publisher, Relay, Step};
use crate::backend::Backend;
use crate::error::Error;
use crate::event::OutboxMessage;
use crate::failpoint;
use crate::names::{ms, now_ms};

impl<DB: Backend, P: Publisher> Relay<DB, P> {
    /// Gives back a batch claimed ahead whose predecessor failed. If that
    /// fails too, its rows stay leased to this relay until the lease runs
    /// out, and are claimed again then: late, never lost.
    pub(super) async fn give_back_claimed(&self, claimed: &Claimed) {
        if let Err(error) = self.release(claimed, None).await {
            self.metrics.add(Count::DbErrors, 1);
            tracing::warn!(%error, rows = claimed.batch.len(), "could not give back a batch; it is taken again when its lease runs out");
        }
    }

    /// Settles a batch whose publish failed.
    pub(super) async fn publish_failed(
        &self,
        claimed: &Claimed,
        error: PublishError,
    ) -> Result<Step, Error> {
        let n = claimed.batch.len();
        match error.kind {
            PublishErrorKind::Closed => self.closed(claimed, &error).await,
            PublishErrorKind::Unavailable => {
                tracing::warn!(%error, rows = n, "broker unavailable; batch released");
                self.unavailable(claimed, &error).await
            }
            PublishErrorKind::Unauthorized if n == 1 => {
                self.defer(&claimed.token, &claimed.batch[0], &error)
                    .await?;
                Ok(Step::Published(n))
            }
            _ if n == 1 => {
                self.reject(&claimed.token, &claimed.batch[0], &error)
                    .await?;
                Ok(Step::Published(n))
            }
            _ => {
                tracing::warn!(%error, rows = n, "batch rejected; publishing one by one");
                self.one_by_one(claimed).await
            }
        }
    }

    /// The broker could not be reached: count it, report it, give the batch
    /// back (the whole relay backs off next).
    async fn unavailable(&self, claimed: &Claimed, error: &PublishError) -> Result<Step, Error> {
        self.metrics.add(Count::Unavailable, 1);
        self.metrics.status.broker_failed(&error.message);
        self.release_failed(claimed, &error.message).await?;
        Ok(Step::Unavailable)
    }

    /// The transport stopped for good: give the rows back (another relay may
    /// publish them) and stop.
    async fn closed(&self, claimed: &Claimed, error: &PublishError) -> Result<Step, Error> {
        if let Err(release) = self.release_failed(claimed, &error.message).await {
            // The rows stay leased until the lease runs out; the relay stops anyway.
            tracing::warn!(error = %release, "could not give back a batch while stopping");
        }
        Ok(Step::Stopped(error.message.clone()))
    }

    /// After a rejected batch: find the culprits by publishing each row alone.
    /// A row whose destination is refused to the relay's user defers that
    /// destination; the batch's later rows of it are not tried.
    async fn one_by_one(&self, claimed: &Claimed) -> Result<Step, Error> {
        let (token, batch) = (claimed.token.as_str(), claimed.batch.as_slice());
        let mut blocked: HashSet<&str> = HashSet::new();
        let mut refused: HashSet<&str> = HashSet::new();
        for m in batch {
            if m.key.as_deref().is_some_and(|k| blocked.contains(k)) {
                continue;
            }
            if refused.contains(m.destination.as_str()) {
                // Per-key order: the key's later rows wait behind this one.
                if let Some(key) = &m.key {
                    blocked.insert(key);
                }
                continue;
            }
            // Row by row the batch can outlast its lease: each row's lease
            // is made whole first, and a row whose lease ran out (another
            // relay's by now) is left to that relay, its key's later rows
            // behind it.
            if !self.renew_for_one_publish(token, m.id).await? {
                if let Some(key) = &m.key {
                    blocked.insert(key);
                }
                continue;
            }
            let one = std::slice::from_ref(m);
            match self
                .publisher
                .publish(one)
                .instrument(crate::trace::publish_span(one))
                .await
            {
                Ok(()) => {
                    failpoint::hit("relay.after_receipt");
                    let store = self.outbox.store();
                    let now = crate::clock::now(store.pool()).await;
                    let mut conn = store.acquire().await?;
                    store.mark_published(&mut conn, token, &[m.id], now).await?;
                    self.metrics.add(Count::Published, 1);
                    self.metrics.status.succeeded();
                    self.metrics
                        .status
                        .destinations_accepted(std::iter::once(m.destination.as_str()));
                }
                Err(error) if error.kind == PublishErrorKind::Closed => {
                    return self.closed(claimed, &error).await;
                }
                Err(error) if error.kind == PublishErrorKind::Unavailable => {
                    return self.unavailable(claimed, &error).await;
                }
                Err(error) if error.kind == PublishErrorKind::Unauthorized => {
                    self.defer(token, m, &error).await?;
                    refused.insert(&m.destination);
                    if let Some(key) = &m.key {
                        blocked.insert(key);
                    }
                }
                Err(error) => {
                    self.reject(token, m, &error).await?;
                    if let Some(key) = &m.key {
                        blocked.insert(key);
                    }
                }
            }
        }
        // Rows held back behind a rejected row of their key.
        self.release(claimed, None).await?;
        Ok(Step::Published(batch.len()))
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

    /// Gives back the rows of a batch, named by id and token.
    pub(super) async fn release(
        &self,
        claimed: &Claimed,
        error: Option<&str>,
    ) -> Result<(), Error> {
        let ids: Vec<i64> = claimed.ids().collect();
        let mut conn = self.outbox.store().acquire().await?;
        self.give_back_ids(&mut conn, &claimed.token, &ids, error)
            .await
    }

    /// Gives back a batch whose publish failed; for a handed-off one also the
    /// rows handed off but not yet read, so other relays may take them while
    /// this one waits for the broker.
    async fn release_failed(&self, claimed: &Claimed, error: &str) -> Result<(), Error> {
        // Every row under the shared token only while the lock is held: a
        // relay that lost it may no longer speak for the token's rows; and
        // only while no published row waits for its mark under the token.
        if claimed.handed_off
            && self.owned.load(Ordering::Acquire)
            && !self.unmarked.load(Ordering::Acquire)
        {
            self.release_token(&claimed.token, Some(error)).await
        } else {
            self.release(claimed, Some(error)).await
        }
    }

    /// Gives back the rows `ids` held under `token`.
    pub(super) async fn give_back_ids(
        &self,
        conn: &mut DB::Connection,
        token: &str,
        ids: &[i64],
        error: Option<&str>,
    ) -> Result<(), Error> {
        self.outbox
            .store()
            .release_ids(conn, token, ids, error, now_ms())
            .await
    }

    /// Gives back every row held under `token`.
    pub(super) async fn release_token(
        &self,
        token: &str,
        error: Option<&str>,
    ) -> Result<(), Error> {
        self.outbox
            .store()
            .release_token(token, error, now_ms())
            .await
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
        self.metrics.add(Count::Deferred, rows);
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

    async fn reject(
        &self,
        token: &str,
        m: &OutboxMessage,
        error: &PublishError,
    ) -> Result<(), Error> {
        let attempts = u32::try_from(m.attempts).unwrap_or(u32::MAX);
        let now = crate::clock::now(self.outbox.pool()).await;
        let next = now + ms(self.config.retry_backoff.delay(attempts));
        let state = self
            .outbox
            .store()
            .reject(
                token,
                m.id,
                self.config.max_attempts,
                &error.message,
                next,
                now,
            )
            .await?;
        // Counted as the table has it: a row no longer held changed nothing.
        match state {
            Some(crate::store::OutboxState::Failed) => {
                tracing::error!(event_id = m.event_id, %error, "event parked as FAILED");
                self.metrics.add(Count::Failed, 1);
            }
            Some(_) => {
                tracing::warn!(event_id = m.event_id, %error, "event rejected; will retry");
                self.metrics.add(Count::Retried, 1);
            }
            None => {
                tracing::debug!(event_id = m.event_id, %error, "rejected row no longer held; nothing recorded");
            }
        }
        Ok(())
    }
}
