//! The producer service of a chaos run: appends the plan's events, one
//! transaction each (the event and its row in `chaos_produced`), and runs a
//! relay in the same process. A restarted producer continues after the
//! highest seq it recorded.

use std::sync::Arc;
use std::time::Duration;

use outbox::core::producer::BrokerLimits;
use outbox::core::relay::StompPublisher;
use outbox::core::{Event, Outbox, RelayConfig};
use outbox::stomp::Config;
use tokio::sync::watch;

use crate::db::PRODUCED;
use crate::plan::{
    OverLimit, PRODUCER_MAX_FRAME, PRODUCER_MAX_HEADER_LINE, PRODUCER_MAX_HEADERS, Plan,
    PlannedEvent, TOPIC,
};
use crate::shared::{BoxError, connect};

/// The producer's limits (see [`PRODUCER_MAX_FRAME`]).
pub(crate) fn limits() -> BrokerLimits {
    BrokerLimits {
        max_header_line: PRODUCER_MAX_HEADER_LINE,
        max_headers: PRODUCER_MAX_HEADERS,
        max_frame: PRODUCER_MAX_FRAME,
    }
}

/// The event a planned event becomes. What the handler needs travels in
/// headers, so the payload can be anything, empty included.
pub(crate) fn event(planned: &PlannedEvent) -> Event {
    let mut event = Event::raw(
        "chaos.event",
        format!("/topic/VirtualTopic.{TOPIC}"),
        planned.payload(),
        "application/octet-stream",
    )
    .with_header("chaos-seq", planned.seq.to_string())
    .with_header("chaos-kseq", planned.kseq.to_string())
    .with_header("chaos-behave", planned.behaviour.header());
    if let Some(key) = &planned.key {
        event = event.with_key(key.clone());
    }
    for n in 0..planned.headers {
        event = event.with_header(format!("x-chaos-{n}"), n.to_string());
    }
    if planned.over == Some(OverLimit::HeaderLine) {
        event = event.with_header("x-chaos-long", "l".repeat(PRODUCER_MAX_HEADER_LINE + 1));
    }
    event
}

/// The broker settings of every service: heart-beats every 2 s, so a
/// blackholed or frozen link is noticed within seconds.
pub(crate) fn broker_config(uri: &str) -> Result<Config, BoxError> {
    Ok(Config::parse(uri)?
        .with_receipt_timeout(Duration::from_secs(5))
        .with_heart_beat(Duration::from_secs(2), Duration::from_secs(2)))
}

