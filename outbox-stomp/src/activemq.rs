//! Typed helpers for the headers ActiveMQ gives meaning to.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::codec::escape;
use crate::codec::{Frame, HeaderText, Version};

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

/// The frame sizes ActiveMQ's STOMP transport accepts. A SEND beyond them is
/// answered with an ERROR, and the broker closes the connection: whatever else
/// was in flight on it fails too. Check a frame before sending it with
/// [`BrokerLimits::check`]. The defaults are ActiveMQ 5's (`StompWireFormat`
/// and the `maxFrameSize` of the stock `activemq.xml`); set others if the
/// broker's transport is configured differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokerLimits {
    /// Longest header line as written, `name:value` escaped (default 10 KiB).
    pub max_header_line: usize,
    /// Most header lines in one frame (default 1000).
    pub max_headers: usize,
    /// Largest frame, head and body, in bytes (default 100 MiB).
    pub max_frame: usize,
}

impl Default for BrokerLimits {
    fn default() -> BrokerLimits {
        BrokerLimits {
            max_header_line: 10 * 1024,
            max_headers: 1000,
            max_frame: 100 * 1024 * 1024,
        }
    }
}

/// Why a frame is beyond [`BrokerLimits`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameTooLarge {
    /// One header line is too long.
    #[error(
        "header {name:?} is {length} bytes as written (name:value, escaped), over the broker's limit of {limit}"
    )]
    HeaderLine {
        /// The header's name.
        name: String,
        /// Its line's length as written.
        length: usize,
        /// The limit ([`BrokerLimits::max_header_line`]).
        limit: usize,
    },
    /// Too many headers.
    #[error("{count} headers, over the broker's limit of {limit}")]
    Headers {
        /// Header lines the frame would have.
        count: usize,
        /// The limit ([`BrokerLimits::max_headers`]).
        limit: usize,
    },
    /// The whole frame is too large.
    #[error("a frame of {size} bytes, over the broker's limit of {limit}")]
    Frame {
        /// The frame's size as written.
        size: usize,
        /// The limit ([`BrokerLimits::max_frame`]).
        limit: usize,
    },
}

impl BrokerLimits {
    /// Checks `frame` as it would be written in STOMP 1.2, with `extra`
    /// header lines of up to `extra_len` bytes each that are added when it is
    /// sent (a `transaction` or `receipt` header).
    pub fn check(
        &self,
        frame: &Frame,
        extra: usize,
        extra_len: usize,
    ) -> Result<(), FrameTooLarge> {
        self.check_sized(frame, frame.body().len(), extra, extra_len)
    }

    /// As [`check`](BrokerLimits::check), for `frame` carrying a body of
    /// `body_len` bytes (its own body is not counted): a payload need not be
    /// copied into a frame to be checked.
    pub fn check_sized(
        &self,
        frame: &Frame,
        body_len: usize,
        extra: usize,
        extra_len: usize,
    ) -> Result<(), FrameTooLarge> {
        let mut count = extra;
        let mut size = frame.command().as_str().len() + 1 + extra * (extra_len + 1);
        for (name, value) in frame.headers().iter() {
            if name == "content-length" {
                continue;
            }
            let length = escape::escaped_len(name, Version::V1_2)
                + 1
                + escape::escaped_len(value, Version::V1_2);
            if length > self.max_header_line {
                return Err(FrameTooLarge::HeaderLine {
                    name: name.to_owned(),
                    length,
                    limit: self.max_header_line,
                });
            }
            count += 1;
            size += length + 1;
        }
        if body_len > 0 {
            count += 1;
            size += "content-length:".len() + body_len.to_string().len() + 1;
        }
        if count > self.max_headers {
            return Err(FrameTooLarge::Headers {
                count,
                limit: self.max_headers,
            });
        }
        // The empty line, the body and the NUL.
        size = size
            .saturating_add(1)
            .saturating_add(body_len)
            .saturating_add(1);
        if size > self.max_frame {
            return Err(FrameTooLarge::Frame {
                size,
                limit: self.max_frame,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    #[test]
    fn a_header_line_is_measured_as_written_escapes_included() {
        // "destination:/q" is 14 bytes.
        let limits = BrokerLimits {
            max_header_line: 14,
            ..BrokerLimits::default()
        };
        // "tenant:acme123" is 14 bytes; a ':' in the value is written as "\\c".
        let ok = Outgoing::new("/q", "x")
            .header("tenant", "acme123")
            .into_frame();
        limits.check(&ok, 0, 0).unwrap();
        let fits = Outgoing::new("/q", "x")
            .header("tenant", "acme1:")
            .into_frame();
        limits.check(&fits, 0, 0).unwrap();
        let over = Outgoing::new("/q", "x")
            .header("tenant", "acme12:")
            .into_frame();
        assert_eq!(
            limits.check(&over, 0, 0),
            Err(FrameTooLarge::HeaderLine {
                name: "tenant".into(),
                length: 15,
                limit: 14
            })
        );
    }

    #[test]
    fn headers_and_frame_size_count_what_is_added_when_sending() {
        let frame = Outgoing::new("/q", "").header("a", "1").into_frame();
        let two = BrokerLimits {
            max_headers: 2,
            ..BrokerLimits::default()
        };
        two.check(&frame, 0, 0).unwrap();
        assert!(matches!(
            two.check(&frame, 1, 20),
            Err(FrameTooLarge::Headers { count: 3, .. })
        ));
        // SEND\n destination:/q\n a:1\n \n NUL = 5 + 15 + 4 + 1 + 1.
        let exact = BrokerLimits {
            max_frame: 26,
            ..BrokerLimits::default()
        };
        exact.check(&frame, 0, 0).unwrap();
        let small = BrokerLimits {
            max_frame: 25,
            ..BrokerLimits::default()
        };
        assert!(matches!(
            small.check(&frame, 0, 0),
            Err(FrameTooLarge::Frame { size: 26, .. })
        ));
        // A body adds itself and its content-length line.
        assert!(matches!(
            BrokerLimits::default().check_sized(&frame, 200 * 1024 * 1024, 0, 0),
            Err(FrameTooLarge::Frame { .. })
        ));
    }
}
