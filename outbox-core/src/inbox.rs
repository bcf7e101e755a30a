//! The consumer side's table: the [`Inbox`] handle records which events a
//! consumer has applied, keeps failed ones for retry, and lists and replays
//! parked ones.
//!
//! Row states (`process`):
//!
//! | state | meaning |
//! |---|---|
//! | `PROCESSED` | the handler's transaction committed with this row: applied once |
//! | `RETRY` | the handler failed; payload kept, retried locally with backoff |
//! | `FAILED` | parked after the retry budget, or undecodable; payload and error kept |

use std::time::Duration;

use bytes::Bytes;
use sqlx::Pool;
use uuid::Uuid;

use crate::backend::sql::InboxSql;
use crate::backend::{Backend, Column, Value};
use crate::names::{TableName, check_consumer, now_ms};
use crate::{Error, schema};

/// Default name of the inbox table.
pub const DEFAULT_INBOX_TABLE: &str = outbox_rules::DEFAULT_INBOX_TABLE;

/// Handle on one consumer's rows in an inbox table. Cheap to clone.
pub struct Inbox<DB: Backend> {
    pub(crate) pool: Pool<DB>,
    pub(crate) consumer: String,
    pub(crate) table: TableName,
    pub(crate) sql: std::sync::Arc<InboxSql>,
}

impl<DB: Backend> Clone for Inbox<DB> {
    fn clone(&self) -> Self {
        Inbox {
            pool: self.pool.clone(),
            consumer: self.consumer.clone(),
            table: self.table.clone(),
            sql: self.sql.clone(),
        }
    }
}

impl<DB: Backend> std::fmt::Debug for Inbox<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("database", &DB::DIALECT.name)
            .field("table", &self.table)
            .field("consumer", &self.consumer)
            .finish()
    }
}

/// One message as a handler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The dedup id: the `event-id` header, or the broker's `message-id` for
    /// messages that were not sent by an outbox relay. An id longer than the
    /// inbox column (64) or holding a NUL is replaced by `sha256-` and 56 hex
    /// digits of its SHA-256, the same for every redelivery; the original is in
    /// [`Delivery::headers`].
    pub event_id: String,
    /// The `event-type` header, without NUL bytes and cut to 255 characters
    /// (the inbox column); the original is in [`Delivery::headers`].
    pub event_type: Option<String>,
    /// The `event-key` header, fitted like `event_type`.
    pub key: Option<String>,
    /// Every header of the message.
    pub headers: Vec<(String, String)>,
    /// The payload.
    pub body: Bytes,
    /// How many times the handler failed on this event before.
    pub attempt: u32,
}

impl Delivery {
    /// The first header named `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn headers_json(&self) -> String {
        serde_json::to_string(&self.headers).unwrap_or_else(|_| "[]".to_owned())
    }
}

/// Row counts of one consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InboxCounts {
    /// Applied events.
    pub processed: u64,
    /// Events waiting for a local retry.
    pub retry: u64,
    /// Parked events.
    pub failed: u64,
}

/// A parked inbox row, as listed by [`Inbox::parked`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedDelivery {
    /// The event id.
    pub event_id: String,
    /// The event type, if the message had one.
    pub event_type: Option<String>,
    /// The key, if any.
    pub key: Option<String>,
    /// Handler attempts made.
    pub attempts: i64,
    /// The last error (handler error or decode error).
    pub last_error: Option<String>,
    /// First seen (ms since the Unix epoch).
    pub create_time: i64,
    /// Parked (ms since the Unix epoch).
    pub update_time: i64,
    /// The raw payload.
    pub content: Vec<u8>,
}

/// Whether an inbox insert created the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recorded {
    New,
    Duplicate,
}

impl<DB: Backend> Inbox<DB> {
    /// The inbox of `consumer` in table [`DEFAULT_INBOX_TABLE`].
    pub fn new(pool: Pool<DB>, consumer: &str) -> Result<Inbox<DB>, Error> {
        Inbox::with_table(pool, consumer, DEFAULT_INBOX_TABLE)
    }

