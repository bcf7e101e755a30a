//! Which database a URL names, and the connection to it.

use std::time::Duration;

use sqlx::pool::PoolOptions;
use sqlx::{Connection, Database, Pool};

use crate::error::CliError;

/// How long to wait for the database to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The databases `outbox` speaks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `sqlite:`
    Sqlite,
    /// `postgres:` or `postgresql:`
    Postgres,
    /// `mysql:` or `mariadb:`
    MySql,
}

/// The database of `url` by its scheme, and the URL as sqlx takes it
/// (`mariadb:` is spelled `mysql:`).
pub fn parse_url(url: &str) -> Result<(Kind, String), CliError> {
    let (scheme, rest) = url.split_once(':').ok_or_else(|| bad(url))?;
    let kind = match scheme.to_ascii_lowercase().as_str() {
        "sqlite" => Kind::Sqlite,
        "postgres" | "postgresql" => Kind::Postgres,
        "mysql" => Kind::MySql,
        "mariadb" => return Ok((Kind::MySql, format!("mysql:{rest}"))),
        _ => return Err(bad(url)),
    };
    if rest.is_empty() {
        return Err(bad(url));
    }
    Ok((kind, url.to_owned()))
}

fn bad(url: &str) -> CliError {
    CliError::BadUrl { url: redact(url) }
}

/// `url` with its passwords, if any, replaced by `***`: the one in the user
/// part (`user:secret@host`) and those given as query parameters
/// (`?password=secret`, also `sslpassword`, `passwd`, `pwd`, any case).
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return redact_query(url);
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    format!("{scheme}://{authority}{}", redact_query(tail))
}

/// `tail` (path, query, fragment) with the values of password parameters
/// of its query replaced by `***`.
fn redact_query(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_owned();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let params: Vec<String> = query
        .split('&')
        .map(|param| match param.split_once('=') {
            Some((name, _)) if is_password(name) => format!("{name}=***"),
            _ => param.to_owned(),
        })
        .collect();
    let mut out = format!("{path}?{}", params.join("&"));
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

/// Query parameter names that carry a password.
fn is_password(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    matches!(
        name.as_str(),
        "password" | "passwd" | "pwd" | "pass" | "sslpassword"
    )
}

/// A small pool on `url`; a failure to connect is [`CliError::Connect`].
/// One connection is opened first, on its own, so that the error says why
/// (refused, unknown host, wrong password) instead of a pool timeout.
pub async fn connect<DB: Database>(url: &str) -> Result<Pool<DB>, CliError> {
    let failed = |source| CliError::Connect {
        url: redact(url),
        source,
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, DB::Connection::connect(url)).await {
        Ok(Ok(conn)) => {
            // Only a probe: a failure to say goodbye is no failure to connect.
            let _ = conn.close().await;
        }
        Ok(Err(source)) => return Err(failed(source)),
        Err(_) => return Err(failed(sqlx::Error::PoolTimedOut)),
    }
    PoolOptions::<DB>::new()
        .max_connections(2)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect(url)
        .await
        .map_err(|source| CliError::Connect {
            url: redact(url),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_pick_the_database() {
        assert_eq!(parse_url("sqlite:x.db").unwrap().0, Kind::Sqlite);
        assert_eq!(parse_url("sqlite://x.db?mode=rwc").unwrap().0, Kind::Sqlite);
        assert_eq!(parse_url("postgres://h/db").unwrap().0, Kind::Postgres);
        assert_eq!(parse_url("postgresql://h/db").unwrap().0, Kind::Postgres);
        assert_eq!(parse_url("mysql://h/db").unwrap().0, Kind::MySql);
        assert_eq!(
            parse_url("mariadb://root@h/db").unwrap(),
            (Kind::MySql, "mysql://root@h/db".to_owned())
        );
        for wrong in ["", "x.db", "oracle://h/db", "sqlite:", "http://h"] {
            assert!(
                matches!(parse_url(wrong), Err(CliError::BadUrl { .. })),
                "{wrong}"
            );
        }
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db?x=1"),
            "postgres://u:***@h:5432/db?x=1"
        );
        assert_eq!(redact("mysql://root@h/db"), "mysql://root@h/db");
        assert_eq!(redact("sqlite:/tmp/x.db"), "sqlite:/tmp/x.db");
        assert_eq!(
            redact("postgres://host/db?user=u&password=secret&sslmode=require"),
            "postgres://host/db?user=u&password=***&sslmode=require"
        );
        assert_eq!(
            redact("mysql://u:a@h/db?SSLPassword=b#f"),
            "mysql://u:***@h/db?SSLPassword=***#f"
        );
        assert!(!format!("{}", bad("oracle://u:pw@h/db")).contains("pw"));
    }
}
