//! Taking rows to publish: the claim, the hand-off read, and per-key order.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use tracing::Instrument;

use super::failure::GiveBack;
use super::{Claimed, Relay};
use crate::backend::Backend;
use crate::event::OutboxMessage;
use crate::names::{ms, now_ms};
use crate::store::outbox::{RowHead, Share};
use crate::{Error, Publisher};

impl<DB: Backend, P: Publisher> Relay<DB, P> {
    /// The next batch: rows handed off to this relay, or rows claimed the
    /// usual way. Every fourth turn tries the claim first, so a steady stream
    /// of handed-off rows cannot starve rows written by other processes.
    /// `behind` says a batch is on its way ahead of this one: a claim then
    /// lasts one publish longer, since its own publish starts only after
    /// that one ends.
    pub(super) async fn next_batch(
        &self,
        ahead: &HashSet<i64>,
        behind: bool,
    ) -> Result<Option<Claimed>, Error> {
        if !self.config.handoff {
            return self.claim_next(ahead, behind).await;
        }
        if self.turn.fetch_add(1, Ordering::Relaxed).is_multiple_of(4) {
            if let Some(claimed) = self.claim_next(ahead, behind).await? {
                return Ok(Some(claimed));
            }
            return self.take_handed_off(ahead, behind).await;
        }
        if let Some(claimed) = self.take_handed_off(ahead, behind).await? {
            return Ok(Some(claimed));
        }
        self.claim_next(ahead, behind).await
    }

    /// Reads the committed rows leased to this relay at insert time (none of
    /// `ahead`, which are on their way already). A row whose key has an
    /// earlier unpublished row that is neither here nor ahead is given back
    /// to the usual claim, which keeps the key's order.
    ///
    /// The batch is chosen on the rows' heads (id, key, size, lease) and cut
    /// at [`RelayConfig::max_batch_bytes`](super::RelayConfig::max_batch_bytes)
    /// before any payload is read; rows past the cut stay handed off for
    /// the next read. A row's hand-off lease ran from its append: one whose
    /// transaction committed late may have too little of it left for a
    /// publish, so another relay could claim it on the way. Such rows have
    /// their lease lengthened first, on the database's clock, and only those
    /// still held are taken. `behind` says the batch is published after one
    /// on its way now.
    pub(super) async fn take_handed_off(
        &self,
        ahead: &HashSet<i64>,
        behind: bool,
    ) -> Result<Option<Claimed>, Error> {
        // The token is shared by every incarnation of this `relay_id`: its
        // rows are read only by the one holding the lock.
        if !self.owned.load(Ordering::Acquire) {
            return Ok(None);
        }
        let taken_at = std::time::Instant::now();
        let size = usize::try_from(self.config.batch_size.max(1)).unwrap_or(usize::MAX);
        let limit = i64::try_from(size.saturating_add(ahead.len())).unwrap_or(i64::MAX);
        let token = self.handoff_token.as_str();
        let store = self.outbox.store();
        let now = crate::clock::now(store.pool()).await;
        let mut conn = store.acquire().await?;
        let mut batch: Vec<RowHead> = store
            .handed_off(&mut conn, token, now, limit)
            .await?
            .into_iter()
            .filter(|h| !ahead.contains(&h.id))
            .take(size)
            .collect();
        // Rows past the byte budget stay handed off for the next read.
        keep_within_bytes(&mut batch, self.config.max_batch_bytes);
        if batch.is_empty() {
            return Ok(None);
        }
        let accepted = self.key_order(&mut conn, &batch, ahead).await?;
        let held: Vec<i64> = batch
            .iter()
            .filter(|h| h.key.is_some() && !accepted.contains(&h.id))
            .map(|h| h.id)
            .collect();
        if !held.is_empty() {
            let rows = GiveBack::Rows { token, ids: &held };
            self.give_back(Some(&mut conn), rows, None).await?;
            batch.retain(|h| h.key.is_none() || accepted.contains(&h.id));
        }
        self.keep_leased(&mut conn, &mut batch, now, behind).await?;
        if batch.is_empty() {
            return Ok(None);
        }
        let (batch, left_out) = self.read_rows(&mut conn, &batch).await?;
        if !left_out.is_empty() {
            let rows = GiveBack::Rows {
                token,
                ids: &left_out,
            };
            self.give_back(Some(&mut conn), rows, None).await?;
        }
        Ok((!batch.is_empty()).then(|| Claimed {
            token: token.to_owned(),
            batch,
            handed_off: true,
            taken_at,
        }))
    }

