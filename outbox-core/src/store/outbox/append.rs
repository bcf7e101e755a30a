//! The producer's insert: appended events in the caller's transaction.

use sqlx::Transaction;

use crate::Error;
use crate::backend::{Backend, Query, Value};
use crate::event::Event;
use crate::names::TableName;
use crate::store::{OutboxState, exec};

/// Rows per `INSERT` statement: keeps the number of bound values well under
/// every database's limit.
const INSERT_CHUNK: usize = 200;

/// Columns written when an event is appended.
const INSERT_COLUMNS: &str = "event_id, event_type, destination, event_key, headers, content, \
     content_type, process, attempts, next_attempt_at, create_time, update_time, claimed_by, \
     claimed_until, partition_no";

/// Inserts `events` into outbox table `table` inside `tx`, leased to the
/// hand-off `lease` (token, until) if given. Also used by the macro's
/// producers, which have the table's name but no store.
pub(crate) async fn insert<DB: Backend>(
    table: &TableName,
    tx: &mut Transaction<'_, DB>,
    events: &[Event],
    lease: Option<(&str, i64)>,
    now: i64,
) -> Result<(), Error> {
    // More rows than one statement takes: the statements go under a
    // savepoint, so a later one that fails (a repeated id, a value a column
    // refuses) takes the earlier ones back with it. A caller that commits
    // after the error then commits none of the events, never a part.
    let several = events.len() > INSERT_CHUNK;
    let savepoint = |text| Query::fixed(DB::DIALECT, text);
    if several {
        exec::<DB>(
            &mut **tx,
            &savepoint("SAVEPOINT outbox_append"),
            "appending events",
        )
        .await?;
    }
    match insert_chunks(table, tx, events, lease, now).await {
        Ok(()) if several => {
            let release = savepoint("RELEASE SAVEPOINT outbox_append");
            exec::<DB>(&mut **tx, &release, "appending events").await?;
        }
        Ok(()) => {}
        Err(error) => {
            if several {
                // If this fails too, the transaction is unusable: the
                // caller's commit cannot keep part of the events either.
                let back = savepoint("ROLLBACK TO SAVEPOINT outbox_append");
                let _ = DB::exec(&mut **tx, &back).await;
            }
            return Err(error);
        }
    }
    // Handed-off rows are leased to a relay of this process, which the commit
    // wakes: other relays could not take them, so they need no NOTIFY.
    if let Some(notify) = (DB::DIALECT.notify)(table.as_str()).filter(|_| lease.is_none()) {
        let query = Query::fixed(DB::DIALECT, &notify);
        exec::<DB>(&mut **tx, &query, "notifying relays").await?;
    }
    Ok(())
}

/// The `INSERT` statements of [`insert`], [`INSERT_CHUNK`] rows each.
async fn insert_chunks<DB: Backend>(
    table: &TableName,
    tx: &mut Transaction<'_, DB>,
    events: &[Event],
    lease: Option<(&str, i64)>,
    now: i64,
) -> Result<(), Error> {
    let (claimed_by, claimed_until) = match lease {
        Some((token, until)) => (Value::Text(Some(token)), Value::Int(until)),
        None => (Value::Text(None), Value::NullInt),
    };
    let new = OutboxState::New.as_sql();
    for chunk in events.chunks(INSERT_CHUNK) {
        let ids: Vec<String> = chunk.iter().map(|e| e.id.to_string()).collect();
        let headers: Vec<String> = chunk.iter().map(Event::headers_json).collect();
        let mut query =
            Query::new(DB::DIALECT).sql(&format!("INSERT INTO {table} ({INSERT_COLUMNS}) VALUES "));
        for (i, ((event, id), headers)) in chunk.iter().zip(&ids).zip(&headers).enumerate() {
            if i > 0 {
                query = query.sql(", ");
            }
            query = query
                .sql("(")
                .list([
                    Value::Text(Some(id)),
                    Value::Text(Some(&event.event_type)),
                    Value::Text(Some(&event.destination)),
                    Value::Text(event.key.as_deref()),
                    Value::Text(Some(headers)),
                    Value::Bytes(Some(&event.content)),
                    Value::Text(Some(&event.content_type)),
                    Value::Text(Some(new)),
                    Value::Int(0),
                    // Due at once, on any clock: a producer whose host clock is
                    // ahead of the relays' would otherwise hold its rows (and,
                    // by per-key order, its keys' later rows) back that long.
                    Value::Int(0),
                    Value::Int(now),
                    Value::Int(now),
                    claimed_by.clone(),
                    claimed_until.clone(),
                    Value::Int(crate::relay::key_partition(event.key.as_deref())),
                ])
                .sql(")");
        }
        exec::<DB>(&mut **tx, &query, "appending events").await?;
    }
    Ok(())
}
