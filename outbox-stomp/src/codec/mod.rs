//! The STOMP wire format: bytes ⇄ [`Frame`], no sockets.
//!
//! [`StompCodec`] is a `tokio_util::codec` [`Decoder`] and [`Encoder`]. Decoding
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

pub(crate) mod escape;
mod frame;
mod headers;
#[cfg(test)]
mod tests;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

pub use crate::error::CodecError;
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

/// What one step of the decoder did.
enum Step {
    /// Moved to the next state: go on.
    Next,
    /// Needs more bytes.
    Wait,
    /// A complete frame.
    Frame(Frame),
}

impl StompCodec {
    /// Between frames: skips heart-beat EOLs, then starts a head.
    fn skip_heart_beats(
        &mut self,
        buf: &mut BytesMut,
        saw_eol: &mut bool,
    ) -> Result<Step, CodecError> {
        loop {
            match buf.first() {
                Some(b'\n') => {
                    buf.advance(1);
                    *saw_eol = true;
                }
                Some(b'\r') => match buf.get(1) {
                    Some(b'\n') => {
                        buf.advance(2);
                        *saw_eol = true;
                    }
                    Some(_) => return Err(CodecError::StrayCarriageReturn),
                    None => return Ok(Step::Wait),
                },
                Some(_) => break,
                None => return Ok(Step::Wait),
            }
        }
        self.line_ends.clear();
        self.state = DecodeState::Head { scanned: 0 };
        Ok(Step::Next)
    }

    /// Inside the head: once it is complete, parses it and moves to the body.
    fn decode_head(&mut self, buf: &mut BytesMut) -> Result<Step, CodecError> {
        let DecodeState::Head { scanned } = &mut self.state else {
            return Ok(Step::Next);
        };
        let body_start = match find_head_end(buf, scanned, &mut self.line_ends, self.limits) {
            Ok(Some(at)) => at,
            Ok(None) => return Ok(Step::Wait),
            Err(CodecError::LineTooLong { .. } | CodecError::TooManyHeaders { .. })
                if self.is_message_head(buf) =>
            {
                self.trim(buf);
                return Ok(Step::Next);
            }
            Err(e) => {
                self.state = DecodeState::Idle;
                return Err(e);
            }
        };
        let head = buf.split_to(body_start);
        self.state = DecodeState::Idle;
        let ends = std::mem::take(&mut self.line_ends);
        let parsed = self.parse_head(head, &ends);
        self.line_ends = ends;
        let (command, headers, content_length) = parsed?;
        self.start_body(buf, command, headers, content_length, Trimmed::default())
    }

    /// After a parsed head: waits for the body, or reads past it if it is a
    /// MESSAGE's over the limit.
    fn start_body(
        &mut self,
        buf: &mut BytesMut,
        command: Command,
        headers: Headers,
        content_length: Option<usize>,
        trimmed: Trimmed,
    ) -> Result<Step, CodecError> {
        if let Some(length) = content_length {
            if length > self.limits.max_body {
                if command == Command::Message {
                    // Read past it: the headers are enough to set it aside.
                    self.state = DecodeState::Skip {
                        command,
                        headers,
                        content_length,
                        skipped: 0,
                        trimmed,
                    };
                    return Ok(Step::Next);
                }
                return Err(CodecError::BodyTooLarge {
                    length,
                    limit: self.limits.max_body,
                });
            }
            buf.reserve((length + 1).saturating_sub(buf.len()));
        }
        self.state = DecodeState::Body {
            command,
            headers,
            content_length,
            scanned: 0,
            trimmed,
        };
        Ok(Step::Next)
    }

    /// True when the head in `buf` is a MESSAGE's: its command line is
    /// complete (its end is the first of `line_ends`) and says so.
    fn is_message_head(&self, buf: &[u8]) -> bool {
        self.line_ends
            .first()
            .is_some_and(|&nl| &buf[..content_end(buf, 0, nl)] == b"MESSAGE")
    }

