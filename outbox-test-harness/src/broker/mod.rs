//! A real ActiveMQ Classic broker in a child JVM, owned by one test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::LOG4J_PROPERTIES;
use crate::paths::{target_dir, unique_name};
use crate::process::send_signal;
use crate::raw_stomp::RawStomp;
use crate::tls::{self, TlsFiles};
use crate::{BrokerConfig, Credentials, HarnessError};

mod launch;
use launch::{
    all_threads_stopped, find_java, free_ports, keep_broker_data, loopback,
    remove_orphaned_folders, write_file,
};

/// Where the Debian package puts ActiveMQ; `ACTIVEMQ_HOME` overrides it.
const DEFAULT_ACTIVEMQ_HOME: &str = "/usr/share/activemq";

/// The Debian packages that provide `java` and ActiveMQ.
const INSTALL_BROKER: &str = "apt-get install -y openjdk-17-jre-headless activemq";

/// Set (to anything but `0` or empty) to keep broker folders after the test.
pub const KEEP_BROKER_DATA_VAR: &str = "OUTBOX_KEEP_BROKER_DATA";

/// Names the process that owns a broker folder, so orphans can be recognised.
const OWNER_FILE: &str = "owner.pid";

/// How often a fresh broker may pick new ports after finding its ports taken.
const PORT_ATTEMPTS: usize = 5;

/// How long a graceful stop may take before the JVM is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Pause between readiness probes and between exit checks.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Lines of the broker log quoted in start-up errors.
const LOG_TAIL_LINES: usize = 40;

/// An ActiveMQ broker running in its own JVM, with its own ports and its own
/// KahaDB folder under `target/test-brokers/`.
///
/// The broker listens on loopback only: a STOMP connector and, if asked for, a
/// `stomp+ssl` connector. It keeps its ports and data folder across
/// [`kill`](Self::kill), [`stop`](Self::stop), [`restart`](Self::restart) and
/// [`start_again`](Self::start_again), so persistent messages survive them.
///
/// Dropping the broker kills the JVM and removes its folder (unless
/// `OUTBOX_KEEP_BROKER_DATA` is set). The JVM also receives SIGKILL if the test
/// process dies, so no broker outlives its test run.
///
/// ```no_run
/// # async fn demo() -> Result<(), outbox_test_harness::HarnessError> {
/// use outbox_test_harness::Broker;
///
/// let mut broker = Broker::start().await?;
/// let mut stomp = broker.raw_connect().await?;
/// assert_eq!(stomp.handshake(None).await?.command, "CONNECTED");
/// broker.kill().await?;
/// broker.start_again().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Broker {
    config: BrokerConfig,
    java: PathBuf,
    activemq_home: PathBuf,
    base_dir: PathBuf,
    data_dir: PathBuf,
    conf_dir: PathBuf,
    log_path: PathBuf,
    stomp_port: u16,
    ssl_port: Option<u16>,
    openwire_port: Option<u16>,
    tls: Option<TlsFiles>,
    child: Option<Child>,
    /// Set when start-up failed, so the log the error points to stays readable.
    keep_folder: bool,
}

impl Broker {
    /// Starts a broker with the default configuration: one plain STOMP
    /// connector, no authentication.
    pub async fn start() -> Result<Broker, HarnessError> {
        Broker::start_with(BrokerConfig::default()).await
    }

