//! The commands, written once for every database through the library's
//! admin calls.

use std::collections::HashSet;
use std::io::{IsTerminal, Write};

use serde::Serialize;
use sqlx::Pool;

use outbox_core::admin::{ParkedDelivery, ParkedEvent};
use outbox_core::{Backend, Inbox, Outbox};

use crate::cli::{Cli, Command, DiscardSelection, InboxCommand, ReplaySelection, Side};
use crate::error::{CliError, is_missing_table};
use crate::render::{
    ERROR_CHARS, PREVIEW_CHARS, Table, age, clip, clip_middle, preview, timestamp,
};

/// The consumer name the inbox handle of `migrate` uses; migrations do not
/// depend on it.
const MIGRATE_CONSUMER: &str = "outbox-cli";

/// What a command prints: a JSON document or text, and a failure to report
/// after it (ids that were not found).
#[derive(Debug)]
pub struct Output {
    /// The `--json` document, rendered.
    pub json: String,
    /// The text without `--json`.
    pub human: String,
    /// A failure to report once the output is printed.
    pub then: Option<CliError>,
}

impl Output {
    fn new(json: &impl Serialize, human: String) -> Result<Output, CliError> {
        Ok(Output {
            json: serde_json::to_string_pretty(json).map_err(|e| CliError::Output(e.into()))?,
            human,
            then: None,
        })
    }
}

/// Runs `cli`'s command on `pool`; `database` names the database for output.
pub async fn run<DB: Backend>(
    pool: &Pool<DB>,
    cli: &Cli,
    database: &str,
) -> Result<Output, CliError> {
    let progress = Progress::new(cli.progress);
    match &cli.command {
        Command::Status => status(pool, cli, database).await,
        Command::Parked(args) => {
            let side = OutboxSide::new(pool, &cli.table)?;
            parked(&side, args.limit, args.full).await
        }
        Command::Replay(args) => {
            let side = OutboxSide::new(pool, &cli.table)?;
            replay(&side, &args.selection, &progress).await
        }
        Command::Discard(args) => {
            let side = OutboxSide::new(pool, &cli.table)?;
            discard(&side, &args.selection).await
        }
        Command::Migrate(args) => migrate(pool, cli, args.only).await,
        Command::Inbox(InboxCommand::Parked(args)) => {
            let side = InboxSide::new(pool, &args.consumer, &cli.inbox_table)?;
            parked(&side, args.limit, args.full).await
        }
        Command::Inbox(InboxCommand::Discard(args)) => {
            let side = InboxSide::new(pool, &args.consumer, &cli.inbox_table)?;
            discard(&side, &args.selection).await
        }
        Command::Inbox(InboxCommand::Replay(args)) => {
            let side = InboxSide::new(pool, &args.consumer, &cli.inbox_table)?;
            replay(&side, &args.selection, &progress).await
        }
    }
}

// ---------------------------------------------------------------- status

#[derive(Debug, Serialize)]
struct Status {
    database: String,
    outbox: OutboxStatus,
    inbox: InboxStatus,
}

#[derive(Debug, Serialize)]
struct OutboxStatus {
    table: String,
    exists: bool,
    waiting: Option<u64>,
    oldest_waiting_age_ms: Option<u64>,
    published: Option<u64>,
    parked: Option<u64>,
}

#[derive(Debug, Serialize)]
struct InboxStatus {
    table: String,
    exists: bool,
    consumers: Vec<ConsumerStatus>,
}

#[derive(Debug, Serialize)]
struct ConsumerStatus {
    consumer: String,
    processed: u64,
    retrying: u64,
    parked: u64,
}

