//! The storage layer: every statement on the outbox and inbox tables, with
//! its arguments bound next to its SQL, and rows decoded into typed values.
//!
//! The relay, the consumer and the admin calls ([`Outbox`](crate::Outbox),
//! [`Inbox`](crate::Inbox)) go through [`OutboxStore`] and [`InboxStore`]; they
//! write no SQL of their own. The SQL text, built once per table and
//! database, is in `backend/sql.rs`.

pub(crate) mod inbox;
pub(crate) mod outbox;

pub(crate) use inbox::{InboxStore, Recorded};
pub(crate) use outbox::OutboxStore;

use crate::Error;
use crate::backend::Cell;

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

/// One fetched row, read column by column; a value that is missing or of the
/// wrong type is an error naming the column, never a silent default.
pub(crate) struct Row {
    table: &'static str,
    cells: Vec<Cell>,
}

impl Row {
    pub(crate) fn new(table: &'static str, cells: Vec<Cell>) -> Row {
        Row { table, cells }
    }

    fn missing(&self, column: &'static str) -> Error {
        Error::Row {
            table: self.table,
            column,
            reason: "NULL or missing where a value is required",
        }
    }

    /// A nullable integer at `i`.
    pub(crate) fn opt_int(&self, i: usize) -> Option<i64> {
        self.cells.get(i).and_then(Cell::int)
    }

    /// A required integer at `i`.
    pub(crate) fn int(&self, i: usize, column: &'static str) -> Result<i64, Error> {
        self.opt_int(i).ok_or_else(|| self.missing(column))
    }

    /// A required count at `i` (an integer that cannot be negative).
    pub(crate) fn count(&self, i: usize, column: &'static str) -> Result<u64, Error> {
        let n = self.int(i, column)?;
        u64::try_from(n).map_err(|_| Error::Row {
            table: self.table,
            column,
            reason: "negative where a count is required",
        })
    }

    /// Nullable text at `i`.
    pub(crate) fn opt_text(&mut self, i: usize) -> Option<String> {
        self.cells.get_mut(i).and_then(Cell::take_text)
    }

    /// Required text at `i`.
    pub(crate) fn text(&mut self, i: usize, column: &'static str) -> Result<String, Error> {
        match self.opt_text(i) {
            Some(text) => Ok(text),
            None => Err(self.missing(column)),
        }
    }

    /// Nullable bytes at `i`.
    pub(crate) fn opt_bytes(&mut self, i: usize) -> Option<Vec<u8>> {
        self.cells.get_mut(i).and_then(Cell::take_bytes)
    }

    /// Required bytes at `i`.
    pub(crate) fn bytes(&mut self, i: usize, column: &'static str) -> Result<Vec<u8>, Error> {
        match self.opt_bytes(i) {
            Some(bytes) => Ok(bytes),
            None => Err(self.missing(column)),
        }
    }
}

/// Decodes every row of `rows` with `decode`.
pub(crate) fn decode_all<T>(
    table: &'static str,
    rows: Vec<Vec<Cell>>,
    mut decode: impl FnMut(Row) -> Result<T, Error>,
) -> Result<Vec<T>, Error> {
    rows.into_iter()
        .map(|cells| decode(Row::new(table, cells)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_value_names_its_column_instead_of_defaulting() {
        let mut row = Row::new(
            "outbox",
            vec![
                Cell::Int(None),
                Cell::Text(Some("x".into())),
                Cell::Int(Some(-1)),
            ],
        );
        match row.int(0, "id") {
            Err(Error::Row { column: "id", .. }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(row.text(1, "event_id").unwrap(), "x");
        assert!(
            matches!(row.text(1, "event_id"), Err(Error::Row { .. })),
            "taken once"
        );
        assert!(matches!(
            row.count(2, "n"),
            Err(Error::Row { column: "n", .. })
        ));
        assert!(matches!(row.int(9, "beyond"), Err(Error::Row { .. })));
    }
}
