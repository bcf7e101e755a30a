//! The decoder's steps, one per state: heart-beats between frames, the head,
//! a head over the limits read again line by line, the body, and a body over
//! the limit read past.

use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::Decoder;

use super::*;

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

    /// A body of `length` bytes, over the limit: a MESSAGE's is read past,
    /// any other frame's is an error.
    fn body_over_limit(&mut self, length: usize) -> Result<Step, CodecError> {
        if let DecodeState::Body {
            command: Command::Message,
            ..
        } = self.state
        {
            self.skip();
            return Ok(Step::Next);
        }
        self.state = DecodeState::Idle;
        Err(CodecError::BodyTooLarge {
            length,
            limit: self.limits.max_body,
        })
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
                    return self.body_over_limit(buf.len());
                }
                None => {
                    *scanned = buf.len();
                    return Ok(Step::Wait);
                }
            },
        };
        if body_len > self.limits.max_body {
            // Already here in full: dropped all the same.
            return self.body_over_limit(body_len);
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

#[cfg(test)]
impl StompCodec {
    /// Bytes of a head held outside the read buffer (only while trimming).
    pub(super) fn held(&self) -> usize {
        match &self.state {
            DecodeState::Trim(trim) => trim.head.len(),
            _ => 0,
        }
    }
}
