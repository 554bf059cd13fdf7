//! Turns probe results into a health verdict with rise/fall thresholds.

use meshnode_gossip::Health;

/// Starts critical. The first success makes a new instance passing at once
/// (a fresh start should not wait `rise` intervals); after that, `fall`
/// failures in a row make it critical (fewer: warning), and `rise` successes
/// in a row bring it back.
#[derive(Clone, Debug)]
pub struct HealthState {
    health: Health,
    rise: u32,
    fall: u32,
    ever_passed: bool,
    successes: u32,
    failures: u32,
}

impl HealthState {
    pub fn new(rise: u32, fall: u32) -> Self {
        Self {
            health: Health::Critical,
            rise: rise.max(1),
            fall: fall.max(1),
            ever_passed: false,
            successes: 0,
            failures: 0,
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// Sets the verdict as given (a ttl check's report).
    pub fn set(&mut self, health: Health) -> Health {
        self.successes = 0;
        self.failures = 0;
        if health == Health::Passing {
            self.ever_passed = true;
        }
        self.health = health;
        self.health
    }

    /// A probe that warns (an exec check's exit 1): warning at once, and
    /// the streaks start over.
    pub fn handle_warning(&mut self) -> Health {
        self.successes = 0;
        self.failures = 0;
        self.health = Health::Warning;
        self.health
    }

    /// Records one probe result and returns the new verdict.
    pub fn handle_probe(&mut self, ok: bool) -> Health {
        if ok {
            self.failures = 0;
            self.successes += 1;
            let recovered =
                self.health != Health::Critical || !self.ever_passed || self.successes >= self.rise;
            if recovered {
                self.health = Health::Passing;
                self.ever_passed = true;
            }
        } else {
            self.successes = 0;
            self.failures += 1;
            if self.failures >= self.fall {
                self.health = Health::Critical;
            } else if self.health == Health::Passing {
                self.health = Health::Warning;
            }
        }
        self.health
    }
}

#[cfg(test)]
mod warning_tests {
    use super::*;

    #[test]
    fn a_warning_is_immediate_and_a_pass_ends_it() {
        let mut s = HealthState::new(2, 3);
        assert_eq!(s.handle_probe(true), Health::Passing);
        assert_eq!(s.handle_warning(), Health::Warning);
        assert_eq!(
            s.handle_probe(true),
            Health::Passing,
            "a warning is not critical: no rise"
        );
        assert_eq!(s.handle_warning(), Health::Warning);
        for _ in 0..3 {
            s.handle_probe(false);
        }
        assert_eq!(s.health(), Health::Critical);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_success_passes_then_fall_and_rise_apply() {
        let mut h = HealthState::new(2, 3);
        assert_eq!(h.health(), Health::Critical);
        assert_eq!(h.handle_probe(true), Health::Passing);
        assert_eq!(h.handle_probe(false), Health::Warning);
        assert_eq!(h.handle_probe(false), Health::Warning);
        assert_eq!(h.handle_probe(false), Health::Critical);
        assert_eq!(h.handle_probe(true), Health::Critical);
        assert_eq!(h.handle_probe(true), Health::Passing);
        // A single failure from warning recovers with one success.
        h.handle_probe(false);
        assert_eq!(h.handle_probe(true), Health::Passing);
    }

    #[test]
    fn never_passing_instance_stays_critical() {
        let mut h = HealthState::new(2, 3);
        for _ in 0..5 {
            assert_eq!(h.handle_probe(false), Health::Critical);
        }
    }
}
