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

/// The header that carries an event's version ([`Event::with_version`] on the
/// producer side, `version = N` in the macro); a message without it is of
/// version 1.
///
/// [`Event::with_version`]: https://docs.rs/outbox-engine/latest/outbox_core/struct.Event.html#method.with_version
pub const EVENT_VERSION_HEADER: &str = "event-version";

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

/// The destination prefixes ActiveMQ's STOMP transport knows.
pub const DESTINATION_PREFIXES: &[&str] = &["/queue/", "/topic/", "/temp-queue/", "/temp-topic/"];

/// Checks a destination as ActiveMQ's STOMP transport documents them:
/// `/queue/<name>`, `/topic/<name>`, `/temp-queue/<name>` or
/// `/temp-topic/<name>`, at most [`MAX_DESTINATION`] bytes, without
/// whitespace or control characters; a comma-separated list of such
/// destinations (a composite destination) is one too. A Virtual Topic is
/// published to as `/topic/VirtualTopic.<name>` and read from
/// `/queue/Consumer.<service>.VirtualTopic.<name>`, each part named.
///
/// A `const fn`, so that `#[transactional_event]` can check a destination
/// given as a `const` when the constant is evaluated.
///
/// ```
/// use outbox_rules::destination;
/// assert!(destination("/topic/VirtualTopic.order.placed").is_ok());
/// assert!(destination("/queue/Consumer.shipping.VirtualTopic.order.placed").is_ok());
/// assert!(destination("topic/VirtualTopic.order.placed").is_err());
/// assert!(destination("order.placed").is_err());
/// ```
pub const fn destination(value: &str) -> Result<(), &'static str> {
    let bytes = value.as_bytes();
    if bytes.is_empty() {
        return Err("name a destination, e.g. /queue/orders or /topic/VirtualTopic.order.placed");
    }
    if bytes.len() > MAX_DESTINATION {
        return Err("use at most 1024 bytes");
    }
    if has_space_or_control(bytes) {
        return Err(
            "remove the whitespace and control characters: ActiveMQ would keep them as part of the name",
        );
    }
    // Each part of a composite destination on its own.
    let mut start = 0;
    let mut i = 0;
    while i <= bytes.len() {
        if i == bytes.len() || bytes[i] == b',' {
            if let Err(reason) = single_destination(bytes, start, i) {
                return Err(reason);
            }
            start = i + 1;
        }
        i += 1;
    }
    Ok(())
}

/// [`destination`], for where a producer's events go: not a wildcard
/// (`*` or `>` as a part of the name), which ActiveMQ takes only in
/// subscriptions.
pub const fn publish_destination(value: &str) -> Result<(), &'static str> {
    if let Err(reason) = destination(value) {
        return Err(reason);
    }
    let bytes = value.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'*' || bytes[i] == b'>' {
            return Err(
                "remove the wildcard (`*`, `>`): a message is sent to one named destination, wildcards are for subscriptions",
            );
        }
        i += 1;
    }
    Ok(())
}

/// One destination of a (possibly composite) list: `bytes[start..end]`.
const fn single_destination(bytes: &[u8], start: usize, end: usize) -> Result<(), &'static str> {
    if start == end {
        return Err("remove the empty entry from the comma-separated list of destinations");
    }
    let mut p = 0;
    while p < DESTINATION_PREFIXES.len() {
        let prefix = DESTINATION_PREFIXES[p].as_bytes();
        if starts_with(bytes, start, end, prefix) {
            let name = start + prefix.len();
            if name == end {
                return Err("name the queue or topic after its prefix, e.g. /queue/orders");
            }
            return virtual_topic(bytes, name, end, p == 1);
        }
        // The same without its leading slash: `topic/…`.
        if starts_with(bytes, start, end, split_first(prefix)) {
            return Err("start the destination with a slash: /queue/… or /topic/…");
        }
        p += 1;
    }
    Err(
        "start the destination with /queue/, /topic/, /temp-queue/ or /temp-topic/ (ActiveMQ's STOMP prefixes), e.g. /topic/VirtualTopic.order.placed",
    )
}

