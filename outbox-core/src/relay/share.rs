//! Several relays on one table: each claims the keys of its share of the key
//! partitions, so a relay never waits behind rows of its keys that another
//! relay holds.
//!
//! Every row with a key carries its key's partition (a stable hash of
//! `event_key` modulo [`KEY_PARTITIONS`], computed when it is appended); rows
//! without a key carry -1 and go to whoever claims first. The relays of a
//! table find each other through membership leases in `outbox_lease`
//! (`{table}.m.{relay_id}.{incarnation}`), each renewed several times per
//! half lease. Relay *i* of the *n* live ones, in name order, claims the
//! partitions `[i·P/n, (i+1)·P/n)`. A relay that stops gives its lease back
//! at once; one that dies lets it run out after half a lease; a relay that
//! starts joins at its first renewal; the others see either at their next
//! renewal and move to their new shares.
//!
//! While the relays' views differ (a renewal apart) two of them may claim
//! the same partition. That costs only the waiting this avoids: per-key order
//! never depends on the shares, because a claim still skips a row whose key
//! has an earlier unpublished row anywhere in the table.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use sqlx::Pool;

use crate::Error;
use crate::backend::Backend;
use crate::names::ms;
use crate::store::lease::LeaseStore;
use crate::store::outbox::Share;

/// Key partitions of a table.
pub const KEY_PARTITIONS: i64 = 64;

/// The key partition of a row with `key`: FNV-1a (32 bits) of its bytes
/// modulo [`KEY_PARTITIONS`]; -1 without a key. Stable across processes,
/// versions and platforms: rows are stored with it.
pub(crate) fn key_partition(key: Option<&str>) -> i64 {
    let Some(key) = key else {
        return -1;
    };
    let mut hash: u32 = 0x811c_9dc5;
    for byte in key.as_bytes() {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    i64::from(hash) % KEY_PARTITIONS
}

/// The partitions relay `index` of `members` claims. The last relay's share
/// runs on past [`KEY_PARTITIONS`]: a row whose stored partition is beyond
/// them (written by hand or by another tool) belongs to someone.
fn share_of(index: usize, members: usize) -> Share {
    let members = i64::try_from(members.max(1)).unwrap_or(i64::MAX);
    let index = i64::try_from(index).unwrap_or(0).min(members - 1);
    let to = if index == members - 1 {
        i64::MAX
    } else {
        (index + 1) * KEY_PARTITIONS / members
    };
    (index * KEY_PARTITIONS / members, to)
}

/// The share a relay claims now, written by its membership task.
#[derive(Debug)]
pub(crate) struct ShareCell {
    from: AtomicI64,
    to: AtomicI64,
}

impl ShareCell {
    /// Every partition: a relay alone, or one that does not share.
    pub(crate) fn all() -> ShareCell {
        ShareCell {
            from: AtomicI64::new(0),
            // Also partitions beyond the table's: see `share_of`.
            to: AtomicI64::new(i64::MAX),
        }
    }

    pub(crate) fn get(&self) -> Share {
        (
            self.from.load(Ordering::Acquire),
            self.to.load(Ordering::Acquire),
        )
    }

    fn set(&self, share: Share) {
        self.from.store(share.0, Ordering::Release);
        self.to.store(share.1, Ordering::Release);
    }
}

/// One relay's membership among the relays of its table.
#[derive(Debug)]
pub(crate) struct Membership<DB: Backend> {
    pool: Pool<DB>,
    name: String,
    holder: String,
    /// Membership names of this table are in `[from, to)`.
    range: (String, String),
    /// How long a membership holds without renewal: half the claim lease.
    ttl: Duration,
    share: Arc<ShareCell>,
    table: String,
}

impl<DB: Backend> Membership<DB> {
    pub(crate) fn new(
        pool: Pool<DB>,
        table: &str,
        relay_id: &str,
        incarnation: &str,
        lease: Duration,
        share: Arc<ShareCell>,
    ) -> Membership<DB> {
        Membership {
            pool,
            name: format!("{table}.m.{relay_id}.{incarnation}"),
            holder: incarnation.to_owned(),
            // '/' follows '.' in every collation the databases use for ASCII.
            range: (format!("{table}.m."), format!("{table}.m/")),
            ttl: lease / 2,
            share,
            table: table.to_owned(),
        }
    }

    /// How often the membership is renewed and the share recomputed: at least
    /// three times per [`ttl`](Self::ttl), at most every two seconds.
    pub(crate) fn every(&self) -> Duration {
        (self.ttl / 3).clamp(Duration::from_millis(50), Duration::from_secs(2))
    }

    /// Renews this relay's membership, reads the live members and sets the
    /// share. On an error the share stays as it was.
    pub(crate) async fn renew(&self) -> Result<(), Error> {
        let now = crate::clock::now(&self.pool).await;
        let leases = LeaseStore::new(&self.pool);
        leases
            .take(&self.name, &self.holder, now, now + ms(self.ttl))
            .await?;
        let range = (self.range.0.as_str(), self.range.1.as_str());
        let names = leases.held_in_range(range, now).await?;
        let (index, members) = match names.iter().position(|n| *n == self.name) {
            Some(index) => (index, names.len()),
            // Not visible yet (or its lease ran out meanwhile): count it last.
            None => (names.len(), names.len() + 1),
        };
        let share = share_of(index, members);
        if share != self.share.get() {
            tracing::info!(
                table = self.table,
                from = share.0,
                to = share.1.min(KEY_PARTITIONS),
                of = KEY_PARTITIONS,
                relays = members,
                "relay's share of the key partitions"
            );
            self.share.set(share);
        }
        // Memberships of relays long dead (their holders gone for good).
        let long_ago = now - ms(self.ttl) * 10;
        leases.purge_range(range, long_ago).await?;
        Ok(())
    }

    /// Renews until dropped: soon after the start (100 ms, doubling), so
    /// relays started together settle their shares at once, then every
    /// [`every`](Self::every).
    pub(crate) async fn keep_renewing(self: Arc<Self>) {
        let mut pause = Duration::from_millis(100);
        loop {
            tokio::time::sleep(pause.min(self.every())).await;
            pause = pause.saturating_mul(2);
            if let Err(error) = self.renew().await {
                tracing::warn!(%error, "could not renew the relay's membership; its share stays as it was");
            }
        }
    }

    /// Gives the membership back, so the other relays take this one's
    /// partitions at their next renewal instead of after its lease.
    pub(crate) async fn leave(&self) -> Result<(), Error> {
        LeaseStore::new(&self.pool).drop_lease(&self.name).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_every_partition_once() {
        for members in 1..=9 {
            let mut next = 0;
            for index in 0..members {
                let (from, to) = share_of(index, members);
                assert_eq!(from, next, "{index} of {members}");
                assert!(to > from);
                next = to;
            }
            // The last share also holds partitions beyond the table's.
            assert_eq!(next, i64::MAX);
        }
    }

    #[test]
    fn key_partitions_are_stable_and_spread() {
        // FNV-1a of "user-1": the stored value must never change.
        assert_eq!(key_partition(Some("user-1")), 0xf553_7974_i64 % 64);
        assert_eq!(key_partition(None), -1);
        let mut used = std::collections::HashSet::new();
        for k in 0..100 {
            let p = key_partition(Some(&format!("user-{k}")));
            assert!((0..KEY_PARTITIONS).contains(&p));
            used.insert(p);
        }
        assert!(used.len() > 40, "100 keys over {} partitions", used.len());
    }
}