    /// Lengthens the lease of the rows of `batch` (handed off under this
    /// relay's token) that have too little left for the publish ahead, on
    /// the database's clock. A row whose lease ran out meanwhile may be
    /// another relay's by now: it leaves the batch, and so do its key's
    /// later rows (per-key order); those renewed are read again next time,
    /// with their new lease.
    async fn keep_leased(
        &self,
        conn: &mut DB::Connection,
        batch: &mut Vec<RowHead>,
        now: i64,
        behind: bool,
    ) -> Result<(), Error> {
        let (needed, lease) = self.handoff_lease(behind);
        let short: Vec<i64> = batch
            .iter()
            .filter(|h| {
                h.claimed_until
                    .is_none_or(|until| until < now.saturating_add(needed))
            })
            .map(|h| h.id)
            .collect();
        if short.is_empty() {
            return Ok(());
        }
        let token = self.handoff_token.as_str();
        let renewed = self
            .outbox
            .store()
            .renew_lease(conn, token, &short, now, now.saturating_add(lease))
            .await?;
        if renewed < short.len() as u64 {
            let mut waiting: HashSet<String> = HashSet::new();
            batch.retain(|h| {
                let wait =
                    short.contains(&h.id) || h.key.as_ref().is_some_and(|k| waiting.contains(k));
                if let (true, Some(key)) = (wait, &h.key) {
                    waiting.insert(key.clone());
                }
                !wait
            });
        }
        Ok(())
    }

    /// How much lease (ms) a handed-off row must have left to be published
    /// now, and the lease it gets when it has less: a publish takes at most
    /// [`Publisher::max_publish_time`], one behind another up to twice that;
    /// a publisher that does not say is given half the lease.
    fn handoff_lease(&self, behind: bool) -> (i64, i64) {
        let publish = self.max_publish;
        let needed = if publish.is_zero() {
            self.config.lease / 2
        } else if behind {
            publish.saturating_mul(2)
        } else {
            publish
        };
        let lease = if behind {
            self.config.lease.saturating_add(publish)
        } else {
            self.config.lease
        };
        (ms(needed), ms(lease))
    }

    /// The rows of `heads` in full, read by id: those that cannot be read as
    /// an event are parked, and the rows after them of their keys left out
    /// (they wait behind the parked row). Returns the messages and the ids
    /// left out that are still waiting.
    async fn read_rows(
        &self,
        conn: &mut DB::Connection,
        heads: &[RowHead],
    ) -> Result<(Vec<OutboxMessage>, Vec<i64>), Error> {
        let ids: Vec<i64> = heads.iter().map(|h| h.id).collect();
        let rows = self.outbox.store().rows_by_id(conn, &ids).await?;
        if rows.undecodable.is_empty() {
            return Ok((rows.messages, Vec::new()));
        }
        self.park_undecodable(conn, &rows.undecodable).await?;
        // The first parked row of each key.
        let mut parked_at: HashMap<&str, i64> = HashMap::new();
        for (id, _) in &rows.undecodable {
            if let Some(key) = heads
                .iter()
                .find(|h| h.id == *id)
                .and_then(|h| h.key.as_deref())
            {
                let first = parked_at.entry(key).or_insert(*id);
                *first = (*first).min(*id);
            }
        }
        let (mut kept, mut left_out) = (Vec::new(), Vec::new());
        for m in rows.messages {
            let behind_parked = m
                .key
                .as_deref()
                .and_then(|k| parked_at.get(k))
                .is_some_and(|first| *first < m.id);
            if behind_parked {
                left_out.push(m.id);
            } else {
                kept.push(m);
            }
        }
        Ok((kept, left_out))
    }

