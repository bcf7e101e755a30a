//! `stomp`: a small command-line tool for looking at an ActiveMQ broker.
//!
//! ```text
//! cargo run --example stomp -- --uri stomp://127.0.0.1:61613 send /queue/a -H persistent:true < body.json
//! cargo run --example stomp -- --uri stomp://127.0.0.1:61613 recv /queue/a --count 10 --json
//! ```
//!
//! `send` waits for the broker's receipt and exits non-zero if it does not come.
//! `recv --json` prints one JSON object per message: all headers in order, and
//! the body as UTF-8 text, or base64 when it is not UTF-8.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine;
use clap::{Parser, Subcommand};
use outbox::stomp::{AckMode, Client, Config, Frame, Subscribe};

#[derive(Parser)]
#[command(
    name = "stomp",
    about = "Send and receive STOMP messages on an ActiveMQ broker"
)]
struct Cli {
    /// Broker URI: stomp://host:port, stomp+ssl://host:port or failover:(...)
    #[arg(long, env = "STOMP_URI", default_value = "stomp://127.0.0.1:61613")]
    uri: String,
    /// Login.
    #[arg(long, env = "STOMP_LOGIN")]
    login: Option<String>,
    /// Passcode (prefer the STOMP_PASSCODE variable: arguments are visible to other users).
    #[arg(long, env = "STOMP_PASSCODE", hide_env_values = true)]
    passcode: Option<String>,
    /// PEM file with the CA certificate(s) for stomp+ssl.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Seconds to wait for a receipt or a message.
    #[arg(long, default_value_t = 30, global = true)]
    timeout: u64,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Send one message and wait for the broker's receipt.
    Send {
        /// Destination, e.g. /queue/orders or /topic/VirtualTopic.user.created
        destination: String,
        /// Header as name:value (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// Read the body from this file instead of standard input.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Receive messages and print them.
    Recv {
        /// Destination to subscribe to.
        destination: String,
        /// Stop after this many messages.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Do not acknowledge (the broker redelivers them later).
        #[arg(long)]
        no_ack: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("stomp: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let mut config = Config::parse(&cli.uri).map_err(|e| e.to_string())?;
    config.receipt_timeout = Duration::from_secs(cli.timeout);
    if let Some(login) = cli.login {
        config = config.with_credentials(login, cli.passcode.unwrap_or_default());
    }
    if let Some(ca) = cli.ca_file {
        config = config.with_tls_ca_file(ca);
    }
    let client = Client::connect(config).await.map_err(|e| e.to_string())?;
    match cli.command {
        Cmd::Send {
            destination,
            headers,
            file,
        } => {
            let body = match file {
                Some(path) => std::fs::read(&path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
                None => {
                    let mut buf = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut buf)
                        .map_err(|e| format!("cannot read standard input: {e}"))?;
                    buf
                }
            };
            let mut frame = Frame::send(destination, body);
            for header in headers {
                let (name, value) = header
                    .split_once(':')
                    .ok_or_else(|| format!("header {header:?} is not name:value"))?;
                frame = frame.with_header(name.to_owned(), value.to_owned());
            }
            client.send(frame).await.map_err(|e| e.to_string())?;
            eprintln!("sent; receipt received");
        }
        Cmd::Recv {
            destination,
            count,
            json,
            no_ack,
        } => {
            let mut sub = client
                .subscribe(Subscribe::new(destination).ack(AckMode::ClientIndividual))
                .await
                .map_err(|e| e.to_string())?;
            let mut out = std::io::stdout().lock();
            for n in 0..count {
                let message =
                    tokio::time::timeout(Duration::from_secs(cli.timeout), sub.next_message())
                        .await
                        .map_err(|_| {
                            format!("no message within {} s after {n} received", cli.timeout)
                        })?
                        .ok_or("connection closed")?;
                if json {
                    let headers: Vec<serde_json::Value> = message
                        .headers()
                        .iter()
                        .map(|(k, v)| serde_json::json!([k, v]))
                        .collect();
                    let body = match std::str::from_utf8(message.body()) {
                        Ok(text) => serde_json::json!({ "text": text }),
                        Err(_) => serde_json::json!({
                            "base64": base64::engine::general_purpose::STANDARD.encode(message.body())
                        }),
                    };
                    let line = serde_json::json!({ "headers": headers, "body": body });
                    writeln!(out, "{line}").map_err(|e| e.to_string())?;
                } else {
                    for (k, v) in message.headers().iter() {
                        writeln!(out, "{k}: {v}").map_err(|e| e.to_string())?;
                    }
                    writeln!(out).map_err(|e| e.to_string())?;
                    out.write_all(message.body()).map_err(|e| e.to_string())?;
                    writeln!(out, "\n").map_err(|e| e.to_string())?;
                }
                if !no_ack {
                    message.ack().await.map_err(|e| e.to_string())?;
                }
            }
        }
    }
    client.disconnect().await.map_err(|e| e.to_string())
}
