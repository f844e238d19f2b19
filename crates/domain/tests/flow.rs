//! Money flows: given account histories / when a set of postings / then the movements or the
//! refusal naming the posting; plus a property test over random transactions, reversals, holds,
//! captures and deposits on several accounts in two currencies.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::{BTreeMap, BTreeSet};

use domain::{
    decide, decide_capture, decide_hold, decide_postings, decide_transaction, evolve, replay,
    reverse, AccountId, AccountState, Amount, Capture, Command, Currency, DomainError, Event,
    OpenAccount, OverdraftLimit, PlaceHold, Posting, PostingRefusal, Transaction, TransferId,
    POSTINGS_MAX,
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
fn opened(currency: &str, limit: i128) -> Event {
    Event::AccountOpened(OpenAccount {
        metadata: Default::default(),
        currency: Currency::parse(currency).unwrap(),
        owner: None,
        overdraft_limit: OverdraftLimit::new(limit).unwrap(),
    })
}
fn deposited(units: i128) -> Event {
    Event::Deposited {
        metadata: Default::default(),
        amount: amount(units),
        reference: None,
    }
}
fn posting(from: &str, to: &str, units: i128) -> Posting {
    Posting {
        from: id(from),
        to: id(to),
        amount: amount(units),
    }
}

/// Accounts given by their histories.
struct Given(BTreeMap<AccountId, AccountState>);

impl Given {
    fn new(accounts: &[(&str, Vec<Event>)]) -> Self {
        Self(
            accounts
                .iter()
                .map(|(name, events)| (id(name), replay(id(name), events)))
                .collect(),
        )
    }

    fn when(&self, postings: &[Posting]) -> Result<Vec<(AccountId, i64)>, PostingRefusal> {
        decide_postings(|account| self.0.get(account), postings, None).map(|movements| {
            movements
                .into_iter()
                .map(|movement| (movement.account, movement.net))
                .collect()
        })
    }
}

fn refused(posting: usize, error: DomainError) -> Result<Vec<(AccountId, i64)>, PostingRefusal> {
    Err(PostingRefusal { posting, error })
}

fn three_eur_and_a_usd() -> Given {
    Given::new(&[
        ("a", vec![opened("EUR", 0), deposited(1000)]),
        ("merchant", vec![opened("EUR", 0)]),
        ("fees", vec![opened("EUR", 0)]),
        ("u", vec![opened("USD", 0), deposited(50)]),
        ("v", vec![opened("USD", 0)]),
        ("closed", vec![opened("EUR", 0), Event::AccountClosed]),
    ])
}

#[test]
fn a_payment_with_a_fee_moves_each_accounts_net() {
    let given = three_eur_and_a_usd();
    let moved = given
        .when(&[
            posting("a", "merchant", 970),
            posting("a", "fees", 30),
            posting("u", "v", 50),
        ])
        .unwrap();
    assert_eq!(
        moved,
        vec![
            (id("a"), -1000),
            (id("merchant"), 970),
            (id("fees"), 30),
            (id("u"), -50),
            (id("v"), 50)
        ]
    );
}

#[test]
fn the_limit_counts_the_net_outflow_not_each_posting() {
    let given = Given::new(&[
        ("a", vec![opened("EUR", 0), deposited(100)]),
        ("b", vec![opened("EUR", 0)]),
    ]);
    assert_eq!(
        given.when(&[posting("a", "b", 150), posting("b", "a", 100)]),
        Ok(vec![(id("a"), -50), (id("b"), 50)])
    );
    // 120 out of 100: the second posting is the first the account cannot cover.
    assert_eq!(
        given.when(&[posting("a", "b", 60), posting("a", "b", 60)]),
        refused(
            1,
            DomainError::InsufficientFunds {
                balance: 100,
                amount: 120,
                floor: 0
            }
        )
    );
    // An outflow covered by a later inflow is not the failing posting.
    assert!(matches!(
        given.when(&[
            posting("a", "b", 150),
            posting("b", "a", 100),
            posting("a", "b", 60)
        ]),
        Err(PostingRefusal {
            posting: 2,
            error: DomainError::InsufficientFunds { .. }
        })
    ));
}

#[test]
fn refusals_name_the_first_failing_posting() {
    let given = three_eur_and_a_usd();
    let cases = [
        (
            vec![posting("a", "merchant", 10), posting("a", "ghost", 1)],
            refused(1, DomainError::AccountNotFound(id("ghost"))),
        ),
        (
            vec![posting("a", "u", 10)],
            refused(
                0,
                DomainError::CurrencyMismatch {
                    expected: Currency::parse("USD").unwrap(),
                    actual: Currency::parse("EUR").unwrap(),
                },
            ),
        ),
        (
            vec![posting("a", "fees", 1), posting("merchant", "merchant", 1)],
            refused(1, DomainError::SameAccount),
        ),
        (
            vec![posting("a", "closed", 1)],
            refused(0, DomainError::AccountClosed(id("closed"))),
        ),
        (
            vec![posting("ghost", "a", 1)],
            refused(0, DomainError::AccountNotFound(id("ghost"))),
        ),
        (
            Vec::new(),
            refused(0, DomainError::PostingCount { count: 0 }),
        ),
        (
            vec![posting("a", "fees", 1); POSTINGS_MAX + 1],
            refused(
                0,
                DomainError::PostingCount {
                    count: POSTINGS_MAX + 1,
                },
            ),
        ),
    ];
    for (postings, expected) in cases {
        assert_eq!(given.when(&postings), expected, "{postings:?}");
    }
    assert!(given
        .when(&vec![posting("a", "fees", 1); POSTINGS_MAX])
        .is_ok());
}

#[test]
fn holds_count_against_the_net_outflow_and_overflow_is_refused() {
    let placed = decide_hold(
        &replay(id("a"), &[opened("EUR", 10), deposited(100)]),
        &replay(id("b"), &[opened("EUR", 0)]),
        &PlaceHold {
            metadata: Default::default(),
            hold_id: tid("h"),
            to: id("b"),
            amount: amount(80),
            expires_in_seconds: 60,
            reference: None,
        },
        0,
    )
    .unwrap();
    let given = Given::new(&[
        ("a", vec![opened("EUR", 10), deposited(100), placed]),
        (
            "b",
            vec![opened("EUR", 0), deposited(9_007_199_254_740_991)],
        ),
        ("c", vec![opened("EUR", 0)]),
    ]);
    // Available: 100 + 10 - 80 = 30.
    assert!(given.when(&[posting("a", "c", 30)]).is_ok());
    assert!(matches!(
        given.when(&[posting("a", "c", 31)]),
        Err(PostingRefusal {
            posting: 0,
            error: DomainError::InsufficientFunds { .. }
        })
    ));
    let rich = Given::new(&[
        (
            "a",
            vec![opened("EUR", 0), deposited(9_007_199_254_740_991)],
        ),
        ("b", vec![opened("EUR", 0)]),
    ]);
    let mut to_b = Vec::new();
    for _ in 0..POSTINGS_MAX {
        to_b.push(posting("a", "b", 9_007_199_254_740_991));
    }
    // 64 * (2^53 - 1) fits an i128 but not the sender's limit: no arithmetic overflow.
    assert!(matches!(
        rich.when(&to_b),
        Err(PostingRefusal {
            posting: 1,
            error: DomainError::InsufficientFunds { .. }
        })
    ));
}

#[test]
fn a_transaction_posts_one_event_per_account_with_its_legs() {
    let given = three_eur_and_a_usd();
    let transaction = Transaction {
        metadata: Default::default(),
        transaction_id: tid("tx-1"),
        postings: vec![posting("a", "merchant", 970), posting("a", "fees", 30)],
        reference: Some("order-17".into()),
        reverses: None,
    };
    let events = decide_transaction(|account| given.0.get(account), &transaction).unwrap();
    assert_eq!(events.len(), 3);
    let (account, event) = &events[0];
    assert_eq!(account, &id("a"));
    let Event::TransactionPosted {
        net, legs, parts, ..
    } = event
    else {
        panic!("{event:?}");
    };
    assert_eq!((*net, legs.len(), *parts), (-1000, 2, 3));
    assert_eq!(event.balance_change(), -1000);
    let (_, fees) = &events[2];
    assert!(
        matches!(fees, Event::TransactionPosted { net: 30, legs, .. }
        if legs.len() == 1 && legs[0].posting == 1)
    );
}

#[test]
fn a_reversal_moves_every_posting_back_once() {
    let postings = vec![posting("a", "merchant", 970), posting("a", "fees", 30)];
    let reversal = reverse(&tid("tx-1"), &postings, None, tid("rev-1"), None).unwrap();
    assert_eq!(
        reversal.postings,
        vec![posting("merchant", "a", 970), posting("fees", "a", 30)]
    );
    assert_eq!(reversal.reverses, Some(tid("tx-1")));
    assert_eq!(
        reverse(
            &tid("tx-1"),
            &postings,
            Some(&tid("rev-1")),
            tid("rev-2"),
            None
        ),
        Err(DomainError::AlreadyReversed {
            original: tid("tx-1"),
            reversal: tid("rev-1")
        })
    );
    // The receiver spent it: the reversal is refused on its posting.
    let given = Given::new(&[
        ("a", vec![opened("EUR", 0)]),
        ("merchant", vec![opened("EUR", 0), deposited(970)]),
        ("fees", vec![opened("EUR", 0), deposited(10)]),
    ]);
    assert!(matches!(
        given.when(&reversal.postings),
        Err(PostingRefusal {
            posting: 1,
            error: DomainError::InsufficientFunds { .. }
        })
    ));
}

/// A step of the property test, over six accounts: a-d in EUR, e-f in USD.
#[derive(Debug, Clone)]
enum Step {
    Deposit(usize, i128),
    Withdraw(usize, i128),
    Transaction(Vec<(usize, usize, i128)>),
    /// Reverse the n-th committed transaction (modulo how many there are).
    Reverse(usize),
    Hold(usize, usize, i128),
    /// Capture the n-th open hold of an account, all of it or an amount.
    Capture(usize, usize, Option<i128>),
}

const ACCOUNTS: [(&str, &str, i128); 6] = [
    ("a", "EUR", 0),
    ("b", "EUR", 50),
    ("c", "EUR", 0),
    ("d", "EUR", 1000),
    ("e", "USD", 0),
    ("f", "USD", 20),
];

fn arbitrary_step() -> impl Strategy<Value = Step> {
    let account = 0usize..6;
    prop_oneof![
        (account.clone(), 1i128..2_000).prop_map(|(a, units)| Step::Deposit(a, units)),
        (account.clone(), 1i128..1_000).prop_map(|(a, units)| Step::Withdraw(a, units)),
        proptest::collection::vec((0usize..6, 0usize..6, 1i128..1_500), 1..8)
            .prop_map(Step::Transaction),
        (0usize..20).prop_map(Step::Reverse),
        (account.clone(), account.clone(), 1i128..800)
            .prop_map(|(from, to, units)| Step::Hold(from, to, units)),
        (account, 0usize..3, proptest::option::of(1i128..800))
            .prop_map(|(from, which, units)| Step::Capture(from, which, units)),
    ]
}

fn name(index: usize) -> AccountId {
    id(ACCOUNTS[index].0)
}

proptest! {
    #[test]
    fn money_flows_conserve_each_currency_respect_limits_and_reverse_once(
        steps in proptest::collection::vec(arbitrary_step(), 0..80)
    ) {
        let mut states: BTreeMap<AccountId, AccountState> = BTreeMap::new();
        let mut histories: BTreeMap<AccountId, Vec<Event>> = BTreeMap::new();
        let mut apply = |states: &mut BTreeMap<AccountId, AccountState>, account: &AccountId, event: Event| {
            if let Some(state) = states.get_mut(account) {
                evolve(state, &event);
            }
            histories.entry(account.clone()).or_default().push(event);
        };
        for (name, currency, limit) in ACCOUNTS {
            states.insert(id(name), AccountState::new(id(name)));
            apply(&mut states, &id(name), opened(currency, limit));
        }
        let mut external: BTreeMap<&str, i64> = BTreeMap::new();
        let mut committed: Vec<(TransferId, Vec<Posting>)> = Vec::new();
        let mut reversed: BTreeMap<TransferId, TransferId> = BTreeMap::new();
        let mut reversals_applied: BTreeSet<TransferId> = BTreeSet::new();
        for (index, step) in steps.into_iter().enumerate() {
            match step {
                Step::Deposit(account, units) | Step::Withdraw(account, units) => {
                    let deposit = matches!(step, Step::Deposit(..));
                    let command = if deposit {
                        Command::Deposit { amount: amount(units), reference: None, metadata: Default::default() }
                    } else {
                        Command::Withdraw { amount: amount(units), reference: None, metadata: Default::default() }
                    };
                    if let Ok(events) = decide(&states[&name(account)], &command) {
                        for event in events {
                            *external.entry(ACCOUNTS[account].1).or_default() += event.balance_change();
                            apply(&mut states, &name(account), event);
                        }
                    }
                }
                Step::Transaction(legs) => {
                    let transaction = Transaction {
                        metadata: Default::default(),
                        transaction_id: tid(&format!("tx{index}")),
                        postings: legs.iter().map(|&(from, to, units)| Posting {
                            from: name(from), to: name(to), amount: amount(units),
                        }).collect(),
                        reference: None,
                        reverses: None,
                    };
                    if let Ok(events) = decide_transaction(|account| states.get(account), &transaction) {
                        for (account, event) in events {
                            apply(&mut states, &account, event);
                        }
                        committed.push((transaction.transaction_id, transaction.postings));
                    }
                }
                Step::Reverse(which) => {
                    if committed.is_empty() {
                        continue;
                    }
                    let (original, postings) = committed[which % committed.len()].clone();
                    let reversal_id = tid(&format!("rev{index}"));
                    match reverse(&original, &postings, reversed.get(&original), reversal_id.clone(), None) {
                        Ok(reversal) => {
                            if let Ok(events) = decide_transaction(|account| states.get(account), &reversal) {
                                for (account, event) in events {
                                    apply(&mut states, &account, event);
                                }
                                prop_assert!(reversals_applied.insert(original.clone()), "{} reversed twice", original);
                                reversed.insert(original, reversal_id.clone());
                                committed.push((reversal_id, reversal.postings));
                            }
                        }
                        Err(error) => {
                            let already = matches!(error, DomainError::AlreadyReversed { .. });
                            prop_assert!(already, "refused with {:?}", error);
                        }
                    }
                }
                Step::Hold(from, to, units) => {
                    let hold = PlaceHold {
                        metadata: Default::default(),
                        hold_id: tid(&format!("h{index}")),
                        to: name(to),
                        amount: amount(units),
                        expires_in_seconds: 3600,
                        reference: None,
                    };
                    if let Ok(event) = decide_hold(&states[&name(from)], &states[&name(to)], &hold, 0) {
                        apply(&mut states, &name(from), event);
                    }
                }
                Step::Capture(from, which, units) => {
                    let from_state = &states[&name(from)];
                    let Some((hold_id, to)) = from_state.account().and_then(|account| {
                        account.holds.iter().nth(which).map(|(hold_id, hold)| (hold_id.clone(), hold.to.clone()))
                    }) else {
                        continue;
                    };
                    let capture = Capture { hold_id, amount: units.map(amount) };
                    if let Ok(events) = decide_capture(from_state, &states[&to], &capture, 1) {
                        apply(&mut states, &name(from), events.debit);
                        apply(&mut states, &to, events.credit);
                    }
                }
            }
            for state in states.values() {
                let account = state.account().unwrap();
                prop_assert!(account.available() >= 0, "below its limit: {:?}", account);
            }
            for currency in ["EUR", "USD"] {
                let sum: i64 = states.values()
                    .filter_map(AccountState::account)
                    .filter(|account| account.currency.as_str() == currency)
                    .map(|account| account.balance)
                    .sum();
                prop_assert_eq!(sum, external.get(currency).copied().unwrap_or(0), "{} not conserved", currency);
            }
        }
        for (account, history) in &histories {
            prop_assert_eq!(&replay(account.clone(), history), &states[account]);
        }
    }
}
