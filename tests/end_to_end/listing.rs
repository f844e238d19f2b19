//! Metadata, the accounts listing and statement search by reference, through a writer and a
//! reader: filters combined, pagination while accounts are opened, closed accounts, metadata
//! changed and unset, the views that carry metadata, and metadata out of bounds refused.

use std::collections::BTreeSet;

use serde_json::{json, Value};
use testkit::NatsServer;

use crate::support::{self, Http, Reply};

/// An account opened by the test: (id, owner, currency, tier).
type Opened = (String, &'static str, &'static str, &'static str);

async fn post(http: &Http, url: &str, body: Value) -> Reply {
    http.post(url, &body, None).await.unwrap()
}

/// Every account id a listing query returns, page by page (`limit` per page); checks that each
/// page is ascending and continues after the previous one.
async fn list_all(http: &Http, reader: &str, filters: &str, limit: usize) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut url = format!("{reader}/v1/accounts?limit={limit}&{filters}");
        if let Some(after) = &after {
            url.push_str(&format!("&after={after}"));
        }
        let page = http.get(&url).await.unwrap();
        assert_eq!(page.status, 200, "{url}: {:?}", page.body);
        let page_ids: Vec<String> = page.body["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|account| account["account_id"].as_str().unwrap().to_owned())
            .collect();
        assert!(page_ids.len() <= limit);
        for id in &page_ids {
            assert!(
                ids.last().is_none_or(|last| last < id),
                "{id} out of order after {:?}",
                ids.last()
            );
            ids.push(id.clone());
        }
        match page.body["next"].as_str() {
            Some(next) => {
                // The last listed account, or past it when the page stopped short (filters
                // that rarely meet): never back, never standing still.
                assert!(page_ids.last().is_none_or(|last| last.as_str() <= next));
                assert!(after.as_deref().is_none_or(|after| after < next), "{url}");
                after = Some(next.to_owned());
            }
            None => return ids,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_are_listed_by_filters_and_metadata_and_statements_searched_by_reference() {
    let nats = NatsServer::start();
    let writer = support::writer("w", &nats.url(), &[]);
    let data = tempfile::tempdir().unwrap();
    let reader = support::reader("r", &nats.url(), data.path(), &[]);
    support::wait_ready(&reader.url());
    let (w, r) = (writer.url(), reader.url());
    let http = Http::new();
    let tag = support::unique("t");

    // 30 accounts: owners a/b, currencies EUR/USD, tiers gold/basic, all tagged.
    let mut expected: Vec<Opened> = Vec::new();
    let mut last = 0;
    for index in 0..30 {
        let id = format!("{tag}-{index:02}");
        let (owner, currency) = (
            if index % 2 == 0 { "a" } else { "b" },
            if index % 3 == 0 { "USD" } else { "EUR" },
        );
        let tier = if index % 5 == 0 { "gold" } else { "basic" };
        let opened = post(
            &http,
            &format!("{w}/v1/accounts"),
            json!({"account_id": id, "currency": currency, "owner": format!("{tag}-{owner}"),
                "metadata": {"tier": tier, "batch": tag}}),
        )
        .await;
        assert_eq!(opened.status, 201, "{:?}", opened.body);
        last = opened.body["position"].as_u64().unwrap();
        expected.push((id, owner, currency, tier));
    }
    let wanted = |keep: &dyn Fn(&Opened) -> bool| -> Vec<String> {
        expected
            .iter()
            .filter(|account| keep(account))
            .map(|account| account.0.clone())
            .collect()
    };
    let sync = format!("min_position={last}");
    // Each filter alone and combined, in pages of 4.
    let all = list_all(&http, &r, &format!("metadata.batch={tag}&{sync}"), 4).await;
    assert_eq!(all, wanted(&|_| true));
    let a_eur = list_all(&http, &r, &format!("owner={tag}-a&currency=EUR"), 4).await;
    assert_eq!(
        a_eur,
        wanted(&|account| account.1 == "a" && account.2 == "EUR")
    );
    let gold_usd = list_all(
        &http,
        &r,
        &format!("metadata.batch={tag}&metadata.tier=gold&currency=USD"),
        2,
    )
    .await;
    assert_eq!(
        gold_usd,
        wanted(&|account| account.3 == "gold" && account.2 == "USD")
    );
    assert!(!gold_usd.is_empty());

    // Paging stays stable while accounts are opened: every account there before is seen once,
    // in order, whatever is opened meanwhile.
    let before: BTreeSet<String> = wanted(&|account| account.1 == "b").into_iter().collect();
    let opener = {
        let (http, w, tag) = (http.clone(), w.clone(), tag.clone());
        tokio::spawn(async move {
            for index in 0..20 {
                let opened = post(
                    &http,
                    &format!("{w}/v1/accounts"),
                    json!({"account_id": format!("{tag}-{index:02}x"), "currency": "EUR",
                        "owner": format!("{tag}-b")}),
                )
                .await;
                assert_eq!(opened.status, 201);
            }
        })
    };
    let during = list_all(&http, &r, &format!("owner={tag}-b"), 3).await;
    opener.await.unwrap();
    let during: BTreeSet<String> = during.into_iter().collect();
    assert!(
        before.is_subset(&during),
        "missed while paging: {:?}",
        before.difference(&during).collect::<Vec<_>>()
    );

    // A closed account: listed as closed, not as open.
    let closing = &expected[1].0;
    let closed = post(
        &http,
        &format!("{w}/v1/accounts/{closing}/close"),
        json!({}),
    )
    .await;
    assert_eq!(closed.status, 200, "{:?}", closed.body);
    let sync = format!("min_position={}", closed.body["position"]);
    let closed_ids = list_all(
        &http,
        &r,
        &format!("metadata.batch={tag}&status=closed&{sync}"),
        10,
    )
    .await;
    assert_eq!(closed_ids, vec![closing.clone()]);
    let open_ids = list_all(&http, &r, &format!("metadata.batch={tag}&status=open"), 10).await;
    assert!(!open_ids.contains(closing) && open_ids.len() == 29);

    // Metadata changed and unset: the old terms no longer match, the new ones do.
    let changing = &expected[2].0;
    let changed = post(
        &http,
        &format!("{w}/v1/accounts/{changing}/metadata"),
        json!({"set": {"tier": "platinum"}, "unset": ["batch"]}),
    )
    .await;
    assert_eq!(changed.status, 200, "{:?}", changed.body);
    assert_eq!(changed.body["metadata"], json!({"tier": "platinum"}));
    let sync = format!("min_position={}", changed.body["position"]);
    let tagged = list_all(&http, &r, &format!("metadata.batch={tag}&{sync}"), 50).await;
    assert!(!tagged.contains(changing) && tagged.len() == 29);
    let platinum = list_all(&http, &r, "metadata.tier=platinum", 50).await;
    assert_eq!(platinum, vec![changing.clone()]);
    let view = http
        .get(&format!("{r}/v1/accounts/{changing}"))
        .await
        .unwrap();
    assert_eq!(view.body["metadata"], json!({"tier": "platinum"}));

    // Movements carry metadata into the statement, transfer, hold and transaction views; the
    // statement is searched by reference.
    let (payer, payee) = (&expected[4].0, &expected[5].0);
    for amount in [100, 7] {
        let deposit = post(
            &http,
            &format!("{w}/v1/accounts/{payer}/deposits"),
            json!({"amount": amount, "reference": format!("inv-{amount}"),
                "metadata": {"invoice": amount.to_string()}}),
        )
        .await;
        assert_eq!(deposit.status, 200, "{:?}", deposit.body);
    }
    let transfer = post(
        &http,
        &format!("{w}/v1/transfers"),
        json!({"from": payer, "to": payee, "amount": 5, "reference": "inv-7",
            "metadata": {"order": "o-1"}}),
    )
    .await;
    assert_eq!(transfer.status, 201, "{:?}", transfer.body);
    let hold = post(
        &http,
        &format!("{w}/v1/holds"),
        json!({"from": payer, "to": payee, "amount": 3, "metadata": {"booking": "b-1"}}),
    )
    .await;
    assert_eq!(hold.status, 201, "{:?}", hold.body);
    let transaction = post(
        &http,
        &format!("{w}/v1/transactions"),
        json!({"postings": [{"from": payer, "to": payee, "amount": 2}],
            "metadata": {"cart": "c-1"}}),
    )
    .await;
    assert_eq!(transaction.status, 201, "{:?}", transaction.body);
    let sync = format!("min_position={}", transaction.body["position"]);
    let items = http
        .get(&format!(
            "{r}/v1/accounts/{payer}/transactions?reference=inv-7&{sync}"
        ))
        .await
        .unwrap()
        .body["items"]
        .clone();
    let items = items.as_array().unwrap();
    assert_eq!(items.len(), 2, "{items:?}");
    assert_eq!(items[0]["amount"], 7);
    assert_eq!(items[0]["metadata"], json!({"invoice": "7"}));
    assert_eq!(items[1]["amount"], -5);
    assert_eq!(items[1]["metadata"], json!({"order": "o-1"}));
    let transfer_view = http
        .get(&format!(
            "{r}/v1/transfers/{}",
            transfer.body["transfer_id"].as_str().unwrap()
        ))
        .await
        .unwrap();
    assert_eq!(transfer_view.body["metadata"], json!({"order": "o-1"}));
    let hold_view = http
        .get(&format!(
            "{r}/v1/holds/{}",
            hold.body["hold_id"].as_str().unwrap()
        ))
        .await
        .unwrap();
    assert_eq!(hold_view.body["metadata"], json!({"booking": "b-1"}));
    let transaction_view = http
        .get(&format!(
            "{r}/v1/transactions/{}",
            transaction.body["transaction_id"].as_str().unwrap()
        ))
        .await
        .unwrap();
    assert_eq!(transaction_view.body["metadata"], json!({"cart": "c-1"}));

    // Out of bounds: refused with the field named, nothing stored.
    let too_many: serde_json::Map<String, Value> = (0..17)
        .map(|index| (format!("k{index}"), json!("v")))
        .collect();
    for (body, named) in [
        (
            json!({"currency": "EUR", "metadata": {"bad key!": "x"}}),
            "metadata",
        ),
        (json!({"currency": "EUR", "metadata": too_many}), "metadata"),
        (
            json!({"currency": "EUR", "metadata": {"k": "v".repeat(257)}}),
            "metadata",
        ),
        (json!({"currency": "EUR", "metadata": {"k": 1}}), "metadata"),
    ] {
        let refused = post(&http, &format!("{w}/v1/accounts"), body).await;
        assert_eq!(refused.status, 400, "{:?}", refused.body);
        assert!(
            refused.body["detail"].as_str().unwrap().contains(named),
            "{:?}",
            refused.body
        );
    }
    // 16 entries on the account at most, counted after the change.
    let sixteen: serde_json::Map<String, Value> = (0..15)
        .map(|index| (format!("k{index}"), json!("v")))
        .collect();
    let full = post(
        &http,
        &format!("{w}/v1/accounts/{changing}/metadata"),
        json!({"set": sixteen}),
    )
    .await;
    assert_eq!(full.status, 200, "{:?}", full.body);
    let over = post(
        &http,
        &format!("{w}/v1/accounts/{changing}/metadata"),
        json!({"set": {"one-more": "x"}}),
    )
    .await;
    assert_eq!(over.status, 400, "{:?}", over.body);
    assert!(over.body["detail"].as_str().unwrap().contains("metadata"));
    for body in [
        json!({"unset": ["bad key!"]}),
        json!({"set": {"a": 1}}),
        json!({"add": {"a": "1"}}),
    ] {
        let refused = post(&http, &format!("{w}/v1/accounts/{changing}/metadata"), body).await;
        assert_eq!(refused.status, 400, "{:?}", refused.body);
    }
    // Nothing to change: the metadata as it is, and a key both set and unset ends up unset.
    let same = post(
        &http,
        &format!("{w}/v1/accounts/{changing}/metadata"),
        json!({}),
    )
    .await;
    assert_eq!(
        (same.status, same.body["metadata"]["k0"].as_str()),
        (200, Some("v"))
    );
    let both = post(
        &http,
        &format!("{w}/v1/accounts/{changing}/metadata"),
        json!({"set": {"k0": "w"}, "unset": ["k0"]}),
    )
    .await;
    assert_eq!(both.status, 200, "{:?}", both.body);
    assert!(both.body["metadata"].get("k0").is_none(), "{:?}", both.body);
    // Listing refuses what it cannot filter on.
    for query in [
        "currency=eur",
        "status=frozen",
        "metadata.bad!=x",
        "limit=0",
        "after=has.dot",
        "after=",
    ] {
        let refused = http.get(&format!("{r}/v1/accounts?{query}")).await.unwrap();
        assert_eq!(refused.status, 400, "{query}: {:?}", refused.body);
    }
}

/// A views file written before the listing existed (no schema version, no index) is rebuilt
/// from the stream when the reader starts, and then lists what the stream holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_of_an_older_schema_are_rebuilt_at_start_and_list_the_stream() {
    let nats = NatsServer::start();
    let writer = support::writer("w", &nats.url(), &[]);
    let data = tempfile::tempdir().unwrap();
    let mut reader = support::reader("r", &nats.url(), data.path(), &[]);
    support::wait_ready(&reader.url());
    let http = Http::new();
    let tag = support::unique("old");
    let mut last = 0;
    for index in 0..3 {
        let opened = post(
            &http,
            &format!("{}/v1/accounts", writer.url()),
            json!({"account_id": format!("{tag}-{index}"), "currency": "EUR",
                "metadata": {"batch": tag}}),
        )
        .await;
        last = opened.body["position"].as_u64().unwrap();
    }
    let listed = list_all(
        &http,
        &reader.url(),
        &format!("metadata.batch={tag}&min_position={last}"),
        10,
    )
    .await;
    assert_eq!(listed.len(), 3);
    reader.terminate(std::time::Duration::from_secs(10));

    // What an older build left: the same rows, no index, no schema version.
    {
        let database = redb::Database::open(data.path().join("views.redb")).unwrap();
        let transaction = database.begin_write().unwrap();
        transaction
            .delete_table(reader::views::ACCOUNT_INDEX)
            .unwrap();
        transaction.delete_table(reader::views::VIEW_META).unwrap();
        transaction.commit().unwrap();
    }
    reader.restart();
    support::wait_ready(&reader.url());
    let listed = list_all(
        &http,
        &reader.url(),
        &format!("metadata.batch={tag}&min_position={last}"),
        10,
    )
    .await;
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(
        reader.log().contains("another schema version"),
        "{}",
        reader.log()
    );
}

/// A rollback to a build without the listing moves the views on without their indexes; back on
/// this build, the file is rebuilt (its `indexed_position` is behind its views) and lists what
/// the older build applied too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_moved_on_without_their_indexes_are_rebuilt_at_start() {
    let nats = NatsServer::start();
    let writer = support::writer("w", &nats.url(), &[]);
    let data = tempfile::tempdir().unwrap();
    let mut reader = support::reader("r", &nats.url(), data.path(), &[]);
    support::wait_ready(&reader.url());
    let http = Http::new();
    let tag = support::unique("rollback");
    let mut positions = Vec::new();
    for index in 0..2 {
        let opened = post(
            &http,
            &format!("{}/v1/accounts", writer.url()),
            json!({"account_id": format!("{tag}-{index}"), "currency": "EUR",
                "metadata": {"batch": tag}}),
        )
        .await;
        assert_eq!(opened.status, 201, "{:?}", opened.body);
        let position = opened.body["position"].as_u64().unwrap();
        positions.push(position);
        // One batch per account: the second is what the older build applies.
        let listed = list_all(
            &http,
            &reader.url(),
            &format!("metadata.batch={tag}&min_position={position}"),
            10,
        )
        .await;
        assert_eq!(listed.len(), index + 1);
    }
    reader.terminate(std::time::Duration::from_secs(10));

    // What the older build leaves: the second account applied to the views, not to the index
    // (which it does not know), and the index's position where this build left it.
    {
        let database = redb::Database::open(data.path().join("views.redb")).unwrap();
        let transaction = database.begin_write().unwrap();
        {
            let mut index = transaction
                .open_table(reader::views::ACCOUNT_INDEX)
                .unwrap();
            let second = format!("{tag}-1");
            let terms: Vec<String> = {
                use redb::ReadableTable;
                index
                    .iter()
                    .unwrap()
                    .map(|entry| {
                        let (key, _) = entry.unwrap();
                        let (term, account) = key.value();
                        (term.to_owned(), account.to_owned())
                    })
                    .filter(|(_, account)| *account == second)
                    .map(|(term, _)| term)
                    .collect()
            };
            assert!(!terms.is_empty(), "the second account was indexed");
            for term in &terms {
                index.remove((term.as_str(), second.as_str())).unwrap();
            }
            transaction
                .open_table(reader::views::VIEW_META)
                .unwrap()
                .insert(reader::views::INDEXED_POSITION_KEY, positions[0])
                .unwrap();
        }
        transaction.commit().unwrap();
    }
    reader.restart();
    support::wait_ready(&reader.url());
    let listed = list_all(
        &http,
        &reader.url(),
        &format!("metadata.batch={tag}&min_position={}", positions[1]),
        10,
    )
    .await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(
        reader.log().contains("moved past their indexes"),
        "{}",
        reader.log()
    );
}

/// Two filters that are each common and together rare: a page stops after stepping over its
/// share of index entries and says where to go on (`next`), short or even empty, and following
/// `next` lists exactly the accounts that match both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_that_rarely_meet_answer_bounded_pages_that_go_on() {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let log = eventlog::EventLog::open(client, &eventlog::StreamSettings::default())
        .await
        .unwrap();
    const ACCOUNTS: usize = 30_000;
    let both = [12_345, 29_998];
    // `side=left` on even accounts, `kind=right` on odd ones; the two in `both` have the two.
    fixtures::open_many_labelled(
        &log,
        "meet",
        ACCOUNTS,
        |number| {
            let mut entries = std::collections::BTreeMap::new();
            if number % 2 == 0 || both.contains(&number) {
                entries.insert("side".to_string(), "left".to_string());
            }
            if number % 2 == 1 || both.contains(&number) {
                entries.insert("kind".to_string(), "right".to_string());
            }
            domain::Metadata::new(entries).unwrap()
        },
        |_| {},
    )
    .await;
    let last = log.last_position().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let reader = support::reader("r", &nats.url(), data.path(), &[]);
    support::wait_ready(&reader.url());
    let http = Http::new();
    let mut after: Option<String> = None;
    let mut listed = Vec::new();
    let mut pages = 0;
    let mut short_pages_with_more = 0;
    loop {
        let mut url = format!(
            "{}/v1/accounts?metadata.side=left&metadata.kind=right&limit=100&min_position={last}",
            reader.url()
        );
        if let Some(after) = &after {
            url.push_str(&format!("&after={after}"));
        }
        let page = http.get(&url).await.unwrap();
        assert_eq!(page.status, 200, "{:?}", page.body);
        pages += 1;
        let accounts = page.body["accounts"].as_array().unwrap();
        listed.extend(
            accounts
                .iter()
                .map(|account| account["account_id"].as_str().unwrap().to_owned()),
        );
        match page.body["next"].as_str() {
            Some(next) => {
                if accounts.len() < 100 {
                    short_pages_with_more += 1;
                }
                assert!(after.as_deref().is_none_or(|after| after < next));
                after = Some(next.to_owned());
            }
            None => break,
        }
        assert!(pages < 100, "the listing does not end");
    }
    let expected: Vec<String> = {
        let mut ids: Vec<String> = both.iter().map(|number| format!("meet-{number}")).collect();
        ids.sort();
        ids
    };
    assert_eq!(listed, expected);
    // About 30 000 seeks (two per step between the interleaved terms) at 10 000 a page.
    assert!(
        short_pages_with_more >= 2 && pages >= 3,
        "{pages} pages, {short_pages_with_more} short with more"
    );
}

