//! Given events / when command / then events or error, for every rule of the account aggregate,
//! plus property tests over random command sequences.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use domain::{
    decide, decide_capture, decide_hold, decide_release, decide_transfer, evolve, replay,
    AccountId, AccountState, Amount, Capture, Command, Currency, DomainError, Event, OpenAccount,
    OverdraftLimit, PlaceHold, Release, Transfer, TransferEvents, TransferId,
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
fn opened_in(currency: &str, limit: i128) -> Event {
    Event::AccountOpened(OpenAccount {
        metadata: Default::default(),
        currency: Currency::parse(currency).unwrap(),
        owner: Some("alice".into()),
        overdraft_limit: OverdraftLimit::new(limit).unwrap(),
    })
}
fn opened(limit: i128) -> Event {
    opened_in("EUR", limit)
}
fn deposited(units: i128) -> Event {
    Event::Deposited {
        metadata: Default::default(),
        amount: amount(units),
        reference: None,
    }
}
fn transfer(transfer_id: &str, to: &str, units: i128) -> Transfer {
    Transfer {
        metadata: Default::default(),
        transfer_id: tid(transfer_id),
        to: id(to),
        amount: amount(units),
        reference: Some("rent".into()),
    }
}

/// Given these events on account `a`, when this command, then this outcome.
fn given(events: &[Event]) -> AccountState {
    replay(id("a"), events)
}
fn given_on(account: &str, events: &[Event]) -> AccountState {
    replay(id(account), events)
}
fn then(events: &[Event], command: Command) -> Result<Vec<Event>, DomainError> {
    decide(&given(events), &command)
}
/// Given the histories of `a` (sender) and `b` (receiver), when `a` transfers.
fn then_transfer(
    sender: &[Event],
    receiver: &[Event],
    transfer: Transfer,
) -> Result<TransferEvents, DomainError> {
    decide_transfer(&given(sender), &given_on("b", receiver), &transfer)
}

#[test]
fn open_creates_an_account_once() {
    let open = OpenAccount {
        metadata: Default::default(),
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
            metadata: Default::default(),
            amount: amount(1),
            reference: None,
        },
        Command::Withdraw {
            metadata: Default::default(),
            amount: amount(1),
            reference: None,
        },
        Command::Close,
    ];
    for command in commands {
        assert_eq!(
            then(&[], command),
            Err(DomainError::AccountNotFound(id("a")))
        );
    }
}

#[test]
fn deposit_then_withdraw_moves_the_balance() {
    let state = given(&[opened(0), deposited(1500)]);
    assert_eq!(state.balance(), 1500);
    let events = decide(
        &state,
        &Command::Withdraw {
            metadata: Default::default(),
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
        metadata: Default::default(),
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
                    metadata: Default::default(),
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
                metadata: Default::default(),
                amount: amount(max),
                reference: None
            }
        ),
        Err(DomainError::BalanceOverflow(id("a")))
    );
}

#[test]
fn closed_accounts_refuse_money_movements() {
    let history = [opened(0), Event::AccountClosed];
    assert_eq!(
        then(
            &history,
            Command::Deposit {
                metadata: Default::default(),
                amount: amount(5),
                reference: None
            }
        ),
        Err(DomainError::AccountClosed(id("a")))
    );
    assert_eq!(
        then(&history, Command::Close),
        Err(DomainError::AccountClosed(id("a")))
    );
    assert_eq!(
        then_transfer(&history, &[opened(0)], transfer("t", "b", 1)),
        Err(DomainError::AccountClosed(id("a")))
    );
}

#[test]
fn close_needs_a_zero_balance() {
    assert_eq!(
        then(&[opened(0), deposited(10)], Command::Close),
        Err(DomainError::BalanceNotZero { balance: 10 })
    );
    assert_eq!(
        then(&[opened(0)], Command::Close),
        Ok(vec![Event::AccountClosed])
    );
}

