//! A relay's life: it takes the lock on its `relay_id`, starts the tasks
//! beside its loop (lock keeper, listener, membership, retention, figures),
//! runs the loop until asked to stop or until the broker is gone, and then
//! finishes what is in flight.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::failure::GiveBack;
use super::housekeeping::{read_figures, retention_loop};
use super::marks::{Marker, Marks};
use super::owner;
use super::pacing::{Next, Pacing};
use super::share::Membership;
use super::{Claimed, Publisher, Relay, RelayCounter};
use crate::Outbox;
use crate::backend::Backend;
use crate::error::Error;
use crate::names::ms;
use crate::wake::{self, Handoff};

impl<DB: Backend, P: Publisher> Relay<DB, P> {
    /// Registers for in-process wake-ups and, if enabled, for hand-off. The
    /// hand-off lasts as long as the returned `Arc`.
    pub(super) fn offer_handoff(&self) -> Option<Arc<Handoff>> {
        let table = self.outbox.table();
        wake::register(table, &self.wake);
        self.config.handoff.then(|| {
            let handoff = Arc::new(Handoff {
                token: self.handoff_token.clone(),
                lease_ms: ms(self.config.lease),
                active: AtomicBool::new(true),
            });
            wake::register_handoff(table, self.outbox.inner.pool_id, &handoff);
            handoff
        })
    }

    /// Runs the relay: takes the lock on its `relay_id`, starts the tasks
    /// beside its loop, runs the loop until `shutdown` completes or the
    /// broker is gone for good, then finishes what is in flight. The lock is
    /// given up last.
    pub(super) async fn run_with(
        self,
        shutdown: impl Future<Output = ()> + Send,
        handoff: Option<Arc<Handoff>>,
    ) -> Result<(), Error> {
        tokio::pin!(shutdown);
        // Nothing is taken before this relay is the only one of its
        // `relay_id` on the table.
        let lock = match self.take_lock(&mut shutdown).await {
            Ok(Some(lock)) => lock,
            Ok(None) => {
                tracing::info!(relay = %self.config.relay_id, "relay stopped before it could run");
                return Ok(());
            }
            Err(error) => return Err(error),
        };
        self.owned.store(true, Ordering::Release);
        let (stop_keeping, stop) = tokio::sync::oneshot::channel();
        let keeper = AbortOnDrop(tokio::spawn(keep_lock(
            lock,
            self.outbox.clone(),
            self.config.relay_id.clone(),
            self.owned.clone(),
            stop,
        )));
        let mut beside = self.start_beside().await;
        // Published batches are marked in the background; until then their
        // rows count as ahead of everything read.
        let mut marks = Marks::new(Marker {
            outbox: self.outbox.clone(),
            metrics: self.metrics.clone(),
            backoff: self.config.outage_backoff,
        });
        let mut ready: Option<Claimed> = None;
        let table = self.outbox.table();
        tracing::info!(relay = %self.config.relay_id, table, "relay started");
        let pacing = Pacing::new(&self.config, handoff.clone());
        let stopped = self
            .run_loop(pacing, &mut shutdown, &mut ready, &mut marks)
            .await;
        beside.leave().await;
        let ended = self.finish(ready, marks, handoff, stopped).await;
        // Given up last: a relay that takes it next finds nothing of this
        // one's still under way.
        let _ = stop_keeping.send(());
        let _ = keeper.finish().await;
        ended
    }

    /// Starts what runs beside the loop: the database's wake-ups, the
    /// metrics, the figures, the membership among the table's relays and
    /// retention.
    async fn start_beside(&self) -> Beside<DB> {
        let table = self.outbox.table();
        // Ends with the run however it ends: returned, failed or dropped.
        let listener = DB::listen(self.outbox.pool(), table, self.wake.clone()).map(AbortOnDrop);
        self.metrics.register(table);
        if let Some(link) = self.publisher.link() {
            self.metrics.status.set_link(link);
        }
        let figures = self.config.stats_interval.map(|every| {
            AbortOnDrop(tokio::spawn(read_figures(
                self.outbox.clone(),
                self.metrics.clone(),
                every,
            )))
        });
        let membership = self.join().await;
        let renewing = membership
            .clone()
            .map(|m| AbortOnDrop(tokio::spawn(m.keep_renewing())));
        // Retention runs beside the pipeline: a first pass over millions of
        // old rows must not hold up publishing (and the claimed batch's lease).
        let retention = self.config.retention.map(|keep| {
            AbortOnDrop(tokio::spawn(retention_loop(
                self.outbox.clone(),
                self.metrics.clone(),
                self.config.clone(),
                keep,
            )))
        });
        Beside {
            _listener: listener,
            _figures: figures,
            _retention: retention,
            renewing,
            membership,
        }
    }

