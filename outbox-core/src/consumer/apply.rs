//! One attempt at fresh deliveries, in one database transaction: the inbox
//! row and the handler's writes commit together. The lowest of three
//! levels: [`receive`](super::receive) takes messages to their ACK,
//! [`settle`](super::settle) makes attempts until each delivery has an
//! outcome, and an attempt here either gives one or fails with a database
//! error.

use sqlx::Transaction;

use crate::backend::{Backend, HandlerTx};
use crate::backoff::Backoff;
use crate::inbox::{Delivery, Inbox};
use crate::names::{ms, now_ms};
use crate::store::{InboxState, Recorded};
use crate::{Error, failpoint};

use super::columns::error_text;
use super::failure::{Failure, Next, Tally, TryFailed, after_failure};
use super::handler::{Handler, after_commit, decode, run_handler};
use super::metrics::{ConsumerCounter, Outcome};
use super::shared::Shared;

/// One attempt at several fresh deliveries in one database transaction: one
/// commit settles them all. Optimistic: if any of them turns out to be a
/// duplicate or its handler fails, the transaction is rolled back and the
/// deliveries are attempted one by one, each in its own transaction — so a
/// failing handler never undoes another event's work. `Err` only for
/// database trouble (then nothing is acked).
pub(super) async fn attempt_batch<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    deliveries: &[Delivery],
) -> Result<Vec<Outcome>, Error> {
    let mut outcomes: Vec<Option<Outcome>> = deliveries.iter().map(|_| None).collect();
    let mut todo = Vec::with_capacity(deliveries.len());
    for (i, delivery) in deliveries.iter().enumerate() {
        match decode(&shared.handler, delivery) {
            Ok(event) => todo.push((i, event)),
            Err(reason) => {
                let failed = TryFailed::undecodable(reason);
                outcomes[i] = Some(record_failed_try(shared, delivery, failed).await?);
            }
        }
    }
    let mut one_by_one = false;
    if shared.config.per_key_order {
        // One query for the batch: any key with an earlier event waiting
        // sends the whole batch one by one, where each event is checked alone.
        let keys = keys_of(deliveries, &todo);
        one_by_one = shared.inbox.store.keys_pending(&keys).await?;
    }
    if !one_by_one && !todo.is_empty() {
        one_by_one = !apply_together(shared, deliveries, todo, &mut outcomes).await?;
    }
    if one_by_one {
        for (i, delivery) in deliveries.iter().enumerate() {
            if outcomes[i].is_none() {
                outcomes[i] = Some(attempt_one(shared, delivery).await?);
            }
        }
    }
    Ok(outcomes
        .into_iter()
        .map(|o| o.unwrap_or(Outcome::Duplicate))
        .collect())
}

/// The keys of the decoded deliveries `todo`, each once.
fn keys_of<'a, E>(deliveries: &'a [Delivery], todo: &[(usize, E)]) -> Vec<&'a str> {
    let mut keys: Vec<&str> = todo
        .iter()
        .filter_map(|(i, _)| deliveries[*i].key.as_deref())
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Records the decoded deliveries `todo` and runs their handlers in one
/// transaction, and commits it if every one of them is new, its handler
/// succeeded and the transaction is still whole; their outcomes are then
/// `Processed`. `false` when it was rolled back instead.
async fn apply_together<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    deliveries: &[Delivery],
    todo: Vec<(usize, H::Event)>,
    outcomes: &mut [Option<Outcome>],
) -> Result<bool, Error> {
    let inbox = &shared.inbox;
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
            let config = &shared.config;
            let ran = run_handler(
                &shared.handler,
                config.handler_timeout,
                &mut tx,
                event,
                delivery,
            );
            if ran.await.is_err() {
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
    if !clean {
        let _ = tx.rollback().await;
        return Ok(false);
    }
    failpoint::hit("inbox.before_commit");
    tx.commit()
        .await
        .map_err(Error::db("committing an inbox transaction"))?;
    for &i in &applied {
        after_commit(&shared.handler, &deliveries[i]);
        outcomes[i] = Some(Outcome::Processed);
    }
    Ok(true)
}

/// One attempt at a fresh delivery in its own transaction. `Err` only for
/// database trouble.
pub(super) async fn attempt_one<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    delivery: &Delivery,
) -> Result<Outcome, Error> {
    let inbox = &shared.inbox;
    let event = match decode(&shared.handler, delivery) {
        Ok(event) => event,
        Err(reason) => {
            return record_failed_try(shared, delivery, TryFailed::undecodable(reason)).await;
        }
    };
    if shared.config.per_key_order
        && let Some(key) = &delivery.key
        && inbox.store.keys_pending(&[key]).await?
    {
        // An earlier event of this key waits for a retry: queue behind it,
        // with no attempt spent (its handler has not run).
        let waiting = "waiting for an earlier event of its key";
        let state = InboxState::Retry;
        return record_unapplied(inbox, delivery, state, 0, waiting, Some(now_ms())).await;
    }
    let _turn = shared.gate.enter().await;
    let mut tx = HandlerTx::<DB>::begin(inbox.pool())
        .await
        .map_err(Error::db("beginning an inbox transaction"))?;
    let state = InboxState::Processed;
    let recorded = inbox
        .store
        .record(&mut tx, delivery, state, 1, None, None, now_ms())
        .await?;
    if recorded == Recorded::Duplicate {
        let _ = tx.rollback().await;
        return Ok(Outcome::Duplicate);
    }
    match run_checked(shared, &mut tx, event, delivery).await? {
        Ok(()) => {
            failpoint::hit("inbox.before_commit");
            tx.commit()
                .await
                .map_err(Error::db("committing an inbox transaction"))?;
            after_commit(&shared.handler, delivery);
            Ok(Outcome::Processed)
        }
        Err(failed) => {
            let _ = tx.rollback().await;
            record_failed_try(shared, delivery, failed).await
        }
    }
}

