//! Byte-literal fixtures for the codec.

use bytes::{Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::*;

fn codec(version: Version) -> StompCodec {
    StompCodec::new(version, Limits::default())
}

fn decode_all(version: Version, input: &[u8]) -> Result<Vec<Received>, CodecError> {
    let mut codec = codec(version);
    let mut buf = BytesMut::from(input);
    let mut out = Vec::new();
    while let Some(item) = codec.decode_eof(&mut buf)? {
        out.push(item);
    }
    Ok(out)
}

fn frames(version: Version, input: &[u8]) -> Vec<Frame> {
    decode_all(version, input)
        .unwrap()
        .into_iter()
        .filter_map(|r| match r {
            Received::Frame(f) => Some(f),
            Received::HeartBeat => None,
        })
        .collect()
}

fn one(version: Version, input: &[u8]) -> Frame {
    let mut all = frames(version, input);
    assert_eq!(all.len(), 1, "expected exactly one frame");
    all.remove(0)
}

fn encode(version: Version, frame: &Frame) -> Result<Vec<u8>, CodecError> {
    let mut dst = BytesMut::new();
    codec(version).encode(frame, &mut dst)?;
    Ok(dst.to_vec())
}

#[test]
fn every_command_is_recognised() {
    let all = [
        "CONNECT",
        "STOMP",
        "SEND",
        "SUBSCRIBE",
        "UNSUBSCRIBE",
        "BEGIN",
        "COMMIT",
        "ABORT",
        "ACK",
        "NACK",
        "DISCONNECT",
        "CONNECTED",
        "MESSAGE",
        "RECEIPT",
        "ERROR",
    ];
    for name in all {
        let frame = one(Version::V1_2, format!("{name}\nk:v\n\n\0").as_bytes());
        assert_eq!(frame.command().as_str(), name);
        assert_eq!(frame.header("k"), Some("v"));
    }
}

#[test]
fn spec_connect_example_decodes() {
    let f = one(
        Version::V1_2,
        b"CONNECT\naccept-version:1.2\nhost:stomp.github.org\n\n\0",
    );
    assert_eq!(f.command(), Command::Connect);
    assert_eq!(f.header("accept-version"), Some("1.2"));
    assert_eq!(f.header("host"), Some("stomp.github.org"));
    assert!(f.body().is_empty());
}

#[test]
fn spec_send_example_takes_body_up_to_nul() {
    let f = one(
        Version::V1_2,
        b"SEND\ndestination:/queue/a\ncontent-type:text/plain\n\nhello queue a\0",
    );
    assert_eq!(f.command(), Command::Send);
    assert_eq!(f.body().as_ref(), b"hello queue a");
}

#[test]
fn spec_message_example_decodes() {
    let f = one(
        Version::V1_2,
        b"MESSAGE\nsubscription:0\nmessage-id:007\ndestination:/queue/a\ncontent-type:text/plain\n\nhello queue a\0",
    );
    assert_eq!(f.header("message-id"), Some("007"));
    assert_eq!(f.header("subscription"), Some("0"));
}

#[test]
fn spec_error_example_with_content_length_decodes() {
    let body = b"The message:\n-----\nMESSAGE\ndestined:/queue/a\nreceipt:message-12345\n\nHello queue a!\n-----\nDid not contain a destination header, which is REQUIRED\nfor message propagation.\n";
    let mut input = format!(
        "ERROR\nreceipt-id:message-12345\ncontent-type:text/plain\ncontent-length:{}\nmessage:malformed frame received\n\n",
        body.len()
    )
    .into_bytes();
    input.extend_from_slice(body);
    input.push(0);
    let f = one(Version::V1_2, &input);
    assert_eq!(f.command(), Command::Error);
    assert_eq!(f.header("receipt-id"), Some("message-12345"));
    assert_eq!(f.body().as_ref(), body);
}

#[test]
fn content_length_body_may_contain_nul_bytes() {
    let f = one(Version::V1_2, b"MESSAGE\ncontent-length:5\n\na\0b\0c\0");
    assert_eq!(f.body().as_ref(), b"a\0b\0c");
}

#[test]
fn repeated_header_lookup_returns_the_first_and_keeps_all() {
    let f = one(Version::V1_2, b"MESSAGE\nfoo:World\nfoo:Hello\n\n\0");
    assert_eq!(f.header("foo"), Some("World"));
    assert_eq!(
        f.headers().get_all("foo").collect::<Vec<_>>(),
        ["World", "Hello"]
    );
    assert_eq!(f.headers().len(), 2);
}

#[test]
fn escaped_header_values_are_unescaped_in_1_2() {
    let f = one(Version::V1_2, b"MESSAGE\na\\cb:x\\\\y\\nz\\cw\\rq\n\n\0");
    assert_eq!(f.header("a:b"), Some("x\\y\nz:w\rq"));
}

#[test]
fn escapes_in_names_values_or_both_are_undone_and_later_lines_still_parse() {
    let f = one(
        Version::V1_2,
        b"MESSAGE\r\nk\\c1:v\nplain:text\r\nv:a\\nb\\\\\nn\\\\x:\\r\nlast:1\n\n\0",
    );
    assert_eq!(
        f.headers().iter().collect::<Vec<_>>(),
        [
            ("k:1", "v"),
            ("plain", "text"),
            ("v", "a\nb\\"),
            ("n\\x", "\r"),
            ("last", "1")
        ]
    );
}

#[test]
fn invalid_escape_error_quotes_the_line_as_received() {
    // The name is valid and would be unescaped first: the error must still
    // show the line before any change.
    let err = decode_all(Version::V1_2, b"MESSAGE\na\\cb:x\\ty\n\n\0").unwrap_err();
    assert!(
        matches!(
            err,
            CodecError::InvalidEscape { ref sequence, ref line }
                if sequence == "\\t" && line == "a\\cb:x\\ty"
        ),
        "{err:?}"
    );
    let err = decode_all(Version::V1_2, b"MESSAGE\na\\:x\n\n\0").unwrap_err();
    assert!(
        matches!(
            err,
            CodecError::InvalidEscape { ref sequence, ref line }
                if sequence == "\\" && line == "a\\:x"
        ),
        "{err:?}"
    );
}

#[test]
fn first_content_length_wins() {
    let f = one(
        Version::V1_2,
        b"MESSAGE\ncontent-length:2\ncontent-length:5\n\nab\0",
    );
    assert_eq!(f.body().as_ref(), b"ab");
}

#[test]
fn escaped_content_length_name_is_not_content_length() {
    // `\c` unescapes to ':', so this header is named "content:length".
    let f = one(Version::V1_2, b"MESSAGE\ncontent\\clength:1\n\nabc\0");
    assert_eq!(f.header("content:length"), Some("1"));
    assert_eq!(f.body().as_ref(), b"abc");
}

#[test]
fn carriage_return_escape_is_undefined_in_1_1() {
    let err = decode_all(Version::V1_1, b"MESSAGE\na:x\\ry\n\n\0").unwrap_err();
    assert!(matches!(err, CodecError::InvalidEscape { ref sequence, .. } if sequence == "\\r"));
}

#[test]
fn undefined_escape_is_an_error() {
    let err = decode_all(Version::V1_2, b"MESSAGE\na:x\\ty\n\n\0").unwrap_err();
    assert!(matches!(err, CodecError::InvalidEscape { .. }), "{err:?}");
    let err = decode_all(Version::V1_2, b"MESSAGE\na:x\\\n\n\0").unwrap_err();
    assert!(matches!(err, CodecError::InvalidEscape { .. }), "{err:?}");
}

#[test]
fn stomp_1_0_headers_are_taken_literally() {
    let f = one(Version::V1_0, b"MESSAGE\na:x\\cy\\t\n\n\0");
    assert_eq!(f.header("a"), Some("x\\cy\\t"));
}

#[test]
fn connected_frames_are_never_unescaped() {
    let f = one(Version::V1_2, b"CONNECTED\nserver:a\\cb\nversion:1.2\n\n\0");
    assert_eq!(f.header("server"), Some("a\\cb"));
}

#[test]
fn value_keeps_colons_after_the_first() {
    let f = one(Version::V1_0, b"MESSAGE\nreply-to:tcp://x:1\n\n\0");
    assert_eq!(f.header("reply-to"), Some("tcp://x:1"));
}

#[test]
fn crlf_line_endings_are_accepted() {
    let f = one(
        Version::V1_2,
        b"SEND\r\ndestination:/queue/a\r\ncontent-length:2\r\n\r\nhi\0\r\n",
    );
    assert_eq!(f.command(), Command::Send);
    assert_eq!(f.header("destination"), Some("/queue/a"));
    assert_eq!(f.body().as_ref(), b"hi");
}

#[test]
fn heart_beats_between_frames_are_reported_and_consumed() {
    let out = decode_all(Version::V1_2, b"\n\r\n").unwrap();
    assert_eq!(out, vec![Received::HeartBeat]);
    let out = decode_all(Version::V1_2, b"\nRECEIPT\nreceipt-id:1\n\n\0\n\n").unwrap();
    assert_eq!(out.len(), 2);
    assert!(matches!(out[0], Received::Frame(_)));
    assert_eq!(out[1], Received::HeartBeat);
}

#[test]
fn heart_beat_arrives_while_a_frame_is_still_incomplete() {
    let mut c = codec(Version::V1_2);
    let mut buf = BytesMut::from(&b"\nMESS"[..]);
    assert_eq!(c.decode(&mut buf).unwrap(), Some(Received::HeartBeat));
    assert_eq!(c.decode(&mut buf).unwrap(), None);
    buf.extend_from_slice(b"AGE\n\n\0");
    assert!(matches!(
        c.decode(&mut buf).unwrap(),
        Some(Received::Frame(_))
    ));
}

#[test]
fn incomplete_input_is_not_an_error() {
    let input = b"MESSAGE\ncontent-length:3\n\nabc\0";
    for cut in 0..input.len() {
        let mut c = codec(Version::V1_2);
        let mut buf = BytesMut::from(&input[..cut]);
        assert_eq!(c.decode(&mut buf).unwrap(), None, "cut at {cut}");
    }
}

#[test]
fn byte_by_byte_feeding_decodes_the_same_frame() {
    let input = b"MESSAGE\nk:v\\c\ncontent-length:4\n\n\0\0\0\0\0\nERROR\nmessage:x\n\nbody\0";
    let whole = frames(Version::V1_2, input);
    let mut c = codec(Version::V1_2);
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for &b in input.iter() {
        buf.extend_from_slice(&[b]);
        while let Some(item) = c.decode(&mut buf).unwrap() {
            if let Received::Frame(f) = item {
                got.push(f);
            }
        }
    }
    assert_eq!(got, whole);
    assert_eq!(got.len(), 2);
}

#[test]
fn oversized_content_length_is_rejected_before_the_body_arrives() {
    let limits = Limits {
        max_body: 10,
        ..Limits::default()
    };
    let mut c = StompCodec::new(Version::V1_2, limits);
    let mut buf = BytesMut::from(&b"ERROR\ncontent-length:11\n\n"[..]);
    let err = c.decode(&mut buf).unwrap_err();
    assert!(
        matches!(
            err,
            CodecError::BodyTooLarge {
                length: 11,
                limit: 10
            }
        ),
        "{err:?}"
    );
}

#[test]
fn oversized_nul_terminated_body_is_rejected_while_buffering() {
    let limits = Limits {
        max_body: 10,
        ..Limits::default()
    };
    let mut c = StompCodec::new(Version::V1_2, limits);
    let mut buf = BytesMut::from(&b"RECEIPT\n\n0123456789A"[..]);
    let err = c.decode(&mut buf).unwrap_err();
    assert!(
        matches!(err, CodecError::BodyTooLarge { limit: 10, .. }),
        "{err:?}"
    );
}

/// Feeds `input` in pieces of `chunk` bytes, returning the frames and the
/// most bytes the buffer and the decoder held at once.
fn decode_in_pieces(limits: Limits, input: &[u8], chunk: usize) -> (Vec<Frame>, usize) {
    let mut c = StompCodec::new(Version::V1_2, limits);
    let mut buf = BytesMut::new();
    let (mut out, mut most) = (Vec::new(), 0);
    for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        most = most.max(buf.len() + c.held());
        while let Some(item) = c.decode(&mut buf).unwrap() {
            if let Received::Frame(frame) = item {
                out.push(frame);
            }
            most = most.max(buf.len() + c.held());
        }
    }
    assert!(buf.is_empty());
    (out, most)
}

