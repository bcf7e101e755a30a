//! Feeds arbitrary bytes, in arbitrary chunk sizes, to the frame decoder, and
//! re-encodes every decoded frame to check the encoder accepts what the decoder
//! produced.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use outbox_stomp::codec::{Limits, Received, StompCodec, Version};
use tokio_util::codec::{Decoder, Encoder};

fuzz_target!(|data: &[u8]| {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    let version = Version::ALL[(control % 3) as usize];
    let chunk = 1 + (control as usize >> 2);
    let limits = Limits {
        max_line_length: 256,
        max_headers: 16,
        max_body: 4096,
    };
    let mut codec = StompCodec::new(version, limits);
    let mut buf = BytesMut::new();
    for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(Received::Frame(frame))) => {
                    let mut out = BytesMut::new();
                    // Decoded headers may be unencodable in raw form (e.g. 1.0);
                    // an error is fine, a panic is not.
                    let _ = StompCodec::new(version, limits).encode(&frame, &mut out);
                }
                Ok(Some(Received::HeartBeat)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = codec.decode_eof(&mut buf);
});
