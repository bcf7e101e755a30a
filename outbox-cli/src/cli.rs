//! The command line: what `outbox` accepts, as clap parses it.

use clap::{Args, Parser, Subcommand, ValueEnum};

use outbox_core::admin::{DEFAULT_INBOX_TABLE, DEFAULT_OUTBOX_TABLE};

/// Rows replayed per statement by default.
pub const DEFAULT_BATCH: u32 = 500;

/// Administers the outbox and inbox tables of one database: status, parked
/// rows, replays, discards and migrations.
///
/// Exit codes: 0 done; 1 the operation failed; 2 usage error; 3 bad
/// database URL or cannot connect; 4 a table does not exist; 5 an id given is
/// not a parked row.
#[derive(Debug, Parser)]
#[command(name = "outbox", version, about, long_about = None)]
pub struct Cli {
    /// Database URL: sqlite:PATH, postgres://…, postgresql://…, mysql://… or
    /// mariadb://…
    #[arg(
        long,
        short = 'd',
        env = "DATABASE_URL",
        global = true,
        value_name = "URL",
        hide_env_values = true
    )]
    pub database: Option<String>,

    /// The outbox table.
    #[arg(long, global = true, value_name = "NAME", default_value = DEFAULT_OUTBOX_TABLE)]
    pub table: String,

    /// The inbox table.
    #[arg(long, global = true, value_name = "NAME", default_value = DEFAULT_INBOX_TABLE)]
    pub inbox_table: String,

    /// Print one JSON document on stdout instead of tables.
    #[arg(long, global = true)]
    pub json: bool,

    /// Report progress of long operations on stderr even when it is not a
    /// terminal (on a terminal it is reported anyway).
    #[arg(long, global = true)]
    pub progress: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Waiting, published and parked rows of the outbox table; processed,
    /// retrying and parked rows of every consumer in the inbox table.
    Status,
    /// The parked rows of the outbox table, oldest first.
    Parked(ParkedArgs),
    /// Puts parked outbox rows back to be published again by the relays.
    Replay(ReplayArgs),
    /// Deletes parked outbox rows for good (asks first, or `--yes`).
    Discard(DiscardArgs),
    /// Creates or upgrades the outbox and the inbox table (both by default).
    Migrate(MigrateArgs),
    /// Commands on one consumer's rows of the inbox table.
    #[command(subcommand)]
    Inbox(InboxCommand),
}

/// The commands on the inbox table.
#[derive(Debug, Subcommand)]
pub enum InboxCommand {
    /// The parked rows of one consumer, oldest first.
    Parked(InboxParkedArgs),
    /// Schedules parked rows of one consumer to be applied again by the
    /// running consumer.
    Replay(InboxReplayArgs),
    /// Deletes parked rows of one consumer for good (asks first, or `--yes`).
    Discard(InboxDiscardArgs),
}

/// Arguments of `parked`.
#[derive(Debug, Args)]
pub struct ParkedArgs {
    /// At most this many rows.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// One block per row with every field in full (the whole last error and
    /// payload) instead of a table of cut cells.
    #[arg(long)]
    pub full: bool,
}

/// Arguments of `inbox parked`.
#[derive(Debug, Args)]
pub struct InboxParkedArgs {
    /// The consumer whose rows to list.
    #[arg(long, value_name = "NAME")]
    pub consumer: String,
    /// At most this many rows.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// One block per row with every field in full (the whole last error and
    /// payload) instead of a table of cut cells.
    #[arg(long)]
    pub full: bool,
}

/// Which parked rows to discard, and how.
#[derive(Debug, Args)]
pub struct DiscardSelection {
    /// Event ids of parked rows.
    #[arg(
        value_name = "ID",
        required_unless_present_any = ["all", "event_type"],
        conflicts_with = "all"
    )]
    pub ids: Vec<String>,
    /// Every parked row (only those of `--type` when it is given too).
    #[arg(long)]
    pub all: bool,
    /// Only parked rows of this event type; alone, every parked row of it.
    #[arg(long = "type", value_name = "TYPE")]
    pub event_type: Option<String>,
    /// List what would be discarded; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Discard without asking (needed when stdin is not a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
}

/// Arguments of `discard`.
#[derive(Debug, Args)]
pub struct DiscardArgs {
    /// The rows.
    #[command(flatten)]
    pub selection: DiscardSelection,
}

/// Arguments of `inbox discard`.
#[derive(Debug, Args)]
pub struct InboxDiscardArgs {
    /// The consumer whose rows to discard.
    #[arg(long, value_name = "NAME")]
    pub consumer: String,
    /// The rows.
    #[command(flatten)]
    pub selection: DiscardSelection,
}

/// Which parked rows to replay, and how.
#[derive(Debug, Args)]
pub struct ReplaySelection {
    /// Event ids of parked rows.
    #[arg(
        value_name = "ID",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    pub ids: Vec<String>,
    /// Every row parked when the command starts.
    #[arg(long)]
    pub all: bool,
    /// List what would be replayed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Rows per statement when replaying many.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_BATCH,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch: u32,
}

/// Arguments of `replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The rows.
    #[command(flatten)]
    pub selection: ReplaySelection,
}

/// Arguments of `inbox replay`.
#[derive(Debug, Args)]
pub struct InboxReplayArgs {
    /// The consumer whose rows to replay.
    #[arg(long, value_name = "NAME")]
    pub consumer: String,
    /// The rows.
    #[command(flatten)]
    pub selection: ReplaySelection,
}

/// Arguments of `migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Only this table (default: both).
    #[arg(long, value_enum, value_name = "TABLE")]
    pub only: Option<Side>,
}

/// One of the two tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Side {
    /// The outbox table (`--table`).
    Outbox,
    /// The inbox table (`--inbox-table`).
    Inbox,
}
