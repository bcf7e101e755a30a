//! How a connection ends, and which refusal it is blamed on.
//!
//! An ERROR that names a receipt refuses that request alone. An ERROR that
//! names none is what ActiveMQ sends before it closes a connection over a
//! frame it will not take (a header over its limit, a frame over its size);
//! for other errors it keeps the connection. So such an ERROR counts only
//! when the connection breaks right after it:
//!
//! ```text
//!  ERROR (no receipt) ──► noted, first one wins for LAST_WORDS
//!  connection breaks ──┬─ within LAST_WORDS of it ──► Refused(error): requests in flight,
//!                      │                              and later frames of its transactions,
//!                      │                              fail with Error::Broker(error)
//!                      └─ otherwise ────────────────► Lost(cause): Error::ConnectionLost
//! ```

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{BrokerError, Error};

/// How long after an ERROR that named no request a close is its consequence;
/// also how long the broker may take to say why it closed after a failed write.
pub(crate) const LAST_WORDS: Duration = Duration::from_millis(250);

/// How many refused connections are remembered for their late requests.
const REFUSALS_KEPT: usize = 8;

/// Why one connection ended.
#[derive(Debug)]
pub(crate) enum Ended {
    /// Closed on purpose; stop.
    Closed,
    /// Lost; reconnect.
    Lost(Error),
    /// The broker refused a frame with an ERROR and closed; reconnect.
    Refused(BrokerError),
    /// Unrecoverable; stop.
    Fatal(Error),
}

/// ERRORs that named no request, and the connections they ended.
#[derive(Debug, Default)]
pub(crate) struct Refusals {
    /// The first such ERROR of the current connection, and until when a
    /// close counts as its consequence.
    recent: Option<(BrokerError, Instant)>,
    /// Connections (epochs) the broker closed after such an ERROR, and that error.
    refused: VecDeque<(u64, BrokerError)>,
}

impl Refusals {
    /// Remembers an ERROR that named no request. The first one names the
    /// cause: ActiveMQ may send another while it reads the rest of the refused
    /// frame as a new one.
    pub(crate) fn note(&mut self, error: BrokerError, now: Instant) {
        if self.recent.as_ref().is_none_or(|(_, until)| *until < now) {
            self.recent = Some((error, now + LAST_WORDS));
        }
    }

    /// The connection broke with `error`: a refusal if the broker closed it
    /// right after an ERROR that named no request, else a lost connection.
    pub(crate) fn broke(&mut self, error: Error, now: Instant) -> Ended {
        match self.recent.take() {
            Some((refusal, until)) if now <= until => Ended::Refused(refusal),
            _ => Ended::Lost(error),
        }
    }

    /// Connection `epoch` ended: a refused one is remembered for its late
    /// requests, and nothing noted on it carries over to the next.
    pub(crate) fn ended(&mut self, epoch: u64, ended: &Ended) {
        self.recent = None;
        if let Ended::Refused(error) = ended {
            if self.refused.len() == REFUSALS_KEPT {
                self.refused.pop_front();
            }
            self.refused.push_back((epoch, error.clone()));
        }
    }

    /// The error for a request (`what`) of connection `epoch`, which is
    /// gone: a transaction of a connection the broker closed after refusing
    /// a frame was refused with it; anything else is merely stale.
    pub(crate) fn stale(&self, epoch: u64, what: &'static str) -> Error {
        let refusal = (what == "transaction")
            .then(|| self.refused.iter().find(|(e, _)| *e == epoch))
            .flatten();
        refusal.map_or(Error::Stale(what), |(_, refusal)| {
            Error::Broker(refusal.clone())
        })
    }
}
