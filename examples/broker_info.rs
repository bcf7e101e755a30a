//! Asks an ActiveMQ broker who it is: a STOMP 1.2 `CONNECT`, then prints the
//! `server`, `version`, `session` and `heart-beat` headers of its `CONNECTED` frame.
//!
//! ```text
//! cargo run --example broker_info -- stomp://127.0.0.1:61613
//! ```
//!
//! Until the STOMP client lands this uses the test harness's raw frame exchange.
//! Exits with status 1 and a message on stderr if the URI is malformed, the broker
//! cannot be reached or it does not answer with `CONNECTED`.

use std::net::SocketAddr;
use std::process::ExitCode;

use outbox_test_harness::RawStomp;

const DEFAULT_URI: &str = "stomp://127.0.0.1:61613";

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let uri = std::env::args()
        .nth(1)
        .unwrap_or_else(|| DEFAULT_URI.to_owned());
    match broker_info(&uri).await {
        Ok(lines) => {
            println!("{lines}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("broker_info: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn broker_info(uri: &str) -> Result<String, String> {
    let authority = authority_of(uri)?;
    let addr: SocketAddr = tokio::net::lookup_host(authority)
        .await
        .map_err(|e| format!("cannot resolve {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority} resolves to no address"))?;
    let mut stomp = RawStomp::connect(addr)
        .await
        .map_err(|e| format!("cannot reach {uri}: {e}"))?;
    let reply = stomp
        .handshake(None)
        .await
        .map_err(|e| format!("no STOMP answer from {uri}: {e}"))?;
    if reply.command != "CONNECTED" {
        return Err(format!(
            "{uri} answered CONNECT with {}: {}",
            reply.command,
            reply
                .header("message")
                .map_or_else(|| reply.body_text(), str::to_owned)
        ));
    }
    // Polite goodbye; the answer does not matter.
    let _ = stomp.send_frame("DISCONNECT", &[], b"").await;
    let field = |name| reply.header(name).unwrap_or("(not sent)");
    Ok(format!(
        "broker:     {uri}\nserver:     {}\nversion:    {}\nsession:    {}\nheart-beat: {}",
        field("server"),
        field("version"),
        field("session"),
        field("heart-beat"),
    ))
}

/// `host:port` of a `stomp://` or `tcp://` URI; a bare `host:port` is accepted too.
fn authority_of(uri: &str) -> Result<&str, String> {
    let rest = match uri.split_once("://") {
        Some(("stomp" | "tcp", rest)) => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "unsupported scheme {scheme:?} in {uri:?}; expected stomp://host:port"
            ));
        }
        None => uri,
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(authority),
        _ => Err(format!(
            "{uri:?} does not name a host and port, e.g. {DEFAULT_URI}"
        )),
    }
}
