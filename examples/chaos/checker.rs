//! The checker: reads only what the system recorded (the producer's rows, the
//! outbox, the inbox, the business rows) and states, for every planned event
//! and every foreign message at every consumer, what became of it against what
//! had to.

use std::collections::{BTreeMap, HashMap};

use crate::db::{AppliedRow, Db, InboxRow, OutboxRow, ProducedRow};
use crate::plan::{CONSUMERS, Expected, ForeignExpected, Plan};
use crate::runner::Sends;
use crate::shared::BoxError;

/// Outcome counts and every violated invariant.
#[derive(Debug, Default)]
pub(crate) struct Check {
    /// Planned events appended (committed).
    pub(crate) committed: usize,
    /// Planned events refused at append, as they had to be.
    pub(crate) refused: usize,
    /// (event or message, consumer) pairs applied exactly once, as expected.
    pub(crate) applied_once: usize,
    /// Parked as expected, by reason.
    pub(crate) parked: BTreeMap<String, usize>,
    /// Pairs with no effect and no parked row.
    pub(crate) lost: usize,
    /// Pairs applied more than once.
    pub(crate) applied_twice: usize,
    /// Rows waiting (outbox `NEW`, inbox `RETRY`): not settled.
    pub(crate) waiting: usize,
    /// Pairs held behind a parked earlier event of their key: with per-key
    /// order a parked event holds its key's later events until it is
    /// replayed (DESIGN.md §5), so these wait by design. At the relay too:
    /// a row parked as undecodable is unpublished, and the relay publishes
    /// no row ahead of an earlier unpublished row of its key
    /// (docs/guarantees.md), so its key's later rows stay `NEW`.
    pub(crate) held: usize,
    /// Per-key order broken (applied after a later event of its key).
    pub(crate) out_of_order: usize,
    /// Everything that breaks an invariant, one line each.
    pub(crate) violations: Vec<String>,
}

impl Check {
    /// Reads the database and checks.
    pub(crate) async fn read(
        db: &Db,
        plan: &Plan,
        foreign_sends: &HashMap<i64, Sends>,
    ) -> Result<Check, BoxError> {
        // The services migrate before the faults begin, so every table is
        // there; a read that fails must not pass for an empty table.
        let produced = db.produced().await?;
        let outbox = db.outbox().await?;
        let applied = db.applied().await?;
        let inbox = db.inbox().await?;
        Ok(check(
            plan,
            &produced,
            &outbox,
            &applied,
            &inbox,
            foreign_sends,
        ))
    }

    /// Nothing left to happen: no pair without an outcome.
    pub(crate) fn settled(&self) -> bool {
        self.waiting == 0 && self.lost == 0
    }

    fn violation(&mut self, line: String) {
        self.violations.push(line);
    }

    fn park(&mut self, reason: &str) {
        *self.parked.entry(reason.to_owned()).or_default() += 1;
    }
}

