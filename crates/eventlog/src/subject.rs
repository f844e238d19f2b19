//! Subjects: `coffer.events.{account_id}.{event_type}`. Account ids are restricted to
//! `[A-Za-z0-9_-]`, so they are always a single subject token.

use domain::AccountId;

pub const EVENTS_PREFIX: &str = "coffer.events";
/// Every event in the stream.
pub const ALL_EVENTS: &str = "coffer.events.>";

pub fn event(account: &AccountId, event_type: &str) -> String {
    format!("{EVENTS_PREFIX}.{account}.{event_type}")
}

/// All of one account's events: the scope of its optimistic concurrency check.
pub fn account_filter(account: &AccountId) -> String {
    format!("{EVENTS_PREFIX}.{account}.>")
}

/// One event type across all accounts.
pub fn type_filter(event_type: &str) -> String {
    format!("{EVENTS_PREFIX}.*.{event_type}")
}

/// Splits a subject into `(account_id, event_type)`.
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
        assert_eq!(parse(&subject), Some(("acc-1", "deposited")));
        assert_eq!(parse("coffer.cmd.acc-1.deposit"), None);
        assert_eq!(parse("coffer.events.a.b.c"), None);
    }
}
