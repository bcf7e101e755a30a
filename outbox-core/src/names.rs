//! Validated identifiers: table names and consumer names.
//!
//! Table names end up inside SQL text (placeholders cannot stand for
//! identifiers), so they are checked here once and only a [`TableName`] can
//! reach a statement.

use std::fmt;

use crate::Error;

/// A table name that is safe to put into SQL: ASCII letters, digits and `_`,
/// starting with a letter or `_`, at most 48 bytes (index names append a suffix
/// and must stay under the 63/64-byte limits of PostgreSQL and MySQL).
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct TableName(String);

impl TableName {
    /// Checks `name`; `what` says which setting it is, for the error.
    pub(crate) fn new(what: &'static str, name: &str) -> Result<TableName, Error> {
        outbox_rules::table_name(name).map_err(|reason| Error::InvalidName {
            what,
            value: name.to_owned(),
            reason,
        })?;
        Ok(TableName(name.to_ascii_lowercase()))
    }

    /// The name as it appears in SQL.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// Checks a consumer name (stored in the inbox and used in queue names):
/// [`outbox_rules::consumer_name`].
pub(crate) fn check_consumer(name: &str) -> Result<(), Error> {
    outbox_rules::consumer_name(name).map_err(|reason| Error::InvalidName {
        what: "consumer name",
        value: name.to_owned(),
        reason,
    })
}

/// Milliseconds since the Unix epoch on this host's wall clock: the unit of
/// every time column. Leases compare the database's clock instead
/// (`clock.rs`).
pub(crate) fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis())
        .unwrap_or(i64::MAX)
        .saturating_add(crate::failpoint::clock_skew_ms())
}

/// Longest `relay_id` ([`outbox_rules::MAX_RELAY_ID`]).
pub(crate) const RELAY_ID_MAX: usize = outbox_rules::MAX_RELAY_ID;

/// A duration in whole milliseconds, saturating.
pub(crate) fn ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_accept_plain_identifiers() {
        assert_eq!(
            TableName::new("t", "Outbox_Event2").unwrap().as_str(),
            "outbox_event2"
        );
        assert!(TableName::new("t", "_x").is_ok());
    }

    #[test]
    fn table_names_reject_anything_that_could_change_the_sql() {
        for bad in [
            "",
            "1abc",
            "a-b",
            "a;drop table x",
            "a b",
            "\"q\"",
            "ä",
            &"x".repeat(49),
        ] {
            assert!(TableName::new("t", bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn consumer_names_allow_dots_and_dashes_only_besides_word_characters() {
        assert!(check_consumer("points-service.v1").is_ok());
        assert!(check_consumer("a/b").is_err());
        assert!(check_consumer("").is_err());
    }
}
