//! Typed helpers for the headers ActiveMQ gives meaning to.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::codec::{Frame, HeaderText};

/// A message to send, with typed ActiveMQ headers.
///
/// ```
/// use outbox_stomp::Outgoing;
///
/// let frame = Outgoing::new("/topic/VirtualTopic.user.created", r#"{"id":7}"#)
///     .persistent(true)
///     .group_id("user-7")
///     .content_type("application/json")
///     .into_frame();
/// assert_eq!(frame.header("persistent"), Some("true"));
/// assert_eq!(frame.header("JMSXGroupID"), Some("user-7"));
/// ```
#[derive(Debug, Clone)]
pub struct Outgoing {
    frame: Frame,
}

impl Outgoing {
    /// A SEND to `destination` with `body`.
    pub fn new(destination: impl Into<HeaderText>, body: impl Into<Bytes>) -> Outgoing {
        Outgoing {
            frame: Frame::send(destination, body),
        }
    }

    /// `persistent`: stored by the broker before the receipt (default on
    /// ActiveMQ: non-persistent).
    pub fn persistent(self, on: bool) -> Outgoing {
        self.header("persistent", if on { "true" } else { "false" })
    }

    /// `priority` 0–9 (values above 9 are clamped).
    pub fn priority(self, priority: u8) -> Outgoing {
        self.header("priority", u32::from(priority.min(9)))
    }

    /// `expires` at a point in time (milliseconds since the epoch on the wire).
    pub fn expires_at(self, at: SystemTime) -> Outgoing {
        let ms = at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        self.header("expires", ms)
    }

    /// `expires` after `ttl` from now.
    pub fn time_to_live(self, ttl: Duration) -> Outgoing {
        self.expires_at(SystemTime::now() + ttl)
    }

    /// `JMSXGroupID`: ActiveMQ delivers a group to one consumer at a time, in order.
    pub fn group_id(self, group: impl Into<HeaderText>) -> Outgoing {
        self.header("JMSXGroupID", group)
    }

    /// `correlation-id`.
    pub fn correlation_id(self, id: impl Into<HeaderText>) -> Outgoing {
        self.header("correlation-id", id)
    }

    /// `reply-to` destination.
    pub fn reply_to(self, destination: impl Into<HeaderText>) -> Outgoing {
        self.header("reply-to", destination)
    }

    /// `type` (JMSType).
    pub fn message_type(self, kind: impl Into<HeaderText>) -> Outgoing {
        self.header("type", kind)
    }

    /// `content-type`.
    pub fn content_type(self, mime: impl Into<HeaderText>) -> Outgoing {
        self.header("content-type", mime)
    }

    /// `amq-msg-type:text`: deliver as a JMS TextMessage (useful for JSON read
    /// by JMS consumers); without it a body with `content-length` becomes a
    /// BytesMessage.
    pub fn text(self) -> Outgoing {
        self.header("amq-msg-type", "text")
    }

    /// Any other header.
    pub fn header(mut self, name: impl Into<HeaderText>, value: impl Into<HeaderText>) -> Outgoing {
        self.frame.headers_mut().push(name, value);
        self
    }

    /// The SEND frame.
    pub fn into_frame(self) -> Frame {
        self.frame
    }
}

impl From<Outgoing> for Frame {
    fn from(o: Outgoing) -> Frame {
        o.frame
    }
}
