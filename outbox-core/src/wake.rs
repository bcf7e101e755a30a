//! In-process wake-ups and hand-off: relays register per table; a commit
//! through [`Outbox::commit`](crate::Outbox::commit) or [`wake`] notifies them,
//! and rows appended through the same pool in this process are leased to a
//! running relay as they are inserted (see [`RelayConfig::handoff`](crate::RelayConfig::handoff)).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// A running relay's offer to take rows as they are inserted: rows appended
/// with `claimed_by = token` are read by that relay without a claim.
#[derive(Debug)]
pub(crate) struct Handoff {
    /// The lease token written into `claimed_by` at insert time.
    pub(crate) token: String,
    /// Length of the lease written into `claimed_until`, in milliseconds.
    pub(crate) lease_ms: i64,
    /// Cleared while the relay cannot publish (broker or database outage) and
    /// when it stops, so producers stop leasing rows to it.
    pub(crate) active: AtomicBool,
}

/// Which pool a handle belongs to: the address of the pool's shared connect
/// options, which every clone of one pool shares.
pub(crate) type PoolId = usize;

pub(crate) fn pool_id<DB: sqlx::Database>(pool: &sqlx::Pool<DB>) -> PoolId {
    Arc::as_ptr(&pool.connect_options()) as *const () as usize
}

type Handoffs = Vec<(String, PoolId, Weak<Handoff>)>;
static HANDOFFS: Mutex<Handoffs> = Mutex::new(Vec::new());

/// Registers a relay of `table` on pool `pool` for hand-off. The entry lives
/// as long as the relay holds the `Arc`.
pub(crate) fn register_handoff(table: &str, pool: PoolId, handoff: &Arc<Handoff>) {
    let mut all = HANDOFFS.lock().unwrap_or_else(|e| e.into_inner());
    all.retain(|(_, _, h)| h.strong_count() > 0);
    all.push((table.to_owned(), pool, Arc::downgrade(handoff)));
}

/// The token and lease end (ms since the epoch, from `now`) to write into rows
/// appended now to `table` on `pool`, if a relay of this process takes them.
pub(crate) fn handoff_lease(table: &str, pool: PoolId, now: i64) -> Option<(String, i64)> {
    let all = HANDOFFS.lock().unwrap_or_else(|e| e.into_inner());
    all.iter()
        .filter(|(t, p, _)| *p == pool && t == table)
        .filter_map(|(_, _, h)| h.upgrade())
        .find(|h| h.active.load(Ordering::Acquire))
        .map(|h| (h.token.clone(), now.saturating_add(h.lease_ms)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_goes_to_an_active_relay_of_the_same_table_and_pool() {
        let h = Arc::new(Handoff {
            token: "r-h".into(),
            lease_ms: 1000,
            active: AtomicBool::new(true),
        });
        register_handoff("wake_test_table", 7, &h);
        assert_eq!(
            handoff_lease("wake_test_table", 7, 5),
            Some(("r-h".into(), 1005))
        );
        assert_eq!(handoff_lease("wake_test_table", 8, 5), None);
        assert_eq!(handoff_lease("other_table", 7, 5), None);
        h.active.store(false, Ordering::Release);
        assert_eq!(handoff_lease("wake_test_table", 7, 5), None);
        h.active.store(true, Ordering::Release);
        drop(h);
        assert_eq!(handoff_lease("wake_test_table", 7, 5), None);
    }
}
