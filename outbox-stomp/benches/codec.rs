//! Codec throughput: ours against published Rust STOMP codecs, same bytes, one run.
//!
//! Method: each input is a byte stream of many frames built once. A decode
//! iteration copies the stream into a fresh `BytesMut` (in the untimed setup) and
//! decodes every frame out of it with the codec's `Decoder`. An encode iteration
//! gets prebuilt messages (untimed setup) and encodes all of them into one
//! buffer. Throughput is reported in bytes of STOMP stream per second.
//!
//! Inputs: (a) 1,000 ActiveMQ-like MESSAGE frames with 12 headers, three of them
//! with escaped characters, and a 200-byte JSON body; (b) 16 frames with a 1 MiB
//! body; (c) 1,000 frames with 100 headers.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use outbox_stomp::codec::{Frame, Limits, Received, StompCodec, Version};
use tokio_util::codec::{Decoder, Encoder};

fn json_body(len: usize) -> Vec<u8> {
    let mut body =
        br#"{"user_id":12345,"email":"someone@example.org","name":"Some One","plan":"pro","#
            .to_vec();
    while body.len() < len - 2 {
        body.push(b'x');
    }
    body.extend_from_slice(b"\"}");
    body.truncate(len);
    body
}

fn small_message(i: usize) -> Vec<u8> {
    let body = json_body(200);
    format!(
        "MESSAGE\n\
         content-length:{len}\n\
         expires:0\n\
         destination:/queue/Consumer.points.VirtualTopic.user.created\n\
         subscription:sub-0\n\
         priority:4\n\
         ack:ID\\cbroker-host-41327-1732412345678-3\\c1\\c1\\c1\\c{i}\n\
         message-id:ID\\cbroker-host-41327-1732412345678-3\\c1\\c1\\c1\\c{i}\n\
         persistent:true\n\
         timestamp:1732412345678\n\
         event-type:user.created\n\
         correlation-id:order\\c{i}\\\\a\\nb\n\
         JMSXGroupID:user-{i}\n\n",
        len = body.len()
    )
    .into_bytes()
    .into_iter()
    .chain(body)
    .chain([0u8, b'\n'])
    .collect()
}