fn check(
    plan: &Plan,
    produced: &[ProducedRow],
    outbox: &[OutboxRow],
    applied: &[AppliedRow],
    inbox: &[InboxRow],
    foreign_sends: &HashMap<i64, Sends>,
) -> Check {
    let mut c = Check::default();
    let produced: HashMap<i64, (Option<&str>, &str)> = produced
        .iter()
        .map(|(seq, id, outcome)| (*seq, (id.as_deref(), outcome.as_str())))
        .collect();
    let outbox: HashMap<&str, (&str, Option<&str>)> = outbox
        .iter()
        .map(|(id, state, error)| (id.as_str(), (state.as_str(), error.as_deref())))
        .collect();
    // (consumer, seq) → applications; (consumer, fid) → applications.
    let mut by_seq: HashMap<(&str, i64), usize> = HashMap::new();
    let mut by_fid: HashMap<(&str, i64), usize> = HashMap::new();
    for (_, consumer, seq, fid, _, _, _) in applied {
        if let Some(seq) = seq {
            *by_seq.entry((consumer.as_str(), *seq)).or_default() += 1;
        }
        if let Some(fid) = fid {
            *by_fid.entry((consumer.as_str(), *fid)).or_default() += 1;
        }
    }
    let states: HashMap<(&str, &str), (&str, Option<&str>)> = inbox
        .iter()
        .map(|(consumer, id, state, error, _)| {
            (
                (consumer.as_str(), id.as_str()),
                (state.as_str(), error.as_deref()),
            )
        })
        .collect();

    // The first event of each key the relay parked: its key's later rows
    // stay in the outbox by design.
    let mut relay_parked_from: HashMap<&str, i64> = HashMap::new();
    for event in &plan.events {
        if let (Some(key), Some((Some(id), _))) = (&event.key, produced.get(&event.seq))
            && let Some(("FAILED", _)) = outbox.get(id)
        {
            let first = relay_parked_from.entry(key.as_str()).or_insert(i64::MAX);
            *first = (*first).min(event.seq);
        }
    }

    // The first parked place of each key at each consumer: later events of
    // the key wait behind it by design.
    let mut parked_from: HashMap<(&str, &str), i64> = HashMap::new();
    for event in &plan.events {
        let (Some(key), Some((Some(id), _))) = (&event.key, produced.get(&event.seq)) else {
            continue;
        };
        for consumer in CONSUMERS {
            if let Some(("FAILED", _)) = states.get(&(consumer, *id)) {
                let first = parked_from
                    .entry((consumer, key.as_str()))
                    .or_insert(i64::MAX);
                *first = (*first).min(event.kseq);
            }
        }
    }

    for event in &plan.events {
        let seq = event.seq;
        let expected = event.expected(plan.aborts);
        let Some((id, outcome)) = produced.get(&seq).copied() else {
            c.violation(format!(
                "event {seq}: never appended (the producer did not get to it)"
            ));
            c.waiting += 1;
            continue;
        };
        if let Some(reason) = outcome.strip_prefix("REFUSED: ") {
            if expected == Expected::Refused {
                c.refused += 1;
            } else {
                c.violation(format!(
                    "event {seq}: refused at append though within the limits: {reason}"
                ));
            }
            continue;
        }
        c.committed += 1;
        if expected == Expected::Refused {
            c.violation(format!(
                "event {seq}: over the limits ({:?}) but accepted at append",
                event.over
            ));
        }
        let Some(id) = id else {
            c.violation(format!("event {seq}: committed without an event id"));
            continue;
        };
        let Some((state, error)) = outbox.get(id).copied() else {
            c.lost += CONSUMERS.len();
            c.violation(format!(
                "event {seq} ({id}): committed, but its outbox row is gone"
            ));
            continue;
        };
        match state {
            // Held whatever error an earlier publish attempt left on it.
            "NEW"
                if event.key.as_deref().is_some_and(|key| {
                    relay_parked_from.get(key).is_some_and(|first| seq > *first)
                }) =>
            {
                c.held += CONSUMERS.len();
                continue;
            }
            "NEW" => {
                c.waiting += 1;
                c.violation(format!("event {seq} ({id}): stuck in the outbox (NEW)"));
                continue;
            }
            "FAILED" => {
                if expected == Expected::ParkedAtRelay {
                    c.park("relay: undecodable row");
                } else {
                    c.violation(format!(
                        "event {seq} ({id}): parked by the relay unexpectedly: {}",
                        error.unwrap_or("no error recorded")
                    ));
                }
                continue;
            }
            _ => {}
        }
        if expected == Expected::ParkedAtRelay {
            c.violation(format!(
                "event {seq} ({id}): a corrupt row was published ({state})"
            ));
        }
        for consumer in CONSUMERS {
            let times = by_seq.get(&(consumer, seq)).copied().unwrap_or(0);
            let inbox_state = states.get(&(consumer, id)).copied();
            let what = format!(
                "event {seq} ({id}, {}) at {consumer}",
                event.behaviour.header()
            );
            let behind_parked = event.key.as_deref().is_some_and(|key| {
                parked_from
                    .get(&(consumer, key))
                    .is_some_and(|first| event.kseq > *first)
            });
            if behind_parked
                && times == 0
                && matches!(inbox_state, Some(("RETRY", Some(reason)))
                    if reason.contains("earlier event of its key"))
            {
                c.held += 1;
                continue;
            }
            settle_pair(
                &mut c,
                &what,
                expected == Expected::ParkedAtInbox,
                times,
                inbox_state,
                &format!("inbox: {}", reason_of(event.behaviour.header().as_str())),
            );
        }
    }

    for message in &plan.foreign {
        let Sends {
            written: sends,
            confirmed,
        } = foreign_sends.get(&message.fid).copied().unwrap_or_default();
        if confirmed == 0 {
            c.violation(format!(
                "foreign #{}: the broker never confirmed it",
                message.fid
            ));
            continue;
        }
        let marker = message.marker();
        for consumer in CONSUMERS {
            let times = by_fid.get(&(consumer, message.fid)).copied().unwrap_or(0);
            let parked = inbox.iter().find(|(who, _, state, _, content)| {
                who == consumer
                    && state == "FAILED"
                    && content
                        .as_deref()
                        .is_some_and(|body| contains(body, marker.as_bytes()))
            });
            let what = format!(
                "foreign #{} ({:?}) at {consumer}",
                message.fid, message.oddity
            );
            // A message sent without an event-id is a new message each time
            // it is sent; one with an id is the same event each time.
            let allowed = if message.event_id.is_none() {
                sends as usize
            } else {
                1
            };
            match (message.expected(), times, parked) {
                (_, n, _) if n > allowed => {
                    c.applied_twice += 1;
                    c.violation(format!("{what}: applied {n} times"));
                }
                (ForeignExpected::Parked, 0, Some(_)) => c.park("inbox: undecodable foreign"),
                (ForeignExpected::AppliedOrParked, 0, Some(_)) => {
                    c.park(&format!("inbox: foreign {:?}", message.oddity))
                }
                (ForeignExpected::Applied | ForeignExpected::AppliedOrParked, n, None)
                    if n >= 1 =>
                {
                    c.applied_once += 1
                }
                (_, n, Some((_, _, _, error, _))) if n >= 1 => c.violation(format!(
                    "{what}: applied and parked ({})",
                    error.as_deref().unwrap_or("")
                )),
                (ForeignExpected::Applied, 0, Some((_, _, _, error, _))) => c.violation(format!(
                    "{what}: parked though decodable: {}",
                    error.as_deref().unwrap_or("")
                )),
                (ForeignExpected::Parked, n, None) if n >= 1 => {
                    c.violation(format!("{what}: undecodable but applied"))
                }
                _ => {
                    c.lost += 1;
                    c.violation(format!(
                        "{what}: lost (sent {sends}×, neither applied nor parked)"
                    ));
                }
            }
        }
    }

    // Per-key order among applied events, per consumer.
    let mut last: HashMap<(&str, &str), (i64, i64, &str)> = HashMap::new();
    for (_, consumer, seq, _, key, kseq, note) in applied {
        let (Some(seq), Some(key), Some(kseq)) = (seq, key, kseq) else {
            continue;
        };
        let note = note.as_deref().unwrap_or("");
        if let Some((prev_kseq, prev_seq, prev_note)) = last.get(&(consumer.as_str(), key.as_str()))
            && *kseq <= *prev_kseq
            && seq != prev_seq
        {
            c.out_of_order += 1;
            c.violation(format!(
                "key {key} at {consumer}: event {seq} (place {kseq}; {note}) applied after place {prev_kseq} (event {prev_seq}; {prev_note})"
            ));
        }
        let entry = last
            .entry((consumer.as_str(), key.as_str()))
            .or_insert((0, 0, ""));
        if *kseq > entry.0 {
            *entry = (*kseq, *seq, note);
        }
    }
    c
}

