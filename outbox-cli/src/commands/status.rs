//! `outbox status`: the outbox's backlog and each consumer's inbox rows.

use serde::Serialize;
use sqlx::Pool;

use outbox_core::{Backend, Inbox, Outbox};

use super::{MIGRATE_CONSUMER, Output};
use crate::cli::Cli;
use crate::error::{CliError, is_missing_table};
use crate::render::{Table, age};

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

pub(super) async fn status<DB: Backend>(
    pool: &Pool<DB>,
    cli: &Cli,
    database: &str,
) -> Result<Output, CliError> {
    let outbox = Outbox::with_table(pool.clone(), &cli.table)?;
    // Checked before the first query, so a wrong name is a usage error.
    Inbox::with_table(pool.clone(), MIGRATE_CONSUMER, &cli.inbox_table)?;
    let out = outbox_status(&outbox).await?;
    let inbox = inbox_status(pool, &cli.inbox_table).await?;
    let mut human = outbox_text(&out, inbox.exists);
    human.push('\n');
    human.push_str(&inbox_text(&inbox, out.exists));
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

/// The outbox table's rows by state; `exists: false` when there is no table.
async fn outbox_status<DB: Backend>(outbox: &Outbox<DB>) -> Result<OutboxStatus, CliError> {
    let table = outbox.table().to_owned();
    let mut out = OutboxStatus {
        table: table.clone(),
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
            let backlog = outbox.backlog().await.map_err(CliError::on_table(&table))?;
            out.waiting = Some(backlog.pending);
            out.oldest_waiting_age_ms = backlog
                .oldest_pending_age
                .map(|a| u64::try_from(a.as_millis()).unwrap_or(u64::MAX));
            out.parked = Some(backlog.parked);
            out.published = Some(counts.published);
        }
    }
    Ok(out)
}

/// Each consumer's rows in the inbox table; `exists: false` when there is no
/// table.
async fn inbox_status<DB: Backend>(pool: &Pool<DB>, table: &str) -> Result<InboxStatus, CliError> {
    let mut inbox = InboxStatus {
        table: table.to_owned(),
        exists: true,
        consumers: Vec::new(),
    };
    match Inbox::consumers(pool, table).await {
        Err(e) if is_missing_table(&e) => inbox.exists = false,
        Err(e) => return Err(e.into()),
        Ok(names) => {
            for name in names {
                let counts = Inbox::with_table(pool.clone(), &name, table)?
                    .counts()
                    .await
                    .map_err(CliError::on_table(table))?;
                inbox.consumers.push(ConsumerStatus {
                    consumer: name,
                    processed: counts.processed,
                    retrying: counts.retry,
                    parked: counts.failed,
                });
            }
        }
    }
    Ok(inbox)
}

fn num(n: Option<u64>) -> String {
    n.map_or_else(|| "-".to_owned(), |n| n.to_string())
}

/// The outbox part of the human output; `inbox_exists` tells a consumer's
/// database (no outbox needed) from one not migrated yet.
fn outbox_text(out: &OutboxStatus, inbox_exists: bool) -> String {
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
        t.render()
    } else if inbox_exists {
        // A consumer's database: it has no outbox, and needs none.
        format!(
            "outbox table {}: none in this database (it only consumes events)\n",
            out.table
        )
    } else {
        format!(
            "outbox table {} does not exist; run `outbox migrate`\n",
            out.table
        )
    }
}

/// The inbox part of the human output; `outbox_exists` tells a producer's
/// database (no inbox needed) from one not migrated yet.
fn inbox_text(inbox: &InboxStatus, outbox_exists: bool) -> String {
    if !inbox.exists && outbox_exists {
        // A producer's database: it has no inbox, and needs none.
        return format!(
            "inbox table {}: none in this database (it only produces events)\n",
            inbox.table
        );
    }
    if !inbox.exists {
        return format!(
            "inbox table {} does not exist; run `outbox migrate`\n",
            inbox.table
        );
    }
    if inbox.consumers.is_empty() {
        return format!("inbox table {}: no consumer has rows\n", inbox.table);
    }
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
    t.render()
}
