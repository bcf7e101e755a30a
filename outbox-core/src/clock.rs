//! Time as the database tells it.
//!
//! Leases (claims, relay memberships, retention) are compared across
//! processes, so they are decided on one clock: the database's. Each process
//! reads the database's time now and then (at most every [`FRESH`]) and
//! counts on from that reading with its monotonic clock, so a host whose
//! wall clock is ahead, behind or jumps decides leases as the others do: a
//! relay whose clock is ahead takes no rows still in flight elsewhere, and a
//! backward jump expires no claim. Without a reading yet (the database could
//! not be read), the host's wall clock stands in.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::Pool;

use crate::backend::{Backend, Column, Query};
use crate::names::now_ms;
use crate::wake::{PoolId, pool_id};

/// How long a reading of the database's clock is counted on from.
const FRESH: Duration = Duration::from_secs(30);

/// The database's time at `at`, in ms since the Unix epoch.
#[derive(Debug, Clone, Copy)]
struct Reading {
    db_ms: i64,
    at: Instant,
}

impl Reading {
    fn now(&self) -> i64 {
        let elapsed = i64::try_from(self.at.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.db_ms.saturating_add(elapsed)
    }
}

static READINGS: Mutex<Vec<(PoolId, Reading)>> = Mutex::new(Vec::new());

fn reading(pool: PoolId) -> Option<Reading> {
    READINGS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|(id, _)| *id == pool)
        .map(|(_, r)| *r)
}

fn record(pool: PoolId, reading: Reading) {
    let mut all = READINGS.lock().unwrap_or_else(|e| e.into_inner());
    match all.iter_mut().find(|(id, _)| *id == pool) {
        Some(entry) => entry.1 = reading,
        None => {
            // Pools come and go (tests open many): keep the table small.
            if all.len() >= 64 {
                all.sort_by_key(|(_, r)| std::cmp::Reverse(r.at));
                all.truncate(32);
            }
            all.push((pool, reading));
        }
    }
}

/// The time on `pool`'s database, without a round trip: from the last
/// reading, or the host's clock if there is none.
pub(crate) fn now_of_id(pool: PoolId) -> i64 {
    reading(pool).map_or_else(now_ms, |r| r.now())
}

/// The time on `pool`'s database, in ms since the Unix epoch: counted on from
/// a reading no older than [`FRESH`], taken now if needed. Call it before
/// taking a connection of `pool` for the work it times: the reading takes one.
pub(crate) async fn now<DB: Backend>(pool: &Pool<DB>) -> i64 {
    let id = pool_id(pool);
    if let Some(r) = reading(id)
        && r.at.elapsed() < FRESH
    {
        return r.now();
    }
    match read(pool).await {
        Ok(db_ms) => db_ms,
        Err(error) => {
            tracing::debug!(%error, "could not read the database's clock; counting on from the last reading");
            now_of_id(id)
        }
    }
}

/// Reads the database's clock and records it for `pool`.
async fn read<DB: Backend>(pool: &Pool<DB>) -> Result<i64, crate::Error> {
    let mut conn = crate::backend::acquire(pool).await?;
    let sent = Instant::now();
    let query = Query::fixed(DB::DIALECT, DB::DIALECT.clock);
    let rows = DB::fetch(&mut conn, &query, &[Column::Int])
        .await
        .map_err(crate::Error::db("reading the database's clock"))?;
    let Some(db_ms) = rows.first().and_then(|r| r.first()).and_then(|c| c.int()) else {
        return Err(crate::Error::Row {
            table: "clock",
            column: "now",
            reason: "the database returned no time",
        });
    };
    // The database read its clock about half way through the round trip.
    let at = sent + sent.elapsed() / 2;
    record(pool_id(pool), Reading { db_ms, at });
    Ok(db_ms)
}

/// Forgets every reading (tests).
#[cfg(test)]
pub(crate) fn forget() {
    READINGS.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reading_counts_on_with_the_monotonic_clock() {
        forget();
        let at = Instant::now() - Duration::from_millis(1500);
        record(
            7,
            Reading {
                db_ms: 1_000_000,
                at,
            },
        );
        let now = now_of_id(7);
        assert!((1_001_500..1_002_500).contains(&now), "{now}");
        // Another pool without a reading: the host's clock.
        let host = now_of_id(8);
        assert!((host - now_ms()).abs() < 1000);
    }
}
