//! Errors of the STOMP crate, layered: codec → session → connection.

use crate::codec::{Command, Frame, Version};

/// Why bytes could not be turned into a frame, or a frame into bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// Reading or writing the socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The command line names no STOMP command.
    #[error("unknown STOMP command {0:?}")]
    UnknownCommand(String),
    /// A command or header line is longer than the limit.
    #[error("frame line longer than the limit of {limit} bytes (Limits::max_line_length)")]
    LineTooLong {
        /// The configured limit.
        limit: usize,
    },
    /// The frame has more header lines than the limit.
    #[error("frame has more than {limit} headers (Limits::max_headers)")]
    TooManyHeaders {
        /// The configured limit.
        limit: usize,
    },
    /// The body is larger than the limit.
    #[error("frame body of {length} bytes exceeds the limit of {limit} bytes (Limits::max_body)")]
    BodyTooLarge {
        /// The announced `content-length`, or the bytes seen so far without a NUL.
        length: usize,
        /// The configured limit.
        limit: usize,
    },
    /// `content-length` is not a decimal number.
    #[error("invalid content-length header {0:?}")]
    InvalidContentLength(String),
    /// The byte after a `content-length` body is not NUL.
    #[error("frame body of content-length {content_length} is not followed by a NUL byte")]
    MissingNul {
        /// The announced `content-length`.
        content_length: usize,
    },
    /// A header line has no colon.
    #[error("header line {line:?} has no ':' separator")]
    MalformedHeader {
        /// The offending line (lossy UTF-8).
        line: String,
    },
    /// An escape sequence the negotiated version does not define.
    #[error("undefined escape sequence {sequence:?} in header {line:?}")]
    InvalidEscape {
        /// The two bytes of the sequence (lossy; a trailing backslash shows alone).
        sequence: String,
        /// The header line it appeared in (lossy UTF-8).
        line: String,
    },
    /// A frame line is not valid UTF-8.
    #[error("line {line} of the frame head is not valid UTF-8")]
    NotUtf8 {
        /// Zero-based line number (0 is the command line).
        line: usize,
    },
    /// A carriage return not followed by a line feed between frames or at a line end.
    #[error("stray carriage return in the frame stream")]
    StrayCarriageReturn,
    /// A header cannot be written in the frame's encoding (e.g. a newline in a
    /// STOMP 1.0 or CONNECT header).
    #[error("header {name:?} of a {command} frame cannot be encoded: {reason}")]
    UnencodableHeader {
        /// The frame's command.
        command: Command,
        /// The header name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// The stream ended inside a frame.
    #[error("connection closed inside a frame ({buffered} bytes buffered)")]
    TruncatedFrame {
        /// Bytes of the incomplete frame that were buffered.
        buffered: usize,
    },
}

/// The broker broke the STOMP protocol: what the session could not take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// CONNECTED names a version this client does not know.
    #[error("server chose unknown STOMP version {0:?}")]
    UnknownVersion(String),
    /// CONNECTED names a version the client did not offer.
    #[error("server chose STOMP {0}, which was not offered")]
    VersionNotOffered(Version),
    /// The answer to CONNECT was neither CONNECTED nor ERROR.
    #[error("expected CONNECTED, got {0}")]
    ExpectedConnected(Command),
    /// A frame a server must not send on an open session (only MESSAGE,
    /// RECEIPT and ERROR may come).
    #[error("unexpected {0} frame")]
    UnexpectedFrame(Command),
}

/// A broker URI that cannot be used, naming the bad part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UriError {
    /// Nothing was given.
    #[error("broker URI is empty")]
    Empty,
    /// An address without `scheme://`.
    #[error("broker address {0:?} has no scheme; write e.g. stomp://{0}")]
    MissingScheme(String),
    /// A scheme this client does not speak.
    #[error("unsupported scheme {0:?}; use stomp://, stomp+ssl:// or failover:(...)")]
    UnsupportedScheme(String),
    /// An address without a port.
    #[error("broker address {0:?} has no port; write host:port, e.g. localhost:61613")]
    MissingPort(String),
    /// A port that is not a number from 1 to 65535.
    #[error("invalid port {0:?}")]
    InvalidPort(String),
    /// An empty or malformed host.
    #[error("invalid host {0:?}")]
    InvalidHost(String),
    /// `failover:(` without its closing parenthesis.
    #[error("failover list in {0:?} has no closing parenthesis")]
    Unbalanced(String),
    /// Text after the closing parenthesis that is not a query.
    #[error("unexpected text {0:?} after the failover list; options start with '?'")]
    Trailing(String),
    /// An empty entry in a failover list.
    #[error("empty address in failover list {0:?}")]
    EmptyAddress(String),
    /// An option whose value does not parse.
    #[error("invalid value {value:?} for option {name}")]
    InvalidOption {
        /// Option name.
        name: String,
        /// Offending value.
        value: String,
    },
    /// An option this client does not know.
    #[error("unknown URI option {0:?}")]
    UnknownOption(String),
    /// `user:password@` in the URI; credentials are configured separately so
    /// they never end up in logs.
    #[error(
        "credentials in the broker URI are not accepted; set login/passcode in the client config"
    )]
    CredentialsInUri,
}

