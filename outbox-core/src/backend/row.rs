//! Fetched rows: [`Row`], one row's cells read by position with errors that
//! name the column, and [`FromRow`], a row type that owns its select list,
//! its column types and its decode, so the three cannot drift apart.

use std::borrow::Cow;

use super::{Cell, Column, Dialect};
use crate::Error;

/// A row type a query decodes into.
pub(crate) trait FromRow: Sized {
    /// The table named in decode errors.
    const TABLE: &'static str;
    /// The types of the columns [`columns`](Self::columns) selects, in order.
    const TYPES: &'static [Column];
    /// The select list, as written after `SELECT`, for `table` on `dialect`
    /// (most are fixed text; some name an expression of the database's own,
    /// or a subquery on the table).
    fn columns(dialect: &Dialect, table: &str) -> Cow<'static, str>;
    /// Decodes one row selected by [`columns`](Self::columns).
    fn from_row(row: Row) -> Result<Self, Error>;
}

/// Decodes `rows` as `R`.
pub(crate) fn decode<R: FromRow>(rows: Vec<Vec<Cell>>) -> Result<Vec<R>, Error> {
    rows.into_iter()
        .map(|cells| R::from_row(Row::new(R::TABLE, cells)))
        .collect()
}

/// Asserts that row type `R` selects as many columns as it decodes, on every
/// dialect built in.
#[cfg(test)]
pub(crate) fn assert_selects_what_it_decodes<R: FromRow>() {
    for d in super::dialects() {
        let columns = R::columns(d, "t");
        assert_eq!(
            count_columns(&columns),
            R::TYPES.len(),
            "{} on {}: {columns}",
            std::any::type_name::<R>(),
            d.name
        );
    }
}

/// Columns of a select list: its commas outside parentheses, plus one (for
/// tests of row types, whose column lists and types must agree).
#[cfg(test)]
fn count_columns(list: &str) -> usize {
    let mut depth = 0i32;
    let mut n = 1;
    for c in list.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => n += 1,
            _ => {}
        }
    }
    n
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