async fn status<DB: Backend>(
    pool: &Pool<DB>,
    cli: &Cli,
    database: &str,
) -> Result<Output, CliError> {
    let outbox = Outbox::with_table(pool.clone(), &cli.table)?;
    // Checked before the first query, so a wrong name is a usage error.
    Inbox::with_table(pool.clone(), MIGRATE_CONSUMER, &cli.inbox_table)?;
    let mut out = OutboxStatus {
        table: cli.table.clone(),
        exists: true,
        waiting: None,
        oldest_waiting_age_ms: None,
        published: None,
        parked: None,
    };
    match outbox.counts().await {
        Err(e) if is_missing_table(&e) => out.exists = false,
        Err(e) => return Err(e.into()),
        Ok(counts) => {
            let backlog = outbox
                .backlog()
                .await
                .map_err(CliError::on_table(&cli.table))?;
            out.waiting = Some(backlog.pending);
            out.oldest_waiting_age_ms = backlog
                .oldest_pending_age
                .map(|a| u64::try_from(a.as_millis()).unwrap_or(u64::MAX));
            out.parked = Some(backlog.parked);
            out.published = Some(
                counts
                    .iter()
                    .filter(|(state, _)| state == "PUBLISHED")
                    .map(|(_, n)| n)
                    .sum(),
            );
        }
    }
    let mut inbox = InboxStatus {
        table: cli.inbox_table.clone(),
        exists: true,
        consumers: Vec::new(),
    };
    match Inbox::consumers(pool, &cli.inbox_table).await {
        Err(e) if is_missing_table(&e) => inbox.exists = false,
        Err(e) => return Err(e.into()),
        Ok(names) => {
            for name in names {
                let counts = Inbox::with_table(pool.clone(), &name, &cli.inbox_table)?
                    .counts()
                    .await
                    .map_err(CliError::on_table(&cli.inbox_table))?;
                inbox.consumers.push(ConsumerStatus {
                    consumer: name,
                    processed: counts.processed,
                    retrying: counts.retry,
                    parked: counts.failed,
                });
            }
        }
    }

    let mut human = String::new();
    if out.exists {
        let mut t = Table::new(&[
            "OUTBOX TABLE",
            "WAITING",
            "OLDEST WAITING",
            "PUBLISHED",
            "PARKED",
        ]);
        t.row(vec![
            out.table.clone(),
            num(out.waiting),
            out.oldest_waiting_age_ms.map_or_else(
                || "-".to_owned(),
                |ms| age(std::time::Duration::from_millis(ms)),
            ),
            num(out.published),
            num(out.parked),
        ]);
        human.push_str(&t.render());
    } else if inbox.exists {
        // A consumer's database: it has no outbox, and needs none.
        human.push_str(&format!(
            "outbox table {}: none in this database (it only consumes events)\n",
            out.table
        ));
    } else {
        human.push_str(&format!(
            "outbox table {} does not exist; run `outbox migrate`\n",
            out.table
        ));
    }
    human.push('\n');
    if !inbox.exists && out.exists {
        // A producer's database: it has no inbox, and needs none.
        human.push_str(&format!(
            "inbox table {}: none in this database (it only produces events)\n",
            inbox.table
        ));
    } else if !inbox.exists {
        human.push_str(&format!(
            "inbox table {} does not exist; run `outbox migrate`\n",
            inbox.table
        ));
    } else if inbox.consumers.is_empty() {
        human.push_str(&format!(
            "inbox table {}: no consumer has rows\n",
            inbox.table
        ));
    } else {
        let mut t = Table::new(&["INBOX TABLE", "CONSUMER", "PROCESSED", "RETRYING", "PARKED"]);
        for c in &inbox.consumers {
            t.row(vec![
                inbox.table.clone(),
                c.consumer.clone(),
                c.processed.to_string(),
                c.retrying.to_string(),
                c.parked.to_string(),
            ]);
        }
        human.push_str(&t.render());
    }
    let neither = !out.exists && !inbox.exists;
    let report = Status {
        database: database.to_owned(),
        outbox: out,
        inbox,
    };
    let mut output = Output::new(&report, human)?;
    if neither {
        output.then = Some(CliError::MissingTable {
            table: report.outbox.table.clone(),
        });
    }
    Ok(output)
}

fn num(n: Option<u64>) -> String {
    n.map_or_else(|| "-".to_owned(), |n| n.to_string())
}

