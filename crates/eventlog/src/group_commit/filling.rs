//! When the next batch waits to fill.
//!
//! A batch costs the server a fixed ~2.5 ms plus ~20 us per message (docs/benchmarks.md, the
//! cost model), so one batch of everyone beats two of half. Under load most callers send their
//! next command as soon as they are answered: sent at once after an acknowledgement, the next
//! batch takes only those who queued meanwhile, and the callers just answered form a second
//! batch behind it. So after an acknowledgement the next batch waits for as many appends as the
//! acknowledged batch and the queue held together, but not longer than `wait_max`, nor past a
//! quiet spell in which nothing arrives.
//!
//! Callers that do not come back on an answer (paced or independent clients) arrive during the
//! wait no faster than they did while the batch was in flight, and waiting for them only adds
//! latency. A wait that ends short of its target without such a rush of arrivals pauses filling
//! for the next [`PAUSE_AFTER_MISS`] acknowledgements, so such a load pays one wait in that many.
//! (A wait that ends short *with* a rush, callers coming back but not all in time, keeps
//! filling on.)

use std::time::Duration;

use tokio::time::Instant;

/// Acknowledgements after a wait that ended short of its target during which batches go at once.
pub const PAUSE_AFTER_MISS: u32 = 64;

/// How much faster than during the flight appends arrive during a wait when callers come back on
/// their answers.
const RUSH: f64 = 1.5;

/// The filling policy of one committer.
#[derive(Debug)]
pub struct Filling {
    wait_max: Duration,
    quiet: Duration,
    /// Acknowledgements left before a batch waits again.
    paused_for: u32,
    waiting: Option<Wait>,
}

#[derive(Debug)]
struct Wait {
    /// Queued appends that make the batch worth sending.
    target: usize,
    /// When it goes with whatever has queued.
    until: Instant,
    /// When it goes if nothing more has arrived.
    quiet_until: Instant,
    started: Instant,
    /// Queued when it started.
    queued: usize,
    /// Answered by the acknowledgement.
    answered: usize,
    /// Appends per second that arrived while the acknowledged batch was in flight.
    flight_rate: f64,
}

/// How a wait ended, for the counters.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The batch reached its target.
    Filled,
    /// The time ran out first (or nothing arrived for a while): filling pauses.
    Short,
}

impl Filling {
    /// `wait_max` zero never waits; `quiet` is capped by `wait_max`.
    pub fn new(wait_max: Duration, quiet: Duration) -> Self {
        Self {
            wait_max,
            quiet: quiet.min(wait_max),
            paused_for: 0,
            waiting: None,
        }
    }

    /// A batch of `members` appends, in flight for `flight`, was acknowledged while `queued`
    /// wait (about those that arrived during the flight); a batch holds at most `target_max`.
    pub fn acknowledged(
        &mut self,
        members: usize,
        flight: Duration,
        queued: usize,
        target_max: usize,
        now: Instant,
    ) {
        self.waiting = None;
        if self.wait_max.is_zero() {
            return;
        }
        if self.paused_for > 0 {
            self.paused_for -= 1;
            return;
        }
        let target = (members + queued).min(target_max);
        if target > queued {
            self.waiting = Some(Wait {
                target,
                until: now + self.wait_max,
                quiet_until: now + self.quiet,
                started: now,
                queued,
                answered: members,
                flight_rate: queued as f64 / flight.as_secs_f64().max(1e-6),
            });
        }
    }

    /// An append arrived.
    pub fn arrived(&mut self, now: Instant) {
        if let Some(wait) = self.waiting.as_mut() {
            wait.quiet_until = now + self.quiet;
        }
    }

    /// Whether a batch may be taken with `queued` appends waiting.
    pub fn ready(&self, queued: usize, now: Instant) -> bool {
        self.waiting.as_ref().is_none_or(|wait| {
            queued >= wait.target || now >= wait.until || now >= wait.quiet_until
        })
    }

    /// When the wait ends if nothing arrives.
    pub fn wakes_at(&self) -> Option<Instant> {
        self.waiting
            .as_ref()
            .map(|wait| wait.until.min(wait.quiet_until))
    }