#[test]
fn a_message_over_the_body_limit_is_read_past_and_comes_out_marked_with_its_headers() {
    let limits = Limits {
        max_body: 10,
        ..Limits::default()
    };
    let body = [7u8; 1000];
    let mut input = b"MESSAGE\nmessage-id:m-1\ncontent-length:1000\n\n".to_vec();
    input.extend_from_slice(&body);
    input.extend_from_slice(b"\0\nMESSAGE\nmessage-id:m-2\n\nsmall\0");
    for chunk in [1, 7, 64, input.len()] {
        let (frames, most) = decode_in_pieces(limits, &input, chunk);
        assert_eq!(frames.len(), 2, "chunk {chunk}");
        assert_eq!(frames[0].header("message-id"), Some("m-1"));
        assert!(frames[0].body().is_empty());
        assert_eq!(
            frames[0].oversize(),
            Some(&Oversize {
                body: Some(1000),
                long_lines: 0,
                extra_headers: 0,
                limits,
            })
        );
        assert_eq!(frames[1].body().as_ref(), b"small");
        assert_eq!(frames[1].oversize(), None);
        if chunk < 100 {
            assert!(most < 200, "the body was buffered: {most} bytes at once");
        }
    }
}

#[test]
fn a_nul_terminated_message_over_the_body_limit_is_read_past_up_to_its_nul() {
    let limits = Limits {
        max_body: 10,
        ..Limits::default()
    };
    let mut input = b"MESSAGE\nmessage-id:m-1\n\n".to_vec();
    input.extend_from_slice(&[b'x'; 500]);
    input.extend_from_slice(b"\0MESSAGE\nmessage-id:m-2\n\nsmall\0");
    for chunk in [1, 16, input.len()] {
        let (frames, most) = decode_in_pieces(limits, &input, chunk);
        assert_eq!(frames.len(), 2, "chunk {chunk}");
        assert_eq!(
            frames[0].oversize(),
            Some(&Oversize {
                body: Some(500),
                long_lines: 0,
                extra_headers: 0,
                limits,
            })
        );
        assert!(frames[0].body().is_empty());
        assert_eq!(frames[1].body().as_ref(), b"small");
        if chunk < 100 {
            assert!(most < 100, "the body was buffered: {most} bytes at once");
        }
    }
}

