//! The broker harness against a real ActiveMQ: readiness, persistence across a
//! crash, authentication, authorisation, pausing and the `stomp+ssl` connector.

use std::sync::Arc;
use std::time::Duration;

use outbox_test_harness::{
    Authorization, Broker, BrokerConfig, Credentials, HarnessError, RawFrame, RawStomp,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn assert_connected(reply: &RawFrame) {
    assert_eq!(reply.command, "CONNECTED", "unexpected reply: {reply:?}");
    assert_eq!(reply.header("version"), Some("1.2"));
    assert!(
        reply
            .header("server")
            .is_some_and(|server| server.starts_with("ActiveMQ/")),
        "{reply:?}"
    );
}

/// Completes the STOMP handshake on `stomp` and checks that it succeeded.
async fn connected<S: AsyncRead + AsyncWrite + Unpin>(
    mut stomp: RawStomp<S>,
    credentials: Option<&Credentials>,
) -> Result<RawStomp<S>, HarnessError> {
    let reply = stomp.handshake(credentials).await?;
    assert_connected(&reply);
    Ok(stomp)
}

#[tokio::test]
async fn a_started_broker_answers_connect_over_a_raw_tcp_socket() -> TestResult {
    let broker = Broker::start().await?;
    assert_eq!(
        broker.stomp_uri(),
        format!("stomp://127.0.0.1:{}", broker.stomp_port())
    );
    assert!(broker.ssl_port().is_none() && broker.ca_cert_pem().is_none());
    assert!(broker.data_dir().join("kahadb").is_dir());

    let socket = TcpStream::connect(("127.0.0.1", broker.stomp_port())).await?;
    let mut stomp = RawStomp::new(socket);
    stomp
        .send_bytes(b"CONNECT\naccept-version:1.2\nhost:localhost\n\n\0")
        .await?;
    assert_connected(&stomp.read_frame().await?);
    Ok(())
}

#[tokio::test]
async fn a_persistent_message_survives_kill_9_and_a_restart_on_the_same_data() -> TestResult {
    let mut broker = Broker::start().await?;
    let queue = "/queue/harness.survivor";
    let port = broker.stomp_port();

    let mut producer = connected(broker.raw_connect().await?, None).await?;
    producer
        .send_frame(
            "SEND",
            &[
                ("destination", queue),
                ("persistent", "true"),
                ("receipt", "send-1"),
            ],
            b"written before the crash",
        )
        .await?;
    let receipt = producer.read_frame().await?;
    assert_eq!(receipt.command, "RECEIPT", "{receipt:?}");
    assert_eq!(receipt.header("receipt-id"), Some("send-1"));

    broker.kill().await?;
    assert!(broker.pid().is_none());
    broker.start_again().await?;
    assert_eq!(broker.stomp_port(), port);

    let mut consumer = connected(broker.raw_connect().await?, None).await?;
    consumer
        .send_frame(
            "SUBSCRIBE",
            &[
                ("destination", queue),
                ("id", "0"),
                ("ack", "client-individual"),
            ],
            b"",
        )
        .await?;
    let message = consumer.read_frame().await?;
    assert_eq!(message.command, "MESSAGE", "{message:?}");
    assert_eq!(message.body_text(), "written before the crash");
    assert_eq!(message.header("persistent"), Some("true"));
    let ack = message
        .header("ack")
        .ok_or("MESSAGE without an ack header")?;
    consumer
        .send_frame("ACK", &[("id", ack), ("receipt", "ack-1")], b"")
        .await?;
    assert_eq!(consumer.read_frame().await?.command, "RECEIPT");
    Ok(())
}

#[tokio::test]
async fn with_credentials_a_wrong_passcode_gets_an_error_frame() -> TestResult {
    let broker =
        Broker::start_with(BrokerConfig::default().with_credentials("alice", "s3cret")).await?;
    let credentials = broker.credentials().ok_or("credentials were configured")?;
    assert_eq!(
        (credentials.login(), credentials.passcode()),
        ("alice", "s3cret")
    );

    let wrong = Credentials::new("alice", "not-the-passcode");
    let reply = broker.raw_connect().await?.handshake(Some(&wrong)).await?;
    assert_eq!(reply.command, "ERROR", "{reply:?}");

    let reply = broker.raw_connect().await?.handshake(None).await?;
    assert_eq!(reply.command, "ERROR", "{reply:?}");

    connected(broker.raw_connect().await?, Some(credentials)).await?;
    Ok(())
}

#[tokio::test]
async fn the_ssl_connector_serves_a_certificate_the_generated_ca_vouches_for() -> TestResult {
    let broker = Broker::start_with(BrokerConfig::default().with_ssl()).await?;
    let ssl_port = broker.ssl_port().ok_or("SSL was configured")?;
    assert_ne!(ssl_port, broker.stomp_port());
    assert_eq!(
        broker.ssl_uri(),
        Some(format!("stomp+ssl://127.0.0.1:{ssl_port}"))
    );
    let ca_pem = broker.ca_cert_pem().ok_or("SSL was configured")?;
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut std::io::BufReader::new(std::fs::File::open(ca_pem)?)) {
        roots.add(cert?)?;
    }
    // Named explicitly: more than one rustls provider may be compiled in.
    // *ring*, as the client library uses; rustls 0.23.48 deprecates it for
    // lacking post-quantum key exchange, the versions before do not (so
    // `allow`, not `expect`).
    #[allow(deprecated)]
    let ring = tokio_rustls::rustls::crypto::ring::default_provider();
    let provider = Arc::new(ring);
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = TlsConnector::from(Arc::new(config));

    for name in ["localhost", "127.0.0.1"] {
        let tcp = TcpStream::connect(("127.0.0.1", ssl_port)).await?;
        let tls = connector.connect(ServerName::try_from(name)?, tcp).await?;
        connected(RawStomp::new(tls), None).await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_paused_broker_answers_only_after_resume() -> TestResult {
    let broker = Broker::start().await?;
    let mut stomp = broker.raw_connect().await?;
    broker.pause()?;
    stomp.set_read_timeout(Duration::from_millis(500));
    let silent = stomp.handshake(None).await;
    assert!(
        matches!(silent, Err(HarnessError::Timeout { .. })),
        "a paused broker answered: {silent:?}"
    );
    broker.resume()?;
    stomp.set_read_timeout(Duration::from_secs(30));
    assert_connected(&stomp.read_frame().await?);
    Ok(())
}

#[tokio::test]
async fn a_graceful_restart_keeps_ports_and_a_second_start_is_refused() -> TestResult {
    let mut broker = Broker::start().await?;
    let (port, data_dir) = (broker.stomp_port(), broker.data_dir().to_path_buf());
    assert!(matches!(
        broker.start_again().await,
        Err(HarnessError::AlreadyRunning { .. })
    ));
    broker.restart().await?;
    assert_eq!(broker.stomp_port(), port);
    assert_eq!(broker.data_dir(), data_dir);
    connected(broker.raw_connect().await?, None).await?;

    broker.stop().await?;
    assert!(broker.pause().is_err(), "a stopped broker cannot be paused");
    broker.start_again().await?;
    connected(broker.raw_connect().await?, None).await?;
    Ok(())
}

#[tokio::test]
async fn dropping_a_broker_removes_its_folder() -> TestResult {
    if std::env::var_os(outbox_test_harness::KEEP_BROKER_DATA_VAR).is_some() {
        eprintln!("notice: broker folders are kept on request; nothing to check");
        return Ok(());
    }
    let broker = Broker::start().await?;
    let folder = broker
        .data_dir()
        .parent()
        .ok_or("the data folder has a parent")?
        .to_path_buf();
    assert!(folder.is_dir());
    assert!(folder.parent().is_some_and(|p| p.ends_with("test-brokers")));
    drop(broker);
    assert!(!folder.exists(), "{} is still there", folder.display());
    Ok(())
}

#[tokio::test]
async fn a_jvm_that_exits_during_start_up_is_reported_with_its_log() -> TestResult {
    // A 1 MiB heap is too small for the JVM to start at all.
    let outcome = Broker::start_with(BrokerConfig::default().with_max_heap_mb(1)).await;
    match outcome {
        Err(HarnessError::BrokerExited { log_tail, .. }) => {
            assert!(log_tail.contains("heap"), "log tail: {log_tail}");
        }
        other => panic!("expected BrokerExited, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn a_broker_that_is_not_ready_in_time_is_reported_with_its_log_file() -> TestResult {
    let outcome =
        Broker::start_with(BrokerConfig::default().with_ready_timeout(Duration::ZERO)).await;
    match outcome {
        Err(error @ HarnessError::BrokerNotReady { .. }) => {
            assert!(error.to_string().contains("broker.log"), "{error}");
        }
        other => panic!("expected BrokerNotReady, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn with_authorization_a_send_the_map_forbids_is_refused_until_a_restart_grants_it()
-> TestResult {
    let open = || Authorization::queue("test.authz.open").all("relay");
    let mut broker = Broker::start_with(
        BrokerConfig::default()
            .with_credentials("admin", "admin-secret")
            .with_user("relay", "relay-secret", ["relay"])
            .with_authorization([open()]),
    )
    .await?;
    let relay = Credentials::new("relay", "relay-secret");
    let mut stomp = broker.raw_connect().await?;
    assert_eq!(stomp.handshake(Some(&relay)).await?.command, "CONNECTED");
    let send = async |stomp: &mut RawStomp<TcpStream>, queue: &str, receipt: &str| {
        stomp
            .send_frame(
                "SEND",
                &[("destination", queue), ("receipt", receipt)],
                b"x",
            )
            .await?;
        stomp.read_frame().await
    };
    let reply = send(&mut stomp, "/queue/test.authz.open", "r1").await?;
    assert_eq!(reply.command, "RECEIPT", "{reply:?}");
    let reply = send(&mut stomp, "/queue/test.authz.closed", "r2").await?;
    assert_eq!(reply.command, "ERROR", "{reply:?}");
    assert_eq!(reply.header("receipt-id"), Some("r2"), "{reply:?}");
    let message = reply.header("message").unwrap_or_default().to_owned();
    assert!(message.contains("not authorized to write to"), "{message}");
    // The refusal concerns that send only: the connection goes on.
    let reply = send(&mut stomp, "/queue/test.authz.open", "r3").await?;
    assert_eq!(reply.command, "RECEIPT", "{reply:?}");
    drop(stomp);

    broker
        .restart_with(|config| {
            config.with_authorization([
                open(),
                Authorization::queue("test.authz.closed").all("relay"),
            ])
        })
        .await?;
    let mut stomp = broker.raw_connect().await?;
    assert_eq!(stomp.handshake(Some(&relay)).await?.command, "CONNECTED");
    let reply = send(&mut stomp, "/queue/test.authz.closed", "r4").await?;
    assert_eq!(reply.command, "RECEIPT", "{reply:?}");
    Ok(())
}
