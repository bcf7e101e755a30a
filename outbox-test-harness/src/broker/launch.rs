//! Starting the JVM: ports, the broker's configuration files, the wait until
//! it answers, and the process helpers around it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::HarnessError;
use crate::config::BrokerLayout;
use crate::paths::{env_flag, file_tail};
use crate::process::{process_exists, spawn_tied_to_process};

use super::{
    Broker, INSTALL_BROKER, KEEP_BROKER_DATA_VAR, LOG_TAIL_LINES, OWNER_FILE, POLL_INTERVAL,
};

impl Broker {
    /// Spawns the JVM and waits until the broker is ready; on failure no JVM is left.
    pub(super) async fn launch(&mut self) -> Result<(), HarnessError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| HarnessError::io(format!("opening {}", self.log_path.display()), e))?;
        let log_for_stderr = log
            .try_clone()
            .map_err(|e| HarnessError::io("duplicating the log file handle", e))?;
        let mut command = Command::new(&self.java);
        command
            .arg(format!("-Xmx{}m", self.config.max_heap_mb))
            .arg(format!("-Xms{}m", self.config.max_heap_mb.min(64)))
            .arg("-XX:+UseSerialGC")
            .arg("-Djava.awt.headless=true")
            .arg(jvm_property("java.io.tmpdir", &self.base_dir.join("tmp")))
            .arg(format!(
                "-Dlog4j.configuration=file:{}",
                self.conf_dir.join("log4j.properties").display()
            ))
            .arg(jvm_property("activemq.home", &self.activemq_home))
            .arg(jvm_property("activemq.base", &self.base_dir))
            .arg(jvm_property("activemq.conf", &self.conf_dir))
            .arg(jvm_property("activemq.data", &self.data_dir))
            .arg("-jar")
            .arg(self.activemq_home.join("bin/activemq.jar"))
            .arg("start")
            .arg(format!(
                "xbean:file:{}",
                self.conf_dir.join("activemq.xml").display()
            ))
            .current_dir(&self.base_dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr);
        self.child = Some(spawn_tied_to_process(command)?);
        let result = self.await_ready().await;
        if result.is_err() {
            self.kill().await?;
        }
        result
    }

    pub(super) async fn await_ready(&mut self) -> Result<(), HarnessError> {
        let timeout = self.config.ready_timeout;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status()? {
                return Err(HarnessError::BrokerExited {
                    status: status.to_string(),
                    log: self.log_path.clone(),
                    log_tail: file_tail(&self.log_path, LOG_TAIL_LINES),
                });
            }
            let last_attempt = match tokio::time::timeout_at(deadline, self.probe()).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "the probe itself timed out".to_owned(),
            };
            if Instant::now() >= deadline {
                return Err(HarnessError::BrokerNotReady {
                    timeout,
                    last_attempt,
                    log: self.log_path.clone(),
                    log_tail: file_tail(&self.log_path, LOG_TAIL_LINES),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// One readiness check: STOMP `CONNECT` gets `CONNECTED`, and the SSL port
    /// (if any) accepts TCP.
    pub(super) async fn probe(&self) -> Result<(), HarnessError> {
        let mut stomp = self.raw_connect().await?;
        let reply = stomp.handshake(self.credentials()).await?;
        if reply.command != "CONNECTED" {
            return Err(HarnessError::Stomp(format!(
                "CONNECT answered with {}: {}",
                reply.command,
                reply.header("message").unwrap_or_default()
            )));
        }
        // Best effort: the probe's connection is dropped either way.
        let _ = stomp.send_frame("DISCONNECT", &[], b"").await;
        if let Some(addr) = self.ssl_addr() {
            TcpStream::connect(addr)
                .await
                .map_err(|e| HarnessError::io(format!("connecting to the SSL port {addr}"), e))?;
        }
        if let Some(port) = self.openwire_port {
            let addr = loopback(port);
            TcpStream::connect(addr).await.map_err(|e| {
                HarnessError::io(format!("connecting to the OpenWire port {addr}"), e)
            })?;
        }
        Ok(())
    }

    pub(super) fn exit_status(&mut self) -> Result<Option<ExitStatus>, HarnessError> {
        match self.child.as_mut() {
            None => Ok(None),
            Some(child) => child
                .try_wait()
                .map_err(|e| HarnessError::io("checking the broker JVM", e)),
        }
    }

    /// Polls until the JVM has exited (`Some`) or `timeout` passed (`None`).
    pub(super) async fn wait_for_exit(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<ExitStatus>, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    pub(super) fn write_activemq_xml(&self) -> Result<(), HarnessError> {
        let name = self
            .base_dir
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "outbox-test".into());
        let xml = BrokerLayout {
            name: &name,
            data_dir: &self.data_dir,
            stomp_port: self.stomp_port,
            ssl: self
                .ssl_port
                .zip(self.tls.as_ref())
                .map(|(port, tls)| (port, tls.keystore.as_path())),
            openwire: self.openwire_port,
            credentials: self.credentials(),
            dispatch_waits: &self.config.dispatch_waits,
            memory_limits: &self.config.memory_limits,
            users: &self.config.users,
            authorization: self.config.authorization.as_deref(),
        }
        .activemq_xml();
        write_file(&self.conf_dir.join("activemq.xml"), &xml)
    }

    pub(super) fn log_len(&self) -> u64 {
        std::fs::metadata(&self.log_path)
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Whether the log written since `offset` says a port was taken.
    pub(super) fn log_shows_port_clash(&self, offset: u64) -> bool {
        let mut text = String::new();
        File::open(&self.log_path)
            .and_then(|mut file| {
                file.seek(SeekFrom::Start(offset))?;
                file.read_to_string(&mut text)
            })
            .is_ok()
            && text.contains("Address already in use")
    }
}

/// Removes broker folders whose owning test process is gone: kept after a failed
/// start, or left behind because the process was killed before Drop ran.
pub(super) fn remove_orphaned_folders(brokers_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(brokers_dir) else {
        return;
    };
    for folder in entries.flatten().map(|entry| entry.path()) {
        let owner = std::fs::read_to_string(folder.join(OWNER_FILE))
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok());
        if owner.is_some_and(|pid| !process_exists(pid)) {
            // Best effort: another test may be removing the same orphan.
            let _ = std::fs::remove_dir_all(&folder);
        }
    }
}

pub(super) fn keep_broker_data() -> bool {
    env_flag(KEEP_BROKER_DATA_VAR)
}

pub(super) fn loopback(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
}

/// Three distinct ports that were free on 127.0.0.1 a moment ago.
pub(super) fn free_ports() -> Result<[u16; 3], HarnessError> {
    let bind = || {
        TcpListener::bind(loopback(0))
            .and_then(|listener| Ok((listener.local_addr()?.port(), listener)))
            .map_err(|e| HarnessError::io("finding a free port on 127.0.0.1", e))
    };
    // The listeners stay open until every port is known, so they differ.
    let (first, _a) = bind()?;
    let (second, _b) = bind()?;
    let (third, _c) = bind()?;
    Ok([first, second, third])
}

pub(super) fn find_java() -> Result<PathBuf, HarnessError> {
    let from_java_home = std::env::var_os("JAVA_HOME")
        .map(|home| PathBuf::from(home).join("bin/java"))
        .filter(|java| java.is_file());
    let from_path = || {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("java"))
                .find(|java| java.is_file())
        })
    };
    from_java_home
        .or_else(from_path)
        .ok_or(HarnessError::Missing {
            what: "java",
            detail: "not in $JAVA_HOME/bin or on PATH".into(),
            install: INSTALL_BROKER,
        })
}

pub(super) fn jvm_property(name: &str, path: &Path) -> String {
    format!("-D{name}={}", path.display())
}

pub(super) fn write_file(path: &Path, contents: &str) -> Result<(), HarnessError> {
    std::fs::write(path, contents)
        .map_err(|e| HarnessError::io(format!("writing {}", path.display()), e))
}

/// `true` when every thread of process `pid` is stopped (state `T` in
/// `/proc/<pid>/task/*/stat`). `false` if that cannot be read.
pub(super) fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|stat| {
                // The state follows the command name in parentheses.
                let after = stat.rsplit_once(')')?.1;
                after
                    .split_whitespace()
                    .next()
                    .map(|state| state == "T" || state == "t")
            })
            .unwrap_or(false)
    })
}