    /// The loop: a turn, then a pause as `pacing` says, until `shutdown`
    /// completes (`None`) or the broker is gone for good (why). Hand-off is
    /// withdrawn when it ends.
    async fn run_loop(
        &self,
        mut pacing: Pacing,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
        ready: &mut Option<Claimed>,
        marks: &mut Marks<DB>,
    ) -> Option<String> {
        let stopped = loop {
            marks.advance().await;
            let outcome = self.turn(ready, marks).await;
            let pause = match pacing.after(outcome, &self.metrics) {
                Next::Go(pause) => pause,
                Next::Stop(reason) => break Some(reason),
            };
            if self.wait(pause, shutdown, marks).await {
                break None;
            }
        };
        pacing.offer(false);
        stopped
    }

    /// Waits until this relay holds the lock on its `relay_id` and table;
    /// `None` if `shutdown` completes first. Database errors are retried;
    /// a SQLite lock file that cannot be opened is an error.
    async fn take_lock(
        &self,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<Option<owner::OwnerLock<DB>>, Error> {
        let mut spare = None;
        let mut warned = false;
        loop {
            match owner::OwnerLock::try_take(
                self.outbox.pool(),
                self.outbox.table(),
                &self.config.relay_id,
                &mut spare,
            )
            .await
            {
                Ok(Some(lock)) => {
                    if warned {
                        tracing::info!(relay = %self.config.relay_id, "the other relay of this relay_id stopped; starting");
                    }
                    return Ok(Some(lock));
                }
                Ok(None) => {
                    if !warned {
                        warned = true;
                        tracing::warn!(
                            relay = %self.config.relay_id,
                            table = self.outbox.table(),
                            "another relay runs under this relay_id on this table; waiting until it stops"
                        );
                    }
                }
                Err(error @ Error::RelayLockFile { .. }) => return Err(error),
                Err(error) => {
                    self.metrics.add(RelayCounter::DbErrors, 1);
                    self.metrics.status.database_failed(&error);
                    tracing::warn!(%error, "could not take the relay's lock; trying again");
                }
            }
            tokio::select! {
                _ = shutdown.as_mut() => return Ok(None),
                _ = tokio::time::sleep(LOCK_RETRY) => {}
            }
        }
    }

    /// Joins the relays of the table (with [`RelayConfig::key_partitions`]):
    /// the first renewal sets this relay's share before its first claim.
    async fn join(&self) -> Option<Arc<Membership<DB>>> {
        if !self.config.key_partitions {
            return None;
        }
        let membership = Arc::new(Membership::new(
            self.outbox.pool().clone(),
            self.outbox.table(),
            &self.config.relay_id,
            &self.incarnation,
            self.config.lease,
            self.share.clone(),
        ));
        if let Err(error) = membership.renew().await {
            tracing::warn!(%error, "could not join the relays of the table yet; claiming from every partition");
        }
        Some(membership)
    }

    /// Waits `pause` (none: only checks for shutdown), waking early for a
    /// commit; `true` when asked to stop.
    async fn wait(
        &self,
        pause: Option<std::time::Duration>,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
        marks: &mut Marks<DB>,
    ) -> bool {
        let Some(pause) = pause else {
            return futures_poll_ready(shutdown).await;
        };
        let sleep = tokio::time::sleep(pause);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = shutdown.as_mut() => return true,
                _ = self.wake.notified() => return false,
                _ = &mut sleep => return false,
                // A finished mark may leave more to mark; keep waiting.
                _ = marks.finish(), if marks.is_running() => marks.start(),
            }
        }
    }

    /// Finishes what is in flight: marks the published batches, gives back
    /// the claimed one and the rows handed off but not yet read. Each step
    /// is tried even if one before it failed; rows not given back stay
    /// leased and are taken by any relay when the lease runs out.
    async fn finish(
        &self,
        mut ready: Option<Claimed>,
        mut marks: Marks<DB>,
        handoff: Option<Arc<Handoff>>,
        stopped: Option<String>,
    ) -> Result<(), Error> {
        let mut ended = marks.settle().await;
        if let Some(claimed) = ready.take() {
            ended = ended.and(self.give_back(None, GiveBack::Batch(&claimed), None).await);
        }
        if handoff.is_some() && self.owned.load(Ordering::Acquire) {
            let all = GiveBack::Token(&self.handoff_token);
            ended = ended.and(self.give_back(None, all, None).await);
        }
        drop(handoff);
        if let Err(error) = &ended {
            tracing::warn!(relay = %self.config.relay_id, %error, "relay stopped; some rows stay leased until their lease runs out");
        }
        if let Some(reason) = stopped {
            tracing::error!(relay = %self.config.relay_id, %reason, "relay stopped: the broker connection ended for good");
            self.metrics.stopped();
            return Err(Error::BrokerGone(reason));
        }
        tracing::info!(relay = %self.config.relay_id, "relay stopped");
        ended
    }
}