#[test]
fn a_message_read_past_still_needs_its_nul() {
    let limits = Limits {
        max_body: 4,
        ..Limits::default()
    };
    let mut c = StompCodec::new(Version::V1_2, limits);
    let mut buf = BytesMut::from(&b"MESSAGE\ncontent-length:5\n\n12345X"[..]);
    let err = c.decode(&mut buf).unwrap_err();
    assert!(
        matches!(err, CodecError::MissingNul { content_length: 5 }),
        "{err:?}"
    );
}

#[test]
fn overlong_line_is_rejected_before_its_end_arrives() {
    let limits = Limits {
        max_line_length: 8,
        ..Limits::default()
    };
    for head in [&b"ERROR\nabcdefghijk"[..], b"RECEIPT\na:1\nabcdefghijk"] {
        let mut c = StompCodec::new(Version::V1_2, limits);
        let mut buf = BytesMut::from(head);
        let err = c.decode(&mut buf).unwrap_err();
        assert!(
            matches!(err, CodecError::LineTooLong { limit: 8 }),
            "{err:?}"
        );
    }
    // A command line over the limit is no MESSAGE's.
    let mut c = StompCodec::new(
        Version::V1_2,
        Limits {
            max_line_length: 4,
            ..limits
        },
    );
    let mut buf = BytesMut::from(&b"MESSAGE\na:1\n\n\0"[..]);
    let err = c.decode(&mut buf).unwrap_err();
    assert!(
        matches!(err, CodecError::LineTooLong { limit: 4 }),
        "{err:?}"
    );
    let mut c = StompCodec::new(Version::V1_2, limits);
    let mut buf = BytesMut::from(&b"MESSAGE\nabcd:fgh\r\n\n\0"[..]);
    assert!(matches!(
        c.decode(&mut buf).unwrap(),
        Some(Received::Frame(_))
    ));
}

