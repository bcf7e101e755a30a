//! Parked rows of either table as the commands show them, and `outbox
//! parked` / `outbox inbox parked`.

use serde::Serialize;
use sqlx::Pool;

use outbox_core::admin::{Parked, ParkedRows};
use outbox_core::{Backend, Inbox, Outbox};

use super::Output;
use crate::error::CliError;
use crate::render::{ERROR_CHARS, PREVIEW_CHARS, Table, clip, clip_middle, preview, timestamp};

/// The `LIMIT` that reads every parked row: what a dry run lists, and what
/// a discard picks from.
pub(super) const EVERY_ROW: u32 = u32::MAX;

/// A parked row of either table, as listed.
#[derive(Debug, Clone, Serialize)]
pub(super) struct ParkedRow {
    pub(super) event_id: String,
    pub(super) event_type: Option<String>,
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

impl From<Parked> for ParkedRow {
    fn from(p: Parked) -> ParkedRow {
        ParkedRow {
            payload_bytes: p.content.len(),
            payload_preview: preview(&p.content, PREVIEW_CHARS),
            payload: std::str::from_utf8(&p.content).ok().map(str::to_owned),
            event_id: p.event_id,
            event_type: p.event_type,
            destination: p.destination,
            key: p.key,
            attempts: p.attempts,
            last_error: p.last_error,
            created_at_ms: p.create_time,
            parked_at_ms: p.update_time,
            content_type: p.content_type,
        }
    }
}

/// The parked rows of one table, the outbox or one consumer's inbox rows,
/// with the words the commands use for them.
pub(super) struct Side<T> {
    rows: T,
    /// The consumer, for inbox rows.
    consumer: Option<String>,
}

impl<DB: Backend> Side<Outbox<DB>> {
    /// The outbox table `table`.
    pub(super) fn outbox(pool: &Pool<DB>, table: &str) -> Result<Self, CliError> {
        Ok(Side {
            rows: Outbox::with_table(pool.clone(), table)?,
            consumer: None,
        })
    }
}

impl<DB: Backend> Side<Inbox<DB>> {
    /// The rows of `consumer` in the inbox table `table`.
    pub(super) fn inbox(pool: &Pool<DB>, consumer: &str, table: &str) -> Result<Self, CliError> {
        Ok(Side {
            rows: Inbox::with_table(pool.clone(), consumer, table)?,
            consumer: Some(consumer.to_owned()),
        })
    }
}

impl<T: ParkedRows> Side<T> {
    /// "parked event", "parked inbox event of consumer X": for messages.
    pub(super) fn what(&self) -> String {
        match &self.consumer {
            None => "parked event".to_owned(),
            Some(consumer) => format!("parked inbox event of consumer {consumer}"),
        }
    }

    /// The line saying there is no parked row.
    fn none(&self) -> String {
        match &self.consumer {
            None => format!("no parked events in {}", self.rows.table()),
            Some(consumer) => format!(
                "consumer {consumer} has no parked events in {}",
                self.rows.table()
            ),
        }
    }

    /// The table, and the consumer of inbox rows, for JSON.
    pub(super) fn describe(&self) -> (String, Option<String>) {
        (self.rows.table().to_owned(), self.consumer.clone())
    }

    /// How the rows come back once replayed, for the human output.
    pub(super) fn after_replay(&self) -> &'static str {
        match self.consumer {
            None => "relays publish replayed events again",
            Some(_) => "the running consumer applies replayed events at its next retry poll",
        }
    }

    /// Whether the listing shows a destination column (outbox rows have one).
    pub(super) fn has_destination(&self) -> bool {
        self.consumer.is_none()
    }

    fn err(&self) -> impl FnOnce(outbox_core::Error) -> CliError + '_ {
        CliError::on_table(self.rows.table())
    }

    pub(super) async fn total(&self) -> Result<u64, CliError> {
        self.rows.count_parked().await.map_err(self.err())
    }

    pub(super) async fn list(&self, limit: u32) -> Result<Vec<ParkedRow>, CliError> {
        let rows = self.rows.list_parked(limit).await.map_err(self.err())?;
        Ok(rows.into_iter().map(ParkedRow::from).collect())
    }

    /// The ids of every parked row, oldest first.
    pub(super) async fn parked_ids(&self) -> Result<Vec<String>, CliError> {
        self.rows.parked_ids().await.map_err(self.err())
    }

    pub(super) async fn replay_one(&self, id: &str) -> Result<bool, CliError> {
        self.rows.replay(id).await.map_err(self.err())
    }

    pub(super) async fn replay_many(&self, ids: &[String]) -> Result<u64, CliError> {
        self.rows.replay_many(ids).await.map_err(self.err())
    }

    /// Deletes the parked rows among `ids`; how many went.
    pub(super) async fn discard_many(&self, ids: &[String]) -> Result<u64, CliError> {
        self.rows.discard_many(ids).await.map_err(self.err())
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

/// Parked rows as a table, one line each, long fields cut.
pub(super) fn parked_table(rows: &[ParkedRow], destination: bool) -> String {
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

/// `outbox parked` and `outbox inbox parked`.
pub(super) async fn parked<T: ParkedRows>(
    side: &Side<T>,
    limit: u32,
    full: bool,
) -> Result<Output, CliError> {
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
