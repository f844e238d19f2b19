//! When the next batch waits to fill.
//!
//! A batch of Coffer's messages costs an R1 server a fixed ~2 ms plus ~30 us per message
//! (docs/benchmarks.md, the cost model), so one batch of everyone beats two of half. Under load
//! most callers send their next command as soon as they are answered: sent at once after an
//! acknowledgement, the next batch takes only those who queued meanwhile, and the callers just
//! answered form a second batch behind it. So after an acknowledgement the next batch waits for as many appends as the
//! acknowledged batch and the queue held together (or a full batch's messages), but not longer
//! than `wait_max`, nor past a quiet spell in which nothing arrives.
//!
//! Callers that do not come back on an answer (paced or independent clients) never fill it, and
//! waiting for them only adds latency. A wait that ends short pauses filling for the next
//! [`PAUSE_AFTER_MISS`] acknowledgements, so such a load pays one wait in that many, unless it
//! ran to its limit while callers were rushing back: at least a quarter of those answered, and
//! [`RUSH`] times faster than appends arrived during the flight (callers coming back, only not
//! all in time). A wait ended by a quiet spell always pauses: nobody else was coming. A batch
//! that lost its race to someone else's append pauses too ([`Filling::pause`]): a wait would
//! only let the other appender in first again.

use std::time::Duration;

use tokio::time::Instant;

/// Acknowledgements after a wait that ended short of its target (or a lost race,
/// [`Filling::pause`]) during which batches go at once.
pub const PAUSE_AFTER_MISS: u32 = 64;

/// How much faster than during the flight appends arrive during a wait when callers come back on
/// their answers.
pub const RUSH: f64 = 1.5;

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
    /// Queued messages that make a full batch.
    messages_max: usize,
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
    /// Whether it has held back an append: otherwise it ends uncounted.
    held: bool,
}

impl Wait {
    fn filled(&self, queued: Queued) -> bool {
        queued.appends >= self.target || queued.messages >= self.messages_max
    }

    fn ran_out(&self, now: Instant) -> bool {
        now >= self.until || now >= self.quiet_until
    }
}

/// How a wait that held appends back ended, for the counters.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The batch reached its target.
    Filled,
    /// The time ran out first.
    Short,
}