    /// A batch was taken with `queued` appends waiting: the wait, if any, is over.
    pub fn taken(&mut self, queued: usize, now: Instant) -> Option<Ended> {
        let wait = self.waiting.take()?;
        if queued >= wait.target {
            return Some(Ended::Filled);
        }
        let arrived = queued.saturating_sub(wait.queued) as f64;
        let waited = now.saturating_duration_since(wait.started).as_secs_f64();
        // A good part of those answered came back, faster than appends came during the flight.
        let came_back = arrived >= wait.answered as f64 / 4.0;
        if came_back && arrived >= RUSH * wait.flight_rate * waited {
            return Some(Ended::Short);
        }
        self.paused_for = PAUSE_AFTER_MISS;
        Some(Ended::Short)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn policy() -> Filling {
        Filling::new(4 * MS, MS)
    }

    #[test]
    fn after_an_acknowledgement_the_batch_waits_for_those_answered_and_those_queued() {
        let start = Instant::now();
        let mut filling = policy();
        assert!(filling.ready(1, start), "nothing acknowledged yet: no wait");
        filling.acknowledged(32, 5 * MS, 30, 1000, start);
        assert!(!filling.ready(30, start));
        assert!(!filling.ready(61, start));
        assert!(filling.ready(62, start), "the target is 32 + 30");
        assert_eq!(filling.wakes_at(), Some(start + MS));
        assert_eq!(filling.taken(62, start), Some(Ended::Filled));
        assert!(filling.ready(0, start), "the wait ends with the batch");
        assert_eq!(filling.taken(0, start), None);
    }

    #[test]
    fn the_target_is_capped_by_the_batch_limit_and_a_full_queue_does_not_wait() {
        let start = Instant::now();
        let mut filling = policy();
        filling.acknowledged(900, 5 * MS, 200, 1000, start);
        assert!(!filling.ready(999, start));
        assert!(filling.ready(1000, start));
        filling.acknowledged(10, 5 * MS, 1000, 1000, start);
        assert!(filling.ready(1000, start), "the queue alone fills a batch");
        assert_eq!(filling.wakes_at(), None);
    }

    #[test]
    fn a_wait_ends_at_its_limit_or_after_a_quiet_spell_and_arrivals_extend_the_spell() {
        let start = Instant::now();
        let mut filling = policy();
        filling.acknowledged(10, 5 * MS, 0, 1000, start);
        assert!(!filling.ready(3, start + MS / 2));
        assert!(
            filling.ready(3, start + MS),
            "nothing arrived for the quiet spell"
        );
        for step in 1..=7 {
            filling.arrived(start + step * MS / 2);
        }
        assert!(!filling.ready(3, start + 3 * MS + MS / 2));
        assert!(
            filling.ready(3, start + 4 * MS),
            "the limit holds however busy"
        );
        assert_eq!(filling.wakes_at(), Some(start + 4 * MS));
    }

    #[test]
    fn a_wait_that_ends_short_without_a_rush_pauses_filling_for_a_while() {
        let start = Instant::now();
        let mut filling = policy();
        // 20 arrived during a 5 ms flight; 8 in the 4 ms wait is no faster.
        filling.acknowledged(30, 5 * MS, 20, 1000, start);
        assert_eq!(filling.taken(28, start + 4 * MS), Some(Ended::Short));
        for _ in 0..PAUSE_AFTER_MISS {
            filling.acknowledged(10, 5 * MS, 0, 1000, start);
            assert!(filling.ready(1, start), "paused: a batch goes at once");
        }
        filling.acknowledged(10, 5 * MS, 0, 1000, start);
        assert!(
            !filling.ready(1, start),
            "the pause is over: it waits again"
        );
    }

    #[test]
    fn a_wait_that_ends_short_after_a_rush_of_callers_coming_back_keeps_filling() {
        let start = Instant::now();
        let mut filling = policy();
        // 20 arrived during a 5 ms flight; 40 of the 44 answered came back in the 4 ms wait.
        filling.acknowledged(44, 5 * MS, 20, 1000, start);
        assert_eq!(filling.taken(60, start + 4 * MS), Some(Ended::Short));
        filling.acknowledged(60, 5 * MS, 0, 1000, start);
        assert!(!filling.ready(1, start), "not paused");
        // Only a few of those answered came back: they are not coming back on their answers.
        assert_eq!(filling.taken(14, start + MS), Some(Ended::Short));
        filling.acknowledged(60, 5 * MS, 0, 1000, start);
        assert!(filling.ready(1, start), "paused");
    }

    #[test]
    fn zero_never_waits() {
        let start = Instant::now();
        let mut filling = Filling::new(Duration::ZERO, MS);
        filling.acknowledged(64, 5 * MS, 0, 1000, start);
        assert!(filling.ready(1, start));
        assert_eq!(filling.wakes_at(), None);
        assert_eq!(filling.taken(1, start), None);
    }
}
