//! The run: a broker, a fault proxy in front of it for each service, the
//! database, the services as child processes, the foreign messages, the fault
//! schedule carried out, the wait until the system settles, the check and the
//! summary.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outbox_test_harness::{Broker, BrokerConfig, Direction, FaultProxy, RawStomp, TestDb};
use tokio::time::Instant;

use crate::checker::Check;
use crate::consumer::READY;
use crate::db::Db;
use crate::plan::{CONSUMERS, Class, Fault, ForeignMessage, PRODUCER, Plan, RELAY2, skew};
use crate::process::Service;
use crate::shared::BoxError;

macro_rules! say {
    ($($arg:tt)*) => {
        println!("[chaos] {}", format_args!($($arg)*))
    };
}

/// The options of a run.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RunArgs {
    /// The seed of the workload and the fault schedule (random if not given;
    /// printed either way).
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// The database: sqlite, postgres or mysql.
    #[arg(long, default_value = "sqlite")]
    pub(crate) db: String,
    /// How long faults are injected, in minutes (fractions allowed).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) minutes: f64,
    /// Classes of input left out, comma-separated: swallow, oversize,
    /// corrupt-row, empty-id, case-id, clock-ahead (known open defects).
    #[arg(long, default_value = "")]
    pub(crate) exclude: String,
    /// Seconds without progress after the faults stop that count as stuck.
    #[arg(long, default_value_t = 60)]
    pub(crate) stall_bound: u64,
    /// Highest peak memory (VmHWM) a service process may reach, in MiB.
    #[arg(long, default_value_t = 512)]
    pub(crate) memory_bound_mib: u64,
    /// Keep the run folder after a run that passed.
    #[arg(long)]
    pub(crate) keep: bool,
}

/// The database of a run, kept alive until the run ends (a server database
/// is dropped with it).
enum RunDb {
    Sqlite,
    Postgres { _db: TestDb<sqlx::Postgres> },
    MySql { _db: TestDb<sqlx::MySql> },
}

/// The prefetch of each consumer and the relay's batch: what can be in
/// flight when a fault strikes.
const IN_FLIGHT_PER_FAULT: u64 = 32 + 50;

/// Prints the plan `args` would run, as a run prints it at its start.
pub(crate) fn show_plan(args: &RunArgs) -> Result<(), BoxError> {
    let seed = args.seed.unwrap_or_else(rand::random);
    let excluded = Class::parse_list(&args.exclude)?;
    let fault_time = Duration::from_secs_f64((args.minutes * 60.0).max(10.0));
    let plan = Plan::generate(
        seed,
        fault_time,
        args.db != "sqlite",
        args.db == "postgres",
        excluded,
    );
    say!("seed {seed}, database {}", args.db);
    for line in plan.describe().lines() {
        say!("{line}");
    }
    Ok(())
}

