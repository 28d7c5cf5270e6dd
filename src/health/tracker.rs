//! The rise/fall state machine of one server: turns a stream of check
//! verdicts into a [`Health`] that does not bounce with a flapping node.
//!
//! Rules (`rise` and `fall` below 1 count as 1):
//!
//! - A server starts [`Health::Unchecked`], which routes like Up: a server
//!   is presumed up until checks say otherwise, so a balancer restart
//!   does not empty the pool.
//! - The first `Up` verdict makes it [`Health::Up`] at once.
//! - `fall` consecutive `Down` verdicts take an Unchecked, Up or Drain
//!   server [`Health::Down`]; fewer leave it as it is.
//! - Once Down, it needs `rise` consecutive `Up` verdicts to be Up again.
//! - A `Drain` verdict (a Galera Donor/Desynced node) applies at once and
//!   resets both counts. It is neither a failure nor a success: a drained
//!   node that was healthy comes back Up on its first `Up` verdict, one that
//!   had gone Down still needs `rise` of them.

use crate::control::state::Health;

use super::check::Verdict;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracker {
    rise: u32,
    fall: u32,
    health: Health,
    /// Consecutive `Up` verdicts.
    successes: u32,
    /// Consecutive `Down` verdicts.
    failures: u32,
    /// Went Down and has not risen since: `Up` needs `rise` successes.
    failed: bool,
}

impl Tracker {
    pub fn new(rise: u32, fall: u32) -> Self {
        Tracker {
            rise: rise.max(1),
            fall: fall.max(1),
            health: Health::Unchecked,
            successes: 0,
            failures: 0,
            failed: false,
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// Consecutive `Down` verdicts so far (0 after any other verdict).
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Consecutive `Up` verdicts so far (0 after any other verdict).
    pub fn successes(&self) -> u32 {
        self.successes
    }

    /// Takes one verdict; returns the new health if it changed.
    pub fn record(&mut self, verdict: &Verdict) -> Option<Health> {
        let next = match verdict {
            Verdict::Up => {
                self.failures = 0;
                self.successes = self.successes.saturating_add(1);
                if !self.failed || self.successes >= self.rise {
                    self.failed = false;
                    Health::Up
                } else {
                    self.health
                }
            }
            Verdict::Drain => {
                self.failures = 0;
                self.successes = 0;
                Health::Drain
            }
            Verdict::Down(_) => {
                self.successes = 0;
                self.failures = self.failures.saturating_add(1);
                if self.failures >= self.fall {
                    self.failed = true;
                    Health::Down
                } else {
                    self.health
                }
            }
        };
        let changed = next != self.health;
        self.health = next;
        changed.then_some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn down() -> Verdict {
        Verdict::Down("refused".into())
    }

    #[test]
    fn starts_unchecked_and_first_success_is_up() {
        let mut t = Tracker::new(3, 2);
        assert_eq!(t.health(), Health::Unchecked);
        assert_eq!(t.record(&Verdict::Up), Some(Health::Up));
        assert_eq!(t.record(&Verdict::Up), None);
    }

    #[test]
    fn unchecked_needs_fall_failures_to_go_down() {
        let mut t = Tracker::new(2, 3);
        assert_eq!(t.record(&down()), None);
        assert_eq!(t.record(&down()), None);
        assert_eq!(t.health(), Health::Unchecked);
        assert_eq!(t.record(&down()), Some(Health::Down));
    }

    #[test]
    fn falls_after_consecutive_failures_only() {
        let mut t = Tracker::new(2, 3);
        t.record(&Verdict::Up);
        assert_eq!(t.record(&down()), None);
        assert_eq!(t.record(&down()), None);
        assert_eq!(t.record(&Verdict::Up), None, "a success resets the count");
        assert_eq!(t.record(&down()), None);
        assert_eq!(t.record(&down()), None);
        assert_eq!(t.record(&down()), Some(Health::Down));
        assert_eq!(t.failures(), 3);
        assert_eq!(t.record(&down()), None);
    }

    #[test]
    fn rises_after_consecutive_successes_only() {
        let mut t = Tracker::new(3, 1);
        assert_eq!(t.record(&down()), Some(Health::Down));
        assert_eq!(t.record(&Verdict::Up), None);
        assert_eq!(t.record(&Verdict::Up), None);
        assert_eq!(t.record(&down()), None, "a failure resets the count");
        assert_eq!(t.record(&Verdict::Up), None);
        assert_eq!(t.record(&Verdict::Up), None);
        assert_eq!(t.successes(), 2);
        assert_eq!(t.record(&Verdict::Up), Some(Health::Up));
        // Up again: the next failure is counted from zero.
        assert_eq!(t.record(&down()), Some(Health::Down));
    }

    #[test]
    fn drain_applies_at_once_and_ends_at_once_for_a_healthy_node() {
        let mut t = Tracker::new(3, 3);
        t.record(&Verdict::Up);
        assert_eq!(t.record(&Verdict::Drain), Some(Health::Drain));
        assert_eq!(t.record(&Verdict::Drain), None);
        assert_eq!(t.record(&Verdict::Up), Some(Health::Up));
        // From Unchecked too.
        let mut t = Tracker::new(3, 3);
        assert_eq!(t.record(&Verdict::Drain), Some(Health::Drain));
    }

    #[test]
    fn a_draining_node_still_needs_fall_failures() {
        let mut t = Tracker::new(2, 2);
        t.record(&Verdict::Drain);
        assert_eq!(t.record(&down()), None);
        assert_eq!(t.health(), Health::Drain);
        assert_eq!(t.record(&down()), Some(Health::Down));
    }

    #[test]
    fn drain_does_not_shortcut_the_rise_of_a_down_node() {
        let mut t = Tracker::new(2, 1);
        t.record(&down());
        assert_eq!(t.record(&Verdict::Drain), Some(Health::Drain));
        assert_eq!(t.record(&Verdict::Up), None);
        assert_eq!(t.health(), Health::Drain);
        assert_eq!(t.record(&Verdict::Up), Some(Health::Up));
    }

    #[test]
    fn zero_counts_mean_one() {
        let mut t = Tracker::new(0, 0);
        assert_eq!(t.record(&down()), Some(Health::Down));
        assert_eq!(t.record(&Verdict::Up), Some(Health::Up));
    }
}
