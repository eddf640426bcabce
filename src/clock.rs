//! Deadlines that cannot overflow, however long a setting is.

use std::time::Duration;

use tokio::time::Instant;

/// The furthest ahead a lease, retention, wait or timeout reaches: a century. A longer one
/// means "as good as forever", and is cut to this, so that adding it to a reading of the clock
/// (or handing it to Redis) can never overflow.
pub(crate) const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// `d` after `now`, with `d` cut to a century.
pub(crate) fn after(now: Instant, d: Duration) -> Instant {
    now + d.min(FOREVER)
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
