//! Publish and consume throughput against a real ActiveMQ, side by side with a
//! raw-socket client that does nothing but write pre-built bytes and scan for
//! the receipt. Prints a table.
//!
//! Method: one broker from the test harness (persistent KahaDB, default
//! settings, 2 GiB heap so producer flow control does not kick in) on loopback. Each row publishes `N` persistent 200-byte messages to
//! its own queue; "batch" is how many SENDs share one STOMP transaction whose
//! COMMIT carries the receipt (batch 1 = no transaction, one receipt per SEND).
//! A warm-up round runs first (the JVM is slow in its first seconds). Consume
//! rows drain a queue pre-filled with `N` messages. Run with
//! `cargo bench -p outbox-stomp --bench broker_throughput`; `BENCH_N` changes N.

use std::time::{Duration, Instant};

use outbox_stomp::{AckMode, Client, Config, Outgoing, Subscribe};
use outbox_test_harness::{Broker, BrokerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BODY: &[u8; 200] = &[b'x'; 200];

async fn raw_connect(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s.write_all(b"CONNECT\naccept-version:1.2\nhost:localhost\nheart-beat:0,0\n\n\0")
        .await
        .expect("write");
    let mut buf = Vec::new();
    read_until(&mut s, &mut buf, b"CONNECTED").await;
    s
}

async fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, needle: &[u8]) {
    let mut chunk = [0u8; 65536];
    loop {
        if let Some(at) = memchr::memmem::find(buf, needle)
            && let Some(nul) = memchr::memchr(0, &buf[at..])
        {
            buf.drain(..at + nul + 1);
            return;
        }
        let n = s.read(&mut chunk).await.expect("read");
        assert!(n > 0, "broker closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn raw_publish(addr: std::net::SocketAddr, queue: &str, n: usize, batch: usize) -> Duration {
    let mut s = raw_connect(addr).await;
    let mut buf = Vec::new();
    let start = Instant::now();
    let mut sent = 0;
    let mut k = 0;
    while sent < n {
        k += 1;
        let size = batch.min(n - sent);
        let mut out = Vec::with_capacity(size * 320);
        if batch == 1 {
            out.extend_from_slice(
                format!("SEND\ndestination:{queue}\npersistent:true\nreceipt:c{k}\ncontent-length:200\n\n").as_bytes(),
            );
            out.extend_from_slice(BODY);
            out.push(0);
        } else {
            out.extend_from_slice(format!("BEGIN\ntransaction:t{k}\n\n\0").as_bytes());
            for _ in 0..size {
                out.extend_from_slice(
                    format!("SEND\ndestination:{queue}\npersistent:true\ntransaction:t{k}\ncontent-length:200\n\n")
                        .as_bytes(),
                );
                out.extend_from_slice(BODY);
                out.push(0);
            }
            out.extend_from_slice(
                format!("COMMIT\ntransaction:t{k}\nreceipt:c{k}\n\n\0").as_bytes(),
            );
        }
        s.write_all(&out).await.expect("write");
        read_until(&mut s, &mut buf, format!("receipt-id:c{k}\n").as_bytes()).await;
        sent += size;
    }
    start.elapsed()
}

async fn client_publish(client: &Client, queue: &str, n: usize, batch: usize) -> Duration {
    let start = Instant::now();
    let mut sent = 0;
    while sent < n {
        let size = batch.min(n - sent);
        if batch == 1 {
            client
                .send(Outgoing::new(queue.to_owned(), &BODY[..]).persistent(true))
                .await
                .expect("send");
        } else {
            let tx = client.begin().await.expect("begin");
            for _ in 0..size {
                tx.send(Outgoing::new(queue.to_owned(), &BODY[..]).persistent(true))
                    .await
                    .expect("send");
            }
            tx.commit().await.expect("commit");
        }
        sent += size;
    }
    start.elapsed()
}

async fn raw_consume(addr: std::net::SocketAddr, queue: &str, n: usize) -> Duration {
    let mut s = raw_connect(addr).await;
    let start = Instant::now();
    s.write_all(format!("SUBSCRIBE\ndestination:{queue}\nid:0\nack:auto\n\n\0").as_bytes())
        .await
        .expect("write");
    // Count MESSAGE frames: every frame ends in NUL, bodies here contain none.
    let mut seen = 0;
    let mut chunk = vec![0u8; 1 << 16];
    while seen < n {
        let got = s.read(&mut chunk).await.expect("read");
        assert!(got > 0, "broker closed the connection");
        seen += memchr::memchr_iter(0, &chunk[..got]).count();
    }
    start.elapsed()
}

async fn client_consume(client: &Client, queue: &str, n: usize, mode: AckMode) -> Duration {
    let start = Instant::now();
    let mut sub = client
        .subscribe(Subscribe::new(queue.to_owned()).ack(mode).prefetch(1000))
        .await
        .expect("subscribe");
    for _ in 0..n {
        let m = sub.next_message().await.expect("message");
        if mode != AckMode::Auto {
            m.ack().await.expect("ack");
        }
    }
    start.elapsed()
}

async fn fill(client: &Client, queue: &str, n: usize) {
    client_publish(client, queue, n, 1000).await;
}

fn table_head(title: &str, batch: &str) {
    println!(
        "| {title:<34} | {batch:>5} | {:>7} | {:>9} | {:>10} |",
        "msgs", "ms", "msg/s"
    );
    println!(
        "|{:-<36}|{:-<7}|{:-<9}|{:-<11}|{:-<12}|",
        "", "", "", "", ""
    );
}

fn row(what: &str, batch: &str, n: usize, took: Duration) {
    println!(
        "| {what:<34} | {batch:>5} | {n:>7} | {:>9.1} | {:>10.0} |",
        took.as_secs_f64() * 1000.0,
        n as f64 / took.as_secs_f64()
    );
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let broker = Broker::start_with(BrokerConfig::default().with_max_heap_mb(2048))
        .await
        .expect("broker");
    let addr = broker.stomp_addr();
    let config = Config::parse(&broker.stomp_uri()).expect("uri");
    let client = Client::connect(config).await.expect("connect");

    // Warm-up: JIT and KahaDB journal files.
    client_publish(&client, "/queue/warm", n, 500).await;
    raw_publish(addr, "/queue/warm", n, 500).await;
    client_consume(&client, "/queue/warm", 2 * n, AckMode::Auto).await;

    table_head("publish (persistent, 200 B)", "batch");
    for (batch, count) in [(1, n / 10), (100, n), (500, n), (1000, n)] {
        let took = raw_publish(addr, &format!("/queue/raw-{batch}"), count, batch).await;
        row("raw socket", &batch.to_string(), count, took);
        let took = client_publish(&client, &format!("/queue/client-{batch}"), count, batch).await;
        row("outbox-stomp Client", &batch.to_string(), count, took);
    }
    println!();
    table_head("consume (prefetch 1000)", "");
    fill(&client, "/queue/c-raw", n).await;
    fill(&client, "/queue/c-auto", n).await;
    fill(&client, "/queue/c-ind", n).await;
    let took = raw_consume(addr, "/queue/c-raw", n).await;
    row("raw socket, ack:auto", "", n, took);
    let took = client_consume(&client, "/queue/c-auto", n, AckMode::Auto).await;
    row("outbox-stomp, ack:auto", "", n, took);
    let took = client_consume(&client, "/queue/c-ind", n, AckMode::ClientIndividual).await;
    row("outbox-stomp, client-individual", "", n, took);
    let _ = client.disconnect().await;
}
