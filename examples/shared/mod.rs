//! What the user service and the points service share: logging, stopping on
//! a signal, connecting to the broker, and the SQLite settings.
#![allow(dead_code)]

pub(crate) mod ops;

use std::io::IsTerminal as _;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outbox::stomp::{Client, Config};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Logs to stderr; `RUST_LOG` sets the filter (default `info`).
pub(crate) fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    tracing_subscriber::registry().with(log_layer()).init();
}

/// The log filter: `RUST_LOG`, default `info`.
pub(crate) fn log_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into())
}

/// Log lines on stderr, coloured on a terminal, filtered by [`log_filter`]
/// (the filter is the log's own: spans for other layers pass whatever it says).
pub(crate) fn log_layer<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer as _;
    tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_filter(log_filter())
}

/// A stop flag raised by SIGINT or SIGTERM.
pub(crate) fn stop_on_signals() -> std::io::Result<Arc<watch::Sender<bool>>> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let stop = Arc::new(watch::channel(false).0);
    let flag = stop.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        tracing::info!("{name} received; shutting down");
        flag.send_replace(true);
    });
    Ok(stop)
}

/// Connects, retrying while the broker is unreachable; `None` if stopped first.
pub(crate) async fn connect(
    config: Config,
    mut stop: watch::Receiver<bool>,
) -> Result<Option<Client>, BoxError> {
    let mut delay = Duration::from_millis(100);
    loop {
        let attempt = tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return Ok(None),
            attempt = Client::connect(config.clone()) => attempt,
        };
        match attempt {
            Ok(client) => {
                tracing::info!(broker = %config.uri, "connected to the broker");
                return Ok(Some(client));
            }
            Err(error @ outbox::stomp::Error::ConnectRejected(_)) => return Err(error.into()),
            Err(error) => {
                tracing::warn!(%error, broker = %config.uri, "broker not reachable; retrying");
                tokio::select! {
                    _ = stop.wait_for(|stopped| *stopped) => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// The SQLite settings of the examples: WAL and `synchronous=NORMAL` — commits
/// are durable against a crash of the process, and readers do not block the
/// writer.
pub(crate) fn sqlite_options(url: &str) -> Result<SqliteConnectOptions, BoxError> {
    Ok(SqliteConnectOptions::from_str(url)?
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10)))
}

/// A SQLite pool with [`sqlite_options`], creating the file's folder if needed.
pub(crate) async fn open_sqlite(
    url: &str,
    max_connections: u32,
) -> Result<sqlx::SqlitePool, BoxError> {
    let options = sqlite_options(url)?;
    if let Some(dir) = options.get_filename().parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    // No ping before each use (see the README's pool settings): the services
    // retry whatever fails on a broken connection.
    Ok(SqlitePoolOptions::new()
        .max_connections(max_connections)
        .test_before_acquire(false)
        .connect_with(options)
        .await?)
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
