//! Broker addresses in ActiveMQ's URI style.
//!
//! ```text
//! stomp://host:61613
//! stomp+ssl://host:61614
//! failover:(stomp://a:61613,stomp://b:61613)?initialReconnectDelay=100&maxReconnectDelay=5000
//! ```
//!
//! A plain URI is a failover list of one. Reconnect options belong to the
//! `failover:` form; a plain URI may carry them too, as a query.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::error::UriError;

/// Transport of one broker address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain TCP (`stomp://` or `tcp://`).
    Tcp,
    /// TLS (`stomp+ssl://`, `stomp+tls://` or `ssl://`).
    Tls,
}

/// One broker address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    /// TCP or TLS.
    pub scheme: Scheme,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
}

impl fmt::Display for BrokerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.scheme {
            Scheme::Tcp => "stomp",
            Scheme::Tls => "stomp+ssl",
        };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// How the client reconnects after a lost connection.
#[derive(Debug, Clone, PartialEq)]
pub struct ReconnectPolicy {
    /// First delay before reconnecting (`initialReconnectDelay`, ms; default 10).
    pub initial_delay: Duration,
    /// Largest delay (`maxReconnectDelay`, ms; default 30000).
    pub max_delay: Duration,
    /// Growth of the delay per failed attempt (`reconnectDelayExponent`; default 2.0).
    pub multiplier: f64,
    /// Give up a reconnect after this many failed attempts, each address tried
    /// counting one (`maxReconnectAttempts`; `-1`, the default, retries for
    /// ever; `0` never reconnects).
    pub max_attempts: Option<u32>,
    /// Extra passes over the whole list on the first connect
    /// (`startupMaxReconnectAttempts`; default 0: one pass, then fail).
    pub startup_attempts: Option<u32>,
    /// Shuffle the list before use (`randomize`; default false).
    pub randomize: bool,
}

impl Default for ReconnectPolicy {
    fn default() -> ReconnectPolicy {
        ReconnectPolicy {
            initial_delay: Duration::from_millis(10),
            max_delay: Duration::from_secs(30),
            multiplier: 2.0,
            max_attempts: None,
            startup_attempts: Some(0),
            randomize: false,
        }
    }
}

impl ReconnectPolicy {
    /// Delay before attempt `attempt` (0-based), without jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = self.multiplier.max(1.0).powi(attempt.min(64) as i32);
        let ms = (self.initial_delay.as_secs_f64() * 1000.0 * factor)
            .min(self.max_delay.as_secs_f64() * 1000.0);
        Duration::from_micros((ms * 1000.0) as u64)
    }
}

/// A parsed broker URI: one or more addresses and the reconnect policy.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerUri {
    /// Addresses, tried in order.
    pub addrs: Vec<BrokerAddr>,
    /// Reconnect options.
    pub reconnect: ReconnectPolicy,
}

impl FromStr for BrokerUri {
    type Err = UriError;

    fn from_str(text: &str) -> Result<BrokerUri, UriError> {
        BrokerUri::parse(text)
    }
}

impl fmt::Display for BrokerUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.addrs.len() == 1 {
            return write!(f, "{}", self.addrs[0]);
        }
        f.write_str("failover:(")?;
        for (i, a) in self.addrs.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{a}")?;
        }
        f.write_str(")")
    }
}

impl BrokerUri {
    /// Parses `stomp://…`, `stomp+ssl://…` or `failover:(…)?…`.
    pub fn parse(text: &str) -> Result<BrokerUri, UriError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(UriError::Empty);
        }
        let (list, query) = if let Some(rest) = strip_prefix_ci(text, "failover:") {
            let rest = rest.trim();
            if let Some(inner) = rest.strip_prefix('(') {
                let close = inner
                    .find(')')
                    .ok_or_else(|| UriError::Unbalanced(text.to_owned()))?;
                let list = &inner[..close];
                let after = &inner[close + 1..];
                let query = match after.strip_prefix('?') {
                    Some(q) => Some(q),
                    None if after.is_empty() => None,
                    None => return Err(UriError::Trailing(after.to_owned())),
                };
                (list, query)
            } else {
                match rest.split_once('?') {
                    Some((l, q)) => (l, Some(q)),
                    None => (rest, None),
                }
            }
        } else {
            match text.split_once('?') {
                Some((l, q)) => (l, Some(q)),
                None => (text, None),
            }
        };
        let mut addrs = Vec::new();
        for part in list.split(',') {
            let part = part.trim();
            if part.is_empty() {
                return Err(UriError::EmptyAddress(text.to_owned()));
            }
            addrs.push(parse_addr(part)?);
        }
        let mut reconnect = ReconnectPolicy::default();
        if let Some(query) = query {
            apply_query(&mut reconnect, query)?;
        }
        Ok(BrokerUri { addrs, reconnect })
    }
}

fn strip_prefix_ci<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    if text.len() >= prefix.len()
        && text.is_char_boundary(prefix.len())
        && text[..prefix.len()].eq_ignore_ascii_case(prefix)
    {
        Some(&text[prefix.len()..])
    } else {
        None
    }
}

