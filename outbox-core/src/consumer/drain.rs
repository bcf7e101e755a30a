//! The drain gate of inbox retention: retention waits until the consumer
//! has drained what the broker held for it.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::names::{ms, now_ms};

use super::config::ConsumerConfig;

/// One delivery in progress, for [`Drain`].
pub(super) struct InFlight<'a>(&'a Drain);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether the consumer has drained its queue since it started, or since its
/// link to the broker last dropped: no delivery in progress and none for a
/// quiet period. Until then inbox retention does not run, because the broker
/// may still redeliver messages the previous run (or the previous connection)
/// received, committed and never acked, however long ago; their inbox rows
/// must be there when they come.
#[derive(Debug)]
pub(super) struct Drain {
    in_flight: std::sync::atomic::AtomicUsize,
    last_activity: std::sync::atomic::AtomicI64,
    drained: std::sync::atomic::AtomicBool,
}

impl Drain {
    pub(super) fn new() -> Drain {
        Drain {
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            last_activity: std::sync::atomic::AtomicI64::new(now_ms()),
            drained: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A delivery begins; it ends when the guard drops, however it ends.
    pub(super) fn begin(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.touch();
        InFlight(self)
    }

    /// Counts the quiet period from now (at subscribe, and while the
    /// connection is down: the broker cannot deliver then).
    pub(super) fn touch(&self) {
        self.last_activity.store(now_ms(), Ordering::Release);
    }

    /// The link dropped (or an ACK failed, which it does when the link
    /// drops): messages committed but not acknowledged come again after the
    /// reconnect, so a fresh drain is waited for.
    pub(super) fn reset(&self) {
        self.drained.store(false, Ordering::Release);
        self.touch();
    }

    /// `true` once nothing was in progress for `quiet` while connected, until
    /// the link drops or an ACK fails.
    pub(super) fn drained(&self, quiet: Duration, connected: bool) -> bool {
        if !connected {
            self.reset();
            return false;
        }
        if self.drained.load(Ordering::Acquire) {
            return true;
        }
        let idle = self.in_flight.load(Ordering::Acquire) == 0
            && now_ms() - self.last_activity.load(Ordering::Acquire) >= ms(quiet);
        if idle {
            self.drained.store(true, Ordering::Release);
        }
        idle
    }
}

/// How long without a delivery counts as drained: a second, or four retry
/// polls if that is longer.
pub(super) fn drain_quiet(config: &ConsumerConfig) -> Duration {
    Duration::from_secs(1).max(config.retry_poll.saturating_mul(4))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_drain_gate_closes_when_the_link_drops_and_waits_for_a_fresh_quiet_period() {
        use std::time::Duration;
        let drain = super::Drain::new();
        let (none, hour) = (Duration::ZERO, Duration::from_secs(3600));
        assert!(drain.drained(none, true), "quiet and connected");
        assert!(
            drain.drained(hour, true),
            "drained stays drained while connected"
        );
        assert!(!drain.drained(none, false), "not while the link is down");
        assert!(
            !drain.drained(hour, true),
            "a fresh quiet period after the reconnect"
        );
        assert!(drain.drained(none, true));
        drain.reset();
        assert!(
            !drain.drained(hour, true),
            "an ACK that failed closes the gate too"
        );
    }
}