/// Runs the handler on `event` inside `tx`, then checks that the
/// transaction is still whole ([`undone`]). `Ok(Err(_))` when the try
/// failed (the handler's error, panic or overrun, or its transaction undone
/// underneath it); `Err` for other database trouble.
pub(super) async fn run_checked<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    tx: &mut Transaction<'static, DB>,
    event: H::Event,
    delivery: &Delivery,
) -> Result<Result<(), TryFailed>, Error> {
    let timeout = shared.config.handler_timeout;
    if let Err(error) = run_handler(&shared.handler, timeout, tx, event, delivery).await {
        return Ok(Err(TryFailed::handler(error.to_string())));
    }
    Ok(
        match undone(&shared.inbox, tx, &[&delivery.event_id]).await? {
            None => Ok(()),
            Some(reason) => Err(TryFailed::handler(reason)),
        },
    )
}

/// Records the failed first try of a fresh delivery as [`after_failure`]
/// decides: a `RETRY` row with its payload, due after the backoff, or a
/// parked one.
async fn record_failed_try<DB: Backend, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    delivery: &Delivery,
    failed: TryFailed,
) -> Result<Outcome, Error> {
    let (config, now) = (&shared.config, now_ms());
    let (next, tally) = after_failure(
        failed.failure,
        Tally::default(),
        config,
        now,
        Backoff::jitter(),
    );
    if failed.failure == Failure::Handler {
        shared.metrics.add(ConsumerCounter::HandlerFailures, 1);
    }
    log_failed_try(delivery, &failed, &next, config.max_attempts);
    let (state, at) = match next {
        Next::Park { .. } => (InboxState::Failed, None),
        Next::Retry { at, .. } => (InboxState::Retry, Some(at)),
        // Not a step for a try that failed on its own; a retry if it were.
        Next::TryAgain { delay } => (InboxState::Retry, Some(now.saturating_add(ms(delay)))),
    };
    let attempts = i64::from(tally.attempts);
    record_unapplied(&shared.inbox, delivery, state, attempts, &failed.reason, at).await
}

/// Logs a failed try: for a handler failure, a WARN with the retry's delay
/// while the event has attempts left, an ERROR when this one parked it; an
/// ERROR for a payload that does not decode. Each names the attempt, the
/// budget, the event (id, type, key) and the error, so one event's attempts
/// can be followed in the log.
pub(super) fn log_failed_try(
    delivery: &Delivery,
    failed: &TryFailed,
    next: &Next,
    max_attempts: u32,
) {
    let (event_type, key) = (delivery.event_type.as_deref(), delivery.key.as_deref());
    let error = failed.reason.as_str();
    match *next {
        _ if failed.failure == Failure::Undecodable => tracing::error!(
            event_id = delivery.event_id,
            event_type,
            key,
            reason = error,
            "undecodable payload parked"
        ),
        Next::Park { attempt } => tracing::error!(
            event_id = delivery.event_id,
            event_type,
            key,
            attempt,
            max_attempts,
            error,
            "handler failed; event parked as FAILED (`outbox inbox replay` applies it again)"
        ),
        Next::Retry { attempt, delay, .. } => tracing::warn!(
            event_id = delivery.event_id,
            event_type,
            key,
            attempt,
            max_attempts,
            error,
            retry_in = ?delay,
            "handler failed; retry scheduled"
        ),
        Next::TryAgain { .. } => {}
    }
}

/// Records a delivery that was not applied, outside any handler
/// transaction: a `RETRY` row with `attempts` spent, due at
/// `next_attempt_at`, or a `FAILED` (parked) one, either with its payload
/// and `reason`. A row already there makes it a duplicate.
pub(super) async fn record_unapplied<DB: Backend>(
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
fn aborted(error: &Error) -> bool {
    match error {
        Error::Database {
            source: sqlx::Error::Database(db),
            ..
        } => db.code().as_deref() == Some("25P02"),
        _ => false,
    }
}
