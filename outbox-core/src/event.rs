//! Events as the application appends them, and as the relay hands them to a
//! publisher.

use std::collections::BTreeMap;

use bytes::Bytes;
use outbox_stomp::BrokerLimits;
use serde::Serialize;
use uuid::Uuid;

use crate::Error;

/// Longest header line the relay adds when it sends a message
/// (`transaction:…` or `receipt:…`).
const SENT_HEADER_LEN: usize = 64;

/// The content type of JSON payloads.
pub const JSON: &str = "application/json";

/// An event to append to the outbox: what happened, where it goes, and its
/// payload. Its id is a UUID v7, made when the value is created.
///
/// ```
/// use outbox_core::Event;
///
/// #[derive(serde::Serialize)]
/// struct UserCreated { user_id: i64 }
///
/// let event = Event::json("user.created", "/topic/VirtualTopic.user.created", &UserCreated { user_id: 7 })?
///     .with_key("user-7")
///     .with_header("tenant", "acme");
/// assert_eq!(event.event_type(), "user.created");
/// # Ok::<(), outbox_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub(crate) id: Uuid,
    pub(crate) event_type: String,
    pub(crate) destination: String,
    pub(crate) key: Option<String>,
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) content: Vec<u8>,
    pub(crate) content_type: String,
}

impl Event {
    /// An event whose payload is `payload` serialized as JSON.
    pub fn json<T: Serialize + ?Sized>(
        event_type: impl Into<String>,
        destination: impl Into<String>,
        payload: &T,
    ) -> Result<Event, Error> {
        let event_type = event_type.into();
        let content = serde_json::to_vec(payload).map_err(|source| Error::Serialize {
            event_type: event_type.clone(),
            source,
        })?;
        Ok(Event::raw(event_type, destination, content, JSON))
    }

    /// An event with a payload of raw bytes and the given content type.
    pub fn raw(
        event_type: impl Into<String>,
        destination: impl Into<String>,
        content: impl Into<Vec<u8>>,
        content_type: impl Into<String>,
    ) -> Event {
        Event {
            id: Uuid::now_v7(),
            event_type: event_type.into(),
            destination: destination.into(),
            key: None,
            headers: BTreeMap::new(),
            content: content.into(),
            content_type: content_type.into(),
        }
    }

    /// Sets the aggregate key: events of one key are published in order and
    /// carry it as `JMSXGroupID`, so ActiveMQ gives them to one consumer.
    pub fn with_key(mut self, key: impl Into<String>) -> Event {
        self.key = Some(key.into());
        self
    }

    /// Adds a message header. Names the framework sets itself are refused when
    /// the event is appended.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Event {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Marks the payload as version `version` of its event type, in the
    /// `event-version` header. A consumer that reads several versions of one
    /// type ([`Versions`](crate::consumer::Versions)) converts the older ones
    /// to the one it applies, and parks a version it does not know with the
    /// reason. Messages without the header are version 1.
    pub fn with_version(self, version: u32) -> Event {
        self.with_header(outbox_rules::EVENT_VERSION_HEADER, version.to_string())
    }

    /// Replaces the generated id, e.g. to re-send an event under its original id.
    pub fn with_id(mut self, id: Uuid) -> Event {
        self.id = id;
        self
    }

    /// The event id (UUID v7): the dedup key downstream.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The event type.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The destination, e.g. `/topic/VirtualTopic.user.created`.
    pub fn destination(&self) -> &str {
        &self.destination
    }

    /// The aggregate key, if any.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The payload bytes.
    pub fn content(&self) -> &[u8] {
        &self.content
    }

    /// Checks the fields, then the message the relay will send for this event
    /// against `limits`.
    pub(crate) fn validate(&self, limits: &BrokerLimits) -> Result<(), Error> {
        let bad = |what: String| Err(Error::InvalidEvent(what));
        use outbox_rules::{MAX_CONTENT_TYPE, MAX_DESTINATION, MAX_EVENT_TYPE, MAX_KEY, length};
        if !length(&self.event_type, MAX_EVENT_TYPE) {
            return bad(format!(
                "event type {:?} must be 1 to 255 bytes",
                self.event_type
            ));
        }
        if !length(&self.destination, MAX_DESTINATION) {
            return bad(format!(
                "destination {:?} must be 1 to 1024 bytes",
                self.destination
            ));
        }
        if let Err(reason) = outbox_rules::publish_destination(&self.destination) {
            return Err(Error::InvalidDestination {
                destination: self.destination.clone(),
                reason,
            });
        }
        if !length(&self.content_type, MAX_CONTENT_TYPE) {
            return bad(format!(
                "content type {:?} must be 1 to 255 bytes",
                self.content_type
            ));
        }
        if let Some(key) = &self.key
            && !length(key, MAX_KEY)
        {
            return bad(format!("key {key:?} must be 1 to 255 bytes"));
        }
        for name in self.headers.keys() {
            if name.is_empty() {
                return bad("header names must not be empty".into());
            }
            if outbox_rules::is_reserved_header(name) {
                return bad(format!(
                    "header {name:?} is set by the framework; choose another name"
                ));
            }
        }
        // The message as the relay builds it, without copying the payload; the
        // relay adds one header when it sends (`transaction` or `receipt`).
        let message = OutboxMessage {
            id: 0,
            event_id: self.id.to_string(),
            event_type: self.event_type.clone(),
            destination: self.destination.clone(),
            key: self.key.clone(),
            headers: self
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            content: Bytes::new(),
            content_type: self.content_type.clone(),
            attempts: 0,
            // The longest value the header can have.
            create_time: i64::MAX,
        };
        let frame = crate::transport::message_for(&message).into_frame();
        limits
            .check_sized(&frame, self.content.len(), 1, SENT_HEADER_LEN)
            .map_err(|source| Error::EventTooLarge {
                event_type: self.event_type.clone(),
                source,
            })
    }

    /// The headers as stored: a JSON array of `[name, value]` pairs, the
    /// shape of the inbox's `headers` too.
    pub(crate) fn headers_json(&self) -> String {
        let pairs: Vec<(&String, &String)> = self.headers.iter().collect();
        serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".to_owned())
    }
}

/// A claimed outbox row, ready to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxMessage {
    /// The row id (order within the database).
    pub id: i64,
    /// The event id.
    pub event_id: String,
    /// The event type.
    pub event_type: String,
    /// Where to publish.
    pub destination: String,
    /// The aggregate key, if any.
    pub key: Option<String>,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// The payload.
    pub content: Bytes,
    /// The payload's content type.
    pub content_type: String,
    /// Failed publish attempts so far.
    pub attempts: i64,
    /// When the event was appended, in milliseconds since the Unix epoch
    /// (sent as the `event-time` header).
    pub create_time: i64,
}
