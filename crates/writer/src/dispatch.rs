//! Where a command runs: on this writer's actor for its account, or handed to the writer that
//! owns the account ([`crate::ownership`]) over NATS request-reply on `coffer.owner.{writer}`.
//!
//! Both APIs and the hold-expiry worker go through [`Dispatcher::execute`]. A handed-over
//! command runs on the owner's actors only (it is never handed on again) and carries its
//! caller's deadline twice: as a budget, counted from when the owner takes it, and as wall-clock
//! time, so a hand-over that waited (an owner paused, a reconnecting client) is not started after
//! its caller gave up. The owner's answer, success or error, is the caller's answer.
//!
//! "Nobody took it" (NATS no-responders: the owner has gone and the message reached no one) is
//! the one failure after which the command runs here: nothing was delivered. Any other failure
//! of a hand-over that was sent may hide a command that runs, so it answers `outcome_unknown`.
//!
//! An owner that dies while it has a hand-over would leave its caller waiting until the deadline.
//! So the caller asks `coffer.owner.{owner}.alive` while it waits, which the owner answers as
//! long as its NATS connection lives. "No responders" there proves little: the owner may only be
//! reconnecting (a NATS server in lame duck, a network blip) and still run the command after. So
//! only a command with an `Idempotency-Key` then runs here: its key marker (stored in the same
//! atomic batch as its events, or alone for a refusal) lets one of the two runs be stored, and
//! the other answers what was stored. Any other command keeps waiting for its owner's answer or
//! its deadline: a transfer's id claims only its acceptance, not a refusal, so a refusal here could
//! be followed by the owner's acceptance.
//!
//! A flow decided here that keeps losing races for an account another writer owns (that writer
//! keeps it busy; on a replicated stream its appends are then nearly always in flight) comes
//! back from the actor with nothing of it stored, and is handed to that owner like any other
//! command; for [`CONTENDED_REMEMBERED`] the next flows naming that account go there at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::RequestErrorKind;
use domain::AccountId;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::idempotency::IdempotencyKey;
use crate::metrics::Metrics;
use crate::outcome::Outcome;
use crate::ownership::{Ownership, Route, WriterId};
use crate::registry::{Registry, ANSWER_GRACE};
use crate::request::{CommandRequest, Intent};
use crate::{Error, Result};

/// The owner's deadline is this much earlier than its caller's, so that neither network time nor
/// a small difference between the writers' clocks lets the owner send anything after its caller
/// answered `outcome_unknown` (which happens [`ANSWER_GRACE`] after the caller's deadline).
const HANDOVER_MARGIN: Duration = Duration::from_millis(500);
/// Hand-overs one owner runs at once; more wait in its subscription (their deadlines run).
const HANDOVERS_CONCURRENT_MAX: usize = 1_024;
/// How long hand-overs in flight get to finish at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(6);
/// While a caller waits for its owner, it asks whether the owner is still there this long after
/// sending, then every [`LIVENESS_EVERY`].
const LIVENESS_FIRST: Duration = Duration::from_secs(1);
const LIVENESS_EVERY: Duration = Duration::from_millis(500);
/// How long one liveness question may take; no answer in time means "do not know".
const LIVENESS_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a flow into an account that another writer keeps busy goes straight to that
/// writer, after one of them lost its races for it here: the next ones would lose theirs too.
const CONTENDED_REMEMBERED: Duration = Duration::from_secs(2);
/// At most this many such accounts are remembered (the soonest forgotten make room).
const CONTENDED_REMEMBERED_MAX: usize = 1_024;

/// A command as handed to its account's owner (MessagePack, named fields). Unknown fields are
/// refused, not dropped: an owner of an older version must not run a command without a field a
/// newer caller relies on (it answers [`HandoverAnswer::NotTaken`] and the caller decides).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Handover {
    account_id: AccountId,
    intent: Intent,
    idempotency_key: Option<String>,
    correlation_id: String,
    transfer_id_generated: bool,
    traceparent: String,
    /// Milliseconds the owner has, from when it takes the command.
    budget_ms: u64,
    /// The same limit in Unix milliseconds, by the caller's clock.
    deadline_unix_ms: u64,
    /// Set (and sent) only when the command carries metadata: an owner of a build from before
    /// metadata refuses the unknown field (`NotTaken`) instead of running the command without
    /// it, and the caller decides it itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    carries_metadata: bool,
}

