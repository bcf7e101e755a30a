//! The rules the outbox checks on names and sizes, in one place.
//!
//! `#[transactional_event]` checks its literal arguments against them at
//! compile time and `outbox-core` checks every value against them at run
//! time, so the two cannot drift apart. Each check returns the reason as the
//! fix to make; the caller adds which setting it was.
//!
//! ```
//! assert!(outbox_rules::table_name("billing_outbox").is_ok());
//! assert_eq!(
//!     outbox_rules::table_name("9lives"),
//!     Err("start the name with a letter or `_`")
//! );
//! assert!(outbox_rules::is_reserved_header("JMSXGroupID"));
//! ```
#![forbid(unsafe_code)]

/// The default outbox table.
pub const DEFAULT_OUTBOX_TABLE: &str = "outbox_event";

/// The default inbox table.
pub const DEFAULT_INBOX_TABLE: &str = "inbox_event";

/// Longest table name: index names append a suffix and must stay under the
/// 63/64-byte identifier limits of PostgreSQL and MySQL.
pub const MAX_TABLE_NAME: usize = 48;

/// Longest consumer name (`inbox.consumer`, `VARCHAR(128)`).
pub const MAX_CONSUMER_NAME: usize = 128;

/// Longest event type (`event_type`, `VARCHAR(255)`).
pub const MAX_EVENT_TYPE: usize = 255;

/// Longest destination (`destination`, `VARCHAR(1024)`).
pub const MAX_DESTINATION: usize = 1024;

/// Longest aggregate key (`event_key`, `VARCHAR(255)`).
pub const MAX_KEY: usize = 255;

/// Longest content type (`content_type`, `VARCHAR(255)`).
pub const MAX_CONTENT_TYPE: usize = 255;

/// Longest event id the inbox stores (`inbox.event_id`, `VARCHAR(64)`).
pub const MAX_EVENT_ID: usize = 64;

/// Longest claim token (`claimed_by`, `VARCHAR(64)`).
pub const MAX_CLAIM_TOKEN: usize = 64;

/// Longest relay id: it is stored in `claimed_by` and `outbox_lease.holder`
/// (`VARCHAR(64)`) as the hand-off token `{relay_id}-h`.
pub const MAX_RELAY_ID: usize = MAX_CLAIM_TOKEN - 2;

/// Longest header line the broker takes in a SEND, `name:value` as written
/// (escaped): ActiveMQ 5's STOMP transport (`StompWireFormat`) refuses longer
/// ones. The producer checks every event against it at append, and the
/// consumer's decoder reads lines of [`MAX_DECODED_LINE`].
pub const MAX_HEADER_LINE: usize = 10 * 1024;

/// Most header lines the broker takes in one SEND (ActiveMQ 5's
/// `StompWireFormat`).
pub const MAX_HEADERS: usize = 1000;

/// Largest frame, head and body, the broker takes (the `maxFrameSize` of the
/// stock `activemq.xml`: 100 MiB).
pub const MAX_FRAME: usize = 100 * 1024 * 1024;

/// Header lines a broker adds to a message it delivers, beyond those its
/// producer wrote (`message-id`, `subscription`, `ack`, `destination`,
/// `redelivered`, `timestamp`, `expires`, `priority`, `original-destination`
/// and the like, with room to spare).
pub const BROKER_ADDED_HEADERS: usize = 64;

/// Longest line the consumer's decoder reads: the broker's limit on a
/// producer's line, with room for the lines the broker writes itself (a
/// `message-id` naming a long host, an `original-destination`).
pub const MAX_DECODED_LINE: usize = MAX_HEADER_LINE + 6 * 1024;

/// Most header lines the consumer's decoder reads in one frame: every line a
/// producer may write ([`MAX_HEADERS`]) and those the broker adds.
pub const MAX_DECODED_HEADERS: usize = MAX_HEADERS + BROKER_ADDED_HEADERS;

/// Largest body the consumer's decoder reads by default: a frame the broker
/// took cannot carry a larger one.
pub const MAX_DECODED_BODY: usize = MAX_FRAME;

/// Header names the framework sets itself; an event may not set them
/// (compared without regard to case).
pub const RESERVED_HEADERS: &[&str] = &[
    "destination",
    "transaction",
    "receipt",
    "content-length",
    "content-type",
    "persistent",
    "event-id",
    "event-type",
    "event-key",
    "event-time",
    "jmsxgroupid",
    "message-id",
    "subscription",
    "ack",
    "amq-msg-type",
    "type",
];

/// `true` if the framework sets header `name` itself.
pub fn is_reserved_header(name: &str) -> bool {
    RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str())
}

/// Checks a table name: ASCII letters, digits and `_`, starting with a letter
/// or `_`, at most [`MAX_TABLE_NAME`] bytes.
pub fn table_name(name: &str) -> Result<(), &'static str> {
    let Some(first) = name.chars().next() else {
        return Err("use a non-empty name");
    };
    if name.len() > MAX_TABLE_NAME {
        return Err("use at most 48 characters");
    }
    if !(first.is_ascii_alphabetic() || first == '_') {
        return Err("start the name with a letter or `_`");
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err("use only ASCII letters, digits and `_`");
    }
    Ok(())
}

/// Checks a consumer name: 1 to [`MAX_CONSUMER_NAME`] ASCII letters, digits,
/// `_`, `-` or `.`.
pub fn consumer_name(name: &str) -> Result<(), &'static str> {
    let ok = !name.is_empty()
        && name.len() <= MAX_CONSUMER_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err("use 1 to 128 ASCII letters, digits, `_`, `-` or `.`")
    }
}

/// Checks that a text field is 1 to `max` bytes.
pub fn length(value: &str, max: usize) -> bool {
    !value.is_empty() && value.len() <= max
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_follow_the_sql_identifier_rules() {
        assert!(table_name("outbox_event").is_ok());
        assert!(table_name("_x").is_ok());
        assert_eq!(table_name(""), Err("use a non-empty name"));
        assert_eq!(
            table_name(&"a".repeat(49)),
            Err("use at most 48 characters")
        );
        assert!(table_name(&"a".repeat(48)).is_ok());
        assert_eq!(
            table_name("a-b"),
            Err("use only ASCII letters, digits and `_`")
        );
        assert_eq!(
            table_name("a; DROP"),
            Err("use only ASCII letters, digits and `_`")
        );
    }

    #[test]
    fn consumer_names_and_reserved_headers() {
        assert!(consumer_name("points.v2-a_b").is_ok());
        assert!(consumer_name("").is_err());
        assert!(consumer_name(&"c".repeat(129)).is_err());
        assert!(consumer_name("a b").is_err());
        assert!(is_reserved_header("Event-Id"));
        assert!(!is_reserved_header("tenant"));
        assert_eq!(MAX_RELAY_ID, 62);
    }

    #[test]
    fn the_decoder_reads_every_frame_the_broker_takes_from_a_producer() {
        const {
            assert!(MAX_DECODED_LINE > MAX_HEADER_LINE);
            assert!(MAX_DECODED_BODY >= MAX_FRAME);
        }
        assert_eq!(MAX_DECODED_HEADERS, MAX_HEADERS + BROKER_ADDED_HEADERS);
    }
}
