//! The typed STOMP frame: command, ordered headers and body.

use std::fmt;

use bytes::Bytes;

use super::Limits;
use super::headers::{HeaderText, Headers};

/// A STOMP protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    /// STOMP 1.0: no header escaping.
    V1_0,
    /// STOMP 1.1: escapes `\\`, `\n` and `:` in headers.
    V1_1,
    /// STOMP 1.2: also escapes `\r`; ACK/NACK carry the MESSAGE's `ack` value.
    V1_2,
}

impl Version {
    /// All versions, oldest first.
    pub const ALL: [Version; 3] = [Version::V1_0, Version::V1_1, Version::V1_2];

    /// The version as written in `accept-version` and `version` headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1_0 => "1.0",
            Version::V1_1 => "1.1",
            Version::V1_2 => "1.2",
        }
    }

    /// Parses `1.0`, `1.1` or `1.2`.
    pub fn parse(text: &str) -> Option<Version> {
        match text.trim() {
            "1.0" => Some(Version::V1_0),
            "1.1" => Some(Version::V1_1),
            "1.2" => Some(Version::V1_2),
            _ => None,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A STOMP command, client or server side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// Client: open a session (all versions).
    Connect,
    /// Client: open a session (1.1+ spelling of CONNECT).
    Stomp,
    /// Client: send a message to a destination.
    Send,
    /// Client: subscribe to a destination.
    Subscribe,
    /// Client: end a subscription.
    Unsubscribe,
    /// Client: start a transaction.
    Begin,
    /// Client: commit a transaction.
    Commit,
    /// Client: roll back a transaction.
    Abort,
    /// Client: acknowledge a message.
    Ack,
    /// Client: reject a message (on ActiveMQ: sent to the dead-letter queue at once).
    Nack,
    /// Client: close the session.
    Disconnect,
    /// Server: the session is open.
    Connected,
    /// Server: a message for a subscription.
    Message,
    /// Server: confirms a frame that asked for a receipt.
    Receipt,
    /// Server: something went wrong; the server closes the connection after it.
    Error,
}

impl Command {
    /// The command as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Connect => "CONNECT",
            Command::Stomp => "STOMP",
            Command::Send => "SEND",
            Command::Subscribe => "SUBSCRIBE",
            Command::Unsubscribe => "UNSUBSCRIBE",
            Command::Begin => "BEGIN",
            Command::Commit => "COMMIT",
            Command::Abort => "ABORT",
            Command::Ack => "ACK",
            Command::Nack => "NACK",
            Command::Disconnect => "DISCONNECT",
            Command::Connected => "CONNECTED",
            Command::Message => "MESSAGE",
            Command::Receipt => "RECEIPT",
            Command::Error => "ERROR",
        }
    }

    /// Recognises a command line (without its line ending).
    pub fn from_bytes(line: &[u8]) -> Option<Command> {
        Some(match line {
            b"MESSAGE" => Command::Message,
            b"RECEIPT" => Command::Receipt,
            b"SEND" => Command::Send,
            b"ACK" => Command::Ack,
            b"NACK" => Command::Nack,
            b"CONNECTED" => Command::Connected,
            b"ERROR" => Command::Error,
            b"SUBSCRIBE" => Command::Subscribe,
            b"UNSUBSCRIBE" => Command::Unsubscribe,
            b"BEGIN" => Command::Begin,
            b"COMMIT" => Command::Commit,
            b"ABORT" => Command::Abort,
            b"CONNECT" => Command::Connect,
            b"STOMP" => Command::Stomp,
            b"DISCONNECT" => Command::Disconnect,
            _ => return None,
        })
    }

    /// CONNECT, STOMP and CONNECTED frames never escape their headers.
    pub fn is_connect_like(self) -> bool {
        matches!(self, Command::Connect | Command::Stomp | Command::Connected)
    }

    /// True for the commands a server sends.
    pub fn is_server(self) -> bool {
        matches!(
            self,
            Command::Connected | Command::Message | Command::Receipt | Command::Error
        )
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A STOMP frame: a command, ordered headers and a binary body.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    command: Command,
    headers: Headers,
    body: Bytes,
    /// What the decoder left out, for a MESSAGE over its limits.
    oversize: Option<Oversize>,
}

/// What the decoder left out of a MESSAGE beyond its [`Limits`]: read past
/// without being buffered, so that its receiver can acknowledge it and set it
/// aside instead of losing the connection over it.
///
/// - A body over [`Limits::max_body`] is dropped: the frame's body is empty.
/// - Header lines longer than [`Limits::max_line_length`] are dropped with
///   their values, and header lines past the first [`Limits::max_headers`]
///   are dropped too. The headers a message is routed, acknowledged and set
///   aside by are kept wherever they appear in the head (the first of each
///   name): `message-id`, `ack`, `subscription`, `destination`,
///   `content-length`, `content-type`, `event-id`, `event-type`, `event-key`,
///   `event-time` and `redelivered`, unless their own line is over the
///   length limit. The body is kept when it is within its limit.
///
/// Its [`Display`](fmt::Display) names each limit that was exceeded and by
/// how much, for a parked message's reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Oversize {
    /// The body's length in bytes (its `content-length`, or what was read up
    /// to its NUL) when it was over the limit and dropped; `None` when the
    /// body is whole.
    pub body: Option<usize>,
    /// Header lines over the line length limit, dropped.
    pub long_lines: usize,
    /// Header lines past the header count limit, dropped.
    pub extra_headers: usize,
    /// The limits the frame was decoded with.
    pub limits: Limits,
}