#[test]
fn line_and_header_limits_at_their_maximum_do_not_overflow() {
    let limits = Limits {
        max_line_length: usize::MAX,
        max_headers: usize::MAX,
        ..Limits::default()
    };
    let mut c = StompCodec::new(Version::V1_2, limits);
    let mut buf = BytesMut::from(&b"MESSAGE\na:1\n\n\0MESSAGE\nb:2"[..]);
    assert!(matches!(
        c.decode(&mut buf).unwrap(),
        Some(Received::Frame(_))
    ));
    assert_eq!(c.decode(&mut buf).unwrap(), None);
}

#[test]
fn too_many_headers_are_rejected() {
    let limits = Limits {
        max_headers: 2,
        ..Limits::default()
    };
    let mut c = StompCodec::new(Version::V1_2, limits);
    let mut buf = BytesMut::from(&b"ERROR\na:1\nb:2\n\n\0"[..]);
    assert!(c.decode(&mut buf).unwrap().is_some());
    for command in ["ERROR", "RECEIPT", "CONNECTED"] {
        let mut c = StompCodec::new(Version::V1_2, limits);
        let mut buf = BytesMut::from(format!("{command}\na:1\nb:2\nc:3\n\n\0").as_bytes());
        let err = c.decode(&mut buf).unwrap_err();
        assert!(
            matches!(err, CodecError::TooManyHeaders { limit: 2 }),
            "{command}: {err:?}"
        );
    }
}