#[test]
fn a_transfer_debits_the_sender_and_credits_the_receiver_together() {
    let events = then_transfer(
        &[opened(0), deposited(100)],
        &[opened(0)],
        transfer("t1", "b", 60),
    )
    .unwrap();
    assert_eq!(
        events,
        TransferEvents {
            debit: Event::TransferDebited {
                metadata: Default::default(),
                transfer_id: tid("t1"),
                to: id("b"),
                amount: amount(60),
                currency: eur(),
                reference: Some("rent".into()),
            },
            credit: Event::TransferCredited {
                metadata: Default::default(),
                transfer_id: tid("t1"),
                from: id("a"),
                amount: amount(60),
                reference: Some("rent".into()),
            },
        }
    );
    let mut sender = given(&[opened(0), deposited(100)]);
    let mut receiver = given_on("b", &[opened(0)]);
    evolve(&mut sender, &events.debit);
    evolve(&mut receiver, &events.credit);
    assert_eq!((sender.balance(), receiver.balance()), (40, 60));
}

#[test]
fn a_transfer_is_refused_on_either_side() {
    let funded = [opened(0), deposited(100)];
    assert!(matches!(
        then_transfer(&funded, &[opened(0)], transfer("t", "b", 101)),
        Err(DomainError::InsufficientFunds { .. })
    ));
    assert_eq!(
        then_transfer(&funded, &[], transfer("t", "b", 1)),
        Err(DomainError::AccountNotFound(id("b")))
    );
    assert_eq!(
        then_transfer(&[], &[opened(0)], transfer("t", "b", 1)),
        Err(DomainError::AccountNotFound(id("a")))
    );
    assert_eq!(
        then_transfer(
            &funded,
            &[opened(0), Event::AccountClosed],
            transfer("t", "b", 1)
        ),
        Err(DomainError::AccountClosed(id("b")))
    );
    assert_eq!(
        then_transfer(&funded, &[opened_in("USD", 0)], transfer("t", "b", 1)),
        Err(DomainError::CurrencyMismatch {
            expected: Currency::parse("USD").unwrap(),
            actual: eur(),
        })
    );
    let max = domain::values::AMOUNT_MAX as i128;
    let rich: Vec<Event> = std::iter::once(opened(0))
        .chain((0..1024).map(|_| deposited(max)))
        .collect();
    assert_eq!(
        then_transfer(&[opened(0), deposited(max)], &rich, transfer("t", "b", max)),
        Err(DomainError::BalanceOverflow(id("b")))
    );
    assert_eq!(
        decide_transfer(&given(&funded), &given(&funded), &transfer("t", "a", 1)),
        Err(DomainError::SameAccount)
    );
    // The receiver's state must be the account the transfer names.
    assert_eq!(
        decide_transfer(
            &given(&funded),
            &given_on("c", &[opened(0)]),
            &transfer("t", "b", 1)
        ),
        Err(DomainError::SameAccount)
    );
}

#[test]
fn a_transfer_may_use_the_overdraft() {
    assert!(then_transfer(&[opened(50)], &[opened(0)], transfer("t", "b", 50)).is_ok());
    assert!(then_transfer(&[opened(50)], &[opened(0)], transfer("t", "b", 51)).is_err());
}

#[test]
fn an_import_opens_with_a_balance_a_negative_one_within_the_limit() {
    let open = |limit: i128| OpenAccount {
        metadata: Default::default(),
        currency: eur(),
        owner: Some("legacy".into()),
        overdraft_limit: OverdraftLimit::new(limit).unwrap(),
    };
    let events = domain::decide_import(&given(&[]), &open(0), 250).unwrap();
    assert_eq!(
        events,
        vec![
            Event::AccountOpened(open(0)),
            Event::OpeningBalance { balance: 250 }
        ]
    );
    assert_eq!(given(&events).balance(), 250);
    assert!(domain::decide_import(&given(&[]), &open(100), -100).is_ok());
    assert!(matches!(
        domain::decide_import(&given(&[]), &open(99), -100),
        Err(DomainError::InsufficientFunds { .. })
    ));
    assert_eq!(
        domain::decide_import(&given(&[opened(0)]), &open(0), 1),
        Err(DomainError::AccountExists)
    );
}

