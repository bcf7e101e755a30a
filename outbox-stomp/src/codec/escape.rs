//! Header escaping for STOMP 1.1 and 1.2.

use bytes::{BufMut, BytesMut};

use super::Version;

/// Undoes escaping; on an undefined sequence returns it for the error message.
pub(super) fn unescape(raw: &[u8], version: Version) -> Result<String, String> {
    let mut out = Vec::with_capacity(raw.len());
    let mut iter = raw.iter().copied();
    while let Some(b) = iter.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match iter.next() {
            Some(b'\\') => out.push(b'\\'),
            Some(b'n') => out.push(b'\n'),
            Some(b'c') => out.push(b':'),
            Some(b'r') if version == Version::V1_2 => out.push(b'\r'),
            Some(other) => {
                return Err(String::from_utf8_lossy(&[b'\\', other]).into_owned());
            }
            None => return Err("\\".to_owned()),
        }
    }
    // Only ASCII bytes were replaced, so the validated input stays valid UTF-8.
    String::from_utf8(out).map_err(|_| "\\".to_owned())
}

/// Writes `text` escaped for `version` (1.1 or 1.2).
pub(super) fn escape_into(text: &str, version: Version, dst: &mut BytesMut) {
    let bytes = text.as_bytes();
    let needs = memchr::memchr3(b'\\', b'\n', b':', bytes).is_some()
        || (version == Version::V1_2 && memchr::memchr(b'\r', bytes).is_some());
    if !needs {
        dst.put_slice(bytes);
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let replacement: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b':' => b"\\c",
            b'\r' if version == Version::V1_2 => b"\\r",
            _ => continue,
        };
        dst.put_slice(&bytes[start..i]);
        dst.put_slice(replacement);
        start = i + 1;
    }
    dst.put_slice(&bytes[start..]);
}
