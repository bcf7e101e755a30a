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
/// broker's transport is configured differently. They come from
/// `outbox-rules`, as do the decoder's default [`Limits`](crate::codec::Limits),
/// which read every message these defaults let through.
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
            max_header_line: outbox_rules::MAX_HEADER_LINE,
            max_headers: outbox_rules::MAX_HEADERS,
            max_frame: outbox_rules::MAX_FRAME,
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
    use bytes::BytesMut;
    use tokio_util::codec::Encoder;

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

    /// A MESSAGE as the broker delivers what a producer sent within
    /// `limits`: the producer's headers, the broker's own, and the body.
    fn delivered(limits: &BrokerLimits, body_len: usize) -> Vec<u8> {
        let mut send = Outgoing::new("/queue/q", vec![b'x'; body_len]);
        let room = limits.max_header_line - "h0000:".len();
        // Every header the producer may write, the longest of them as long as it may be.
        for i in 0..limits.max_headers - 2 {
            let value = if i == 0 {
                "v".repeat(room)
            } else {
                "v".to_owned()
            };
            send = send.header(format!("h{i:04}"), value);
        }
        let frame = send.into_frame();
        limits.check(&frame, 0, 0).unwrap();
        let mut wire = Vec::from(&b"MESSAGE\nmessage-id:ID:broker-host-40123-1733000000000-1:1:1:1:1\nsubscription:sub-1\nack:ID:broker-host-40123-1733000000000-5:7\nredelivered:false\ntimestamp:1733000000000\nexpires:0\npriority:4\n"[..]);
        let mut send = BytesMut::new();
        crate::codec::StompCodec::default()
            .encode(&frame, &mut send)
            .unwrap();
        // The SEND's lines after its command, as the broker passes them on.
        wire.extend_from_slice(&send[b"SEND\n".len()..]);
        wire
    }

    #[test]
    fn the_default_decoder_reads_every_message_the_default_broker_limits_let_through() {
        use crate::codec::{Limits, Received};
        use tokio_util::codec::Decoder;

        let broker = BrokerLimits::default();
        let decoder = Limits::default();
        assert!(decoder.max_line_length >= broker.max_header_line);
        assert!(decoder.max_headers > broker.max_headers);
        assert!(decoder.max_body >= broker.max_frame);
        // A body of 17 MiB and a thousand headers, one of them as long as allowed.
        let wire = delivered(&broker, 17 * 1024 * 1024);
        let mut buf = BytesMut::from(&wire[..]);
        let frame = match crate::codec::StompCodec::default().decode(&mut buf) {
            Ok(Some(Received::Frame(frame))) => frame,
            other => panic!("the message does not decode: {other:?}"),
        };
        assert_eq!(frame.body().len(), 17 * 1024 * 1024);
        assert_eq!(frame.headers().len(), broker.max_headers + 7);
        assert!(frame.oversize().is_none());
    }
}
