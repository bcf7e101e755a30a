//! Errors of the STOMP crate, layered: codec → session → connection.

use crate::codec::Command;

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
