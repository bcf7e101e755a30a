//! What a test broker looks like, and the `activemq.xml` made from it.

use std::path::Path;
use std::time::Duration;

/// The broker configuration template, shared with `scripts/broker.sh`.
const ACTIVEMQ_XML_TEMPLATE: &str = include_str!("../broker/activemq.xml.in");

/// The log4j 1.2 configuration the Debian package's jars read.
pub(crate) const LOG4J_PROPERTIES: &str = include_str!("../broker/log4j.properties");

/// A STOMP login and passcode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    login: String,
    passcode: String,
}

impl Credentials {
    /// Credentials with the given login and passcode.
    pub fn new(login: impl Into<String>, passcode: impl Into<String>) -> Self {
        Credentials {
            login: login.into(),
            passcode: passcode.into(),
        }
    }

    /// The value for the `login` header.
    pub fn login(&self) -> &str {
        &self.login
    }

    /// The value for the `passcode` header.
    pub fn passcode(&self) -> &str {
        &self.passcode
    }
}

/// How to set up a test broker; `BrokerConfig::default()` is an open broker with a
/// plain STOMP connector only.
///
/// ```
/// use outbox_test_harness::BrokerConfig;
///
/// let config = BrokerConfig::default()
///     .with_credentials("alice", "s3cret")
///     .with_ssl();
/// # let _ = config;
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BrokerConfig {
    pub(crate) credentials: Option<Credentials>,
    pub(crate) ssl: bool,
    pub(crate) openwire: bool,
    pub(crate) ready_timeout: Duration,
    pub(crate) max_heap_mb: u32,
    pub(crate) dispatch_waits: Vec<DispatchWait>,
    pub(crate) memory_limits: Vec<(String, u64)>,
    pub(crate) users: Vec<User>,
    pub(crate) authorization: Option<Vec<Authorization>>,
}

/// A user of the broker beyond [`BrokerConfig::with_credentials`]'s, with its
/// groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct User {
    pub(crate) credentials: Credentials,
    pub(crate) groups: Vec<String>,
}

/// One entry of the broker's authorisation map (ActiveMQ's
/// `authorizationEntry`): which groups may read, write and create
/// ("admin") the destinations matching a pattern. A right no group is given
/// is nobody's.
///
/// ```
/// use outbox_test_harness::Authorization;
///
/// // Group `relay` may write to every `orders.` queue, and create them.
/// let entry = Authorization::queue("orders.>").write("relay").admin("relay");
/// # let _ = entry;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    /// `queue` or `topic`.
    kind: &'static str,
    pattern: String,
    read: Vec<String>,
    write: Vec<String>,
    admin: Vec<String>,
}

impl Authorization {
    /// An entry for the queues matching `pattern`, an ActiveMQ destination
    /// wildcard without the `/queue/` prefix (`orders.>`, `orders.*`, `>`).
    pub fn queue(pattern: impl Into<String>) -> Authorization {
        Authorization::new("queue", pattern.into())
    }

    /// An entry for the topics matching `pattern` (as for [`queue`](Self::queue)).
    pub fn topic(pattern: impl Into<String>) -> Authorization {
        Authorization::new("topic", pattern.into())
    }

    fn new(kind: &'static str, pattern: String) -> Authorization {
        Authorization {
            kind,
            pattern,
            read: Vec::new(),
            write: Vec::new(),
            admin: Vec::new(),
        }
    }

    /// Lets `group` consume from the destinations.
    pub fn read(mut self, group: impl Into<String>) -> Self {
        self.read.push(group.into());
        self
    }

    /// Lets `group` send to the destinations.
    pub fn write(mut self, group: impl Into<String>) -> Self {
        self.write.push(group.into());
        self
    }

    /// Lets `group` create the destinations (ActiveMQ asks for it when a
    /// send or a subscription names a destination that does not exist yet).
    pub fn admin(mut self, group: impl Into<String>) -> Self {
        self.admin.push(group.into());
        self
    }

