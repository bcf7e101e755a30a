//! The STOMP wire format: bytes ⇄ [`Frame`], no sockets.
//!
//! [`StompCodec`] is a `tokio_util::codec`
//! [`Decoder`](tokio_util::codec::Decoder) and
//! [`Encoder`](tokio_util::codec::Encoder) (in `decode` and `encode`). Decoding
//! works in two steps: a cheap scan for the end of the head (`\n\n`), which
//! remembers how far it got so a slow peer's bytes are not rescanned and where
//! each line ends, then one pass over those lines that builds the headers as
//! spans of the frozen head. Escaped names and values are unescaped in place in
//! the head (unescaping only shrinks text), so no header is copied: a frame's
//! headers cost one vector of spans. The body is taken by `content-length` when
//! present (binary, NULs allowed) or up to the first NUL; its size is checked
//! against [`Limits::max_body`] before it is buffered. A MESSAGE's body over
//! the limit is read past, its bytes discarded as they arrive, and the frame
//! comes out with its headers, an empty body and an [`Oversize`] marker, so a
//! consumer can set it aside and go on; any other frame's is an error. So is
//! a head over [`Limits::max_line_length`] or [`Limits::max_headers`]: a
//! MESSAGE's is then read again one line at a time, keeping the lines within
//! the limits and the ones it is settled by, dropping the others as they
//! arrive (see [`Oversize`]), and the frame comes out marked. End-of-line
//! bytes between frames are heart-beats and come out as
//! [`Received::HeartBeat`] so the connection can track liveness.
//!
//! Escaping follows the negotiated [`Version`]: none in 1.0 and never in
//! CONNECT/STOMP/CONNECTED frames; `\\`, `\n`, `\c` in 1.1; and `\r` in 1.2.

mod decode;
mod encode;
pub(crate) mod escape;
mod frame;
mod headers;
#[cfg(test)]
mod tests;

use bytes::{Bytes, BytesMut};

pub use crate::error::CodecError;
pub(crate) use encode::encodable;
pub use frame::{Command, Frame, Oversize, Version};
pub use headers::{HeaderText, Headers};

use headers::HeadSpan;

/// Size limits the decoder enforces.
///
/// The defaults read every message a producer can get past the broker's
/// default limits ([`BrokerLimits`](crate::BrokerLimits)): both come from the
/// constants of `outbox-rules`, and a unit test holds them together. A
/// consumer may set smaller ones: a MESSAGE beyond them is read past, not
/// buffered, and delivered without its body or the header lines over them,
/// marked (see [`Oversize`]). Any other frame beyond them is an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest command or header line in bytes (default 16 KiB: the broker's
    /// 10 KiB for a producer's line, and room for the lines it writes itself).
    pub max_line_length: usize,
    /// Most header lines in one frame (default 1064: the broker's 1000 for a
    /// producer's frame and the ones it adds).
    pub max_headers: usize,
    /// Largest body in bytes (default 100 MiB, the broker's frame limit).
    pub max_body: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_line_length: outbox_rules::MAX_DECODED_LINE,
            max_headers: outbox_rules::MAX_DECODED_HEADERS,
            max_body: outbox_rules::MAX_DECODED_BODY,
        }
    }
}

/// What the decoder yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A complete frame.
    Frame(Frame),
    /// One or more end-of-line bytes outside a frame: the peer is alive.
    HeartBeat,
}

/// Where the decoder stopped on the previous call.
#[derive(Debug)]
enum DecodeState {
    /// Between frames.
    Idle,
    /// Inside the head; `scanned` bytes contain no head end yet, and the
    /// line ends found in them are in `StompCodec::line_ends`.
    Head { scanned: usize },
    /// A MESSAGE whose head is over `Limits::max_line_length` or
    /// `Limits::max_headers`, read one line at a time.
    Trim(Box<TrimmedHead>),
    /// Head parsed and consumed; waiting for the body.
    Body {
        command: Command,
        headers: Headers,
        content_length: Option<usize>,
        scanned: usize,
        trimmed: Trimmed,
    },
    /// A MESSAGE whose body is over `Limits::max_body`: its bytes are
    /// discarded as they arrive; `skipped` of them so far.
    Skip {
        command: Command,
        headers: Headers,
        content_length: Option<usize>,
        skipped: usize,
        trimmed: Trimmed,
    },
}