#[test]
fn non_utf8_header_is_a_typed_error() {
    let err = decode_all(Version::V1_2, b"MESSAGE\na:ok\nb:\xff\xfe\n\n\0").unwrap_err();
    assert!(matches!(err, CodecError::NotUtf8 { line: 2 }), "{err:?}");
}

#[test]
fn unknown_command_is_a_typed_error() {
    let err = decode_all(Version::V1_2, b"HELLO\n\n\0").unwrap_err();
    assert!(
        matches!(err, CodecError::UnknownCommand(ref c) if c == "HELLO"),
        "{err:?}"
    );
}

#[test]
fn header_without_colon_is_a_typed_error() {
    let err = decode_all(Version::V1_2, b"MESSAGE\nnocolon\n\n\0").unwrap_err();
    assert!(matches!(err, CodecError::MalformedHeader { .. }), "{err:?}");
}

#[test]
fn bad_content_length_is_a_typed_error() {
    let err = decode_all(Version::V1_2, b"MESSAGE\ncontent-length:-1\n\n\0").unwrap_err();
    assert!(
        matches!(err, CodecError::InvalidContentLength(_)),
        "{err:?}"
    );
}

#[test]
fn body_not_followed_by_nul_is_a_typed_error() {
    let err = decode_all(Version::V1_2, b"MESSAGE\ncontent-length:1\n\nab").unwrap_err();
    assert!(
        matches!(err, CodecError::MissingNul { content_length: 1 }),
        "{err:?}"
    );
}

#[test]
fn bytes_left_at_eof_are_a_truncated_frame() {
    let err = decode_all(Version::V1_2, b"MESSAGE\nk:v\n").unwrap_err();
    assert!(matches!(err, CodecError::TruncatedFrame { .. }), "{err:?}");
    let err = decode_all(Version::V1_2, b"MESSAGE\ncontent-length:9\n\nab").unwrap_err();
    assert!(
        matches!(err, CodecError::TruncatedFrame { buffered: 2 }),
        "{err:?}"
    );
}

#[test]
fn stray_carriage_return_between_frames_is_an_error() {
    let err = decode_all(Version::V1_2, b"\rX").unwrap_err();
    assert!(matches!(err, CodecError::StrayCarriageReturn), "{err:?}");
}

#[test]
fn decoded_body_and_headers_share_the_read_buffer() {
    let mut buf = BytesMut::with_capacity(256);
    buf.extend_from_slice(b"MESSAGE\ndestination:/queue/a\ncontent-length:5\n\nhello\0");
    let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.capacity();
    let Some(Received::Frame(f)) = codec(Version::V1_2).decode(&mut buf).unwrap() else {
        panic!("no frame");
    };
    assert!(range.contains(&(f.body().as_ptr() as usize)));
    let value = f.header("destination").unwrap();
    assert!(range.contains(&(value.as_ptr() as usize)));
}