    /// Gives `group` every right on the destinations.
    pub fn all(self, group: impl Into<String>) -> Self {
        let group = group.into();
        self.read(group.clone()).write(group.clone()).admin(group)
    }
}

/// A queue policy that holds dispatch until enough consumers are subscribed
/// (ActiveMQ's `consumersBeforeDispatchStarts` and `timeBeforeDispatchStarts`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DispatchWait {
    pub(crate) queues: String,
    pub(crate) consumers: u32,
    pub(crate) wait: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            credentials: None,
            ssl: false,
            openwire: false,
            ready_timeout: Duration::from_secs(60),
            max_heap_mb: 256,
            dispatch_waits: Vec::new(),
            memory_limits: Vec::new(),
            users: Vec::new(),
            authorization: None,
        }
    }
}

impl BrokerConfig {
    /// Requires this login and passcode on every connection
    /// (ActiveMQ's `simpleAuthenticationPlugin`, anonymous access off).
    pub fn with_credentials(
        mut self,
        login: impl Into<String>,
        passcode: impl Into<String>,
    ) -> Self {
        self.credentials = Some(Credentials::new(login, passcode));
        self
    }

    /// Adds a `stomp+ssl` connector with a freshly generated certificate for
    /// `localhost` and `127.0.0.1`; clients trust [`Broker::ca_cert_pem`](crate::Broker::ca_cert_pem).
    pub fn with_ssl(mut self) -> Self {
        self.ssl = true;
        self
    }

    /// Adds an OpenWire connector (`tcp://`), for ActiveMQ's own JMS client;
    /// see [`Broker::openwire_uri`](crate::Broker::openwire_uri).
    pub fn with_openwire(mut self) -> Self {
        self.openwire = true;
        self
    }

    /// How long a start may take before it fails (60 s unless changed).
    pub fn with_ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// The JVM's maximum heap in MiB (256 unless changed).
    pub fn with_max_heap_mb(mut self, mb: u32) -> Self {
        self.max_heap_mb = mb;
        self
    }

    /// On the queues matching `queues` (an ActiveMQ destination wildcard
    /// without the `/queue/` prefix, e.g. `bench.groups.>`), holds dispatch
    /// until `consumers` consumers are subscribed or `wait` has passed since
    /// the first one. Waiting messages are then shared out among consumers
    /// that subscribe together instead of all going to the first, which
    /// matters for message groups (`JMSXGroupID`): a group belongs to the
    /// consumer that got its first message. This is ActiveMQ's own
    /// `consumersBeforeDispatchStarts` and `timeBeforeDispatchStarts` policy.
    pub fn with_dispatch_wait(
        mut self,
        queues: impl Into<String>,
        consumers: u32,
        wait: Duration,
    ) -> Self {
        self.dispatch_waits.push(DispatchWait {
            queues: queues.into(),
            consumers,
            wait,
        });
        self
    }
}

impl BrokerConfig {
    /// On the queues matching `queues` (as for
    /// [`with_dispatch_wait`](Self::with_dispatch_wait)), holds at most
    /// `bytes` of messages in memory, and refuses a send beyond that with an
    /// ERROR (ActiveMQ's `memoryLimit` with producer flow control and the
    /// broker's `sendFailIfNoSpace`: a `ResourceAllocationException`) until
    /// consumers take enough of them. A broker under load as a test can
    /// make it: the refusal passes once the queue is read.
    pub fn with_queue_memory_limit(mut self, queues: impl Into<String>, bytes: u64) -> Self {
        self.memory_limits.push((queues.into(), bytes));
        self
    }

    /// Adds a user with these groups (comma-separated is not needed: pass
    /// each group). Users need authentication on: set
    /// [`with_credentials`](Self::with_credentials) too, whose user is in the
    /// groups `users` and `admins`.
    pub fn with_user<G: Into<String>>(
        mut self,
        login: impl Into<String>,
        passcode: impl Into<String>,
        groups: impl IntoIterator<Item = G>,
    ) -> Self {
        self.users.push(User {
            credentials: Credentials::new(login, passcode),
            groups: groups.into_iter().map(Into::into).collect(),
        });
        self
    }

