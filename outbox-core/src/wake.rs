//! In-process wake-ups: relays register per table; a commit through
//! [`Outbox::commit`](crate::Outbox::commit) or [`wake`] notifies them.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::Notify;

static WAKERS: Mutex<Vec<(String, Weak<Notify>)>> = Mutex::new(Vec::new());

/// Registers a relay's notifier for `table`.
pub(crate) fn register(table: &str, notify: &Arc<Notify>) {
    let mut wakers = WAKERS.lock().unwrap_or_else(|e| e.into_inner());
    wakers.retain(|(_, w)| w.strong_count() > 0);
    wakers.push((table.to_owned(), Arc::downgrade(notify)));
}

/// Wakes every relay of this process that serves the outbox table `table`.
/// Call it after committing a transaction that appended events, unless the
/// commit went through [`Outbox::commit`](crate::Outbox::commit), which does.
pub fn wake(table: &str) {
    let wakers = WAKERS.lock().unwrap_or_else(|e| e.into_inner());
    let mut seen: HashSet<*const Notify> = HashSet::new();
    for (t, w) in wakers.iter() {
        if t == table
            && let Some(n) = w.upgrade()
            && seen.insert(Arc::as_ptr(&n))
        {
            n.notify_one();
        }
    }
}
