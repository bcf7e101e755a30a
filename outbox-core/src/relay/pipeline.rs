//! The pipeline: one turn publishes a batch while the next one is read,
//! so the database and the broker work at the same time.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use tracing::Instrument;

use super::marks::Marks;
use super::{Claimed, Publisher, Relay, Step};
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
            self.publisher
                .publish(&current.batch)
                .instrument(crate::trace::publish_span(&current.batch)),
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
                if let Ok(Some(next)) = following {
                    self.give_back_claimed(&next).await;
                }
                // Marked first: giving the batch back may give back every
                // row under its token.
                marks.drain().await;
                self.unmarked
                    .store(!marks.ids().is_empty(), Ordering::Release);
                self.publish_failed(&current, error).await
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
                let published = self
                    .publisher
                    .publish(&current.batch)
                    .instrument(crate::trace::publish_span(&current.batch))
                    .await;
                let _ = done.send(());
                published
            },
            async {
                // A wake-up may be left over from a commit this batch already
                // holds: then the read finds nothing and the next one is awaited.
                tokio::pin!(receipt);
                let next = loop {
                    tokio::select! {
                        biased;
                        _ = &mut receipt => return Ok(None),
                        _ = self.wake.notified() => {}
                    }
                    if let Some(next) = self.take_handed_off(&ahead, false).await? {
                        break next;
                    }
                };
                if !shares_no_key(&current.batch, &next.batch) {
                    return Ok(Some((next, None)));
                }
                failpoint::hit("relay.before_publish");
                let published = self
                    .publisher
                    .publish(&next.batch)
                    .instrument(crate::trace::publish_span(&next.batch))
                    .await;
                Ok::<_, Error>(Some((next, Some(published))))
            }
        );
        if let Err(error) = published {
            // The batch behind it goes back too, even if it arrived: it is
            // published again later (same event ids).
            if let Ok(Some((next, _))) = following {
                self.give_back_claimed(&next).await;
            }
            marks.drain().await;
            self.unmarked
                .store(!marks.ids().is_empty(), Ordering::Release);
            return self.publish_failed(&current, error).await;
        }
        failpoint::hit("relay.after_receipt");
        current.confirmed(&self.metrics);
        marks.push(current);
        match following {
            Ok(None) => Ok(Step::Published(n)),
            Ok(Some((next, None))) => {
                *ready = Some(next);
                Ok(Step::Published(n))
            }
            Ok(Some((next, Some(Ok(()))))) => {
                failpoint::hit("relay.after_receipt");
                next.confirmed(&self.metrics);
                let m = next.batch.len();
                marks.push(next);
                Ok(Step::Published(n + m))
            }
            Ok(Some((next, Some(Err(error))))) => {
                marks.drain().await;
                self.unmarked
                    .store(!marks.ids().is_empty(), Ordering::Release);
                self.publish_failed(&next, error).await
            }
            Err(error) => Err(error),
        }
    }
}

/// `true` when no key has rows in both batches.
fn shares_no_key(a: &[OutboxMessage], b: &[OutboxMessage]) -> bool {
    let keys: HashSet<&str> = a.iter().filter_map(|m| m.key.as_deref()).collect();
    b.iter()
        .filter_map(|m| m.key.as_deref())
        .all(|k| !keys.contains(k))
}