    /// Starts reading a MESSAGE's head over the limits again, one line at a
    /// time: its command line is kept, its header lines are read anew.
    fn trim(&mut self, buf: &mut BytesMut) {
        let Some(&first) = self.line_ends.first() else {
            return;
        };
        self.line_ends.clear();
        self.state = DecodeState::Trim(Box::new(TrimmedHead {
            head: buf.split_to(first + 1),
            ends: vec![first],
            settled: 0,
            scanned: 0,
            dropping: false,
            trimmed: Trimmed::default(),
        }));
    }

    /// Inside a MESSAGE's head over the limits: keeps the header lines within
    /// `max_line_length`, up to `max_headers` of them and past that the first
    /// of each of the `SETTLING_HEADERS`; drops the others, a line over the
    /// length limit as its bytes arrive. Nothing more than about the limits
    /// is ever held. At the head's end, the lines kept are parsed as a head.
    fn trim_head(&mut self, buf: &mut BytesMut) -> Result<Step, CodecError> {
        let limits = self.limits;
        let DecodeState::Trim(trim) = &mut self.state else {
            return Ok(Step::Next);
        };
        // A line may be one byte longer than the limit if that byte is its CR.
        let with_cr = limits.max_line_length.saturating_add(1);
        loop {
            let Some(off) = memchr::memchr(b'\n', &buf[trim.scanned..]) else {
                if !trim.dropping && buf.len() > with_cr {
                    trim.trimmed.long_lines += 1;
                    trim.dropping = true;
                }
                if trim.dropping {
                    buf.clear();
                    trim.scanned = 0;
                } else {
                    trim.scanned = buf.len();
                }
                return Ok(Step::Wait);
            };
            let nl = trim.scanned + off;
            trim.scanned = 0;
            let line = buf.split_to(nl + 1);
            if std::mem::take(&mut trim.dropping) {
                continue;
            }
            let content = &line[..content_end(&line, 0, nl)];
            if content.is_empty() {
                break;
            }
            if nl > with_cr || (nl == with_cr && line[nl - 1] != b'\r') {
                trim.trimmed.long_lines += 1;
                continue;
            }
            let name = content
                .iter()
                .position(|&b| b == b':')
                .map_or(content, |colon| &content[..colon]);
            // Escapes never make one of these names, so the raw name is the name.
            let settling = SETTLING_HEADERS
                .iter()
                .position(|kept| kept.as_bytes() == name)
                .map(|i| 1u16 << i);
            let within_count = trim.ends.len() - 1 < limits.max_headers;
            let first_of_its_name = settling.is_some_and(|bit| trim.settled & bit == 0);
            if within_count || first_of_its_name {
                trim.settled |= settling.unwrap_or(0);
                trim.ends.push(trim.head.len() + nl);
                trim.head.extend_from_slice(&line);
            } else {
                trim.trimmed.extra_headers += 1;
            }
        }
        let DecodeState::Trim(trim) = std::mem::replace(&mut self.state, DecodeState::Idle) else {
            return Ok(Step::Next);
        };
        let TrimmedHead {
            mut head,
            ends,
            trimmed,
            ..
        } = *trim;
        head.put_u8(b'\n');
        let (command, headers, content_length) = self.parse_head(head, &ends)?;
        self.start_body(buf, command, headers, content_length, trimmed)
    }

    /// What was left out of a MESSAGE: its body, if it was read past, and
    /// the header lines `trimmed` from its head.
    fn oversize(&self, body: Option<usize>, trimmed: Trimmed) -> Oversize {
        Oversize {
            body,
            long_lines: trimmed.long_lines,
            extra_headers: trimmed.extra_headers,
            limits: self.limits,
        }
    }

    /// Bytes of a head held outside the read buffer (only while trimming).
    #[cfg(test)]
    fn held(&self) -> usize {
        match &self.state {
            DecodeState::Trim(trim) => trim.head.len(),
            _ => 0,
        }
    }