/// The owner's answer.
#[derive(Debug, Serialize, Deserialize)]
enum HandoverAnswer {
    /// The HTTP status and JSON body of the outcome.
    Done {
        status: u16,
        body: String,
    },
    Failed(Error),
    /// Not started: the owner could not read the hand-over (another version). The caller
    /// decides it itself.
    NotTaken(String),
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs commands where their account is owned. Cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    registry: Registry,
    /// `None`: ownership is off and every writer decides for any account.
    ownership: Option<Arc<Ownership>>,
    client: async_nats::Client,
    metrics: Arc<Metrics>,
    /// Accounts another writer owns and keeps busy, with when that was last seen.
    contended: Arc<std::sync::Mutex<HashMap<AccountId, tokio::time::Instant>>>,
}

impl Dispatcher {
    pub fn new(
        registry: Registry,
        ownership: Option<Arc<Ownership>>,
        client: async_nats::Client,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            registry,
            ownership,
            client,
            metrics,
            contended: Arc::default(),
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Runs `request` on its account's owner: here, or on the writer that holds its partition.
    pub async fn execute(&self, request: CommandRequest) -> Result<Outcome> {
        self.execute_until(
            request,
            tokio::time::Instant::now() + self.registry.call_timeout(),
        )
        .await
    }

    /// [`Dispatcher::execute`] with a deadline no later than `until` (a client's own deadline,
    /// when it is sooner than the writer's).
    pub async fn execute_until(
        &self,
        request: CommandRequest,
        until: tokio::time::Instant,
    ) -> Result<Outcome> {
        let now = tokio::time::Instant::now();
        let deadline = (now + self.registry.call_timeout()).min(until);
        let route = match &self.ownership {
            Some(ownership) => ownership.route(&request.account_id),
            None => Route::Here,
        };
        let answer = match route {
            Route::Here => self.decide_here(request, deadline).await,
            Route::Owner(owner) => self.hand_over(&owner, request, deadline).await,
        };
        // Counted where the client is answered: a hand-over's `outcome_unknown` once, here, not
        // also in the owner that ran it.
        if matches!(answer, Err(Error::OutcomeUnknown(_))) {
            self.metrics.commands_outcome_unknown.inc();
        }
        answer
    }

    /// Runs `request` on this writer's actors. A flow that keeps losing races here for an
    /// account another writer owns (that writer keeps it busy) comes back with nothing of it
    /// stored, and goes to that owner, where it takes turns with the account's own commands.
    async fn decide_here(
        &self,
        request: CommandRequest,
        deadline: tokio::time::Instant,
    ) -> Result<Outcome> {
        let Some(ownership) = &self.ownership else {
            return self.registry.execute_until(request, deadline).await;
        };
        if matches!(request.intent, Intent::Account(_) | Intent::Release(..)) {
            return self.registry.execute_until(request, deadline).await;
        }
        if let Some(owner) = self.remembered_owner(ownership, &request.intent) {
            self.metrics.handovers_contended.inc();
            return self.hand_over(&owner, request, deadline).await;
        }
        let mut here = request.clone();
        here.hand_over_when_contended = true;
        let accounts = match self.registry.execute_until(here, deadline).await {
            Err(Error::Contended(accounts)) => accounts,
            answer => return answer,
        };
        let owner = accounts
            .iter()
            .find_map(|account| match ownership.route(account) {
                Route::Owner(owner) => Some((account, owner)),
                Route::Here => None,
            });
        match owner {
            Some((account, owner)) => {
                self.remember_contended(account);
                self.metrics.handovers_contended.inc();
                tracing::debug!(account = %request.account_id, %owner, "a flow kept losing races for an account its owner keeps busy; handing it over");
                self.hand_over(&owner, request, deadline).await
            }
            // Ownership moved meanwhile: they are all this writer's now.
            None => self.registry.execute_until(request, deadline).await,
        }
    }

    /// The owner of an account `intent` names that was seen busy lately, while another writer
    /// still owns it.
    fn remembered_owner(&self, ownership: &Ownership, intent: &Intent) -> Option<WriterId> {
        let named = intent.accounts_named();
        let now = tokio::time::Instant::now();
        let contended = self
            .contended
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        named.into_iter().find_map(|account| {
            let seen = contended.get(account)?;
            if now.duration_since(*seen) > CONTENDED_REMEMBERED {
                return None;
            }
            match ownership.route(account) {
                Route::Owner(owner) => Some(owner),
                Route::Here => None,
            }
        })
    }

    fn remember_contended(&self, account: &AccountId) {
        let now = tokio::time::Instant::now();
        let mut contended = self
            .contended
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if contended.len() >= CONTENDED_REMEMBERED_MAX {
            contended.retain(|_, seen| now.duration_since(*seen) <= CONTENDED_REMEMBERED);
            if contended.len() >= CONTENDED_REMEMBERED_MAX {
                if let Some(oldest) = contended
                    .iter()
                    .min_by_key(|(_, seen)| **seen)
                    .map(|(account, _)| account.clone())
                {
                    contended.remove(&oldest);
                }
            }
        }
        contended.insert(account.clone(), now);
    }

    async fn hand_over(
        &self,
        owner: &WriterId,
        request: CommandRequest,
        deadline: tokio::time::Instant,
    ) -> Result<Outcome> {
        // Both clocks read together: what the owner is given is what is left of `deadline`
        // now, however long this process was paused before.
        let (now, now_wall) = (tokio::time::Instant::now(), SystemTime::now());
        let timeout = deadline.saturating_duration_since(now);
        // Short deadlines (tests, impatient deployments) keep three quarters of theirs.
        let budget = timeout.saturating_sub(HANDOVER_MARGIN.min(timeout / 4));
        let handover = Handover {
            account_id: request.account_id.clone(),
            intent: request.intent.clone(),
            idempotency_key: request
                .idempotency_key
                .as_ref()
                .map(|key| key.as_str().to_owned()),
            correlation_id: request.correlation_id.clone(),
            transfer_id_generated: request.transfer_id_generated,
            traceparent: request.trace.to_string(),
            budget_ms: budget.as_millis() as u64,
            deadline_unix_ms: unix_ms(now_wall + budget),
            carries_metadata: request.intent.carries_metadata(),
        };
        let payload = rmp_serde::to_vec_named(&handover)
            .map_err(|error| Error::Internal(format!("encode a hand-over: {error}")))?;
        let subject = eventlog::subject::owner_inbox(owner.as_str());
        // Signed, so that the writer NATS credential alone cannot hand an owner a command (the
        // owner would run and sign it); the answer is signed over this signature in turn.
        let log = self.registry.log();
        let signature = log
            .signer()
            .map(|key| key.sign_handover(&subject, &payload));
        let mut headers = async_nats::HeaderMap::new();
        if let Some(signature) = &signature {
            headers.insert(eventlog::signing::HEADER, signature.as_str());
        }
        let sent = self.client.send_request(
            subject,
            async_nats::Request::new()
                .payload(payload.into())
                .headers(headers)
                .timeout(Some(timeout + ANSWER_GRACE)),
        );
        tokio::pin!(sent);
        let mut checks =
            tokio::time::interval_at(tokio::time::Instant::now() + LIVENESS_FIRST, LIVENESS_EVERY);
        checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let keyed = request.idempotency_key.is_some();
        let sent = loop {
            tokio::select! {
                biased;
                sent = &mut sent => break sent,
                _ = checks.tick(), if keyed => {
                    if self.owner_gone(owner).await {
                        // An answer that arrived meanwhile is the answer.
                        if let Some(sent) = futures::FutureExt::now_or_never(&mut sent) {
                            break sent;
                        }
                        self.metrics.handovers_orphaned.inc();
                        tracing::info!(%owner, account = %request.account_id, "owner gone with a keyed command; deciding here (its key marker lets one of the two be stored)");
                        return self.registry.execute_until(request, deadline).await;
                    }
                }
            }
        };
        match sent {
            Ok(reply) => {
                self.metrics.commands_forwarded.inc();
                if let Some(trusted) = log.trusted_keys() {
                    // Anyone who may subscribe to writers' inboxes could answer first: "done"
                    // for a command never run, or "not taken" for one that ran (this writer
                    // would then run it a second time).
                    if let Err(error) = trusted.verify_answer(
                        signature.as_deref().unwrap_or_default(),
                        &reply.payload,
                        header_value(reply.headers.as_ref(), eventlog::signing::HEADER),
                    ) {
                        return Err(Error::OutcomeUnknown(format!(
                            "the answer for account {} from its owner {owner} carries no trusted \
                             signature ({error}): the command may or may not have run",
                            request.account_id
                        )));
                    }
                }
                match rmp_serde::from_slice::<HandoverAnswer>(&reply.payload) {
                    Ok(HandoverAnswer::Done { status, body }) => Ok(Outcome::Replayed {
                        status,
                        body: serde_json::from_str(&body).unwrap_or_default(),
                    }),
                    Ok(HandoverAnswer::Failed(error)) => Err(error),
                    Ok(HandoverAnswer::NotTaken(reason)) => {
                        self.metrics.forward_fallbacks.inc();
                        tracing::warn!(%owner, %reason, "the owner could not take a command; deciding here");
                        self.registry.execute_until(request, deadline).await
                    }
                    Err(error) => Err(Error::OutcomeUnknown(format!(
                        "the owner {owner} of account {} answered unreadably: {error}",
                        request.account_id
                    ))),
                }
            }
            Err(error) if error.kind() == RequestErrorKind::NoResponders => {
                // Nobody subscribes to the owner's subject: it has gone, and the command reached
                // no one. Decide here until the lease moves.
                self.metrics.forward_fallbacks.inc();
                tracing::info!(%owner, account = %request.account_id, "owner gone; deciding here");
                self.registry.execute_until(request, deadline).await
            }
            Err(error) => Err(Error::OutcomeUnknown(format!(
                "handing account {} to its owner {owner}: {error}",
                request.account_id
            ))),
        }
    }

    /// Whether nobody subscribes to `owner`'s liveness subject: its connection is gone, for good
    /// or while it reconnects. Silence or any other error says nothing (a frozen owner still
    /// holds its subscriptions).
    async fn owner_gone(&self, owner: &WriterId) -> bool {
        let asked = self
            .client
            .send_request(
                eventlog::subject::owner_alive(owner.as_str()),
                async_nats::Request::new().timeout(Some(LIVENESS_TIMEOUT)),
            )
            .await;
        matches!(asked, Err(error) if error.kind() == RequestErrorKind::NoResponders)
    }
}

/// Takes the commands other writers hand to this one, as the owner of their accounts, until
/// `stop`; then unsubscribes (new hand-overs find no responder and their callers decide) and
/// lets the ones taken finish and be answered, so a rolling restart costs no `outcome_unknown`.
pub async fn serve_handovers(
    client: async_nats::Client,
    registry: Registry,
    me: WriterId,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let subject = eventlog::subject::owner_inbox(me.as_str());
    // Subscribed before the hand-overs and answered as long as the connection lives (past the
    // shutdown drain, while actors may still run what they took): a caller that finds nobody
    // there knows this writer's connection is gone.
    let alive_subject = eventlog::subject::owner_alive(me.as_str());
    let alive = client
        .subscribe(alive_subject.clone())
        .await
        .map_err(|error| Error::Unavailable(format!("subscribe {alive_subject}: {error}")))?;
    client
        .flush()
        .await
        .map_err(|error| Error::Unavailable(format!("subscribe {alive_subject}: {error}")))?;
    tokio::spawn(answer_liveness(client.clone(), alive));
    let mut subscription = client
        .subscribe(subject.clone())
        .await
        .map_err(|error| Error::Unavailable(format!("subscribe {subject}: {error}")))?;
    tracing::info!(%subject, "taking commands for the accounts this writer owns");
    let permits = Arc::new(tokio::sync::Semaphore::new(HANDOVERS_CONCURRENT_MAX));
    let seen = Arc::new(std::sync::Mutex::new(SeenHandovers::default()));
    let mut taken = tokio::task::JoinSet::new();
    loop {
        let next = tokio::select! {
            message = subscription.next() => Some(message),
            _ = stop.wait_for(|stop| *stop) => None,
            Some(_) = taken.join_next(), if !taken.is_empty() => continue,
        };
        let Some(message) = next else { break };
        let Some(message) = message else {
            return Err(Error::Unavailable(format!("subscription {subject} ended")));
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let (registry, client, metrics, seen) = (
            registry.clone(),
            client.clone(),
            metrics.clone(),
            seen.clone(),
        );
        taken.spawn(async move {
            let _permit = permit;
            metrics.commands_taken_over.inc();
            answer_handover(&registry, &client, message, &seen).await;
        });
    }
    if let Err(error) = subscription.unsubscribe().await {
        tracing::debug!(%error, "unsubscribing from hand-overs at shutdown");
    }
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while taken.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("hand-overs still running at shutdown were abandoned");
    }
    if let Err(error) = client.flush().await {
        tracing::debug!(%error, "flushing hand-over answers at shutdown");
    }
    Ok(())
}

/// Answers "still here" on the liveness subject until the connection closes.
async fn answer_liveness(client: async_nats::Client, mut alive: async_nats::Subscriber) {
    while let Some(asked) = alive.next().await {
        if let Some(reply) = asked.reply {
            if let Err(error) = client.publish(reply, bytes::Bytes::new()).await {
                tracing::debug!(%error, "answering a liveness question");
            }
        }
    }
}

fn header_value<'a>(headers: Option<&'a async_nats::HeaderMap>, name: &str) -> Option<&'a str> {
    headers
        .and_then(|headers| headers.get(name))
        .map(|value| value.as_str())
}

