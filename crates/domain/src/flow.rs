//! Money flows: the one place where a movement of money between accounts is decided.
//!
//! A transfer, the capture of a hold, a multi-posting transaction and a reversal are all a list
//! of [`Posting`]s decided by [`decide_postings`] over the current states of the accounts they
//! touch. The checks are the same for all of them: each posting names two different accounts
//! that exist, are open and hold the same currency; then each touched account's *net* change
//! must keep it within its limit (holds included) and within `i64`. What differs is only the
//! events each kind writes: `transfer_debited`/`transfer_credited` for a transfer,
//! `hold_captured`/`transfer_credited` for a capture, one `transaction_posted` per touched
//! account for a transaction or a reversal.

use std::collections::BTreeMap;

use crate::account::{AccountState, DomainError, Event, Status};
use crate::values::{AccountId, Amount, Currency, TransferId};

/// Most postings in one transaction: with its id marker the atomic batch then holds at most
/// `2 * 64 + 1` messages, well under the server's batch limit, and a transaction stays one
/// decision a person can read.
pub const POSTINGS_MAX: usize = 64;

/// `amount` moves from `from` to `to`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Posting {
    pub from: AccountId,
    pub to: AccountId,
    pub amount: Amount,
}

/// A request to move money along 1 to [`POSTINGS_MAX`] postings at once: all of them or none.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Transaction {
    /// Shares the forever-claimed namespace of transfer and hold ids.
    pub transaction_id: TransferId,
    pub postings: Vec<Posting>,
    pub reference: Option<String>,
    /// Set on a reversal: the transfer or transaction whose postings this one moves back.
    pub reverses: Option<TransferId>,
    #[serde(default)]
    pub metadata: crate::Metadata,
}

/// A posting as one of its accounts records it: its index in the transaction and what it moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leg {
    pub posting: u16,
    pub from: AccountId,
    pub to: AccountId,
    pub amount: Amount,
}

/// What a decided flow does to one of the accounts it touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Movement {
    pub account: AccountId,
    pub currency: Currency,
    /// Signed: what the account's balance changes by.
    pub net: i64,
    /// The indexes of the postings that name this account.
    pub postings: Vec<usize>,
}

/// A refusal of a flow, naming the first posting that fails (0-based).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[error("posting {posting}: {error}")]
pub struct PostingRefusal {
    pub posting: usize,
    pub error: DomainError,
}

impl PostingRefusal {
    fn at(posting: usize, error: DomainError) -> Self {
        Self { posting, error }
    }
}

/// Money a settlement frees on an account besides its postings: a captured hold releases its
/// whole reservation, whatever part of it is captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released<'a> {
    pub account: &'a AccountId,
    pub held: i64,
}

/// Decides `postings` over the current states of the accounts they touch (`state_of` answers
/// `None` for an account it does not know: it does not exist). Returns the touched accounts in
/// the order they are first named, with their net change.
///
/// Postings are checked in order (different accounts, both opened, both open, one currency);
/// then each account's net change: a net outflow must leave `balance - held >= -limit`, with
/// `released` freeing its hold first, and no balance may leave `i64`. An account may appear in
/// many postings: only its net counts, so a round trip larger than its balance is fine. A funds
/// refusal names the first posting after which the account cannot recover: the outflow up to it
/// is not covered even by every inflow that follows.
pub fn decide_postings<'a>(
    state_of: impl Fn(&AccountId) -> Option<&'a AccountState>,
    postings: &[Posting],
    released: Option<Released<'_>>,
) -> Result<Vec<Movement>, PostingRefusal> {
    if postings.is_empty() || postings.len() > POSTINGS_MAX {
        return Err(PostingRefusal::at(
            0,
            DomainError::PostingCount {
                count: postings.len(),
            },
        ));
    }
    let mut touched: Vec<Movement> = Vec::new();
    let mut index_of: BTreeMap<&AccountId, usize> = BTreeMap::new();
    for (index, posting) in postings.iter().enumerate() {
        let refuse = |error| PostingRefusal::at(index, error);
        if posting.from == posting.to {
            return Err(refuse(DomainError::SameAccount));
        }
        let opened = |id: &AccountId| {
            state_of(id)
                .and_then(AccountState::account)
                .ok_or_else(|| DomainError::AccountNotFound(id.clone()))
        };
        let sender = opened(&posting.from).map_err(refuse)?;
        let receiver = opened(&posting.to).map_err(refuse)?;
        for account in [sender, receiver] {
            if account.status == Status::Closed {
                return Err(refuse(DomainError::AccountClosed(account.id.clone())));
            }
        }
        if sender.currency != receiver.currency {
            return Err(refuse(DomainError::CurrencyMismatch {
                expected: receiver.currency,
                actual: sender.currency,
            }));
        }
        for (id, currency) in [
            (&posting.from, sender.currency),
            (&posting.to, receiver.currency),
        ] {
            let slot = *index_of.entry(id).or_insert_with(|| {
                touched.push(Movement {
                    account: id.clone(),
                    currency,
                    net: 0,
                    postings: Vec::new(),
                });
                touched.len() - 1
            });
            touched[slot].postings.push(index);
        }
    }
    let mut first_refusal: Option<PostingRefusal> = None;
    for movement in &mut touched {
        let Some(account) = state_of(&movement.account).and_then(AccountState::account) else {
            continue; // Checked above: every touched account is opened.
        };
        let freed = released
            .filter(|released| released.account == &movement.account)
            .map_or(0, |released| released.held);
        let changes: Vec<(usize, i128)> = movement
            .postings
            .iter()
            .map(|&index| {
                let posting = &postings[index];
                let amount = i128::from(posting.amount.signed());
                let change = if posting.from == movement.account {
                    -amount
                } else {
                    amount
                };
                (index, change)
            })
            .collect();
        let net: i128 = changes.iter().map(|(_, change)| change).sum();
        let balance = i128::from(account.balance);
        let floor = i128::from(account.overdraft_limit.floor());
        let held = i128::from(account.held) - i128::from(freed);
        let refusal = if balance + net - held < floor {
            // The first posting whose outflow so far is not covered by the inflows after it.
            let failing = failing_posting(&changes, |so_far, inflows_after, _| {
                balance + so_far + inflows_after - held < floor
            });
            Some(PostingRefusal::at(
                failing,
                DomainError::InsufficientFunds {
                    balance: account.balance,
                    amount: u64::try_from(-net).unwrap_or(u64::MAX),
                    floor: account.overdraft_limit.floor(),
                },
            ))
        } else if balance + net > i128::from(i64::MAX) {
            let failing = failing_posting(&changes, |so_far, _, outflows_after| {
                balance + so_far + outflows_after > i128::from(i64::MAX)
            });
            Some(PostingRefusal::at(
                failing,
                DomainError::BalanceOverflow(account.id.clone()),
            ))
        } else {
            movement.net = i64::try_from(net).unwrap_or_default();
            None
        };
        if let Some(refusal) = refusal {
            if first_refusal
                .as_ref()
                .is_none_or(|first| refusal.posting < first.posting)
            {
                first_refusal = Some(refusal);
            }
        }
    }
    match first_refusal {
        Some(refusal) => Err(refusal),
        None => Ok(touched),
    }
}

