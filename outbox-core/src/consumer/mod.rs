//! The consumer runtime: commit, then ack.
//!
//! For every delivery:
//!
//! ```text
//! decode ──fails──► park FAILED with raw bytes ─────────────────────────┐
//!   │                                                                   │
//! BEGIN ─► INSERT inbox row ──unique violation──► ROLLBACK (duplicate) ──┤
//!   │                                                                   ├─► ACK
//! handler(tx, event) ──Err──► ROLLBACK, INSERT RETRY row with payload ──┤
//!   │                                                                   │
//! COMMIT ───────────────────────────────────────────────────────────────┘
//! ```
//!
//! A database error anywhere leaves the message unacked and the delivery is
//! tried again with backoff; if the process dies, the broker redelivers it and
//! the inbox row decides. `RETRY` rows are picked up by a local retry loop: the
//! row is switched to `PROCESSED` inside the handler's transaction, so the
//! row lock makes two processes retrying the same row harmless. NACK is never
//! used — on ActiveMQ it sends the message straight to the dead-letter queue.
//!
//! ActiveMQ holds an unacknowledged message, and its prefetch slot, until its
//! connection ends. So an ACK that fails while the connection lives is tried
//! again a few times with backoff, and if it still fails — or a delivery can
//! be neither recorded nor parked — the consumer ends that connection: the
//! client reconnects, the broker delivers the message again and its inbox
//! row settles it. Health reports the failure until a delivery settles.

// The rooms. A delivery passes three levels: `receive` takes the messages a
// worker gathered (`dispatch`: straight from the subscription, or through
// per-key lanes) to their ACK (`ack`); `settle` makes attempts until each
// delivery has an outcome, waiting out database errors; `apply` makes one
// attempt in one transaction. What a failed try leads to (a retry at a
// time, parking, trying again) is one pure decision, `failure`, asked by the
// first delivery and by the retry pass (`retry`) alike. The background loop
// (`housekeeping`) runs the retry passes, the row figures and, once the
// queue is drained (`drain`), inbox retention. `config`, `handler`,
// `metrics` and `columns` hold the settings, the handler's contract and the
// calls into it, the counters, and the fitting of values to the inbox's
// columns; `shared` the parts every task of a consumer reads.

mod ack;
mod apply;
mod columns;
mod config;
mod dispatch;
mod drain;
mod failure;
mod handler;
mod housekeeping;
mod metrics;
mod receive;
mod retry;
mod settle;
mod shared;
#[cfg(all(test, feature = "sqlite"))]
mod tests;
mod versions;

use std::sync::Arc;

use outbox_stomp::{AckMode, Client, Subscribe};
use tokio::sync::watch;

pub use crate::error::HandlerError;
pub use crate::inbox::{DEFAULT_INBOX_TABLE, Delivery, Inbox};
pub use crate::subscriber::{Incoming, LinkStatus, StompSubscriber, Subscriber};
pub use config::{ConsumerConfig, MAX_CONSUMER_BATCH};
pub use handler::{BoxFuture, Handler, decode_json};
pub use metrics::{ConsumerCounter, ConsumerCounts, ConsumerMetrics};
pub use versions::{Versions, event_version};

use crate::Error;
use crate::backend::{Backend, WriteGate};
use dispatch::{in_key_lanes, shared_subscription, workers_and_batch};
use drain::Drain;
use housekeeping::retry_loop;
use shared::Shared;

/// An inbox consumer: a handler, its inbox and its queue.
pub struct Consumer<DB: Backend, H: Handler<DB>> {
    shared: Arc<Shared<DB, H>>,
}

impl<DB: Backend, H: Handler<DB>> std::fmt::Debug for Consumer<DB, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("inbox", &self.shared.inbox)
            .field("destination", &self.shared.config.destination)
            .finish()
    }
}

/// A running consumer. [`shutdown`](crate::task::TaskHandle::shutdown) stops
/// taking deliveries, finishes (commits and acks) the ones in flight,
/// unsubscribes so unprocessed prefetched messages go back to the queue, and
/// waits for all of that.
pub type ConsumerHandle = crate::task::TaskHandle<ConsumerMetrics>;

impl<DB: Backend, H: Handler<DB>> Consumer<DB, H> {
    /// A consumer that applies `handler` to the messages of
    /// `config.destination`, recording them in `inbox`. The settings are
    /// checked first ([`ConsumerConfig::validate`]).
    pub fn new(
        inbox: Inbox<DB>,
        handler: H,
        config: ConsumerConfig,
    ) -> Result<Consumer<DB, H>, Error> {
        config.validate()?;
        Ok(Consumer {
            shared: Arc::new(Shared {
                inbox,
                handler,
                config,
                metrics: Arc::default(),
                gate: WriteGate::new(DB::DIALECT),
                drain: Drain::new(),
            }),
        })
    }

    /// The counters.
    pub fn metrics(&self) -> Arc<ConsumerMetrics> {
        self.shared.metrics.clone()
    }

    /// Subscribes (so a Virtual Topic consumer queue exists from now on) and
    /// starts consuming on a task.
    pub async fn spawn(self, client: Client) -> Result<ConsumerHandle, Error> {
        let config = &self.shared.config;
        let prefetch = config.effective_prefetch();
        let subscription = client
            .subscribe(
                Subscribe::new(config.destination.clone())
                    .ack(AckMode::ClientIndividual)
                    .prefetch(prefetch)
                    .buffer(usize::try_from(prefetch).unwrap_or(usize::MAX)),
            )
            .await?;
        Ok(self.spawn_on(StompSubscriber::new(client, subscription)))
    }

    /// Starts consuming `subscriber` on a task: any source of messages, such
    /// as a scripted one in a test. [`spawn`](Consumer::spawn) is this with a
    /// STOMP subscription.
    pub fn spawn_on<S: Subscriber>(self, subscriber: S) -> ConsumerHandle {
        crate::task::TaskHandle::spawn("consumer", self.metrics(), |stopped| {
            self.run(subscriber, stopped)
        })
    }

    async fn run<S: Subscriber>(
        self,
        subscription: S,
        stopped: watch::Receiver<bool>,
    ) -> Result<(), Error> {
        let status = subscription.status();
        let shared = self.shared;
        shared.metrics.register(shared.inbox.consumer());
        shared.metrics.status.set_link(status.clone());
        let (workers, most) = workers_and_batch(
            DB::DIALECT.single_writer,
            shared.config.concurrency,
            shared.config.batch_size,
        );
        // The quiet period of the drain counts from the subscription.
        shared.drain.touch();
        let retry = tokio::spawn(retry_loop(shared.clone(), status.clone(), stopped.clone()));
        let subscription = if shared.config.per_key_order {
            in_key_lanes(&shared, subscription, stopped.clone(), workers, most).await
        } else {
            shared_subscription(&shared, subscription, stopped.clone(), workers, most).await
        };
        if !*stopped.borrow() {
            // The subscription ended on its own: the client stopped for good or
            // the broker refused to restore the subscription.
            let reason = status.end_reason();
            tracing::error!(destination = %shared.config.destination, %reason, "consumer stopped: the broker connection ended for good");
            shared.metrics.stopped();
            shared.metrics.status.stopped(&reason);
            retry.abort();
            let _ = retry.await;
            return Err(Error::BrokerGone(reason));
        }
        let _ = retry.await;
        // Prefetched messages nobody took go back to the queue.
        if let Some(subscription) = subscription {
            subscription.close().await;
        }
        Ok(())
    }
}