    /// Turns on ActiveMQ's `authorizationPlugin` with these entries (with
    /// authentication, see [`with_credentials`](Self::with_credentials)).
    /// Every group of every user may use the broker's advisory topics,
    /// which any connection needs; everything else is what `entries` grant.
    /// A send the map does not allow is refused with an ERROR
    /// ("User … is not authorized to write to: queue://…").
    pub fn with_authorization(mut self, entries: impl IntoIterator<Item = Authorization>) -> Self {
        self.authorization = Some(entries.into_iter().collect());
        self
    }
}

/// The concrete values one broker instance is configured with.
pub(crate) struct BrokerLayout<'a> {
    pub(crate) name: &'a str,
    pub(crate) data_dir: &'a Path,
    pub(crate) stomp_port: u16,
    /// The `stomp+ssl` port and the PKCS12 keystore to serve it with.
    pub(crate) ssl: Option<(u16, &'a Path)>,
    /// The OpenWire port, if any.
    pub(crate) openwire: Option<u16>,
    pub(crate) credentials: Option<&'a Credentials>,
    pub(crate) dispatch_waits: &'a [DispatchWait],
    pub(crate) memory_limits: &'a [(String, u64)],
    pub(crate) users: &'a [User],
    pub(crate) authorization: Option<&'a [Authorization]>,
}

impl BrokerLayout<'_> {
    /// Renders `activemq.xml`.
    pub(crate) fn activemq_xml(&self) -> String {
        let plugins = match self.credentials {
            None => String::new(),
            Some(credentials) => {
                let mut users = format!(
                    "          <authenticationUser username=\"{}\" password=\"{}\" groups=\"users,admins\"/>\n",
                    xml_attr(credentials.login()),
                    xml_attr(credentials.passcode()),
                );
                for user in self.users {
                    users.push_str(&format!(
                        "          <authenticationUser username=\"{}\" password=\"{}\" groups=\"{}\"/>\n",
                        xml_attr(user.credentials.login()),
                        xml_attr(user.credentials.passcode()),
                        xml_attr(&user.groups.join(",")),
                    ));
                }
                format!(
                    "\n    <plugins>\n      <simpleAuthenticationPlugin anonymousAccessAllowed=\"false\">\n        \
                     <users>\n{users}        </users>\n      </simpleAuthenticationPlugin>\n{}    </plugins>\n",
                    self.authorization_plugin(),
                )
            }
        };
        let mut connectors = format!(
            "      <transportConnector name=\"stomp\" uri=\"stomp://127.0.0.1:{}?transport.tcpNoDelay=true\"/>\n",
            self.stomp_port
        );
        if let Some(port) = self.openwire {
            connectors.push_str(&format!(
                "      <transportConnector name=\"openwire\" uri=\"tcp://127.0.0.1:{port}?transport.tcpNoDelay=true\"/>\n"
            ));
        }
        let ssl_context = match self.ssl {
            None => String::new(),
            Some((port, keystore)) => {
                connectors.push_str(&format!(
                    "      <transportConnector name=\"stomp+ssl\" uri=\"stomp+ssl://127.0.0.1:{port}?transport.tcpNoDelay=true\"/>\n"
                ));
                format!(
                    "\n    <sslContext>\n      <sslContext keyStore=\"file:{}\" keyStorePassword=\"{}\" \
                     keyStoreType=\"PKCS12\"/>\n    </sslContext>\n",
                    xml_attr(&keystore.to_string_lossy()),
                    crate::tls::KEYSTORE_PASSWORD,
                )
            }
        };
        let policies = if self.dispatch_waits.is_empty() && self.memory_limits.is_empty() {
            String::new()
        } else {
            let mut entries: String = self
                .dispatch_waits
                .iter()
                .map(|w| {
                    format!(
                        "          <policyEntry queue=\"{}\" consumersBeforeDispatchStarts=\"{}\" \
                         timeBeforeDispatchStarts=\"{}\"/>\n",
                        xml_attr(&w.queues),
                        w.consumers,
                        w.wait.as_millis()
                    )
                })
                .collect();
            for (queues, bytes) in self.memory_limits {
                // A queue cursor in memory: persistent messages count
                // against the limit too, instead of being paged to the store.
                entries.push_str(&format!(
                    "          <policyEntry queue=\"{}\" memoryLimit=\"{bytes}\" \
                     producerFlowControl=\"true\">\n            <pendingQueuePolicy>\
                     <vmQueueCursor/></pendingQueuePolicy>\n          </policyEntry>\n",
                    xml_attr(queues),
                ));
            }
            format!(
                "\n    <destinationPolicy>\n      <policyMap>\n        <policyEntries>\n{entries}        \
                 </policyEntries>\n      </policyMap>\n    </destinationPolicy>\n"
            )
        };
        // The queue patterns last: text a test passes in is never read as
        // a placeholder.
        ACTIVEMQ_XML_TEMPLATE
            .replace("@BROKER_NAME@", &xml_attr(self.name))
            .replace("@DATA_DIR@", &xml_attr(&self.data_dir.to_string_lossy()))
            .replace("@PLUGINS@", &plugins)
            .replace("@SSL_CONTEXT@", &ssl_context)
            .replace("@CONNECTORS@", &connectors)
            .replace(
                "@SYSTEM_USAGE@",
                if self.memory_limits.is_empty() {
                    ""
                } else {
                    " sendFailIfNoSpace=\"true\""
                },
            )
            .replace("@POLICIES@", &policies)
    }
}

