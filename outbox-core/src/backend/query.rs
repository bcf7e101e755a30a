//! A statement and the values it binds, built together: [`bind`](Query::bind)
//! writes the database's placeholder (`?` or `$n`) and records the value in
//! one call, so the text and its values cannot disagree.
//!
//! ```text
//! Query::new(DB::DIALECT)
//!     .sql("UPDATE t SET claimed_until = ").bind(until)
//!     .sql(" WHERE id IN (").list(ids).sql(")")
//! ```
//!
//! A statement is built where it runs, once per call: per batch for the
//! relay, per delivery for the consumer, never per row of a batch.

use std::borrow::Cow;

use super::row::FromRow;
use super::{Dialect, LimitedDelete, Placeholders, Value};

/// A statement's text and its bound values, in placeholder order.
#[derive(Debug, Clone)]
#[doc(hidden)]
pub struct Query<'a> {
    dialect: &'static Dialect,
    text: Cow<'a, str>,
    args: Vec<Value<'a>>,
}

impl<'a> Query<'a> {
    /// An empty statement for `dialect`.
    pub fn new(dialect: &'static Dialect) -> Query<'a> {
        Query {
            dialect,
            text: Cow::Borrowed(""),
            args: Vec::new(),
        }
    }

    /// A statement without values, its text as given (not copied).
    pub fn fixed(dialect: &'static Dialect, text: &'a str) -> Query<'a> {
        Query {
            dialect,
            text: Cow::Borrowed(text),
            args: Vec::new(),
        }
    }

    /// Appends SQL text as it is. Values never go here: [`bind`](Self::bind) them.
    pub(crate) fn sql(mut self, text: &str) -> Query<'a> {
        self.text.to_mut().push_str(text);
        self
    }

    /// Appends a placeholder and binds `value` to it.
    pub(crate) fn bind(mut self, value: impl Into<Value<'a>>) -> Query<'a> {
        self.args.push(value.into());
        let text = self.text.to_mut();
        match self.dialect.placeholders {
            Placeholders::Question => text.push('?'),
            Placeholders::Dollar => {
                text.push('$');
                text.push_str(&self.args.len().to_string());
            }
        }
        self
    }

    /// Appends `?, ?, …`, one placeholder per value, for an `IN (…)` list.
    pub(crate) fn list<V: Into<Value<'a>>>(
        mut self,
        values: impl IntoIterator<Item = V>,
    ) -> Query<'a> {
        for (i, value) in values.into_iter().enumerate() {
            if i > 0 {
                self = self.sql(", ");
            }
            self = self.bind(value);
        }
        self
    }

    /// Appends the select list of row type `R` (read from `table`).
    pub(crate) fn columns<R: FromRow>(self, table: &str) -> Query<'a> {
        let columns = R::columns(self.dialect, table);
        self.sql(&columns)
    }

    /// Appends what `write` appends: a part built by a function of its own.
    pub(crate) fn with(self, write: impl FnOnce(Query<'a>) -> Query<'a>) -> Query<'a> {
        write(self)
    }

    /// Appends a `DELETE` of at most `limit` rows of `table` that match the
    /// condition `condition` appends, taken in `order` (an indexed column),
    /// as the database allows it ([`Dialect::delete_limited`]).
    pub(crate) fn delete_limited(
        self,
        table: &str,
        condition: impl FnOnce(Query<'a>) -> Query<'a>,
        order: &str,
        limit: i64,
    ) -> Query<'a> {
        match self.dialect.delete_limited {
            LimitedDelete::IdSubquery => self
                .sql(&format!(
                    "DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE "
                ))
                .with(condition)
                .sql(&format!(" ORDER BY {order} LIMIT "))
                .bind(limit)
                .sql(")"),
            LimitedDelete::OrderLimit => self
                .sql(&format!("DELETE FROM {table} WHERE "))
                .with(condition)
                .sql(&format!(" ORDER BY {order} LIMIT "))
                .bind(limit),
        }
    }

    /// Appends an `INSERT` of one row into `table` that does nothing when its
    /// key exists ([`Dialect::insert_ignore`]); `values` appends the values.
    pub(crate) fn insert_ignore(
        self,
        table: &str,
        columns: &str,
        values: impl FnOnce(Query<'a>) -> Query<'a>,
    ) -> Query<'a> {
        let (into, then) = self.dialect.insert_ignore;
        self.sql(&format!("{into} {table} ({columns}) VALUES ("))
            .with(values)
            .sql(")")
            .sql(then)
    }

    /// The statement's text, as the database receives it.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The bound values, in placeholder order.
    pub fn args(&self) -> &[Value<'a>] {
        &self.args
    }

    /// The statement's text, given away.
    pub(crate) fn into_text(self) -> String {
        self.text.into_owned()
    }
}

impl From<i64> for Value<'_> {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

impl From<Option<i64>> for Value<'_> {
    fn from(v: Option<i64>) -> Self {
        v.map_or(Value::NullInt, Value::Int)
    }
}

impl<'a> From<&'a str> for Value<'a> {
    fn from(v: &'a str) -> Self {
        Value::Text(Some(v))
    }
}

impl<'a> From<Option<&'a str>> for Value<'a> {
    fn from(v: Option<&'a str>) -> Self {
        Value::Text(v)
    }
}

impl<'a> From<&'a [u8]> for Value<'a> {
    fn from(v: &'a [u8]) -> Self {
        Value::Bytes(Some(v))
    }
}

impl<'a> From<Option<&'a [u8]>> for Value<'a> {
    fn from(v: Option<&'a [u8]>) -> Self {
        Value::Bytes(v)
    }
}

/// Values of an iterator over a slice (`ids.iter()`).
impl<'a, T: Into<Value<'a>> + Copy> From<&T> for Value<'a> {
    fn from(v: &T) -> Self {
        (*v).into()
    }
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use super::*;
    use crate::backend::Backend;

    fn dialect(placeholders: Placeholders) -> &'static Dialect {
        Box::leak(Box::new(Dialect {
            placeholders,
            ..*<sqlx::Sqlite as Backend>::DIALECT
        }))
    }

    #[test]
    fn dollar_placeholders_are_numbered_in_the_order_values_are_bound() {
        let q = Query::new(dialect(Placeholders::Dollar))
            .sql("a = ")
            .bind(1)
            .sql(" AND b = '?' AND c IN (")
            .list(["x", "y"])
            .sql(")");
        assert_eq!(q.text(), "a = $1 AND b = '?' AND c IN ($2, $3)");
        assert_eq!(q.args().len(), 3);
        let q = Query::new(dialect(Placeholders::Question))
            .sql("x = ")
            .bind(1)
            .sql(" AND y IN (")
            .list([1, 2, 3])
            .sql(")");
        assert_eq!(q.text(), "x = ? AND y IN (?, ?, ?)");
    }

    #[test]
    fn a_limited_delete_binds_its_limit_after_the_condition() {
        for (delete_limited, text) in [
            (
                LimitedDelete::IdSubquery,
                "DELETE FROM t WHERE id IN (SELECT id FROM t WHERE a < $1 ORDER BY a LIMIT $2)",
            ),
            (
                LimitedDelete::OrderLimit,
                "DELETE FROM t WHERE a < $1 ORDER BY a LIMIT $2",
            ),
        ] {
            let d = Box::leak(Box::new(Dialect {
                delete_limited,
                ..*dialect(Placeholders::Dollar)
            }));
            let q = Query::new(d).delete_limited("t", |q| q.sql("a < ").bind(5), "a", 10);
            assert_eq!(q.text(), text);
        }
    }
}
