//! `outbox discard` and `outbox inbox discard`: parked rows deleted for good.

use std::collections::HashSet;
use std::io::{IsTerminal, Write};

use serde::Serialize;

use outbox_core::admin::ParkedRows;

use super::parked::{EVERY_ROW, ParkedRow, Side, parked_table};
use super::{Output, counted, unique};
use crate::cli::DiscardSelection;
use crate::error::CliError;

/// Whether the operator agrees to discard `what`, asked on stderr after
/// `listing` and answered on stdin. `Err` when stdin is not a terminal:
/// nobody to ask, so nothing goes without `--yes`.
fn agree(listing: &str, what: &str) -> Result<bool, CliError> {
    if !std::io::stdin().is_terminal() {
        return Err(CliError::Usage(format!(
            "not discarding {what} without --yes: stdin is not a terminal to ask on"
        )));
    }
    let mut err = std::io::stderr().lock();
    write!(err, "{listing}discard {what} for good? [y/N] ")?;
    err.flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "Yes" | "YES"))
}

#[derive(Debug, Serialize)]
struct Discarded {
    table: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    consumer: Option<String>,
    dry_run: bool,
    /// Rows deleted (or, in a dry run, that would be).
    count: u64,
    /// The rows selected, as they were before the discard.
    events: Vec<ParkedRow>,
    /// Ids given that are not parked rows (or not of `--type`).
    unknown: Vec<String>,
}

/// The parked rows `selection` names, and the ids given that name none.
/// Parked rows are few next to a table's others: all are read, then picked.
async fn select<T: ParkedRows>(
    side: &Side<T>,
    selection: &DiscardSelection,
) -> Result<(Vec<ParkedRow>, Vec<String>), CliError> {
    let mut rows = side.list(EVERY_ROW).await?;
    if let Some(kind) = &selection.event_type {
        rows.retain(|r| r.event_type.as_deref() == Some(kind.as_str()));
    }
    let mut unknown = Vec::new();
    if !selection.ids.is_empty() {
        let given = unique(&selection.ids);
        let parked: HashSet<&str> = rows.iter().map(|r| r.event_id.as_str()).collect();
        unknown = given
            .iter()
            .filter(|id| !parked.contains(id.as_str()))
            .cloned()
            .collect();
        let wanted: HashSet<&str> = given.iter().map(String::as_str).collect();
        rows.retain(|r| wanted.contains(r.event_id.as_str()));
    }
    Ok((rows, unknown))
}

pub(super) async fn discard<T: ParkedRows>(
    side: &Side<T>,
    selection: &DiscardSelection,
) -> Result<Output, CliError> {
    let (table, consumer) = side.describe();
    let (mut rows, unknown) = select(side, selection).await?;
    let what = side.what();
    let listing = if rows.is_empty() {
        String::new()
    } else {
        parked_table(&rows, side.has_destination())
    };
    let mut count = rows.len() as u64;
    let mut human = String::new();
    if selection.dry_run {
        human.push_str(&listing);
        human.push_str(&format!(
            "would discard {} (dry run: nothing changed)\n",
            counted(count, &what)
        ));
    } else if rows.is_empty() {
        human.push_str(&format!("discarded {}\n", counted(0, &what)));
    } else {
        let n = counted(count, &what);
        if !selection.yes && !agree(&listing, &n)? {
            human.push_str(&format!("nothing discarded: {n} left as they were\n"));
            count = 0;
            rows.clear();
        } else {
            let ids: Vec<String> = rows.iter().map(|r| r.event_id.clone()).collect();
            count = side.discard_many(&ids).await?;
            human.push_str(&listing);
            human.push_str(&format!("discarded {}\n", counted(count, &what)));
            if count < ids.len() as u64 {
                human.push_str(&format!(
                    "{} of them were no longer parked (replayed meanwhile) and stay\n",
                    ids.len() as u64 - count
                ));
            }
        }
    }
    let report = Discarded {
        table,
        consumer,
        dry_run: selection.dry_run,
        count,
        events: rows,
        unknown: unknown.clone(),
    };
    let mut output = Output::new(&report, human)?;
    if !unknown.is_empty() {
        output.then = Some(CliError::UnknownIds { what, ids: unknown });
    }
    Ok(output)
}
