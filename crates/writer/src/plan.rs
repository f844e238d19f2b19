//! The write path's decisions as data: what a command appends and how it answers.
//!
//! [`Decider::decide`] is where a command is decided: the domain's pure functions
//! (`domain::decide` for one account, `domain::flow` for every movement between accounts)
//! run on the states the actor gathered, and their events become a [`Plan`]: the messages to
//! append (each event guarded by its account's last position and chained to its previous
//! event, with the markers that make the answer exactly-once), the answer they give, and the
//! states they leave. Nothing here does IO; the actor ([`crate::actor`]) appends a plan and
//! feeds the acknowledgement back, so a test can decide a command and look at the plan.

use std::collections::BTreeMap;

use domain::{
    decide, decide_capture, decide_hold, decide_release, decide_transaction, decide_transfer,
    evolve, AccountId, Event, Release, Transaction, Transfer, TransferEvents,
};
use eventlog::{Entry, EventMetadata};

use crate::idempotency::{self, ReversalRecord, TransactionRecord, TransferRecord};
use crate::outcome::Outcome;
use crate::request::Intent;
use crate::states::Known;
use crate::{Error, Result};

/// The messages to append for a decision and the answer they give once committed.
pub struct Plan {
    pub entries: Vec<Entry>,
    /// The answer, with the index of the entry whose position it reports.
    pub outcome: Outcome,
    pub answer_index: usize,
    /// The new states of the accounts, with the index of each one's event.
    pub changes: Vec<(Known, usize)>,
    /// A hold's expiry, scheduled before the batch is appended.
    pub expiry: Option<Expiry>,
}

/// How long before a hold's `expires_at` its expiry is scheduled to fire. The server stores
/// due messages one after another (a thousand due in the same second took it up to 1.2 s on two
/// loaded cores), so firing at `expires_at` itself would make the last ones late by that much;
/// fired ahead, they wait in a writer's hands and are handled at `expires_at`.
pub const EXPIRY_LEAD: std::time::Duration = std::time::Duration::from_secs(2);

/// A message the schedules stream delivers ahead of a hold's expiry.
pub struct Expiry {
    pub schedule: String,
    pub due: String,
    /// When the schedule fires: [`EXPIRY_LEAD`] before `expires_at`.
    pub fire_at: time::OffsetDateTime,
    /// The hold's `expires_at` (Unix seconds), carried on the message as
    /// [`eventlog::log::header::HOLD_EXPIRES_AT`].
    pub expires_at: i64,
}

/// The accounts, other than this one, that `intent` is decided on too.
pub fn others_named(own: &Known, intent: &Intent) -> Vec<AccountId> {
    let mut named: Vec<AccountId> = match intent {
        Intent::Capture(capture) => hold_receiver(own, &capture.hold_id).into_iter().collect(),
        _ => intent.accounts_named().into_iter().cloned().collect(),
    };
    named.retain(|id| id != own.state.id());
    named.sort();
    named.dedup();
    named
}

/// The receiver of this account's open hold `hold_id`, if it has that hold.
pub fn hold_receiver(own: &Known, hold_id: &domain::TransferId) -> Option<AccountId> {
    own.state
        .account()
        .and_then(|account| account.holds.get(hold_id))
        .map(|hold| hold.to.clone())
}

/// Decides one command of the account `own` on its state and the states of the other accounts
/// it reads (`others`).
pub struct Decider<'a> {
    pub own: &'a Known,
    pub others: &'a BTreeMap<AccountId, Known>,
}

