//! What this writer knows of accounts: [`Known`] states (an account folded up to a position,
//! with the chain value its next event builds on) and [`AccountStates`], the bounded cache the
//! actors share, so a flow reads the other accounts it touches without waiting on their actors.

use std::collections::HashMap;
use std::sync::Mutex;

use domain::{evolve, AccountId, AccountState, Event};

/// An account's state as of the position of its last event (0: no event), with that event's
/// chain value, which the account's next event builds on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    pub state: AccountState,
    pub position: u64,
    pub chain: String,
}

impl Known {
    pub fn new(account: AccountId) -> Self {
        Self {
            state: AccountState::new(account),
            position: 0,
            chain: eventlog::chain::GENESIS.to_owned(),
        }
    }

    pub fn apply(&mut self, event: &Event, position: u64, chain: String) {
        evolve(&mut self.state, event);
        self.position = position;
        self.chain = chain;
    }
}

/// Most account states kept for accounts without a live actor here (receivers of transfers
/// and captures, passivated accounts): at a few hundred bytes each, a few MiB at most.
pub const CACHED_STATES_MAX: usize = 10_000;

/// The newest state this writer knows of accounts: of each account whose actor is live here,
/// and, bounded by [`CACHED_STATES_MAX`] (oldest first out), of others it has seen. A transfer
/// reads its receiver from here and loads only the events after it (not the whole history),
/// without waiting on the receiver's actor (two actors waiting on each other would deadlock).
/// Entries are only ever replaced by newer ones: every `Known` is the fold of a prefix of the
/// account's committed events, so the one with the higher position is the more current. It is a
/// cache: the stream's concurrency check catches anything stale.
#[derive(Default)]
pub struct AccountStates {
    inner: Mutex<States>,
}

#[derive(Default)]
struct States {
    /// Accounts whose actor is live in this writer.
    live: HashMap<AccountId, Known>,
    /// Others, with their insertion order for eviction.
    cached: HashMap<AccountId, Known>,
    order: std::collections::VecDeque<AccountId>,
}

impl States {
    fn cache(&mut self, known: &Known) {
        let id = known.state.id();
        match self.cached.get_mut(id) {
            Some(entry) => {
                if entry.position < known.position {
                    *entry = known.clone();
                }
            }
            None => {
                self.cached.insert(id.clone(), known.clone());
                self.order.push_back(id.clone());
                while self.cached.len() > CACHED_STATES_MAX {
                    match self.order.pop_front() {
                        Some(oldest) => {
                            self.cached.remove(&oldest);
                        }
                        None => break,
                    }
                }
            }
        }
    }
}

impl AccountStates {
    fn lock(&self) -> std::sync::MutexGuard<'_, States> {
        // Entries are replaced whole, so a panic elsewhere cannot leave one half-written.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn get(&self, account: &AccountId) -> Option<Known> {
        let states = self.lock();
        states
            .live
            .get(account)
            .or_else(|| states.cached.get(account))
            .cloned()
    }

    /// Records `known` for its account's live actor.
    pub(crate) fn publish(&self, known: &Known) {
        let mut states = self.lock();
        let id = known.state.id().clone();
        if let Some(cached) = states.cached.remove(&id) {
            states.order.retain(|account| *account != id);
            if cached.position > known.position {
                states.live.insert(id.clone(), cached);
            }
        }
        match states.live.get_mut(&id) {
            Some(entry) if entry.position >= known.position => {}
            Some(entry) => *entry = known.clone(),
            None => {
                states.live.insert(id, known.clone());
            }
        }
    }

    /// Offers a newer state of an account this actor changed or read (a receiver).
    pub(crate) fn offer(&self, known: &Known) {
        let mut states = self.lock();
        match states.live.get_mut(known.state.id()) {
            Some(entry) => {
                if entry.position < known.position {
                    *entry = known.clone();
                }
            }
            None => states.cache(known),
        }
    }

    /// The account's actor stopped: its state stays, as a cached one.
    pub(crate) fn retire(&self, account: &AccountId) {
        let mut states = self.lock();
        if let Some(known) = states.live.remove(account) {
            states.cache(&known);
        }
    }

    /// Accounts with a live actor here.
    pub fn live(&self) -> usize {
        self.lock().live.len()
    }

    /// Accounts known without a live actor here.
    pub fn cached(&self) -> usize {
        self.lock().cached.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(id: &str, position: u64) -> Known {
        Known {
            position,
            ..Known::new(AccountId::parse(id).unwrap())
        }
    }

    #[test]
    fn shared_states_keep_the_newest_and_stay_bounded() {
        let states = AccountStates::default();
        states.publish(&known("a", 5));
        states.offer(&known("a", 3));
        assert_eq!(
            states
                .get(&AccountId::parse("a").unwrap())
                .unwrap()
                .position,
            5
        );
        states.offer(&known("a", 9));
        assert_eq!(
            states
                .get(&AccountId::parse("a").unwrap())
                .unwrap()
                .position,
            9
        );
        // A retired actor's state stays, as a cached one, and a newer cached one wins later.
        states.retire(&AccountId::parse("a").unwrap());
        assert_eq!((states.live(), states.cached()), (0, 1));
        states.offer(&known("a", 12));
        states.publish(&known("a", 10));
        assert_eq!(
            states
                .get(&AccountId::parse("a").unwrap())
                .unwrap()
                .position,
            12
        );
        assert_eq!((states.live(), states.cached()), (1, 0));
        // Receivers without an actor are cached, oldest out first.
        for index in 0..CACHED_STATES_MAX + 10 {
            states.offer(&known(&format!("r{index}"), 1));
        }
        assert_eq!(states.cached(), CACHED_STATES_MAX);
        assert!(states.get(&AccountId::parse("r0").unwrap()).is_none());
        assert!(states
            .get(&AccountId::parse(&format!("r{}", CACHED_STATES_MAX + 9)).unwrap())
            .is_some());
    }
}
