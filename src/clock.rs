//! Deadlines that cannot overflow, however long a setting is; the pauses of a step tried again;
//! and a warning's once a minute.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::time::Instant;

/// The furthest ahead a lease, retention, wait or timeout reaches: a century. A longer one
/// means "as good as forever", and is cut to this, so that adding it to a reading of the clock
/// (or handing it to Redis) can never overflow.
pub(crate) const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// `d` after `now`, with `d` cut to a century.
pub(crate) fn after(now: Instant, d: Duration) -> Instant {
    now + d.min(FOREVER)
}

/// The longest a step that failed is tried again in the background.
const MAX_WINDOW: Duration = Duration::from_secs(5 * 60);

/// The pauses between tries of a step that failed, made in the background until a deadline
/// (five minutes at most): `first` (none, for zero), then doubling from at least `step` up to
/// 5 s, the last pause cut short at the deadline; the try made at or after it is the last.
pub(crate) struct Backoff {
    pub(crate) give_up: Instant,
    pause: Duration,
    step: Duration,
}

impl Backoff {
    /// Tries for `window` from now, five minutes at most.
    pub(crate) fn new(window: Duration, first: Duration, step: Duration) -> Self {
        Self {
            give_up: Instant::now() + window.min(MAX_WINDOW),
            pause: first,
            step,
        }
    }

    /// Waits for the next try; `true` when it is the last.
    pub(crate) async fn wait(&mut self) -> bool {
        if !self.pause.is_zero() {
            tokio::time::sleep_until((Instant::now() + self.pause).min(self.give_up)).await;
        }
        self.pause = (self.pause * 2).clamp(self.step, Duration::from_secs(5));
        Instant::now() >= self.give_up
    }
}

/// Lets something happen at most once a minute: a warning that would otherwise come with
/// every request.
#[derive(Debug)]
pub(crate) struct OncePerMinute {
    since: Instant,
    /// When it last happened: seconds after `since`, plus one (0 for never).
    last: AtomicU64,
}

impl OncePerMinute {
    pub(crate) fn new() -> Self {
        Self {
            since: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    /// Whether it may happen now (and then it has).
    pub(crate) fn now(&self) -> bool {
        let now = self.since.elapsed().as_secs() + 1;
        let last = self.last.load(Ordering::Relaxed);
        (last == 0 || now >= last + 60)
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_settings_do_not_overflow() {
        let now = Instant::now();
        assert_eq!(after(now, Duration::MAX), now + FOREVER);
        assert_eq!(
            after(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
    }
}
