//! A consumer service of a chaos run: consumes its own queue of the Virtual
//! Topic and applies each event as its `chaos-behave` header says, writing a
//! row into `chaos_applied` in the inbox's transaction.

use std::sync::Arc;
use std::time::Duration;

use outbox::core::consumer::{BoxFuture, ConsumerCounts, HandlerError};
use outbox::core::{Backoff, Consumer, ConsumerConfig, Delivery, Handler, Inbox};
use serde::Deserialize;
use tokio::sync::watch;

use crate::db::{APPLIED, UNIQUE};
use crate::plan::{Behaviour, TOPIC};
use crate::producer::broker_config;
use crate::shared::{BoxError, connect};

/// What the consumer logs once subscribed; the runner waits for it.
pub(crate) const READY: &str = "chaos consumer subscribed";

/// An event as the handler sees it.
pub(crate) enum Work {
    /// One of the plan's events, described by its headers.
    Planned {
        seq: i64,
        key: Option<String>,
        kseq: i64,
        behaviour: Behaviour,
    },
    /// A foreign message, described by its JSON body.
    Foreign { fid: i64 },
}

#[derive(Deserialize)]
struct ForeignBody {
    fid: i64,
}

/// The handler of a chaos consumer.
pub(crate) struct Chaos {
    /// The consumer's name, written with each row.
    pub(crate) name: String,
}

impl Chaos {
    fn decode(delivery: &Delivery) -> Result<Work, String> {
        let Some(seq) = delivery.header("chaos-seq") else {
            let body: ForeignBody = serde_json::from_slice(&delivery.body)
                .map_err(|e| format!("undecodable foreign body: {e}"))?;
            return Ok(Work::Foreign { fid: body.fid });
        };
        let number = |name: &str, value: Option<&str>| {
            value
                .and_then(|v| v.parse::<i64>().ok())
                .ok_or_else(|| format!("header {name} missing or not a number"))
        };
        Ok(Work::Planned {
            seq: number("chaos-seq", Some(seq))?,
            key: delivery.key.clone(),
            kseq: number("chaos-kseq", delivery.header("chaos-kseq"))?,
            behaviour: delivery
                .header("chaos-behave")
                .and_then(Behaviour::parse)
                .ok_or("header chaos-behave missing or unknown")?,
        })
    }

    /// The statement recording one application. Every value is a number,
    /// one of the plan's own keys (letters and digits) or a note of such
    /// characters, so it is inlined. The note says how the event came: the
    /// process, the attempt, the broker's `redelivered` flag and `message-id`.
    fn applied_row(&self, work: &Work, delivery: &Delivery) -> String {
        let (seq, fid, key, kseq) = match work {
            Work::Planned { seq, key, kseq, .. } => (
                seq.to_string(),
                "NULL".to_owned(),
                key.as_deref()
                    .filter(|k| k.chars().all(|c| c.is_ascii_alphanumeric()))
                    .map_or_else(|| "NULL".to_owned(), |k| format!("'{k}'")),
                kseq.to_string(),
            ),
            Work::Foreign { fid } => (
                "NULL".to_owned(),
                fid.to_string(),
                "NULL".to_owned(),
                "NULL".to_owned(),
            ),
        };
        let note: String = format!(
            "pid={} attempt={} redelivered={} message-id={}",
            std::process::id(),
            delivery.attempt,
            delivery.header("redelivered").unwrap_or("false"),
            delivery.header("message-id").unwrap_or("none"),
        )
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || " =:-_.".contains(*c))
        .take(200)
        .collect();
        format!(
            "INSERT INTO {APPLIED} (consumer, seq, fid, ekey, kseq, note) VALUES ('{}', {seq}, {fid}, {key}, {kseq}, '{note}')",
            self.name
        )
    }
}

