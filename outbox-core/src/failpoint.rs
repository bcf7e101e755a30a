//! Named failpoints for crash tests.
//!
//! With the cargo feature `failpoints`, a process whose `OUTBOX_FAILPOINT`
//! variable names a failpoint kills itself with `SIGKILL` when it reaches it —
//! no destructors, no flushing, like a power cut. `name@n` (say
//! `schema.after_statement@2`) waits for the n-th time the process reaches
//! `name`; plain `name` fires at the first. Without the feature the calls
//! compile to nothing.
//!
//! | name | where |
//! |---|---|
//! | `relay.before_publish` | the relay claimed a batch, nothing sent yet |
//! | `relay.after_receipt` | the broker confirmed the batch, rows not yet marked |
//! | `inbox.before_commit` | the handler ran, its transaction not committed |
//! | `inbox.after_commit` | the transaction committed, the message not acked |
//! | `schema.after_statement` | a statement of a migration step ran; after a step's last one, its version is not yet recorded |

/// The environment variable that sets this process's wall clock off by a
/// number of milliseconds (with the feature `failpoints`; ignored without
/// it): a host whose clock is ahead (positive) or behind (negative), for
/// tests of leases decided on the database's clock.
pub const CLOCK_SKEW_VAR: &str = "OUTBOX_CLOCK_SKEW_MS";

/// The skew [`CLOCK_SKEW_VAR`] sets, in ms; 0 without the feature.
#[inline]
pub(crate) fn clock_skew_ms() -> i64 {
    #[cfg(feature = "failpoints")]
    {
        use std::sync::OnceLock;
        static SKEW: OnceLock<i64> = OnceLock::new();
        *SKEW.get_or_init(|| {
            std::env::var(CLOCK_SKEW_VAR)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        })
    }
    #[cfg(not(feature = "failpoints"))]
    0
}

/// The environment variable that arms a failpoint.
pub const FAILPOINT_VAR: &str = "OUTBOX_FAILPOINT";

/// Kills the process with `SIGKILL` if `name` is the armed failpoint and this
/// is the time it was armed for.
#[inline]
pub fn hit(name: &str) {
    #[cfg(feature = "failpoints")]
    {
        use std::sync::OnceLock;
        use std::sync::atomic::{AtomicU64, Ordering};
        static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
        // Only one failpoint is armed per process, so one count serves.
        static REACHED: AtomicU64 = AtomicU64::new(0);
        let armed = ARMED.get_or_init(|| {
            std::env::var(FAILPOINT_VAR).ok().map(|value| {
                let (point, at) = armed(&value);
                (point.to_owned(), at)
            })
        });
        if let Some((point, at)) = armed
            && point == name
            && REACHED.fetch_add(1, Ordering::Relaxed) + 1 == *at
        {
            eprintln!("failpoint {name} (time {at}): SIGKILL");
            // SAFETY: getpid and kill have no memory-safety preconditions.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// The failpoint an `OUTBOX_FAILPOINT` value names, and the time (counted
/// from 1) it fires at: `name@n`, or `name` for the first time.
#[cfg(feature = "failpoints")]
fn armed(value: &str) -> (&str, u64) {
    match value.rsplit_once('@') {
        Some((point, at)) => match at.parse::<u64>() {
            Ok(at) if at > 0 => (point, at),
            _ => (value, 1),
        },
        None => (value, 1),
    }
}

#[cfg(all(test, feature = "failpoints"))]
mod tests {
    use super::armed;

    #[test]
    fn a_failpoint_fires_at_the_first_time_unless_a_count_follows_its_name() {
        assert_eq!(armed("relay.before_publish"), ("relay.before_publish", 1));
        assert_eq!(
            armed("schema.after_statement@3"),
            ("schema.after_statement", 3)
        );
        // Not a count: the whole value is the name, which no failpoint has.
        assert_eq!(
            armed("schema.after_statement@x"),
            ("schema.after_statement@x", 1)
        );
        assert_eq!(
            armed("schema.after_statement@0"),
            ("schema.after_statement@0", 1)
        );
    }
}
