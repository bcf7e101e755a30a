//! `outbox replay` and `outbox inbox replay`: parked rows get a fresh budget.

use std::collections::HashSet;

use serde::Serialize;

use outbox_core::admin::ParkedRows;

use super::parked::{EVERY_ROW, ParkedRow, Side, parked_table};
use super::{Output, Progress, counted, unique};
use crate::cli::ReplaySelection;
use crate::error::CliError;
use crate::render::Table;

#[derive(Debug, Serialize)]
struct Replayed {
    table: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    consumer: Option<String>,
    dry_run: bool,
    /// Rows replayed (or, in a dry run, that would be).
    count: u64,
    /// Their ids.
    ids: Vec<String>,
    /// Ids given that are not parked rows.
    unknown: Vec<String>,
    /// In a dry run, the rows that would be replayed.
    #[serde(skip_serializing_if = "Option::is_none")]
    events: Option<Vec<ParkedRow>>,
}

pub(super) async fn replay<T: ParkedRows>(
    side: &Side<T>,
    selection: &ReplaySelection,
    progress: &Progress,
) -> Result<Output, CliError> {
    let (table, consumer) = side.describe();
    let mut report = Replayed {
        table,
        consumer,
        dry_run: selection.dry_run,
        count: 0,
        ids: Vec::new(),
        unknown: Vec::new(),
        events: None,
    };
    if selection.dry_run {
        dry_run(side, selection, &mut report).await?;
    } else if selection.all {
        replay_all(side, selection.batch, progress, &mut report).await?;
    } else {
        replay_given(side, selection, progress, &mut report).await?;
    }
    let what = side.what();
    let human = text(&report, side, selection.all);
    let unknown = report.unknown.clone();
    let mut output = Output::new(&report, human)?;
    if !unknown.is_empty() {
        output.then = Some(CliError::UnknownIds { what, ids: unknown });
    }
    Ok(output)
}

/// Lists what would be replayed, changing nothing. Every parked row is read:
/// parked rows are few compared with a table's others.
async fn dry_run<T: ParkedRows>(
    side: &Side<T>,
    selection: &ReplaySelection,
    report: &mut Replayed,
) -> Result<(), CliError> {
    let mut rows = side.list(EVERY_ROW).await?;
    if !selection.all {
        let given = unique(&selection.ids);
        let parked: HashSet<&str> = rows.iter().map(|r| r.event_id.as_str()).collect();
        report.unknown = given
            .iter()
            .filter(|id| !parked.contains(id.as_str()))
            .cloned()
            .collect();
        let wanted: HashSet<&str> = given.iter().map(String::as_str).collect();
        rows.retain(|r| wanted.contains(r.event_id.as_str()));
    }
    report.count = rows.len() as u64;
    report.ids = rows.iter().map(|r| r.event_id.clone()).collect();
    report.events = Some(rows);
    Ok(())
}

/// Replays every row parked now. The ids are read once, then replayed by id
/// in batches. Listing the oldest parked rows again after each batch would
/// find the rows this run replayed and a relay or consumer parked again, and
/// could stop before the others; with the snapshot every row parked at the
/// start is replayed once, and a row parked meanwhile is left for the next
/// run.
async fn replay_all<T: ParkedRows>(
    side: &Side<T>,
    batch: u32,
    progress: &Progress,
    report: &mut Replayed,
) -> Result<(), CliError> {
    let ids = side.parked_ids().await?;
    progress.start("replayed", ids.len() as u64);
    for chunk in ids.chunks(batch as usize) {
        report.count += side.replay_many(chunk).await?;
        report.ids.extend_from_slice(chunk);
        progress.update(report.count);
    }
    progress.finish();
    Ok(())
}

/// Replays the ids given, one at a time, noting those that are not parked.
async fn replay_given<T: ParkedRows>(
    side: &Side<T>,
    selection: &ReplaySelection,
    progress: &Progress,
    report: &mut Replayed,
) -> Result<(), CliError> {
    let given = unique(&selection.ids);
    progress.start("replayed", given.len() as u64);
    for (n, id) in given.iter().enumerate() {
        if side.replay_one(id).await? {
            report.count += 1;
            report.ids.push(id.clone());
        } else {
            report.unknown.push(id.clone());
        }
        let done = n + 1;
        if done % selection.batch as usize == 0 || done == given.len() {
            progress.update(done as u64);
        }
    }
    progress.finish();
    Ok(())
}

/// The human output of a replay.
fn text<T: ParkedRows>(report: &Replayed, side: &Side<T>, all: bool) -> String {
    let what = side.what();
    let mut human = String::new();
    if let Some(rows) = &report.events {
        if !rows.is_empty() {
            human.push_str(&parked_table(rows, side.has_destination()));
            human.push('\n');
        }
        human.push_str(&format!(
            "would replay {} (dry run: nothing changed)\n",
            counted(report.count, &what)
        ));
        return human;
    }
    if !all {
        let mut t = Table::new(&["EVENT ID", "RESULT"]);
        for id in &report.ids {
            t.row(vec![id.clone(), "replayed".into()]);
        }
        for id in &report.unknown {
            t.row(vec![id.clone(), "not parked".into()]);
        }
        human.push_str(&t.render());
    }
    human.push_str(&format!("replayed {}", counted(report.count, &what)));
    if report.count > 0 {
        human.push_str(&format!("; {}", side.after_replay()));
    }
    human.push('\n');
    human
}
