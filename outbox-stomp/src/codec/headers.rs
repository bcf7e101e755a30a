//! A frame's ordered headers ([`Headers`]), kept as spans of the decoded
//! head where they came off the wire, and the text handed to the frame
//! builders ([`HeaderText`]).

use std::fmt;

use bytes::Bytes;

/// A decoded header: its name and value as `start..end` offsets into the
/// frame's head.
///
/// Invariant: the head holds UTF-8 at both spans. The head was validated with
/// `str::from_utf8`, the spans are cut at ASCII delimiters, and unescaping in
/// place only replaced ASCII pairs with ASCII bytes.
#[derive(Clone, Copy)]
pub(super) struct HeadSpan {
    pub(super) name: (usize, usize),
    pub(super) value: (usize, usize),
}

/// The ordered headers of a frame. Repeated names are kept; lookups return the
/// first occurrence, as the STOMP specification says.
///
/// A decoded frame's headers are spans of its head, which costs one small
/// `Vec` per frame; headers added later are owned text and come after them.
#[derive(Clone, Default)]
pub struct Headers {
    /// The decoded frame's head the spans point into (empty for built frames).
    raw: Bytes,
    /// Decoded headers, in frame order, before every entry of `owned`.
    decoded: Vec<HeadSpan>,
    /// Headers added with `push` or `set`. Invariant: UTF-8, as they come from
    /// `str`/`String` or are slices of `raw` at a span.
    owned: Vec<(Bytes, Bytes)>,
}

impl Headers {
    /// Empty headers.
    pub fn new() -> Headers {
        Headers::default()
    }

    /// Headers of a decoded frame: `decoded` are spans of `raw`, the frame's
    /// head, which must hold UTF-8 at each span.
    pub(super) fn from_head(raw: Bytes, decoded: Vec<HeadSpan>) -> Headers {
        Headers {
            raw,
            decoded,
            owned: Vec::new(),
        }
    }

    fn span_text(&self, (start, end): (usize, usize)) -> &str {
        utf8(&self.raw[start..end])
    }

    /// The first value of `name`, if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        let name = name.as_bytes();
        if let Some(span) = self
            .decoded
            .iter()
            .find(|span| &self.raw[span.name.0..span.name.1] == name)
        {
            return Some(self.span_text(span.value));
        }
        self.owned
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| utf8(v))
    }

    /// Every value of `name`, in frame order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.iter().filter(move |(n, _)| *n == name).map(|(_, v)| v)
    }

    /// True if `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// All headers as `(name, value)`, in frame order, repeats included.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + '_ {
        Iter {
            headers: self,
            decoded: self.decoded.iter(),
            owned: self.owned.iter(),
        }
    }

    /// Number of header lines, repeats included.
    pub fn len(&self) -> usize {
        self.decoded.len() + self.owned.len()
    }

    /// True when there are no headers.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends a header (an existing one of the same name keeps precedence).
    pub fn push(&mut self, name: impl Into<HeaderText>, value: impl Into<HeaderText>) {
        self.owned.push((name.into().0, value.into().0));
    }

    /// Sets `name` to `value`: replaces the first occurrence and drops the others,
    /// or appends when absent.
    pub fn set(&mut self, name: impl Into<HeaderText>, value: impl Into<HeaderText>) {
        let name = name.into().0;
        let value = value.into().0;
        let raw = &self.raw;
        if self
            .decoded
            .iter()
            .any(|span| raw[span.name.0..span.name.1] == name[..])
        {
            self.make_owned();
        }
        match self.owned.iter().position(|(n, _)| *n == name) {
            Some(first) => {
                self.owned[first].1 = value;
                let mut index = 0;
                self.owned.retain(|(n, _)| {
                    let keep = index <= first || *n != name;
                    index += 1;
                    keep
                });
            }
            None => self.owned.push((name, value)),
        }
    }

    /// Removes every header called `name`; returns how many were removed.
    pub fn remove(&mut self, name: &str) -> usize {
        let before = self.len();
        let name = name.as_bytes();
        let raw = &self.raw;
        self.decoded
            .retain(|span| &raw[span.name.0..span.name.1] != name);
        self.owned.retain(|(n, _)| n != name);
        before - self.len()
    }

    /// Turns the decoded spans into owned entries (slices of the head, no
    /// copies), so that a decoded entry can be changed in place.
    fn make_owned(&mut self) {
        if self.decoded.is_empty() {
            return;
        }
        let raw = std::mem::take(&mut self.raw);
        let mut owned = Vec::with_capacity(self.decoded.len() + self.owned.len());
        for span in self.decoded.drain(..) {
            owned.push((
                raw.slice(span.name.0..span.name.1),
                raw.slice(span.value.0..span.value.1),
            ));
        }
        owned.append(&mut self.owned);
        self.owned = owned;
    }
}