impl Decider<'_> {
    fn id(&self) -> &AccountId {
        self.own.state.id()
    }

    /// Where a command's decision is made: the domain decides on this account's state and the
    /// others' (`others`), and the result becomes a [`Plan`]: the messages to append and the
    /// answer they give, as data.
    pub fn decide(&self, intent: &Intent, metadata: &EventMetadata, now: i64) -> Result<Plan> {
        let others = self.others;
        let other = |id: &AccountId| {
            others
                .get(id)
                .cloned()
                .unwrap_or_else(|| Known::new(id.clone()))
        };
        match intent {
            Intent::Account(command) => decide(&self.own.state, command)
                .map_err(Error::from)
                .and_then(|events| self.plan_account(events, metadata)),
            Intent::Transfer(transfer) => {
                let to = other(&transfer.to);
                decide_transfer(&self.own.state, &to.state, transfer)
                    .map_err(Error::from)
                    .and_then(|events| self.plan_transfer(transfer, &to, events, metadata))
            }
            Intent::Hold(hold) => {
                let to = other(&hold.to);
                decide_hold(&self.own.state, &to.state, hold, now)
                    .map_err(Error::from)
                    .and_then(|event| self.plan_hold(hold, event, metadata))
            }
            Intent::Capture(capture) => {
                let to = hold_receiver(self.own, &capture.hold_id)
                    .map_or_else(|| Known::new(self.id().clone()), |id| other(&id));
                decide_capture(&self.own.state, &to.state, capture, now)
                    .map_err(Error::from)
                    .and_then(|events| self.plan_capture(&capture.hold_id, &to, events, metadata))
            }
            Intent::Release(hold_id, release) => {
                decide_release(&self.own.state, hold_id, *release, now)
                    .map_err(Error::from)
                    .and_then(|event| self.plan_release(hold_id, *release, event, metadata))
            }
            Intent::Transaction(transaction) => {
                let state_of = |id: &AccountId| {
                    if id == self.id() {
                        Some(&self.own.state)
                    } else {
                        others.get(id).map(|known| &known.state)
                    }
                };
                decide_transaction(state_of, transaction)
                    .map_err(Error::PostingRejected)
                    .and_then(|events| self.plan_transaction(transaction, events, metadata))
            }
        }
    }

    /// A transaction or reversal: one `transaction_posted` per touched account, each guarded by
    /// its account's last position, then the claim of its id (which also records what it moved,
    /// for a reversal to read) and, for a reversal, the claim that the original is reversed.
    /// The answer is the last part's position: a reader that shows it shows every part.
    fn plan_transaction(
        &self,
        transaction: &Transaction,
        events: Vec<(AccountId, Event)>,
        metadata: &EventMetadata,
    ) -> Result<Plan> {
        let others = self.others;
        let mut entries = Vec::with_capacity(events.len() + 2);
        let mut changes = Vec::with_capacity(events.len());
        for (index, (account, event)) in events.into_iter().enumerate() {
            let known = if &account == self.id() {
                self.own
            } else {
                others.get(&account).ok_or_else(|| {
                    Error::Internal(format!("{account} was decided on but not loaded"))
                })?
            };
            let chain =
                eventlog::chain::next(&known.chain, &account, &event).map_err(Error::from)?;
            let mut after = known.clone();
            after.apply(&event, 0, chain.clone());
            entries.push(Entry::Event {
                account,
                expected_last_position: known.position,
                event,
                metadata: metadata.clone(),
                chain,
            });
            changes.push((after, index));
        }
        let answer_index = entries
            .len()
            .checked_sub(1)
            .ok_or_else(|| Error::Internal("a transaction decided no event".into()))?;
        entries.push(Entry::Marker {
            subject: eventlog::subject::transfer_marker(&transaction.transaction_id),
            payload: TransactionRecord::new(transaction, 1).encode()?,
        });
        if let Some(original) = &transaction.reverses {
            entries.push(Entry::Marker {
                subject: eventlog::subject::reversal_marker(original),
                payload: ReversalRecord {
                    reversal_id: transaction.transaction_id.to_string(),
                }
                .encode()?,
            });
        }
        Ok(Plan {
            entries,
            outcome: Outcome::TransactionCompleted {
                transaction_id: transaction.transaction_id.clone(),
                reverses: transaction.reverses.clone(),
                position: 0,
            },
            answer_index,
            changes,
            expiry: None,
        })
    }

    /// The events and the answer of a single event on this account, with `markers` after it.
    fn plan_single(
        &self,
        event: Event,
        outcome: Outcome,
        markers: Vec<Entry>,
        metadata: &EventMetadata,
    ) -> Result<Plan> {
        let chain =
            eventlog::chain::next(&self.own.chain, self.id(), &event).map_err(Error::from)?;
        let mut after = self.own.clone();
        after.apply(&event, 0, chain.clone());
        let mut entries = vec![Entry::Event {
            account: self.id().clone(),
            expected_last_position: self.own.position,
            event,
            metadata: metadata.clone(),
            chain,
        }];
        entries.extend(markers);
        Ok(Plan {
            entries,
            outcome,
            answer_index: 0,
            changes: vec![(after, 0)],
            expiry: None,
        })
    }

    /// A hold: `hold_placed` and the claim of its id (a marker in the transfer-id namespace) in
    /// one batch, and its expiry, scheduled in the schedules stream *before* the batch is
    /// appended: a placed hold always has an expiry (a schedule for a hold that was then refused
    /// finds nothing to expire).
    fn plan_hold(
        &self,
        hold: &domain::PlaceHold,
        event: Event,
        metadata: &EventMetadata,
    ) -> Result<Plan> {
        let Event::HoldPlaced { expires_at, .. } = &event else {
            return Err(Error::Internal("decide_hold yielded another event".into()));
        };
        let expires_at = *expires_at;
        let fire_at = time::OffsetDateTime::from_unix_timestamp(expires_at)
            .map_err(|error| Error::Internal(error.to_string()))?
            - EXPIRY_LEAD;
        let markers = vec![Entry::Marker {
            subject: eventlog::subject::transfer_marker(&hold.hold_id),
            payload: TransferRecord::for_hold(self.id(), hold, expires_at, 1).encode()?,
        }];
        let outcome = Outcome::HoldPlaced {
            hold_id: hold.hold_id.clone(),
            expires_at,
            position: 0,
        };
        let mut plan = self.plan_single(event, outcome, markers, metadata)?;
        plan.expiry = Some(Expiry {
            schedule: eventlog::subject::hold_expiry_schedule(self.id(), &hold.hold_id, expires_at),
            due: eventlog::subject::hold_expiry_due(self.id(), &hold.hold_id),
            fire_at,
            expires_at,
        });
        Ok(plan)
    }

    /// A capture: `hold_captured` here, `transfer_credited` on the receiver, and the hold's
    /// settlement marker, together: a hold settles once.
    fn plan_capture(
        &self,
        hold_id: &domain::TransferId,
        to: &Known,
        events: TransferEvents,
        metadata: &EventMetadata,
    ) -> Result<Plan> {
        let Event::HoldCaptured { amount, .. } = &events.debit else {
            return Err(Error::Internal(
                "decide_capture yielded another event".into(),
            ));
        };
        let outcome = Outcome::HoldCaptured {
            hold_id: hold_id.clone(),
            amount: amount.minor_units(),
            position: 0,
        };
        let settled = Entry::Marker {
            subject: idempotency::settlement_marker(hold_id),
            payload: Vec::new(),
        };
        self.plan_pair(to, events, settled, outcome, metadata)
    }

    /// A void or an expiry: one event on this account. No marker is needed: every settlement of
    /// a hold is an event of this same account, so its concurrency check lets only one of them
    /// commit; a single event is also a plain publish, much cheaper than a batch, which matters
    /// when many holds come due at once.
    fn plan_release(
        &self,
        hold_id: &domain::TransferId,
        release: Release,
        event: Event,
        metadata: &EventMetadata,
    ) -> Result<Plan> {
        let outcome = Outcome::HoldReleased {
            hold_id: hold_id.clone(),
            status: match release {
                Release::Void => "voided",
                Release::Expire => "expired",
            },
            position: 0,
        };
        self.plan_single(event, outcome, Vec::new(), metadata)
    }

    fn plan_account(&self, events: Vec<Event>, metadata: &EventMetadata) -> Result<Plan> {
        let Some(event) = events.into_iter().next() else {
            return Err(Error::Internal("decide yielded no event".into()));
        };
        let account_id = self.id().clone();
        let outcome = match &event {
            Event::AccountOpened(_) => Outcome::Opened {
                account_id,
                position: 0,
            },
            Event::AccountClosed => Outcome::Closed {
                account_id,
                position: 0,
            },
            Event::MetadataChanged { .. } => {
                let mut after = self.own.state.clone();
                evolve(&mut after, &event);
                Outcome::MetadataChanged {
                    account_id,
                    metadata: after
                        .account()
                        .map(|account| account.metadata.clone())
                        .unwrap_or_default(),
                    position: 0,
                }
            }
            _ => {
                let mut after = self.own.state.clone();
                evolve(&mut after, &event);
                Outcome::BalanceChanged {
                    account_id,
                    balance: after.balance(),
                    position: 0,
                }
            }
        };
        self.plan_single(event, outcome, Vec::new(), metadata)
    }

    fn plan_transfer(
        &self,
        transfer: &Transfer,
        to: &Known,
        events: TransferEvents,
        metadata: &EventMetadata,
    ) -> Result<Plan> {
        // The marker follows the credit directly: the answer is one position before it.
        let claim = Entry::Marker {
            subject: eventlog::subject::transfer_marker(&transfer.transfer_id),
            payload: TransferRecord::new(self.id(), transfer, 1).encode()?,
        };
        let outcome = Outcome::TransferCompleted {
            transfer_id: transfer.transfer_id.clone(),
            position: 0,
        };
        self.plan_pair(to, events, claim, outcome, metadata)
    }

    /// Money leaving this account and arriving on `to`, then `marker`: the answer is the
    /// credit's position, so a reader that shows it shows both sides.
    fn plan_pair(
        &self,
        to: &Known,
        events: TransferEvents,
        marker: Entry,
        outcome: Outcome,
        metadata: &EventMetadata,
    ) -> Result<Plan> {
        let debit_chain = eventlog::chain::next(&self.own.chain, self.id(), &events.debit)
            .map_err(Error::from)?;
        let credit_chain =
            eventlog::chain::next(&to.chain, to.state.id(), &events.credit).map_err(Error::from)?;
        let mut sender_after = self.own.clone();
        sender_after.apply(&events.debit, 0, debit_chain.clone());
        let mut receiver_after = to.clone();
        receiver_after.apply(&events.credit, 0, credit_chain.clone());
        let entries = vec![
            Entry::Event {
                account: self.id().clone(),
                expected_last_position: self.own.position,
                event: events.debit,
                metadata: metadata.clone(),
                chain: debit_chain,
            },
            Entry::Event {
                account: to.state.id().clone(),
                expected_last_position: to.position,
                event: events.credit,
                metadata: metadata.clone(),
                chain: credit_chain,
            },
            marker,
        ];
        Ok(Plan {
            entries,
            outcome,
            answer_index: 1,
            changes: vec![(sender_after, 0), (receiver_after, 1)],
            expiry: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::{Amount, Currency, OpenAccount, OverdraftLimit, Posting, TransferId};

    fn id(text: &str) -> AccountId {
        AccountId::parse(text).unwrap()
    }

    /// An open EUR account with `balance`, its last event at `position`.
    fn known(name: &str, balance: i64, position: u64) -> Known {
        let mut known = Known::new(id(name));
        let opened = Event::AccountOpened(OpenAccount {
            metadata: Default::default(),
            currency: Currency::parse("EUR").unwrap(),
            owner: None,
            overdraft_limit: OverdraftLimit::default(),
        });
        known.apply(&opened, position, "c".repeat(64));
        if balance > 0 {
            let deposit = Event::Deposited {
                metadata: Default::default(),
                amount: Amount::new(balance.into()).unwrap(),
                reference: None,
            };
            known.apply(&deposit, position, "d".repeat(64));
        }
        known
    }

    fn posting(from: &str, to: &str, amount: i128) -> Posting {
        Posting {
            from: id(from),
            to: id(to),
            amount: Amount::new(amount).unwrap(),
        }
    }

    fn transaction(postings: Vec<Posting>, reverses: Option<&str>) -> Intent {
        Intent::Transaction(Transaction {
            metadata: Default::default(),
            transaction_id: TransferId::parse("tx").unwrap(),
            postings,
            reference: None,
            reverses: reverses.map(|original| TransferId::parse(original).unwrap()),
        })
    }

    /// The accounts and expected positions of a plan's events, and its marker subjects.
    fn shape(plan: &Plan) -> (Vec<(String, u64)>, Vec<String>) {
        let mut events = Vec::new();
        let mut markers = Vec::new();
        for entry in &plan.entries {
            match entry {
                Entry::Event {
                    account,
                    expected_last_position,
                    ..
                } => events.push((account.to_string(), *expected_last_position)),
                Entry::Marker { subject, .. } => markers.push(subject.clone()),
            }
        }
        (events, markers)
    }

    #[test]
    fn a_transaction_appends_one_guarded_event_per_account_then_its_claim() {
        let own = known("a", 100, 5);
        let others: BTreeMap<AccountId, Known> = [known("b", 0, 7), known("c", 0, 9)]
            .into_iter()
            .map(|known| (known.state.id().clone(), known))
            .collect();
        let decider = Decider {
            own: &own,
            others: &others,
        };
        let intent = transaction(vec![posting("a", "b", 60), posting("b", "c", 10)], None);
        let plan = decider
            .decide(&intent, &EventMetadata::default(), 0)
            .unwrap();
        let (events, markers) = shape(&plan);
        assert_eq!(
            events,
            vec![("a".into(), 5), ("b".into(), 7), ("c".into(), 9)]
        );
        assert_eq!(markers, vec!["coffer.ids.transfer.tx".to_owned()]);
        // The answer is the last part's position; each account's new state is its own event's.
        assert_eq!(plan.answer_index, 2);
        let balances: Vec<(String, i64, usize)> = plan
            .changes
            .iter()
            .map(|(known, index)| (known.state.id().to_string(), known.state.balance(), *index))
            .collect();
        assert_eq!(
            balances,
            vec![
                ("a".into(), 40, 0),
                ("b".into(), 50, 1),
                ("c".into(), 10, 2)
            ]
        );

        // A reversal also claims, forever, that the original is reversed.
        let reversal = transaction(vec![posting("a", "b", 1)], Some("t-1"));
        let plan = decider
            .decide(&reversal, &EventMetadata::default(), 0)
            .unwrap();
        assert_eq!(
            shape(&plan).1,
            vec![
                "coffer.ids.transfer.tx".to_owned(),
                "coffer.ids.reversal.t-1".to_owned()
            ]
        );

        // A refusal names the posting and plans nothing.
        let refused = transaction(vec![posting("a", "c", 1), posting("c", "b", 50)], None);
        match decider.decide(&refused, &EventMetadata::default(), 0) {
            Err(Error::PostingRejected(refusal)) => assert_eq!(refusal.posting, 1),
            other => panic!("{:?}", other.map(|plan| shape(&plan))),
        }
    }

    #[test]
    fn a_transfer_is_the_debit_the_credit_and_the_claim() {
        let own = known("a", 100, 5);
        let others: BTreeMap<AccountId, Known> = [(id("b"), known("b", 0, 7))].into();
        let decider = Decider {
            own: &own,
            others: &others,
        };
        let intent = Intent::Transfer(Transfer {
            metadata: Default::default(),
            transfer_id: TransferId::parse("t").unwrap(),
            to: id("b"),
            amount: Amount::new(30).unwrap(),
            reference: None,
        });
        let plan = decider
            .decide(&intent, &EventMetadata::default(), 0)
            .unwrap();
        assert_eq!(
            shape(&plan),
            (
                vec![("a".into(), 5), ("b".into(), 7)],
                vec!["coffer.ids.transfer.t".to_owned()]
            )
        );
        assert_eq!(plan.answer_index, 1);
    }
}
