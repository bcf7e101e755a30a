//! A retry pass: the `RETRY` rows whose time has come, each applied again
//! inside the transaction that takes it. What becomes of a row whose retry
//! fails is [`after_failure`]'s decision, as for a fresh delivery.

use std::collections::HashMap;

use crate::Error;
use crate::backend::{Backend, HandlerTx};
use crate::backoff::Backoff;
use crate::inbox::Delivery;
use crate::names::now_ms;
use crate::store::inbox::DueRow;

use super::apply::{log_failed_try, run_checked};
use super::columns::error_text;
use super::failure::{Failure, Next, Tally, TryFailed, after_failure};
use super::handler::{Handler, after_commit, decode};
use super::metrics::ConsumerCounter;
use super::shared::Shared;

#[cfg(doc)]
use super::config::ConsumerConfig;

/// What went wrong so far with each retry row (by id) the last pass saw
/// the database refuse: its database errors in a row.
#[derive(Debug, Default)]
pub(super) struct RowErrors(pub(super) HashMap<i64, Tally>);

/// Handles due retry rows once; returns how many were settled (applied,
/// failed again or parked). A row the database refuses is a failure of its
/// own: the rows after it are still tried, and [`after_failure`] parks it
/// with the error after [`ConsumerConfig::max_attempts`] errors its data
/// causes, or [`ConsumerConfig::recurring_error_limit`] the database
/// answered with, in a row. A database that cannot be reached ends the pass.
pub(super) async fn retry_due<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    errors: &mut RowErrors,
) -> Result<usize, Error> {
    let store = &shared.inbox.store;
    let due = store
        .due(now_ms(), 100, shared.config.per_key_order)
        .await?;
    let mut settled = 0;
    for (id, reason) in &due.unreadable {
        tracing::error!(row = id, reason, "retry row parked: it cannot be read");
        // A budget of 0: parked whatever its attempts.
        store
            .fail_retry(*id, 0, &error_text(reason), now_ms(), now_ms())
            .await?;
        shared.metrics.add(ConsumerCounter::Failed, 1);
        settled += 1;
    }
    let rows = due.rows;
    for row in &rows {
        let error = match retry_one(shared, row).await {
            Ok(()) => {
                errors.0.remove(&row.id);
                settled += 1;
                continue;
            }
            Err(error) => error,
        };
        shared.metrics.add(ConsumerCounter::DbErrors, 1);
        shared.metrics.status.database_failed(&error);
        let failure = Failure::of(&error);
        if failure == Failure::Unreachable {
            return Err(error);
        }
        if refused(shared, row, &error, failure, errors).await {
            settled += 1;
        }
    }
    // Rows no longer due (settled elsewhere, or waiting their backoff) start
    // afresh.
    errors
        .0
        .retain(|id, _| rows.iter().any(|row| row.id == *id));
    Ok(settled)
}

/// Counts a database error on retry row `row` and parks the row if
/// [`after_failure`] says so; `true` if it was parked. Until then the row is
/// tried again at the next pass.
async fn refused<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    row: &DueRow,
    error: &Error,
    failure: Failure,
    errors: &mut RowErrors,
) -> bool {
    let event_id = &row.delivery.event_id;
    let so_far = errors
        .0
        .get(&row.id)
        .copied()
        .unwrap_or(Tally::spent(row.attempts));
    let (next, tally) = after_failure(failure, so_far, &shared.config, now_ms(), Backoff::jitter());
    errors.0.insert(row.id, tally);
    if !next.parks() {
        tracing::warn!(%error, event_id, "retry not settled; will try again");
        return false;
    }
    let reason = error_text(&format!("cannot be retried: {error}"));
    tracing::error!(event_id, %error, "retry row parked: the database refuses it");
    // A budget of 0: parked whatever its attempts.
    let now = now_ms();
    match shared
        .inbox
        .store
        .fail_retry(row.id, 0, &reason, now, now)
        .await
    {
        Ok(()) => {
            errors.0.remove(&row.id);
            shared.metrics.add(ConsumerCounter::Failed, 1);
            true
        }
        Err(error) => {
            tracing::warn!(%error, event_id, "could not park the retry row");
            false
        }
    }
}