/// How long a relay waits between tries to take its `relay_id`'s lock.
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

/// How often a relay checks that its lock's session is still there.
const LOCK_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Holds the relay's lock until `stop`, then gives it up. A lock whose
/// session ended (connection cut, server restart, session killed) is
/// noticed within [`LOCK_CHECK`]: `owned` is cleared, so the relay leaves
/// the hand-off token's rows alone, and the lock is taken again as soon as
/// it is free.
async fn keep_lock<DB: Backend>(
    lock: owner::OwnerLock<DB>,
    outbox: Outbox<DB>,
    relay_id: String,
    owned: Arc<AtomicBool>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut lock = Some(lock);
    let mut spare = None;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(LOCK_CHECK) => {}
        }
        match lock.as_mut() {
            Some(held) => {
                if !held.still_held().await {
                    owned.store(false, Ordering::Release);
                    lock = None;
                    tracing::warn!(relay = %relay_id, "the session holding the relay's lock ended; leaving handed-off rows alone until it is taken again");
                }
            }
            None => {
                let taking = owner::OwnerLock::try_take(
                    outbox.pool(),
                    outbox.table(),
                    &relay_id,
                    &mut spare,
                );
                // A try that hangs (a half-open link to the database) is
                // abandoned and made again at the next check.
                match tokio::time::timeout(LOCK_CHECK * 5, taking)
                    .await
                    .unwrap_or(Ok(None))
                {
                    Ok(Some(taken)) => {
                        lock = Some(taken);
                        owned.store(true, Ordering::Release);
                        tracing::info!(relay = %relay_id, "relay's lock taken again");
                    }
                    Ok(None) => {}
                    Err(error) => {
                        tracing::debug!(%error, "could not take the relay's lock again yet")
                    }
                }
            }
        }
    }
    owned.store(false, Ordering::Release);
    if let Some(lock) = lock {
        lock.release().await;
    }
}

/// The tasks that run beside a relay's loop; each stops when this is dropped.
struct Beside<DB: Backend> {
    _listener: Option<AbortOnDrop>,
    _figures: Option<AbortOnDrop>,
    _retention: Option<AbortOnDrop>,
    renewing: Option<AbortOnDrop>,
    membership: Option<Arc<Membership<DB>>>,
}

impl<DB: Backend> Beside<DB> {
    /// Leaves the relays of the table: the others take this relay's
    /// partitions at once.
    async fn leave(&mut self) {
        self.renewing = None;
        if let Some(membership) = self.membership.take()
            && let Err(error) = membership.leave().await
        {
            tracing::warn!(%error, "could not leave the relays of the table; the others take this relay's partitions when its membership runs out");
        }
    }
}

/// A background task that is stopped when this handle is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    /// Waits for the task to end by itself.
    async fn finish(mut self) -> Result<(), tokio::task::JoinError> {
        let handle = std::mem::replace(&mut self.0, tokio::spawn(async {}));
        handle.await
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `true` if `shutdown` has completed, without waiting.
async fn futures_poll_ready<F: Future<Output = ()>>(shutdown: &mut std::pin::Pin<&mut F>) -> bool {
    tokio::select! {
        biased;
        _ = shutdown.as_mut() => true,
        _ = std::future::ready(()) => false,
    }
}