/// A broker ERROR frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerError {
    /// The `message` header.
    pub message: String,
    /// The body as (lossy) text; ActiveMQ puts a Java stack trace here.
    pub details: String,
    /// The `receipt-id` it answered, if any.
    pub receipt_id: Option<String>,
}

impl BrokerError {
    /// The error an ERROR frame carries.
    pub fn from_frame(frame: &Frame) -> BrokerError {
        BrokerError {
            message: frame.header("message").unwrap_or("(no message)").to_owned(),
            details: String::from_utf8_lossy(frame.body()).into_owned(),
            receipt_id: frame.header("receipt-id").map(str::to_owned),
        }
    }

    /// True when the broker refused a frame because it is out of room for
    /// now: memory or store full with `sendFailIfNoSpace` (ActiveMQ's
    /// `ResourceAllocationException`, "Usage Manager … Limit reached" or
    /// "… is Full"). Such a refusal passes once consumers catch up or the
    /// store is freed; it says nothing against the frame itself.
    pub fn is_out_of_room(&self) -> bool {
        let said = |needle: &str| self.message.contains(needle) || self.details.contains(needle);
        said("ResourceAllocationException") || said("Usage Manager")
    }

    /// True when the broker refused a frame because the connection's user
    /// lacks a right on its destination: ActiveMQ's authorisation map
    /// ("User app is not authorized to write to: queue://orders", or "… to
    /// create: …" for a destination that does not exist yet). The frame is
    /// not at fault, and the refusal passes once the broker's authorisation
    /// allows it (a configuration being reloaded or corrected).
    pub fn is_not_authorized(&self) -> bool {
        let said = |needle: &str| self.message.contains(needle) || self.details.contains(needle);
        said("is not authorized to")
    }

    /// True when the broker refused a CONNECT for its credentials (ActiveMQ
    /// answers with a `SecurityException`): retrying cannot help. Other refusals,
    /// such as `InvalidClientIDException` while the broker still holds the
    /// previous connection under the same `client-id`, pass with time.
    pub fn is_login_refused(&self) -> bool {
        let said = |needle: &str| self.message.contains(needle) || self.details.contains(needle);
        said("SecurityException")
            || said("AuthenticationException")
            || said("password is invalid")
            || said("not authorized")
    }
}

impl std::fmt::Display for BrokerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)?;
        if let Some(first) = self.details.lines().find(|l| !l.trim().is_empty())
            && first.trim() != self.message.trim()
        {
            write!(f, " ({})", first.trim())?;
        }
        Ok(())
    }
}

