//! What a handler is ([`Handler`]), and how the consumer calls one: a panic
//! or an overrun contained, never the end of a worker.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::time::Duration;

use futures_util::FutureExt as _;
use serde::de::DeserializeOwned;
use sqlx::Transaction;
use tracing::Instrument as _;

use crate::backend::Backend;
use crate::error::HandlerError;
use crate::inbox::Delivery;

/// A boxed, sendable future: what a [`Handler`] returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Applies one kind of event inside the consumer's database transaction.
///
/// `#[transactional_event(consumer = …)]` implements this for an annotated
/// function; implement it by hand for anything else.
pub trait Handler<DB: Backend>: Send + Sync + 'static {
    /// The decoded event.
    type Event: Send + 'static;

    /// Decodes the payload. An error parks the delivery as `FAILED` with its
    /// raw bytes; the handler is not called.
    fn decode(&self, delivery: &Delivery) -> Result<Self::Event, String>;

    /// Applies the event. Everything written through `tx` commits together
    /// with the inbox row; an `Err` rolls it all back and schedules a retry.
    fn handle<'a>(
        &'a self,
        tx: &'a mut Transaction<'static, DB>,
        event: Self::Event,
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;

    /// Called after the handler's transaction committed (before the ACK):
    /// a place for in-memory effects that must follow a durable write, such as
    /// metrics. The default does nothing.
    fn after_commit(&self, delivery: &Delivery) {
        let _ = delivery;
    }
}

/// Decodes a JSON payload; the error text names the type and the position.
pub fn decode_json<T: DeserializeOwned>(delivery: &Delivery) -> Result<T, String> {
    serde_json::from_slice(&delivery.body)
        .map_err(|e| format!("payload is not a valid {}: {e}", std::any::type_name::<T>()))
}

/// Decodes a delivery, turning a panic of [`Handler::decode`] into a decode
/// error: the delivery is parked with it like any undecodable payload.
pub(super) fn decode<DB: Backend, H: Handler<DB>>(
    handler: &H,
    delivery: &Delivery,
) -> Result<H::Event, String> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| handler.decode(delivery))) {
        Ok(decoded) => decoded,
        Err(panic) => Err(format!("decode panicked: {}", panic_text(panic.as_ref()))),
    }
}

/// Runs [`Handler::after_commit`]; a panic is logged and goes no further:
/// the event is committed, so it is counted and acknowledged all the same.
pub(super) fn after_commit<DB: Backend, H: Handler<DB>>(handler: &H, delivery: &Delivery) {
    if let Err(panic) =
        std::panic::catch_unwind(AssertUnwindSafe(|| handler.after_commit(delivery)))
    {
        tracing::error!(
            event_id = delivery.event_id,
            panic = panic_text(panic.as_ref()),
            "after_commit panicked; the event is committed and is acknowledged"
        );
    }
}

/// The message of a panic, when it has one.
pub(super) fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Runs the handler, turning a panic into an error.
pub(super) async fn run_handler<DB: Backend, H: Handler<DB>>(
    handler: &H,
    timeout: Option<Duration>,
    tx: &mut Transaction<'static, DB>,
    event: H::Event,
    delivery: &Delivery,
) -> Result<(), HandlerError> {
    let run = AssertUnwindSafe(handler.handle(tx, event, delivery))
        .catch_unwind()
        .instrument(crate::trace::handle_span(delivery));
    let ran = match timeout {
        Some(limit) => match tokio::time::timeout(limit, run).await {
            Ok(ran) => ran,
            Err(_) => {
                return Err(format!("the handler did not finish within {limit:?}").into());
            }
        },
        None => run.await,
    };
    match ran {
        Ok(result) => result,
        Err(_) => Err("the handler panicked".into()),
    }
}
