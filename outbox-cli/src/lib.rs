//! `outbox`, the operator's command for the outbox and inbox tables of one
//! database (SQLite, PostgreSQL or MySQL/MariaDB): status, parked rows,
//! replays and migrations. The commands are the library's admin calls
//! ([`outbox_core::admin`]); this crate only adds the command line and its
//! output, so applications that use the library carry none of it.
//!
//! Exit codes ([`Exit`]): 0 done, 1 the operation failed, 2 usage error,
//! 3 bad database URL or cannot connect, 4 a table does not exist, 5 an id
//! given is not a parked row. See `docs/cli.md`.
#![warn(missing_docs, rust_2018_idioms)]

pub mod cli;
mod commands;
mod db;
mod error;
mod render;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

pub use cli::Cli;
pub use error::{CliError, Exit};

/// Parses the process's arguments and runs the command: what the `outbox`
/// binary does.
pub fn main() -> ExitCode {
    match Cli::try_parse() {
        Ok(cli) => run(&cli),
        Err(e) => {
            // Help and version go to stdout with 0, usage errors to stderr with 2.
            let _ = e.print();
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(Exit::Usage as u8))
        }
    }
}

/// Runs `cli`'s command: prints its output on stdout (a JSON document with
/// `--json`), failures on stderr, and returns the exit code they mean.
pub fn run(cli: &Cli) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return Exit::Failed.into();
        }
    };
    let failure = match runtime.block_on(execute(cli)) {
        Ok(output) => match print(cli, &output) {
            // A closed stdout (`outbox parked | head -1`) ends the output
            // quietly, as with other Unix tools; the command itself was done.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => output.then,
            Ok(()) => output.then,
            Err(e) => Some(e.into()),
        },
        Err(e) => Some(e),
    };
    match failure {
        None => Exit::Ok.into(),
        Some(e) => {
            eprintln!("error: {e}");
            e.exit().into()
        }
    }
}

fn print(cli: &Cli, output: &commands::Output) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    if cli.json {
        writeln!(out, "{}", output.json)?;
    } else {
        out.write_all(output.human.as_bytes())?;
    }
    out.flush()?;
    Ok(())
}

async fn execute(cli: &Cli) -> Result<commands::Output, CliError> {
    let Some(url) = cli.database.as_deref() else {
        return Err(CliError::Usage(
            "no database given: pass --database URL or set DATABASE_URL".into(),
        ));
    };
    let (kind, url) = db::parse_url(url)?;
    match kind {
        db::Kind::Sqlite => {
            let pool = db::connect::<sqlx::Sqlite>(&url).await?;
            let output = commands::run(&pool, cli, "SQLite").await;
            pool.close().await;
            output
        }
        db::Kind::Postgres => {
            let pool = db::connect::<sqlx::Postgres>(&url).await?;
            let output = commands::run(&pool, cli, "PostgreSQL").await;
            pool.close().await;
            output
        }
        db::Kind::MySql => {
            let pool = db::connect::<sqlx::MySql>(&url).await?;
            let output = commands::run(&pool, cli, "MySQL").await;
            pool.close().await;
            output
        }
    }
}