macro_rules! consumer_on {
    ($db:ty) => {
        use super::*;

        impl Handler<$db> for Chaos {
            type Event = Work;

            fn decode(&self, delivery: &Delivery) -> Result<Work, String> {
                Chaos::decode(delivery)
            }

            fn handle<'a>(
                &'a self,
                tx: &'a mut sqlx::Transaction<'static, $db>,
                work: Work,
                delivery: &'a Delivery,
            ) -> BoxFuture<'a, Result<(), HandlerError>> {
                Box::pin(async move {
                    let row = self.applied_row(&work, delivery);
                    let behaviour = match work {
                        Work::Planned { behaviour, .. } => behaviour,
                        Work::Foreign { .. } => Behaviour::Apply,
                    };
                    match behaviour {
                        Behaviour::Apply => {}
                        Behaviour::FailTimes(n) => {
                            if delivery.attempt < n {
                                return Err(format!("failing attempt {} of {n}", delivery.attempt + 1).into());
                            }
                        }
                        Behaviour::AlwaysFail => return Err("this event always fails".into()),
                        Behaviour::Panic => panic!("the handler panics on this event"),
                        Behaviour::Slow(ms) => tokio::time::sleep(Duration::from_millis(ms.into())).await,
                        Behaviour::Swallow => {
                            sqlx::query(&row).execute(&mut **tx).await?;
                            // Violates the key, and the error is dropped: a
                            // handler bug the consumer must not ack as done.
                            let _ = sqlx::query(&format!("INSERT INTO {UNIQUE} (id) VALUES (1)"))
                                .execute(&mut **tx)
                                .await;
                            return Ok(());
                        }
                    }
                    sqlx::query(&row).execute(&mut **tx).await?;
                    Ok(())
                })
            }
        }

        /// Consumes until stopped.
        pub(crate) async fn run(
            pool: sqlx::Pool<$db>,
            name: &str,
            broker: &str,
            stop: Arc<watch::Sender<bool>>,
        ) -> Result<(), BoxError> {
            let inbox = Inbox::new(pool.clone(), name)?;
            inbox.migrate().await?;
            let config = (ConsumerConfig::virtual_topic(name, TOPIC))
                .with_concurrency(4)
                .with_prefetch(Some(32))
                .with_per_key_order(true)
                .with_max_attempts(4)
                .with_retry_backoff(Backoff::new(Duration::from_millis(50), Duration::from_millis(500)))
                .with_retry_poll(Duration::from_millis(100))
                .with_stats_interval(Some(Duration::from_secs(1)));
            let consumer = loop {
                let Some(client) = connect(broker_config(broker)?, stop.subscribe()).await? else {
                    return Ok(());
                };
                let consumer = Consumer::new(inbox.clone(), Chaos { name: name.to_owned() }, config.clone())?;
                match consumer.spawn(client.clone()).await {
                    Ok(consumer) => break consumer,
                    Err(error) => {
                        tracing::warn!(%error, "subscribing failed; connecting again");
                        let _ = client.disconnect().await;
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            };
            tracing::info!("{READY}");
            let mut ticks = tokio::time::interval(Duration::from_secs(1));
            let mut stopped = stop.subscribe();
            loop {
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => break,
                    _ = ticks.tick() => log_counts(consumer.metrics().snapshot()),
                }
            }
            let metrics = consumer.metrics().clone();
            consumer.shutdown().await?;
            log_counts(metrics.snapshot());
            Ok(())
        }
    };
}

/// The counts the runner reads from the log (duplicates above all).
fn log_counts(counts: ConsumerCounts) {
    let ConsumerCounts {
        processed,
        duplicates,
        retried,
        failed,
        ..
    } = counts;
    tracing::info!(
        "counts processed={processed} duplicates={duplicates} retried={retried} failed={failed}"
    );
}

pub(crate) mod on_sqlite {
    consumer_on!(sqlx::Sqlite);
}

pub(crate) mod on_postgres {
    consumer_on!(sqlx::Postgres);
}

pub(crate) mod on_mysql {
    consumer_on!(sqlx::MySql);
}
