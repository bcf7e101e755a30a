//! What becomes of an event after a failed try: one rule, asked by the
//! first delivery, by the database-error retries around it and by the retry
//! pass alike. [`after_failure`] is a pure function of what went wrong so
//! far, the settings, the time and a random factor; the callers do the IO.
//!
//! ```text
//! failure       counts towards         below its bound          at its bound
//! ───────────   ────────────────────   ──────────────────────   ─────────────────────────
//! Handler       attempts               RETRY row, due after     park (max_attempts)
//!                                      the backoff of the
//!                                      attempts spent
//! Undecodable   attempts               -                        park at once
//! Refused       refused, recurring     try again after the      park (max_attempts refused,
//!                                      backoff of the errors    or recurring_error_limit,
//!                                      in a row                 in a row)
//! Recurring     recurring              try again, same          park (recurring_error_limit
//!                                                               in a row)
//! Unreachable   -                      try again, same          never: an outage is waited out
//! ```

use std::time::Duration;

use crate::Error;
use crate::names::ms;

use super::config::ConsumerConfig;

/// What a try of one event ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failure {
    /// The handler returned an error, panicked or overran its time, or the
    /// database undid its transaction underneath it; on a retry, also a
    /// commit the database refused for good. An attempt spent.
    Handler,
    /// The payload does not decode: no attempt can succeed.
    Undecodable,
    /// The database refused to record the event in a way that trying again
    /// cannot cure: the data is at fault ([`Error::is_permanent`]).
    Refused,
    /// The database answered with an error that looks transient but may
    /// recur every time the same event is tried: a trigger or deferred
    /// constraint raising, a table missing after a schema change, a deadlock.
    Recurring,
    /// The database could not be reached (connection refused or cut, pool
    /// timeouts): that says nothing of the event.
    Unreachable,
}

impl Failure {
    /// The kind of a database error met while settling an event.
    pub(super) fn of(error: &Error) -> Failure {
        if error.is_permanent() {
            Failure::Refused
        } else if answered(error) {
            Failure::Recurring
        } else {
            Failure::Unreachable
        }
    }
}

/// `true` for an error the database answered with (a statement or a commit
/// it refused), which may recur every time the same event is tried;
/// `false` when the database could not be reached.
fn answered(error: &Error) -> bool {
    match error {
        Error::Database { source, .. } => matches!(
            source,
            sqlx::Error::Database(_)
                | sqlx::Error::Encode(_)
                | sqlx::Error::Decode(_)
                | sqlx::Error::ColumnDecode { .. }
                | sqlx::Error::TypeNotFound { .. }
                | sqlx::Error::ColumnNotFound(_)
                | sqlx::Error::ColumnIndexOutOfBounds { .. }
        ),
        Error::Row { .. } => true,
        _ => false,
    }
}

/// A try that failed for a reason of the event's own, its handler's or its
/// payload's, rather than the database's.
#[derive(Debug)]
pub(super) struct TryFailed {
    /// [`Failure::Handler`] or [`Failure::Undecodable`].
    pub(super) failure: Failure,
    /// What went wrong, stored as the row's `last_error`.
    pub(super) reason: String,
}

impl TryFailed {
    /// The handler failed, or its transaction was undone.
    pub(super) fn handler(reason: String) -> TryFailed {
        TryFailed {
            failure: Failure::Handler,
            reason,
        }
    }

    /// The payload does not decode.
    pub(super) fn undecodable(reason: String) -> TryFailed {
        TryFailed {
            failure: Failure::Undecodable,
            reason,
        }
    }
}

/// What went wrong so far with one event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Tally {
    /// Attempts spent: the row's `attempts`, 0 for a fresh delivery.
    pub(super) attempts: u32,
    /// Database errors in a row on this event, of any kind: the step of the
    /// backoff before trying again.
    pub(super) db_errors: u32,
    /// Of those, the ones the data causes ([`Failure::Refused`]).
    pub(super) refused: u32,
    /// Of those, the ones the database answered with ([`Failure::Refused`]
    /// and [`Failure::Recurring`]).
    pub(super) recurring: u32,
}

impl Tally {
    /// A row with `attempts` spent (its column; a negative count reads as 0).
    pub(super) fn spent(attempts: i64) -> Tally {
        Tally {
            attempts: u32::try_from(attempts.max(0)).unwrap_or(u32::MAX),
            ..Tally::default()
        }
    }
}