// ---------------------------------------------------------------------------------------------
// Holds.

const NOW: i64 = 1_800_000_000;

fn hold(hold_id: &str, units: i128, seconds: i64) -> PlaceHold {
    PlaceHold {
        metadata: Default::default(),
        hold_id: tid(hold_id),
        to: id("b"),
        amount: amount(units),
        expires_in_seconds: seconds,
        reference: Some("booking".into()),
    }
}

fn placed(hold_id: &str, units: i128, expires_at: i64) -> Event {
    Event::HoldPlaced {
        metadata: Default::default(),
        hold_id: tid(hold_id),
        to: id("b"),
        amount: amount(units),
        expires_at,
        reference: Some("booking".into()),
    }
}

#[test]
fn a_hold_reserves_available_money_but_not_the_balance() {
    let funded = [opened(0), deposited(1000)];
    let event = decide_hold(
        &given(&funded),
        &given_on("b", &[opened(0)]),
        &hold("h1", 600, 60),
        NOW,
    )
    .unwrap();
    assert_eq!(event, placed("h1", 600, NOW + 60));
    let history = [opened(0), deposited(1000), event];
    let state = given(&history);
    let account = state.account().unwrap();
    assert_eq!(
        (account.balance, account.held, account.available()),
        (1000, 600, 400)
    );
    // Withdrawals, transfers and new holds see only what is available.
    assert!(matches!(
        then(
            &history,
            Command::Withdraw {
                metadata: Default::default(),
                amount: amount(401),
                reference: None
            }
        ),
        Err(DomainError::InsufficientFunds { .. })
    ));
    assert!(then_transfer(&history, &[opened(0)], transfer("t", "b", 401)).is_err());
    assert!(then_transfer(&history, &[opened(0)], transfer("t", "b", 400)).is_ok());
    assert!(matches!(
        decide_hold(
            &state,
            &given_on("b", &[opened(0)]),
            &hold("h2", 401, 60),
            NOW
        ),
        Err(DomainError::InsufficientFunds { .. })
    ));
    // Closing waits for the hold, even at a zero balance.
    let on_overdraft = [opened(100), placed("h3", 50, NOW + 60)];
    assert_eq!(
        then(&on_overdraft, Command::Close),
        Err(DomainError::HoldsOpen { count: 1 })
    );
}

#[test]
fn a_hold_needs_an_open_receiver_in_the_same_currency() {
    let funded = [opened(0), deposited(1000)];
    let refused = |receiver: &[Event]| {
        decide_hold(
            &given(&funded),
            &given_on("b", receiver),
            &hold("h", 1, 60),
            NOW,
        )
    };
    assert_eq!(refused(&[]), Err(DomainError::AccountNotFound(id("b"))));
    assert_eq!(
        refused(&[opened(0), Event::AccountClosed]),
        Err(DomainError::AccountClosed(id("b")))
    );
    assert!(matches!(
        refused(&[opened_in("USD", 0)]),
        Err(DomainError::CurrencyMismatch { .. })
    ));
}

