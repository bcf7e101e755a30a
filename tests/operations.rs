//! The operator's view of the two example services (`--metrics ADDR`): the
//! Prometheus endpoint shows the counters and gauges with the values the
//! tables and the broker justify, and the health probes follow the broker
//! as it is killed and started again. Real processes, a real ActiveMQ and
//! SQLite files.

mod support;

use std::process::Stdio;
use std::time::Duration;

use support::{TestResult, broker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

const USERS: u64 = 40;
/// How long any one expected change may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(90);

/// A port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `GET path` on `port`: the status code and the body, or `None` while
/// nothing answers.
async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .ok()?
        .ok()?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

/// The value of the first series of metric `name` in a Prometheus text page.
fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .find(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// Polls `port`'s `/metrics` until every `(metric, value)` holds; returns
/// the page. Fails the test with the last page after [`PATIENCE`].
async fn wait_for_metrics(port: u16, expected: &[(&str, f64)]) -> String {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let page = get(port, "/metrics").await.map(|(_, body)| body);
        if let Some(page) = &page
            && expected
                .iter()
                .all(|(name, value)| metric(page, name) == Some(*value))
        {
            return page.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics on port {port} never reached {expected:?}; last page:\n{}",
            page.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls `port`'s readiness probe until it answers `status` with `state`;
/// returns the body.
async fn wait_for_health(port: u16, status: u16, state: &str) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut last = None;
    loop {
        if let Some((code, body)) = get(port, "/health/ready").await {
            let json: serde_json::Value =
                serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
            if code == status && json["state"] == state {
                return json;
            }
            last = Some((code, body));
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the readiness probe on port {port} never answered {status} {state}; last: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn service(binary: &std::path::Path, args: &[String]) -> Child {
    Command::new(binary)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start an example service")
}

/// Stops a service with SIGTERM and waits for it to exit 0.
async fn stop(mut child: Child) {
    let pid = child.id().expect("a running service") as i32;
    // SAFETY: sends a signal to a child process this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("the service stops on SIGTERM")
        .expect("the service's exit status");
    assert!(status.success(), "the service exited with {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_of_the_example_services_follow_events_and_the_broker() -> TestResult {
    let mut broker = broker().await;
    let dir = tempfile::tempdir()?;
    let uri = format!(
        "failover:(stomp://127.0.0.1:{})?maxReconnectDelay=500",
        broker.stomp_port()
    );
    // Built first: the ports are picked right before the services bind them.
    let (users_bin, points_bin) = (
        support::example_binary("user_service"),
        support::example_binary("points_service"),
    );
    let (user_port, points_port) = (free_port(), free_port());
    let db = |name: &str| format!("sqlite://{}/{name}.db?mode=rwc", dir.path().display());

    let points = service(
        &points_bin,
        &[
            "--broker".into(),
            uri.clone(),
            "--database".into(),
            db("points"),
            "--metrics".into(),
            format!("127.0.0.1:{points_port}"),
        ],
    );
    // Ready once subscribed: only then does the Virtual Topic queue keep events.
    wait_for_health(points_port, 200, "connected").await;
    let users = service(
        &users_bin,
        &[
            "--broker".into(),
            uri,
            "--database".into(),
            db("users"),
            "--users".into(),
            USERS.to_string(),
            "--rate".into(),
            "0".into(),
            "--metrics".into(),
            format!("127.0.0.1:{user_port}"),
        ],
    );

    let n = USERS as f64;
    // The relay: every event published, none waiting or parked (the gauges
    // are read from the table), every batch timed from claim to receipt.
    let page = wait_for_metrics(
        user_port,
        &[
            ("outbox_relay_published_total", n),
            ("outbox_backlog_rows", 0.0),
            ("outbox_parked_rows", 0.0),
            ("outbox_backlog_oldest_seconds", 0.0),
        ],
    )
    .await;
    assert_eq!(
        metric(&page, "outbox_relay_parked_total").unwrap_or(0.0),
        0.0,
        "{page}"
    );
    let batches = metric(&page, "outbox_relay_publish_seconds_count").unwrap_or(0.0);
    assert!(batches >= 1.0 && batches <= n, "publish histogram: {page}");
    // The consumer: every event applied once, nothing in flight or parked,
    // and each applied event's latency measured from its append.
    let page = wait_for_metrics(
        points_port,
        &[
            ("outbox_consumer_processed_total", n),
            ("outbox_consumer_latency_seconds_count", n),
            ("outbox_consumer_in_flight", 0.0),
            ("outbox_inbox_parked_rows", 0.0),
            ("outbox_inbox_retrying_rows", 0.0),
        ],
    )
    .await;
    assert_eq!(
        metric(&page, "outbox_consumer_duplicates_total").unwrap_or(0.0),
        0.0,
        "{page}"
    );
    assert!(
        page.contains("# TYPE outbox_consumer_latency_seconds histogram"),
        "{page}"
    );
    let relay = wait_for_health(user_port, 200, "connected").await;
    assert_eq!(relay["backlog"], 0, "{relay}");
    assert!(relay["since_last_success_seconds"].is_number(), "{relay}");

    // Broker gone: neither service is ready, both still live.
    broker.kill().await?;
    wait_for_health(user_port, 503, "reconnecting").await;
    wait_for_health(points_port, 503, "reconnecting").await;
    for port in [user_port, points_port] {
        let (code, body) = get(port, "/health/live")
            .await
            .expect("the live probe answers");
        assert_eq!(code, 200, "live while reconnecting: {body}");
    }

    // Broker back: both ready again.
    broker.start_again().await?;
    wait_for_health(user_port, 200, "connected").await;
    wait_for_health(points_port, 200, "connected").await;

    stop(users).await;
    stop(points).await;
    Ok(())
}