/// The Virtual Topic forms, for a name `bytes[name..end]` of a topic
/// (`topic`) or a queue.
const fn virtual_topic(
    bytes: &[u8],
    name: usize,
    end: usize,
    topic: bool,
) -> Result<(), &'static str> {
    const VT: &[u8] = b"VirtualTopic.";
    const CONSUMER: &[u8] = b"Consumer.";
    if starts_with(bytes, name, end, VT) {
        if !topic {
            return Err(
                "publish to a Virtual Topic as a topic, /topic/VirtualTopic.<name>; its consumers read /queue/Consumer.<service>.VirtualTopic.<name>",
            );
        }
        if name + VT.len() == end {
            return Err("name the Virtual Topic after `VirtualTopic.`");
        }
        return Ok(());
    }
    if !topic && starts_with(bytes, name, end, CONSUMER) {
        // `Consumer.<service>.VirtualTopic.<name>`: the service and the name.
        let service = name + CONSUMER.len();
        let mut i = service;
        while i < end {
            if bytes[i] == b'.' && starts_with(bytes, i + 1, end, VT) {
                if i == service {
                    return Err(
                        "name the consuming service: /queue/Consumer.<service>.VirtualTopic.<name>",
                    );
                }
                if i + 1 + VT.len() == end {
                    return Err("name the Virtual Topic after `VirtualTopic.`");
                }
                return Ok(());
            }
            i += 1;
        }
    }
    Ok(())
}

/// `bytes[start..end]` begins with `prefix`.
const fn starts_with(bytes: &[u8], start: usize, end: usize, prefix: &[u8]) -> bool {
    if end < start || end - start < prefix.len() {
        return false;
    }
    let mut i = 0;
    while i < prefix.len() {
        if bytes[start + i] != prefix[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// `prefix` without its first byte.
const fn split_first(prefix: &[u8]) -> &[u8] {
    match prefix.split_first() {
        Some((_, rest)) => rest,
        None => prefix,
    }
}

/// Any whitespace or control character, ASCII or not (`bytes` is UTF-8).
const fn has_space_or_control(bytes: &[u8]) -> bool {
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let (c, len) = if b < 0x80 {
            (b as u32, 1)
        } else if b < 0xe0 {
            (((b as u32) & 0x1f) << 6 | (bytes[i + 1] as u32 & 0x3f), 2)
        } else if b < 0xf0 {
            (
                ((b as u32) & 0x0f) << 12
                    | (bytes[i + 1] as u32 & 0x3f) << 6
                    | (bytes[i + 2] as u32 & 0x3f),
                3,
            )
        } else {
            (0x10000, 4)
        };
        let space = matches!(
            c,
            0x00..=0x20
                | 0x7f..=0xa0
                | 0x1680
                | 0x2000..=0x200b
                | 0x2028
                | 0x2029
                | 0x202f
                | 0x205f
                | 0x3000
                | 0xfeff
        );
        if space {
            return true;
        }
        i += len;
    }
    false
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
    fn destinations_take_the_forms_activemq_documents() {
        for ok in [
            "/queue/orders",
            "/topic/prices",
            "/temp-queue/replies",
            "/temp-topic/t1",
            "/topic/VirtualTopic.order.placed",
            "/queue/Consumer.shipping.VirtualTopic.order.placed",
            "/queue/a,/topic/b",
            "/queue/commandes.été",
        ] {
            assert_eq!(destination(ok), Ok(()), "{ok}");
            assert_eq!(publish_destination(ok), Ok(()), "{ok}");
        }
        let refused = [
            ("", "name a destination"),
            (
                "topic/VirtualTopic.order.placed",
                "start the destination with a slash",
            ),
            ("queue/orders", "start the destination with a slash"),
            ("order.placed", "start the destination with /queue/"),
            (
                "order-placed-no-prefix",
                "start the destination with /queue/",
            ),
            ("/orders", "start the destination with /queue/"),
            ("/queue/", "name the queue or topic"),
            ("/topic/ orders", "remove the whitespace"),
            ("/queue/orders\n", "remove the whitespace"),
            ("/queue/orders\u{a0}", "remove the whitespace"),
            ("/queue/a,,/queue/b", "remove the empty entry"),
            ("/queue/a,orders", "start the destination with /queue/"),
            (
                "/queue/VirtualTopic.order.placed",
                "publish to a Virtual Topic as a topic",
            ),
            ("/topic/VirtualTopic.", "name the Virtual Topic"),
            (
                "/queue/Consumer..VirtualTopic.x",
                "name the consuming service",
            ),
            ("/queue/Consumer.s.VirtualTopic.", "name the Virtual Topic"),
        ];
        for (bad, reason) in refused {
            let error = destination(bad).expect_err(bad);
            assert!(error.starts_with(reason), "{bad:?}: {error}");
        }
        assert!(destination(&format!("/queue/{}", "q".repeat(MAX_DESTINATION))).is_err());
        assert!(
            destination("/topic/prices.>").is_ok(),
            "a subscription may use wildcards"
        );
        assert!(publish_destination("/topic/prices.>").is_err());
        assert!(publish_destination("/topic/prices.*.eu").is_err());
        const { assert!(destination("/queue/checked.at.compile.time").is_ok()) }
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