/// Signatures of the hand-overs taken, until their deadline: a hand-over recorded by someone
/// who may read the owner's subject and sent again is not run twice.
#[derive(Default)]
struct SeenHandovers {
    signatures: std::collections::HashSet<String>,
    /// In the order taken, with their deadlines (Unix ms): the oldest are forgotten first.
    order: std::collections::VecDeque<(u64, String)>,
}

impl SeenHandovers {
    /// Records `signature`; false if it was taken before and is still within its deadline.
    fn first_time(&mut self, signature: &str, deadline_unix_ms: u64, now_unix_ms: u64) -> bool {
        while let Some((deadline, _)) = self.order.front() {
            if *deadline >= now_unix_ms {
                break;
            }
            if let Some((_, old)) = self.order.pop_front() {
                self.signatures.remove(&old);
            }
        }
        if !self.signatures.insert(signature.to_owned()) {
            return false;
        }
        self.order
            .push_back((deadline_unix_ms, signature.to_owned()));
        true
    }
}

/// Why a hand-over is not taken, if its signature is not a trusted writer's or it was taken
/// before (only checked when this writer has trusted keys).
fn refusal(
    registry: &Registry,
    message: &async_nats::Message,
    handover: &Handover,
    seen: &std::sync::Mutex<SeenHandovers>,
) -> Option<String> {
    let trusted = registry.log().trusted_keys()?;
    let signature = header_value(message.headers.as_ref(), eventlog::signing::HEADER);
    if let Err(error) =
        trusted.verify_handover(message.subject.as_str(), &message.payload, signature)
    {
        tracing::error!(account = %handover.account_id, %error, "a hand-over no trusted writer signed; not run");
        return Some(format!("untrusted hand-over: {error}"));
    }
    let mut seen = seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let now = unix_ms(SystemTime::now());
    (!seen.first_time(
        signature.unwrap_or_default(),
        handover.deadline_unix_ms,
        now,
    ))
    .then(|| "this hand-over was taken before".to_owned())
}

