//! The relay when its database fails on the paths after a failed publish, on
//! PostgreSQL and MySQL/MariaDB (modules `postgres`, `mysql`), with a real
//! ActiveMQ: the relay's database connections go through the harness's fault
//! proxy, and so does its broker connection.
//!
//! The broker is blackholed while the relay publishes one batch and has
//! claimed the next (read-ahead); then every database connection is reset and
//! new ones refused, so when the receipt times out, giving back both batches
//! fails. The relay must keep going: once both come back, every event arrives.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use outbox::core::relay::StompPublisher;
use outbox::core::{Backoff, Event, Outbox, RelayConfig};
use outbox::stomp::{Client, Config};
use outbox_test_harness::FaultProxy;
use support::*;

const EVENTS: usize = 100;
const BATCH: u32 = 20;
const RECEIPT: Duration = Duration::from_millis(1500);

/// `url` with its `host:port` replaced by `addr`.
fn via(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").expect("URL with a scheme");
    let (authority, path) = rest.split_once('/').expect("URL with a database");
    let host_at = authority.rfind('@').map_or(0, |at| at + 1);
    format!("{scheme}://{}{addr}/{path}", &authority[..host_at])
}

/// The server address of `url` (`host:port`).
fn server(url: &str) -> SocketAddr {
    let rest = url.split_once("://").expect("URL with a scheme").1;
    let authority = rest.split_once('/').expect("URL with a database").0;
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    hostport.parse().expect("host:port")
}

fn relay_config() -> RelayConfig {
    RelayConfig::default()
        .with_batch_size(BATCH)
        // Longer than a publish with RECEIPT can take.
        .with_lease(Duration::from_secs(5))
        .with_poll_interval(Duration::from_millis(50))
        .with_outage_backoff(Backoff::new(
            Duration::from_millis(50),
            Duration::from_millis(300),
        ))
        .with_retention(None)
        // Every batch is claimed, so the second one is claimed during the first
        // one's publish.
        .with_handoff(false)
}

macro_rules! db_fault_suite {
    ($db:ty, $open:path) => {
        use super::*;

        type Db = $db;

        /// Rows claimed now and not published.
        async fn claimed(pool: &sqlx::Pool<Db>) -> i64 {
            sqlx::query_scalar(
                "SELECT COUNT(*) FROM outbox_event WHERE process = 'NEW' AND claimed_by IS NOT NULL",
            )
            .fetch_one(pool)
            .await
            .unwrap()
        }

        #[tokio::test]
        async fn a_relay_whose_database_fails_while_it_gives_back_a_failed_batch_keeps_going() {
            let Some(db) = $open().await else { return };
            let outbox = Outbox::new(db.pool().clone());
            outbox.migrate().await.unwrap();
            let destination = "/queue/relay-db-faults";
            let mut tx = outbox.pool().begin().await.unwrap();
            for i in 0..EVENTS {
                let event = Event::json("db.fault", destination, &serde_json::json!({ "seq": i }))
                    .unwrap()
                    .with_key(format!("k{}", i % 10));
                outbox.append(&mut tx, event).await.unwrap();
            }
            tx.commit().await.unwrap();

            let db_proxy = FaultProxy::start(server(db.url())).await.unwrap();
            let pool = sqlx::pool::PoolOptions::<Db>::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(2))
                .test_before_acquire(false)
                .connect(&via(db.url(), db_proxy.addr()))
                .await
                .unwrap();
            let broker = broker().await;
            let broker_proxy = FaultProxy::start(broker.stomp_addr()).await.unwrap();
            let config = Config::parse(&format!(
                "failover:({})?initialReconnectDelay=50&maxReconnectDelay=300",
                broker_proxy.stomp_uri()
            ))
            .unwrap()
            .with_receipt_timeout(RECEIPT)
            .with_connect_timeout(Duration::from_secs(1));
            let client = Client::connect(config).await.unwrap();

            // Frames reach the proxy and go no further: the first publish waits
            // for its receipt while the relay claims the next batch.
            broker_proxy.blackhole();
            let relay = Outbox::new(pool)
                .relay(StompPublisher::new(client), relay_config())
                .unwrap()
                .spawn();
            let until = tokio::time::Instant::now() + Duration::from_secs(20);
            while claimed(db.pool()).await < i64::from(BATCH) * 2 {
                assert!(tokio::time::Instant::now() < until, "the relay never claimed two batches");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // The database goes away before the receipt times out.
            db_proxy.refuse(true);
            db_proxy.reset();
            let until = tokio::time::Instant::now() + Duration::from_secs(30);
            while relay.metrics().snapshot().unavailable == 0 || relay.metrics().snapshot().db_errors < 2 {
                assert!(!relay.is_finished(), "the relay ended on a database error");
                assert!(tokio::time::Instant::now() < until, "no failed publish and release: {:?}", relay.metrics().snapshot());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(claimed(db.pool()).await, i64::from(BATCH) * 2, "nothing was given back");
            assert!(!relay.is_finished(), "the relay ended on a database error");

            db_proxy.pass();
            broker_proxy.pass();
            // The rows not given back wait for their lease, then go out.
            wait_published(&outbox, Duration::from_secs(90)).await;
            assert!(!relay.is_finished());
            relay.shutdown().await.unwrap();

            let received = drain(&broker, destination, Duration::from_secs(2)).await;
            let counts = tally(&received);
            assert_eq!(counts.len(), EVENTS, "every event arrives");
        }
    };
}

mod postgres {
    db_fault_suite!(sqlx::Postgres, crate::support::postgres);
}

mod mysql {
    db_fault_suite!(sqlx::MySql, crate::support::mysql);
}
