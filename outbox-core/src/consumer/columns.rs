//! What a message becomes in the inbox's columns: its dedup id, and header
//! values and error texts fitted to their columns.

use crate::inbox::{Delivery, fallback_event_id};
use crate::subscriber::Incoming;

#[cfg(doc)]
use crate::subscriber::Subscriber;

/// Longest dedup id the inbox column holds (`VARCHAR(64)`).
pub(super) const DEDUP_ID_MAX: usize = outbox_rules::MAX_EVENT_ID;

/// Longest `event_type` / `event_key` the inbox columns hold (`VARCHAR(255)`).
pub(super) const TEXT_COLUMN_MAX: usize = outbox_rules::MAX_EVENT_TYPE;

/// The inbox's dedup id for an `event-id` (or, from producers outside this
/// framework, a broker `message-id`): the id itself when it fits the column
/// and holds no NUL, else a stable digest of it, so every redelivery of the
/// message maps to the same row. ActiveMQ's message ids grow with the
/// producer's host name and can exceed the column.
pub(super) fn dedup_id(raw: &str) -> String {
    if raw.len() <= DEDUP_ID_MAX && !raw.contains('\0') {
        return raw.to_owned();
    }
    digest(raw)
}

/// `sha256-` and the first 56 hex digits (224 bits) of the SHA-256 of `raw`:
/// 63 characters.
pub(super) fn digest(raw: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(raw.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    // "sha256-" and 56 hex digits (224 bits): 63 characters.
    format!("sha256-{}", &hex[..56])
}

/// Longest error text stored as `last_error`.
pub(super) const ERROR_TEXT_MAX: usize = 2000;

/// An error text as the inbox can store it: NUL removed, cut to
/// [`ERROR_TEXT_MAX`] characters.
pub(super) fn error_text(reason: &str) -> String {
    fit(reason, ERROR_TEXT_MAX)
}

/// A header value as the inbox can store it: cut to the column's length.
pub(super) fn fit_column(raw: &str) -> String {
    fit(raw, TEXT_COLUMN_MAX)
}

/// `raw` without NUL (PostgreSQL text cannot hold it), cut to `max`
/// characters on a character boundary.
pub(super) fn fit(raw: &str, max: usize) -> String {
    raw.chars().filter(|c| *c != '\0').take(max).collect()
}

/// Why a message with neither an `event-id` nor a `message-id` is parked.
pub(super) const NO_DEDUP_ID: &str = "the message has neither an `event-id` nor a `message-id` header, so \
     it cannot be deduplicated: each redelivery would be applied again. Parked unapplied \
     (replaying it applies this row once)";

/// The id a message is deduplicated by: its `event-id`, or else the
/// broker's `message-id`. A blank id from a producer outside this framework
/// would make every later such message a duplicate of the first, so a blank
/// `event-id` gives way to the `message-id`, and a blank `message-id` counts
/// as none. `None` when there is no id at all (only a custom [`Subscriber`]
/// can deliver such a message: ActiveMQ always sends a `message-id`).
pub(super) fn dedup_source(message: &impl Incoming) -> Option<&str> {
    let present = |id: &&str| !id.trim().is_empty();
    message
        .header("event-id")
        .filter(present)
        .or_else(|| message.message_id().filter(present))
}

pub(super) fn to_delivery(message: &impl Incoming) -> Delivery {
    let headers = message.headers();
    // A message without an id is only ever parked, under an id of its own.
    let event_id = dedup_source(message)
        .map(dedup_id)
        .unwrap_or_else(fallback_event_id);
    Delivery {
        event_id,
        event_type: message.header("event-type").map(fit_column),
        key: message.header("event-key").map(fit_column),
        headers,
        body: message.body(),
        attempt: 0,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_dedup_id_that_does_not_fit_becomes_a_stable_digest_and_one_that_fits_stays() {
        let short = "0190d5a0-5f6e-7c3b-9a4e-2b8f6c1d0e9a";
        assert_eq!(super::dedup_id(short), short);
        let long = format!("ID:{}-40123-1733000000000-1:1:1:1:1", "pod-".repeat(25));
        assert!(long.len() > 100);
        let id = super::dedup_id(&long);
        assert!(id.len() <= super::DEDUP_ID_MAX, "{id}");
        assert_eq!(id, super::dedup_id(&long), "stable");
        assert_ne!(id, super::dedup_id(&format!("{long}x")));
        assert!(super::dedup_id("a\0b").starts_with("sha256-"));
    }

    #[test]
    fn over_long_or_nul_holding_type_and_key_are_fitted_to_their_columns() {
        let long = "é".repeat(300);
        let fitted = super::fit_column(&long);
        assert_eq!(fitted.chars().count(), super::TEXT_COLUMN_MAX);
        assert_eq!(super::fit_column("user\0.created"), "user.created");
    }
}