/// Header lines a MESSAGE's head lost to the limits.
#[derive(Debug, Clone, Copy, Default)]
struct Trimmed {
    long_lines: usize,
    extra_headers: usize,
}

impl Trimmed {
    fn is_empty(self) -> bool {
        self.long_lines == 0 && self.extra_headers == 0
    }
}

/// Headers a MESSAGE over the head limits keeps past `Limits::max_headers`,
/// the first of each name: what it is routed, acknowledged and set aside by.
/// At most one line each, so the kept head stays within about the limits.
const SETTLING_HEADERS: [&str; 11] = [
    "message-id",
    "ack",
    "subscription",
    "destination",
    "content-length",
    "content-type",
    "event-id",
    "event-type",
    "event-key",
    "event-time",
    "redelivered",
];

/// A MESSAGE's head being read past its limits: the lines kept so far form a
/// head of their own, parsed as usual once the empty line arrives.
#[derive(Debug)]
struct TrimmedHead {
    /// The command line and the header lines kept, each with its `\n`.
    head: BytesMut,
    /// Offsets in `head` of the `\n` of each line.
    ends: Vec<usize>,
    /// Bit `i` set: a `SETTLING_HEADERS[i]` line is kept.
    settled: u16,
    /// Bytes of the current line in the buffer scanned without a `\n`.
    scanned: usize,
    /// Inside a line over the limit, whose bytes are dropped up to its `\n`.
    dropping: bool,
    trimmed: Trimmed,
}

/// STOMP frame codec for one connection.
#[derive(Debug)]
pub struct StompCodec {
    version: Version,
    limits: Limits,
    state: DecodeState,
    /// Offsets of the `\n` of each head line found so far (the terminating
    /// empty line excluded): the scan records them once, the parse reuses them.
    line_ends: Vec<usize>,
}

impl Default for StompCodec {
    fn default() -> StompCodec {
        StompCodec::new(Version::V1_2, Limits::default())
    }
}

impl StompCodec {
    /// A codec for `version` with `limits`.
    pub fn new(version: Version, limits: Limits) -> StompCodec {
        StompCodec {
            version,
            limits,
            state: DecodeState::Idle,
            line_ends: Vec::new(),
        }
    }

    /// The version whose escaping rules apply.
    pub fn version(&self) -> Version {
        self.version
    }