    /// Claims the next batch under a fresh token; `None` when nothing is due.
    pub(super) async fn claim_next(
        &self,
        in_flight: &HashSet<i64>,
        behind: bool,
    ) -> Result<Option<Claimed>, Error> {
        let taken_at = std::time::Instant::now();
        let seq = self.batch.fetch_add(1, Ordering::Relaxed);
        let token = claim_token(&self.config.relay_id, &self.incarnation, seq);
        let lease = if behind {
            self.config.lease.saturating_add(self.max_publish)
        } else {
            self.config.lease
        };
        let batch = self
            .claim(&token, in_flight, lease)
            .instrument(tracing::debug_span!("outbox.claim", token))
            .await?;
        Ok((!batch.is_empty()).then_some(Claimed {
            token,
            batch,
            handed_off: false,
            taken_at,
        }))
    }

    /// Claims up to `batch_size` due rows for `token`. Rows in `in_flight` (the
    /// batch this relay is publishing right now, on the same connection, before
    /// this one) count as going ahead of the claimed rows of their keys.
    ///
    /// A window of due rows may hold only rows that per-key order must hold
    /// back (a key whose earlier row is parked or waits for a retry, with more
    /// rows of it than a batch): the claim then reads on past that window,
    /// leaving out the keys found waiting, up to [`CLAIM_WINDOWS`] windows.
    /// The keys found waiting are remembered for [`WAITING_KEY_TTL`] and left
    /// out from the first window of the next claims, so however many rows
    /// wait, each claim gets further past them: waiting keys never stop the
    /// rest of the table.
    async fn claim(
        &self,
        token: &str,
        in_flight: &HashSet<i64>,
        lease: std::time::Duration,
    ) -> Result<Vec<OutboxMessage>, Error> {
        let store = self.outbox.store();
        let now = crate::clock::now(store.pool()).await;
        // A read first: an idle relay takes no write lock (SQLite) and opens no
        // transaction.
        let share = self.share.get();
        if !store.any_due(now, share).await? {
            return Ok(Vec::new());
        }
        let mut tx = store.begin_relaxed().await?;
        let remembered = self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .current();
        let read = self
            .read_windows(&mut tx, now, share, in_flight, remembered)
            .await?;
        // Keys found waiting in a claim that had to read past held-back rows,
        // remembered for the next claims if they stay held a while (a parked
        // row, a row waiting for its next attempt); a key held only by rows
        // in flight elsewhere is not. A claim that read one window asks
        // nothing more of the database.
        let held = if read.found.is_empty() || !read.read_past {
            Vec::new()
        } else {
            let keys: Vec<&str> = read.found.iter().map(String::as_str).collect();
            store.held_keys(&mut tx, now, &keys).await?
        };
        // The payloads of the rows taken, and no others; rows left out
        // (behind a row parked here) are simply not leased.
        let (batch, _) = self.read_rows(&mut tx, &read.batch).await?;
        if !batch.is_empty() {
            let ids: Vec<i64> = batch.iter().map(|m| m.id).collect();
            store.lease(&mut tx, token, now + ms(lease), &ids).await?;
        }
        tx.commit().await.map_err(Error::db("committing a claim"))?;
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .learn(held);
        Ok(batch)
    }