// ---------------------------------------------------------------- parked rows

/// A parked row of either table, as listed.
#[derive(Debug, Clone, Serialize)]
struct ParkedRow {
    event_id: String,
    event_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    destination: Option<String>,
    key: Option<String>,
    attempts: i64,
    last_error: Option<String>,
    created_at_ms: i64,
    parked_at_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    payload_bytes: usize,
    payload_preview: String,
    /// The whole payload when it is UTF-8 text.
    payload: Option<String>,
}

impl ParkedRow {
    fn new(
        event_id: String,
        event_type: Option<String>,
        key: Option<String>,
        attempts: i64,
        last_error: Option<String>,
        times: (i64, i64),
        content: &[u8],
    ) -> ParkedRow {
        ParkedRow {
            event_id,
            event_type,
            destination: None,
            key,
            attempts,
            last_error,
            created_at_ms: times.0,
            parked_at_ms: times.1,
            content_type: None,
            payload_bytes: content.len(),
            payload_preview: preview(content, PREVIEW_CHARS),
            payload: std::str::from_utf8(content).ok().map(str::to_owned),
        }
    }
}

impl From<ParkedEvent> for ParkedRow {
    fn from(e: ParkedEvent) -> ParkedRow {
        ParkedRow {
            destination: Some(e.destination),
            content_type: Some(e.content_type),
            ..ParkedRow::new(
                e.event_id,
                Some(e.event_type),
                e.key,
                e.attempts,
                e.last_error,
                (e.create_time, e.update_time),
                &e.content,
            )
        }
    }
}

impl From<ParkedDelivery> for ParkedRow {
    fn from(d: ParkedDelivery) -> ParkedRow {
        ParkedRow::new(
            d.event_id,
            d.event_type,
            d.key,
            d.attempts,
            d.last_error,
            (d.create_time, d.update_time),
            &d.content,
        )
    }
}

/// The parked rows of one table (the outbox, or one consumer's inbox rows),
/// so that listing and replaying are written once.
trait ParkedSide {
    /// "parked event", "parked inbox event of consumer X": for messages.
    fn what(&self) -> String;
    /// The line saying there is no parked row.
    fn none(&self) -> String;
    /// The table, and the consumer of inbox rows, for JSON.
    fn describe(&self) -> (String, Option<String>);
    /// How the rows come back once replayed, for the human output.
    fn after_replay(&self) -> &'static str;
    /// Whether the listing shows a destination column.
    fn has_destination(&self) -> bool;
    async fn total(&self) -> Result<u64, CliError>;
    async fn list(&self, limit: u32) -> Result<Vec<ParkedRow>, CliError>;
    /// The ids of every parked row, oldest first.
    async fn parked_ids(&self) -> Result<Vec<String>, CliError>;
    async fn replay_one(&self, id: &str) -> Result<bool, CliError>;
    async fn replay_many(&self, ids: &[String]) -> Result<u64, CliError>;
    /// Deletes the parked rows among `ids`; how many went.
    async fn discard_many(&self, ids: &[String]) -> Result<u64, CliError>;
}

struct OutboxSide<DB: Backend> {
    outbox: Outbox<DB>,
}

impl<DB: Backend> OutboxSide<DB> {
    fn new(pool: &Pool<DB>, table: &str) -> Result<Self, CliError> {
        Ok(OutboxSide {
            outbox: Outbox::with_table(pool.clone(), table)?,
        })
    }

    fn err(&self) -> impl FnOnce(outbox_core::Error) -> CliError + '_ {
        CliError::on_table(self.outbox.table())
    }
}

