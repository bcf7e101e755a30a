//! Progress of long operations, on stderr.

use std::io::{IsTerminal, Write};

/// Progress of a long operation on stderr: on a terminal (rewritten in
/// place) or with `--progress` (one line per step); never on stdout.
#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    tty: bool,
    /// Total, what is counted, whether a line was written.
    state: std::cell::Cell<(u64, &'static str, bool)>,
}

impl Progress {
    /// Reports when `forced` or when stderr is a terminal.
    pub fn new(forced: bool) -> Progress {
        let tty = std::io::stderr().is_terminal();
        Progress {
            enabled: forced || tty,
            tty,
            state: std::cell::Cell::new((0, "", false)),
        }
    }

    pub(super) fn start(&self, what: &'static str, total: u64) {
        self.state.set((total, what, false));
    }

    pub(super) fn update(&self, done: u64) {
        if !self.enabled {
            return;
        }
        let (total, what, _) = self.state.get();
        self.state.set((total, what, true));
        let mut err = std::io::stderr().lock();
        // Progress is best effort: a closed stderr must not fail the replay.
        let _ = if self.tty {
            write!(err, "\r{what} {done}/{total}")
        } else {
            writeln!(err, "{what} {done}/{total}")
        };
        let _ = err.flush();
    }

    pub(super) fn finish(&self) {
        if self.enabled && self.tty && self.state.get().2 {
            let _ = writeln!(std::io::stderr());
        }
    }
}