    /// Reads windows of due rows on `conn` (the claim's transaction) until
    /// a batch is full, the due rows end or [`CLAIM_WINDOWS`] were read. The
    /// first window leaves out the keys `remembered` waiting; each later one
    /// reads past the window before it and leaves out every key found
    /// waiting so far.
    async fn read_windows(
        &self,
        conn: &mut DB::Connection,
        now: i64,
        share: Share,
        in_flight: &HashSet<i64>,
        remembered: Vec<String>,
    ) -> Result<Windows, Error> {
        let store = self.outbox.store();
        let limit = self.config.batch_size.max(1);
        let size = usize::try_from(limit).unwrap_or(usize::MAX);
        // Rows going ahead of the next window's rows of their keys: the ones
        // in flight and those accepted from earlier windows.
        let mut ahead = in_flight.clone();
        let remembered_len = remembered.len();
        let mut waiting_keys: Vec<String> = remembered;
        let mut after: Option<i64> = (!waiting_keys.is_empty()).then_some(i64::MIN);
        let mut read_past = false;
        let mut batch: Vec<RowHead> = Vec::new();
        for _ in 0..CLAIM_WINDOWS {
            let heads = match after {
                None => store.select_due(conn, now, share, limit).await?,
                Some(last) => {
                    let excluded: Vec<&str> = waiting_keys.iter().map(String::as_str).collect();
                    store
                        .select_due_after(conn, now, share, last, &excluded, limit)
                        .await?
                }
            };
            let read = heads.len();
            let last = heads.iter().map(|h| h.id).max();
            // Per-key order: drop rows that an unpublished earlier row of
            // their key (not in this window, not ahead) must precede.
            let accepted = self.key_order(conn, &heads, &ahead).await?;
            for h in &heads {
                if let Some(key) = &h.key
                    && !accepted.contains(&h.id)
                    && waiting_keys.len() < MAX_WAITING_KEYS
                    && !waiting_keys.contains(key)
                {
                    waiting_keys.push(key.clone());
                }
            }
            let mut window = heads;
            window.retain(|h| h.key.is_none() || accepted.contains(&h.id));
            window.truncate(size.saturating_sub(batch.len()));
            ahead.extend(window.iter().map(|h| h.id));
            batch.extend(window);
            // Sized on the heads: no payload is read past the budget.
            let full = keep_within_bytes(&mut batch, self.config.max_batch_bytes);
            // A short window was the last of the due rows; a full batch is done.
            if full || read < size || batch.len() >= size {
                break;
            }
            after = last;
            read_past = true;
        }
        let found = waiting_keys.split_off(remembered_len.min(waiting_keys.len()));
        Ok(Windows {
            batch,
            found,
            read_past,
        })
    }

    /// Parks the rows a claim read that do not hold a message (written by
    /// hand, by a trigger or by another tool), each with its reason, in the
    /// claim's transaction: the rest of the batch goes on.
    pub(super) async fn park_undecodable(
        &self,
        conn: &mut DB::Connection,
        rows: &[(i64, String)],
    ) -> Result<(), Error> {
        for (id, reason) in rows {
            let parked = self
                .outbox
                .store()
                .park_undecodable(conn, *id, reason, now_ms())
                .await?;
            if parked {
                tracing::error!(
                    row = id,
                    reason,
                    "outbox row parked as FAILED: it cannot be read as an event"
                );
                self.metrics.add(super::RelayCounter::Failed, 1);
            }
        }
        Ok(())
    }

    /// Of the keyed rows of `batch`, those no unpublished earlier row of their
    /// key must precede: every earlier unpublished row of the key is in
    /// `batch` itself or in `ahead` (published before `batch`, on the same
    /// connection).
    async fn key_order(
        &self,
        conn: &mut DB::Connection,
        batch: &[RowHead],
        ahead: &HashSet<i64>,
    ) -> Result<HashSet<i64>, Error> {
        let mut seen = HashSet::new();
        let keys: Vec<&str> = batch
            .iter()
            .filter_map(|h| h.key.as_deref())
            .filter(|k| seen.insert(*k))
            .collect();
        let mut accepted = HashSet::new();
        if keys.is_empty() {
            return Ok(accepted);
        }
        let max_id = batch.iter().map(|h| h.id).max().unwrap_or(0);
        let earlier = self
            .outbox
            .store()
            .unpublished_of_keys(conn, max_id, &keys)
            .await?;
        let in_batch: HashSet<i64> = batch.iter().map(|h| h.id).collect();
        let mut blocked = HashSet::new();
        for (id, key) in earlier {
            if ahead.contains(&id) {
                continue;
            }
            if in_batch.contains(&id) && !blocked.contains(&key) {
                accepted.insert(id);
            } else {
                blocked.insert(key);
            }
        }
        Ok(accepted)
    }
}

/// What a claim's windows read.
struct Windows {
    /// The rows to take, in id order, within the batch's size and bytes.
    batch: Vec<RowHead>,
    /// Keys found waiting behind an earlier row of theirs, beyond those
    /// the claim was given.
    found: Vec<String>,
    /// Whether a window was all held back and the claim read past it.
    read_past: bool,
}