impl BrokerLayout<'_> {
    /// The `authorizationPlugin` element, if authorisation is on.
    fn authorization_plugin(&self) -> String {
        let Some(entries) = self.authorization else {
            return String::new();
        };
        let mut groups: Vec<&str> = vec!["users", "admins"];
        for user in self.users {
            for group in &user.groups {
                if !groups.contains(&group.as_str()) {
                    groups.push(group);
                }
            }
        }
        let everyone = xml_attr(&groups.join(","));
        let mut lines = format!(
            "            <authorizationEntry topic=\"ActiveMQ.Advisory.>\" read=\"{everyone}\" \
             write=\"{everyone}\" admin=\"{everyone}\"/>\n"
        );
        for entry in entries {
            let mut line = format!(
                "            <authorizationEntry {}=\"{}\"",
                entry.kind,
                xml_attr(&entry.pattern)
            );
            for (right, groups) in [
                ("read", &entry.read),
                ("write", &entry.write),
                ("admin", &entry.admin),
            ] {
                if !groups.is_empty() {
                    line.push_str(&format!(" {right}=\"{}\"", xml_attr(&groups.join(","))));
                }
            }
            line.push_str("/>\n");
            lines.push_str(&line);
        }
        format!(
            "      <authorizationPlugin>\n        <map>\n          <authorizationMap>\n            \
             <authorizationEntries>\n{lines}            </authorizationEntries>\n          \
             </authorizationMap>\n        </map>\n      </authorizationPlugin>\n"
        )
    }
}