    /// Starts a broker and waits until it answers a STOMP `CONNECT` with
    /// `CONNECTED` (and, with SSL, until the `stomp+ssl` port accepts TCP).
    ///
    /// Fails at once if `java` or the ActiveMQ jar is missing, and otherwise
    /// after the configured ready timeout, quoting the end of the broker log.
    pub async fn start_with(config: BrokerConfig) -> Result<Broker, HarnessError> {
        let java = find_java()?;
        let activemq_home = std::env::var_os("ACTIVEMQ_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ACTIVEMQ_HOME));
        let jar = activemq_home.join("bin/activemq.jar");
        if !jar.is_file() {
            return Err(HarnessError::Missing {
                what: "the ActiveMQ jar",
                detail: format!("no {}", jar.display()),
                install: INSTALL_BROKER,
            });
        }

        let brokers_dir = target_dir().join("test-brokers");
        if !keep_broker_data() {
            remove_orphaned_folders(&brokers_dir);
        }
        let base_dir = brokers_dir.join(unique_name("broker-"));
        let data_dir = base_dir.join("data");
        let conf_dir = base_dir.join("conf");
        for dir in [&data_dir, &conf_dir, &base_dir.join("tmp")] {
            std::fs::create_dir_all(dir)
                .map_err(|e| HarnessError::io(format!("creating {}", dir.display()), e))?;
        }
        let mut broker = Broker {
            java,
            activemq_home,
            log_path: base_dir.join("broker.log"),
            data_dir,
            conf_dir,
            base_dir,
            stomp_port: 0,
            ssl_port: None,
            openwire_port: None,
            tls: None,
            child: None,
            keep_folder: false,
            config,
        };
        // From here on, dropping `broker` on an error removes the folder; only a
        // failed launch keeps it, for its log.
        write_file(
            &broker.base_dir.join(OWNER_FILE),
            &std::process::id().to_string(),
        )?;
        if broker.config.ssl {
            broker.tls = Some(tls::generate(&broker.base_dir.join("tls"))?);
        }
        write_file(&broker.conf_dir.join("log4j.properties"), LOG4J_PROPERTIES)?;

        let mut attempt = 1;
        loop {
            let [stomp, ssl, openwire] = free_ports()?;
            broker.stomp_port = stomp;
            broker.ssl_port = broker.config.ssl.then_some(ssl);
            broker.openwire_port = broker.config.openwire.then_some(openwire);
            broker.write_activemq_xml()?;
            let log_start = broker.log_len();
            match broker.launch().await {
                Err(HarnessError::BrokerExited { .. })
                    if attempt < PORT_ATTEMPTS && broker.log_shows_port_clash(log_start) =>
                {
                    attempt += 1;
                }
                Ok(()) => return Ok(broker),
                Err(e) => {
                    broker.keep_folder = true;
                    return Err(e);
                }
            }
        }
    }

    /// The plain STOMP port on 127.0.0.1.
    pub fn stomp_port(&self) -> u16 {
        self.stomp_port
    }

    /// The plain STOMP address, `127.0.0.1:<stomp_port>`.
    pub fn stomp_addr(&self) -> SocketAddr {
        loopback(self.stomp_port)
    }

    /// The plain STOMP connector as a URI, e.g. `stomp://127.0.0.1:61999`.
    pub fn stomp_uri(&self) -> String {
        format!("stomp://127.0.0.1:{}", self.stomp_port)
    }

    /// The `stomp+ssl` port, if the broker was configured with SSL.
    pub fn ssl_port(&self) -> Option<u16> {
        self.ssl_port
    }

    /// The OpenWire connector as a URI for ActiveMQ's JMS client, e.g.
    /// `tcp://127.0.0.1:61999`, if the broker was configured with one
    /// ([`BrokerConfig::with_openwire`](crate::BrokerConfig::with_openwire)).
    pub fn openwire_uri(&self) -> Option<String> {
        self.openwire_port
            .map(|port| format!("tcp://127.0.0.1:{port}"))
    }

    /// The `stomp+ssl` address, if the broker was configured with SSL.
    pub fn ssl_addr(&self) -> Option<SocketAddr> {
        self.ssl_port.map(loopback)
    }

    /// The SSL connector as a URI, e.g. `stomp+ssl://127.0.0.1:61998`.
    pub fn ssl_uri(&self) -> Option<String> {
        self.ssl_port
            .map(|port| format!("stomp+ssl://127.0.0.1:{port}"))
    }

    /// PEM file of the CA that signed the broker's certificate; trust it to
    /// verify the `stomp+ssl` connector as `localhost` or `127.0.0.1`.
    pub fn ca_cert_pem(&self) -> Option<&Path> {
        self.tls.as_ref().map(|tls| tls.ca_cert_pem.as_path())
    }

    /// The broker's data folder (`activemq.data`, with KahaDB in `kahadb/`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The broker's log file; it is appended to across restarts.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The login and passcode every connection must present, if any.
    pub fn credentials(&self) -> Option<&Credentials> {
        self.config.credentials.as_ref()
    }

    /// The JVM's process id while the broker runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Opens a TCP connection to the plain STOMP port for a raw exchange.
    pub async fn raw_connect(&self) -> Result<RawStomp<TcpStream>, HarnessError> {
        RawStomp::connect(self.stomp_addr()).await
    }

    /// Stops the broker gracefully (SIGTERM) and waits for the JVM to exit; after
    /// 30 s it is killed. Does nothing if the broker is not running.
    pub async fn stop(&mut self) -> Result<(), HarnessError> {
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        if self.exit_status()?.is_some() {
            self.child = None;
            return Ok(());
        }
        send_signal(pid, libc::SIGTERM, "SIGTERM")?;
        // A paused JVM would never act on SIGTERM.
        send_signal(pid, libc::SIGCONT, "SIGCONT")?;
        if self.wait_for_exit(STOP_TIMEOUT).await?.is_none() {
            self.kill().await?;
        }
        self.child = None;
        Ok(())
    }

    /// Kills the JVM with SIGKILL, as a crash would, and waits until it is gone.
    /// Does nothing if the broker is not running.
    pub async fn kill(&mut self) -> Result<(), HarnessError> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        if child.try_wait().ok().flatten().is_none() {
            child
                .kill()
                .map_err(|e| HarnessError::io("killing the broker JVM", e))?;
        }
        // SIGKILL cannot be ignored, so this wait ends.
        while self.wait_for_exit(STOP_TIMEOUT).await?.is_none() {}
        self.child = None;
        Ok(())
    }

