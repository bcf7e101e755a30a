//! The reference scenario in one command: a user service (DB1) registers users,
//! a points service (DB2) gives each of them exactly one welcome-points row,
//! and ActiveMQ carries the `user.created` events in between. At the end the
//! demo compares the two databases: no user may be missing a row, none may
//! have two.
//!
//! ```text
//! cargo build --examples --all-features     # the demo runs the two service binaries
//! target/debug/examples/demo                # 1000 users on two fresh SQLite files
//! target/debug/examples/demo --crash        # SIGKILL and restart services and broker meanwhile
//! target/debug/examples/demo --users-db postgres://postgres@127.0.0.1/db1 \
//!     --points-db mysql://root@127.0.0.1/db2
//! ```
//!
//! `scripts/demo.sh` installs what is missing, builds and runs this. If nothing
//! answers STOMP at `--broker`, the demo starts an ActiveMQ of its own (it needs
//! the Debian package `activemq` and Java). The services run as child processes
//! (`user_service` and `points_service`, next to this binary) with their logs in
//! the run's folder under `target/demo/`. The points service starts first:
//! subscribing creates its Virtual Topic queue, and such a queue only receives
//! messages published after it exists.
//!
//! With `--crash` the demo kills each service with SIGKILL several times at
//! random moments and restarts it, and kills and restarts the broker once (only
//! a broker it started itself). Exits 0 only if every user ends up with exactly
//! one welcome-points row.

#[path = "demo/db.rs"]
mod db;
#[path = "demo/service.rs"]
mod service;
#[path = "shared/mod.rs"]
mod shared;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use outbox::stomp::{AckMode, Client, Config, Subscribe};
use outbox_test_harness::{Broker, BrokerConfig};
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;

use crate::db::{Check, Db, Progress};
use crate::service::Service;

use shared::BoxError;

/// The points service's queue on the Virtual Topic `user.created`.
const POINTS_QUEUE: &str = "/queue/Consumer.points.VirtualTopic.user.created";

/// What the points service logs once it has subscribed.
const POINTS_READY: &str = "subscribed to the user.created queue";

macro_rules! say {
    ($($arg:tt)*) => {
        println!("[demo] {}", format_args!($($arg)*))
    };
}

/// Runs the user service and the points service against a broker and two
/// databases, and checks that every user got exactly one welcome-points row.
#[derive(Debug, Parser)]
struct Args {
    /// The broker to use; if nothing answers there, the demo starts its own ActiveMQ.
    #[arg(long, default_value = "stomp://127.0.0.1:61613")]
    broker: String,
    /// Start an ActiveMQ of the demo's own even if one answers at `--broker`.
    #[arg(long)]
    own_broker: bool,
    /// Users to register.
    #[arg(long, default_value_t = 1000)]
    users: i64,
    /// Registrations per second.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// DB1, the user service's database (default: a fresh SQLite file).
    #[arg(long)]
    users_db: Option<String>,
    /// DB2, the points service's database (default: a fresh SQLite file).
    #[arg(long)]
    points_db: Option<String>,
    /// Kill and restart the services (and the demo's own broker) while they work.
    #[arg(long)]
    crash: bool,
    /// SIGKILLs per service with `--crash`.
    #[arg(long, default_value_t = 3)]
    kills: usize,
    /// Seed of the crash plan (printed when not given).
    #[arg(long)]
    seed: Option<u64>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 180)]
    timeout: u64,
    /// Also print the services' log lines (they always go to files in the run folder).
    #[arg(long)]
    verbose: bool,
    /// Keep the run folder (SQLite files, service logs) after a successful run.
    #[arg(long)]
    keep: bool,
    /// Run both services with `--trace`: each prints its finished spans to
    /// its log, so one event's trace can be followed from the user service
    /// through the broker into the points service (needs the `otel` feature).
    #[arg(long)]
    trace: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            say!("error: {error}");
            ExitCode::from(2)
        }
    }
}

