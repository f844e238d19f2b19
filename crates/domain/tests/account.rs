//! Given events / when command / then events or error, for every rule of the account aggregate,
//! plus property tests over random command sequences.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use domain::account::{refund_reason, Settlement};
use domain::{
    decide, evolve, replay, AccountId, AccountState, Amount, Command, Currency, DomainError, Event,
    OpenAccount, OverdraftLimit, TransferId,
};
use proptest::prelude::*;

fn id(text: &str) -> AccountId {
    AccountId::parse(text).unwrap()
}
fn tid(text: &str) -> TransferId {
    TransferId::parse(text).unwrap()
}
fn amount(units: i128) -> Amount {
    Amount::new(units).unwrap()
}
fn eur() -> Currency {
    Currency::parse("EUR").unwrap()
}
fn opened(limit: i128) -> Event {
    Event::AccountOpened(OpenAccount {
        currency: eur(),
        owner: Some("alice".into()),
        overdraft_limit: OverdraftLimit::new(limit).unwrap(),
    })
}
fn deposited(units: i128) -> Event {
    Event::Deposited {
        amount: amount(units),
        reference: None,
    }
}
fn debit(transfer: &str, to: &str, units: i128) -> Command {
    Command::DebitTransfer {
        transfer_id: tid(transfer),
        to: id(to),
        amount: amount(units),
        reference: None,
    }
}
fn debited(transfer: &str, to: &str, units: i128) -> Event {
    Event::TransferDebited {
        transfer_id: tid(transfer),
        to: id(to),
        amount: amount(units),
        currency: eur(),
        reference: None,
    }
}

/// Given these events on account `a`, when this command, then this outcome.
fn given(events: &[Event]) -> AccountState {
    replay(id("a"), events)
}
fn then(events: &[Event], command: Command) -> Result<Vec<Event>, DomainError> {
    decide(&given(events), &command)
}

#[test]
fn open_creates_an_account_once() {
    let open = OpenAccount {
        currency: eur(),
        owner: None,
        overdraft_limit: OverdraftLimit::default(),
    };
    assert_eq!(
        then(&[], Command::Open(open.clone())),
        Ok(vec![Event::AccountOpened(open.clone())])
    );
    assert_eq!(
        then(&[opened(0)], Command::Open(open)),
        Err(DomainError::AccountExists)
    );
}

#[test]
fn commands_on_an_unopened_account_are_not_found() {
    let commands = [
        Command::Deposit {
            amount: amount(1),
            reference: None,
        },
        Command::Withdraw {
            amount: amount(1),
            reference: None,
        },
        debit("t1", "b", 1),
        Command::Close,
        Command::RefundTransfer {
            transfer_id: tid("t"),
            reason: "x".into(),
        },
    ];
    for command in commands {
        assert_eq!(then(&[], command), Err(DomainError::AccountNotFound));
    }
}

#[test]
fn deposit_then_withdraw_moves_the_balance() {
    let state = given(&[opened(0), deposited(1500)]);
    assert_eq!(state.balance(), 1500);
    let events = decide(
        &state,
        &Command::Withdraw {
            amount: amount(400),
            reference: Some("atm".into()),
        },
    )
    .unwrap();
    let mut state = state;
    for event in &events {
        evolve(&mut state, event);
    }
    assert_eq!(state.balance(), 1100);
}

#[test]
fn withdraw_beyond_the_overdraft_limit_is_refused() {
    let withdraw = |units| Command::Withdraw {
        amount: amount(units),
        reference: None,
    };
    assert!(matches!(
        then(&[opened(0), deposited(100)], withdraw(101)),
        Err(DomainError::InsufficientFunds {
            balance: 100,
            amount: 101,
            floor: 0
        })
    ));
    assert!(then(&[opened(50)], withdraw(50)).is_ok());
    assert!(matches!(
        then(
            &[
                opened(50),
                Event::Withdrawn {
                    amount: amount(50),
                    reference: None
                }
            ],
            withdraw(1)
        ),
        Err(DomainError::InsufficientFunds { .. })
    ));
}