    /// Freezes the JVM (SIGSTOP): connections stay open but nothing answers.
    pub fn pause(&self) -> Result<(), HarnessError> {
        let pid = self.pid().ok_or(HarnessError::NotRunning)?;
        send_signal(pid, libc::SIGSTOP, "SIGSTOP")?;
        // kill(2) returns before every thread has stopped: wait until the
        // kernel reports each one stopped, so nothing the caller sends next is
        // read by a thread still running (up to a second, then go on).
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while !all_threads_stopped(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// Lets a paused JVM run again (SIGCONT).
    pub fn resume(&self) -> Result<(), HarnessError> {
        let pid = self.pid().ok_or(HarnessError::NotRunning)?;
        send_signal(pid, libc::SIGCONT, "SIGCONT")
    }

    /// Stops the broker gracefully if it runs, then starts it again on the same
    /// ports and data folder and waits until it is ready.
    pub async fn restart(&mut self) -> Result<(), HarnessError> {
        self.stop().await?;
        self.start_again().await
    }

    /// Stops the broker gracefully, then starts it again on the same ports
    /// and data folder with its configuration changed by `change` (users,
    /// authorisation, policies: what a broker's operator changes with a
    /// restart). SSL and OpenWire stay as they were started.
    pub async fn restart_with(
        &mut self,
        change: impl FnOnce(BrokerConfig) -> BrokerConfig,
    ) -> Result<(), HarnessError> {
        self.stop().await?;
        let (ssl, openwire) = (self.config.ssl, self.config.openwire);
        let mut config = change(self.config.clone());
        config.ssl = ssl;
        config.openwire = openwire;
        self.config = config;
        self.write_activemq_xml()?;
        self.start_again().await
    }

    /// Starts a stopped or killed broker again on the same ports and data folder
    /// and waits until it is ready.
    pub async fn start_again(&mut self) -> Result<(), HarnessError> {
        if let Some(pid) = self.pid() {
            if self.exit_status()?.is_none() {
                return Err(HarnessError::AlreadyRunning { pid });
            }
            self.child = None;
        }
        // The old JVM's sockets may linger for a moment; keep the same ports and retry.
        let deadline = Instant::now() + self.config.ready_timeout;
        loop {
            let log_start = self.log_len();
            match self.launch().await {
                Err(HarnessError::BrokerExited { .. })
                    if Instant::now() < deadline && self.log_shows_port_clash(log_start) =>
                {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                result => return result,
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Errors here mean the JVM is already gone.
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.keep_folder || keep_broker_data() {
            eprintln!("keeping broker files in {}", self.base_dir.display());
        } else {
            // Best effort: a leftover folder under target/ harms nothing.
            let _ = std::fs::remove_dir_all(&self.base_dir);
        }
    }
}