/// Retries one row: takes it (switched to `PROCESSED` inside the handler's
/// transaction, so two processes retrying it are harmless), applies it, and
/// records a failed try as [`after_failure`] decides. `Err` only for
/// database trouble.
async fn retry_one<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    row: &DueRow,
) -> Result<(), Error> {
    let store = &shared.inbox.store;
    let _turn = shared.gate.enter().await;
    let mut tx = HandlerTx::<DB>::begin(store.pool())
        .await
        .map_err(Error::db("beginning a retry"))?;
    if !store.take_retry(&mut tx, row.id, now_ms()).await? {
        // Another process took it meanwhile.
        let _ = tx.rollback().await;
        return Ok(());
    }
    match try_again(shared, tx, &row.delivery).await? {
        Ok(()) => {
            applied(shared, row);
            Ok(())
        }
        Err(failed) => record_failed_retry(shared, row, failed).await,
    }
}

/// Decodes, applies and commits a taken retry row in `tx`. `Ok(Err(_))`
/// when the try failed: its payload does not decode, its handler failed,
/// or the database refused its commit for good (a constraint checked at
/// commit fails every time: an attempt spent, like a failing handler).
async fn try_again<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    mut tx: HandlerTx<DB>,
    delivery: &Delivery,
) -> Result<Result<(), TryFailed>, Error> {
    let tried = match decode(&shared.handler, delivery) {
        Ok(event) => run_checked(shared, &mut tx, event, delivery).await?,
        Err(reason) => Err(TryFailed::undecodable(reason)),
    };
    if let Err(failed) = tried {
        let _ = tx.rollback().await;
        return Ok(Err(failed));
    }
    match tx.commit().await {
        Ok(()) => Ok(Ok(())),
        Err(error) => {
            let error = Error::db("committing a retry")(error);
            if !error.is_permanent() {
                return Err(error);
            }
            Ok(Err(TryFailed::handler(error.to_string())))
        }
    }
}

/// A retried row is in: counted, and logged as the end of a story the log
/// told in WARNs (or an ERROR before a replay).
fn applied<DB: Backend, H: Handler<DB>>(shared: &Shared<DB, H>, row: &DueRow) {
    let delivery = &row.delivery;
    after_commit(&shared.handler, delivery);
    shared.metrics.add(ConsumerCounter::Processed, 1);
    tracing::info!(
        event_id = delivery.event_id,
        event_type = delivery.event_type.as_deref(),
        key = delivery.key.as_deref(),
        // This try's number within the row's budget: a replay starts the
        // count again.
        attempt = row.attempts + 1,
        "event applied on a retry after a failure, a replay or a wait for its key"
    );
}

/// Records a failed retry as [`after_failure`] decides: one attempt more on
/// the row, due again after the backoff, or parked.
async fn record_failed_retry<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    row: &DueRow,
    failed: TryFailed,
) -> Result<(), Error> {
    let (config, now) = (&shared.config, now_ms());
    let so_far = Tally::spent(row.attempts);
    let (next, _) = after_failure(failed.failure, so_far, config, now, Backoff::jitter());
    if failed.failure == Failure::Handler {
        shared.metrics.add(ConsumerCounter::HandlerFailures, 1);
    }
    let failed = TryFailed {
        reason: error_text(&failed.reason),
        ..failed
    };
    // The store parks the row when its attempts reach the budget: 0 parks
    // it now; the full budget leaves it retrying unless another process
    // spent its attempts meanwhile.
    let (budget, at) = match next {
        Next::Park { .. } => (0, now),
        Next::Retry { at, .. } => (i64::from(config.max_attempts), at),
        Next::TryAgain { .. } => (i64::from(config.max_attempts), now),
    };
    let store = &shared.inbox.store;
    store
        .fail_retry(row.id, budget, &failed.reason, at, now)
        .await?;
    log_failed_try(&row.delivery, &failed, &next, config.max_attempts);
    let count = if next.parks() {
        ConsumerCounter::Failed
    } else {
        ConsumerCounter::Retried
    };
    shared.metrics.add(count, 1);
    Ok(())
}