/// An account opened before overdraft limits and metadata existed (`account_opened` version 1,
/// published as an older writer did) is read by a writer, which takes its deposit and its first
/// metadata, and by a reader, which lists it and shows it the same before and after
/// `coffer projection rebuild`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_opened_by_an_older_version_is_upcast_by_writer_reader_and_rebuild() {
    let nats = NatsServer::start();
    let account = support::unique("legacy");
    {
        #[derive(serde::Serialize)]
        struct AccountOpenedV1 {
            currency: String,
            owner: Option<String>,
        }
        let client = async_nats::connect(nats.url()).await.unwrap();
        // The stream as the services make it.
        eventlog::EventLog::open(client.clone(), &eventlog::StreamSettings::default())
            .await
            .unwrap();
        let id = domain::AccountId::parse(&account).unwrap();
        let payload = rmp_serde::to_vec_named(&AccountOpenedV1 {
            currency: "EUR".into(),
            owner: Some("legacy-owner".into()),
        })
        .unwrap();
        // As the older version chained it: over its own payload and version.
        let chain = eventlog::chain::link(
            eventlog::chain::GENESIS,
            &account,
            "account_opened",
            1,
            &payload,
        );
        let mut headers = async_nats::HeaderMap::new();
        for (name, value) in [
            ("Coffer-Event-Type", "account_opened"),
            ("Coffer-Event-Version", "1"),
            ("Coffer-Account-Id", account.as_str()),
            ("Coffer-Command-Id", "00000000-0000-7000-8000-000000000001"),
            ("Coffer-Correlation-Id", "legacy"),
            ("Coffer-Chain", chain.as_str()),
            ("Content-Type", "application/msgpack"),
            ("Nats-Expected-Last-Subject-Sequence", "0"),
        ] {
            headers.insert(name, value);
        }
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence-Subject",
            eventlog::subject::account_filter(&id).as_str(),
        );
        let acknowledged = async_nats::jetstream::new(client)
            .publish_with_headers(
                eventlog::subject::append(&id, "account_opened"),
                headers,
                payload.into(),
            )
            .await
            .unwrap()
            .await;
        assert!(acknowledged.is_ok(), "{acknowledged:?}");
    }
    let writer = support::writer("w", &nats.url(), &[]);
    let data = tempfile::tempdir().unwrap();
    let reader = support::reader("r", &nats.url(), data.path(), &[]);
    support::wait_ready(&reader.url());
    let http = Http::new();
    let deposited = post(
        &http,
        &format!("{}/v1/accounts/{account}/deposits", writer.url()),
        json!({"amount": 250}),
    )
    .await;
    assert_eq!(deposited.status, 200, "{:?}", deposited.body);
    let labelled = post(
        &http,
        &format!("{}/v1/accounts/{account}/metadata", writer.url()),
        json!({"set": {"era": "legacy"}}),
    )
    .await;
    assert_eq!(labelled.status, 200, "{:?}", labelled.body);
    let last = labelled.body["position"].as_u64().unwrap();
    // Reader: the view, and the listing by the old account's terms and its new metadata.
    let check = |label: &'static str| {
        let (http, reader, account) = (http.clone(), reader.url(), account.clone());
        async move {
            let view = http
                .get(&format!(
                    "{reader}/v1/accounts/{account}?min_position={last}"
                ))
                .await
                .unwrap();
            assert_eq!(view.status, 200, "{label}: {:?}", view.body);
            assert_eq!(view.body["balance"], 250, "{label}");
            assert_eq!(view.body["owner"], "legacy-owner", "{label}");
            assert_eq!(view.body["overdraft_limit"], 0, "{label}");
            assert_eq!(view.body["metadata"], json!({"era": "legacy"}), "{label}");
            for filters in ["owner=legacy-owner&currency=EUR", "metadata.era=legacy"] {
                let listed = list_all(
                    &http,
                    &reader,
                    &format!("{filters}&min_position={last}"),
                    10,
                )
                .await;
                assert_eq!(listed, vec![account.clone()], "{label}: {filters}");
            }
        }
    };
    check("caught up").await;
    let rebuilt = crate::rebuild::rebuild(&reader.url()).await;
    assert!(
        rebuilt.status.success(),
        "{}",
        String::from_utf8_lossy(&rebuilt.stderr)
    );
    check("rebuilt").await;
}