impl<DB: Backend> ParkedSide for OutboxSide<DB> {
    fn what(&self) -> String {
        "parked event".to_owned()
    }
    fn none(&self) -> String {
        format!("no parked events in {}", self.outbox.table())
    }
    fn describe(&self) -> (String, Option<String>) {
        (self.outbox.table().to_owned(), None)
    }
    fn after_replay(&self) -> &'static str {
        "relays publish replayed events again"
    }
    fn has_destination(&self) -> bool {
        true
    }
    async fn total(&self) -> Result<u64, CliError> {
        Ok(self.outbox.backlog().await.map_err(self.err())?.parked)
    }
    async fn list(&self, limit: u32) -> Result<Vec<ParkedRow>, CliError> {
        let rows = self.outbox.parked(limit).await.map_err(self.err())?;
        Ok(rows.into_iter().map(ParkedRow::from).collect())
    }
    async fn parked_ids(&self) -> Result<Vec<String>, CliError> {
        let rows = self.outbox.parked(EVERY_ROW).await.map_err(self.err())?;
        Ok(rows.into_iter().map(|r| r.event_id).collect())
    }
    async fn replay_one(&self, id: &str) -> Result<bool, CliError> {
        self.outbox.replay(id).await.map_err(self.err())
    }
    async fn replay_many(&self, ids: &[String]) -> Result<u64, CliError> {
        self.outbox.replay_many(ids).await.map_err(self.err())
    }
    async fn discard_many(&self, ids: &[String]) -> Result<u64, CliError> {
        self.outbox.discard_many(ids).await.map_err(self.err())
    }
}

struct InboxSide<DB: Backend> {
    inbox: Inbox<DB>,
}

impl<DB: Backend> InboxSide<DB> {
    fn new(pool: &Pool<DB>, consumer: &str, table: &str) -> Result<Self, CliError> {
        Ok(InboxSide {
            inbox: Inbox::with_table(pool.clone(), consumer, table)?,
        })
    }

    fn err(&self) -> impl FnOnce(outbox_core::Error) -> CliError + '_ {
        CliError::on_table(self.inbox.table())
    }
}

impl<DB: Backend> ParkedSide for InboxSide<DB> {
    fn what(&self) -> String {
        format!("parked inbox event of consumer {}", self.inbox.consumer())
    }
    fn none(&self) -> String {
        format!(
            "consumer {} has no parked events in {}",
            self.inbox.consumer(),
            self.inbox.table()
        )
    }
    fn describe(&self) -> (String, Option<String>) {
        (
            self.inbox.table().to_owned(),
            Some(self.inbox.consumer().to_owned()),
        )
    }
    fn after_replay(&self) -> &'static str {
        "the running consumer applies replayed events at its next retry poll"
    }
    fn has_destination(&self) -> bool {
        false
    }
    async fn total(&self) -> Result<u64, CliError> {
        Ok(self.inbox.counts().await.map_err(self.err())?.failed)
    }
    async fn list(&self, limit: u32) -> Result<Vec<ParkedRow>, CliError> {
        let rows = self.inbox.parked(limit).await.map_err(self.err())?;
        Ok(rows.into_iter().map(ParkedRow::from).collect())
    }
    async fn parked_ids(&self) -> Result<Vec<String>, CliError> {
        let rows = self.inbox.parked(EVERY_ROW).await.map_err(self.err())?;
        Ok(rows.into_iter().map(|r| r.event_id).collect())
    }
    async fn replay_one(&self, id: &str) -> Result<bool, CliError> {
        self.inbox.replay(id).await.map_err(self.err())
    }
    async fn replay_many(&self, ids: &[String]) -> Result<u64, CliError> {
        self.inbox.replay_many(ids).await.map_err(self.err())
    }
    async fn discard_many(&self, ids: &[String]) -> Result<u64, CliError> {
        self.inbox.discard_many(ids).await.map_err(self.err())
    }
}

#[derive(Debug, Serialize)]
struct ParkedList {
    table: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    consumer: Option<String>,
    total: u64,
    shown: usize,
    events: Vec<ParkedRow>,
}