    /// The inbox of `consumer` in table `table`; both names are validated.
    pub fn with_table(pool: Pool<DB>, consumer: &str, table: &str) -> Result<Inbox<DB>, Error> {
        check_consumer(consumer)?;
        let table = TableName::new("inbox table name", table)?;
        Ok(Inbox {
            sql: std::sync::Arc::new(InboxSql::new(DB::DIALECT, &table)),
            pool,
            consumer: consumer.to_owned(),
            table,
        })
    }

    /// The consumer name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// The pool.
    pub fn pool(&self) -> &Pool<DB> {
        &self.pool
    }

    /// Creates or upgrades the inbox table. Safe to call at every start.
    pub async fn migrate(&self) -> Result<(), Error> {
        schema::migrate(&self.pool, self.table.as_str(), &self.sql.migrations).await
    }

    /// Inserts the row of `delivery` in state `process` inside `conn`'s
    /// transaction. A unique violation on (consumer, event_id) is a duplicate.
    pub(crate) async fn record(
        &self,
        conn: &mut DB::Connection,
        delivery: &Delivery,
        process: &str,
        error: Option<&str>,
        next_attempt_at: Option<i64>,
    ) -> Result<Recorded, Error> {
        let now = now_ms();
        let processed = process == "PROCESSED";
        let headers = (!processed).then(|| delivery.headers_json());
        let result = DB::exec(
            conn,
            &self.sql.insert,
            &[
                Value::Text(Some(&self.consumer)),
                Value::Text(Some(&delivery.event_id)),
                Value::Text(delivery.event_type.as_deref()),
                Value::Text(delivery.key.as_deref()),
                Value::Text(Some(process)),
                Value::Int(if processed {
                    1
                } else {
                    i64::from(error.is_some())
                }),
                next_attempt_at.map_or(Value::NullInt, Value::Int),
                Value::Text(error),
                Value::Text(headers.as_deref()),
                Value::Bytes((!processed).then_some(&delivery.body[..])),
                Value::Int(now),
                Value::Int(now),
                if processed {
                    Value::Int(now)
                } else {
                    Value::NullInt
                },
            ],
        )
        .await;
        match result {
            Ok(_) => Ok(Recorded::New),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(Recorded::Duplicate),
            Err(source) => Err(Error::Database {
                action: "recording an event in the inbox",
                source,
            }),
        }
    }

