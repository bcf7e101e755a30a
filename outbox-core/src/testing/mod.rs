//! Testing producers and handlers against the application's real database,
//! with no broker (cargo feature `testing`; `outbox::testing` in the facade).
//!
//! - **Producers**: run the producer in a transaction, then read what it
//!   appended with [`appended`] — in order, with payloads, keys and headers
//!   ([`Appended`]) — and roll back to see the events go with the business
//!   rows.
//! - **Handlers**: a [`TestConsumer`] runs a [`Handler`](crate::Handler) through the consumer
//!   runtime itself ([`Consumer::spawn_on`](crate::Consumer::spawn_on)) on a scripted, in-memory
//!   subscription: each delivery gets its inbox row, its transaction and its
//!   commit before it is acknowledged, exactly as from ActiveMQ. Deliver the
//!   events a producer appended ([`Appended::delivery`]) or hand-made ones
//!   ([`Delivery::json`]) — twice, out of order — then [`drain`] until
//!   nothing is in flight or waiting for a retry, and read the counts, the
//!   acknowledgements and the parked rows. [`Flaky`] makes a handler's
//!   transaction fail a given number of times, to see retries and parking.
//!
//! Retries in a test consumer ([`config`]) wait milliseconds,
//! not seconds, so a drain that includes a parked event takes well under a
//! second.
//!
//! [`drain`]: TestConsumer::drain
//!
//! ```
//! # #[cfg(feature = "sqlite")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use outbox_core::testing::{TestConsumer, appended};
//! use outbox_core::{Delivery, Event, Inbox, Outbox};
//! # use outbox_core::consumer::{BoxFuture, Handler, HandlerError};
//! # struct Count;
//! # impl Handler<sqlx::Sqlite> for Count {
//! #     type Event = serde_json::Value;
//! #     fn decode(&self, d: &Delivery) -> Result<serde_json::Value, String> {
//! #         outbox_core::consumer::decode_json(d)
//! #     }
//! #     fn handle<'a>(&'a self, tx: &'a mut sqlx::Transaction<'static, sqlx::Sqlite>,
//! #         _: serde_json::Value, _: &'a Delivery) -> BoxFuture<'a, Result<(), HandlerError>> {
//! #         Box::pin(async move {
//! #             sqlx::query("INSERT INTO seen DEFAULT VALUES").execute(&mut **tx).await?;
//! #             Ok(())
//! #         })
//! #     }
//! # }
//! // One connection: an in-memory database is one per connection.
//! let pool = sqlx::sqlite::SqlitePoolOptions::new()
//!     .max_connections(1)
//!     .connect("sqlite::memory:")
//!     .await?;
//! # sqlx::query("CREATE TABLE seen (n INTEGER PRIMARY KEY)").execute(&pool).await?;
//! let outbox = Outbox::new(pool.clone());
//! outbox.migrate().await?;
//!
//! // The producer's side: what a transaction appended.
//! let mut tx = pool.begin().await?;
//! let event = Event::json("user.created", "/topic/VirtualTopic.user.created", &serde_json::json!({ "user_id": 7 }))?;
//! outbox.append(&mut tx, event.with_key("7")).await?;
//! let events = appended(&mut tx).await?;
//! assert_eq!(events[0].key.as_deref(), Some("7"));
//! tx.commit().await?;
//!
//! // The consumer's side: the event, twice, through the inbox.
//! let inbox = Inbox::new(pool.clone(), "points")?;
//! inbox.migrate().await?;
//! let consumer = TestConsumer::start(inbox, Count)?;
//! consumer.deliver(events[0].delivery());
//! consumer.deliver(events[0].delivery());
//! let counts = consumer.drain().await?;
//! assert_eq!((counts.processed, counts.duplicates), (1, 1));
//! consumer.shutdown().await?;
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "sqlite"))]
//! # fn main() {}
//! ```

pub use bytes;
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::backend::Backend;
use crate::event::OutboxMessage;
use crate::names::TableName;
use crate::outbox::DEFAULT_OUTBOX_TABLE;
use crate::{Delivery, Error};

mod consumer;
mod delivery;
mod flaky;

pub use consumer::{DRAIN_TIMEOUT, TestConsumer, config};
pub use flaky::Flaky;

/// An event as a producer appended it, read back from the outbox table.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Appended {
    /// The event id (the consumer's dedup key).
    pub event_id: String,
    /// The event type.
    pub event_type: String,
    /// Where the relay will publish it.
    pub destination: String,
    /// The aggregate key, if any.
    pub key: Option<String>,
    /// The extra headers, in the order they are stored.
    pub headers: Vec<(String, String)>,
    /// The payload.
    pub content: Vec<u8>,
    /// The payload's content type.
    pub content_type: String,
    /// When it was appended (ms since the Unix epoch).
    pub create_time: i64,
}

impl Appended {
    /// The payload decoded from JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.content)
    }

    /// The header `name` among the extra headers.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The event as a consumer receives it from the relay: the same headers
    /// the relay sends (`event-id`, `event-type`, `event-key`,
    /// `JMSXGroupID`, `content-type`, the extra headers…) and the payload.
    pub fn delivery(&self) -> Delivery {
        let message = OutboxMessage {
            id: 0,
            event_id: self.event_id.clone(),
            event_type: self.event_type.clone(),
            destination: self.destination.clone(),
            key: self.key.clone(),
            headers: self.headers.clone(),
            content: Bytes::copy_from_slice(&self.content),
            content_type: self.content_type.clone(),
            attempts: 0,
            create_time: self.create_time,
        };
        let frame = crate::transport::message_for(&message).into_frame();
        Delivery {
            event_id: self.event_id.clone(),
            event_type: Some(self.event_type.clone()),
            key: self.key.clone(),
            headers: frame
                .headers()
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            body: message.content,
            attempt: 0,
        }
    }
}

impl From<&Appended> for Delivery {
    fn from(event: &Appended) -> Delivery {
        event.delivery()
    }
}

impl From<Appended> for Delivery {
    fn from(event: Appended) -> Delivery {
        event.delivery()
    }
}

/// Every event in the outbox table [`DEFAULT_OUTBOX_TABLE`], oldest first,
/// whatever its state, as `source` sees them: pass the producer's open
/// transaction (`&mut tx`) to see what it appended before it commits, or the
/// pool to see what was committed.
pub async fn appended<'c, A>(source: A) -> Result<Vec<Appended>, Error>
where
    A: sqlx::Acquire<'c>,
    A::Database: Backend,
{
    appended_to(source, DEFAULT_OUTBOX_TABLE).await
}

/// [`appended`], for the outbox table `table`.
pub async fn appended_to<'c, A>(source: A, table: &str) -> Result<Vec<Appended>, Error>
where
    A: sqlx::Acquire<'c>,
    A::Database: Backend,
{
    let table = TableName::new("outbox table name", table)?;
    let mut conn = source
        .acquire()
        .await
        .map_err(Error::db("connecting to read the outbox"))?;
    let rows = crate::store::outbox::appended::<A::Database>(&mut conn, &table).await?;
    Ok(rows
        .into_iter()
        .map(|row| Appended {
            event_id: row.event_id,
            event_type: row.event_type,
            destination: row.destination,
            key: row.key,
            headers: row.headers,
            content: row.content,
            content_type: row.content_type,
            create_time: row.create_time,
        })
        .collect())
}
