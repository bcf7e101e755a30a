//! Property tests of the codec: round trips, chunking, arbitrary input.

use bytes::{Bytes, BytesMut};
use outbox_stomp::codec::{Command, Frame, Headers, Limits, Received, StompCodec, Version};
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

const COMMANDS: [Command; 15] = [
    Command::Connect,
    Command::Stomp,
    Command::Send,
    Command::Subscribe,
    Command::Unsubscribe,
    Command::Begin,
    Command::Commit,
    Command::Abort,
    Command::Ack,
    Command::Nack,
    Command::Disconnect,
    Command::Connected,
    Command::Message,
    Command::Receipt,
    Command::Error,
];

fn version() -> impl Strategy<Value = Version> {
    prop::sample::select(Version::ALL.to_vec())
}

fn command() -> impl Strategy<Value = Command> {
    prop::sample::select(COMMANDS.to_vec())
}

/// Header text with a good share of the characters that need escaping.
fn text(min: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            4 => any::<char>(),
            1 => prop::sample::select(vec!['\\', '\n', ':', '\r', 'é', '€', '\u{1F600}']),
        ],
        min..16,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

/// Whether a header survives a round trip under the rules of `version`/`command`.
fn encodable(version: Version, command: Command, name: &str, value: &str) -> bool {
    if name == "content-length" {
        return false;
    }
    let escaped = version != Version::V1_0 && !command.is_connect_like();
    if escaped {
        // 1.1 has no escape for CR: a CR before the line end would be read as CRLF.
        !(version == Version::V1_1 && value.ends_with('\r'))
    } else {
        !name.is_empty()
            && !name.contains([':', '\r', '\n'])
            && !value.contains('\n')
            && !value.ends_with('\r')
    }
}

fn frame_for(version: Version) -> impl Strategy<Value = Frame> {
    (
        command(),
        prop::collection::vec((text(0), text(0)), 0..12),
        prop::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(move |(command, headers, body)| {
            let headers: Headers = headers
                .into_iter()
                .filter(|(n, v)| encodable(version, command, n, v))
                .collect();
            Frame::from_parts(command, headers, Bytes::from(body))
        })
}

fn encode(version: Version, frame: &Frame) -> BytesMut {
    let mut dst = BytesMut::new();
    StompCodec::new(version, Limits::default())
        .encode(frame, &mut dst)
        .expect("generated frames are encodable");
    dst
}

/// What a decoder returns for `frame`: the encoder adds `content-length`.
fn as_received(frame: &Frame) -> Frame {
    if frame.body().is_empty() {
        frame.clone()
    } else {
        frame
            .clone()
            .with_header("content-length", frame.body().len().to_string())
    }
}

fn decode_chunks(version: Version, chunks: &[&[u8]]) -> Result<Vec<Frame>, String> {
    let mut codec = StompCodec::new(version, Limits::default());
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        while let Some(item) = codec.decode(&mut buf).map_err(|e| e.to_string())? {
            if let Received::Frame(f) = item {
                out.push(f);
            }
        }
    }
    while let Some(item) = codec.decode_eof(&mut buf).map_err(|e| e.to_string())? {
        if let Received::Frame(f) = item {
            out.push(f);
        }
    }
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn encode_then_decode_is_the_identity(
        (version, frame) in version().prop_flat_map(|v| (Just(v), frame_for(v)))
    ) {
        let bytes = encode(version, &frame);
        let decoded = decode_chunks(version, &[&bytes]).map_err(TestCaseError::fail)?;
        prop_assert_eq!(decoded, vec![as_received(&frame)]);
    }

    #[test]
    fn any_chunking_decodes_to_the_same_frames(
        (version, frames, eols, cuts) in version().prop_flat_map(|v| (
            Just(v),
            prop::collection::vec(frame_for(v), 1..6),
            prop::collection::vec(prop::sample::select(vec!["", "\n", "\r\n", "\n\n"]), 6),
            prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ))
    ) {
        let mut stream = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            stream.extend_from_slice(eols[i].as_bytes());
            stream.extend_from_slice(&encode(version, f));
        }
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
        points.sort_unstable();
        let mut chunks = Vec::new();
        let mut last = 0;
        for p in points {
            chunks.push(&stream[last..p]);
            last = p;
        }
        chunks.push(&stream[last..]);
        let decoded = decode_chunks(version, &chunks).map_err(TestCaseError::fail)?;
        let expected: Vec<Frame> = frames.iter().map(as_received).collect();
        prop_assert_eq!(decoded, expected);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        version in version(),
        prefix in prop::sample::select(vec![&b""[..], b"MESSAGE\n", b"SEND\ncontent-length:", b"ERROR\na:b\\"]),
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        chunk in 1usize..64,
    ) {
        let limits = Limits { max_line_length: 64, max_headers: 8, max_body: 128 };
        let mut codec = StompCodec::new(version, limits);
        let mut input = prefix.to_vec();
        input.extend_from_slice(&bytes);
        let mut buf = BytesMut::new();
        'outer: for piece in input.chunks(chunk) {
            buf.extend_from_slice(piece);
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(_) => break 'outer,
                }
            }
        }
        let _ = codec.decode_eof(&mut buf);
    }
}
