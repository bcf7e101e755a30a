//! Requests that arrived while no connection was up, in order, for the next
//! connection. Each leaves by its deadline ([`Error::NotConnected`], never
//! written later) or when its caller has gone, so the backlog stays at the
//! number of waiting callers however long an outage lasts.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::time::Instant;

use super::{Request, Shared};
use crate::error::Error;

/// The waiting requests; their number is published as
/// [`Client::waiting_requests`](super::Client::waiting_requests).
pub(crate) struct Backlog {
    requests: VecDeque<Request>,
    shared: Arc<Shared>,
}

impl Backlog {
    pub(crate) fn new(shared: Arc<Shared>) -> Backlog {
        Backlog {
            requests: VecDeque::new(),
            shared,
        }
    }

    /// Keeps `request` for the next connection.
    pub(crate) fn push(&mut self, request: Request) {
        self.requests.push_back(request);
        self.publish();
    }

    /// The request that waited longest.
    pub(crate) fn pop(&mut self) -> Option<Request> {
        let request = self.requests.pop_front();
        self.publish();
        request
    }

    /// Withdraws waiting requests whose caller has gone or whose deadline
    /// passed at `now`.
    pub(crate) fn sweep(&mut self, now: Instant) {
        let waited = self.shared.config.receipt_timeout;
        let mut kept = VecDeque::with_capacity(self.requests.len());
        for request in self.requests.drain(..) {
            if request.abandoned() {
                continue;
            }
            if request.deadline().is_some_and(|d| d <= now) {
                request.fail(Error::NotConnected { waited });
                continue;
            }
            kept.push_back(request);
        }
        self.requests = kept;
        self.publish();
    }

    /// Fails every waiting request with `error`.
    pub(crate) fn fail_all(&mut self, error: impl Fn() -> Error) {
        for request in self.requests.drain(..) {
            request.fail(error());
        }
        self.publish();
    }

    fn publish(&self) {
        self.shared
            .waiting
            .store(self.requests.len(), Ordering::Relaxed);
    }
}