/// Errors of the STOMP client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker URI is unusable.
    #[error(transparent)]
    Uri(#[from] UriError),
    /// Bytes from the broker could not be decoded, or a frame not encoded.
    #[error("STOMP codec: {0}")]
    Codec(#[from] CodecError),
    /// TCP connect to an address failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address tried.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// TLS setup or handshake failed.
    #[error("TLS with {addr}: {reason}")]
    Tls {
        /// The address tried.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The broker refused the CONNECT frame for good (wrong login or passcode),
    /// or kept refusing it until the connect attempts ran out.
    #[error("broker refused the connection: {0}")]
    ConnectRejected(BrokerError),
    /// The broker answered a request with an ERROR frame naming its receipt.
    #[error("broker rejected the request: {0}")]
    Rejected(BrokerError),
    /// The broker sent an ERROR that matched no receipt and closed the
    /// connection, as ActiveMQ does for a frame it will not take (a header over
    /// its length limit, a frame over its size limit). Every request in flight
    /// on that connection gets this error: one of them was refused. ActiveMQ
    /// may read on past the refused frame before it closes and apply later
    /// ones (a COMMIT among them) without sending their receipts, so the
    /// outcome of the others is unknown.
    #[error("broker refused a frame and closed the connection: {0}")]
    Broker(BrokerError),
    /// No receipt within the timeout: the outcome is unknown.
    #[error("no receipt {receipt} within {after:?}; outcome unknown")]
    ReceiptTimeout {
        /// The receipt id that was asked for.
        receipt: String,
        /// The timeout.
        after: std::time::Duration,
    },
    /// The connection was lost while the request was in flight: it may or may not
    /// have taken effect.
    #[error("connection lost before the broker confirmed the request; outcome unknown")]
    ConnectionLost,
    /// The peer stopped sending anything, heart-beats included.
    #[error("no data from the broker for {0:?} (heart-beat timeout)")]
    HeartBeatTimeout(std::time::Duration),
    /// A transaction or message belongs to an earlier connection; the broker
    /// aborted the transaction (or will redeliver the message).
    #[error("the {0} belongs to a connection that was lost")]
    Stale(&'static str),
    /// The broker did not answer CONNECT in time.
    #[error("no CONNECTED frame from {addr} within {after:?}")]
    ConnectTimeout {
        /// The address tried.
        addr: String,
        /// The timeout.
        after: std::time::Duration,
    },
    /// The broker broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(#[from] SessionError),
    /// Every reconnect attempt failed.
    #[error("gave up after {attempts} connection attempts; last error: {last}")]
    ReconnectExhausted {
        /// How many attempts were made.
        attempts: u32,
        /// The last failure.
        last: Box<Error>,
    },
    /// Writing to the broker failed in the middle of a session.
    #[error("writing to {addr} failed: {source}")]
    Write {
        /// The address connected to.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A write made no progress for too long: the broker stopped reading (a
    /// frozen broker or a half-open link with full buffers).
    #[error("writing to {addr} made no progress for {after:?}; the broker stopped reading")]
    WriteStalled {
        /// The address connected to.
        addr: String,
        /// The stall limit ([`Config::write_timeout`](crate::Config::write_timeout)).
        after: std::time::Duration,
    },
    /// No connection to the broker came up within the request's deadline; the
    /// request was withdrawn and never written.
    #[error("no connection to the broker within {waited:?}; the request was not sent")]
    NotConnected {
        /// How long the request waited.
        waited: std::time::Duration,
    },
    /// The request reached the front of the connection's write queue only
    /// after its deadline ([`Config::receipt_timeout`](crate::Config::receipt_timeout)):
    /// it was withdrawn and never written. For a COMMIT the client writes an
    /// ABORT of its transaction instead, so the broker never applies it.
    #[error("the request was not written within {waited:?}; the request was not sent")]
    Withdrawn {
        /// How long the request waited.
        waited: std::time::Duration,
    },
    /// The client was closed.
    #[error("the client is closed")]
    Closed,
    /// The frame cannot be written in the connection's STOMP version (in
    /// 1.0, a header value holding a line feed): that request failed and
    /// nothing of it was sent. The connection and the client go on; sending
    /// the same frame again fails the same way.
    #[error("not sent: {0}")]
    Unencodable(#[source] CodecError),
    /// The client ended the connection on its user's request
    /// ([`Client::end_connection`](crate::Client::end_connection)) and
    /// reconnects.
    #[error("connection ended by the client: {reason}")]
    EndedByClient {
        /// Why it was ended.
        reason: String,
    },
}

impl Error {
    /// True when the outcome of the failed request is unknown (it may have
    /// reached the broker): retry only if the operation is idempotent downstream.
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self,
            Error::ReceiptTimeout { .. } | Error::ConnectionLost | Error::Broker(_)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(message: &str) -> BrokerError {
        BrokerError {
            message: message.to_owned(),
            details: String::new(),
            receipt_id: Some("r1".to_owned()),
        }
    }

    #[test]
    fn a_refusal_by_the_authorisation_map_is_not_authorized_and_not_out_of_room() {
        for message in [
            "User relay is not authorized to write to: queue://orders",
            "User relay is not authorized to create: queue://orders",
        ] {
            let error = refusal(message);
            assert!(error.is_not_authorized(), "{message}");
            assert!(!error.is_out_of_room(), "{message}");
        }
    }

    #[test]
    fn a_refusal_for_want_of_room_or_of_the_frame_is_not_an_authorisation_refusal() {
        for message in [
            "Usage Manager Memory Limit reached on queue://orders",
            "Header value too large",
        ] {
            assert!(!refusal(message).is_not_authorized(), "{message}");
        }
    }
}
