//! The hash chain (contract v2, "Audit and integrity"): every event carries `Coffer-Chain`, the
//! lowercase hex SHA-256 of the bytes `prev`, `account_id`, `event_type`, `version` and `payload`
//! joined by newlines, where `prev` is the chain value of the account's previous event (64 `0`s
//! for its first) and `payload` the stored MessagePack bytes. A changed, inserted, removed or
//! reordered event breaks the chain of its account from there on.

use domain::{AccountId, Event};
use sha2::{Digest, Sha256};

use crate::{codec, Result};

/// The `prev` of an account's first event.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The chain value of an event, given the raw parts as stored.
pub fn link(
    previous: &str,
    account: &str,
    event_type: &str,
    version: u32,
    payload: &[u8],
) -> String {
    let mut hasher = Sha256::new();
    hasher.update(previous.as_bytes());
    hasher.update(b"\n");
    hasher.update(account.as_bytes());
    hasher.update(b"\n");
    hasher.update(event_type.as_bytes());
    hasher.update(b"\n");
    hasher.update(version.to_string().as_bytes());
    hasher.update(b"\n");
    hasher.update(payload);
    hex::encode(hasher.finalize())
}

/// The chain value `event` will carry when appended to `account` after an event whose chain
/// value is `previous`: the same encoding the append uses.
pub fn next(previous: &str, account: &AccountId, event: &Event) -> Result<String> {
    let (event_type, version, payload) = codec::encode(event)?;
    Ok(link(
        previous,
        account.as_str(),
        event_type,
        version,
        &payload,
    ))
}

/// Recomputes chains event by event and remembers, per account, the first position whose
/// stored value is not the one its predecessor implies.
#[derive(Debug, Default)]
pub struct Verifier {
    /// Per account: the chain value the next event must build on (the stored one, so that one
    /// break is reported once and later events are checked against what is there).
    last: std::collections::HashMap<String, String>,
    /// Per broken account: the first position that does not match.
    pub first_breaks: std::collections::BTreeMap<String, u64>,
    pub events_checked: u64,
}

impl Verifier {
    /// Checks one event read back from the stream; returns whether it matches its chain.
    pub fn check_recorded(&mut self, recorded: &crate::RecordedEvent) -> bool {
        self.check(
            recorded.account_id.as_str(),
            recorded.position,
            recorded.event.event_type(),
            recorded.version,
            &recorded.payload,
            recorded.chain.as_deref(),
        )
    }

    /// Checks one stored event; returns whether it matches its chain.
    pub fn check(
        &mut self,
        account: &str,
        position: u64,
        event_type: &str,
        version: u32,
        payload: &[u8],
        stored: Option<&str>,
    ) -> bool {
        self.events_checked += 1;
        let previous = self.last.get(account).map_or(GENESIS, String::as_str);
        let expected = link(previous, account, event_type, version, payload);
        let intact = stored == Some(expected.as_str());
        if !intact {
            self.first_breaks
                .entry(account.to_owned())
                .or_insert(position);
        }
        self.last
            .insert(account.to_owned(), stored.unwrap_or(&expected).to_owned());
        intact
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_is_sha256_of_the_contract_layout() {
        // Independently computed (Python hashlib over 64 zeros, "a", "deposited", "1" and the
        // payload "x", joined by newlines).
        let value = link(GENESIS, "a", "deposited", 1, b"x");
        assert_eq!(value.len(), 64);
        assert_eq!(
            value,
            "c727a780be2200fdffce67ec6d354196670f191066c10a1517646d3a942cf3cb"
        );
        assert_ne!(link(&value, "a", "deposited", 1, b"x"), value);
    }

    #[test]
    fn the_verifier_reports_the_first_break_per_account() {
        let mut verifier = Verifier::default();
        let first = link(GENESIS, "a", "deposited", 1, b"1");
        assert!(verifier.check("a", 1, "deposited", 1, b"1", Some(&first)));
        assert!(!verifier.check("a", 2, "deposited", 1, b"2", Some("forged")));
        // Later events are checked against what is stored, so one forgery is reported once.
        let third = link("forged", "a", "deposited", 1, b"3");
        assert!(verifier.check("a", 3, "deposited", 1, b"3", Some(&third)));
        assert!(!verifier.check("b", 4, "deposited", 1, b"1", None));
        assert_eq!(
            verifier.first_breaks.into_iter().collect::<Vec<_>>(),
            vec![("a".to_owned(), 2), ("b".to_owned(), 4)]
        );
    }
}
