//! A JMS consumer from ActiveMQ's own client selects the relay's messages by
//! event type: the relay sends the event type as the STOMP `type` header, which
//! ActiveMQ maps to `JMSType`, a name JMS selectors can use (hyphenated
//! property names such as `event-type` they cannot). The client is
//! `tests/jms/JmsSelect.java`, compiled with `javac` against the jars of the
//! Debian `activemq` package and run against an OpenWire connector of the
//! test broker.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use outbox::core::{Event, Outbox};
use outbox::relay::StompPublisher;
use outbox_test_harness::{Broker, BrokerConfig};
use support::*;

/// ActiveMQ's jars: `$ACTIVEMQ_HOME/lib`, by default the Debian package's.
fn activemq_lib() -> PathBuf {
    let home = std::env::var_os("ACTIVEMQ_HOME")
        .map_or_else(|| PathBuf::from("/usr/share/activemq"), PathBuf::from);
    home.join("lib")
}

/// Compiles the JMS client into `out`; returns the class path to run it with.
async fn compile_client(out: &Path) -> String {
    let classpath = format!("{}/*", activemq_lib().display());
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/jms/JmsSelect.java");
    let status = tokio::process::Command::new("javac")
        .args(["-cp", &classpath, "-d"])
        .arg(out)
        .arg(&source)
        .status()
        .await
        .expect("javac runs (scripts/setup.sh installs the JDK)");
    assert!(status.success(), "javac failed on {}", source.display());
    format!("{}:{classpath}", out.display())
}

#[tokio::test]
async fn a_jms_consumer_selecting_on_jmstype_receives_exactly_that_event_type() {
    let Some(db) = sqlite().await else { return };
    let outbox = Outbox::new(db.pool().clone());
    outbox.migrate().await.unwrap();
    let broker = Broker::start_with(BrokerConfig::default().with_openwire())
        .await
        .expect("ActiveMQ with an OpenWire connector");
    let queue = "jms.select";
    let destination = format!("/queue/{queue}");
    let mut created = Vec::new();
    let mut tx = outbox.pool().begin().await.unwrap();
    for n in 0..10 {
        let kind = if n % 2 == 0 {
            "user.created"
        } else {
            "user.deleted"
        };
        let event = Event::json(kind, &destination, &serde_json::json!({ "n": n })).unwrap();
        let id = outbox.append(&mut tx, event).await.unwrap();
        if kind == "user.created" {
            created.push(id.to_string());
        }
    }
    outbox.commit(tx).await.unwrap();
    let relay = outbox
        .relay(
            StompPublisher::new(client(&broker).await),
            outbox::core::RelayConfig::default(),
        )
        .unwrap()
        .spawn();
    wait_published(&outbox, Duration::from_secs(30)).await;
    relay.shutdown().await.unwrap();

    let classes = tempfile::tempdir().unwrap();
    let classpath = compile_client(classes.path()).await;
    let uri = broker.openwire_uri().expect("an OpenWire connector");
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("java")
            .args(["-cp", &classpath, "JmsSelect", &uri, queue])
            .arg("JMSType = 'user.created'")
            .arg("3000")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the JMS client ends")
    .expect("java runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "JMS client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut seen: Vec<(String, String)> = stdout
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(kind, id)| (kind.to_owned(), id.to_owned()))
        .collect();
    seen.sort();
    let mut expected: Vec<(String, String)> = created
        .iter()
        .map(|id| ("user.created".to_owned(), id.clone()))
        .collect();
    expected.sort();
    assert_eq!(seen, expected, "exactly the user.created events, once each");
    // The others are still on the queue, for another selector.
    let rest = drain(&broker, &destination, Duration::from_secs(2)).await;
    assert_eq!(rest.len(), 5);
    assert!(
        rest.iter()
            .all(|r| r.event_type.as_deref() == Some("user.deleted"))
    );
}