/// The decoded headers, then the owned ones.
struct Iter<'a> {
    headers: &'a Headers,
    decoded: std::slice::Iter<'a, HeadSpan>,
    owned: std::slice::Iter<'a, (Bytes, Bytes)>,
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<(&'a str, &'a str)> {
        if let Some(span) = self.decoded.next() {
            let headers = self.headers;
            return Some((headers.span_text(span.name), headers.span_text(span.value)));
        }
        self.owned
            .next()
            .map(|(name, value)| (utf8(name), utf8(value)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let len = self.decoded.len() + self.owned.len();
        (len, Some(len))
    }
}

impl ExactSizeIterator for Iter<'_> {}

/// Header bytes as text. Only for bytes a [`Headers`] holds: at a span of its
/// head or in its owned entries.
fn utf8(bytes: &[u8]) -> &str {
    // SAFETY: callers pass only header bytes, which are UTF-8 by the
    // invariants on `HeadSpan` (spans of a validated head, cut at ASCII
    // delimiters, unescaped by replacing ASCII pairs with ASCII bytes) and on
    // `Headers::owned` (built from `str`/`String`, or slices of the head at a
    // span).
    unsafe { std::str::from_utf8_unchecked(bytes) }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for (name, value) in self.iter() {
            if is_secret(name) {
                list.entry(&(name, "<redacted>"));
            } else {
                list.entry(&(name, value));
            }
        }
        list.finish()
    }
}

impl PartialEq for Headers {
    fn eq(&self, other: &Headers) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for Headers {}

impl<N: Into<HeaderText>, V: Into<HeaderText>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(iter: I) -> Headers {
        let mut headers = Headers::new();
        for (n, v) in iter {
            headers.push(n, v);
        }
        headers
    }
}

fn is_secret(name: &str) -> bool {
    name == "passcode"
}

/// A piece of header text handed to the frame builders: a `&'static str` is
/// taken without copying, a `String` without reallocating.
#[derive(Clone)]
pub struct HeaderText(Bytes);

impl From<&'static str> for HeaderText {
    fn from(s: &'static str) -> HeaderText {
        HeaderText(Bytes::from_static(s.as_bytes()))
    }
}

impl From<String> for HeaderText {
    fn from(s: String) -> HeaderText {
        HeaderText(Bytes::from(s))
    }
}

impl From<&String> for HeaderText {
    fn from(s: &String) -> HeaderText {
        HeaderText(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl From<Box<str>> for HeaderText {
    fn from(s: Box<str>) -> HeaderText {
        HeaderText(Bytes::from(s.into_string()))
    }
}

impl From<u64> for HeaderText {
    fn from(n: u64) -> HeaderText {
        HeaderText(Bytes::from(n.to_string()))
    }
}

impl From<u32> for HeaderText {
    fn from(n: u32) -> HeaderText {
        HeaderText(Bytes::from(n.to_string()))
    }
}

impl From<usize> for HeaderText {
    fn from(n: usize) -> HeaderText {
        HeaderText(Bytes::from(n.to_string()))
    }
}
