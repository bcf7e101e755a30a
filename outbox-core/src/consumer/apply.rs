//! One attempt at fresh deliveries, each attempt in one database
//! transaction: the inbox row and the handler's writes commit together.

use std::time::Duration;

use sqlx::Transaction;

use crate::backend::{Backend, HandlerTx};
use crate::inbox::{Delivery, Inbox};
use crate::names::{ms, now_ms};
use crate::store::{InboxState, Recorded};
use crate::{Error, failpoint};

use super::columns::error_text;
use super::handler::{Handler, after_commit, decode, run_handler};
use super::metrics::Outcome;
use super::shared::Shared;

/// Several fresh deliveries in one database transaction: one commit settles
/// them all. Optimistic: if any of them turns out to be a duplicate or its
/// handler fails, the transaction is rolled back and the deliveries are
/// processed one by one, each in its own transaction — so a failing handler
/// never undoes another event's work. `Err` only for database trouble (then
/// nothing is acked).
pub(super) async fn process_batch<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    deliveries: &[Delivery],
) -> Result<Vec<Outcome>, Error> {
    let inbox = &shared.inbox;
    let mut outcomes: Vec<Option<Outcome>> = deliveries.iter().map(|_| None).collect();
    let mut todo = Vec::with_capacity(deliveries.len());
    for (i, delivery) in deliveries.iter().enumerate() {
        match decode(&shared.handler, delivery) {
            Ok(event) => todo.push((i, event)),
            Err(reason) => outcomes[i] = Some(park_undecodable(inbox, delivery, &reason).await?),
        }
    }
    let mut one_by_one = false;
    if shared.config.per_key_order {
        // One query for the batch: any key with an earlier event waiting
        // sends the whole batch one by one, where each event is checked alone.
        let mut keys: Vec<&str> = todo
            .iter()
            .filter_map(|(i, _)| deliveries[*i].key.as_deref())
            .collect();
        keys.sort_unstable();
        keys.dedup();
        one_by_one = inbox.store.keys_pending(&keys).await?;
    }
    if !one_by_one && !todo.is_empty() {
        let _turn = shared.gate.enter().await;
        let mut tx = HandlerTx::<DB>::begin(inbox.pool())
            .await
            .map_err(Error::db("beginning an inbox transaction"))?;
        let mut applied = Vec::with_capacity(todo.len());
        let rows: Vec<&Delivery> = todo.iter().map(|(i, _)| &deliveries[*i]).collect();
        let mut clean = inbox
            .store
            .record_processed(&mut tx, &rows, now_ms())
            .await?
            == Recorded::New;
        if clean {
            for (i, event) in todo {
                let delivery = &deliveries[i];
                if run_handler(
                    &shared.handler,
                    shared.config.handler_timeout,
                    &mut tx,
                    event,
                    delivery,
                )
                .await
                .is_err()
                {
                    clean = false;
                    break;
                }
                applied.push(i);
            }
        }
        if clean {
            let ids: Vec<&str> = applied
                .iter()
                .map(|&i| deliveries[i].event_id.as_str())
                .collect();
            if let Some(reason) = undone(inbox, &mut tx, &ids).await? {
                tracing::warn!(
                    reason,
                    messages = ids.len(),
                    "a handler's transaction was undone; applying the batch one by one"
                );
                clean = false;
            }
        }
        if clean {
            failpoint::hit("inbox.before_commit");
            tx.commit()
                .await
                .map_err(Error::db("committing an inbox transaction"))?;
            for &i in &applied {
                after_commit(&shared.handler, &deliveries[i]);
                outcomes[i] = Some(Outcome::Processed);
            }
        } else {
            let _ = tx.rollback().await;
            one_by_one = true;
        }
    }
    if one_by_one {
        for (i, delivery) in deliveries.iter().enumerate() {
            if outcomes[i].is_none() {
                outcomes[i] = Some(process(shared, delivery).await?);
            }
        }
    }
    Ok(outcomes
        .into_iter()
        .map(|o| o.unwrap_or(Outcome::Duplicate))
        .collect())
}

/// One attempt at a fresh delivery. `Err` only for database trouble.
pub(super) async fn process<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    delivery: &Delivery,
) -> Result<Outcome, Error> {
    let inbox = &shared.inbox;
    let event = match decode(&shared.handler, delivery) {
        Ok(event) => event,
        Err(reason) => return park_undecodable(inbox, delivery, &reason).await,
    };
    if shared.config.per_key_order
        && let Some(key) = &delivery.key
        && inbox.store.keys_pending(&[key]).await?
    {
        // An earlier event of this key waits for a retry: queue behind it,
        // with no attempt spent (its handler has not run).
        let waiting = "waiting for an earlier event of its key";
        return set_aside(
            inbox,
            delivery,
            InboxState::Retry,
            0,
            waiting,
            Some(now_ms()),
        )
        .await;
    }
    let _turn = shared.gate.enter().await;
    let mut tx = HandlerTx::<DB>::begin(inbox.pool())
        .await
        .map_err(Error::db("beginning an inbox transaction"))?;
    if inbox
        .store
        .record(
            &mut tx,
            delivery,
            InboxState::Processed,
            1,
            None,
            None,
            now_ms(),
        )
        .await?
        == Recorded::Duplicate
    {
        let _ = tx.rollback().await;
        return Ok(Outcome::Duplicate);
    }
    let result = match run_handler(
        &shared.handler,
        shared.config.handler_timeout,
        &mut tx,
        event,
        delivery,
    )
    .await
    {
        Ok(()) => match undone(inbox, &mut tx, &[&delivery.event_id]).await? {
            None => Ok(()),
            Some(reason) => Err(reason),
        },
        Err(error) => Err(error.to_string()),
    };
    match result {
        Ok(()) => {
            failpoint::hit("inbox.before_commit");
            tx.commit()
                .await
                .map_err(Error::db("committing an inbox transaction"))?;
            after_commit(&shared.handler, delivery);
            Ok(Outcome::Processed)
        }
        Err(reason) => {
            let _ = tx.rollback().await;
            shared.metrics.handler_failed();
            let delay = shared.config.retry_backoff.delay(0);
            let parked = shared.config.max_attempts <= 1;
            log_failed_attempt(
                delivery,
                1,
                shared.config.max_attempts,
                parked,
                delay,
                &reason,
            );
            let next = now_ms() + ms(delay);
            let state = if parked {
                InboxState::Failed
            } else {
                InboxState::Retry
            };
            set_aside(inbox, delivery, state, 1, &reason, Some(next)).await
        }
    }
}