/// One planned event at one consumer.
fn settle_pair(
    c: &mut Check,
    what: &str,
    must_park: bool,
    times: usize,
    inbox_state: Option<(&str, Option<&str>)>,
    reason: &str,
) {
    match (must_park, times, inbox_state) {
        (_, n, _) if n > 1 => {
            c.applied_twice += 1;
            c.violation(format!("{what}: applied {n} times"));
        }
        (false, 1, Some(("PROCESSED", _))) => c.applied_once += 1,
        (true, 0, Some(("FAILED", _))) => c.park(reason),
        (_, 0, Some(("RETRY", _))) => {
            c.waiting += 1;
            c.violation(format!("{what}: still waiting for a retry"));
        }
        (false, 0, Some(("FAILED", error))) => c.violation(format!(
            "{what}: parked though its handler succeeds: {}",
            error.unwrap_or("")
        )),
        (true, 1, state) => c.violation(format!(
            "{what}: its handler failed, yet its effect committed (inbox {})",
            state.map_or("no row", |(s, _)| s)
        )),
        (_, 0, Some(("PROCESSED", _))) => {
            c.lost += 1;
            c.violation(format!(
                "{what}: acknowledged as processed without its effect (lost)"
            ));
        }
        (_, 0, None) => {
            c.lost += 1;
            c.violation(format!("{what}: lost (no effect, no inbox row)"));
        }
        (_, n, state) => c.violation(format!(
            "{what}: applied {n}× with inbox state {}",
            state.map_or("none", |(s, _)| s)
        )),
    }
}

