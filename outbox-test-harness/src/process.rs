//! Child processes that die with the test process.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the
//! process. Test threads come and go (libtest runs each test on its own thread, a
//! shared broker may outlive the test that started it), so every child is forked
//! from one spawner thread that lives as long as the process.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use crate::HarnessError;

type SpawnReply = mpsc::Sender<std::io::Result<Child>>;

fn spawner() -> std::io::Result<&'static Mutex<mpsc::Sender<(Command, SpawnReply)>>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<(Command, SpawnReply)>>> = OnceLock::new();
    if let Some(sender) = SPAWNER.get() {
        return Ok(sender);
    }
    let (tx, rx) = mpsc::channel::<(Command, SpawnReply)>();
    std::thread::Builder::new()
        .name("outbox-harness-spawner".into())
        .spawn(move || {
            for (mut command, reply) in rx {
                // The receiver may have given up; nothing to do then.
                let _ = reply.send(command.spawn());
            }
        })?;
    // If another thread won the race, its spawner is used and ours exits with its channel.
    Ok(SPAWNER.get_or_init(|| Mutex::new(tx)))
}

/// Spawns `command` so that it receives SIGKILL when this process dies.
pub(crate) fn spawn_tied_to_process(mut command: Command) -> Result<Child, HarnessError> {
    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // system calls (prctl, getppid); it touches no locks or allocations.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::other("parent exited before exec"));
            }
            Ok(())
        });
    }
    let program = command.get_program().to_string_lossy().into_owned();
    let spawn_error = |e| HarnessError::io(format!("spawning {program}"), e);
    let (reply_tx, reply_rx) = mpsc::channel();
    {
        let sender = spawner().map_err(spawn_error)?;
        let sender = sender
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        sender
            .send((command, reply_tx))
            .map_err(|_| spawn_error(std::io::Error::other("spawner thread is gone")))?;
    }
    reply_rx
        .recv()
        .map_err(|_| spawn_error(std::io::Error::other("spawner thread is gone")))?
        .map_err(spawn_error)
}

/// Sends `signal` to `pid`.
pub(crate) fn send_signal(
    pid: u32,
    signal: libc::c_int,
    name: &'static str,
) -> Result<(), HarnessError> {
    let Ok(raw_pid) = libc::pid_t::try_from(pid) else {
        return Err(HarnessError::Signal {
            signal: name,
            pid,
            source: std::io::Error::other("pid out of range"),
        });
    };
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(raw_pid, signal) } == 0 {
        Ok(())
    } else {
        Err(HarnessError::Signal {
            signal: name,
            pid,
            source: std::io::Error::last_os_error(),
        })
    }
}

/// Whether a process with this id exists (it may belong to another user).
pub(crate) fn process_exists(pid: u32) -> bool {
    let Ok(raw_pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) with signal 0 only checks for existence and permission.
    let found = unsafe { libc::kill(raw_pid, 0) } == 0;
    found || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}