/// Logs a failed handler attempt: a WARN with the retry's delay while the
/// event has attempts left, an ERROR when this one parked it. Both name the
/// attempt, the budget, the event (id, type, key) and the error, so one
/// event's attempts can be followed in the log.
pub(super) fn log_failed_attempt(
    delivery: &Delivery,
    attempt: i64,
    max_attempts: u32,
    parked: bool,
    retry_in: Duration,
    error: &str,
) {
    let (event_type, key) = (delivery.event_type.as_deref(), delivery.key.as_deref());
    if parked {
        tracing::error!(
            event_id = delivery.event_id,
            event_type,
            key,
            attempt,
            max_attempts,
            error,
            "handler failed; event parked as FAILED (`outbox inbox replay` applies it again)"
        );
    } else {
        tracing::warn!(
            event_id = delivery.event_id,
            event_type,
            key,
            attempt,
            max_attempts,
            error,
            retry_in = ?retry_in,
            "handler failed; retry scheduled"
        );
    }
}

/// Records `delivery` in state `FAILED` (parked) or `RETRY` with `attempts`
/// spent, outside any handler transaction; a row already there makes it a
/// duplicate.
pub(super) async fn set_aside<DB: Backend>(
    inbox: &Inbox<DB>,
    delivery: &Delivery,
    state: InboxState,
    attempts: i64,
    reason: &str,
    next_attempt_at: Option<i64>,
) -> Result<Outcome, Error> {
    let reason = error_text(reason);
    let mut conn = inbox.store.acquire().await?;
    let recorded = inbox
        .store
        .record(
            &mut conn,
            delivery,
            state,
            attempts,
            Some(&reason),
            next_attempt_at,
            now_ms(),
        )
        .await?;
    Ok(match recorded {
        Recorded::Duplicate => Outcome::Duplicate,
        Recorded::New if state == InboxState::Failed => Outcome::Parked,
        Recorded::New => Outcome::Retry,
    })
}

/// Parks a delivery whose payload the handler cannot decode, with its raw bytes.
pub(super) async fn park_undecodable<DB: Backend>(
    inbox: &Inbox<DB>,
    delivery: &Delivery,
    reason: &str,
) -> Result<Outcome, Error> {
    tracing::error!(
        event_id = delivery.event_id,
        event_type = delivery.event_type.as_deref(),
        key = delivery.key.as_deref(),
        reason,
        "undecodable payload parked"
    );
    set_aside(inbox, delivery, InboxState::Failed, 1, reason, None).await
}

/// Reads, inside the handler's transaction and just before its commit, that
/// the inbox rows of `event_ids` are all still there. A handler that ignored
/// a database error can leave a transaction the database has given up on:
/// PostgreSQL aborts it at the failed statement and answers `COMMIT` with a
/// `ROLLBACK`; MySQL rolls the whole transaction back after a deadlock and
/// runs what follows on its own. Either way the commit would write no inbox
/// row, and an event acknowledged as processed would be lost. `Some(reason)`
/// when the transaction is no longer whole (the delivery is then a handler
/// failure: retried, then parked); `Err` for other database trouble.
pub(super) async fn undone<DB: Backend>(
    inbox: &Inbox<DB>,
    tx: &mut Transaction<'static, DB>,
    event_ids: &[&str],
) -> Result<Option<String>, Error> {
    let expected = u64::try_from(event_ids.len()).unwrap_or(u64::MAX);
    match inbox.store.count_processed(tx, event_ids).await {
        Ok(n) if n == expected => Ok(None),
        Ok(n) => Ok(Some(format!(
            "the database rolled back the handler's transaction ({n} of {expected} inbox rows \
             left): an error the handler did not return"
        ))),
        Err(error) if aborted(&error) => Ok(Some(format!(
            "the database aborted the handler's transaction after an error the handler did \
             not return: {error}"
        ))),
        Err(error) => Err(error),
    }
}

/// `true` for PostgreSQL's answer to a statement in a transaction that an
/// earlier error aborted (`25P02`, in failed SQL transaction).
pub(super) fn aborted(error: &Error) -> bool {
    match error {
        Error::Database {
            source: sqlx::Error::Database(db),
            ..
        } => db.code().as_deref() == Some("25P02"),
        _ => false,
    }
}
