//! Header escaping for STOMP 1.1 and 1.2.

use bytes::{BufMut, BytesMut};

use super::Version;

/// Undoes escaping; on an undefined sequence returns it for the error message.
/// The input is valid UTF-8 and only ASCII sequences are replaced by ASCII
/// bytes, so the output is valid UTF-8 too.
pub(super) fn unescape(raw: &[u8], version: Version) -> Result<Vec<u8>, String> {
    // Exact size up front, so the buffer becomes `Bytes` without reallocating.
    let mut escapes = 0;
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'\\' {
            escapes += 1;
            i += 1;
        }
        i += 1;
    }
    let mut out = Vec::with_capacity(raw.len().saturating_sub(escapes));
    let mut rest = raw;
    while let Some(at) = rest.iter().position(|&b| b == b'\\') {
        out.extend_from_slice(&rest[..at]);
        let replacement = match rest.get(at + 1) {
            Some(b'\\') => b'\\',
            Some(b'n') => b'\n',
            Some(b'c') => b':',
            Some(b'r') if version == Version::V1_2 => b'\r',
            Some(&other) => return Err(String::from_utf8_lossy(&[b'\\', other]).into_owned()),
            None => return Err("\\".to_owned()),
        };
        out.push(replacement);
        rest = &rest[at + 2..];
    }
    out.extend_from_slice(rest);
    Ok(out)
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
