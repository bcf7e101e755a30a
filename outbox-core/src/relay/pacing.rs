//! How long the relay waits after each turn, and when producers may hand
//! rows to it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{RelayConfig, RelayMetrics, Step};
use crate::Error;
use crate::wake::Handoff;

/// What the loop does after a turn.
pub(super) enum Next {
    /// Go on at once (`None`) or after a pause.
    Go(Option<Duration>),
    /// Stop for good, for this reason.
    Stop(String),
}

/// The relay's pacing: consecutive outages and database failures, each
/// backing the whole relay off, and hand-off, offered only while the relay
/// can publish.
pub(super) struct Pacing {
    outages: u32,
    db_failures: u32,
    poll: Duration,
    backoff: crate::Backoff,
    handoff: Option<Arc<Handoff>>,
}

impl Pacing {
    pub(super) fn new(config: &RelayConfig, handoff: Option<Arc<Handoff>>) -> Pacing {
        Pacing {
            outages: 0,
            db_failures: 0,
            poll: config.poll_interval,
            backoff: config.outage_backoff,
            handoff,
        }
    }

    /// Counts the outcome of a turn and says what comes next.
    pub(super) fn after(&mut self, outcome: Result<Step, Error>, metrics: &RelayMetrics) -> Next {
        match &outcome {
            // A success is recorded where the broker confirmed a batch.
            Ok(Step::Published(_) | Step::Idle) => metrics.status.idle(),
            // Recorded where the publish failed, with the broker's error.
            Ok(Step::Unavailable) => {}
            Ok(Step::Stopped(reason)) => metrics.status.stopped(reason),
            Err(error) => metrics.status.database_failed(error),
        }
        let next = match outcome {
            Ok(Step::Published(_)) => {
                self.outages = 0;
                self.db_failures = 0;
                Next::Go(None)
            }
            Ok(Step::Idle) => {
                // The database answered; the broker was not asked. An outage
                // ends with a publish the broker confirms, so hand-off stays
                // withdrawn across idle turns between two failed publishes.
                self.db_failures = 0;
                Next::Go(Some(self.poll))
            }
            Ok(Step::Stopped(reason)) => return Next::Stop(reason),
            Ok(Step::Unavailable) => {
                self.outages += 1;
                Next::Go(Some(self.backoff.delay(self.outages - 1)))
            }
            Err(error) => {
                self.db_failures += 1;
                metrics.add(super::RelayCounter::DbErrors, 1);
                tracing::warn!(%error, "relay step failed");
                Next::Go(Some(self.backoff.delay(self.db_failures - 1)))
            }
        };
        // While the relay cannot publish, producers stop handing rows to it
        // (what it already holds it gave back or holds under a lease).
        self.offer(self.outages == 0 && self.db_failures == 0);
        next
    }

    /// Offers hand-off to producers, or withdraws it.
    pub(super) fn offer(&self, on: bool) {
        if let Some(handoff) = &self.handoff {
            handoff.active.store(on, Ordering::Release);
        }
    }
}
