//! A bare STOMP exchange over any byte stream: write frames or raw bytes, read
//! whole frames back.
//!
//! This is a test instrument, not a client. It applies no escaping, adds no
//! headers the caller did not write, keeps no session state and does no
//! heart-beating; the harness uses it to probe broker readiness, and tests use it
//! to talk to a broker without going through the crate under test.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{Credentials, HarnessError};

/// Frames larger than this are refused rather than buffered without end.
const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// How long [`RawStomp::read_frame`] waits unless told otherwise.
const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`RawStomp::connect`] waits for the TCP handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One STOMP frame as it came off the wire.
///
/// Header names and values are not unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// The command line, e.g. `CONNECTED`, `MESSAGE`, `RECEIPT` or `ERROR`.
    pub command: String,
    /// Headers in wire order; duplicates are kept.
    pub headers: Vec<(String, String)>,
    /// The body: `content-length` bytes if that header is present, otherwise
    /// everything up to the terminating NUL.
    pub body: Vec<u8>,
}

impl RawFrame {
    /// The value of the first header called `name` (in STOMP the first one wins).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The body as text, with invalid UTF-8 replaced.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw STOMP exchange over a stream such as a [`TcpStream`] or a TLS stream.
#[derive(Debug)]
pub struct RawStomp<S = TcpStream> {
    stream: S,
    buffer: Vec<u8>,
    read_timeout: Duration,
}

impl RawStomp<TcpStream> {
    /// Opens a TCP connection to `addr`.
    pub async fn connect(addr: SocketAddr) -> Result<Self, HarnessError> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| HarnessError::Timeout {
                what: format!("a TCP connection to {addr}"),
                after: CONNECT_TIMEOUT,
            })?
            .map_err(|e| HarnessError::io(format!("connecting to {addr}"), e))?;
        Ok(Self::new(stream))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawStomp<S> {
    /// Wraps an already connected stream.
    pub fn new(stream: S) -> Self {
        RawStomp {
            stream,
            buffer: Vec::new(),
            read_timeout: DEFAULT_READ_TIMEOUT,
        }
    }

    /// Sets how long [`read_frame`](Self::read_frame) waits for a whole frame
    /// (30 s unless changed).
    pub fn set_read_timeout(&mut self, timeout: Duration) {
        self.read_timeout = timeout;
    }

    /// Writes `bytes` exactly as given.
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> Result<(), HarnessError> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|e| HarnessError::io("writing to the STOMP connection", e))?;
        self.stream
            .flush()
            .await
            .map_err(|e| HarnessError::io("flushing the STOMP connection", e))
    }

    /// Writes one frame: the command, the headers as given (nothing is added or
    /// escaped), a blank line, the body and a NUL.
    pub async fn send_frame(
        &mut self,
        command: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(), HarnessError> {
        let mut frame = Vec::with_capacity(64 + body.len());
        frame.extend_from_slice(command.as_bytes());
        frame.push(b'\n');
        for (name, value) in headers {
            frame.extend_from_slice(name.as_bytes());
            frame.push(b':');
            frame.extend_from_slice(value.as_bytes());
            frame.push(b'\n');
        }
        frame.push(b'\n');
        frame.extend_from_slice(body);
        frame.push(0);
        self.send_bytes(&frame).await
    }

    /// Sends a STOMP 1.2 `CONNECT` (`host:localhost`, no heart-beats, with
    /// `login`/`passcode` when `credentials` are given) and returns the broker's
    /// answer, which is `CONNECTED` or `ERROR`.
    pub async fn handshake(
        &mut self,
        credentials: Option<&Credentials>,
    ) -> Result<RawFrame, HarnessError> {
        let mut headers = vec![
            ("accept-version", "1.2"),
            ("host", "localhost"),
            ("heart-beat", "0,0"),
        ];
        if let Some(credentials) = credentials {
            headers.push(("login", credentials.login()));
            headers.push(("passcode", credentials.passcode()));
        }
        self.send_frame("CONNECT", &headers, b"").await?;
        self.read_frame().await
    }

    /// Reads the next frame, skipping heart-beat end-of-lines before it.
    ///
    /// Fails if the connection closes first, the frame is malformed or larger
    /// than 16 MiB, or no whole frame arrives within the read timeout.
    pub async fn read_frame(&mut self) -> Result<RawFrame, HarnessError> {
        let timeout = self.read_timeout;
        tokio::time::timeout(timeout, self.read_frame_unbounded())
            .await
            .map_err(|_| HarnessError::Timeout {
                what: "a STOMP frame".into(),
                after: timeout,
            })?
    }

    /// The stream, for example to shut it down or hand it on.
    pub fn into_inner(self) -> S {
        self.stream
    }

    async fn read_frame_unbounded(&mut self) -> Result<RawFrame, HarnessError> {
        loop {
            if let Some((frame, used)) = parse_frame(&self.buffer)? {
                self.buffer.drain(..used);
                return Ok(frame);
            }
            if self.buffer.len() > MAX_FRAME_BYTES {
                return Err(HarnessError::Stomp(format!(
                    "frame exceeds {MAX_FRAME_BYTES} bytes"
                )));
            }
            let mut chunk = [0u8; 8192];
            let read = self
                .stream
                .read(&mut chunk)
                .await
                .map_err(|e| HarnessError::io("reading from the STOMP connection", e))?;
            if read == 0 {
                return Err(HarnessError::Stomp(format!(
                    "connection closed by the other side{}",
                    if self.buffer.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " in the middle of a frame: {:?}",
                            String::from_utf8_lossy(&self.buffer)
                        )
                    }
                )));
            }
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }
}

