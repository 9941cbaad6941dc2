//! The wait between attempts after a transient error: capped exponential backoff with jitter,
//! bounded in total by `retry.give_up_after_s`.

use std::time::{Duration, Instant};

/// Waits between attempts after transient errors: capped exponential backoff with jitter
/// (`[retry]`), back to the first wait after a session that streamed, and none left once
/// errors went on for `give_up_after_s` without one.
pub struct Backoff {
    next: Duration,
    initial: Duration,
    max: Duration,
    give_up_after: Option<Duration>,
    failing_since: Option<Instant>,
    jitter: std::collections::hash_map::RandomState,
    attempts: u64,
}

impl Backoff {
    pub fn new(cfg: &crate::config::RetryConfig) -> Self {
        let initial = Duration::from_millis(cfg.initial_ms.max(1));
        Backoff {
            next: initial,
            initial,
            max: Duration::from_millis(cfg.max_ms.max(cfg.initial_ms).max(1)),
            give_up_after: (cfg.give_up_after_s > 0)
                .then(|| Duration::from_secs(cfg.give_up_after_s)),
            failing_since: None,
            jitter: std::collections::hash_map::RandomState::new(),
            attempts: 0,
        }
    }

    /// A session got as far as streaming: the next failure starts over.
    pub fn progressed(&mut self) {
        self.next = self.initial;
        self.failing_since = None;
    }

    /// The wait before the next attempt (between half of the current backoff and all of it);
    /// `None` when it is time to give up.
    pub fn next(&mut self) -> Option<Duration> {
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        if self.give_up_after.is_some_and(|g| since.elapsed() >= g) {
            return None;
        }
        use std::hash::BuildHasher;
        self.attempts += 1;
        let r = self.jitter.hash_one(self.attempts) % 1000;
        let wait = self.next / 2 + self.next / 2 * r as u32 / 1000;
        self.next = (self.next * 2).min(self.max);
        Some(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RetryConfig;

    #[test]
    fn waits_double_up_to_the_cap_with_jitter_and_start_over_after_progress() {
        let mut b = Backoff::new(&RetryConfig {
            initial_ms: 100,
            max_ms: 800,
            give_up_after_s: 0,
        });
        let mut caps = Vec::new();
        for _ in 0..6 {
            let cap = b.next;
            let w = b.next().expect("never gives up");
            assert!(
                w >= cap / 2 && w <= cap,
                "{w:?} outside [{:?}, {cap:?}]",
                cap / 2
            );
            caps.push(cap.as_millis());
        }
        assert_eq!(caps, [100, 200, 400, 800, 800, 800]);
        b.progressed();
        assert!(b.next().unwrap() <= Duration::from_millis(100));
    }

    #[test]
    fn gives_up_once_errors_went_on_long_enough() {
        let mut b = Backoff::new(&RetryConfig {
            initial_ms: 1,
            max_ms: 1,
            give_up_after_s: 1,
        });
        assert!(b.next().is_some());
        b.failing_since = Some(Instant::now() - Duration::from_secs(2));
        assert!(b.next().is_none());
        b.progressed();
        assert!(b.next().is_some(), "progress resets the clock");
    }
}