/// Escapes a value for a double-quoted XML attribute. `$` is escaped too so that
/// Spring's property placeholders never see `${...}` in a password.
fn xml_attr(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '$' => out.push_str("&#36;"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_broker_has_one_stomp_connector_and_no_plugins() {
        let xml = BrokerLayout {
            name: "b1",
            data_dir: Path::new("/tmp/b1/data"),
            stomp_port: 61999,
            ssl: None,
            openwire: None,
            credentials: None,
            dispatch_waits: &[],
            memory_limits: &[],
            users: &[],
            authorization: None,
        }
        .activemq_xml();
        assert!(!xml.contains("destinationPolicy"));
        assert!(xml.contains(r#"uri="stomp://127.0.0.1:61999?transport.tcpNoDelay=true""#));
        assert!(xml.contains(r#"<kahaDB directory="/tmp/b1/data/kahadb"/>"#));
        assert!(!xml.contains("plugins"));
        assert!(!xml.contains("sslContext"));
        assert!(!xml.contains("openwire"));
        assert!(!xml.contains('@'), "placeholder left in:\n{xml}");
    }

    #[test]
    fn credentials_and_ssl_are_rendered_escaped() {
        let credentials = Credentials::new("a\"l", "<p&${x}>");
        let xml = BrokerLayout {
            name: "b2",
            data_dir: Path::new("/tmp/b2/data"),
            stomp_port: 1,
            ssl: Some((2, Path::new("/tmp/b2/tls/broker.p12"))),
            openwire: Some(3),
            credentials: Some(&credentials),
            dispatch_waits: &[],
            memory_limits: &[],
            users: &[],
            authorization: None,
        }
        .activemq_xml();
        assert!(xml.contains(r#"username="a&quot;l" password="&lt;p&amp;&#36;{x}&gt;""#));
        assert!(xml.contains(r#"uri="stomp+ssl://127.0.0.1:2?transport.tcpNoDelay=true""#));
        assert!(xml.contains(r#"keyStore="file:/tmp/b2/tls/broker.p12""#));
        assert!(xml.contains(r#"uri="tcp://127.0.0.1:3?transport.tcpNoDelay=true""#));
    }

    #[test]
    fn users_and_an_authorisation_map_are_rendered_with_the_advisory_topics_open_to_every_group() {
        let credentials = Credentials::new("admin", "a");
        let users = [User {
            credentials: Credentials::new("relay", "r"),
            groups: vec!["relay".into()],
        }];
        let entries = [
            Authorization::queue("orders.>")
                .write("relay")
                .admin("relay"),
            Authorization::topic("t").all("admins"),
        ];
        let xml = BrokerLayout {
            name: "b4",
            data_dir: Path::new("/tmp/b4/data"),
            stomp_port: 5,
            ssl: None,
            openwire: None,
            credentials: Some(&credentials),
            dispatch_waits: &[],
            memory_limits: &[],
            users: &users,
            authorization: Some(&entries),
        }
        .activemq_xml();
        assert!(
            xml.contains(r#"<authenticationUser username="relay" password="r" groups="relay"/>"#)
        );
        assert!(xml.contains(
            r#"<authorizationEntry topic="ActiveMQ.Advisory.>" read="users,admins,relay" write="users,admins,relay" admin="users,admins,relay"/>"#
        ));
        assert!(
            xml.contains(
                r#"<authorizationEntry queue="orders.&gt;" write="relay" admin="relay"/>"#
            )
        );
        assert!(xml.contains(
            r#"<authorizationEntry topic="t" read="admins" write="admins" admin="admins"/>"#
        ));
        assert!(!xml.contains('@'), "placeholder left in:\n{xml}");
    }

    #[test]
    fn a_dispatch_wait_becomes_a_queue_policy() {
        let waits = [DispatchWait {
            queues: "bench.groups.>".into(),
            consumers: 2,
            wait: Duration::from_secs(5),
        }];
        let xml = BrokerLayout {
            name: "b3",
            data_dir: Path::new("/tmp/b3/data"),
            stomp_port: 4,
            ssl: None,
            openwire: None,
            credentials: None,
            dispatch_waits: &waits,
            memory_limits: &[],
            users: &[],
            authorization: None,
        }
        .activemq_xml();
        assert!(xml.contains(
            r#"<policyEntry queue="bench.groups.&gt;" consumersBeforeDispatchStarts="2" timeBeforeDispatchStarts="5000"/>"#
        ));
        assert!(!xml.contains('@'), "placeholder left in:\n{xml}");
    }
}