fn large_message(i: usize) -> Vec<u8> {
    let body = vec![b'z'; 1 << 20];
    let mut out = format!(
        "MESSAGE\ndestination:/queue/big\nsubscription:0\nmessage-id:m-{i}\ncontent-length:{}\n\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out.push(0);
    out
}

fn many_headers_message(i: usize) -> Vec<u8> {
    let mut out =
        format!("MESSAGE\ndestination:/queue/h\nsubscription:0\nmessage-id:m-{i}\n").into_bytes();
    for h in 0..97 {
        out.extend_from_slice(format!("header-{h}:value-{h}-{i}\n").as_bytes());
    }
    out.extend_from_slice(b"content-length:2\n\nok\0");
    out
}

fn stream(n: usize, make: fn(usize) -> Vec<u8>) -> Vec<u8> {
    (0..n).flat_map(make).collect()
}

fn decode_ours(buf: &mut BytesMut) -> usize {
    let mut codec = StompCodec::new(
        Version::V1_2,
        Limits {
            max_body: 64 << 20,
            ..Limits::default()
        },
    );
    let mut n = 0;
    while let Some(item) = codec.decode(buf).expect("valid stream") {
        if let Received::Frame(f) = item {
            black_box(f.header("message-id"));
            n += 1;
        }
    }
    n
}

fn decode_async_stomp(buf: &mut BytesMut) -> usize {
    let mut codec = async_stomp::client::ClientCodec::new();
    let mut n = 0;
    while let Some(msg) = codec.decode(buf).expect("valid stream") {
        black_box(&msg);
        n += 1;
    }
    n
}

fn decode_tokio_stomp_2(buf: &mut BytesMut) -> usize {
    let mut codec = tokio_stomp_2::client::ClientCodec;
    let mut n = 0;
    while let Some(msg) = codec.decode(buf).expect("valid stream") {
        black_box(&msg);
        n += 1;
    }
    n
}

fn bench_decode(c: &mut Criterion) {
    let inputs: [(&str, Vec<u8>, usize); 3] = [
        ("small_message", stream(1000, small_message), 1000),
        ("body_1mib", stream(16, large_message), 16),
        ("headers_100", stream(1000, many_headers_message), 1000),
    ];
    for (name, bytes, frames) in &inputs {
        // Every codec must decode the same number of frames, or the comparison is void.
        assert_eq!(decode_ours(&mut BytesMut::from(&bytes[..])), *frames);
        assert_eq!(decode_async_stomp(&mut BytesMut::from(&bytes[..])), *frames);
        assert_eq!(
            decode_tokio_stomp_2(&mut BytesMut::from(&bytes[..])),
            *frames
        );
        let mut group = c.benchmark_group(format!("decode/{name}"));
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        if bytes.len() > 1 << 20 {
            group.sample_size(20);
        }
        type DecodeFn = fn(&mut BytesMut) -> usize;
        let codecs: [(&str, DecodeFn); 3] = [
            ("outbox-stomp", decode_ours),
            ("async-stomp", decode_async_stomp),
            ("tokio-stomp-2", decode_tokio_stomp_2),
        ];
        for (codec, f) in codecs {
            group.bench_function(codec, |b| {
                b.iter_batched_ref(|| BytesMut::from(&bytes[..]), f, BatchSize::LargeInput)
            });
        }
        group.finish();
    }
}

struct SendSpec {
    destination: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn send_specs(n: usize, body_len: usize, extra_headers: usize) -> Vec<SendSpec> {
    (0..n)
        .map(|i| {
            let mut headers = vec![
                ("persistent".to_owned(), "true".to_owned()),
                ("content-type".to_owned(), "application/json".to_owned()),
                (
                    "event-id".to_owned(),
                    format!("0193a1b2-c3d4-7e5f-8a9b-{i:012}"),
                ),
                ("event-type".to_owned(), "user.created".to_owned()),
                ("JMSXGroupID".to_owned(), format!("user:{i}")),
                ("correlation-id".to_owned(), format!("order:{i}\\x")),
                ("transaction".to_owned(), "tx-1".to_owned()),
            ];
            for h in 0..extra_headers {
                headers.push((format!("header-{h}"), format!("value-{h}-{i}")));
            }
            SendSpec {
                destination: "/topic/VirtualTopic.user.created".to_owned(),
                headers,
                body: json_body(body_len),
            }
        })
        .collect()
}

fn bench_encode(c: &mut Criterion) {
    let inputs = [
        ("small_message", send_specs(1000, 200, 0)),
        ("body_1mib", send_specs(16, 1 << 20, 0)),
        ("headers_100", send_specs(1000, 2, 93)),
    ];
    for (name, specs) in &inputs {
        let ours = || -> Vec<Frame> {
            specs
                .iter()
                .map(|s| {
                    let mut f = Frame::send(s.destination.clone(), s.body.clone());
                    for (k, v) in &s.headers {
                        f = f.with_header(k.clone(), v.clone());
                    }
                    f
                })
                .collect()
        };
        let async_stomp_msgs = || -> Vec<async_stomp::Message<async_stomp::ToServer>> {
            specs
                .iter()
                .map(|s| {
                    async_stomp::ToServer::Send {
                        destination: s.destination.clone(),
                        transaction: None,
                        headers: Some(s.headers.clone()),
                        body: Some(s.body.clone()),
                    }
                    .into()
                })
                .collect()
        };
        let tokio_stomp_2_msgs = || -> Vec<tokio_stomp_2::Message<tokio_stomp_2::ToServer>> {
            specs
                .iter()
                .map(|s| {
                    tokio_stomp_2::ToServer::Send {
                        destination: s.destination.clone(),
                        transaction: None,
                        headers: Some(s.headers.clone()),
                        body: Some(s.body.clone()),
                    }
                    .into()
                })
                .collect()
        };
        let mut probe = BytesMut::new();
        let mut codec = StompCodec::default();
        for f in ours() {
            codec.encode(&f, &mut probe).expect("encodable");
        }
        let mut group = c.benchmark_group(format!("encode/{name}"));
        group.throughput(Throughput::Bytes(probe.len() as u64));
        if probe.len() > 1 << 20 {
            group.sample_size(20);
        }
        group.bench_function("outbox-stomp", |b| {
            b.iter_batched(
                ours,
                |frames| {
                    let mut codec = StompCodec::default();
                    let mut dst = BytesMut::new();
                    for f in &frames {
                        codec.encode(f, &mut dst).expect("encodable");
                    }
                    black_box(dst.len())
                },
                BatchSize::LargeInput,
            )
        });
        group.bench_function("async-stomp", |b| {
            b.iter_batched(
                async_stomp_msgs,
                |msgs| {
                    let mut codec = async_stomp::client::ClientCodec::new();
                    let mut dst = BytesMut::new();
                    for m in msgs {
                        codec.encode(m, &mut dst).expect("encodable");
                    }
                    black_box(dst.len())
                },
                BatchSize::LargeInput,
            )
        });
        group.bench_function("tokio-stomp-2", |b| {
            b.iter_batched(
                tokio_stomp_2_msgs,
                |msgs| {
                    let mut codec = tokio_stomp_2::client::ClientCodec;
                    let mut dst = BytesMut::new();
                    for m in msgs {
                        codec.encode(m, &mut dst).expect("encodable");
                    }
                    black_box(dst.len())
                },
                BatchSize::LargeInput,
            )
        });
        group.finish();
    }
}

criterion_group!(benches, bench_decode, bench_encode);
criterion_main!(benches);
