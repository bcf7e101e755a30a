//! A service of the run as a child process: start (with a failpoint armed or
//! not), wait until ready, SIGKILL, stop, its output copied into a log file,
//! the inbox duplicates it logged and its peak memory.

use std::io::Write as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::shared::BoxError;

/// One service and its current process.
pub(crate) struct Service {
    pub(crate) name: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    ready_mark: &'static str,
    child: Option<Child>,
    ready: watch::Receiver<bool>,
    /// The failpoint the current process was started with.
    pub(crate) armed: Option<String>,
    /// The clock skew (ms) its processes start with, if any: it stays
    /// through restarts, as a host's clock would.
    pub(crate) skew_ms: Option<i64>,
    /// Whether the service should be running now (the second relay only
    /// for part of the run): the runner restarts only wanted services.
    pub(crate) wanted: bool,
    /// The `duplicates=` count each process logged last.
    duplicates: Arc<Mutex<Vec<u64>>>,
    pub(crate) starts: u32,
    pub(crate) kills: u32,
    pub(crate) failpoints_fired: u32,
    /// Exits nobody asked for (other than a failpoint), with their status.
    pub(crate) unexpected_exits: Vec<String>,
    /// Highest `VmHWM` seen of any of its processes, in KiB.
    pub(crate) peak_kib: u64,
}

impl Service {
    pub(crate) fn new(
        name: &str,
        program: PathBuf,
        args: Vec<String>,
        log: PathBuf,
        ready_mark: &'static str,
    ) -> Service {
        Service {
            name: name.to_owned(),
            program,
            args,
            log,
            ready_mark,
            child: None,
            ready: watch::channel(false).1,
            armed: None,
            skew_ms: None,
            wanted: true,
            duplicates: Arc::default(),
            starts: 0,
            kills: 0,
            failpoints_fired: 0,
            unexpected_exits: Vec::new(),
            peak_kib: 0,
        }
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    pub(crate) fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts a new process, with `failpoint` armed if given.
    pub(crate) fn start(&mut self, failpoint: Option<String>) -> Result<u32, BoxError> {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .env_remove(outbox::core::failpoint::FAILPOINT_VAR)
            // A panicking handler is part of the workload: one line, not a backtrace.
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(point) = &failpoint {
            command.env(outbox::core::failpoint::FAILPOINT_VAR, point);
        }
        command.env_remove(outbox::core::failpoint::CLOCK_SKEW_VAR);
        if let Some(skew) = self.skew_ms {
            command.env(outbox::core::failpoint::CLOCK_SKEW_VAR, skew.to_string());
        }
        // SAFETY: runs in the child between fork and exec and only calls
        // prctl, which is async-signal-safe: the service dies with the runner.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.program.display()))?;
        let pid = child.id().unwrap_or_default();
        let run = self.starts as usize;
        self.starts += 1;
        self.armed = failpoint;
        lock(&self.duplicates).push(0);
        let (ready_tx, ready_rx) = watch::channel(false);
        self.ready = ready_rx;
        let lines = Lines {
            log: self.log.clone(),
            ready_mark: self.ready_mark,
            ready: Arc::new(ready_tx),
            duplicates: self.duplicates.clone(),
            run,
        };
        if let Some(out) = child.stdout.take() {
            tokio::spawn(lines.clone().copy(out));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(lines.copy(err));
        }
        self.child = Some(child);
        Ok(pid)
    }

    /// Waits until the service logged its ready line.
    pub(crate) async fn wait_ready(&mut self, limit: Duration) -> Result<(), BoxError> {
        let deadline = Instant::now() + limit;
        while !*self.ready.borrow() {
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} was not ready within {limit:?}; see {}",
                    self.name,
                    self.log.display()
                )
                .into());
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), self.ready.changed()).await;
        }
        Ok(())
    }

    /// Notices a process that ended on its own: a failpoint that fired
    /// (SIGKILL with one armed), or an exit nobody asked for. Returns the
    /// status if it ended.
    pub(crate) fn reap(&mut self) -> Result<Option<ExitStatus>, BoxError> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        let Some(status) = child.try_wait()? else {
            return Ok(None);
        };
        self.child = None;
        if status.signal() == Some(libc::SIGKILL) && self.armed.is_some() {
            self.failpoints_fired += 1;
        } else {
            self.unexpected_exits.push(status.to_string());
        }
        Ok(Some(status))
    }

    /// Reads the current process's peak memory.
    pub(crate) fn sample_memory(&mut self) {
        let Some(pid) = self.pid() else { return };
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            && let Some(kib) = status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        {
            self.peak_kib = self.peak_kib.max(kib);
        }
    }

    /// SIGKILL, as a crash would, and waits until the process is gone.
    pub(crate) async fn kill(&mut self) -> Result<(), BoxError> {
        self.sample_memory();
        if let Some(mut child) = self.child.take() {
            child.start_kill()?;
            child.wait().await?;
            self.kills += 1;
        }
        Ok(())
    }

    /// SIGTERM, then waits up to `limit`; SIGKILL after that. Whether it
    /// exited with status 0 in time.
    pub(crate) async fn stop(&mut self, limit: Duration) -> Result<bool, BoxError> {
        self.sample_memory();
        let Some(mut child) = self.child.take() else {
            return Ok(false);
        };
        if let Some(status) = child.try_wait()? {
            return Ok(status.success());
        }
        if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
            // SAFETY: kill has no memory-safety preconditions; the pid is our
            // own child, not yet waited for, so not reused.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        match tokio::time::timeout(limit, child.wait()).await {
            Ok(status) => Ok(status?.success()),
            Err(_) => {
                child.start_kill()?;
                child.wait().await?;
                Ok(false)
            }
        }
    }

    /// Duplicate deliveries the service's inbox skipped, as its processes
    /// logged them (each process's last second before a SIGKILL is missed).
    pub(crate) fn logged_duplicates(&self) -> u64 {
        lock(&self.duplicates).iter().sum()
    }
}

/// Copies one output stream of one process into the log file.
#[derive(Clone)]
struct Lines {
    log: PathBuf,
    ready_mark: &'static str,
    ready: Arc<watch::Sender<bool>>,
    duplicates: Arc<Mutex<Vec<u64>>>,
    run: usize,
}

impl Lines {
    async fn copy(self, stream: impl AsyncRead + Unpin) {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .ok();
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(file) = file.as_mut() {
                let _ = file.write_all(format!("{line}\n").as_bytes());
            }
            if line.contains(self.ready_mark) {
                self.ready.send_replace(true);
            }
            if let Some(n) = field(&line, "duplicates=")
                && let Some(slot) = lock(&self.duplicates).get_mut(self.run)
            {
                *slot = n;
            }
        }
    }
}

/// The number after `name` in a line such as `… processed=5 duplicates=1 …`.
fn field(line: &str, name: &str) -> Option<u64> {
    let rest = &line[line.find(name)? + name.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
