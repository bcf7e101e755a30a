//! Heart-beats (STOMP §heart-beating): the client asks `cx,cy`; the server
//! answers `sx,sy`. The client writes at least every `max(cx, sy)` (we write at
//! half of that, because ActiveMQ enforces its read side with no slack) and
//! expects bytes at least every `max(sx, cy)`, times the grace factor.

use std::time::Duration;

use tokio::time::Instant;

/// Negotiated heart-beat intervals; `None` means off in that direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeartBeat {
    pub(crate) send_every: Option<Duration>,
    pub(crate) read_timeout: Option<Duration>,
}

impl HeartBeat {
    /// No heart-beats either way.
    pub(crate) const OFF: HeartBeat = HeartBeat {
        send_every: None,
        read_timeout: None,
    };
}

/// Negotiates heart-beats from what we asked (`ours`, ms) and the server's header.
pub(crate) fn negotiate_heart_beat(
    ours: (u64, u64),
    theirs: Option<&str>,
    grace: f64,
) -> HeartBeat {
    let (sx, sy) = theirs
        .and_then(|h| {
            let (a, b) = h.split_once(',')?;
            Some((a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?))
        })
        .unwrap_or((0, 0));
    let (cx, cy) = ours;
    let send = (cx > 0 && sy > 0)
        .then(|| Duration::from_millis(cx.max(sy) / 2).max(Duration::from_millis(1)));
    let read = (sx > 0 && cy > 0)
        .then(|| Duration::from_millis(((sx.max(cy)) as f64 * grace.max(1.0)) as u64));
    HeartBeat {
        send_every: send,
        read_timeout: read,
    }
}

/// Timer outcomes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Timer {
    /// Write a heart-beat EOL now.
    SendHeartBeat,
    /// Nothing arrived for longer than the read timeout.
    PeerSilent(Duration),
    /// Nothing due.
    Idle,
}

/// One connection's heart-beats and when bytes last moved each way.
#[derive(Debug)]
pub(crate) struct Clock {
    pub(crate) heart_beat: HeartBeat,
    last_read: Instant,
    last_write: Instant,
}

impl Clock {
    pub(crate) fn new(now: Instant) -> Clock {
        Clock {
            heart_beat: HeartBeat::OFF,
            last_read: now,
            last_write: now,
        }
    }

    /// A new connection with `heart_beat` starts at `now`.
    pub(crate) fn start(&mut self, heart_beat: HeartBeat, now: Instant) {
        self.heart_beat = heart_beat;
        self.last_read = now;
        self.last_write = now;
    }

    /// Bytes arrived (or the read clock restarts, e.g. after the client itself
    /// stopped reading).
    pub(crate) fn read(&mut self, now: Instant) {
        self.last_read = now;
    }

    /// Bytes were written.
    pub(crate) fn wrote(&mut self, now: Instant) {
        self.last_write = now;
    }

    /// When the next timer is due, if any.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let send = self.heart_beat.send_every.map(|d| self.last_write + d);
        let read = self.heart_beat.read_timeout.map(|d| self.last_read + d);
        match (send, read) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// What is due at `now`.
    pub(crate) fn poll(&self, now: Instant) -> Timer {
        if let Some(limit) = self.heart_beat.read_timeout
            && now.saturating_duration_since(self.last_read) >= limit
        {
            return Timer::PeerSilent(limit);
        }
        if let Some(every) = self.heart_beat.send_every
            && now.saturating_duration_since(self.last_write) >= every
        {
            return Timer::SendHeartBeat;
        }
        Timer::Idle
    }
}
