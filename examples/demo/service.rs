//! The two services as child processes: start, wait until ready, SIGKILL,
//! stop gracefully, and their output copied into log files.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::BoxError;

/// One service binary and its current process.
pub(crate) struct Service {
    /// Short name used in output: `user` or `points`.
    pub(crate) name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    verbose: bool,
    /// A line containing this text means the service is ready.
    ready_mark: &'static str,
    child: Option<Child>,
    ready: watch::Receiver<bool>,
    /// The `duplicates=` count each run of the service logged last.
    duplicates: Arc<Mutex<Vec<u64>>>,
    /// Processes started so far.
    pub(crate) starts: u32,
    /// Processes killed with SIGKILL so far.
    pub(crate) kills: u32,
}

impl Service {
    pub(crate) fn new(
        name: &'static str,
        program: PathBuf,
        args: Vec<String>,
        log: PathBuf,
        verbose: bool,
        ready_mark: &'static str,
    ) -> Service {
        Service {
            name,
            program,
            args,
            log,
            verbose,
            ready_mark,
            child: None,
            ready: watch::channel(false).1,
            duplicates: Arc::default(),
            starts: 0,
            kills: 0,
        }
    }

    pub(crate) fn log_path(&self) -> &Path {
        &self.log
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Starts a new process of the service.
    pub(crate) fn start(&mut self) -> Result<u32, BoxError> {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: runs in the child between fork and exec and only calls prctl,
        // which is async-signal-safe. If the demo dies, the service gets SIGTERM
        // and stops gracefully instead of running on.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
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
        lock(&self.duplicates).push(0);
        let (ready_tx, ready_rx) = watch::channel(false);
        self.ready = ready_rx;
        let lines = Lines {
            name: self.name,
            log: self.log.clone(),
            verbose: self.verbose,
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
        loop {
            if *self.ready.borrow() {
                return Ok(());
            }
            if let Some(status) = self.exited()? {
                return Err(format!(
                    "the {} service exited during start-up ({status}); last lines of {}:\n{}",
                    self.name,
                    self.log.display(),
                    self.log_tail(20)
                )
                .into());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the {} service was not ready within {limit:?}; last lines of {}:\n{}",
                    self.name,
                    self.log.display(),
                    self.log_tail(20)
                )
                .into());
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), self.ready.changed()).await;
        }
    }

    /// The exit status if the process ended.
    pub(crate) fn exited(&mut self) -> Result<Option<ExitStatus>, BoxError> {
        match self.child.as_mut() {
            None => Ok(None),
            Some(child) => Ok(child.try_wait()?),
        }
    }

    /// SIGKILL, as a crash would, and waits until the process is gone.
    pub(crate) async fn kill(&mut self) -> Result<(), BoxError> {
        if let Some(mut child) = self.child.take() {
            child.start_kill()?;
            child.wait().await?;
            self.kills += 1;
        }
        Ok(())
    }

    /// SIGTERM, then waits up to `limit` for a graceful exit; kills it after
    /// that. Returns whether it exited with status 0 in time.
    pub(crate) async fn stop(&mut self, limit: Duration) -> Result<bool, BoxError> {
        let Some(mut child) = self.child.take() else {
            return Ok(false);
        };
        if let Some(status) = child.try_wait()? {
            return Ok(status.success());
        }
        if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
            // SAFETY: kill has no memory-safety preconditions; the pid is our
            // own child, which has not been waited for, so it was not reused.
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

    /// Duplicate deliveries the service's inbox skipped, as its runs logged them.
    pub(crate) fn logged_duplicates(&self) -> u64 {
        lock(&self.duplicates).iter().sum()
    }

    /// The last `n` lines of the log file.
    pub(crate) fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// Copies one output stream of one run into the log file, line by line.
#[derive(Clone)]
struct Lines {
    name: &'static str,
    log: PathBuf,
    verbose: bool,
    ready_mark: &'static str,
    ready: Arc<watch::Sender<bool>>,
    duplicates: Arc<Mutex<Vec<u64>>>,
    run: usize,
}

impl Lines {
    async fn copy(self, stream: impl AsyncRead + Unpin) {
        let mut file = match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
        {
            Ok(file) => Some(file),
            Err(error) => {
                println!("[demo] cannot write {}: {error}", self.log.display());
                None
            }
        };
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(file) = file.as_mut() {
                // One write per line, so the two streams interleave by lines.
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
            if self.verbose {
                println!("[{}] {line}", self.name);
            }
        }
    }
}

/// The number after `name` in a log line such as `… processed=5 duplicates=1 …`.
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