/// Cuts `batch` (in id order) after the rows that fit in `budget` bytes of
/// payload and headers as stored, keeping at least one; `true` if it cut or
/// the budget is reached.
fn keep_within_bytes(batch: &mut Vec<RowHead>, budget: usize) -> bool {
    let mut used = 0usize;
    for (i, h) in batch.iter().enumerate() {
        used = used.saturating_add(h.bytes);
        if used > budget {
            batch.truncate(i.max(1));
            return true;
        }
    }
    used == budget
}

/// Most windows of due rows one claim reads when per-key order holds back
/// the rows of the windows before.
const CLAIM_WINDOWS: usize = 8;

/// Most keys found waiting that a claim leaves out of its windows (each is
/// one bound value).
const MAX_WAITING_KEYS: usize = 1000;

/// How long a key found waiting is left out of the claims' first windows
/// before it is looked at again: a key whose waiting ends (its earlier row
/// published or replayed) is claimed again at most this much later.
const WAITING_KEY_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// Keys found waiting behind an earlier unpublished row of theirs, each with
/// the time it was found.
#[derive(Debug, Default)]
pub(super) struct WaitingKeys {
    keys: Vec<(String, std::time::Instant)>,
}

impl WaitingKeys {
    /// The keys found less than [`WAITING_KEY_TTL`] ago.
    fn current(&mut self) -> Vec<String> {
        self.keys.retain(|(_, at)| at.elapsed() < WAITING_KEY_TTL);
        self.keys.iter().map(|(k, _)| k.clone()).collect()
    }

    /// Remembers `keys`; a key already known keeps the time it was found.
    fn learn(&mut self, keys: Vec<String>) {
        for key in keys {
            if self.keys.len() >= MAX_WAITING_KEYS {
                return;
            }
            if !self.keys.iter().any(|(k, _)| *k == key) {
                self.keys.push((key, std::time::Instant::now()));
            }
        }
    }
}

/// Longest claim token: the `claimed_by` column is `VARCHAR(64)`.
const TOKEN_MAX: usize = outbox_rules::MAX_CLAIM_TOKEN;

/// The claim token of batch `seq`: unique to this incarnation, so a relay
/// started again under the same `relay_id` never holds a token its
/// predecessor held. A long `relay_id` is cut (on a character boundary) to
/// leave room for the incarnation and the sequence; the incarnation keeps the
/// token unique.
fn claim_token(relay_id: &str, incarnation: &str, seq: u64) -> String {
    let tail = format!("-{incarnation}-{seq}");
    let room = TOKEN_MAX.saturating_sub(tail.len());
    let mut cut = relay_id.len().min(room);
    while !relay_id.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{tail}", &relay_id[..cut])
}

#[cfg(test)]
mod tests {
    use super::{claim_token, keep_within_bytes};
    use crate::store::outbox::RowHead;

    fn row(id: i64, bytes: usize) -> RowHead {
        RowHead {
            id,
            key: None,
            bytes,
            claimed_until: None,
        }
    }

    #[test]
    fn a_batch_is_cut_at_its_byte_budget_but_keeps_one_row() {
        let mut batch: Vec<_> = (1..=5).map(|id| row(id, 100)).collect();
        assert!(!keep_within_bytes(&mut batch, 1000));
        assert_eq!(batch.len(), 5);
        assert!(keep_within_bytes(&mut batch, 250));
        assert_eq!(batch.iter().map(|m| m.id).collect::<Vec<_>>(), [1, 2]);
        let mut big = vec![row(1, 5000), row(2, 10)];
        assert!(keep_within_bytes(&mut big, 1000));
        assert_eq!(big.len(), 1, "a row over the budget goes alone");
    }

    #[test]
    fn claim_tokens_differ_per_incarnation_and_fit_the_column_for_any_relay_id() {
        assert_eq!(claim_token("relay", "0a1b2c3d", 7), "relay-0a1b2c3d-7");
        assert_ne!(
            claim_token("relay", "0a1b2c3d", 7),
            claim_token("relay", "ffeeddcc", 7)
        );
        let long = "é".repeat(60);
        let token = claim_token(&long, "0a1b2c3d", u64::MAX);
        assert!(token.len() <= super::TOKEN_MAX, "{} bytes", token.len());
        assert!(token.ends_with(&format!("-0a1b2c3d-{}", u64::MAX)));
    }
}