    /// Switches escaping rules, e.g. once CONNECTED named the version.
    pub fn set_version(&mut self, version: Version) {
        self.version = version;
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn escapes(&self, command: Command) -> bool {
        self.version != Version::V1_0 && !command.is_connect_like()
    }

    /// Builds command, headers and the first `content-length` from a complete
    /// head whose line ends (`\n` offsets, the terminating empty line
    /// excluded) are `ends`. Escaped fields are unescaped in place, so every
    /// header is a span of the head.
    fn parse_head(
        &self,
        mut head: BytesMut,
        ends: &[usize],
    ) -> Result<(Command, Headers, Option<usize>), CodecError> {
        let (command, first, rest) = parse_command(&head, ends)?;
        let escapes = self.escapes(command);
        // Offset of the next backslash at or after the current line (or the
        // head's length): one search finds the few escaped lines of a head.
        let next_backslash = |head: &[u8], from: usize| {
            memchr::memchr(b'\\', &head[from..]).map_or(head.len(), |off| from + off)
        };
        let mut backslash = if escapes {
            next_backslash(&head, first + 1)
        } else {
            head.len()
        };
        let mut fields = Vec::with_capacity(rest.len());
        let mut content_length = None;
        let mut pos = first + 1;
        for &nl in rest {
            let end = content_end(&head, pos, nl);
            let line = &head[pos..end];
            // Lines are short: a plain loop beats a SIMD search's set-up here.
            let colon = line.iter().position(|&b| b == b':').ok_or_else(|| {
                CodecError::MalformedHeader {
                    line: String::from_utf8_lossy(line).into_owned(),
                }
            })?;
            let (mut name_end, value_start, mut value_end) = (pos + colon, pos + colon + 1, end);
            if backslash < end {
                // Check the whole line before changing it, so an error can quote it.
                let invalid = |sequence| CodecError::InvalidEscape {
                    sequence,
                    line: String::from_utf8_lossy(line).into_owned(),
                };
                // Nothing before the first backslash needs looking at.
                let in_name = backslash < name_end;
                let value_from = backslash.max(value_start);
                if in_name {
                    escape::check(&head[backslash..name_end], self.version).map_err(invalid)?;
                }
                escape::check(&head[value_from..end], self.version).map_err(invalid)?;
                if in_name {
                    name_end =
                        backslash + escape::unescape_in_place(&mut head[backslash..name_end]);
                }
                value_end = value_from + escape::unescape_in_place(&mut head[value_from..end]);
                backslash = next_backslash(&head, nl + 1);
            }
            if content_length.is_none() && &head[pos..name_end] == b"content-length" {
                content_length = Some((value_start, value_end));
            }
            fields.push(HeadSpan {
                name: (pos, name_end),
                value: (value_start, value_end),
            });
            pos = nl + 1;
        }
        // Parsed after every line, so a malformed line is reported first.
        let content_length = match content_length {
            Some((start, end)) => Some(parse_content_length(&head[start..end])?),
            None => None,
        };
        Ok((
            command,
            Headers::from_head(head.freeze(), fields),
            content_length,
        ))
    }
}

/// Checks that `head` is UTF-8 and reads its command line: the command, the
/// end of that line, and the ends of the header lines after it.
fn parse_command<'e>(
    head: &[u8],
    ends: &'e [usize],
) -> Result<(Command, usize, &'e [usize]), CodecError> {
    if let Err(e) = std::str::from_utf8(head) {
        let line = head[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        return Err(CodecError::NotUtf8 { line });
    }
    let Some((&first, rest)) = ends.split_first() else {
        return Err(CodecError::UnknownCommand(String::new()));
    };
    let cmd_end = content_end(head, 0, first);
    let command = Command::from_bytes(&head[..cmd_end]).ok_or_else(|| {
        CodecError::UnknownCommand(String::from_utf8_lossy(&head[..cmd_end]).into_owned())
    })?;
    Ok((command, first, rest))
}

/// End of the content of the line from `start` to the `\n` at `nl`, without
/// its CR.
fn content_end(head: &[u8], start: usize, nl: usize) -> usize {
    if nl > start && head[nl - 1] == b'\r' {
        nl - 1
    } else {
        nl
    }
}

/// Scans for the end of the head from `scanned` on, recording line ends in
/// `ends`. Returns the offset where the body starts.
fn find_head_end(
    buf: &[u8],
    scanned: &mut usize,
    ends: &mut Vec<usize>,
    limits: Limits,
) -> Result<Option<usize>, CodecError> {
    let limit = limits.max_line_length;
    // A line may be one byte longer than the limit if that byte is its CR.
    let with_cr = limit.saturating_add(1);
    let mut line_start = ends.last().map_or(0, |&nl| nl + 1);
    let mut pos = *scanned;
    while let Some(off) = memchr::memchr(b'\n', &buf[pos..]) {
        let nl = pos + off;
        let len = nl - line_start;
        let empty = len == 0 || (len == 1 && buf[line_start] == b'\r');
        if empty {
            return Ok(Some(nl + 1));
        }
        if len > with_cr || (len == with_cr && buf[nl - 1] != b'\r') {
            return Err(CodecError::LineTooLong { limit });
        }
        ends.push(nl);
        // The first line is the command, not a header.
        if ends.len() - 1 > limits.max_headers {
            return Err(CodecError::TooManyHeaders {
                limit: limits.max_headers,
            });
        }
        line_start = nl + 1;
        pos = nl + 1;
    }
    if buf.len() - line_start > with_cr {
        return Err(CodecError::LineTooLong { limit });
    }
    *scanned = buf.len();
    Ok(None)
}

fn parse_content_length(value: &[u8]) -> Result<usize, CodecError> {
    let invalid = || CodecError::InvalidContentLength(String::from_utf8_lossy(value).into_owned());
    let digits = std::str::from_utf8(value).map_err(|_| invalid())?.trim();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    digits.parse::<usize>().map_err(|_| invalid())
}