    /// Inside the body: once it and its NUL are there, the frame is complete.
    fn decode_body(&mut self, buf: &mut BytesMut) -> Result<Step, CodecError> {
        let DecodeState::Body {
            content_length,
            scanned,
            ..
        } = &mut self.state
        else {
            return Ok(Step::Next);
        };
        let too_large = |length, limit| CodecError::BodyTooLarge { length, limit };
        let body_len = match *content_length {
            Some(length) if buf.len() <= length => return Ok(Step::Wait),
            Some(length) if buf[length] != 0 => {
                self.state = DecodeState::Idle;
                return Err(CodecError::MissingNul {
                    content_length: length,
                });
            }
            Some(length) => length,
            None => match memchr::memchr(0, &buf[*scanned..]) {
                Some(off) => *scanned + off,
                None if buf.len() > self.limits.max_body => {
                    let length = buf.len();
                    if let DecodeState::Body {
                        command: Command::Message,
                        ..
                    } = self.state
                    {
                        self.skip();
                        return Ok(Step::Next);
                    }
                    self.state = DecodeState::Idle;
                    return Err(too_large(length, self.limits.max_body));
                }
                None => {
                    *scanned = buf.len();
                    return Ok(Step::Wait);
                }
            },
        };
        if body_len > self.limits.max_body {
            if let DecodeState::Body {
                command: Command::Message,
                ..
            } = self.state
            {
                // Already here in full: dropped all the same.
                self.skip();
                return Ok(Step::Next);
            }
            self.state = DecodeState::Idle;
            return Err(too_large(body_len, self.limits.max_body));
        }
        let body = buf.split_to(body_len).freeze();
        buf.advance(1);
        match std::mem::replace(&mut self.state, DecodeState::Idle) {
            DecodeState::Body {
                command,
                headers,
                trimmed,
                ..
            } if !trimmed.is_empty() => Ok(Step::Frame(Frame::oversized(
                command,
                headers,
                body,
                self.oversize(None, trimmed),
            ))),
            DecodeState::Body {
                command, headers, ..
            } => Ok(Step::Frame(Frame::from_parts(command, headers, body))),
            _ => Ok(Step::Next),
        }
    }
}

impl StompCodec {
    /// Turns the body being read into one being read past.
    fn skip(&mut self) {
        if let DecodeState::Body {
            command,
            headers,
            content_length,
            trimmed,
            ..
        } = std::mem::replace(&mut self.state, DecodeState::Idle)
        {
            self.state = DecodeState::Skip {
                command,
                headers,
                content_length,
                skipped: 0,
                trimmed,
            };
        }
    }

    /// Inside a body over the limit: discards its bytes as they arrive; once
    /// its end is read, the frame comes out with its headers, an empty body
    /// and an [`Oversize`] marker.
    fn skip_body(&mut self, buf: &mut BytesMut) -> Result<Step, CodecError> {
        let DecodeState::Skip {
            content_length,
            skipped,
            ..
        } = &mut self.state
        else {
            return Ok(Step::Next);
        };
        let length = match *content_length {
            Some(length) => {
                let take = (length - *skipped).min(buf.len());
                buf.advance(take);
                *skipped += take;
                match buf.first() {
                    None => return Ok(Step::Wait),
                    Some(0) => length,
                    Some(_) => {
                        self.state = DecodeState::Idle;
                        return Err(CodecError::MissingNul {
                            content_length: length,
                        });
                    }
                }
            }
            None => match memchr::memchr(0, buf) {
                Some(off) => {
                    buf.advance(off);
                    *skipped = skipped.saturating_add(off);
                    *skipped
                }
                None => {
                    *skipped = skipped.saturating_add(buf.len());
                    buf.clear();
                    return Ok(Step::Wait);
                }
            },
        };
        buf.advance(1);
        match std::mem::replace(&mut self.state, DecodeState::Idle) {
            DecodeState::Skip {
                command,
                headers,
                trimmed,
                ..
            } => Ok(Step::Frame(Frame::oversized(
                command,
                headers,
                Bytes::new(),
                self.oversize(Some(length), trimmed),
            ))),
            _ => Ok(Step::Next),
        }
    }
}