fn parked_table(rows: &[ParkedRow], destination: bool) -> String {
    let mut header = vec!["EVENT ID", "TYPE"];
    if destination {
        header.push("DESTINATION");
    }
    header.extend([
        "KEY",
        "ATTEMPTS",
        "PARKED AT (UTC)",
        "LAST ERROR",
        "PAYLOAD",
    ]);
    let mut t = Table::new(&header);
    for r in rows {
        let mut cells = vec![
            r.event_id.clone(),
            r.event_type.clone().unwrap_or_else(|| "-".into()),
        ];
        if destination {
            cells.push(r.destination.clone().unwrap_or_else(|| "-".into()));
        }
        cells.extend([
            r.key.clone().unwrap_or_else(|| "-".into()),
            r.attempts.to_string(),
            timestamp(r.parked_at_ms),
            r.last_error
                .as_deref()
                .map_or_else(|| "-".into(), |e| clip_middle(e, ERROR_CHARS)),
            r.payload_preview.clone(),
        ]);
        t.row(cells);
    }
    t.render()
}

/// Parked rows one block each, every field whole: the full last error and
/// payload (control characters escaped, so a block stays one line a field).
fn parked_blocks(rows: &[ParkedRow]) -> String {
    let mut out = String::new();
    for (n, r) in rows.iter().enumerate() {
        if n > 0 {
            out.push('\n');
        }
        let mut field = |name: &str, value: String| {
            out.push_str(&format!("{name:<12} {value}\n"));
        };
        let dash = || "-".to_owned();
        field("event id:", r.event_id.clone());
        field("type:", r.event_type.clone().unwrap_or_else(dash));
        if let Some(destination) = &r.destination {
            field("destination:", destination.clone());
        }
        field("key:", r.key.clone().unwrap_or_else(dash));
        field("attempts:", r.attempts.to_string());
        field("created at:", format!("{} UTC", timestamp(r.created_at_ms)));
        field("parked at:", format!("{} UTC", timestamp(r.parked_at_ms)));
        field(
            "last error:",
            r.last_error
                .as_deref()
                .map_or_else(dash, |e| clip(e, usize::MAX)),
        );
        let payload = match &r.payload {
            Some(text) => clip(text, usize::MAX),
            None => format!(
                "({} bytes, not UTF-8) {}",
                r.payload_bytes, r.payload_preview
            ),
        };
        field("payload:", payload);
    }
    out
}

async fn parked(side: &impl ParkedSide, limit: u32, full: bool) -> Result<Output, CliError> {
    let total = side.total().await?;
    let rows = side.list(limit).await?;
    let (table, consumer) = side.describe();
    let mut human = String::new();
    if rows.is_empty() {
        human.push_str(&side.none());
        human.push('\n');
    } else {
        human.push_str(&if full {
            parked_blocks(&rows)
        } else {
            parked_table(&rows, side.has_destination())
        });
        if (rows.len() as u64) < total {
            human.push_str(&format!(
                "\n{} of {total} shown; more with --limit\n",
                rows.len()
            ));
        }
    }
    let list = ParkedList {
        table,
        consumer,
        total,
        shown: rows.len(),
        events: rows,
    };
    Output::new(&list, human)
}

// ---------------------------------------------------------------- replay

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

/// The given ids once each, in their order.
fn unique(ids: &[String]) -> Vec<String> {
    let mut seen = HashSet::new();
    ids.iter().filter(|id| seen.insert(*id)).cloned().collect()
}

/// The `LIMIT` that reads every parked row: what a dry run lists, and the
/// snapshot of ids that `--all` replays.
const EVERY_ROW: u32 = u32::MAX;