#[test]
fn deposit_that_would_overflow_is_refused() {
    let max = domain::values::AMOUNT_MAX as i128;
    let history: Vec<Event> = std::iter::once(opened(0))
        .chain((0..1024).map(|_| deposited(max)))
        .collect();
    let state = given(&history);
    assert!(state.balance() > 0, "balance wrapped: {}", state.balance());
    assert_eq!(
        decide(
            &state,
            &Command::Deposit {
                amount: amount(max),
                reference: None
            }
        ),
        Err(DomainError::BalanceOverflow)
    );
}

#[test]
fn closed_accounts_refuse_money_movements() {
    let history = [opened(0), Event::AccountClosed];
    assert_eq!(
        then(
            &history,
            Command::Deposit {
                amount: amount(5),
                reference: None
            }
        ),
        Err(DomainError::AccountClosed)
    );
    assert_eq!(
        then(&history, Command::Close),
        Err(DomainError::AccountClosed)
    );
    assert_eq!(
        then(&history, debit("t", "b", 1)),
        Err(DomainError::AccountClosed)
    );
}

#[test]
fn close_needs_zero_balance_and_no_pending_transfer() {
    assert_eq!(
        then(&[opened(0), deposited(10)], Command::Close),
        Err(DomainError::BalanceNotZero { balance: 10 })
    );
    assert_eq!(
        then(&[opened(0)], Command::Close),
        Ok(vec![Event::AccountClosed])
    );
    // Overdraft lets the balance be negative with a pending transfer; refunding it returns to 0.
    let pending = [opened(10), debited("t1", "b", 10), deposited(10)];
    assert_eq!(
        then(&pending, Command::Close),
        Err(DomainError::TransferPending { pending: 1 })
    );
}

#[test]
fn transfer_debit_checks_funds_and_same_account() {
    assert_eq!(
        then(&[opened(0), deposited(100)], debit("t1", "b", 60)),
        Ok(vec![debited("t1", "b", 60)])
    );
    assert!(matches!(
        then(&[opened(0), deposited(100)], debit("t1", "b", 101)),
        Err(DomainError::InsufficientFunds { .. })
    ));
    assert_eq!(
        then(&[opened(0), deposited(100)], debit("t1", "a", 1)),
        Err(DomainError::SameAccount)
    );
}

#[test]
fn transfer_debit_retry_is_a_no_op_and_reuse_is_refused() {
    let history = [opened(0), deposited(100), debited("t1", "b", 60)];
    assert_eq!(then(&history, debit("t1", "b", 60)), Ok(vec![]));
    assert_eq!(
        then(&history, debit("t1", "b", 61)),
        Err(DomainError::TransferIdReused(tid("t1")))
    );
    assert_eq!(
        then(&history, debit("t1", "c", 60)),
        Err(DomainError::TransferIdReused(tid("t1")))
    );
}

fn credit(transfer: &str, currency: &str) -> Command {
    Command::CreditTransfer {
        transfer_id: tid(transfer),
        from: id("s"),
        amount: amount(30),
        currency: Currency::parse(currency).unwrap(),
        reference: None,
    }
}

#[test]
fn transfer_credit_is_applied_once_and_checks_currency_and_status() {
    let credited = Event::TransferCredited {
        transfer_id: tid("t1"),
        from: id("s"),
        amount: amount(30),
        reference: None,
    };
    assert_eq!(
        then(&[opened(0)], credit("t1", "EUR")),
        Ok(vec![credited.clone()])
    );
    assert_eq!(
        then(&[opened(0), credited], credit("t1", "EUR")),
        Ok(vec![])
    );
    assert!(matches!(
        then(&[opened(0)], credit("t1", "USD")),
        Err(DomainError::CurrencyMismatch { .. })
    ));
    assert_eq!(
        then(&[opened(0), Event::AccountClosed], credit("t1", "EUR")),
        Err(DomainError::AccountClosed)
    );
    assert_eq!(
        then(&[], credit("t1", "EUR")),
        Err(DomainError::AccountNotFound)
    );
}

