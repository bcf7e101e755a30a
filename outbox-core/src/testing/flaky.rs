//! [`Flaky`]: a handler whose transaction fails at chosen attempts.

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::{Arc, Mutex};

use sqlx::Transaction;

use super::consumer::lock;
use crate::backend::Backend;
use crate::consumer::{BoxFuture, HandlerError};
use crate::{Delivery, Handler};

/// Wraps a handler so that its transaction fails, after the handler ran,
/// at given attempts of given events: the handler's writes roll back with
/// the inbox row, and the consumer retries the event, or parks it once its
/// budget ([`ConsumerConfig::max_attempts`](crate::ConsumerConfig::max_attempts)) is spent. Attempts are counted
/// as the consumer counts them ([`Delivery::attempt`]), so an event applied
/// again on its own after its batch was rolled back is the same attempt.
/// Clones share the plan: keep one to [`heal`](Flaky::heal) an event, e.g.
/// before replaying it.
///
/// ```
/// # use outbox_core::testing::Flaky;
/// # #[derive(Clone)]
/// # struct AwardPoints;
/// let handler = Flaky::new(AwardPoints)
///     .fail("event-1", 2) // applied at the third attempt
///     .fail_always("event-2"); // parked
/// let faults = handler.clone();
/// // … later, before a replay:
/// faults.heal("event-2");
/// ```
#[derive(Debug)]
pub struct Flaky<H> {
    inner: Arc<H>,
    /// Attempts that fail, by event id: those numbered below the value.
    plan: Arc<Mutex<HashMap<String, u32>>>,
}

impl<H> Clone for Flaky<H> {
    fn clone(&self) -> Self {
        Flaky {
            inner: self.inner.clone(),
            plan: self.plan.clone(),
        }
    }
}

impl<H> Flaky<H> {
    /// `inner`, failing nothing yet.
    pub fn new(inner: H) -> Flaky<H> {
        Flaky {
            inner: Arc::new(inner),
            plan: Arc::default(),
        }
    }

    /// The first `times` attempts at event `event_id` fail.
    pub fn fail(self, event_id: impl Display, times: u32) -> Flaky<H> {
        lock(&self.plan).insert(event_id.to_string(), times);
        self
    }

    /// Every attempt at event `event_id` fails.
    pub fn fail_always(self, event_id: impl Display) -> Flaky<H> {
        self.fail(event_id, u32::MAX)
    }

    /// From now on, attempts at event `event_id` no longer fail.
    pub fn heal(&self, event_id: impl Display) {
        lock(&self.plan).remove(&event_id.to_string());
    }

    /// Whether this attempt is one to fail.
    fn fails(&self, delivery: &Delivery) -> bool {
        lock(&self.plan)
            .get(&delivery.event_id)
            .is_some_and(|times| delivery.attempt < *times)
    }
}

impl<DB: Backend, H: Handler<DB>> Handler<DB> for Flaky<H> {
    type Event = H::Event;

    fn decode(&self, delivery: &Delivery) -> Result<H::Event, String> {
        self.inner.decode(delivery)
    }

    fn handle<'a>(
        &'a self,
        tx: &'a mut Transaction<'static, DB>,
        event: H::Event,
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            self.inner.handle(tx, event, delivery).await?;
            if self.fails(delivery) {
                return Err(format!(
                    "injected failure of event {} (attempt {})",
                    delivery.event_id,
                    delivery.attempt + 1
                )
                .into());
            }
            Ok(())
        })
    }

    fn after_commit(&self, delivery: &Delivery) {
        self.inner.after_commit(delivery);
    }
}
