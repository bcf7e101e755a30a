//! `outbox migrate`: creates or upgrades the tables.

use serde::Serialize;
use sqlx::Pool;

use outbox_core::{Backend, Inbox, Outbox};

use super::{MIGRATE_CONSUMER, Output};
use crate::cli::{Cli, Side};
use crate::error::CliError;

#[derive(Debug, Serialize)]
struct Migrated {
    migrated: Vec<MigratedTable>,
}

#[derive(Debug, Serialize)]
struct MigratedTable {
    kind: &'static str,
    table: String,
}

pub(super) async fn migrate<DB: Backend>(
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