fn reason_of(behaviour: &str) -> &str {
    behaviour.split(':').next().unwrap_or(behaviour)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::plan::{Behaviour, PlannedEvent};

    fn plan(behaviours: &[(Option<&str>, i64, Behaviour)]) -> Plan {
        let mut plan = Plan::generate(
            1,
            std::time::Duration::from_secs(10),
            false,
            true,
            BTreeSet::new(),
        );
        plan.foreign.clear();
        plan.events = behaviours
            .iter()
            .enumerate()
            .map(|(n, (key, kseq, behaviour))| PlannedEvent {
                seq: n as i64 + 1,
                key: key.map(str::to_owned),
                kseq: *kseq,
                behaviour: *behaviour,
                size: 0,
                headers: 0,
                over: None,
                corrupt: false,
            })
            .collect();
        plan
    }

    fn produced(n: i64) -> Vec<ProducedRow> {
        (1..=n)
            .map(|seq| (seq, Some(format!("e{seq}")), "COMMITTED".to_owned()))
            .collect()
    }

    fn published(n: i64) -> Vec<OutboxRow> {
        (1..=n)
            .map(|seq| (format!("e{seq}"), "PUBLISHED".to_owned(), None))
            .collect()
    }

    fn applied(rows: &[(&str, i64, Option<&str>, i64)]) -> Vec<AppliedRow> {
        rows.iter()
            .enumerate()
            .map(|(id, (consumer, seq, key, kseq))| {
                (
                    id as i64,
                    (*consumer).to_owned(),
                    Some(*seq),
                    None,
                    key.map(str::to_owned),
                    Some(*kseq),
                    None,
                )
            })
            .collect()
    }

    fn inbox(rows: &[(&str, i64, &str, Option<&str>)]) -> Vec<InboxRow> {
        rows.iter()
            .map(|(consumer, seq, state, error)| {
                (
                    (*consumer).to_owned(),
                    format!("e{seq}"),
                    (*state).to_owned(),
                    error.map(str::to_owned),
                    None,
                )
            })
            .collect()
    }

    #[test]
    fn an_event_applied_once_by_each_consumer_holds_and_a_second_application_is_a_violation() {
        let plan = plan(&[(None, 0, Behaviour::Apply)]);
        let once = applied(&[("alpha", 1, None, 0), ("beta", 1, None, 0)]);
        let rows = inbox(&[
            ("alpha", 1, "PROCESSED", None),
            ("beta", 1, "PROCESSED", None),
        ]);
        let c = check(
            &plan,
            &produced(1),
            &published(1),
            &once,
            &rows,
            &HashMap::new(),
        );
        assert!(c.violations.is_empty(), "{:?}", c.violations);
        assert_eq!(c.applied_once, 2);
        let twice = applied(&[
            ("alpha", 1, None, 0),
            ("alpha", 1, None, 0),
            ("beta", 1, None, 0),
        ]);
        let c = check(
            &plan,
            &produced(1),
            &published(1),
            &twice,
            &rows,
            &HashMap::new(),
        );
        assert_eq!((c.applied_twice, c.violations.len()), (1, 1));
    }

    #[test]
    fn a_failing_handler_must_park_and_its_later_events_of_the_key_are_held_not_stuck() {
        let plan = plan(&[
            (Some("k"), 1, Behaviour::AlwaysFail),
            (Some("k"), 2, Behaviour::Apply),
        ]);
        let waiting = Some("waiting for an earlier event of its key");
        let rows = inbox(&[
            ("alpha", 1, "FAILED", Some("this event always fails")),
            ("beta", 1, "FAILED", Some("this event always fails")),
            ("alpha", 2, "RETRY", waiting),
            ("beta", 2, "RETRY", waiting),
        ]);
        let c = check(
            &plan,
            &produced(2),
            &published(2),
            &[],
            &rows,
            &HashMap::new(),
        );
        assert!(c.violations.is_empty(), "{:?}", c.violations);
        assert_eq!((c.held, c.parked.values().sum::<usize>()), (2, 2));
        assert!(c.settled());
    }

    #[test]
    fn an_effect_without_its_inbox_row_or_a_row_without_its_effect_is_lost_or_wrong() {
        let plan = plan(&[(None, 0, Behaviour::Swallow), (None, 0, Behaviour::Apply)]);
        // The swallowed error: acked as processed with no effect at alpha,
        // committed with its effect at beta; event 2 never reached alpha.
        let rows = inbox(&[
            ("alpha", 1, "PROCESSED", None),
            ("beta", 1, "PROCESSED", None),
            ("beta", 2, "PROCESSED", None),
        ]);
        let effects = applied(&[("beta", 1, None, 0), ("beta", 2, None, 0)]);
        let c = check(
            &plan,
            &produced(2),
            &published(2),
            &effects,
            &rows,
            &HashMap::new(),
        );
        assert_eq!(c.lost, 2, "{:?}", c.violations);
        assert_eq!(c.violations.len(), 3, "{:?}", c.violations);
        assert!(!c.settled());
    }

    #[test]
    fn a_swallowed_error_parks_where_the_database_gives_up_the_transaction_and_applies_elsewhere() {
        let mut plan = plan(&[(None, 0, Behaviour::Swallow)]);
        let effects = applied(&[("alpha", 1, None, 0), ("beta", 1, None, 0)]);
        let rows = inbox(&[
            ("alpha", 1, "PROCESSED", None),
            ("beta", 1, "PROCESSED", None),
        ]);
        // SQLite and MariaDB: only the statement failed; the handler's row
        // committed with its inbox row, as the handler said `Ok`.
        plan.aborts = false;
        let c = check(
            &plan,
            &produced(1),
            &published(1),
            &effects,
            &rows,
            &HashMap::new(),
        );
        assert!(c.violations.is_empty(), "{:?}", c.violations);
        assert_eq!(c.applied_once, 2);
        // PostgreSQL gave up the transaction: an effect is a violation.
        plan.aborts = true;
        let c = check(
            &plan,
            &produced(1),
            &published(1),
            &effects,
            &rows,
            &HashMap::new(),
        );
        assert_eq!(c.violations.len(), 2, "{:?}", c.violations);
    }

    #[test]
    fn rows_behind_a_row_the_relay_parked_are_held_and_other_new_rows_are_stuck() {
        let mut plan = plan(&[
            (Some("k"), 0, Behaviour::Apply),
            (Some("k"), 1, Behaviour::Apply),
            (Some("j"), 1, Behaviour::Apply),
        ]);
        plan.events[0].corrupt = true;
        let outbox = vec![
            (
                "e1".to_owned(),
                "FAILED".to_owned(),
                Some("undecodable".to_owned()),
            ),
            // An earlier publish attempt failed: held all the same.
            (
                "e2".to_owned(),
                "NEW".to_owned(),
                Some("connection lost".to_owned()),
            ),
            ("e3".to_owned(), "NEW".to_owned(), None),
        ];
        let c = check(&plan, &produced(3), &outbox, &[], &[], &HashMap::new());
        assert_eq!(c.held, 2, "{:?}", c.violations);
        // Event 3's key has nothing parked: stuck.
        assert_eq!(
            (c.waiting, c.violations.len()),
            (1, 1),
            "{:?}",
            c.violations
        );
    }

    #[test]
    fn a_key_applied_out_of_its_order_is_a_violation() {
        let plan = plan(&[
            (Some("k"), 1, Behaviour::Apply),
            (Some("k"), 2, Behaviour::Apply),
        ]);
        let effects = applied(&[
            ("alpha", 2, Some("k"), 2),
            ("alpha", 1, Some("k"), 1),
            ("beta", 1, Some("k"), 1),
            ("beta", 2, Some("k"), 2),
        ]);
        let rows = inbox(&[
            ("alpha", 1, "PROCESSED", None),
            ("alpha", 2, "PROCESSED", None),
            ("beta", 1, "PROCESSED", None),
            ("beta", 2, "PROCESSED", None),
        ]);
        let c = check(
            &plan,
            &produced(2),
            &published(2),
            &effects,
            &rows,
            &HashMap::new(),
        );
        assert_eq!(c.out_of_order, 1, "{:?}", c.violations);
    }
}