#[test]
fn a_capture_moves_part_of_a_hold_and_releases_the_rest() {
    let history = [opened(0), deposited(1000), placed("h1", 600, NOW + 60)];
    let receiver = [opened(0)];
    let capture = |units: Option<i128>| Capture {
        hold_id: tid("h1"),
        amount: units.map(amount),
    };
    assert_eq!(
        decide_capture(
            &given(&history),
            &given_on("b", &receiver),
            &capture(Some(601)),
            NOW
        ),
        Err(DomainError::AmountExceedsHold {
            held: 600,
            requested: 601
        })
    );
    let events = decide_capture(
        &given(&history),
        &given_on("b", &receiver),
        &capture(Some(250)),
        NOW,
    )
    .unwrap();
    let mut sender = given(&history);
    let mut payee = given_on("b", &receiver);
    evolve(&mut sender, &events.debit);
    evolve(&mut payee, &events.credit);
    let account = sender.account().unwrap();
    assert_eq!(
        (account.balance, account.held, account.available()),
        (750, 0, 750)
    );
    assert_eq!(payee.balance(), 250);
    // Settled: a second capture or a void finds no open hold.
    assert_eq!(
        decide_capture(&sender, &payee, &capture(None), NOW),
        Err(DomainError::HoldNotFound(tid("h1")))
    );
    assert_eq!(
        decide_release(&sender, &tid("h1"), Release::Void, NOW),
        Err(DomainError::HoldNotFound(tid("h1")))
    );
    // The whole hold by default.
    let all = decide_capture(
        &given(&history),
        &given_on("b", &receiver),
        &capture(None),
        NOW,
    )
    .unwrap();
    assert_eq!(
        all.debit,
        Event::HoldCaptured {
            hold_id: tid("h1"),
            amount: amount(600)
        }
    );
    // The receiver is checked again at capture.
    assert_eq!(
        decide_capture(
            &given(&history),
            &given_on("b", &[opened(0), Event::AccountClosed]),
            &capture(None),
            NOW
        ),
        Err(DomainError::AccountClosed(id("b")))
    );
}

#[test]
fn from_expires_at_on_a_hold_is_settled_for_clients_and_due_for_the_system() {
    let history = [opened(0), deposited(100), placed("h1", 100, NOW + 60)];
    let state = given(&history);
    assert_eq!(
        decide_release(&state, &tid("h1"), Release::Expire, NOW + 59),
        Err(DomainError::HoldNotDue {
            hold_id: tid("h1"),
            seconds: 1
        })
    );
    assert_eq!(
        decide_release(&state, &tid("h1"), Release::Void, NOW + 60),
        Err(DomainError::HoldSettled(tid("h1")))
    );
    assert_eq!(
        decide_capture(
            &state,
            &given_on("b", &[opened(0)]),
            &Capture {
                hold_id: tid("h1"),
                amount: None
            },
            NOW + 60
        ),
        Err(DomainError::HoldSettled(tid("h1")))
    );
    let expired = decide_release(&state, &tid("h1"), Release::Expire, NOW + 60).unwrap();
    let mut state = state;
    evolve(&mut state, &expired);
    let account = state.account().unwrap();
    assert_eq!((account.balance, account.available()), (100, 100));
}

// ---------------------------------------------------------------------------------------------
// Properties over random command sequences on two accounts.

#[derive(Debug, Clone)]
enum Step {
    On(bool, Command),
    Transfer(bool, i128),
    Hold(bool, i128, i64),
    Capture(bool, usize, Option<i128>),
    Void(bool, usize),
    Expire(bool, usize),
    Tick(i64),
}

fn arbitrary_command() -> impl Strategy<Value = Command> {
    let money = 1i128..5_000;
    prop_oneof![
        (0i128..2_000).prop_map(|limit| Command::Open(OpenAccount {
            metadata: Default::default(),
            currency: eur(),
            owner: None,
            overdraft_limit: OverdraftLimit::new(limit).unwrap(),
        })),
        money.clone().prop_map(|units| Command::Deposit {
            metadata: Default::default(),
            amount: amount(units),
            reference: None
        }),
        money.prop_map(|units| Command::Withdraw {
            metadata: Default::default(),
            amount: amount(units),
            reference: None
        }),
        Just(Command::Close),
    ]
}

fn arbitrary_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (any::<bool>(), arbitrary_command()).prop_map(|(first, command)| Step::On(first, command)),
        (any::<bool>(), 1i128..5_000).prop_map(|(first, units)| Step::Transfer(first, units)),
        (any::<bool>(), 1i128..3_000, 1i64..100)
            .prop_map(|(first, units, seconds)| Step::Hold(first, units, seconds)),
        (any::<bool>(), 0usize..4, proptest::option::of(1i128..3_000))
            .prop_map(|(first, index, units)| Step::Capture(first, index, units)),
        (any::<bool>(), 0usize..4).prop_map(|(first, index)| Step::Void(first, index)),
        (any::<bool>(), 0usize..4).prop_map(|(first, index)| Step::Expire(first, index)),
        (1i64..50).prop_map(Step::Tick),
    ]
}