fn parse_addr(part: &str) -> Result<BrokerAddr, UriError> {
    let (scheme, rest) = part
        .split_once("://")
        .ok_or_else(|| UriError::MissingScheme(part.to_owned()))?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "stomp" | "tcp" => Scheme::Tcp,
        "stomp+ssl" | "stomp+tls" | "ssl" | "tls" | "stomp+nio+ssl" => Scheme::Tls,
        "stomp+nio" => Scheme::Tcp,
        other => return Err(UriError::UnsupportedScheme(other.to_owned())),
    };
    // Per-address options (ActiveMQ allows them) carry nothing the client uses.
    let authority = rest.split(['?', '/']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err(UriError::CredentialsInUri);
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| UriError::InvalidHost(authority.to_owned()))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| UriError::MissingPort(part.to_owned()))?;
        (host, port)
    } else {
        authority
            .rsplit_once(':')
            .ok_or_else(|| UriError::MissingPort(part.to_owned()))?
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(UriError::InvalidHost(host.to_owned()));
    }
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| UriError::InvalidPort(port.to_owned()))?;
    Ok(BrokerAddr {
        scheme,
        host: host.to_owned(),
        port,
    })
}

fn apply_query(policy: &mut ReconnectPolicy, query: &str) -> Result<(), UriError> {
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| UriError::InvalidOption {
                name: pair.to_owned(),
                value: String::new(),
            })?;
        let bad = || UriError::InvalidOption {
            name: key.to_owned(),
            value: value.to_owned(),
        };
        let millis = || {
            value
                .parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| bad())
        };
        let attempts = || -> Result<Option<u32>, UriError> {
            let n: i64 = value.parse().map_err(|_| bad())?;
            if n < 0 {
                Ok(None)
            } else {
                u32::try_from(n).map(Some).map_err(|_| bad())
            }
        };
        match key {
            "initialReconnectDelay" => policy.initial_delay = millis()?,
            "maxReconnectDelay" => policy.max_delay = millis()?,
            "reconnectDelayExponent" => {
                policy.multiplier = value
                    .parse::<f64>()
                    .ok()
                    .filter(|m| *m >= 1.0)
                    .ok_or_else(bad)?
            }
            "useExponentialBackOff" => {
                if !value.parse::<bool>().map_err(|_| bad())? {
                    policy.multiplier = 1.0;
                }
            }
            "maxReconnectAttempts" => policy.max_attempts = attempts()?,
            "startupMaxReconnectAttempts" => policy.startup_attempts = attempts()?,
            "randomize" => policy.randomize = value.parse().map_err(|_| bad())?,
            // ActiveMQ client options with no meaning for this client are accepted.
            "timeout" | "backup" | "priorityBackup" | "trackMessages" => {}
            _ => return Err(UriError::UnknownOption(key.to_owned())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_uri_is_a_list_of_one() {
        let uri = BrokerUri::parse("stomp://127.0.0.1:61613").unwrap();
        assert_eq!(uri.addrs.len(), 1);
        assert_eq!(uri.addrs[0].port, 61613);
        assert_eq!(uri.addrs[0].scheme, Scheme::Tcp);
    }

    #[test]
    fn failover_list_with_options_is_parsed() {
        let uri = BrokerUri::parse(
            "failover:(stomp://a:1,stomp+ssl://b:2)?initialReconnectDelay=100&maxReconnectDelay=2000&maxReconnectAttempts=5",
        )
        .unwrap();
        assert_eq!(uri.addrs.len(), 2);
        assert_eq!(uri.addrs[1].scheme, Scheme::Tls);
        assert_eq!(uri.reconnect.initial_delay, Duration::from_millis(100));
        assert_eq!(uri.reconnect.max_delay, Duration::from_millis(2000));
        assert_eq!(uri.reconnect.max_attempts, Some(5));
        assert_eq!(uri.to_string(), "failover:(stomp://a:1,stomp+ssl://b:2)");
    }

    #[test]
    fn ipv6_hosts_are_accepted() {
        let uri = BrokerUri::parse("stomp://[::1]:61613").unwrap();
        assert_eq!(uri.addrs[0].host, "::1");
        assert_eq!(uri.to_string(), "stomp://[::1]:61613");
    }

    #[test]
    fn bad_uris_name_the_bad_part() {
        let cases = [
            ("", "empty"),
            ("localhost:61613", "scheme"),
            ("amqp://h:5672", "amqp"),
            ("stomp://h", "port"),
            ("stomp://h:abc", "abc"),
            ("stomp://h:0", "0"),
            ("stomp://:61613", "host"),
            ("failover:(stomp://a:1", "parenthesis"),
            ("failover:(stomp://a:1,)", "empty address"),
            ("stomp://h:1?maxReconnectDelay=soon", "maxReconnectDelay"),
            ("stomp://h:1?colour=blue", "colour"),
            ("stomp://user:pw@h:1", "credentials"),
        ];
        for (text, needle) in cases {
            let err = BrokerUri::parse(text).unwrap_err().to_string();
            assert!(
                err.contains(needle),
                "{text:?} gave {err:?}, expected it to mention {needle:?}"
            );
        }
    }

    #[test]
    fn backoff_grows_to_the_maximum() {
        let p = ReconnectPolicy {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
            ..ReconnectPolicy::default()
        };
        assert_eq!(p.delay(0), Duration::from_millis(100));
        assert_eq!(p.delay(1), Duration::from_millis(200));
        assert_eq!(p.delay(10), Duration::from_millis(1000));
    }
}