    /// Inserts `PROCESSED` rows for all of `deliveries` in one statement. A
    /// unique violation (any of them a duplicate) is `Recorded::Duplicate` and
    /// leaves the transaction to be rolled back.
    pub(crate) async fn record_processed(
        &self,
        conn: &mut DB::Connection,
        deliveries: &[&Delivery],
    ) -> Result<Recorded, Error> {
        let now = now_ms();
        // 7 values a row: 500 rows stay well under every database's limit.
        for chunk in deliveries.chunks(500) {
            let mut args = Vec::with_capacity(chunk.len() * 7);
            for d in chunk {
                args.extend([
                    Value::Text(Some(&self.consumer)),
                    Value::Text(Some(&d.event_id)),
                    Value::Text(d.event_type.as_deref()),
                    Value::Text(d.key.as_deref()),
                    Value::Int(now),
                    Value::Int(now),
                    Value::Int(now),
                ]);
            }
            match DB::exec(conn, &self.sql.insert_processed(chunk.len()), &args).await {
                Ok(_) => {}
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                    return Ok(Recorded::Duplicate);
                }
                Err(source) => {
                    return Err(Error::Database {
                        action: "recording events in the inbox",
                        source,
                    });
                }
            }
        }
        Ok(Recorded::New)
    }

    /// `true` when an earlier event of `key` is waiting for a retry or parked.
    pub(crate) async fn key_pending(&self, key: &str) -> Result<bool, Error> {
        let mut conn = self.acquire().await?;
        let rows = DB::fetch(
            &mut conn,
            &self.sql.key_pending,
            &[Value::Text(Some(&self.consumer)), Value::Text(Some(key))],
            &[Column::Int],
        )
        .await
        .map_err(Error::db("checking a key's pending events"))?;
        Ok(rows.first().and_then(|r| r[0].int()).unwrap_or(0) > 0)
    }

    pub(crate) async fn acquire(&self) -> Result<sqlx::pool::PoolConnection<DB>, Error> {
        crate::backend::acquire(&self.pool).await
    }

    /// Counts of this consumer's rows per state.
    pub async fn counts(&self) -> Result<InboxCounts, Error> {
        let mut conn = self.acquire().await?;
        let rows = DB::fetch(
            &mut conn,
            &self.sql.counts,
            &[Value::Text(Some(&self.consumer))],
            &[Column::Text, Column::Int],
        )
        .await
        .map_err(Error::db("counting inbox rows"))?;
        let mut counts = InboxCounts::default();
        for mut row in rows {
            let n = u64::try_from(row[1].int().unwrap_or(0)).unwrap_or(0);
            match row[0].take_text().as_deref() {
                Some("PROCESSED") => counts.processed = n,
                Some("RETRY") => counts.retry = n,
                Some("FAILED") => counts.failed = n,
                _ => {}
            }
        }
        Ok(counts)
    }

    /// Up to `limit` parked rows, oldest first, with their payloads.
    pub async fn parked(&self, limit: u32) -> Result<Vec<ParkedDelivery>, Error> {
        let mut conn = self.acquire().await?;
        let rows = DB::fetch(
            &mut conn,
            &self.sql.parked,
            &[
                Value::Text(Some(&self.consumer)),
                Value::Int(i64::from(limit)),
            ],
            &[
                Column::Text,
                Column::Text,
                Column::Text,
                Column::Int,
                Column::Text,
                Column::Int,
                Column::Int,
                Column::Bytes,
            ],
        )
        .await
        .map_err(Error::db("listing parked inbox rows"))?;
        Ok(rows
            .into_iter()
            .map(|mut r| ParkedDelivery {
                event_id: r[0].take_text().unwrap_or_default(),
                event_type: r[1].take_text(),
                key: r[2].take_text(),
                attempts: r[3].int().unwrap_or(0),
                last_error: r[4].take_text(),
                create_time: r[5].int().unwrap_or(0),
                update_time: r[6].int().unwrap_or(0),
                content: r[7].take_bytes().unwrap_or_default(),
            })
            .collect())
    }

    /// Schedules one parked event for another round of retries with a fresh
    /// budget. `false` when no parked row has this id.
    pub async fn replay(&self, event_id: &str) -> Result<bool, Error> {
        let mut conn = self.acquire().await?;
        let now = now_ms();
        let n = DB::exec(
            &mut conn,
            &self.sql.replay_one,
            &[
                Value::Int(now),
                Value::Int(now),
                Value::Text(Some(&self.consumer)),
                Value::Text(Some(event_id)),
            ],
        )
        .await
        .map_err(Error::db("replaying a parked inbox row"))?;
        Ok(n > 0)
    }

    /// Schedules every parked event of this consumer for retry; returns how many.
    pub async fn replay_all(&self) -> Result<u64, Error> {
        let mut conn = self.acquire().await?;
        let now = now_ms();
        DB::exec(
            &mut conn,
            &self.sql.replay_all,
            &[
                Value::Int(now),
                Value::Int(now),
                Value::Text(Some(&self.consumer)),
            ],
        )
        .await
        .map_err(Error::db("replaying parked inbox rows"))
    }

    /// Deletes up to `limit` processed rows older than `age`; returns how many.
    ///
    /// The window must outlast the broker's redelivery horizon: a message
    /// redelivered after its row is gone is applied again.
    pub async fn delete_processed(&self, age: Duration, limit: u32) -> Result<u64, Error> {
        let mut conn = self.acquire().await?;
        let before = now_ms() - crate::names::ms(age);
        DB::exec(
            &mut conn,
            &self.sql.delete_processed,
            &[
                Value::Text(Some(&self.consumer)),
                Value::Int(before),
                Value::Int(i64::from(limit.max(1))),
            ],
        )
        .await
        .map_err(Error::db("deleting processed inbox rows"))
    }
}

/// The event id for a message without an `event-id` header.
pub(crate) fn fallback_event_id() -> String {
    Uuid::now_v7().to_string()
}