/// The broker the services talk to.
enum BrokerInUse {
    /// One that answered at `--broker`.
    External(String),
    /// One the demo started.
    Own(Box<Broker>),
}

impl BrokerInUse {
    /// The URI for the services. For its own broker the demo uses the
    /// failover form, so the services reconnect within a second after the
    /// broker restart.
    fn uri_for_services(&self) -> String {
        match self {
            BrokerInUse::External(uri) => uri.clone(),
            BrokerInUse::Own(broker) => format!(
                "failover:({})?initialReconnectDelay=100&maxReconnectDelay=1000",
                broker.stomp_uri()
            ),
        }
    }
}

async fn run(args: Args) -> Result<bool, BoxError> {
    if args.users < 1 {
        return Err("--users must be at least 1".into());
    }
    let begun = Instant::now();
    let (user_bin, points_bin, target) = binaries()?;
    let run_dir = target.join("demo").join(format!(
        "run-{}-{}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        std::process::id()
    ));
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| format!("creating {}: {e}", run_dir.display()))?;
    let users_url = args
        .users_db
        .clone()
        .unwrap_or_else(|| sqlite_url(&run_dir.join("users.db")));
    let points_url = args
        .points_db
        .clone()
        .unwrap_or_else(|| sqlite_url(&run_dir.join("points.db")));
    say!("run folder: {}", run_dir.display());
    say!("DB1 (user service):   {users_url}");
    say!("DB2 (points service): {points_url}");
    let db1 = Db::open(&users_url)
        .await
        .map_err(|e| format!("opening DB1: {e}"))?;
    let db2 = Db::open(&points_url)
        .await
        .map_err(|e| format!("opening DB2: {e}"))?;
    ensure_empty(&db1, "users", "DB1").await?;
    ensure_empty(&db2, "welcome_points", "DB2").await?;

    let mut broker = find_or_start_broker(&args).await?;
    let broker_uri = broker.uri_for_services();

    let trace: Vec<String> = if args.trace {
        vec!["--trace".into()]
    } else {
        Vec::new()
    };
    let mut points = Service::new(
        "points",
        points_bin,
        [
            vec![
                "--broker".into(),
                broker_uri.clone(),
                "--database".into(),
                points_url,
            ],
            trace.clone(),
        ]
        .concat(),
        run_dir.join("points_service.log"),
        args.verbose,
        POINTS_READY,
    );
    let mut users = Service::new(
        "user",
        user_bin,
        [
            vec![
                "--broker".into(),
                broker_uri,
                "--database".into(),
                users_url,
                "--users".into(),
                args.users.to_string(),
                "--rate".into(),
                args.rate.to_string(),
            ],
            trace,
        ]
        .concat(),
        run_dir.join("user_service.log"),
        args.verbose,
        "connected to the broker",
    );
    say!(
        "service logs: {} and {}",
        points.log_path().display(),
        users.log_path().display()
    );

    // The points service first: its subscription creates the Virtual Topic
    // queue, and such a queue only receives what is published after it exists.
    let pid = points.start()?;
    say!("points service started (pid {pid}); waiting until it has subscribed");
    points.wait_ready(Duration::from_secs(60)).await?;
    say!(
        "points service subscribed: {POINTS_QUEUE} exists now and keeps every \
         user.created event published from here on"
    );
    let pid = users.start()?;
    say!(
        "user service started (pid {pid}): registering {} users at {}/s",
        args.users,
        args.rate
    );
    let started = Instant::now();

    let mut chaos = if args.crash {
        Chaos::plan(&args, &broker, started)
    } else {
        Chaos::none()
    };
    let deadline = started + Duration::from_secs(args.timeout);
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failure: Option<String> = None;
    loop {
        let next_crash = chaos.next_at();
        tokio::select! {
            _ = ticks.tick() => {}
            _ = tokio::time::sleep_until(next_crash.unwrap_or(deadline)), if next_crash.is_some() => {
                chaos.strike(&mut users, &mut points, &mut broker).await?;
                continue;
            }
            _ = interrupt.recv() => {
                failure = Some("interrupted".into());
                break;
            }
        }
        if let Some(message) = exited_on_its_own(&mut users)?.or(exited_on_its_own(&mut points)?) {
            failure = Some(message);
            break;
        }
        let now = Progress::read(&db1, &db2).await;
        say!(
            "{:>4}s  users registered {}/{}  events waiting in DB1's outbox {}  \
             welcome_points rows {}",
            started.elapsed().as_secs(),
            shown(now.users),
            args.users,
            shown(now.unpublished),
            shown(now.points_rows)
        );
        let done = now.users == Some(args.users)
            && now.unpublished == Some(0)
            && now.points_users == Some(args.users);
        if done && chaos.finished() {
            say!("every user has welcome points and every event is published");
            break;
        }
        if Instant::now() >= deadline {
            failure = Some(format!("timed out after {} s", args.timeout));
            break;
        }
    }
    if let Some(why) = &failure {
        say!("stopping early: {why}");
    }

    say!("stopping the services gracefully (SIGTERM)");
    let mut graceful = true;
    for service in [&mut users, &mut points] {
        if !service.stop(Duration::from_secs(30)).await? {
            say!(
                "the {} service did not stop cleanly; last lines of {}:\n{}",
                service.name,
                service.log_path().display(),
                service.log_tail(10)
            );
            graceful = false;
        }
    }
    let check = Check::read(&db1, &db2).await?;
    db1.close().await;
    db2.close().await;
    print_table(&check, &users, &points, &chaos);
    drop(broker);

    let passed = failure.is_none() && check.holds() && check.users == usize::try_from(args.users)?;
    let timing = format!(
        "{:.1} s from the services' start, {:.1} s in all",
        started.elapsed().as_secs_f64(),
        begun.elapsed().as_secs_f64()
    );
    if passed {
        say!(
            "OK: {} users, each with exactly one welcome-points row ({timing})",
            check.users
        );
        if !graceful {
            say!("(a service needed SIGKILL to stop; see its log above)");
        }
        if !args.keep {
            // Best effort: a leftover folder under target/ harms nothing.
            let _ = std::fs::remove_dir_all(&run_dir);
        }
    } else {
        say!(
            "FAILED ({timing}); the run folder with the service logs is kept: {}",
            run_dir.display()
        );
    }
    Ok(passed)
}

