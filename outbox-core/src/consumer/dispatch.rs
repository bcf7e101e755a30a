//! Dispatch: workers that take deliveries from the subscription, either
//! straight from it or, with per-key order, through one lane per worker.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::backend::Backend;
use crate::subscriber::{Incoming, Subscriber};

use super::handler::Handler;
use super::receive::receive;
use super::shared::Shared;

/// Runs `workers` workers that each take up to `most` waiting messages
/// straight from the subscription, until the consumer stops or the
/// subscription ends; then hands the subscription back.
pub(super) async fn shared_subscription<DB: Backend, H: Handler<DB>, S: Subscriber>(
    shared: &Arc<Shared<DB, H>>,
    subscription: S,
    stopped: watch::Receiver<bool>,
    workers: usize,
    most: usize,
) -> Option<S> {
    let subscription = Arc::new(tokio::sync::Mutex::new(subscription));
    let mut tasks = JoinSet::new();
    for _ in 0..workers {
        let shared = shared.clone();
        let subscription = subscription.clone();
        let mut stopped = stopped.clone();
        tasks.spawn(async move {
            loop {
                let batch = {
                    let mut subscription = subscription.lock().await;
                    let first = tokio::select! {
                        biased;
                        _ = stopped.wait_for(|s| *s) => return,
                        m = subscription.next_message() => m,
                    };
                    let Some(first) = first else {
                        tracing::warn!("subscription ended; consumer stops");
                        return;
                    };
                    gather(first, most, || subscription.try_next_message())
                };
                receive(&shared, batch, &mut stopped).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Arc::try_unwrap(subscription)
        .ok()
        .map(tokio::sync::Mutex::into_inner)
}

/// Per-key order: one lane per worker, and a key's messages go to one lane
/// while any of them is there, so a key's events are applied one after
/// another. A key with nothing in a lane goes to the least loaded one: a
/// slow key holds up its own lane's backlog, not every key that happens to
/// hash to it ([`LaneMap`]). Reads the subscription until the consumer stops
/// or it ends, lets the lanes drain, then hands the subscription back.
pub(super) async fn in_key_lanes<DB: Backend, H: Handler<DB>, S: Subscriber>(
    shared: &Arc<Shared<DB, H>>,
    mut subscription: S,
    mut stopped: watch::Receiver<bool>,
    workers: usize,
    most: usize,
) -> Option<S> {
    // A lane holds as much as the broker may push: a key whose handler is
    // held then never fills its lane while the subscription still has
    // messages of other keys (the reader would wait on that lane and hold
    // them all up).
    let capacity = usize::try_from(shared.config.effective_prefetch()).unwrap_or(1000);
    let mut tasks = JoinSet::new();
    let mut lanes: Vec<mpsc::Sender<S::Message>> = Vec::with_capacity(workers);
    let map = Arc::new(std::sync::Mutex::new(LaneMap::new(workers.max(1))));
    for lane in 0..workers.max(1) {
        let (tx, mut rx) = mpsc::channel::<S::Message>(capacity.max(1));
        let shared = shared.clone();
        let mut stopped = stopped.clone();
        let map = map.clone();
        tasks.spawn(async move {
            while let Some(first) = rx.recv().await {
                let batch = gather(first, most, || rx.try_recv().ok());
                let keys: Vec<Option<String>> = batch
                    .iter()
                    .map(|m| m.header("event-key").map(str::to_owned))
                    .collect();
                receive(&shared, batch, &mut stopped).await;
                // A panic elsewhere while holding the map leaves plain counts.
                map.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .done(lane, &keys);
            }
        });
        lanes.push(tx);
    }
    loop {
        let message = tokio::select! {
            _ = stopped.wait_for(|s| *s) => break,
            m = subscription.next_message() => m,
        };
        let Some(message) = message else {
            tracing::warn!("subscription ended; consumer stops");
            break;
        };
        let lane = map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .assign(message.header("event-key"));
        if lanes[lane].send(message).await.is_err() {
            break;
        }
    }
    drop(lanes);
    while tasks.join_next().await.is_some() {}
    Some(subscription)
}

/// Which lane a message goes to, with per-key order.
///
/// A key holds a lane while it has messages there (queued or being
/// applied), so its messages are applied one after another, in order. A key
/// with none goes to the least loaded lane, as does a message without a key.
/// So a key whose handler is slow keeps one lane busy with its own backlog,
/// and the keys arriving behind it go to the other lanes instead of waiting
/// behind it because their hash matched.
#[derive(Debug)]
pub(super) struct LaneMap {
    /// Per lane: messages sent to it and not yet done.
    load: Vec<usize>,
    /// Keys with messages in a lane: the lane and how many.
    keys: HashMap<String, (usize, usize)>,
}

impl LaneMap {
    pub(super) fn new(lanes: usize) -> LaneMap {
        LaneMap {
            load: vec![0; lanes.max(1)],
            keys: HashMap::new(),
        }
    }

    /// The lane for the next message of `key`, counted in.
    pub(super) fn assign(&mut self, key: Option<&str>) -> usize {
        let lane = match key.and_then(|k| self.keys.get_mut(k)) {
            Some((lane, n)) => {
                *n += 1;
                *lane
            }
            None => {
                let lane = self.least_loaded();
                if let Some(key) = key {
                    self.keys.insert(key.to_owned(), (lane, 1));
                }
                lane
            }
        };
        self.load[lane] += 1;
        lane
    }

    /// Lane `lane` is done with messages of these keys.
    pub(super) fn done(&mut self, lane: usize, keys: &[Option<String>]) {
        if let Some(load) = self.load.get_mut(lane) {
            *load = load.saturating_sub(keys.len());
        }
        for key in keys.iter().flatten() {
            if let Some((_, n)) = self.keys.get_mut(key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.keys.remove(key);
                }
            }
        }
    }

    /// The lane with the fewest messages; the first of those on a tie.
    pub(super) fn least_loaded(&self) -> usize {
        let mut best = 0;
        for (lane, load) in self.load.iter().enumerate() {
            if *load < self.load[best] {
                best = lane;
            }
        }
        best
    }
}

/// `first` and whatever else is already waiting, up to `most` messages.
pub(super) fn gather<M>(first: M, most: usize, mut waiting: impl FnMut() -> Option<M>) -> Vec<M> {
    let mut batch = vec![first];
    while batch.len() < most {
        match waiting() {
            Some(m) => batch.push(m),
            None => break,
        }
    }
    batch
}

/// Workers and the most deliveries one batch gathers. On a database that
/// writes one transaction at a time (SQLite) more workers would only queue for
/// the write lock, each holding a few deliveries: two workers (one applies a
/// batch while the other acks and gathers the next) each gather the share of
/// the others, so as many deliveries are in progress as configured.
pub(super) fn workers_and_batch(
    single_writer: bool,
    concurrency: usize,
    batch_size: usize,
) -> (usize, usize) {
    let (concurrency, batch_size) = (concurrency.max(1), batch_size.max(1));
    if single_writer && concurrency > 2 && batch_size > 1 {
        (2, (batch_size * concurrency / 2).min(1000))
    } else {
        (concurrency, batch_size)
    }
}

#[cfg(test)]
mod tests {
    use super::LaneMap;

    fn key(k: &str) -> Option<String> {
        Some(k.to_owned())
    }

    #[test]
    fn a_key_keeps_its_lane_while_it_has_messages_there_and_new_keys_go_to_the_least_loaded() {
        let mut map = LaneMap::new(3);
        let slow = map.assign(Some("slow"));
        assert_eq!(
            map.assign(Some("slow")),
            slow,
            "a key's messages share one lane"
        );
        assert_eq!(map.assign(Some("slow")), slow);
        // Other keys avoid the busy lane, whatever their hash.
        let a = map.assign(Some("a"));
        let b = map.assign(Some("b"));
        assert!(a != slow && b != slow && a != b, "{slow} {a} {b}");
        assert_eq!(map.assign(Some("a")), a);
        // Unkeyed messages too.
        let c = map.assign(None);
        assert_ne!(c, slow);
        // Once a key is done in its lane, it may go elsewhere.
        map.done(a, &[key("a"), key("a")]);
        map.done(b, &[key("b")]);
        map.done(c, &[None]);
        assert_eq!(map.assign(Some("slow")), slow, "still has messages there");
        map.done(slow, &[key("slow"), key("slow"), key("slow"), key("slow")]);
        assert!(map.keys.is_empty(), "{:?}", map.keys);
        assert_eq!(map.load, vec![0, 0, 0]);
        assert_eq!(
            map.assign(Some("slow")),
            0,
            "an idle key goes to the least loaded lane"
        );
    }

    use super::workers_and_batch;

    #[test]
    fn a_single_writer_gets_two_workers_with_the_same_deliveries_in_progress() {
        assert_eq!(workers_and_batch(true, 8, 16), (2, 64));
        assert_eq!(workers_and_batch(true, 2, 16), (2, 16));
        assert_eq!(
            workers_and_batch(true, 8, 1),
            (8, 1),
            "one event per transaction is kept"
        );
        assert_eq!(workers_and_batch(true, 64, 100), (2, 1000));
        assert_eq!(workers_and_batch(false, 8, 16), (8, 16));
        assert_eq!(workers_and_batch(false, 0, 0), (1, 1));
    }
}
