//! Client settings and what the broker said about itself.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::codec::{Limits, Version};
use crate::error::Error;
use crate::uri::BrokerUri;

/// Client settings. Build with [`Config::new`] and the `with_*` methods.
#[derive(Clone)]
#[non_exhaustive]
pub struct Config {
    /// Where the broker is, and how to reconnect.
    pub uri: BrokerUri,
    /// `login` header.
    pub login: Option<String>,
    pub(crate) passcode: Option<String>,
    /// `host` header (virtual host). Default: the host of the address in use.
    pub virtual_host: Option<String>,
    /// `client-id` header (needed for durable topic subscriptions).
    pub client_id: Option<String>,
    /// Versions offered, the best one is chosen by the broker.
    pub versions: Vec<Version>,
    /// Heart-beat we ask for: (we send every, we want to hear every).
    /// ActiveMQ enforces the first strictly. Zero turns a direction off.
    pub heart_beat: (Duration, Duration),
    /// How much longer than the negotiated interval the broker may stay silent
    /// before the connection counts as lost, as a factor (default 2.5: ActiveMQ
    /// writes a keep-alive only when a whole check period passed without
    /// traffic, so it can be silent for about twice its interval).
    pub heart_beat_grace: f64,
    /// How long a write may make no progress before the connection counts as
    /// lost and the client moves to the next address (default `None`: the
    /// heart-beat read timeout when heart-beats are on, else the receipt timeout).
    pub write_timeout: Option<Duration>,
    /// How long to wait for TCP connect plus CONNECTED (default 10 s).
    pub connect_timeout: Duration,
    /// How long a request waits for its receipt (default 10 s).
    pub receipt_timeout: Duration,
    /// Codec limits.
    pub limits: Limits,
    /// PEM file with CA certificates to trust for `stomp+ssl` (else the
    /// system's roots).
    pub tls_ca_file: Option<PathBuf>,
    /// TLS server name to verify (default: the address's host).
    pub tls_server_name: Option<String>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("uri", &self.uri.to_string())
            .field("login", &self.login)
            .field("passcode", &self.passcode.as_ref().map(|_| "<redacted>"))
            .field("virtual_host", &self.virtual_host)
            .field("client_id", &self.client_id)
            .field("versions", &self.versions)
            .field("heart_beat", &self.heart_beat)
            .field("heart_beat_grace", &self.heart_beat_grace)
            .field("write_timeout", &self.write_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("receipt_timeout", &self.receipt_timeout)
            .field("limits", &self.limits)
            .field("tls_ca_file", &self.tls_ca_file)
            .finish()
    }
}

impl Config {
    /// Settings for `uri` with defaults for the rest.
    pub fn new(uri: BrokerUri) -> Config {
        Config {
            uri,
            login: None,
            passcode: None,
            virtual_host: None,
            client_id: None,
            versions: vec![Version::V1_2, Version::V1_1, Version::V1_0],
            heart_beat: (Duration::from_secs(10), Duration::from_secs(10)),
            heart_beat_grace: 2.5,
            write_timeout: None,
            connect_timeout: Duration::from_secs(10),
            receipt_timeout: Duration::from_secs(10),
            limits: Limits::default(),
            tls_ca_file: None,
            tls_server_name: None,
        }
    }

    /// Parses `uri` (see [`BrokerUri`]) and applies defaults.
    pub fn parse(uri: &str) -> Result<Config, Error> {
        Ok(Config::new(BrokerUri::parse(uri)?))
    }

    /// Sets login and passcode. The passcode never appears in `Debug` output.
    pub fn with_credentials(
        mut self,
        login: impl Into<String>,
        passcode: impl Into<String>,
    ) -> Config {
        self.login = Some(login.into());
        self.passcode = Some(passcode.into());
        self
    }

    /// Sets the client id.
    pub fn with_client_id(mut self, id: impl Into<String>) -> Config {
        self.client_id = Some(id.into());
        self
    }

    /// Restricts the versions offered.
    pub fn with_versions(mut self, versions: &[Version]) -> Config {
        self.versions = versions.to_vec();
        self
    }

    /// Sets the heart-beat request.
    pub fn with_heart_beat(mut self, send_every: Duration, expect_every: Duration) -> Config {
        self.heart_beat = (send_every, expect_every);
        self
    }

    /// Sets the heart-beat grace factor (see [`Config::heart_beat_grace`]).
    pub fn with_heart_beat_grace(mut self, grace: f64) -> Config {
        self.heart_beat_grace = grace;
        self
    }

    /// Sets the write stall limit (see [`Config::write_timeout`]).
    pub fn with_write_timeout(mut self, timeout: Duration) -> Config {
        self.write_timeout = Some(timeout);
        self
    }

    /// Sets how long one connect attempt may take (TCP, TLS and CONNECTED).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Config {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the receipt timeout: how long a request waits for the broker's
    /// answer, including the wait for a connection while disconnected.
    pub fn with_receipt_timeout(mut self, timeout: Duration) -> Config {
        self.receipt_timeout = timeout;
        self
    }

    /// Trusts the CA certificates in this PEM file for TLS.
    pub fn with_tls_ca_file(mut self, path: impl Into<PathBuf>) -> Config {
        self.tls_ca_file = Some(path.into());
        self
    }

    /// Sets the virtual host sent in the `host` header.
    pub fn with_virtual_host(mut self, host: impl Into<String>) -> Config {
        self.virtual_host = Some(host.into());
        self
    }

    /// Sets the codec limits: the largest frame, line and header count read
    /// or written.
    pub fn with_limits(mut self, limits: Limits) -> Config {
        self.limits = limits;
        self
    }

    /// Sets the TLS server name to verify instead of the address's host.
    pub fn with_tls_server_name(mut self, name: impl Into<String>) -> Config {
        self.tls_server_name = Some(name.into());
        self
    }

    pub(crate) fn heart_beat_ms(&self) -> (u64, u64) {
        (
            self.heart_beat.0.as_millis() as u64,
            self.heart_beat.1.as_millis() as u64,
        )
    }
}

/// What the broker said about itself in CONNECTED.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// Negotiated version.
    pub version: Version,
    /// `server` header, e.g. `ActiveMQ/5.17.2`.
    pub server: Option<String>,
    /// `session` header.
    pub session: Option<String>,
    /// `heart-beat` header.
    pub heart_beat: Option<String>,
    /// The address connected to.
    pub addr: String,
}