/// Parses one frame from the front of `buf`: `Ok(None)` if more bytes are
/// needed, otherwise the frame and how many bytes it used (leading EOLs included).
fn parse_frame(buf: &[u8]) -> Result<Option<(RawFrame, usize)>, HarnessError> {
    let start = buf
        .iter()
        .position(|&b| b != b'\n' && b != b'\r')
        .unwrap_or(buf.len());
    let rest = &buf[start..];
    // Headers end at the first empty line.
    let mut lines = Vec::new();
    let mut line_start = 0;
    let body_start = loop {
        let Some(offset) = rest[line_start..].iter().position(|&b| b == b'\n') else {
            return Ok(None);
        };
        let end = line_start + offset;
        let line = rest[line_start..end]
            .strip_suffix(b"\r")
            .unwrap_or(&rest[line_start..end]);
        line_start = end + 1;
        if line.is_empty() {
            break line_start;
        }
        lines.push(line);
    };
    let Some((command, header_lines)) = lines.split_first() else {
        return Err(HarnessError::Stomp("frame without a command line".into()));
    };
    let command = text(command)?;
    let mut headers = Vec::with_capacity(header_lines.len());
    for line in header_lines {
        let line = text(line)?;
        let Some((name, value)) = line.split_once(':') else {
            return Err(HarnessError::Stomp(format!(
                "{command} header without a colon: {line:?}"
            )));
        };
        headers.push((name.to_owned(), value.to_owned()));
    }
    let content_length = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .map(|(_, value)| {
            value
                .parse::<usize>()
                .map_err(|_| HarnessError::Stomp(format!("{command} has content-length {value:?}")))
        })
        .transpose()?;
    let body_region = &rest[body_start..];
    let body_len = match content_length {
        Some(len) if body_region.len() <= len => return Ok(None),
        Some(len) if body_region[len] != 0 => {
            return Err(HarnessError::Stomp(format!(
                "{command} body is not followed by NUL after content-length {len}"
            )));
        }
        Some(len) => len,
        None => match body_region.iter().position(|&b| b == 0) {
            Some(len) => len,
            None => return Ok(None),
        },
    };
    let frame = RawFrame {
        command,
        headers,
        body: body_region[..body_len].to_vec(),
    };
    Ok(Some((frame, start + body_start + body_len + 1)))
}

fn text(bytes: &[u8]) -> Result<String, HarnessError> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| HarnessError::Stomp(format!("header block is not UTF-8: {bytes:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(bytes: &[u8]) -> (RawFrame, usize) {
        parse_frame(bytes)
            .expect("well-formed")
            .expect("complete frame")
    }

    #[test]
    fn a_connected_frame_after_heart_beats_is_parsed() {
        let wire = b"\n\r\nCONNECTED\nversion:1.2\nserver:ActiveMQ/5.17.2\n\n\0rest";
        let (frame, used) = parsed(wire);
        assert_eq!(frame.command, "CONNECTED");
        assert_eq!(frame.header("version"), Some("1.2"));
        assert_eq!(frame.header("server"), Some("ActiveMQ/5.17.2"));
        assert!(frame.body.is_empty());
        assert_eq!(&wire[used..], b"rest");
    }

    #[test]
    fn content_length_bodies_may_contain_nul() {
        let (frame, used) = parsed(b"MESSAGE\ncontent-length:3\n\na\0b\0");
        assert_eq!(frame.body, b"a\0b");
        assert_eq!(used, 30);
    }

    #[test]
    fn crlf_line_endings_are_accepted() {
        let (frame, _) = parsed(b"RECEIPT\r\nreceipt-id:7\r\n\r\n\0");
        assert_eq!(frame.header("receipt-id"), Some("7"));
    }

    #[test]
    fn the_first_duplicate_header_wins() {
        let (frame, _) = parsed(b"MESSAGE\nfoo:1\nfoo:2\n\n\0");
        assert_eq!(frame.header("foo"), Some("1"));
        assert_eq!(frame.headers.len(), 2);
    }

    #[test]
    fn partial_frames_ask_for_more_bytes() {
        let whole: &[u8] = b"MESSAGE\ncontent-length:5\n\nhello\0";
        for cut in 0..whole.len() {
            assert!(
                parse_frame(&whole[..cut]).expect("no error").is_none(),
                "cut at {cut}"
            );
        }
        assert!(
            parse_frame(b"ERROR\nmessage:x\n\nno nul yet")
                .expect("no error")
                .is_none()
        );
    }

    #[test]
    fn malformed_frames_are_errors() {
        assert!(parse_frame(b"MESSAGE\nno-colon\n\n\0").is_err());
        assert!(parse_frame(b"MESSAGE\ncontent-length:x\n\n\0").is_err());
        assert!(parse_frame(b"MESSAGE\ncontent-length:1\n\nab\0").is_err());
    }
}
