//! The commands, written once for every database through the library's
//! admin calls: one room per command, and the parked rows of either table
//! behind one interface ([`outbox_core::admin::ParkedRows`]).

mod discard;
mod migrate;
mod parked;
mod progress;
mod replay;
mod status;

use std::collections::HashSet;

use serde::Serialize;
use sqlx::Pool;

use outbox_core::Backend;

use crate::cli::{Cli, Command, InboxCommand};
use crate::error::CliError;
use parked::Side;
pub use progress::Progress;

/// The consumer name the inbox handle of `migrate` and `status` uses; neither
/// depends on it.
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
        Command::Status => status::status(pool, cli, database).await,
        Command::Parked(args) => {
            let side = Side::outbox(pool, &cli.table)?;
            parked::parked(&side, args.limit, args.full).await
        }
        Command::Replay(args) => {
            let side = Side::outbox(pool, &cli.table)?;
            replay::replay(&side, &args.selection, &progress).await
        }
        Command::Discard(args) => {
            let side = Side::outbox(pool, &cli.table)?;
            discard::discard(&side, &args.selection).await
        }
        Command::Migrate(args) => migrate::migrate(pool, cli, args.only).await,
        Command::Inbox(InboxCommand::Parked(args)) => {
            let side = Side::inbox(pool, &args.consumer, &cli.inbox_table)?;
            parked::parked(&side, args.limit, args.full).await
        }
        Command::Inbox(InboxCommand::Discard(args)) => {
            let side = Side::inbox(pool, &args.consumer, &cli.inbox_table)?;
            discard::discard(&side, &args.selection).await
        }
        Command::Inbox(InboxCommand::Replay(args)) => {
            let side = Side::inbox(pool, &args.consumer, &cli.inbox_table)?;
            replay::replay(&side, &args.selection, &progress).await
        }
    }
}

/// The given ids once each, in their order.
fn unique(ids: &[String]) -> Vec<String> {
    let mut seen = HashSet::new();
    ids.iter().filter(|id| seen.insert(*id)).cloned().collect()
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