async fn replay(
    side: &impl ParkedSide,
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
    let given = unique(&selection.ids);
    if selection.dry_run {
        // Every parked row is read: a dry run changes nothing, and parked
        // rows are few compared with a table's others.
        let mut rows = side.list(EVERY_ROW).await?;
        if !selection.all {
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
    } else if selection.all {
        // The ids of the rows parked now, read once; then replayed by id in
        // batches. Listing the oldest parked rows again after each batch
        // would find the rows this run replayed and a relay or consumer
        // parked again, and could stop before the others; with the snapshot
        // every row parked at the start is replayed once, and a row parked
        // meanwhile is left for the next run.
        let ids = side.parked_ids().await?;
        progress.start("replayed", ids.len() as u64);
        for batch in ids.chunks(selection.batch as usize) {
            report.count += side.replay_many(batch).await?;
            report.ids.extend_from_slice(batch);
            progress.update(report.count);
        }
        progress.finish();
    } else {
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
    }

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
    } else {
        if !selection.all {
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
    }
    let unknown = report.unknown.clone();
    let mut output = Output::new(&report, human)?;
    if !unknown.is_empty() {
        output.then = Some(CliError::UnknownIds { what, ids: unknown });
    }
    Ok(output)
}

/// `3 parked events`, `1 parked event`, `2 parked inbox events of consumer X`.
fn counted(n: u64, what: &str) -> String {
    if n == 1 {
        return format!("1 {what}");
    }
    match what.split_once(" of ") {
        Some((thing, owner)) => format!("{n} {thing}s of {owner}"),
        None => format!("{n} {what}s"),
    }
}

// ---------------------------------------------------------------- discard

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

async fn discard(side: &impl ParkedSide, selection: &DiscardSelection) -> Result<Output, CliError> {
    let (table, consumer) = side.describe();
    // Parked rows are few next to a table's others: read them all, pick.
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

// ---------------------------------------------------------------- migrate

#[derive(Debug, Serialize)]
struct Migrated {
    migrated: Vec<MigratedTable>,
}

#[derive(Debug, Serialize)]
struct MigratedTable {
    kind: &'static str,
    table: String,
}

async fn migrate<DB: Backend>(
    pool: &Pool<DB>,
    cli: &Cli,
    only: Option<Side>,
) -> Result<Output, CliError> {
    let outbox = Outbox::with_table(pool.clone(), &cli.table)?;
    let inbox = Inbox::with_table(pool.clone(), MIGRATE_CONSUMER, &cli.inbox_table)?;
    let mut report = Migrated {
        migrated: Vec::new(),
    };
    let mut human = String::new();
    if only != Some(Side::Inbox) {
        outbox.migrate().await?;
        human.push_str(&format!("outbox table {} is up to date\n", cli.table));
        report.migrated.push(MigratedTable {
            kind: "outbox",
            table: cli.table.clone(),
        });
    }
    if only != Some(Side::Outbox) {
        inbox.migrate().await?;
        human.push_str(&format!("inbox table {} is up to date\n", cli.inbox_table));
        report.migrated.push(MigratedTable {
            kind: "inbox",
            table: cli.inbox_table.clone(),
        });
    }
    Output::new(&report, human)
}

// ---------------------------------------------------------------- progress

/// Progress of a long operation on stderr: on a terminal (rewritten in
/// place) or with `--progress` (one line per step); never on stdout.
#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    tty: bool,
    /// Total, what is counted, whether a line was written.
    state: std::cell::Cell<(u64, &'static str, bool)>,
}

impl Progress {
    /// Reports when `forced` or when stderr is a terminal.
    pub fn new(forced: bool) -> Progress {
        let tty = std::io::stderr().is_terminal();
        Progress {
            enabled: forced || tty,
            tty,
            state: std::cell::Cell::new((0, "", false)),
        }
    }

    fn start(&self, what: &'static str, total: u64) {
        self.state.set((total, what, false));
    }

    fn update(&self, done: u64) {
        if !self.enabled {
            return;
        }
        let (total, what, _) = self.state.get();
        self.state.set((total, what, true));
        let mut err = std::io::stderr().lock();
        // Progress is best effort: a closed stderr must not fail the replay.
        let _ = if self.tty {
            write!(err, "\r{what} {done}/{total}")
        } else {
            writeln!(err, "{what} {done}/{total}")
        };
        let _ = err.flush();
    }

    fn finish(&self) {
        if self.enabled && self.tty && self.state.get().2 {
            let _ = writeln!(std::io::stderr());
        }
    }
}