impl Decoder for StompCodec {
    type Item = Received;
    type Error = CodecError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Received>, CodecError> {
        let mut saw_eol = false;
        loop {
            let step = match self.state {
                DecodeState::Idle => self.skip_heart_beats(buf, &mut saw_eol)?,
                DecodeState::Head { .. } => self.decode_head(buf)?,
                DecodeState::Trim(_) => self.trim_head(buf)?,
                DecodeState::Body { .. } => self.decode_body(buf)?,
                DecodeState::Skip { .. } => self.skip_body(buf)?,
            };
            match step {
                Step::Next => {}
                // Heart-beats are reported only if no frame follows yet.
                Step::Wait => return Ok(saw_eol.then_some(Received::HeartBeat)),
                Step::Frame(frame) => return Ok(Some(Received::Frame(frame))),
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Received>, CodecError> {
        match self.decode(buf)? {
            Some(item) => Ok(Some(item)),
            None => {
                let in_frame = !matches!(self.state, DecodeState::Idle);
                if buf.is_empty() && !in_frame {
                    Ok(None)
                } else {
                    let buffered = buf.len();
                    buf.clear();
                    self.state = DecodeState::Idle;
                    Err(CodecError::TruncatedFrame { buffered })
                }
            }
        }
    }
}

impl Encoder<&Frame> for StompCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        let command = frame.command();
        let escapes = self.escapes(command);
        let body = frame.body();
        let mut size = command.as_str().len() + body.len() + 32;
        for (n, v) in frame.headers().iter() {
            size += n.len() + v.len() + 2;
        }
        dst.reserve(size);
        dst.put_slice(command.as_str().as_bytes());
        dst.put_u8(b'\n');
        for (name, value) in frame.headers().iter() {
            if name == "content-length" {
                continue;
            }
            if escapes {
                escape::escape_into(name, self.version, dst);
                dst.put_u8(b':');
                escape::escape_into(value, self.version, dst);
            } else {
                check_raw(command, name, value)?;
                dst.put_slice(name.as_bytes());
                dst.put_u8(b':');
                dst.put_slice(value.as_bytes());
            }
            dst.put_u8(b'\n');
        }
        if !body.is_empty() {
            dst.put_slice(b"content-length:");
            let digits = itoa_buf(body.len());
            dst.put_slice(digits.as_bytes());
            dst.put_u8(b'\n');
        }
        dst.put_u8(b'\n');
        dst.put_slice(body);
        dst.put_u8(0);
        Ok(())
    }
}

impl Encoder<Frame> for StompCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode(&frame, dst)
    }
}

/// Checks that `frame` can be written in `version`: a header that must go
/// out without escaping (STOMP 1.0, CONNECT) cannot hold a line feed. The
/// encoder makes the same check; a caller makes it first to refuse one
/// frame before it is queued.
pub(crate) fn encodable(version: Version, frame: &Frame) -> Result<(), CodecError> {
    let command = frame.command();
    if version != Version::V1_0 && !command.is_connect_like() {
        return Ok(());
    }
    for (name, value) in frame.headers().iter() {
        if name != "content-length" {
            check_raw(command, name, value)?;
        }
    }
    Ok(())
}

/// Checks a header that must be written without escaping.
fn check_raw(command: Command, name: &str, value: &str) -> Result<(), CodecError> {
    let fail = |reason| {
        Err(CodecError::UnencodableHeader {
            command,
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return fail("empty header name");
    }
    if name.bytes().any(|b| matches!(b, b'\n' | b'\r' | b':')) {
        return fail("a name without escaping cannot contain ':', CR or LF");
    }
    if value.bytes().any(|b| b == b'\n') || value.ends_with('\r') {
        return fail("a value without escaping cannot contain LF or end in CR");
    }
    Ok(())
}

/// Decimal digits of `n` without allocating.
struct Digits {
    buf: [u8; 20],
    start: usize,
}

impl Digits {
    fn as_bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

fn itoa_buf(mut n: usize) -> Digits {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    Digits { buf, start: i }
}