/// What is queued, as the policy counts it: appends (not reservations) and their messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Queued {
    pub appends: usize,
    pub messages: usize,
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

    /// Whether a wait is on (then the caller counts what is queued for [`Filling::ready`]).
    pub fn is_waiting(&self) -> bool {
        self.waiting.is_some()
    }

    /// A batch of `members` appends, in flight for `flight`, was acknowledged while `queued`
    /// wait (about those that arrived during the flight); a batch holds at most `messages_max`
    /// messages.
    pub fn acknowledged(
        &mut self,
        members: usize,
        flight: Duration,
        queued: Queued,
        messages_max: usize,
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
        let target = members + queued.appends;
        if queued.messages < messages_max {
            self.waiting = Some(Wait {
                target,
                messages_max,
                until: now + self.wait_max,
                quiet_until: now + self.quiet,
                started: now,
                queued: queued.appends,
                answered: members,
                flight_rate: queued.appends as f64 / flight.as_secs_f64().max(1e-6),
                held: queued.appends > 0,
            });
        }
    }

    /// An append arrived, and `queued` are waiting with it.
    pub fn arrived(&mut self, queued: Queued, now: Instant) {
        let Some(wait) = self.waiting.as_mut() else {
            return;
        };
        if !wait.held && wait.ran_out(now) {
            // It ran out with nothing queued: nobody waited, and this one need not.
            self.waiting = None;
            return;
        }
        wait.quiet_until = now + self.quiet;
        wait.held |= !wait.filled(queued);
    }

    /// Whether a batch may be taken with `queued` waiting.
    pub fn ready(&self, queued: Queued, now: Instant) -> bool {
        self.waiting
            .as_ref()
            .is_none_or(|wait| wait.filled(queued) || wait.ran_out(now))
    }

    /// Whether a batch may be taken with `queued` waiting, `earliest` the first of their
    /// deadlines: the wait, if any, filled, ran out, or would end after that deadline (an
    /// append never misses its deadline for a wait).
    pub fn over(&self, queued: Queued, earliest: Option<Instant>, now: Instant) -> bool {
        self.ready(queued, now)
            || earliest
                .zip(self.wakes_at())
                .is_some_and(|(due, end)| due <= end)
    }

    /// When the wait runs out if nothing arrives.
    pub fn wakes_at(&self) -> Option<Instant> {
        self.waiting
            .as_ref()
            .map(|wait| wait.until.min(wait.quiet_until))
    }

    /// Drops the wait, if any, without counting it: something else took the queue (a command
    /// that cannot wait behind it), which says nothing about whether callers come back.
    pub fn abandon(&mut self) {
        self.waiting = None;
    }

    /// Batches go at once for the next [`PAUSE_AFTER_MISS`] acknowledgements: someone else's
    /// append came between two of ours (a batch lost its race), and a wait would only let the
    /// next one in before the batch waited for, which then loses its race too.
    pub fn pause(&mut self) {
        self.waiting = None;
        self.paused_for = PAUSE_AFTER_MISS;
    }

    /// The wait, if any, is over ([`Filling::ready`] said so) with `queued` waiting: how it
    /// ended if it held anything back.
    pub fn end(&mut self, queued: Queued, now: Instant) -> Option<Ended> {
        let wait = self.waiting.take()?;
        if !wait.held {
            return None;
        }
        if wait.filled(queued) {
            return Some(Ended::Filled);
        }
        let arrived = queued.appends.saturating_sub(wait.queued) as f64;
        let waited = now.saturating_duration_since(wait.started).as_secs_f64();
        let to_the_limit = now >= wait.until;
        let came_back = arrived >= wait.answered as f64 / 4.0;
        let rushed = arrived >= RUSH * wait.flight_rate * waited;
        if !(to_the_limit && came_back && rushed) {
            self.paused_for = PAUSE_AFTER_MISS;
        }
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

    fn appends(appends: usize) -> Queued {
        Queued {
            appends,
            messages: appends,
        }
    }

    #[test]
    fn after_an_acknowledgement_the_batch_waits_for_those_answered_and_those_queued() {
        let start = Instant::now();
        let mut filling = policy();
        assert!(filling.ready(appends(1), start), "nothing acknowledged yet");
        filling.acknowledged(32, 5 * MS, appends(30), 1000, start);
        assert!(!filling.ready(appends(30), start));
        filling.arrived(appends(61), start);
        assert!(!filling.ready(appends(61), start));
        assert!(filling.ready(appends(62), start), "the target is 32 + 30");
        assert_eq!(filling.wakes_at(), Some(start + MS));
        assert_eq!(filling.end(appends(62), start), Some(Ended::Filled));
        assert!(
            filling.ready(appends(0), start),
            "the wait ends with the batch"
        );
        assert_eq!(filling.end(appends(0), start), None);
    }

    #[test]
    fn a_full_batch_of_messages_does_not_wait_for_more_appends() {
        let start = Instant::now();
        let mut filling = policy();
        // 300 transfers of 3 messages each queued: a full batch, whatever the count says.
        let transfers = |count: usize| Queued {
            appends: count,
            messages: 3 * count,
        };
        filling.acknowledged(333, 5 * MS, transfers(300), 1000, start);
        assert!(!filling.ready(transfers(300), start));
        assert!(
            filling.ready(transfers(334), start),
            "1002 messages fill a batch"
        );
        assert_eq!(filling.end(transfers(334), start), Some(Ended::Filled));
        filling.acknowledged(10, 5 * MS, transfers(334), 1000, start);
        assert!(!filling.is_waiting(), "a full queue does not wait");
    }

    #[test]
    fn a_wait_ends_at_its_limit_or_after_a_quiet_spell_and_arrivals_extend_the_spell() {
        let start = Instant::now();
        let mut filling = policy();
        filling.acknowledged(10, 5 * MS, appends(0), 1000, start);
        assert!(!filling.ready(appends(0), start + MS / 2));
        assert!(
            filling.ready(appends(0), start + MS),
            "nothing arrived for the spell"
        );
        for step in 1..=7 {
            filling.arrived(appends(step as usize), start + step * MS / 2);
        }
        assert!(!filling.ready(appends(7), start + 3 * MS + MS / 2));
        assert!(
            filling.ready(appends(7), start + 4 * MS),
            "the limit holds however busy"
        );
        assert_eq!(filling.wakes_at(), Some(start + 4 * MS));
    }

    #[test]
    fn a_wait_that_ends_short_without_a_rush_pauses_filling_for_a_while() {
        let start = Instant::now();
        let mut filling = policy();
        // 20 arrived during a 5 ms flight; 8 in the 4 ms wait is no faster.
        filling.acknowledged(30, 5 * MS, appends(20), 1000, start);
        filling.arrived(appends(28), start + 3 * MS);
        assert_eq!(filling.end(appends(28), start + 4 * MS), Some(Ended::Short));
        for _ in 0..PAUSE_AFTER_MISS {
            filling.acknowledged(10, 5 * MS, appends(0), 1000, start);
            assert!(
                filling.ready(appends(1), start),
                "paused: a batch goes at once"
            );
        }
        filling.acknowledged(10, 5 * MS, appends(0), 1000, start);
        assert!(
            !filling.ready(appends(1), start),
            "the pause is over: it waits again"
        );
    }

    #[test]
    fn an_abandoned_wait_ends_uncounted_and_does_not_pause() {
        let start = Instant::now();
        let mut filling = policy();
        // Something that cannot wait took the queue during a wait that was holding appends.
        filling.acknowledged(30, 5 * MS, appends(20), 1000, start);
        filling.arrived(appends(21), start + MS);
        filling.abandon();
        assert!(!filling.is_waiting());
        assert_eq!(filling.end(appends(21), start + 4 * MS), None);
        filling.acknowledged(10, 5 * MS, appends(0), 1000, start);
        assert!(
            !filling.ready(appends(1), start),
            "not paused: the next batch waits again"
        );
    }

    #[test]
    fn a_wait_that_runs_out_while_callers_rush_back_keeps_filling() {
        let start = Instant::now();
        let mut filling = policy();
        // 20 arrived during a 5 ms flight; 40 of the 44 answered came back in the 4 ms wait.
        filling.acknowledged(44, 5 * MS, appends(20), 1000, start);
        filling.arrived(appends(60), start + 3 * MS);
        assert_eq!(filling.end(appends(60), start + 4 * MS), Some(Ended::Short));
        filling.acknowledged(60, 5 * MS, appends(0), 1000, start);
        assert!(!filling.ready(appends(1), start), "not paused");
        // Only 14 of the 60 came back: they are not coming back on their answers.
        for step in 1..=7u32 {
            filling.arrived(appends(2 * step as usize), start + step * MS / 2);
        }
        assert_eq!(filling.end(appends(14), start + 4 * MS), Some(Ended::Short));
        filling.acknowledged(60, 5 * MS, appends(0), 1000, start);
        assert!(filling.ready(appends(1), start), "paused");
    }

    #[test]
    fn a_wait_ended_by_a_quiet_spell_pauses_however_fast_they_came() {
        let start = Instant::now();
        let mut filling = policy();
        // One fast caller and one that does not come back: the fast one is back at once, then
        // nothing for the quiet spell.
        filling.acknowledged(2, 5 * MS, appends(0), 1000, start);
        filling.arrived(appends(1), start);
        assert!(filling.ready(appends(1), start + MS));
        assert_eq!(filling.end(appends(1), start + MS), Some(Ended::Short));
        filling.acknowledged(2, 5 * MS, appends(0), 1000, start);
        assert!(filling.ready(appends(1), start), "paused");
    }

    #[test]
    fn a_wait_that_held_nothing_back_is_not_counted_and_never_pauses() {
        let start = Instant::now();
        let mut filling = policy();
        // A lone caller: the one it waits for is itself.
        filling.acknowledged(1, 5 * MS, appends(0), 1000, start);
        filling.arrived(appends(1), start);
        assert!(filling.ready(appends(1), start));
        assert_eq!(filling.end(appends(1), start), None);
        // Ten answered, none back for an hour: the wait ran out with nothing queued.
        filling.acknowledged(10, 5 * MS, appends(0), 1000, start);
        let later = start + Duration::from_secs(3600);
        filling.arrived(appends(1), later);
        assert!(!filling.is_waiting());
        assert!(filling.ready(appends(1), later));
        filling.acknowledged(10, 5 * MS, appends(0), 1000, later);
        assert!(!filling.ready(appends(1), later), "not paused");
    }

    #[test]
    fn a_pause_drops_the_wait_and_sends_the_next_batches_at_once_then_waits_again() {
        let start = Instant::now();
        let mut filling = policy();
        filling.acknowledged(16, 5 * MS, appends(0), 1000, start);
        assert!(!filling.ready(appends(1), start), "waiting for the 16");
        filling.pause();
        assert!(!filling.is_waiting());
        assert!(filling.ready(appends(1), start), "the wait is dropped");
        for _ in 0..PAUSE_AFTER_MISS {
            filling.acknowledged(16, 5 * MS, appends(0), 1000, start);
            assert!(filling.ready(appends(1), start), "paused");
        }
        filling.acknowledged(16, 5 * MS, appends(0), 1000, start);
        assert!(!filling.ready(appends(1), start), "waiting again");
    }

    #[test]
    fn zero_never_waits() {
        let start = Instant::now();
        let mut filling = Filling::new(Duration::ZERO, MS);
        filling.acknowledged(64, 5 * MS, appends(0), 1000, start);
        assert!(filling.ready(appends(1), start));
        assert_eq!(filling.wakes_at(), None);
        assert_eq!(filling.end(appends(1), start), None);
    }
}