impl fmt::Display for Oversize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut separator = "";
        if let Some(length) = self.body {
            write!(
                f,
                "body of {length} bytes over the consumer's limit of {} bytes (Limits::max_body); dropped unread",
                self.limits.max_body
            )?;
            separator = "; ";
        }
        if self.long_lines > 0 {
            write!(
                f,
                "{separator}{} header line(s) longer than the consumer's limit of {} bytes (Limits::max_line_length); dropped",
                self.long_lines, self.limits.max_line_length
            )?;
            separator = "; ";
        }
        if self.extra_headers > 0 {
            write!(
                f,
                "{separator}{} header line(s) past the consumer's limit of {} headers (Limits::max_headers); dropped",
                self.extra_headers, self.limits.max_headers
            )?;
        }
        Ok(())
    }
}

impl Frame {
    /// A frame with no headers and an empty body.
    pub fn new(command: Command) -> Frame {
        Frame {
            command,
            headers: Headers::new(),
            body: Bytes::new(),
            oversize: None,
        }
    }

    /// Assembles a frame from its parts.
    pub fn from_parts(command: Command, headers: Headers, body: Bytes) -> Frame {
        Frame {
            command,
            headers,
            body,
            oversize: None,
        }
    }

    /// A frame the decoder left `oversize` out of for being over its limits.
    pub(crate) fn oversized(
        command: Command,
        headers: Headers,
        body: Bytes,
        oversize: Oversize,
    ) -> Frame {
        Frame {
            oversize: Some(oversize),
            ..Frame::from_parts(command, headers, body)
        }
    }

    /// What the decoder left out of this frame, if it was over its limits:
    /// its body, or some of its header lines, or both.
    pub fn oversize(&self) -> Option<&Oversize> {
        self.oversize.as_ref()
    }

    /// Splits the frame into its parts.
    pub fn into_parts(self) -> (Command, Headers, Bytes) {
        (self.command, self.headers, self.body)
    }

    /// Adds a header (builder style).
    pub fn with_header(
        mut self,
        name: impl Into<HeaderText>,
        value: impl Into<HeaderText>,
    ) -> Frame {
        self.headers.push(name, value);
        self
    }

    /// Sets the body (builder style).
    pub fn with_body(mut self, body: impl Into<Bytes>) -> Frame {
        self.body = body.into();
        self
    }

    /// The command.
    pub fn command(&self) -> Command {
        self.command
    }

    /// The headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The headers, for changes.
    pub fn headers_mut(&mut self) -> &mut Headers {
        &mut self.headers
    }

    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    /// The body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Takes the body out of the frame.
    pub fn into_body(self) -> Bytes {
        self.body
    }

    /// CONNECT (or STOMP) for the given versions, virtual host and heart-beat
    /// `(send_ms, receive_ms)`. Credentials are added with [`Frame::with_header`].
    pub fn connect(
        accept: &[Version],
        host: impl Into<HeaderText>,
        heart_beat: (u64, u64),
    ) -> Frame {
        let versions = accept
            .iter()
            .map(|v| v.as_str())
            .collect::<Vec<_>>()
            .join(",");
        Frame::new(Command::Connect)
            .with_header("accept-version", versions)
            .with_header("host", host)
            .with_header("heart-beat", format!("{},{}", heart_beat.0, heart_beat.1))
    }

    /// SEND to `destination` with `body`.
    pub fn send(destination: impl Into<HeaderText>, body: impl Into<Bytes>) -> Frame {
        Frame::new(Command::Send)
            .with_header("destination", destination)
            .with_body(body)
    }

    /// SUBSCRIBE to `destination` under subscription `id` with ack mode `ack`
    /// (`auto`, `client` or `client-individual`).
    pub fn subscribe(
        destination: impl Into<HeaderText>,
        id: impl Into<HeaderText>,
        ack: impl Into<HeaderText>,
    ) -> Frame {
        Frame::new(Command::Subscribe)
            .with_header("destination", destination)
            .with_header("id", id)
            .with_header("ack", ack)
    }

    /// UNSUBSCRIBE subscription `id`.
    pub fn unsubscribe(id: impl Into<HeaderText>) -> Frame {
        Frame::new(Command::Unsubscribe).with_header("id", id)
    }

    /// BEGIN transaction `tx`.
    pub fn begin(tx: impl Into<HeaderText>) -> Frame {
        Frame::new(Command::Begin).with_header("transaction", tx)
    }

    /// COMMIT transaction `tx`.
    pub fn commit(tx: impl Into<HeaderText>) -> Frame {
        Frame::new(Command::Commit).with_header("transaction", tx)
    }

    /// ABORT transaction `tx`.
    pub fn abort(tx: impl Into<HeaderText>) -> Frame {
        Frame::new(Command::Abort).with_header("transaction", tx)
    }

    /// DISCONNECT.
    pub fn disconnect() -> Frame {
        Frame::new(Command::Disconnect)
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("command", &self.command)
            .field("headers", &self.headers)
            .field("body_len", &self.body.len())
            .field("oversize", &self.oversize)
            .finish()
    }
}