/// Runs the whole thing; `Ok(true)` when every invariant held.
pub(crate) async fn run(args: RunArgs) -> Result<bool, BoxError> {
    let seed = args.seed.unwrap_or_else(rand::random);
    let excluded = Class::parse_list(&args.exclude)?;
    let fault_time = Duration::from_secs_f64((args.minutes * 60.0).max(10.0));
    let exe = std::env::current_exe()?;
    let run_dir = target_dir(&exe).join("chaos").join(format!(
        "seed-{seed}-{}-{}-{}",
        args.db,
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        std::process::id()
    ));
    std::fs::create_dir_all(&run_dir)?;

    let (run_db, url) = match args.db.as_str() {
        "sqlite" => (
            RunDb::Sqlite,
            format!("sqlite://{}?mode=rwc", run_dir.join("chaos.db").display()),
        ),
        "postgres" => {
            let db = TestDb::postgres()
                .await?
                .ok_or("PostgreSQL is skipped by configuration")?;
            let url = db.url().to_owned();
            (RunDb::Postgres { _db: db }, url)
        }
        "mysql" => {
            let db = TestDb::mysql()
                .await?
                .ok_or("MySQL is skipped by configuration")?;
            let url = db.url().to_owned();
            (RunDb::MySql { _db: db }, url)
        }
        other => return Err(format!("--db {other}: use sqlite, postgres or mysql").into()),
    };
    let plan = Plan::generate(
        seed,
        fault_time,
        !matches!(run_db, RunDb::Sqlite),
        matches!(run_db, RunDb::Postgres { .. }),
        excluded,
    );
    let plan_path = run_dir.join("plan.json");
    std::fs::write(&plan_path, serde_json::to_vec_pretty(&plan)?)?;
    let description = plan.describe();
    std::fs::write(run_dir.join("schedule.txt"), &description)?;
    say!(
        "seed {seed}, database {}, faults for {:.0} s",
        args.db,
        fault_time.as_secs_f64()
    );
    say!("run folder: {}", run_dir.display());
    for line in description.lines() {
        say!("{line}");
    }

    let db = Db::open(&url).await?;
    db.create_tables().await?;

    let mut broker = Broker::start_with(BrokerConfig::default().with_max_heap_mb(512)).await?;
    say!(
        "broker at {} (pid {})",
        broker.stomp_uri(),
        broker.pid().unwrap_or_default()
    );
    let mut proxies: HashMap<String, FaultProxy> = HashMap::new();
    let mut services: BTreeMap<String, Service> = BTreeMap::new();
    let names: Vec<String> = CONSUMERS
        .iter()
        .chain(&[PRODUCER, RELAY2])
        .map(|c| (*c).to_owned())
        .collect();
    for name in &names {
        let proxy = FaultProxy::start(broker.stomp_addr()).await?;
        let uri = format!(
            "failover:({})?initialReconnectDelay=100&maxReconnectDelay=1000",
            proxy.stomp_uri()
        );
        let mut service_args = if name == PRODUCER || name == RELAY2 {
            let mut producer = vec![
                "producer".to_owned(),
                "--plan".to_owned(),
                plan_path.display().to_string(),
            ];
            if name == RELAY2 {
                producer.push("--relay-only".to_owned());
            }
            producer
        } else {
            vec!["consumer".to_owned(), "--name".to_owned(), name.clone()]
        };
        service_args.extend([
            "--broker".to_owned(),
            uri,
            "--database".to_owned(),
            url.clone(),
        ]);
        let ready = if name == PRODUCER || name == RELAY2 {
            "relay running"
        } else {
            READY
        };
        let mut service = Service::new(
            name,
            exe.clone(),
            service_args,
            run_dir.join(format!("{name}.log")),
            ready,
        );
        // The second relay runs only during its window.
        service.wanted = name != RELAY2;
        services.insert(name.clone(), service);
        proxies.insert(name.clone(), proxy);
    }
    // Consumers first: subscribing creates their Virtual Topic queues.
    for name in CONSUMERS {
        if let Some(service) = services.get_mut(name) {
            service.start(None)?;
            service.wait_ready(Duration::from_secs(60)).await?;
        }
    }
    if let Some(producer) = services.get_mut(PRODUCER) {
        producer.start(None)?;
    }
    let started = Instant::now();
    say!("services started; faults begin");

    let sends: Arc<Mutex<HashMap<i64, Sends>>> = Arc::default();
    let sender = tokio::spawn(send_foreign(
        broker.stomp_addr(),
        plan.foreign.clone(),
        started,
        sends.clone(),
    ));

    let mut run = Run {
        started,
        services,
        proxies,
        broker_down: false,
        broker_frozen: false,
        injected: BTreeMap::new(),
        ends: Vec::new(),
        last_progress: None,
        last_change: Instant::now(),
        longest_stall: Duration::ZERO,
        skews: Vec::new(),
        second_relay: Vec::new(),
    };
    let second_relay = plan.second_relay.map(|(from, until)| {
        (
            started + Duration::from_millis(from),
            started + Duration::from_millis(until),
        )
    });
    let mut schedule = plan.faults.iter().peekable();
    let faults_end = started + Duration::from_millis(plan.fault_ms);
    let mut last_fault_at = started;
    let mut next_observation = started;
    let mut next_status = started;
    loop {
        let now = Instant::now();
        if now >= faults_end {
            break;
        }
        while let Some((at, fault)) = schedule.peek() {
            if started + Duration::from_millis(*at) > now {
                break;
            }
            say!("{:>6.1}s fault: {fault}", started.elapsed().as_secs_f64());
            if run.inject(fault, &mut broker, &db).await? {
                *run.injected.entry(fault.kind()).or_default() += 1;
                last_fault_at = Instant::now();
            }
            schedule.next();
        }
        if let Some((from, until)) = second_relay {
            run.second_relay(from, until).await?;
        }
        run.finish_due(&mut broker, false).await?;
        run.keep_running(true)?;
        if now >= next_observation {
            next_observation = now + Duration::from_secs(1);
            run.observe(&db).await;
        }
        if now >= next_status {
            next_status = now + Duration::from_secs(5);
            say!(
                "{:>6.1}s progress {:?}",
                started.elapsed().as_secs_f64(),
                run.last_progress
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    say!("faults stop; ending the ones still in force");
    if let Some(relay) = run.services.get_mut(RELAY2)
        && relay.wanted
    {
        relay.wanted = false;
        relay.stop(Duration::from_secs(20)).await?;
        say!("{RELAY2} stopped");
    }
    run.finish_due(&mut broker, true).await?;
    for (name, service) in run.services.iter_mut() {
        if service.armed.is_some() && service.wanted {
            say!("restarting {name} without its failpoint");
            service.kill().await?;
            service.start(None)?;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), sender).await;
    let foreign_sends = sends.lock().unwrap_or_else(|p| p.into_inner()).clone();

    // Settle: until every event has its outcome, or no progress for the bound.
    let settle_started = Instant::now();
    let stall_bound = Duration::from_secs(args.stall_bound);
    run.last_change = Instant::now();
    let mut settle_stall = Duration::ZERO;
    let settled = loop {
        run.keep_running(false)?;
        // The time since the last change, before this reading may reset it.
        settle_stall = settle_stall.max(run.last_change.elapsed());
        run.observe(&db).await;
        if let Ok(check) = Check::read(&db, &plan, &foreign_sends).await
            && check.settled()
        {
            break true;
        }
        if run.last_change.elapsed() >= stall_bound {
            say!("no progress for {} s: stuck", stall_bound.as_secs());
            break false;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let settle_time = settle_started.elapsed();
    say!(
        "{} {:.1} s after the faults stopped",
        if settled { "settled" } else { "gave up" },
        settle_time.as_secs_f64()
    );

    for service in run.services.values_mut() {
        service.stop(Duration::from_secs(20)).await?;
    }
    let check = Check::read(&db, &plan, &foreign_sends).await?;
    db.close().await;
    drop(broker);

    let summary = Summary {
        args: &args,
        seed,
        plan: &plan,
        check: &check,
        run: &run,
        settled,
        settle_time,
        settle_stall,
        stall_bound,
        since_last_fault: last_fault_at.elapsed(),
        foreign_sends: &foreign_sends,
    };
    let (text, passed) = summary.render();
    print!("{text}");
    std::fs::write(run_dir.join("summary.txt"), &text)?;
    if passed && !args.keep {
        drop(run_db);
        let _ = std::fs::remove_dir_all(&run_dir);
    } else {
        // The database stays for a look afterwards (drop it by hand).
        std::mem::forget(run_db);
        say!("run folder kept: {}", run_dir.display());
        say!("database kept: {url}");
    }
    Ok(passed)
}

/// What happens during the run.
struct Run {
    started: Instant,
    services: BTreeMap<String, Service>,
    proxies: HashMap<String, FaultProxy>,
    broker_down: bool,
    broker_frozen: bool,
    /// Faults carried out, by kind.
    injected: BTreeMap<&'static str, u32>,
    /// Faults to end later: `(when, what)`.
    ends: Vec<(Instant, End)>,
    last_progress: Option<[i64; 4]>,
    last_change: Instant,
    longest_stall: Duration,
    /// Clock skews applied: `(seconds into the run, service, skew in ms)`.
    skews: Vec<(f64, String, i64)>,
    /// When the second relay started and stopped, in seconds into the run.
    second_relay: Vec<(f64, &'static str)>,
}

/// The end of a fault that lasts.
enum End {
    Restart(String),
    BrokerStart,
    BrokerResume,
    ProxyPass(String),
    /// The end of a blackhole: the connections that lost bytes are reset,
    /// then traffic passes again.
    ProxyHeal(String),
}

impl Run {
    /// Starts the second relay when its window opens and stops it (SIGTERM)
    /// when the window closes.
    async fn second_relay(&mut self, from: Instant, until: Instant) -> Result<(), BoxError> {
        let now = Instant::now();
        let at = self.started.elapsed().as_secs_f64();
        let Some(relay) = self.services.get_mut(RELAY2) else {
            return Ok(());
        };
        if now >= from && now < until && !relay.wanted && relay.starts == 0 {
            relay.wanted = true;
            relay.start(None)?;
            self.second_relay.push((at, "started"));
            say!("{at:>6.1}s {RELAY2} started");
        } else if now >= until && relay.wanted {
            relay.wanted = false;
            relay.stop(Duration::from_secs(20)).await?;
            self.second_relay.push((at, "stopped"));
            say!("{at:>6.1}s {RELAY2} stopped");
        }
        Ok(())
    }

    /// Whether `service` should be running now.
    fn wanted(&self, service: &str) -> bool {
        self.services.get(service).is_some_and(|s| s.wanted)
    }

    /// Carries out one fault; `false` if it could not apply now (its target
    /// is down already, or not running by plan).
    async fn inject(
        &mut self,
        fault: &Fault,
        broker: &mut Broker,
        db: &Db,
    ) -> Result<bool, BoxError> {
        let later = |ms: u64| Instant::now() + Duration::from_millis(ms);
        let target = match fault {
            Fault::Kill { service, .. }
            | Fault::Failpoint { service, .. }
            | Fault::ProxyCut { service }
            | Fault::ProxyReset { service }
            | Fault::ProxyResetMidFrame { service, .. }
            | Fault::ProxyBlackhole { service, .. }
            | Fault::ProxyFreeze { service, .. }
            | Fault::ClockSkew { service, .. } => Some(service),
            Fault::BrokerKill { .. } | Fault::BrokerFreeze { .. } | Fault::DbTerminate => None,
        };
        if let Some(service) = target
            && !self.wanted(service)
        {
            say!("        skipped: {service} is not running by plan");
            return Ok(false);
        }
        match fault {
            Fault::Kill { service, pause_ms } => {
                let Some(s) = self.services.get_mut(service) else {
                    return Ok(false);
                };
                if !s.running() {
                    return Ok(false);
                }
                s.kill().await?;
                self.ends
                    .push((later(*pause_ms), End::Restart(service.clone())));
            }
            Fault::Failpoint { service, point, at } => {
                let Some(s) = self.services.get_mut(service) else {
                    return Ok(false);
                };
                s.kill().await?;
                s.start(Some(format!("{point}@{at}")))?;
            }
            Fault::BrokerKill { down_ms } => {
                if self.broker_down {
                    return Ok(false);
                }
                if self.broker_frozen {
                    broker.resume()?;
                    self.broker_frozen = false;
                }
                broker.kill().await?;
                self.broker_down = true;
                self.ends.push((later(*down_ms), End::BrokerStart));
            }
            Fault::BrokerFreeze { ms } => {
                if self.broker_down || self.broker_frozen {
                    return Ok(false);
                }
                broker.pause()?;
                self.broker_frozen = true;
                self.ends.push((later(*ms), End::BrokerResume));
            }
            Fault::ProxyCut { service } => self.proxy(service)?.cut(),
            Fault::ProxyReset { service } => self.proxy(service)?.reset(),
            Fault::ProxyResetMidFrame { service, to_broker } => {
                self.proxy(service)?.reset_mid_frame(direction(*to_broker))
            }
            Fault::ProxyBlackhole { service, ms } => {
                self.proxy(service)?.blackhole();
                self.ends
                    .push((later(*ms), End::ProxyHeal(service.clone())));
            }
            Fault::ProxyFreeze {
                service,
                to_broker,
                ms,
            } => {
                self.proxy(service)?.freeze(direction(*to_broker));
                self.ends
                    .push((later(*ms), End::ProxyPass(service.clone())));
            }
            Fault::DbTerminate => {
                let ended = db.terminate_sessions().await?;
                say!("        {ended} database sessions terminated");
            }
            Fault::ClockSkew { service, skew_ms } => {
                let at = self.started.elapsed().as_secs_f64();
                let Some(s) = self.services.get_mut(service) else {
                    return Ok(false);
                };
                s.kill().await?;
                s.skew_ms = Some(*skew_ms);
                s.start(None)?;
                self.skews.push((at, service.clone(), *skew_ms));
            }
        }
        Ok(true)
    }

    fn proxy(&self, service: &str) -> Result<&FaultProxy, BoxError> {
        self.proxies
            .get(service)
            .ok_or_else(|| format!("no proxy for {service}").into())
    }

    /// Ends the faults that are due (all of them with `all`).
    async fn finish_due(&mut self, broker: &mut Broker, all: bool) -> Result<(), BoxError> {
        let now = Instant::now();
        let (due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.ends)
            .into_iter()
            .partition(|(at, _)| all || *at <= now);
        self.ends = rest;
        for (_, end) in due {
            match end {
                End::Restart(name) => {
                    if let Some(s) = self.services.get_mut(&name)
                        && !s.running()
                        && s.wanted
                    {
                        s.start(None)?;
                    }
                }
                End::BrokerStart => {
                    broker.start_again().await?;
                    self.broker_down = false;
                    say!("{:>6.1}s broker back", self.started.elapsed().as_secs_f64());
                }
                End::BrokerResume => {
                    if self.broker_frozen {
                        broker.resume()?;
                        self.broker_frozen = false;
                    }
                }
                // A blackhole drops bytes of live connections. TCP never
                // resumes a stream with bytes missing: a partition either
                // heals before retransmission gives up (every byte arrives,
                // late: a freeze) or the connection dies. Passing again on
                // the same connections delivered later frames without the
                // dropped ones: seed 330 on SQLite applied a key's place 42
                // while places 39 to 41, dropped in the blackhole, came only
                // after a restart, a broken order no real network makes.
                End::ProxyHeal(name) => {
                    if let Some(proxy) = self.proxies.get(&name) {
                        proxy.reset();
                        proxy.pass();
                    }
                }
                End::ProxyPass(name) => {
                    if let Some(proxy) = self.proxies.get(&name) {
                        proxy.pass();
                    }
                }
            }
        }
        if all {
            for proxy in self.proxies.values() {
                proxy.pass();
            }
        }
        Ok(())
    }

    /// Restarts services whose process ended on its own (a failpoint fired,
    /// or an exit nobody asked for), unless a restart is already planned.
    fn keep_running(&mut self, during_faults: bool) -> Result<(), BoxError> {
        let planned: BTreeSet<String> = self
            .ends
            .iter()
            .filter_map(|(_, end)| match end {
                End::Restart(name) => Some(name.clone()),
                _ => None,
            })
            .collect();
        for (name, service) in self.services.iter_mut() {
            service.sample_memory();
            let armed = service.armed.clone();
            if let Some(status) = service.reap()? {
                say!(
                    "{:>6.1}s {name} ended ({status}{})",
                    self.started.elapsed().as_secs_f64(),
                    armed
                        .map(|a| format!(", failpoint {a} armed"))
                        .unwrap_or_default()
                );
            }
            let restart_planned = during_faults && planned.contains(name);
            if !service.running() && !restart_planned && service.wanted {
                service.start(None)?;
            }
        }
        Ok(())
    }

    /// Reads the progress figure and keeps the longest stall.
    async fn observe(&mut self, db: &Db) {
        if let Ok(now) = db.progress().await
            && self.last_progress != Some(now)
        {
            self.longest_stall = self.longest_stall.max(self.last_change.elapsed());
            self.last_progress = Some(now);
            self.last_change = Instant::now();
        }
    }
}

fn direction(to_broker: bool) -> Direction {
    if to_broker {
        Direction::ToServer
    } else {
        Direction::ToClient
    }
}

/// How often a foreign message was sent.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Sends {
    /// Frames written (each may have arrived).
    pub(crate) written: u32,
    /// Frames the broker confirmed with a receipt.
    pub(crate) confirmed: u32,
}

/// Sends the foreign messages at their times, straight to the broker with
/// raw STOMP, retrying through broker outages. Counts each send whose frame
/// was written (it may have arrived even without a receipt).
async fn send_foreign(
    broker: std::net::SocketAddr,
    mut messages: Vec<ForeignMessage>,
    started: Instant,
    sends: Arc<Mutex<HashMap<i64, Sends>>>,
) {
    messages.sort_by_key(|m| m.at_ms);
    let mut conn: Option<RawStomp> = None;
    let mut receipt = 0u64;
    for message in messages {
        tokio::time::sleep_until(started + Duration::from_millis(message.at_ms)).await;
        let body = message.body();
        let mut copies = 0;
        let mut tries = 0;
        while copies < message.copies && tries < 100 {
            tries += 1;
            if conn.is_none()
                && let Ok(mut raw) = RawStomp::connect(broker).await
            {
                raw.set_read_timeout(Duration::from_secs(10));
                if matches!(raw.handshake(None).await, Ok(f) if f.command == "CONNECTED") {
                    conn = Some(raw);
                }
            }
            let Some(raw) = conn.as_mut() else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            };
            receipt += 1;
            let receipt_id = format!("foreign-{receipt}");
            let length = body.len().to_string();
            let mut headers: Vec<(String, String)> = vec![
                (
                    "destination".into(),
                    format!("/topic/VirtualTopic.{}", crate::plan::TOPIC),
                ),
                ("persistent".into(), "true".into()),
                ("receipt".into(), receipt_id.clone()),
                ("content-length".into(), length),
            ];
            if let Some(id) = &message.event_id {
                headers.push(("event-id".into(), id.clone()));
            }
            headers.extend(message.extra_headers());
            let borrowed: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            if raw.send_frame("SEND", &borrowed, &body).await.is_err() {
                conn = None;
                continue;
            }
            let count = |confirmed: bool| {
                let mut sends = sends.lock().unwrap_or_else(|p| p.into_inner());
                let entry = sends.entry(message.fid).or_default();
                if confirmed {
                    entry.confirmed += 1;
                } else {
                    entry.written += 1;
                }
            };
            count(false);
            match raw.read_frame().await {
                Ok(frame) if frame.header("receipt-id") == Some(receipt_id.as_str()) => {
                    count(true);
                    copies += 1;
                }
                // No receipt: the copy may or may not be there. Sent again;
                // the checker allows a message without an id to arrive as
                // often as it was written.
                _ => conn = None,
            }
        }
    }
}

/// The target folder that holds this binary.
fn target_dir(exe: &Path) -> PathBuf {
    exe.ancestors()
        .find(|d| d.join("CACHEDIR.TAG").is_file())
        .map_or_else(|| PathBuf::from("target"), Path::to_path_buf)
}

/// The end-of-run report.
struct Summary<'a> {
    args: &'a RunArgs,
    seed: u64,
    plan: &'a Plan,
    check: &'a Check,
    run: &'a Run,
    settled: bool,
    settle_time: Duration,
    settle_stall: Duration,
    stall_bound: Duration,
    since_last_fault: Duration,
    foreign_sends: &'a HashMap<i64, Sends>,
}

impl Summary<'_> {
    fn render(&self) -> (String, bool) {
        let c = self.check;
        let mut failures: Vec<String> = c.violations.clone();
        let faults: u32 = self.run.injected.values().sum();
        let restarts: u32 = self.run.services.values().map(|s| s.starts).sum();
        let dup_bound = u64::from(faults + restarts + 1) * IN_FLIGHT_PER_FAULT;
        let mut duplicates = Vec::new();
        for name in CONSUMERS {
            if let Some(s) = self.run.services.get(name) {
                let n = s.logged_duplicates();
                if n > dup_bound {
                    failures.push(format!(
                        "{name}: {n} duplicate deliveries, more than the bound {dup_bound}"
                    ));
                }
                duplicates.push(format!("{name} {n}"));
            }
        }
        let memory_bound = self.args.memory_bound_mib * 1024;
        let mut memory = Vec::new();
        for (name, s) in &self.run.services {
            if s.peak_kib > memory_bound {
                failures.push(format!(
                    "{name}: peak memory {} MiB over the bound {} MiB",
                    s.peak_kib / 1024,
                    self.args.memory_bound_mib
                ));
            }
            memory.push(format!("{name} {} MiB", s.peak_kib / 1024));
        }
        if !self.settled {
            failures.push(format!(
                "no progress for {} s after the faults stopped (stuck)",
                self.stall_bound.as_secs()
            ));
        }
        let mut out = String::new();
        let mut line = |name: &str, value: String| out.push_str(&format!("  {name:<34} {value}\n"));
        line("seed", self.seed.to_string());
        line("database", self.args.db.clone());
        line(
            "events planned / committed / refused",
            format!(
                "{} / {} / {} (refused at append, as planned)",
                self.plan.events.len(),
                c.committed,
                c.refused
            ),
        );
        line(
            "foreign messages (sends)",
            format!(
                "{} ({})",
                self.plan.foreign.len(),
                self.foreign_sends.values().map(|s| s.written).sum::<u32>()
            ),
        );
        line(
            "faults injected",
            self.run
                .injected
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
        line(
            "clock skews (at, service, skew)",
            if self.run.skews.is_empty() {
                "none".into()
            } else {
                self.run
                    .skews
                    .iter()
                    .map(|(at, service, ms)| format!("{at:.1}s {service} {}", skew(*ms)))
                    .collect::<Vec<_>>()
                    .join("; ")
            },
        );
        line(
            "second relay",
            if self.run.second_relay.is_empty() {
                "did not run".into()
            } else {
                self.run
                    .second_relay
                    .iter()
                    .map(|(at, what)| format!("{what} at {at:.1}s"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        );
        line(
            "service starts / kills / failpoints",
            self.run
                .services
                .iter()
                .map(|(name, s)| format!("{name} {}/{}/{}", s.starts, s.kills, s.failpoints_fired))
                .collect::<Vec<_>>()
                .join(", "),
        );
        let exits: Vec<String> = self
            .run
            .services
            .iter()
            .flat_map(|(name, s)| {
                s.unexpected_exits
                    .iter()
                    .map(move |e| format!("{name}: {e}"))
            })
            .collect();
        line(
            "exits nobody asked for",
            if exits.is_empty() {
                "none".into()
            } else {
                exits.join("; ")
            },
        );
        line("applied exactly once (pairs)", c.applied_once.to_string());
        line(
            "parked as expected",
            if c.parked.is_empty() {
                "none".into()
            } else {
                c.parked
                    .iter()
                    .map(|(r, n)| format!("{r} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        );
        line("lost", c.lost.to_string());
        line("applied twice", c.applied_twice.to_string());
        line("still waiting (stuck)", c.waiting.to_string());
        line(
            "held behind a parked event of their key",
            c.held.to_string(),
        );
        line("per-key order broken", c.out_of_order.to_string());
        line(
            "duplicates skipped by the inbox",
            format!("{} (bound {dup_bound})", duplicates.join(", ")),
        );
        line(
            "longest stall during faults",
            format!("{:.1} s", self.run.longest_stall.as_secs_f64()),
        );
        line(
            "settled after the faults stopped",
            format!(
                "{} in {:.1} s (longest stall {:.1} s, bound {} s; last fault {:.1} s before the end)",
                if self.settled { "yes" } else { "no" },
                self.settle_time.as_secs_f64(),
                self.settle_stall.as_secs_f64(),
                self.stall_bound.as_secs(),
                self.since_last_fault.as_secs_f64()
            ),
        );
        line(
            "peak memory (VmHWM)",
            format!(
                "{} (bound {} MiB)",
                memory.join(", "),
                self.args.memory_bound_mib
            ),
        );
        let passed = failures.is_empty();
        let mut text = String::from("\nChaos run summary\n");
        text.push_str(&out);
        if passed {
            text.push_str("\nOK: every invariant held\n");
        } else {
            text.push_str(&format!("\nFAILED: {} violations\n", failures.len()));
            for failure in failures.iter().take(40) {
                text.push_str(&format!("  - {failure}\n"));
            }
            if failures.len() > 40 {
                text.push_str(&format!("  … and {} more\n", failures.len() - 40));
            }
            let exclude = if self.plan.excluded.is_empty() {
                String::new()
            } else {
                let names: Vec<&str> = self.plan.excluded.iter().map(|c| c.name()).collect();
                format!(" --exclude {}", names.join(","))
            };
            text.push_str(&format!(
                "replay: scripts/chaos.sh --seed {} --db {} --minutes {}{exclude}\n",
                self.seed, self.args.db, self.args.minutes
            ));
        }
        (text, passed)
    }
}