#[test]
fn unescaped_headers_also_share_the_read_buffer() {
    let mut buf = BytesMut::with_capacity(256);
    buf.extend_from_slice(b"MESSAGE\nmessage\\c-id:ID\\chost\\c1\\\\2\n\n\0");
    let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.capacity();
    let Some(Received::Frame(f)) = codec(Version::V1_2).decode(&mut buf).unwrap() else {
        panic!("no frame");
    };
    let (name, value) = f.headers().iter().next().unwrap();
    assert_eq!((name, value), ("message:-id", "ID:host:1\\2"));
    assert!(range.contains(&(name.as_ptr() as usize)));
    assert!(range.contains(&(value.as_ptr() as usize)));
}

#[test]
fn encoder_writes_content_length_for_every_non_empty_body() {
    let out = encode(Version::V1_2, &Frame::send("/queue/a", &b"x\0y"[..])).unwrap();
    assert_eq!(
        out,
        b"SEND\ndestination:/queue/a\ncontent-length:3\n\nx\0y\0"
    );
    let out = encode(Version::V1_2, &Frame::send("/queue/a", Bytes::new())).unwrap();
    assert_eq!(out, b"SEND\ndestination:/queue/a\n\n\0");
}

#[test]
fn encoder_replaces_a_caller_content_length() {
    let frame = Frame::send("/q", "abc").with_header("content-length", "99");
    let out = encode(Version::V1_2, &frame).unwrap();
    assert_eq!(out, b"SEND\ndestination:/q\ncontent-length:3\n\nabc\0");
}

#[test]
fn encoder_escapes_per_version() {
    let frame = Frame::new(Command::Send).with_header("k:1", "a\\b\nc:d\re");
    assert_eq!(
        encode(Version::V1_2, &frame).unwrap(),
        b"SEND\nk\\c1:a\\\\b\\nc\\cd\\re\n\n\0"
    );
    assert_eq!(
        encode(Version::V1_1, &frame).unwrap(),
        b"SEND\nk\\c1:a\\\\b\\nc\\cd\re\n\n\0"
    );
    let err = encode(Version::V1_0, &frame).unwrap_err();
    assert!(
        matches!(err, CodecError::UnencodableHeader { .. }),
        "{err:?}"
    );
}

#[test]
fn connect_frames_are_never_escaped() {
    let frame =
        Frame::connect(&[Version::V1_2], "localhost", (0, 0)).with_header("passcode", "a:b\\c");
    let out = encode(Version::V1_2, &frame).unwrap();
    assert_eq!(
        out,
        b"CONNECT\naccept-version:1.2\nhost:localhost\nheart-beat:0,0\npasscode:a:b\\c\n\n\0"
    );
    let bad = Frame::new(Command::Connect).with_header("login", "a\nb");
    assert!(matches!(
        encode(Version::V1_2, &bad).unwrap_err(),
        CodecError::UnencodableHeader { .. }
    ));
}

#[test]
fn passcode_is_redacted_in_debug_output() {
    let frame = Frame::connect(&[Version::V1_2], "h", (0, 0)).with_header("passcode", "s3cret");
    let text = format!("{frame:?}");
    assert!(!text.contains("s3cret"), "{text}");
    assert!(text.contains("redacted"));
}

#[test]
fn headers_set_replaces_all_occurrences() {
    let mut f = one(Version::V1_2, b"MESSAGE\na:1\nb:2\na:3\n\n\0");
    f.headers_mut().set("a", "9");
    assert_eq!(
        f.headers().iter().collect::<Vec<_>>(),
        [("a", "9"), ("b", "2")]
    );
    assert_eq!(f.headers_mut().remove("b"), 1);
    assert_eq!(f.headers().len(), 1);
}