#[test]
fn refund_returns_money_once_and_only_for_known_pending_transfers() {
    let refund = Command::RefundTransfer {
        transfer_id: tid("t1"),
        reason: refund_reason::ACCOUNT_NOT_FOUND.into(),
    };
    let history = vec![opened(0), deposited(100), debited("t1", "ghost", 60)];
    let events = then(&history, refund.clone()).unwrap();
    assert_eq!(
        events,
        vec![Event::TransferRefunded {
            transfer_id: tid("t1"),
            to: id("ghost"),
            amount: amount(60),
            reason: refund_reason::ACCOUNT_NOT_FOUND.into()
        }]
    );
    let mut after = history.clone();
    after.extend(events);
    let state = given(&after);
    assert_eq!(state.balance(), 100);
    assert_eq!(
        state.account().unwrap().outgoing[&tid("t1")].settlement,
        Settlement::Refunded
    );
    assert_eq!(then(&after, refund.clone()), Ok(vec![]));
    assert_eq!(
        then(&[opened(0)], refund),
        Err(DomainError::UnknownTransfer(tid("t1")))
    );
}

#[test]
fn completing_a_transfer_unblocks_close_and_forbids_a_later_refund() {
    let history = vec![
        opened(0),
        deposited(60),
        debited("t1", "b", 60),
        Event::TransferCompleted {
            transfer_id: tid("t1"),
            to: id("b"),
        },
    ];
    assert_eq!(
        then(&history, Command::Close),
        Ok(vec![Event::AccountClosed])
    );
    let refund = Command::RefundTransfer {
        transfer_id: tid("t1"),
        reason: "late".into(),
    };
    assert_eq!(then(&history, refund), Ok(vec![]));
    assert_eq!(
        then(
            &history,
            Command::CompleteTransfer {
                transfer_id: tid("t1")
            }
        ),
        Ok(vec![])
    );
}

// ---------------------------------------------------------------------------------------------
// Properties over random command sequences.

fn arbitrary_command() -> impl Strategy<Value = Command> {
    let money = 1i128..5_000;
    let transfer = 0u8..6;
    prop_oneof![
        (0i128..2_000).prop_map(|limit| Command::Open(OpenAccount {
            currency: eur(),
            owner: None,
            overdraft_limit: OverdraftLimit::new(limit).unwrap(),
        })),
        money.clone().prop_map(|units| Command::Deposit {
            amount: amount(units),
            reference: None
        }),
        money.clone().prop_map(|units| Command::Withdraw {
            amount: amount(units),
            reference: None
        }),
        (transfer.clone(), money.clone()).prop_map(|(t, units)| debit(
            &format!("t{t}"),
            "b",
            units
        )),
        (transfer.clone(), money).prop_map(|(t, units)| Command::CreditTransfer {
            transfer_id: tid(&format!("in{t}")),
            from: id("s"),
            amount: amount(units),
            currency: eur(),
            reference: None,
        }),
        transfer.clone().prop_map(|t| Command::RefundTransfer {
            transfer_id: tid(&format!("t{t}")),
            reason: "test".into()
        }),
        transfer.prop_map(|t| Command::CompleteTransfer {
            transfer_id: tid(&format!("t{t}"))
        }),
        Just(Command::Close),
    ]
}

proptest! {
    #[test]
    fn replaying_accepted_events_equals_stepwise_state_and_respects_the_limit(
        commands in proptest::collection::vec(arbitrary_command(), 0..80)
    ) {
        let mut state = AccountState::new(id("a"));
        let mut history = Vec::new();
        for command in &commands {
            if let Ok(events) = decide(&state, command) {
                prop_assert!(events.len() <= 1, "a command yielded {} events", events.len());
                for event in events {
                    evolve(&mut state, &event);
                    history.push(event);
                }
            }
            if let Some(account) = state.account() {
                prop_assert!(
                    account.balance >= account.overdraft_limit.floor(),
                    "balance {} below -{}", account.balance, account.overdraft_limit.minor_units()
                );
            }
        }
        prop_assert_eq!(replay(id("a"), &history), state.clone());
        // Conservation: the balance is exactly the signed sum of the events.
        let sum: i64 = history.iter().map(Event::balance_change).sum();
        prop_assert_eq!(state.balance(), sum);
    }
}