/// What to do with an event after a failed try.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Next {
    /// Record it as `RETRY`, due again at `at` (ms since the epoch), after
    /// `delay`; `attempt` is the number of the try that failed.
    Retry {
        /// The number of the try that failed (1 for the first).
        attempt: u32,
        /// The backoff before the next try.
        delay: Duration,
        /// When the next try is due.
        at: i64,
    },
    /// Park it as `FAILED` (replayable); `attempt` is the number of the try
    /// that failed.
    Park {
        /// The number of the try that failed (1 for the first).
        attempt: u32,
    },
    /// Nothing was recorded: try the same again after `delay`.
    TryAgain {
        /// The backoff before trying again.
        delay: Duration,
    },
}

impl Next {
    /// `true` when the event is parked.
    pub(super) fn parks(&self) -> bool {
        matches!(self, Next::Park { .. })
    }
}

/// The next step for an event whose try failed with `failure`, after what
/// went wrong `so_far`, under `config`'s `max_attempts`,
/// `recurring_error_limit` and `retry_backoff`, at `now` (ms since the
/// epoch); `jitter` (in `[0.5, 1.0]`) scales the backoff. Returns the step
/// and the tally with this failure counted in.
pub(super) fn after_failure(
    failure: Failure,
    so_far: Tally,
    config: &ConsumerConfig,
    now: i64,
    jitter: f64,
) -> (Next, Tally) {
    let backoff = |step| config.retry_backoff.delay_scaled(step, jitter);
    let attempt = so_far.attempts.saturating_add(1);
    let mut tally = so_far;
    match failure {
        Failure::Handler | Failure::Undecodable => {
            tally.attempts = attempt;
            if failure == Failure::Undecodable || attempt >= config.max_attempts {
                return (Next::Park { attempt }, tally);
            }
            let delay = backoff(so_far.attempts);
            let at = now.saturating_add(ms(delay));
            (Next::Retry { attempt, delay, at }, tally)
        }
        Failure::Refused | Failure::Recurring | Failure::Unreachable => {
            tally.db_errors = tally.db_errors.saturating_add(1);
            if failure == Failure::Refused {
                tally.refused = tally.refused.saturating_add(1);
            }
            if failure != Failure::Unreachable {
                tally.recurring = tally.recurring.saturating_add(1);
            }
            if tally.refused >= config.max_attempts
                || tally.recurring >= config.recurring_error_limit
            {
                return (Next::Park { attempt }, tally);
            }
            let delay = backoff(so_far.db_errors);
            (Next::TryAgain { delay }, tally)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Failure, Next, Tally, after_failure};
    use crate::Error;
    use crate::backoff::Backoff;
    use crate::consumer::ConsumerConfig;

    const NOW: i64 = 1_000_000;

    /// Five attempts, ten recurring errors, 100 ms doubling to 1 s.
    fn config() -> ConsumerConfig {
        ConsumerConfig {
            max_attempts: 5,
            recurring_error_limit: 10,
            retry_backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(1)),
            ..ConsumerConfig::new("/queue/decisions")
        }
    }

    fn spent(attempts: i64) -> Tally {
        Tally::spent(attempts)
    }

    fn errors(db_errors: u32, refused: u32, recurring: u32) -> Tally {
        Tally {
            attempts: 0,
            db_errors,
            refused,
            recurring,
        }
    }

    fn retry(attempt: u32, delay_ms: u64) -> Next {
        let delay = Duration::from_millis(delay_ms);
        Next::Retry {
            attempt,
            delay,
            at: NOW + delay_ms as i64,
        }
    }

    fn again(delay_ms: u64) -> Next {
        Next::TryAgain {
            delay: Duration::from_millis(delay_ms),
        }
    }

    fn park(attempt: u32) -> Next {
        Next::Park { attempt }
    }

    #[test]
    fn each_failure_after_what_went_wrong_so_far_has_one_next_step() {
        use Failure::*;
        let cases: &[(&str, Failure, Tally, Next)] = &[
            (
                "a fresh delivery's handler failure is retried after the first backoff",
                Handler,
                spent(0),
                retry(1, 100),
            ),
            (
                "a retry's handler failure waits the backoff of the attempts spent",
                Handler,
                spent(2),
                retry(3, 400),
            ),
            (
                "each further attempt doubles the backoff",
                Handler,
                spent(3),
                retry(4, 800),
            ),
            (
                "the failure that spends the last attempt parks",
                Handler,
                spent(4),
                park(5),
            ),
            (
                "a row with more attempts than a lowered budget parks on its next failure",
                Handler,
                spent(9),
                park(10),
            ),
            (
                "an undecodable fresh delivery parks at once",
                Undecodable,
                spent(0),
                park(1),
            ),
            (
                "an undecodable retry row parks whatever attempts it has left",
                Undecodable,
                spent(1),
                park(2),
            ),
            (
                "a database that cannot be reached is tried again",
                Unreachable,
                errors(0, 0, 0),
                again(100),
            ),
            (
                "an outage is waited out however long it lasts, at the capped backoff",
                Unreachable,
                errors(10_000, 0, 0),
                again(1000),
            ),
            (
                "an error the data causes is tried again below max_attempts",
                Refused,
                errors(3, 3, 3),
                again(800),
            ),
            (
                "the max_attempts-th error the data causes in a row parks",
                Refused,
                errors(4, 4, 4),
                park(1),
            ),
            (
                "a transient error the database answered with is tried again below its bound",
                Recurring,
                errors(8, 0, 8),
                again(1000),
            ),
            (
                "the recurring_error_limit-th answered error in a row parks",
                Recurring,
                errors(9, 0, 9),
                park(1),
            ),
            (
                "errors the data causes count towards the recurring bound too",
                Refused,
                errors(9, 1, 9),
                park(1),
            ),
            (
                "unreachable errors between them count for neither bound",
                Unreachable,
                errors(50, 4, 9),
                again(1000),
            ),
        ];
        for (case, failure, so_far, expected) in cases {
            let (next, _) = after_failure(*failure, *so_far, &config(), NOW, 1.0);
            assert_eq!(next, *expected, "{case}");
        }
    }

    #[test]
    fn the_tally_counts_each_failure_where_it_belongs() {
        let config = config();
        let step = |failure, so_far| after_failure(failure, so_far, &config, NOW, 1.0).1;
        let handler = step(Failure::Handler, spent(1));
        assert_eq!(handler, spent(2), "an attempt spent");
        let undecodable = step(Failure::Undecodable, spent(1));
        assert_eq!(undecodable, spent(2));
        let refused = step(Failure::Refused, Tally::default());
        assert_eq!(refused, errors(1, 1, 1));
        let recurring = step(Failure::Recurring, refused);
        assert_eq!(recurring, errors(2, 1, 2));
        let unreachable = step(Failure::Unreachable, recurring);
        assert_eq!(unreachable, errors(3, 1, 2), "only the backoff steps on");
    }

    #[test]
    fn a_single_attempt_budget_parks_the_first_handler_failure() {
        let config = ConsumerConfig {
            max_attempts: 1,
            ..config()
        };
        let (next, _) = after_failure(Failure::Handler, spent(0), &config, NOW, 1.0);
        assert_eq!(next, park(1));
        let (next, _) = after_failure(Failure::Refused, Tally::default(), &config, NOW, 1.0);
        assert_eq!(next, park(1), "and the first error the data causes");
    }

    #[test]
    fn the_jitter_shortens_the_backoff_by_at_most_half_and_the_due_time_with_it() {
        let (next, _) = after_failure(Failure::Handler, spent(1), &config(), NOW, 0.5);
        assert_eq!(next, retry(2, 100));
        let (next, _) = after_failure(Failure::Handler, spent(1), &config(), NOW, 0.1);
        assert_eq!(next, retry(2, 100), "a factor below one half is one half");
    }

    #[test]
    fn a_negative_attempt_count_reads_as_none_spent() {
        assert_eq!(Tally::spent(-3), spent(0));
        assert_eq!(Tally::spent(i64::MAX).attempts, u32::MAX);
        let (next, _) = after_failure(
            Failure::Handler,
            Tally::spent(i64::MAX),
            &config(),
            NOW,
            1.0,
        );
        assert!(next.parks(), "{next:?}");
    }

    #[test]
    fn database_errors_are_told_apart_by_what_they_say_of_the_event() {
        let db = |source| Error::Database {
            action: "testing",
            source,
        };
        let refused = db(sqlx::Error::Encode("too long".into()));
        assert_eq!(Failure::of(&refused), Failure::Refused);
        let answered = db(sqlx::Error::ColumnNotFound("attempts".into()));
        assert_eq!(Failure::of(&answered), Failure::Recurring);
        let row = Error::Row {
            table: "inbox",
            column: "headers",
            reason: "not JSON",
        };
        assert_eq!(Failure::of(&row), Failure::Recurring);
        assert_eq!(
            Failure::of(&db(sqlx::Error::PoolTimedOut)),
            Failure::Unreachable
        );
        let cut = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(Failure::of(&db(sqlx::Error::Io(cut))), Failure::Unreachable);
    }
}