/// The two service binaries next to this one, and cargo's target folder.
fn binaries() -> Result<(PathBuf, PathBuf, PathBuf), BoxError> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().ok_or("the demo binary has no parent folder")?;
    let user_bin = dir.join("user_service");
    let points_bin = dir.join("points_service");
    for bin in [&user_bin, &points_bin] {
        if !bin.is_file() {
            return Err(format!(
                "{} is missing. The demo runs the compiled service examples next to it: \
                 build them first with `cargo build --examples --all-features` \
                 (scripts/demo.sh does this for you)",
                bin.display()
            )
            .into());
        }
    }
    let target = dir
        .ancestors()
        .find(|d| d.join("CACHEDIR.TAG").is_file())
        .map_or_else(|| PathBuf::from("target"), Path::to_path_buf);
    Ok((user_bin, points_bin, target))
}

fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}?mode=rwc", path.display())
}

/// Refuses databases that already hold demo data: the final check counts rows.
async fn ensure_empty(db: &Db, table: &str, name: &str) -> Result<(), BoxError> {
    // A missing table is fine: the service creates it.
    let rows = db
        .number(&format!("SELECT COUNT(*) FROM {table}"))
        .await
        .unwrap_or(0);
    if rows > 0 {
        return Err(format!(
            "{name} already has {rows} rows in {table}; the demo needs empty databases \
             (the SQLite default gets fresh files on every run)"
        )
        .into());
    }
    Ok(())
}

