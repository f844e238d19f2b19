//! Subjects. Writers append on `coffer.append.{account_id}.{event_type}`; the stream stores each
//! event as `coffer.events.{account_id}.{event_type}` (a subject transform) and republishes it there
//! once stored, so core subscribers of `coffer.events.>` see only committed events. Markers live
//! under `coffer.ids.>`, outside the events, and are never republished. Account and transfer ids
//! are restricted to `[A-Za-z0-9_-]`, so they are always a single subject token.

use domain::{AccountId, TransferId};

pub const EVENTS_PREFIX: &str = "coffer.events";
pub const APPEND_PREFIX: &str = "coffer.append";
/// Every stored event.
pub const ALL_EVENTS: &str = "coffer.events.>";
/// What writers publish events on: the stream's ingest subjects for events.
pub const ALL_APPENDS: &str = "coffer.append.>";
/// Markers: idempotency keys and transfer-id claims.
pub const ALL_MARKERS: &str = "coffer.ids.>";
/// Messages scheduled with the stream (`Nats-Schedule`): hold expiries.
pub const ALL_SCHEDULES: &str = "coffer.schedules.>";
/// What the schedules deliver when they fire: `coffer.due.hold-expiry.{from}.{hold_id}`.
pub const ALL_DUE: &str = "coffer.due.>";
/// Account snapshots, stream COFFER_SNAPSHOTS: `coffer.snapshots.{account_id}`.
pub const ALL_SNAPSHOTS: &str = "coffer.snapshots.>";
/// Due hold expiries, for the writers' expiry consumer.
pub const DUE_HOLD_EXPIRIES: &str = "coffer.due.hold-expiry.>";
/// Commands handed by one writer to the writer that owns their account (core NATS
/// request-reply, never stored): `coffer.owner.{writer_id}`.
pub const ALL_OWNER_INBOXES: &str = "coffer.owner.>";

/// Where the writer `writer_id` takes the commands other writers hand it.
pub fn owner_inbox(writer_id: &str) -> String {
    format!("coffer.owner.{writer_id}")
}

/// Where a writer answers "still here" while it may still answer hand-overs it took.
pub fn owner_alive(writer_id: &str) -> String {
    format!("coffer.owner.{writer_id}.alive")
}

/// The subject an event of `account` is appended on.
pub fn append(account: &AccountId, event_type: &str) -> String {
    format!("{APPEND_PREFIX}.{account}.{event_type}")
}

/// The subject an event of `account` is stored and republished on.
pub fn event(account: &AccountId, event_type: &str) -> String {
    format!("{EVENTS_PREFIX}.{account}.{event_type}")
}

/// All of one account's events: the scope of its optimistic concurrency check.
pub fn account_filter(account: &AccountId) -> String {
    format!("{EVENTS_PREFIX}.{account}.>")
}

/// Where `account`'s snapshot is kept.
pub fn snapshot(account: &AccountId) -> String {
    format!("coffer.snapshots.{account}")
}

/// One event type across all accounts.
pub fn type_filter(event_type: &str) -> String {
    format!("{EVENTS_PREFIX}.*.{event_type}")
}

/// The marker of an `Idempotency-Key` on `account`; `key_digest` is a hex digest of the key, so
/// any printable key fits in one subject token.
pub fn key_marker(account: &AccountId, key_digest: &str) -> String {
    format!("coffer.ids.key.{account}.{key_digest}")
}

/// The marker that claims a transfer id (or hold id: they share one namespace) forever.
pub fn transfer_marker(transfer_id: &TransferId) -> String {
    format!("coffer.ids.transfer.{transfer_id}")
}

/// The marker that records, forever, that a transfer or transaction was reversed (and by which
/// transaction): written in the reversal's own atomic batch, on the condition that the subject
/// holds nothing yet, so at most one reversal of anything is ever stored.
pub fn reversal_marker(original: &TransferId) -> String {
    format!("coffer.ids.reversal.{original}")
}

/// The schedule of a hold's expiry: one per account, hold id and expiry time, so an attempt
/// refused on one account (or retried with another time) never stands in for another's.
pub fn hold_expiry_schedule(from: &AccountId, hold_id: &TransferId, expires_at: i64) -> String {
    format!("coffer.schedules.hold-expiry.{from}.{hold_id}.{expires_at}")
}

/// Where a hold's expiry is delivered when it is due.
pub fn hold_expiry_due(from: &AccountId, hold_id: &TransferId) -> String {
    format!("coffer.due.hold-expiry.{from}.{hold_id}")
}

/// Splits a due hold expiry subject into `(from, hold_id)`.
pub fn parse_hold_expiry_due(subject: &str) -> Option<(&str, &str)> {
    let rest = subject.strip_prefix("coffer.due.hold-expiry.")?;
    let (from, hold_id) = rest.split_once('.')?;
    (!hold_id.contains('.')).then_some((from, hold_id))
}

/// Splits a stored event subject into `(account_id, event_type)`.
pub fn parse(subject: &str) -> Option<(&str, &str)> {
    let rest = subject.strip_prefix(EVENTS_PREFIX)?.strip_prefix('.')?;
    let (account, event_type) = rest.split_once('.')?;
    (!event_type.contains('.')).then_some((account, event_type))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_round_trip() {
        let account = AccountId::parse("acc-1").unwrap();
        let subject = event(&account, "deposited");
        assert_eq!(subject, "coffer.events.acc-1.deposited");
        assert_eq!(
            append(&account, "deposited"),
            "coffer.append.acc-1.deposited"
        );
        assert_eq!(parse(&subject), Some(("acc-1", "deposited")));
        assert_eq!(parse("coffer.cmd.acc-1.deposit"), None);
        assert_eq!(parse("coffer.events.a.b.c"), None);
        assert_eq!(parse(&key_marker(&account, "ab12")), None);
        let hold = TransferId::parse("h-1").unwrap();
        assert_eq!(
            parse_hold_expiry_due(&hold_expiry_due(&account, &hold)),
            Some(("acc-1", "h-1"))
        );
    }
}
