//! One message as a consumer's handler sees it: the [`Delivery`].

use bytes::Bytes;

/// One message as a handler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Delivery {
    /// The dedup id: the `event-id` header, or the broker's `message-id` for
    /// messages that were not sent by an outbox relay (or whose `event-id`
    /// is empty or blank). A message with neither is parked unapplied under
    /// a fresh UUID v7, since its redeliveries cannot be told apart. An id
    /// longer than the
    /// inbox column (64) or holding a NUL is replaced by `sha256-` and 56 hex
    /// digits of its SHA-256, the same for every redelivery; the original is in
    /// [`Delivery::headers`].
    pub event_id: String,
    /// The `event-type` header, without NUL bytes and cut to 255 characters
    /// (the inbox column); the original is in [`Delivery::headers`].
    pub event_type: Option<String>,
    /// The `event-key` header, fitted like `event_type`.
    pub key: Option<String>,
    /// Every header of the message.
    pub headers: Vec<(String, String)>,
    /// The payload.
    pub body: Bytes,
    /// How many times the handler failed on this event before.
    pub attempt: u32,
}

impl Delivery {
    /// The first header named `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn headers_json(&self) -> String {
        serde_json::to_string(&self.headers).unwrap_or_else(|_| "[]".to_owned())
    }
}