/// Uses the broker at `--broker` if it answers, else starts one.
async fn find_or_start_broker(args: &Args) -> Result<BrokerInUse, BoxError> {
    if !args.own_broker {
        let mut config = Config::parse(&args.broker)?;
        config.connect_timeout = Duration::from_secs(3);
        if let Ok(client) = Client::connect(config).await {
            let server = client
                .server_info()
                .and_then(|info| info.server)
                .unwrap_or_else(|| "a STOMP broker".into());
            say!("using the broker at {} ({server})", args.broker);
            drain_leftovers(&client).await?;
            let _ = client.disconnect().await;
            return Ok(BrokerInUse::External(args.broker.clone()));
        }
        say!("nothing answers at {}", args.broker);
    }
    say!("starting an ActiveMQ of the demo's own (a few seconds)");
    let broker = Broker::start_with(BrokerConfig::default().with_max_heap_mb(512))
        .await
        .map_err(|e| format!("starting ActiveMQ: {e}"))?;
    say!(
        "using ActiveMQ started by the demo at {} (pid {}, data in {})",
        broker.stomp_uri(),
        broker.pid().unwrap_or_default(),
        broker.data_dir().display()
    );
    Ok(BrokerInUse::Own(Box::new(broker)))
}

/// Removes messages an earlier, interrupted run left in the points queue of a
/// broker that outlived it: they name user ids of that run's DB1.
async fn drain_leftovers(client: &Client) -> Result<(), BoxError> {
    let mut queue = client
        .subscribe(
            Subscribe::new(POINTS_QUEUE)
                .ack(AckMode::ClientIndividual)
                .prefetch(500),
        )
        .await?;
    let mut removed = 0u64;
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_secs(1), queue.next_message()).await
    {
        message.ack().await?;
        removed += 1;
    }
    queue.unsubscribe().await?;
    if removed > 0 {
        say!("removed {removed} messages an earlier run left in {POINTS_QUEUE}");
    }
    Ok(())
}

/// `Some(why)` if the service's process ended without being told to.
fn exited_on_its_own(service: &mut Service) -> Result<Option<String>, BoxError> {
    Ok(service.exited()?.map(|status| {
        format!(
            "the {} service exited on its own ({status}); last lines of {}:\n{}",
            service.name,
            service.log_path().display(),
            service.log_tail(20)
        )
    }))
}

fn shown<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}

/// What `--crash` does to whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    UserService,
    PointsService,
    Broker,
}

/// The crash plan: when to strike, and whom.
struct Chaos {
    steps: VecDeque<(Instant, Target)>,
    total: usize,
    rng: rand::rngs::StdRng,
    broker_restarts: u32,
}

impl Chaos {
    fn none() -> Chaos {
        Chaos {
            steps: VecDeque::new(),
            total: 0,
            rng: rand::rngs::StdRng::seed_from_u64(0),
            broker_restarts: 0,
        }
    }

    /// Spreads the crashes over the time the registrations should take.
    fn plan(args: &Args, broker: &BrokerInUse, start: Instant) -> Chaos {
        let seed = args.seed.unwrap_or_else(rand::random);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut targets = Vec::new();
        for _ in 0..args.kills {
            targets.extend([Target::UserService, Target::PointsService]);
        }
        match broker {
            BrokerInUse::Own(_) => targets.push(Target::Broker),
            BrokerInUse::External(_) => say!(
                "crash mode: the broker restart is skipped, because the broker was not \
                 started by the demo (--own-broker makes the demo start one)"
            ),
        }
        targets.shuffle(&mut rng);
        let expected = if args.rate > 0.0 {
            Duration::from_secs_f64(args.users as f64 / args.rate)
        } else {
            Duration::from_secs(5)
        };
        let slot = (expected / u32::try_from(targets.len() + 1).unwrap_or(u32::MAX))
            .max(Duration::from_millis(500));
        let mut at = start;
        let mut steps = VecDeque::new();
        for target in targets {
            at += slot.mul_f64(rng.gen_range(0.5..1.5));
            steps.push_back((at, target));
        }
        say!(
            "crash mode: {} SIGKILLs per service{} at random moments (seed {seed}; \
             --seed {seed} repeats the plan)",
            args.kills,
            if matches!(broker, BrokerInUse::Own(_)) {
                " and one broker restart"
            } else {
                ""
            }
        );
        Chaos {
            total: steps.len(),
            steps,
            rng,
            broker_restarts: 0,
        }
    }