/// Runs one hand-over and sends its answer.
async fn answer_handover(
    registry: &Registry,
    client: &async_nats::Client,
    message: async_nats::Message,
    seen: &std::sync::Mutex<SeenHandovers>,
) {
    let answer = match rmp_serde::from_slice::<Handover>(&message.payload) {
        Ok(handover) => match refusal(registry, &message, &handover, seen) {
            Some(reason) => HandoverAnswer::NotTaken(reason),
            None => match take_over(registry, handover).await {
                Ok(outcome) => HandoverAnswer::Done {
                    status: outcome.status(),
                    body: outcome.body().to_string(),
                },
                Err(error) => HandoverAnswer::Failed(error),
            },
        },
        Err(error) => HandoverAnswer::NotTaken(format!("unreadable hand-over: {error}")),
    };
    let Some(reply) = message.reply else { return };
    match rmp_serde::to_vec_named(&answer) {
        Ok(body) => {
            let mut headers = async_nats::HeaderMap::new();
            if let Some(key) = registry.log().signer() {
                let request = header_value(message.headers.as_ref(), eventlog::signing::HEADER);
                headers.insert(
                    eventlog::signing::HEADER,
                    key.sign_answer(request.unwrap_or_default(), &body).as_str(),
                );
            }
            if let Err(error) = client
                .publish_with_headers(reply, headers, body.into())
                .await
            {
                tracing::warn!(%error, "could not answer a hand-over");
            }
        }
        Err(error) => tracing::error!(%error, "could not encode a hand-over answer"),
    }
}

