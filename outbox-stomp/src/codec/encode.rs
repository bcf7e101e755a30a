//! The encoder, and the check that a frame can be written in a version.

use bytes::{BufMut, BytesMut};
use tokio_util::codec::Encoder;

use super::{Command, Frame, StompCodec, Version, escape};
use crate::error::CodecError;

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