/// The `index`-th open hold of an account, if it has that many.
fn nth_hold(state: &AccountState, index: usize) -> Option<TransferId> {
    state.account()?.holds.keys().nth(index).cloned()
}

fn within_limit(state: &AccountState) -> bool {
    state.account().is_none_or(|account| {
        account.balance >= account.overdraft_limit.floor() && account.available() >= 0
    })
}

proptest! {
    #[test]
    fn replaying_accepted_events_equals_stepwise_state_conserves_money_and_respects_limits(
        steps in proptest::collection::vec(arbitrary_step(), 0..120)
    ) {
        let mut states = [AccountState::new(id("a")), AccountState::new(id("b"))];
        let mut histories: [Vec<Event>; 2] = [Vec::new(), Vec::new()];
        let mut external = 0i64;
        let mut now = NOW;
        for (index, step) in steps.iter().enumerate() {
            let pair = |first: bool| if first { (0, 1) } else { (1, 0) };
            match step {
                Step::On(first, command) => {
                    let side = usize::from(!*first);
                    if let Ok(events) = decide(&states[side], command) {
                        prop_assert_eq!(events.len(), 1);
                        for event in events {
                            if matches!(event, Event::Deposited { .. } | Event::Withdrawn { .. }) {
                                external += event.balance_change();
                            }
                            evolve(&mut states[side], &event);
                            histories[side].push(event);
                        }
                    }
                }
                Step::Transfer(first, units) => {
                    let (from, to) = if *first { (0, 1) } else { (1, 0) };
                    let request = Transfer {
                        metadata: Default::default(),
                        transfer_id: tid(&format!("t{index}")),
                        to: states[to].id().clone(),
                        amount: amount(*units),
                        reference: None,
                    };
                    if let Ok(events) = decide_transfer(&states[from], &states[to], &request) {
                        evolve(&mut states[from], &events.debit);
                        evolve(&mut states[to], &events.credit);
                        histories[from].push(events.debit);
                        histories[to].push(events.credit);
                    }
                }
                Step::Hold(first, units, seconds) => {
                    let (from, to) = pair(*first);
                    let request = PlaceHold {
                        metadata: Default::default(),
                        hold_id: tid(&format!("h{index}")),
                        to: states[to].id().clone(),
                        amount: amount(*units),
                        expires_in_seconds: *seconds,
                        reference: None,
                    };
                    if let Ok(event) = decide_hold(&states[from], &states[to], &request, now) {
                        evolve(&mut states[from], &event);
                        histories[from].push(event);
                    }
                }
                Step::Capture(first, which, units) => {
                    let (from, to) = pair(*first);
                    if let Some(hold_id) = nth_hold(&states[from], *which) {
                        let request = Capture { hold_id, amount: units.map(amount) };
                        if let Ok(events) = decide_capture(&states[from], &states[to], &request, now) {
                            evolve(&mut states[from], &events.debit);
                            evolve(&mut states[to], &events.credit);
                            histories[from].push(events.debit);
                            histories[to].push(events.credit);
                        }
                    }
                }
                Step::Void(first, which) | Step::Expire(first, which) => {
                    let (from, _) = pair(*first);
                    let release = if matches!(step, Step::Void(..)) { Release::Void } else { Release::Expire };
                    if let Some(hold_id) = nth_hold(&states[from], *which) {
                        if let Ok(event) = decide_release(&states[from], &hold_id, release, now) {
                            evolve(&mut states[from], &event);
                            histories[from].push(event);
                        }
                    }
                }
                Step::Tick(seconds) => now += seconds,
            }
            prop_assert!(within_limit(&states[0]) && within_limit(&states[1]), "{:?}", states);
        }
        prop_assert_eq!(&replay(id("a"), &histories[0]), &states[0]);
        prop_assert_eq!(&replay(id("b"), &histories[1]), &states[1]);
        // Conservation: transfers and captures move money inside; only deposits and withdrawals
        // change the sum.
        prop_assert_eq!(states[0].balance() + states[1].balance(), external);
    }
}