macro_rules! producer_on {
    ($db:ty) => {
        use super::*;

        /// Appends the plan's events from where the last run stopped (unless
        /// `appending` is off: a relay only), and relays until stopped.
        pub(crate) async fn run(
            pool: sqlx::Pool<$db>,
            plan: &Plan,
            appending: bool,
            broker: &str,
            stop: Arc<watch::Sender<bool>>,
        ) -> Result<(), BoxError> {
            let outbox = Outbox::new(pool.clone()).with_limits(limits());
            outbox.migrate().await?;
            let relay = tokio::spawn(relay(outbox.clone(), broker_config(broker)?, stop.subscribe()));
            let appended = if appending {
                append(&pool, &outbox, plan, stop.subscribe()).await
            } else {
                Ok(())
            };
            if let Err(error) = &appended {
                tracing::error!(%error, "appending stopped");
            }
            // The relay runs until the service is stopped.
            let mut stopped = stop.subscribe();
            let _ = stopped.wait_for(|s| *s).await;
            match relay.await {
                Ok(Ok(Some(handle))) => handle.shutdown().await?,
                Ok(Ok(None)) => {}
                Ok(Err(error)) => return Err(error),
                Err(join) => return Err(join.into()),
            }
            appended
        }

        async fn relay(
            outbox: Outbox<$db>,
            config: Config,
            stop: watch::Receiver<bool>,
        ) -> Result<Option<outbox::core::relay::RelayHandle>, BoxError> {
            let Some(client) = connect(config, stop).await? else {
                return Ok(None);
            };
            let config = RelayConfig::default()
                .with_batch_size(50)
                // Longer than a publish can take (twice the receipt timeout).
                .with_lease(Duration::from_secs(15))
                .with_max_attempts(5)
                .with_retry_backoff(outbox::core::Backoff::new(
                    Duration::from_millis(200),
                    Duration::from_secs(2),
                ))
                .with_stats_interval(Some(Duration::from_secs(1)));
            let relay = outbox.relay(StompPublisher::new(client), config)?;
            tracing::info!("relay running");
            Ok(Some(relay.spawn()))
        }

        async fn next_seq(pool: &sqlx::Pool<$db>) -> Result<i64, sqlx::Error> {
            let sql = format!("SELECT COALESCE(MAX(seq), 0) FROM {PRODUCED}");
            let highest: i64 = sqlx::query_scalar(&sql).fetch_one(pool).await?;
            Ok(highest + 1)
        }

        async fn append(
            pool: &sqlx::Pool<$db>,
            outbox: &Outbox<$db>,
            plan: &Plan,
            mut stop: watch::Receiver<bool>,
        ) -> Result<(), BoxError> {
            let mut next = loop {
                match next_seq(pool).await {
                    Ok(next) => break next,
                    Err(error) => {
                        tracing::warn!(%error, "reading the last seq failed; trying again");
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                }
            };
            tracing::info!(next, of = plan.events.len(), "appending");
            let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / plan.rate));
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while let Some(planned) = usize::try_from(next - 1).ok().and_then(|i| plan.events.get(i)) {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return Ok(()),
                    _ = pace.tick() => {}
                }
                match append_one(pool, outbox, planned).await {
                    Ok(outcome) => {
                        tracing::debug!(seq = planned.seq, outcome, "appended");
                        next += 1;
                    }
                    Err(error) => {
                        tracing::warn!(%error, seq = planned.seq, "append failed; trying again");
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        // The commit may have landed before the error.
                        if let Ok(found) = next_seq(pool).await {
                            next = found;
                        }
                    }
                }
            }
            tracing::info!("every planned event appended");
            Ok(())
        }

        /// One planned event: `COMMITTED` with its row, or `REFUSED` after a
        /// typed refusal at append.
        async fn append_one(
            pool: &sqlx::Pool<$db>,
            outbox: &Outbox<$db>,
            planned: &PlannedEvent,
        ) -> Result<&'static str, BoxError> {
            let event = event(planned);
            let mut tx = pool.begin().await?;
            match outbox.append(&mut tx, event).await {
                Ok(id) => {
                    if planned.corrupt {
                        sqlx::query(&format!(
                            "UPDATE outbox_event SET headers = '{{corrupt' WHERE event_id = '{id}'"
                        ))
                        .execute(&mut *tx)
                        .await?;
                    }
                    sqlx::query(&format!(
                        "INSERT INTO {PRODUCED} (seq, event_id, outcome) VALUES ({}, '{id}', 'COMMITTED')",
                        planned.seq
                    ))
                    .execute(&mut *tx)
                    .await?;
                    outbox.commit(tx).await?;
                    Ok("committed")
                }
                Err(
                    error @ (outbox::core::Error::EventTooLarge { .. }
                    | outbox::core::Error::InvalidEvent(_)),
                ) => {
                    tx.rollback().await?;
                    let reason: String = error
                        .to_string()
                        .chars()
                        .filter(|c| *c != '\'')
                        .take(400)
                        .collect();
                    sqlx::query(&format!(
                        "INSERT INTO {PRODUCED} (seq, event_id, outcome) VALUES ({}, NULL, 'REFUSED: {reason}')",
                        planned.seq
                    ))
                    .execute(pool)
                    .await?;
                    Ok("refused")
                }
                Err(other) => Err(other.into()),
            }
        }
    };
}

pub(crate) mod on_sqlite {
    producer_on!(sqlx::Sqlite);
}

pub(crate) mod on_postgres {
    producer_on!(sqlx::Postgres);
}

pub(crate) mod on_mysql {
    producer_on!(sqlx::MySql);
}