/// The first posting of `changes` (an account's signed changes in posting order) at which
/// `fails(change so far, inflows after it, outflows after it)`; the last one if none does
/// (the account's total fails, so the last always does when called).
fn failing_posting(changes: &[(usize, i128)], fails: impl Fn(i128, i128, i128) -> bool) -> usize {
    let mut so_far = 0;
    for (position, &(index, change)) in changes.iter().enumerate() {
        so_far += change;
        let later = &changes[position + 1..];
        let inflows_after: i128 = later.iter().map(|(_, c)| (*c).max(0)).sum();
        let outflows_after: i128 = later.iter().map(|(_, c)| (*c).min(0)).sum();
        if fails(so_far, inflows_after, outflows_after) {
            return index;
        }
    }
    changes.last().map_or(0, |(index, _)| *index)
}

/// Decides a transaction (or a reversal) over the current states of the accounts it touches:
/// one `transaction_posted` per touched account, in the order they are first named, each with
/// its own net change and the postings that name it.
pub fn decide_transaction<'a>(
    state_of: impl Fn(&AccountId) -> Option<&'a AccountState>,
    transaction: &Transaction,
) -> Result<Vec<(AccountId, Event)>, PostingRefusal> {
    let movements = decide_postings(state_of, &transaction.postings, None)?;
    let parts = u16::try_from(movements.len()).unwrap_or(u16::MAX);
    Ok(movements
        .into_iter()
        .map(|movement| {
            let legs = movement
                .postings
                .iter()
                .map(|&index| {
                    let posting = &transaction.postings[index];
                    Leg {
                        posting: u16::try_from(index).unwrap_or(u16::MAX),
                        from: posting.from.clone(),
                        to: posting.to.clone(),
                        amount: posting.amount,
                    }
                })
                .collect();
            let event = Event::TransactionPosted {
                transaction_id: transaction.transaction_id.clone(),
                currency: movement.currency,
                net: movement.net,
                legs,
                parts,
                reverses: transaction.reverses.clone(),
                reference: transaction.reference.clone(),
                metadata: transaction.metadata.clone(),
            };
            (movement.account, event)
        })
        .collect())
}

/// The reversal of a flow whose postings were `postings`: every posting moved back (`to` ->
/// `from`, same amount, same order), as the new transaction `reversal_id`. A flow is reversed
/// at most once: `reversed_by` is the reversal already recorded for it, if any.
pub fn reverse(
    original: &TransferId,
    postings: &[Posting],
    reversed_by: Option<&TransferId>,
    reversal_id: TransferId,
    reference: Option<String>,
) -> Result<Transaction, DomainError> {
    if let Some(reversal) = reversed_by {
        return Err(DomainError::AlreadyReversed {
            original: original.clone(),
            reversal: reversal.clone(),
        });
    }
    Ok(Transaction {
        transaction_id: reversal_id,
        postings: postings
            .iter()
            .map(|posting| Posting {
                from: posting.to.clone(),
                to: posting.from.clone(),
                amount: posting.amount,
            })
            .collect(),
        reference,
        reverses: Some(original.clone()),
        metadata: crate::Metadata::default(),
    })
}
