//! Marking published batches, in the background.

use std::collections::HashSet;
use std::sync::Arc;

use super::{Claimed, RelayMetrics};
use crate::backend::Backend;
use crate::backoff::Backoff;
use crate::{Error, Outbox};

/// Marks published batches in the background, one database round at a time,
/// so a slow mark never holds up the next publish.
pub(super) struct Marker<DB: Backend> {
    pub(super) outbox: Outbox<DB>,
    pub(super) metrics: Arc<RelayMetrics>,
    pub(super) backoff: Backoff,
}

impl<DB: Backend> Marker<DB> {
    /// Marks `batches` published, in one transaction. A failure here means a
    /// re-publish, so transient errors (deadlock victims, a dropped
    /// connection) are retried a few times first.
    #[tracing::instrument(
        name = "outbox.mark",
        level = "debug",
        skip_all,
        fields(batches = batches.len(), rows = batches.iter().map(|b| b.batch.len()).sum::<usize>())
    )]
    async fn mark(&self, batches: &[Claimed]) -> Result<(), Error> {
        let mut attempt = 0;
        loop {
            match self.mark_once(batches).await {
                Ok(n) => {
                    self.metrics.add(super::RelayCounter::Published, n);
                    return Ok(());
                }
                Err(error) if attempt < 4 => {
                    tracing::warn!(%error, attempt, "marking published failed; retrying");
                    tokio::time::sleep(self.backoff.delay(attempt)).await;
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn mark_once(&self, batches: &[Claimed]) -> Result<u64, Error> {
        let store = self.outbox.store();
        let now = crate::clock::now(store.pool()).await;
        let mut tx = store.begin_relaxed().await?;
        let mut n = 0;
        for claimed in batches {
            // Named by id and token: a mark never touches rows it did not publish.
            let ids: Vec<i64> = claimed.ids().collect();
            n += store
                .mark_published(&mut tx, &claimed.token, &ids, now)
                .await?;
        }
        tx.commit().await.map_err(Error::db("committing a mark"))?;
        Ok(n)
    }
}

/// A finished mark: its batches and how it went.
type MarkOutcome = (Vec<Claimed>, Result<(), Error>);

/// Published batches waiting to be marked: at most one mark runs at a time,
/// and what was published meanwhile is marked together in the next one.
pub(super) struct Marks<DB: Backend> {
    marker: Arc<Marker<DB>>,
    running: Option<tokio::task::JoinHandle<MarkOutcome>>,
    /// Ids of the rows of the running mark (published, still `NEW` in the table).
    running_ids: HashSet<i64>,
    queued: Vec<Claimed>,
}

impl<DB: Backend> Marks<DB> {
    pub(super) fn new(marker: Marker<DB>) -> Marks<DB> {
        Marks {
            marker: Arc::new(marker),
            running: None,
            running_ids: HashSet::new(),
            queued: Vec::new(),
        }
    }

    /// Rows published but not yet marked: they go ahead of anything read now.
    pub(super) fn ids(&self) -> HashSet<i64> {
        let mut ids = self.running_ids.clone();
        ids.extend(self.queued.iter().flat_map(Claimed::ids));
        ids
    }

    pub(super) fn push(&mut self, mut published: Claimed) {
        // A mark needs the ids only: the payloads go now, not after the mark.
        for m in &mut published.batch {
            m.content = bytes::Bytes::new();
            m.headers = Vec::new();
        }
        self.queued.push(published);
        self.start();
    }

    /// Starts a mark of everything queued, unless one is running.
    pub(super) fn start(&mut self) {
        if self.running.is_some() || self.queued.is_empty() {
            return;
        }
        let batches = std::mem::take(&mut self.queued);
        self.running_ids = batches.iter().flat_map(Claimed::ids).collect();
        let marker = self.marker.clone();
        self.running = Some(tokio::spawn(async move {
            let result = marker.mark(&batches).await;
            (batches, result)
        }));
    }

    /// Takes the result of a finished mark (without waiting) and starts the next.
    pub(super) async fn advance(&mut self) {
        if self.running.as_ref().is_some_and(|h| h.is_finished()) {
            self.finish().await;
        }
        self.start();
    }

    pub(super) fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Waits for the running mark, if any (cancel-safe). A mark that failed
    /// after its retries is queued again: its rows stay ahead of later reads,
    /// so they are not published again while the relay runs.
    pub(super) async fn finish(&mut self) {
        let Some(handle) = self.running.as_mut() else {
            return;
        };
        let outcome = handle.await;
        self.running = None;
        self.running_ids.clear();
        match outcome {
            Ok((_, Ok(()))) => {}
            Ok((batches, Err(error))) => {
                tracing::warn!(%error, "marking published failed; will try again");
                self.queued.extend(batches);
            }
            Err(join) => tracing::error!(%join, "mark task failed"),
        }
    }

    /// Waits until everything published so far has had its mark attempted.
    pub(super) async fn drain(&mut self) {
        self.finish().await;
        self.start();
        self.finish().await;
    }

    /// Marks everything still unmarked (at shutdown).
    pub(super) async fn settle(&mut self) -> Result<(), Error> {
        self.finish().await;
        let batches = std::mem::take(&mut self.queued);
        if batches.is_empty() {
            return Ok(());
        }
        self.marker.mark(&batches).await
    }
}
