//! One live relay per `relay_id` and table.
//!
//! Rows handed off at append carry the token `{relay_id}-h`, which every
//! incarnation of that `relay_id` shares: so that a relay restarted after a
//! crash takes its predecessor's rows at once, without waiting for their
//! lease. Two relays of one `relay_id` alive at the same time (two processes
//! started with the same name) would both read those rows and publish them,
//! and one's shutdown would give back the other's. A relay therefore holds a
//! lock on its `relay_id` and table for as long as it runs, and waits for it
//! before it takes any row:
//!
//! | database   | lock                                                              |
//! |------------|-------------------------------------------------------------------|
//! | PostgreSQL | `pg_try_advisory_lock`, on a connection of its own               |
//! | MySQL      | `GET_LOCK` (named after the database), on a connection of its own |
//! | SQLite     | an exclusive lock on a file beside the database file              |
//!
//! Each belongs to a session or an open file, so it ends with the process
//! that held it, however that ends: a restarted relay takes it at once.

use std::collections::HashSet;
use std::sync::Mutex;

use sqlx::Pool;

use crate::Error;
use crate::backend::{Backend, Column, Query, RelayLock, Row};
use crate::wake::PoolId;

/// How long a check of the lock's session, or its release, may take before
/// the session counts as lost.
const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A relay's lock on its `relay_id` and table; given up when dropped.
pub(super) enum OwnerLock<DB: Backend> {
    /// A session lock: held while this connection (out of the pool) is open.
    Session(DB::Connection),
    /// An exclusive lock on this open file.
    File(std::fs::File),
    /// An in-memory database: only relays of this process can share it.
    Process(ProcessEntry),
}

impl<DB: Backend> OwnerLock<DB> {
    /// Tries to take the lock of `relay_id` on `table` without waiting:
    /// `None` while another live relay holds it.
    /// A session lock is tried on `spare`, a connection kept out of the
    /// pool between tries (opened if there is none).
    pub(super) async fn try_take(
        pool: &Pool<DB>,
        table: &str,
        relay_id: &str,
        spare: &mut Option<DB::Connection>,
    ) -> Result<Option<OwnerLock<DB>>, Error> {
        let key = lock_key(table, relay_id);
        match DB::DIALECT.relay_lock {
            RelayLock::Session([before, after]) => {
                // Out of the pool: the lock lives exactly as long as this
                // connection, which the pool must never hand to anyone else.
                let mut conn = match spare.take() {
                    Some(conn) => conn,
                    None => crate::backend::acquire(pool).await?.detach(),
                };
                let try_take = Query::new(DB::DIALECT).sql(before).bind(key).sql(after);
                let rows = DB::fetch(&mut conn, &try_take, &[Column::Int])
                    .await
                    .map_err(Error::db("taking the relay's lock"))?;
                let taken = match rows.into_iter().next() {
                    Some(cells) => Row::new("lock", cells).opt_int(0) == Some(1),
                    None => false,
                };
                if taken {
                    return Ok(Some(OwnerLock::Session(conn)));
                }
                *spare = Some(conn);
                Ok(None)
            }
            RelayLock::FileBeside(file_query) => {
                let mut conn = crate::backend::acquire(pool).await?;
                let query = Query::fixed(DB::DIALECT, file_query);
                let rows = DB::fetch(&mut conn, &query, &[Column::Text])
                    .await
                    .map_err(Error::db("finding the database file"))?;
                drop(conn);
                let file = rows
                    .into_iter()
                    .next()
                    .and_then(|cells| Row::new("lock", cells).opt_text(0))
                    .unwrap_or_default();
                if file.is_empty() {
                    return Ok(
                        ProcessEntry::take(crate::wake::pool_id(pool), key).map(OwnerLock::Process)
                    );
                }
                lock_file(&format!("{file}.relay-{key:016x}.lock"), relay_id)
                    .map(|f| f.map(OwnerLock::File))
            }
        }
    }

    /// `false` once the lock is known lost: its session ended (the
    /// connection was cut, the server restarted, the session was killed).
    pub(super) async fn still_held(&mut self) -> bool {
        match self {
            // Run, not fetched: `SELECT 1` is a 32-bit integer on PostgreSQL.
            // A session that does not answer in time (a half-open link) is
            // taken as lost: the server may have ended it already.
            OwnerLock::Session(conn) => matches!(
                tokio::time::timeout(
                    CHECK_TIMEOUT,
                    DB::exec(conn, &Query::fixed(DB::DIALECT, "SELECT 1"))
                )
                .await,
                Ok(Ok(_))
            ),
            OwnerLock::File(_) | OwnerLock::Process(_) => true,
        }
    }

    /// Gives the lock up now (a dropped one is given up too, as its
    /// connection or file closes).
    pub(super) async fn release(self) {
        match self {
            OwnerLock::Session(conn) => {
                // Past the bound the connection is dropped, which closes it.
                let _ = tokio::time::timeout(CHECK_TIMEOUT, sqlx::Connection::close(conn)).await;
            }
            // Closing the file would unlock it too.
            OwnerLock::File(file) => {
                let _ = file.unlock();
            }
            OwnerLock::Process(entry) => drop(entry),
        }
    }
}

/// Opens (creating it if needed) and locks `path` without waiting.
fn lock_file(path: &str, relay_id: &str) -> Result<Option<std::fs::File>, Error> {
    let failed = |source| Error::RelayLockFile {
        relay_id: relay_id.to_owned(),
        path: path.to_owned(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(failed)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(error)) => Err(failed(error)),
    }
}

/// The lock's 64-bit key: FNV-1a of the table and the `relay_id`, the same
/// in every build and process.
pub(super) fn lock_key(table: &str, relay_id: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in table.bytes().chain([0]).chain(relay_id.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

static IN_PROCESS: Mutex<Vec<(PoolId, i64)>> = Mutex::new(Vec::new());

/// A relay's lock on an in-memory database, in this process's registry.
pub(super) struct ProcessEntry(PoolId, i64);

impl ProcessEntry {
    fn take(pool: PoolId, key: i64) -> Option<ProcessEntry> {
        let mut held = IN_PROCESS.lock().unwrap_or_else(|e| e.into_inner());
        let unique: HashSet<_> = held.iter().copied().collect();
        if unique.contains(&(pool, key)) {
            return None;
        }
        held.push((pool, key));
        Some(ProcessEntry(pool, key))
    }
}

impl Drop for ProcessEntry {
    fn drop(&mut self) {
        let mut held = IN_PROCESS.lock().unwrap_or_else(|e| e.into_inner());
        held.retain(|e| *e != (self.0, self.1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_differ_by_table_and_relay_id_and_stay_the_same() {
        assert_eq!(lock_key("t", "r"), lock_key("t", "r"));
        assert_ne!(lock_key("t", "r"), lock_key("t", "r2"));
        assert_ne!(lock_key("t", "r"), lock_key("t2", "r"));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(lock_key("ab", "c"), lock_key("a", "bc"));
        // FNV-1a of "t\0r", as any build computes it.
        assert_eq!(lock_key("t", "r") as u64, 0x566d_c819_43ee_3a31);
    }

    #[test]
    fn an_in_process_lock_is_taken_once_and_free_again_when_dropped() {
        let first = ProcessEntry::take(1, 42).expect("free");
        assert!(ProcessEntry::take(1, 42).is_none());
        assert!(ProcessEntry::take(2, 42).is_some(), "another database");
        drop(first);
        assert!(ProcessEntry::take(1, 42).is_some());
    }
}