    fn next_at(&self) -> Option<Instant> {
        self.steps.front().map(|(at, _)| *at)
    }

    fn finished(&self) -> bool {
        self.steps.is_empty()
    }

    /// Carries out the next step.
    async fn strike(
        &mut self,
        users: &mut Service,
        points: &mut Service,
        broker: &mut BrokerInUse,
    ) -> Result<(), BoxError> {
        let Some((_, target)) = self.steps.pop_front() else {
            return Ok(());
        };
        let step = self.total - self.steps.len();
        match target {
            Target::UserService | Target::PointsService => {
                let service = if target == Target::UserService {
                    users
                } else {
                    points
                };
                let old = service.pid().unwrap_or_default();
                service.kill().await?;
                say!(
                    "crash {step}/{}: SIGKILL {} service (pid {old})",
                    self.total,
                    service.name
                );
                let pause = Duration::from_millis(self.rng.gen_range(0..1000));
                tokio::time::sleep(pause).await;
                let new = service.start()?;
                say!(
                    "  {} service restarted after {} ms (pid {new})",
                    service.name,
                    pause.as_millis()
                );
            }
            Target::Broker => {
                let BrokerInUse::Own(broker) = broker else {
                    return Ok(());
                };
                say!(
                    "crash {step}/{}: SIGKILL ActiveMQ (pid {}); the services keep \
                     running and reconnect",
                    self.total,
                    broker.pid().unwrap_or_default()
                );
                broker.kill().await?;
                let pause = Duration::from_millis(self.rng.gen_range(500..2000));
                tokio::time::sleep(pause).await;
                let back = Instant::now();
                broker.start_again().await?;
                self.broker_restarts += 1;
                say!(
                    "  ActiveMQ is back on the same port and data ({:.1} s down)",
                    (pause + back.elapsed()).as_secs_f64()
                );
            }
        }
        Ok(())
    }
}

fn print_table(check: &Check, users: &Service, points: &Service, chaos: &Chaos) {
    let rows = [
        ("users in DB1", check.users.to_string()),
        ("welcome_points rows in DB2", check.rows.to_string()),
        (
            "missing (users without a points row)",
            check.missing.to_string(),
        ),
        (
            "duplicated (users with more than one)",
            check.duplicated.to_string(),
        ),
        ("rows for unknown users", check.unknown.to_string()),
    ];
    let notes = [
        (
            "user service: starts / SIGKILLs",
            format!("{} / {}", users.starts, users.kills),
        ),
        (
            "points service: starts / SIGKILLs",
            format!("{} / {}", points.starts, points.kills),
        ),
        ("broker restarts", chaos.broker_restarts.to_string()),
        (
            "redeliveries skipped by the inbox",
            points.logged_duplicates().to_string(),
        ),
    ];
    let width = rows
        .iter()
        .chain(&notes)
        .map(|(name, _)| name.len())
        .max()
        .unwrap_or(0);
    let value_width = rows
        .iter()
        .chain(&notes)
        .map(|(_, value)| value.len())
        .max()
        .unwrap_or(0)
        .max(5);
    println!();
    println!("Final check");
    println!("| {:<width$} | {:>value_width$} |", "check", "count");
    println!("|-{}-|-{}:|", "-".repeat(width), "-".repeat(value_width));
    for (name, value) in rows.iter().chain(&notes) {
        println!("| {name:<width$} | {value:>value_width$} |");
    }
    println!();
    println!(
        "A redelivery is a message the broker delivered again (after a crash before the \
         ack, or a relay that published again after a crash before marking): it carries \
         the same event id, the inbox recognises it, and no second row is written. The \
         count comes from the points service's logs and misses the last second before \
         each SIGKILL."
    );
    println!();
}
