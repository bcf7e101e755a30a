//! Named failpoints for crash tests.
//!
//! With the cargo feature `failpoints`, a process whose `OUTBOX_FAILPOINT`
//! variable names a failpoint kills itself with `SIGKILL` when it reaches it —
//! no destructors, no flushing, like a power cut. Without the feature the calls
//! compile to nothing.
//!
//! | name | where |
//! |---|---|
//! | `relay.before_publish` | the relay claimed a batch, nothing sent yet |
//! | `relay.after_receipt` | the broker confirmed the batch, rows not yet marked |
//! | `inbox.before_commit` | the handler ran, its transaction not committed |
//! | `inbox.after_commit` | the transaction committed, the message not acked |

/// The environment variable that arms a failpoint.
pub const FAILPOINT_VAR: &str = "OUTBOX_FAILPOINT";

/// Kills the process with `SIGKILL` if `name` is the armed failpoint.
#[inline]
pub fn hit(name: &str) {
    #[cfg(feature = "failpoints")]
    {
        use std::sync::OnceLock;
        static ARMED: OnceLock<Option<String>> = OnceLock::new();
        let armed = ARMED.get_or_init(|| std::env::var(FAILPOINT_VAR).ok());
        if armed.as_deref() == Some(name) {
            eprintln!("failpoint {name}: SIGKILL");
            // SAFETY: getpid and kill have no memory-safety preconditions.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}
