//! The storage layer: every statement on the outbox and inbox tables, with
//! its arguments bound next to its SQL, and rows decoded into typed values.
//!
//! The relay, the consumer and the admin calls ([`Outbox`](crate::Outbox),
//! [`Inbox`](crate::Inbox)) go through [`OutboxStore`] and [`InboxStore`]; they
//! write no SQL of their own. Each statement is built where it runs, its
//! placeholders and values in one call ([`Query`]); each row shape it
//! fetches is a type of its own ([`FromRow`]) with its column list, types
//! and decode. The schema's DDL per version is in `backend/ddl.rs`.

pub(crate) mod inbox;
pub(crate) mod lease;
pub(crate) mod outbox;

pub(crate) use inbox::{InboxStore, Recorded};
pub(crate) use outbox::OutboxStore;

use crate::Error;
use crate::backend::{Backend, FromRow, Query, decode};

/// The states of an outbox row (`process`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutboxState {
    /// Waiting to be published (or being published under a claim).
    New,
    /// Confirmed by the broker.
    Published,
    /// Parked after `max_attempts` rejections.
    Failed,
}

impl OutboxState {
    /// The state as stored.
    pub(crate) const fn as_sql(self) -> &'static str {
        match self {
            OutboxState::New => "NEW",
            OutboxState::Published => "PUBLISHED",
            OutboxState::Failed => "FAILED",
        }
    }

    /// The state stored as `text`; `None` for anything else.
    pub(crate) fn from_sql(text: &str) -> Option<OutboxState> {
        [
            OutboxState::New,
            OutboxState::Published,
            OutboxState::Failed,
        ]
        .into_iter()
        .find(|state| state.as_sql() == text)
    }
}

/// The states of an inbox row (`process`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InboxState {
    /// Applied.
    Processed,
    /// Waiting for a local retry.
    Retry,
    /// Parked: budget spent, undecodable, or refused by the database.
    Failed,
}

impl InboxState {
    /// The state as stored.
    pub(crate) const fn as_sql(self) -> &'static str {
        match self {
            InboxState::Processed => "PROCESSED",
            InboxState::Retry => "RETRY",
            InboxState::Failed => "FAILED",
        }
    }
}

/// Runs `query` on `conn`; returns how many rows it changed. `action`
/// names what failed.
pub(crate) async fn exec<DB: Backend>(
    conn: &mut DB::Connection,
    query: &Query<'_>,
    action: &'static str,
) -> Result<u64, Error> {
    DB::exec(conn, query).await.map_err(Error::db(action))
}

/// Runs `query` on `conn` and decodes its rows as `R`. `action` names what
/// failed.
pub(crate) async fn fetch<DB: Backend, R: FromRow>(
    conn: &mut DB::Connection,
    query: &Query<'_>,
    action: &'static str,
) -> Result<Vec<R>, Error> {
    let rows = DB::fetch(conn, query, R::TYPES)
        .await
        .map_err(Error::db(action))?;
    decode(rows)
}

/// The first row of [`fetch`], if any.
pub(crate) async fn fetch_first<DB: Backend, R: FromRow>(
    conn: &mut DB::Connection,
    query: &Query<'_>,
    action: &'static str,
) -> Result<Option<R>, Error> {
    Ok(fetch::<DB, R>(conn, query, action)
        .await?
        .into_iter()
        .next())
}