/// What is left of a hand-over's time when the owner takes it at `now_unix_ms`: the budget or
/// what the caller's UTC deadline leaves, the smaller (zero: do not start it).
fn remaining(handover: &Handover, now_unix_ms: u64) -> Duration {
    let by_clock = handover.deadline_unix_ms.saturating_sub(now_unix_ms);
    Duration::from_millis(handover.budget_ms.min(by_clock))
}

/// Runs a hand-over here, within what remains of its caller's deadline.
async fn take_over(registry: &Registry, handover: Handover) -> Result<Outcome> {
    // Both clocks are read together, before anything else: a process paused between reading the
    // wall clock and fixing the deadline would otherwise grant the whole remainder again when it
    // resumes.
    let (taken_at, now_unix_ms) = (tokio::time::Instant::now(), unix_ms(SystemTime::now()));
    let remaining = remaining(&handover, now_unix_ms);
    if remaining.is_zero() {
        return Err(Error::Unavailable(
            "the command reached its deadline before its account's owner took it; not applied"
                .into(),
        ));
    }
    let key = IdempotencyKey::parse_optional(handover.idempotency_key.as_deref())?;
    let trace = trace_context::TraceParent::parse(&handover.traceparent)
        .unwrap_or_else(trace_context::TraceParent::new_root);
    let request = CommandRequest::new(
        handover.account_id,
        handover.intent,
        key,
        handover.correlation_id,
    )
    .with_generated_transfer_id(handover.transfer_id_generated)
    .with_trace(trace);
    registry.execute_until(request, taken_at + remaining).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_hand_over_is_taken_once_until_its_deadline() {
        let mut seen = SeenHandovers::default();
        assert!(seen.first_time("a", 1_000, 500));
        assert!(
            !seen.first_time("a", 1_000, 900),
            "a replay within the deadline"
        );
        assert!(seen.first_time("b", 2_000, 900));
        // Past a's deadline it is forgotten (and refused anyway: its time is up).
        assert!(seen.first_time("a", 3_000, 1_500));
        assert!(!seen.first_time("b", 2_000, 1_600));
        assert_eq!(seen.signatures.len(), seen.order.len());
    }

    fn handover() -> Handover {
        Handover {
            account_id: AccountId::parse("acc-1").unwrap(),
            intent: Intent::Account(domain::Command::Deposit {
                metadata: Default::default(),
                amount: domain::Amount::new(5).unwrap(),
                reference: Some("r".into()),
            }),
            idempotency_key: Some("k-1".into()),
            correlation_id: "c".into(),
            transfer_id_generated: false,
            traceparent: trace_context::TraceParent::new_root().to_string(),
            budget_ms: 9_500,
            deadline_unix_ms: 100_000,
            carries_metadata: false,
        }
    }

    /// A hand-over as a build from before metadata reads it: the same fields, unknown ones
    /// refused.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct HandoverBeforeMetadata {
        account_id: AccountId,
        intent: serde::de::IgnoredAny,
        idempotency_key: Option<String>,
        correlation_id: String,
        transfer_id_generated: bool,
        traceparent: String,
        budget_ms: u64,
        deadline_unix_ms: u64,
    }

    /// A command with metadata is not taken by an owner that would drop it; one without is
    /// read as before.
    #[test]
    fn an_owner_from_before_metadata_refuses_a_command_that_carries_some() {
        let plain = rmp_serde::to_vec_named(&handover()).unwrap();
        assert!(rmp_serde::from_slice::<HandoverBeforeMetadata>(&plain).is_ok());
        let mut labelled = handover();
        labelled.intent = Intent::Account(domain::Command::Deposit {
            metadata: domain::Metadata::new([("k".to_string(), "v".to_string())].into()).unwrap(),
            amount: domain::Amount::new(5).unwrap(),
            reference: None,
        });
        labelled.carries_metadata = labelled.intent.carries_metadata();
        let labelled = rmp_serde::to_vec_named(&labelled).unwrap();
        assert!(rmp_serde::from_slice::<HandoverBeforeMetadata>(&labelled).is_err());
        assert!(rmp_serde::from_slice::<Handover>(&labelled).is_ok());
    }

    #[test]
    fn a_hand_over_keeps_every_field_and_refuses_unknown_ones() {
        let bytes = rmp_serde::to_vec_named(&handover()).unwrap();
        let back: Handover = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back.intent, handover().intent);
        assert_eq!(back.idempotency_key.as_deref(), Some("k-1"));
        assert_eq!((back.budget_ms, back.deadline_unix_ms), (9_500, 100_000));
        // A newer writer's extra field is not silently dropped by this one.
        let mut newer = serde_json::to_value(handover()).unwrap();
        newer["fence"] = "x".into();
        let newer = rmp_serde::to_vec_named(&newer).unwrap();
        assert!(rmp_serde::from_slice::<Handover>(&newer).is_err());
    }

    #[test]
    fn errors_cross_a_hand_over_unchanged() {
        let refusal = Error::Rejected(domain::DomainError::InsufficientFunds {
            balance: 3,
            amount: 5,
            floor: 0,
        });
        let bytes = rmp_serde::to_vec_named(&HandoverAnswer::Failed(refusal.clone())).unwrap();
        match rmp_serde::from_slice::<HandoverAnswer>(&bytes).unwrap() {
            HandoverAnswer::Failed(error) => assert_eq!(error.problem(), refusal.problem()),
            _ => panic!("another answer"),
        }
    }

    #[test]
    fn the_owner_gets_the_smaller_of_budget_and_utc_deadline() {
        let handover = handover();
        assert_eq!(remaining(&handover, 0), Duration::from_millis(9_500));
        assert_eq!(remaining(&handover, 95_000), Duration::from_millis(5_000));
        // Woken up after its caller's deadline (a frozen owner): nothing left, not started.
        assert_eq!(remaining(&handover, 100_000), Duration::ZERO);
        assert_eq!(remaining(&handover, 250_000), Duration::ZERO);
    }
}
