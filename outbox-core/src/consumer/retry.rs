//! A retry pass: the `RETRY` rows whose time has come, each applied again
//! inside the transaction that takes it.

use crate::Error;
use crate::backend::{Backend, HandlerTx};
use crate::names::{ms, now_ms};
use crate::store::inbox::DueRow;

use super::apply::{log_failed_attempt, undone};
use super::columns::error_text;
use super::handler::{Handler, after_commit, decode, run_handler};
use super::metrics::Count;
use super::settle::recurs;
use super::shared::Shared;

#[cfg(doc)]
use super::config::ConsumerConfig;

/// Database errors in a row per retry row (by id) of the rows the last pass
/// saw fail.
#[derive(Debug, Default)]
pub(super) struct RowErrors(pub(super) std::collections::HashMap<i64, u32>);

/// Handles due retry rows once; returns how many were settled (applied,
/// failed again or parked). A row the database refuses is a failure of its
/// own: the rows after it are still tried, and one refused
/// [`ConsumerConfig::recurring_error_limit`] times in a row is parked with
/// the error. A database that cannot be reached ends the pass.
pub(super) async fn retry_due<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    errors: &mut RowErrors,
) -> Result<usize, Error> {
    let due = shared
        .inbox
        .store
        .due(now_ms(), 100, shared.config.per_key_order)
        .await?;
    let mut settled = 0;
    for (id, reason) in &due.unreadable {
        tracing::error!(row = id, reason, "retry row parked: it cannot be read");
        // A budget of 0: parked whatever its attempts.
        shared
            .inbox
            .store
            .fail_retry(*id, 0, &error_text(reason), now_ms(), now_ms())
            .await?;
        shared.metrics.add(Count::Failed, 1);
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
        shared.metrics.add(Count::DbErrors, 1);
        shared.metrics.status.database_failed(&error);
        if !recurs(&error) {
            return Err(error);
        }
        let seen = errors.0.entry(row.id).or_insert(0);
        *seen += 1;
        if *seen < shared.config.recurring_error_limit {
            tracing::warn!(%error, event_id = row.delivery.event_id, "retry not settled; will try again");
            continue;
        }
        let reason = error_text(&format!("cannot be retried: {error}"));
        tracing::error!(event_id = row.delivery.event_id, %error, "retry row parked: the database refuses it");
        // A budget of 0: parked whatever its attempts.
        match shared
            .inbox
            .store
            .fail_retry(row.id, 0, &reason, now_ms(), now_ms())
            .await
        {
            Ok(()) => {
                errors.0.remove(&row.id);
                shared.metrics.add(Count::Failed, 1);
                settled += 1;
            }
            Err(error) => {
                tracing::warn!(%error, event_id = row.delivery.event_id, "could not park the retry row");
            }
        }
    }
    // Rows no longer due (settled elsewhere, or waiting their backoff) start
    // afresh.
    errors
        .0
        .retain(|id, _| rows.iter().any(|row| row.id == *id));
    Ok(settled)
}

pub(super) async fn retry_one<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    row: &DueRow,
) -> Result<(), Error> {
    let (id, attempts, delivery) = (row.id, row.attempts, &row.delivery);
    let store = &shared.inbox.store;
    let _turn = shared.gate.enter().await;
    let mut tx = HandlerTx::<DB>::begin(store.pool())
        .await
        .map_err(Error::db("beginning a retry"))?;
    if !store.take_retry(&mut tx, id, now_ms()).await? {
        // Another process took it meanwhile.
        let _ = tx.rollback().await;
        return Ok(());
    }
    let result = match decode(&shared.handler, delivery) {
        Ok(event) => match run_handler(
            &shared.handler,
            shared.config.handler_timeout,
            &mut tx,
            event,
            delivery,
        )
        .await
        {
            Ok(()) => match undone(&shared.inbox, &mut tx, &[&delivery.event_id]).await? {
                None => Ok(()),
                Some(reason) => Err((reason, false)),
            },
            Err(error) => Err((error.to_string(), false)),
        },
        Err(reason) => Err((reason, true)),
    };
    let result = match result {
        Ok(()) => match tx.commit().await {
            Ok(()) => Ok(()),
            // A constraint checked at commit fails every time: an attempt
            // spent, like a failing handler.
            Err(error) => {
                let error = Error::db("committing a retry")(error);
                if !error.is_permanent() {
                    return Err(error);
                }
                Err((error.to_string(), false))
            }
        },
        Err(failed) => {
            let _ = tx.rollback().await;
            Err(failed)
        }
    };
    // This try's number within the row's budget: a replay starts the
    // count again.
    let attempt = attempts + 1;
    match result {
        Ok(()) => {
            after_commit(&shared.handler, delivery);
            shared.metrics.add(Count::Processed, 1);
            // The end of a story the log told in WARNs (or an ERROR before a
            // replay): the event is in.
            tracing::info!(
                event_id = delivery.event_id,
                event_type = delivery.event_type.as_deref(),
                key = delivery.key.as_deref(),
                attempt,
                "event applied on a retry after a failure, a replay or a wait for its key"
            );
            Ok(())
        }
        Err((reason, undecodable)) => {
            if !undecodable {
                shared.metrics.handler_failed();
            }
            let reason = error_text(&reason);
            let budget = if undecodable {
                0
            } else {
                i64::from(shared.config.max_attempts)
            };
            let spent = attempt >= budget;
            let delay = shared
                .config
                .retry_backoff
                .delay(u32::try_from(attempts).unwrap_or(u32::MAX));
            let next = now_ms() + ms(delay);
            store
                .fail_retry(id, budget, &reason, next, now_ms())
                .await?;
            if undecodable {
                tracing::error!(
                    event_id = delivery.event_id,
                    event_type = delivery.event_type.as_deref(),
                    key = delivery.key.as_deref(),
                    reason,
                    "undecodable payload parked"
                );
            } else {
                log_failed_attempt(
                    delivery,
                    attempt,
                    shared.config.max_attempts,
                    spent,
                    delay,
                    &reason,
                );
            }
            if spent {
                shared.metrics.add(Count::Failed, 1);
            } else {
                shared.metrics.add(Count::Retried, 1);
            }
            Ok(())
        }
    }
}
