//! Header escaping for STOMP 1.1 and 1.2.

use bytes::{BufMut, BytesMut};

use super::Version;

// Fields are short and hold few escapes: plain loops beat repeated SIMD
// searches, whose set-up dominates on a few dozen bytes.

/// Checks that every escape sequence in `field` is defined for `version`
/// (1.1 or 1.2); on an undefined one returns it for the error message.
pub(super) fn check(field: &[u8], version: Version) -> Result<(), String> {
    let mut i = 0;
    while let Some(&b) = field.get(i) {
        if b == b'\\' {
            match field.get(i + 1) {
                Some(b'\\' | b'n' | b'c') => {}
                Some(b'r') if version == Version::V1_2 => {}
                Some(&other) => return Err(String::from_utf8_lossy(&[b'\\', other]).into_owned()),
                None => return Err("\\".to_owned()),
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    Ok(())
}

/// Undoes the escaping of a `field` that passed [`check`], in place, and
/// returns the unescaped length. The text only shrinks, so it is written over
/// its own start and nothing is allocated. Only ASCII pairs become ASCII
/// bytes, and a backslash never occurs inside a multi-byte UTF-8 sequence, so
/// valid UTF-8 stays valid.
pub(super) fn unescape_in_place(field: &mut [u8]) -> usize {
    let Some(first) = field.iter().position(|&b| b == b'\\') else {
        return field.len();
    };
    let (mut read, mut write) = (first, first);
    while let Some(&b) = field.get(read) {
        field[write] = if b == b'\\' {
            read += 1;
            match field.get(read) {
                Some(b'n') => b'\n',
                Some(b'c') => b':',
                Some(b'r') => b'\r',
                // `\\`: `check` let no other sequence through.
                _ => b'\\',
            }
        } else {
            b
        };
        read += 1;
        write += 1;
    }
    write
}

/// The length of `text` escaped for `version` (1.1 or 1.2).
pub(crate) fn escaped_len(text: &str, version: Version) -> usize {
    text.len()
        + text
            .bytes()
            .filter(|b| {
                matches!(b, b'\\' | b'\n' | b':') || (*b == b'\r' && version == Version::V1_2)
            })
            .count()
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