#[test]
fn decoded_headers_can_be_extended_and_changed_in_order() {
    let mut f = one(Version::V1_2, b"MESSAGE\na:1\nb:2\na:3\n\n\0");
    f.headers_mut().push("c", "4");
    f.headers_mut().push("a", "5");
    assert_eq!(f.header("c"), Some("4"));
    assert_eq!(f.header("a"), Some("1"));
    assert_eq!(
        f.headers().get_all("a").collect::<Vec<_>>(),
        ["1", "3", "5"]
    );
    assert_eq!(f.headers_mut().remove("b"), 1);
    assert_eq!(
        f.headers().iter().collect::<Vec<_>>(),
        [("a", "1"), ("a", "3"), ("c", "4"), ("a", "5")]
    );
    f.headers_mut().set("c", "6");
    f.headers_mut().set("d", "7");
    assert_eq!(
        f.headers().iter().collect::<Vec<_>>(),
        [("a", "1"), ("a", "3"), ("c", "6"), ("a", "5"), ("d", "7")]
    );
    assert_eq!(f.headers().iter().len(), 5);
    f.headers_mut().set("a", "9");
    assert_eq!(
        f.headers().iter().collect::<Vec<_>>(),
        [("a", "9"), ("c", "6"), ("d", "7")]
    );
}

#[test]
fn encode_then_decode_is_identity_on_every_version() {
    for version in Version::ALL {
        let frame = Frame::send("/queue/x", &b"\0bin\0"[..])
            .with_header("persistent", "true")
            .with_header("rep", "1")
            .with_header("rep", "2");
        let bytes = encode(version, &frame).unwrap();
        let back = one(version, &bytes);
        let expected = frame.clone().with_header("content-length", "5");
        assert_eq!(back, expected, "version {version}");
    }
}

/// A MESSAGE head with one header line of `long` bytes first, then the
/// headers a consumer settles it by, two more, and a body of `hello`; then a
/// small MESSAGE.
fn head_with_a_long_line(long: usize) -> Vec<u8> {
    let mut input = b"MESSAGE\nx-big:".to_vec();
    input.extend_from_slice(&vec![b'v'; long]);
    input.extend_from_slice(
        b"\nmessage-id:m-1\nsubscription:0\nack:a-1\ndestination:/queue/q\n\
          event-id:e-1\nx-a:1\nx-b:2\nevent-type:t\nevent-key:k\ncontent-length:5\n\n\
          hello\0\nMESSAGE\nmessage-id:m-2\n\nsmall\0",
    );
    input
}

#[test]
fn a_message_with_a_header_line_over_the_limit_is_read_past_keeping_the_headers_that_settle_it() {
    let limits = Limits {
        max_line_length: 64,
        max_headers: 4,
        ..Limits::default()
    };
    let input = head_with_a_long_line(5000);
    for chunk in [1, 7, 64, input.len()] {
        let (frames, most) = decode_in_pieces(limits, &input, chunk);
        assert_eq!(frames.len(), 2, "chunk {chunk}");
        let big = &frames[0];
        for (name, value) in [
            ("message-id", "m-1"),
            ("subscription", "0"),
            ("ack", "a-1"),
            ("destination", "/queue/q"),
            ("event-id", "e-1"),
            ("event-type", "t"),
            ("event-key", "k"),
            ("content-length", "5"),
        ] {
            assert_eq!(big.header(name), Some(value), "{name}, chunk {chunk}");
        }
        assert_eq!(big.header("x-big"), None);
        assert_eq!(big.header("x-a"), None, "past the count");
        assert_eq!(big.body().as_ref(), b"hello");
        assert_eq!(
            big.oversize(),
            Some(&Oversize {
                body: None,
                long_lines: 1,
                extra_headers: 2,
                limits,
            })
        );
        assert_eq!(frames[1].body().as_ref(), b"small");
        assert_eq!(frames[1].oversize(), None);
        if chunk < 100 {
            assert!(
                most < 200,
                "the long line was buffered: {most} bytes at once"
            );
        }
    }
}

