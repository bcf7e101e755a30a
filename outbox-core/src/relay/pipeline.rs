//! The pipeline: one turn publishes a batch while the next one is read,
//! so the database and the broker work at the same time.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use tracing::Instrument;

use super::failure::GiveBack;
use super::marks::Marks;
use super::{Claimed, PublishError, Publisher, Relay, RelayCounter, Step};
use crate::backend::Backend;
use crate::error::Error;
use crate::event::OutboxMessage;
use crate::failpoint;

impl<DB: Backend, P: Publisher> Relay<DB, P> {
    /// One turn of the pipeline. Batches go to the broker one after another
    /// on one connection, so a key's events keep their order. While batch i
    /// is on the wire, rows for batch i+1 are claimed; if batch i fails, a
    /// batch claimed meanwhile is given back unpublished. Rows handed off
    /// while a handed-off batch is on the wire follow it at once when they
    /// share no key with it ([`publish_handed_off`](Relay::publish_handed_off)).
    pub(super) async fn turn(
        &self,
        ready: &mut Option<Claimed>,
        marks: &mut Marks<DB>,
    ) -> Result<Step, Error> {
        match ready.take() {
            None => {
                let next = self.next_batch(&marks.ids(), false).await?;
                let step = if next.is_some() {
                    Step::Published(0)
                } else {
                    Step::Idle
                };
                *ready = next;
                Ok(step)
            }
            Some(current) if current.handed_off => {
                self.publish_handed_off(current, marks, ready).await
            }
            Some(current) => self.publish_claimed(current, marks, ready).await,
        }
    }

    /// Publishes a claimed batch while claiming the next one.
    async fn publish_claimed(
        &self,
        current: Claimed,
        marks: &mut Marks<DB>,
        ready: &mut Option<Claimed>,
    ) -> Result<Step, Error> {
        let mut in_flight = marks.ids();
        in_flight.extend(current.ids());
        let n = current.batch.len();
        failpoint::hit("relay.before_publish");
        let (published, following) = tokio::join!(
            self.publish(&current.batch),
            self.next_batch(&in_flight, true)
        );
        match published {
            Ok(()) => {
                failpoint::hit("relay.after_receipt");
                current.confirmed(&self.metrics);
                marks.push(current);
                *ready = following?;
                Ok(Step::Published(n))
            }
            Err(error) => {
                let behind = following.ok().flatten();
                self.failed(&current, behind.as_ref(), marks, error).await
            }
        }
    }

    /// Publishes a handed-off batch. Rows committed while it is on the wire
    /// are read at once and, if they share no key with it, published right
    /// behind it on the same connection (the broker keeps their order) instead
    /// of after its receipt; otherwise they become the next batch.
    async fn publish_handed_off(
        &self,
        current: Claimed,
        marks: &mut Marks<DB>,
        ready: &mut Option<Claimed>,
    ) -> Result<Step, Error> {
        let n = current.batch.len();
        let mut ahead = marks.ids();
        ahead.extend(current.ids());
        let (done, receipt) = tokio::sync::oneshot::channel::<()>();
        failpoint::hit("relay.before_publish");
        let (published, following) = tokio::join!(
            async {
                let published = self.publish(&current.batch).await;
                let _ = done.send(());
                published
            },
            self.follow(&current.batch, &ahead, receipt)
        );
        if let Err(error) = published {
            // The batch behind it goes back too, even if it arrived: it is
            // published again later (same event ids).
            let behind = match &following {
                Ok(Following::Read(next) | Following::Sent(next, _)) => Some(next),
                Ok(Following::Nothing) | Err(_) => None,
            };
            return self.failed(&current, behind, marks, error).await;
        }
        failpoint::hit("relay.after_receipt");
        current.confirmed(&self.metrics);
        marks.push(current);
        match following? {
            Following::Nothing => Ok(Step::Published(n)),
            Following::Read(next) => {
                *ready = Some(next);
                Ok(Step::Published(n))
            }
            Following::Sent(next, Ok(())) => {
                failpoint::hit("relay.after_receipt");
                next.confirmed(&self.metrics);
                let m = next.batch.len();
                marks.push(next);
                Ok(Step::Published(n + m))
            }
            Following::Sent(next, Err(error)) => self.failed(&next, None, marks, error).await,
        }
    }

    /// While `current` is on the wire: reads the rows handed off meanwhile
    /// (none of `ahead`) and, if they share no key with it, publishes them
    /// right behind it. Stops waiting once `receipt` says `current` is done.
    async fn follow(
        &self,
        current: &[OutboxMessage],
        ahead: &HashSet<i64>,
        receipt: tokio::sync::oneshot::Receiver<()>,
    ) -> Result<Following, Error> {
        // A wake-up may be left over from a commit this batch already
        // holds: then the read finds nothing and the next one is awaited.
        tokio::pin!(receipt);
        let next = loop {
            tokio::select! {
                biased;
                _ = &mut receipt => return Ok(Following::Nothing),
                _ = self.wake.notified() => {}
            }
            if let Some(next) = self.take_handed_off(ahead, false).await? {
                break next;
            }
        };
        if !shares_no_key(current, &next.batch) {
            return Ok(Following::Read(next));
        }
        failpoint::hit("relay.before_publish");
        let published = self.publish(&next.batch).await;
        Ok(Following::Sent(next, published))
    }

    /// A publish failed. A batch read behind it goes back unpublished; if
    /// that fails too, its rows stay leased to this relay until the lease
    /// runs out and are claimed again then: late, never lost. The published
    /// batches are marked first, since giving the failed batch back may give
    /// back every row under its token; then the failure is settled.
    async fn failed(
        &self,
        failed: &Claimed,
        behind: Option<&Claimed>,
        marks: &mut Marks<DB>,
        error: PublishError,
    ) -> Result<Step, Error> {
        if let Some(behind) = behind
            && let Err(error) = self.give_back(None, GiveBack::Batch(behind), None).await
        {
            self.metrics.add(RelayCounter::DbErrors, 1);
            tracing::warn!(%error, rows = behind.batch.len(), "could not give back a batch; it is taken again when its lease runs out");
        }
        marks.drain().await;
        self.unmarked
            .store(!marks.ids().is_empty(), Ordering::Release);
        self.publish_failed(failed, error).await
    }

    /// Publishes `batch` in one go, in a span of its own.
    pub(super) async fn publish(&self, batch: &[OutboxMessage]) -> Result<(), PublishError> {
        self.publisher
            .publish(batch)
            .instrument(crate::trace::publish_span(batch))
            .await
    }
}

/// What came of the rows handed off while a batch was on the wire.
enum Following {
    /// None came before the batch's receipt.
    Nothing,
    /// Rows that share a key with the batch: the next batch, published
    /// after its receipt.
    Read(Claimed),
    /// Rows published right behind the batch, and how that went.
    Sent(Claimed, Result<(), PublishError>),
}

/// `true` when no key has rows in both batches.
fn shares_no_key(a: &[OutboxMessage], b: &[OutboxMessage]) -> bool {
    let keys: HashSet<&str> = a.iter().filter_map(|m| m.key.as_deref()).collect();
    b.iter()
        .filter_map(|m| m.key.as_deref())
        .all(|k| !keys.contains(k))
}
