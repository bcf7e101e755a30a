//! A seeded fault-schedule run (after Jepsen): a seed generates a workload and
//! a schedule of faults, real services run it as separate processes against a
//! real ActiveMQ and a real database while the faults strike, and a checker
//! reads what the system recorded and says what became of every event.
//!
//! ```text
//! cargo build --examples --all-features
//! target/debug/examples/chaos run --seed 42 --db postgres --minutes 2
//! scripts/chaos.sh --seed 42 --minutes 2 --db all     # the same, built first
//! ```
//!
//! The binary is also the services: `chaos producer` (appends the plan's events
//! and runs a relay) and `chaos consumer --name alpha|beta` (consumes its own
//! queue of the Virtual Topic `chaos`). `chaos run` starts them as child
//! processes, each connected to the broker through a fault proxy of its own.
//!
//! The workload: events with few or many keys, payloads from empty to over the
//! producer's limits (refused at append), rows the relay cannot decode, and
//! handler behaviours chosen per event (fails n times, always fails, swallows a
//! database error, panics, is slow); foreign messages sent straight to the topic
//! with raw STOMP (long ids, ids differing only in case, missing or empty
//! `event-id`, undecodable bodies, bodies and header counts over the consumer's
//! limits). The faults: SIGKILL of a service at random moments and at named
//! failpoints, broker kill -9 and restart, broker SIGSTOP, proxy cut, reset,
//! reset mid-frame, blackhole and one-way freeze, terminated database
//! sessions (PostgreSQL and MariaDB), and producer or relay processes
//! restarted with their wall clock minutes to an hour off, while a second
//! relay process shares the outbox for part of the run.
//!
//! What a seed generates is the same on every run; the moments at which faults
//! meet real processes are not, so a replay repeats the plan, not every
//! interleaving. The plan, the schedule, the service logs and the summary are
//! in the run folder under `target/chaos/`, kept when the run fails.

#[path = "chaos/checker.rs"]
mod checker;
#[path = "chaos/consumer.rs"]
mod consumer;
#[path = "chaos/db.rs"]
mod db;
#[path = "chaos/plan.rs"]
mod plan;
#[path = "chaos/process.rs"]
mod process;
#[path = "chaos/producer.rs"]
mod producer;
#[path = "chaos/runner.rs"]
mod runner;
#[path = "shared/mod.rs"]
mod shared;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::shared::{BoxError, open_sqlite, stop_on_signals};

/// A seeded fault-schedule run, and the services it runs.
#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs a seed: services, faults, check, summary. Exits 1 when an
    /// invariant is broken.
    Run(runner::RunArgs),
    /// Prints what a seed would run (workload and schedule), without
    /// running it.
    Plan(runner::RunArgs),
    /// The producer service (started by `run`).
    Producer {
        #[arg(long)]
        broker: String,
        #[arg(long)]
        database: String,
        /// The plan file `run` wrote.
        #[arg(long)]
        plan: std::path::PathBuf,
        /// Run the relay only, appending nothing (the second relay).
        #[arg(long)]
        relay_only: bool,
    },
    /// A consumer service (started by `run`).
    Consumer {
        #[arg(long)]
        name: String,
        #[arg(long)]
        broker: String,
        #[arg(long)]
        database: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Run(args) => runner::run(args).await,
        Command::Plan(args) => runner::show_plan(&args).map(|()| true),
        Command::Producer {
            broker,
            database,
            plan,
            relay_only,
        } => {
            service(async move {
                let plan: plan::Plan = serde_json::from_slice(&std::fs::read(&plan)?)?;
                let stop = stop_on_signals()?;
                let append = !relay_only;
                match scheme(&database) {
                    "sqlite" => {
                        let pool = open_sqlite(&database, 4).await?;
                        producer::on_sqlite::run(pool, &plan, append, &broker, stop).await
                    }
                    "postgres" => {
                        let pool = pg(&database, 4).await?;
                        producer::on_postgres::run(pool, &plan, append, &broker, stop).await
                    }
                    _ => {
                        let pool = my(&database, 4).await?;
                        producer::on_mysql::run(pool, &plan, append, &broker, stop).await
                    }
                }
            })
            .await
        }
        Command::Consumer {
            name,
            broker,
            database,
        } => {
            service(async move {
                let stop = stop_on_signals()?;
                match scheme(&database) {
                    "sqlite" => {
                        let pool = open_sqlite(&database, 6).await?;
                        consumer::on_sqlite::run(pool, &name, &broker, stop).await
                    }
                    "postgres" => {
                        let pool = pg(&database, 6).await?;
                        consumer::on_postgres::run(pool, &name, &broker, stop).await
                    }
                    _ => {
                        let pool = my(&database, 6).await?;
                        consumer::on_mysql::run(pool, &name, &broker, stop).await
                    }
                }
            })
            .await
        }
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("[chaos] error: {error}");
            ExitCode::from(2)
        }
    }
}

/// Runs a service with logging on.
async fn service(
    body: impl std::future::Future<Output = Result<(), BoxError>>,
) -> Result<bool, BoxError> {
    shared::init_logging();
    body.await.map(|()| true)
}

fn scheme(url: &str) -> &str {
    match url.split(':').next().unwrap_or_default() {
        "postgres" | "postgresql" => "postgres",
        "mysql" | "mariadb" => "mysql",
        _ => "sqlite",
    }
}

/// Pools do not ping before each use: the services retry whatever fails on a
/// connection the run terminated.
async fn pg(url: &str, size: u32) -> Result<sqlx::PgPool, BoxError> {
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(size)
        .test_before_acquire(false)
        .connect(url)
        .await?)
}

async fn my(url: &str, size: u32) -> Result<sqlx::MySqlPool, BoxError> {
    Ok(sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(size)
        .test_before_acquire(false)
        .connect(url)
        .await?)
}