#[test]
fn a_message_with_more_headers_than_the_limit_keeps_the_first_ones_and_those_that_settle_it() {
    let limits = Limits {
        max_line_length: 64,
        max_headers: 20,
        ..Limits::default()
    };
    let mut input = b"MESSAGE\n".to_vec();
    for i in 0..10_000 {
        input.extend_from_slice(format!("x-{i}:{i}\n").as_bytes());
    }
    input.extend_from_slice(
        b"message-id:m-1\nsubscription:0\nack:a-1\nevent-id:e-1\nmessage-id:m-other\n\n\
          hello\0MESSAGE\nmessage-id:m-2\n\nsmall\0",
    );
    for chunk in [1, 16, 1000, input.len()] {
        let (frames, most) = decode_in_pieces(limits, &input, chunk);
        assert_eq!(frames.len(), 2, "chunk {chunk}");
        let big = &frames[0];
        assert_eq!(big.header("x-0"), Some("0"));
        assert_eq!(big.header("x-19"), Some("19"));
        assert_eq!(big.header("x-20"), None);
        assert_eq!(big.header("x-9999"), None);
        assert_eq!(big.header("message-id"), Some("m-1"), "the first one");
        assert_eq!(big.header("ack"), Some("a-1"));
        assert_eq!(big.header("subscription"), Some("0"));
        assert_eq!(big.header("event-id"), Some("e-1"));
        assert_eq!(big.body().as_ref(), b"hello");
        assert_eq!(big.headers().len(), 24, "{:?}", big.headers());
        assert_eq!(
            big.oversize(),
            Some(&Oversize {
                body: None,
                long_lines: 0,
                extra_headers: 9_981,
                limits,
            })
        );
        assert_eq!(frames[1].body().as_ref(), b"small");
        assert_eq!(frames[1].oversize(), None);
        if chunk <= 1000 {
            assert!(most < 2000, "the head was buffered: {most} bytes at once");
        }
    }
}

#[test]
fn a_message_over_the_head_and_body_limits_is_read_past_with_both_reasons() {
    let limits = Limits {
        max_line_length: 64,
        max_headers: 4,
        max_body: 3,
    };
    let input = head_with_a_long_line(500);
    let (frames, _) = decode_in_pieces(limits, &input, 5);
    assert_eq!(frames.len(), 2);
    assert_eq!(frames[0].header("event-id"), Some("e-1"));
    assert!(frames[0].body().is_empty());
    let oversize = frames[0].oversize().copied();
    assert_eq!(
        oversize,
        Some(Oversize {
            body: Some(5),
            long_lines: 1,
            extra_headers: 2,
            limits,
        })
    );
    let reason = oversize.map(|o| o.to_string()).unwrap_or_default();
    assert_eq!(
        reason,
        "body of 5 bytes over the consumer's limit of 3 bytes (Limits::max_body); dropped unread; \
         1 header line(s) longer than the consumer's limit of 64 bytes (Limits::max_line_length); dropped; \
         2 header line(s) past the consumer's limit of 4 headers (Limits::max_headers); dropped"
    );
    assert_eq!(frames[1].header("message-id"), Some("m-2"));
}

#[test]
fn a_message_head_over_the_limits_keeps_its_settling_headers_only_within_the_line_limit_and_once() {
    let limits = Limits {
        max_line_length: 32,
        max_headers: 1,
        ..Limits::default()
    };
    let mut input = b"MESSAGE\r\nx-a:1\r\nx-b:2\r\nack:a-1\r\nack:a-2\r\n".to_vec();
    input.extend_from_slice(format!("event-id:{}\r\n", "e".repeat(40)).as_bytes());
    input.extend_from_slice(b"event-key:k\\cv\r\nx-c:3\r\n\r\nbody\0");
    let (frames, _) = decode_in_pieces(limits, &input, 3);
    assert_eq!(frames.len(), 1);
    let headers: Vec<_> = frames[0].headers().iter().collect();
    assert_eq!(
        headers,
        [("x-a", "1"), ("ack", "a-1"), ("event-key", "k:v")],
        "escapes undone as usual"
    );
    assert_eq!(frames[0].body().as_ref(), b"body");
    let oversize = frames[0].oversize().copied();
    assert_eq!(
        oversize.map(|o| (o.long_lines, o.extra_headers)),
        Some((1, 3))
    );
}

#[test]
fn a_message_over_the_header_count_with_nothing_to_drop_is_delivered_whole() {
    let limits = Limits {
        max_headers: 1,
        ..Limits::default()
    };
    let (frames, _) = decode_in_pieces(limits, b"MESSAGE\nx-a:1\nmessage-id:m\nack:a\n\nok\0", 4);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].headers().len(), 3);
    assert_eq!(frames[0].oversize(), None);
}
