//! Who may write the ledger: Ed25519 signatures on what writers store, made with a key that is
//! not the NATS credential.
//!
//! The hash chain (`Coffer-Chain`) shows that an account's history is whole, but anyone who may
//! append can compute it: a stolen writer NATS password could append a deposit with the right
//! chain value and spend it. So a writer signs each event's chain value (which covers the event's
//! account, type, version, payload and the whole history before it), and each snapshot's bytes,
//! with its signing key, in the `Coffer-Signature` header: `{key id}:{hex signature}`. Writers
//! (before they decide on an account), readers (before they serve it) and `coffer verify` check
//! them against the trusted public keys; what fails costs its account (`account_unreadable`),
//! and a snapshot that fails is ignored (the history is replayed).
//!
//! Key files are text, one key per line, `#` comments:
//! - a signing key (writers, `COFFER_SIGNING_KEY_FILE`): `{key id} {hex 32-byte seed}`;
//! - trusted keys (`COFFER_TRUSTED_KEYS_FILE`): `{key id} {hex 32-byte public key}`, optionally
//!   followed by `until={position}` (a retired or stolen key: events it signed after that
//!   position are refused), and at most one `unsigned-until {position}` line: events at or below
//!   it may carry no signature (a ledger written before signing was turned on).

use std::collections::HashMap;

use ed25519_dalek::{Signature, Signer};

/// The header that carries a signature.
pub const HEADER: &str = "Coffer-Signature";

/// What an event's signature covers: this, then its 64-character chain value.
const EVENT_CONTEXT: &[u8] = b"coffer-event-v1\n";
/// What a snapshot's signature covers: this, then the snapshot's stored bytes.
const SNAPSHOT_CONTEXT: &[u8] = b"coffer-snapshot-v1\n";
/// What a marker's signature covers (an id or key claimed, a transfer's record): this, its
/// subject, a newline and its payload.
const MARKER_CONTEXT: &[u8] = b"coffer-marker-v1\n";
/// What a hand-over's signature covers (a command one writer gives the owner of its account):
/// this, the owner's subject, a newline and the hand-over's bytes.
const HANDOVER_CONTEXT: &[u8] = b"coffer-handover-v1\n";
/// What a hand-over answer's signature covers: this, the hand-over's own signature, a newline
/// and the answer's bytes (so an answer belongs to one hand-over).
const ANSWER_CONTEXT: &[u8] = b"coffer-handover-answer-v1\n";

/// `context`, then `parts` joined by newlines: what a signature covers.
fn framed(context: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut message =
        Vec::with_capacity(context.len() + parts.iter().map(|part| part.len() + 1).sum::<usize>());
    message.extend_from_slice(context);
    for (index, part) in parts.iter().enumerate() {
        if index > 0 {
            message.push(b'\n');
        }
        message.extend_from_slice(part);
    }
    message
}

/// A key file that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct KeyError(String);

/// Why a signature is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("it carries no Coffer-Signature")]
    Missing,
    #[error("its Coffer-Signature is not `key-id:hex`")]
    Malformed,
    #[error("it is signed with key {0:?}, which is not trusted")]
    UnknownKey(String),
    #[error("it is signed with key {key:?}, trusted only up to position {until}")]
    Retired { key: String, until: u64 },
    #[error("its signature by key {0:?} does not match its content")]
    Invalid(String),
}

/// A key id: 1-64 characters of A-Z a-z 0-9 . _ -
fn key_id(text: &str) -> Result<String, KeyError> {
    let valid = !text.is_empty()
        && text.len() <= 64
        && text
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"._-".contains(&byte));
    if valid {
        Ok(text.to_owned())
    } else {
        Err(KeyError(format!(
            "key id {text:?}: 1-64 characters of A-Z a-z 0-9 . _ -"
        )))
    }
}

fn key_bytes(id: &str, text: &str) -> Result<[u8; 32], KeyError> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(text, &mut bytes)
        .map_err(|_| KeyError(format!("key {id}: expected 64 hex characters")))?;
    Ok(bytes)
}

/// Lines that say something: comments and blank lines dropped.
fn lines(text: &str) -> impl Iterator<Item = (usize, Vec<&str>)> {
    text.lines().enumerate().filter_map(|(index, line)| {
        let line = line.split('#').next().unwrap_or_default().trim();
        (!line.is_empty()).then(|| (index + 1, line.split_whitespace().collect()))
    })
}

/// Refuses keys a process that appends must not run with: a signing key without trusted keys
/// (it would sign on top of history it did not check), or trusted keys that do not list its
/// signing key, current (everyone else would refuse what it appends).
pub fn check_pair(
    signing: Option<&SigningKey>,
    trusted: Option<&TrustedKeys>,
) -> Result<(), KeyError> {
    match (signing, trusted) {
        (None, None) => Ok(()),
        (Some(_), None) => Err(KeyError(
            "COFFER_SIGNING_KEY_FILE is set without COFFER_TRUSTED_KEYS_FILE: what this process \
             signs would rest on history and snapshots it did not check"
                .into(),
        )),
        (None, Some(_)) => Err(KeyError(
            "COFFER_TRUSTED_KEYS_FILE is set without COFFER_SIGNING_KEY_FILE: what this process \
             appends would be refused"
                .into(),
        )),
        (Some(key), Some(trusted)) if !trusted.trusts(key) => Err(KeyError(format!(
            "the signing key {:?} is not in COFFER_TRUSTED_KEYS_FILE (or is retired there): add \
             its line `{}`",
            key.id(),
            key.public_line()
        ))),
        (Some(_), Some(_)) => Ok(()),
    }
}

/// A writer's signing key.
pub struct SigningKey {
    id: String,
    key: ed25519_dalek::SigningKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "SigningKey({})", self.id)
    }
}

impl SigningKey {
    /// A key from its id and 32 secret bytes (from a random source: `coffer keys generate`).
    pub fn from_seed(id: &str, seed: [u8; 32]) -> Result<Self, KeyError> {
        Ok(Self {
            id: key_id(id)?,
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        })
    }

    /// Reads a signing key file: one line, `{key id} {hex seed}`.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let mut found = lines(text);
        let (line, fields) = found
            .next()
            .ok_or_else(|| KeyError("the signing key file holds no key".into()))?;
        if found.next().is_some() {
            return Err(KeyError(
                "the signing key file holds more than one key".into(),
            ));
        }
        let [id, seed] = fields[..] else {
            return Err(KeyError(format!("line {line}: expected `key-id hex-seed`")));
        };
        Self::from_seed(id, key_bytes(id, seed)?)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The file line of this key: `{key id} {hex seed}`.
    pub fn secret_line(&self) -> String {
        format!("{} {}", self.id, hex::encode(self.key.to_bytes()))
    }

    /// The trusted-keys line of this key: `{key id} {hex public key}`.
    pub fn public_line(&self) -> String {
        format!(
            "{} {}",
            self.id,
            hex::encode(self.key.verifying_key().to_bytes())
        )
    }

    fn sign(&self, context: &[u8], content: &[u8]) -> String {
        self.sign_framed(&framed(context, &[content]))
    }

    fn sign_framed(&self, message: &[u8]) -> String {
        format!(
            "{}:{}",
            self.id,
            hex::encode(self.key.sign(message).to_bytes())
        )
    }

    /// The `Coffer-Signature` of an event whose `Coffer-Chain` is `chain`.
    pub fn sign_event(&self, chain: &str) -> String {
        self.sign(EVENT_CONTEXT, chain.as_bytes())
    }

    /// The `Coffer-Signature` of a snapshot stored as `payload`.
    pub fn sign_snapshot(&self, payload: &[u8]) -> String {
        self.sign(SNAPSHOT_CONTEXT, payload)
    }

    /// The `Coffer-Signature` of a marker stored on `subject` as `payload`.
    pub fn sign_marker(&self, subject: &str, payload: &[u8]) -> String {
        self.sign_framed(&framed(MARKER_CONTEXT, &[subject.as_bytes(), payload]))
    }

    /// The `Coffer-Signature` of a hand-over sent to `subject` as `payload`.
    pub fn sign_handover(&self, subject: &str, payload: &[u8]) -> String {
        self.sign_framed(&framed(HANDOVER_CONTEXT, &[subject.as_bytes(), payload]))
    }

    /// The `Coffer-Signature` of the answer `payload` to the hand-over signed `request`.
    pub fn sign_answer(&self, request: &str, payload: &[u8]) -> String {
        self.sign_framed(&framed(ANSWER_CONTEXT, &[request.as_bytes(), payload]))
    }
}

#[derive(Debug, Clone)]
struct Trusted {
    key: ed25519_dalek::VerifyingKey,
    until: Option<u64>,
}

/// The public keys whose signatures are trusted.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: HashMap<String, Trusted>,
    /// Events at or below this position may be unsigned (0: none).
    unsigned_until: u64,
}

impl TrustedKeys {
    /// Reads a trusted keys file (see the module's documentation).
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let mut trusted = Self::default();
        let mut unsigned_seen = false;
        for (line, fields) in lines(text) {
            match fields[..] {
                ["unsigned-until", position] if !unsigned_seen => {
                    unsigned_seen = true;
                    trusted.unsigned_until = position.parse().map_err(|_| {
                        KeyError(format!("line {line}: unsigned-until needs a position"))
                    })?;
                }
                [id, public, ref rest @ ..] if rest.len() <= 1 && id != "unsigned-until" => {
                    let id = key_id(id)?;
                    let key = ed25519_dalek::VerifyingKey::from_bytes(&key_bytes(&id, public)?)
                        .map_err(|_| KeyError(format!("key {id}: not an Ed25519 public key")))?;
                    let until = match rest.first() {
                        None => None,
                        Some(field) => Some(
                            field
                                .strip_prefix("until=")
                                .and_then(|position| position.parse().ok())
                                .ok_or_else(|| {
                                    KeyError(format!("line {line}: expected until=POSITION"))
                                })?,
                        ),
                    };
                    // The same public key twice (say retired under one id, current under another)
                    // would let it sign past its `until`.
                    if trusted.keys.values().any(|other| other.key == key) {
                        return Err(KeyError(format!(
                            "line {line}: key {id}'s public key is listed under another id too"
                        )));
                    }
                    if trusted
                        .keys
                        .insert(id.clone(), Trusted { key, until })
                        .is_some()
                    {
                        return Err(KeyError(format!("line {line}: key {id} is listed twice")));
                    }
                }
                _ => {
                    return Err(KeyError(format!(
                        "line {line}: expected `key-id hex-public-key [until=POSITION]` or one \
                         `unsigned-until POSITION`"
                    )))
                }
            }
        }
        if trusted.keys.is_empty() {
            return Err(KeyError("the trusted keys file lists no key".into()));
        }
        Ok(trusted)
    }

    /// Whether `key` is trusted as this signing key's public half (a writer checks its own key
    /// before it appends anything the others would refuse).
    pub fn trusts(&self, key: &SigningKey) -> bool {
        self.keys.get(key.id()).is_some_and(|trusted| {
            trusted.key == key.key.verifying_key() && trusted.until.is_none()
        })
    }

    fn verify(
        &self,
        position: Option<u64>,
        context: &[u8],
        content: &[u8],
        signature: Option<&str>,
    ) -> Result<(), SignatureError> {
        self.verify_framed(position, &framed(context, &[content]), signature)
    }

    fn verify_framed(
        &self,
        position: Option<u64>,
        message: &[u8],
        signature: Option<&str>,
    ) -> Result<(), SignatureError> {
        let signature = signature.ok_or(SignatureError::Missing)?;
        let (id, hex_signature) = signature.split_once(':').ok_or(SignatureError::Malformed)?;
        let mut bytes = [0u8; 64];
        hex::decode_to_slice(hex_signature, &mut bytes).map_err(|_| SignatureError::Malformed)?;
        let trusted = self
            .keys
            .get(id)
            .ok_or_else(|| SignatureError::UnknownKey(id.to_owned()))?;
        if let (Some(until), Some(position)) = (trusted.until, position) {
            if position > until {
                return Err(SignatureError::Retired {
                    key: id.to_owned(),
                    until,
                });
            }
        }
        trusted
            .key
            .verify_strict(message, &Signature::from_bytes(&bytes))
            .map_err(|_| SignatureError::Invalid(id.to_owned()))
    }

    /// Checks the signature of the event at `position` whose stored `Coffer-Chain` is `chain`.
    /// The chain value itself must be checked against the event and its account's history
    /// (`crate::chain`): the signature vouches for the value, the value for the content.
    pub fn verify_event(
        &self,
        position: u64,
        chain: Option<&str>,
        signature: Option<&str>,
    ) -> Result<(), SignatureError> {
        if position <= self.unsigned_until && signature.is_none() {
            return Ok(());
        }
        let chain = chain.ok_or(SignatureError::Missing)?;
        self.verify(Some(position), EVENT_CONTEXT, chain.as_bytes(), signature)
    }

    /// Checks the signature of a snapshot stored as `payload`. A retired key's snapshots are
    /// refused whatever their position (replaying the history costs only time).
    pub fn verify_snapshot(
        &self,
        payload: &[u8],
        signature: Option<&str>,
    ) -> Result<(), SignatureError> {
        self.verify(Some(u64::MAX), SNAPSHOT_CONTEXT, payload, signature)
    }

    /// Checks the signature of the marker stored at `position` on `subject` as `payload`.
    /// Markers below `unsigned-until` may be unsigned, like events.
    pub fn verify_marker(
        &self,
        position: u64,
        subject: &str,
        payload: &[u8],
        signature: Option<&str>,
    ) -> Result<(), SignatureError> {
        if position <= self.unsigned_until && signature.is_none() {
            return Ok(());
        }
        self.verify_framed(
            Some(position),
            &framed(MARKER_CONTEXT, &[subject.as_bytes(), payload]),
            signature,
        )
    }

    /// Checks a hand-over received on `subject` (live: a retired key signs none).
    pub fn verify_handover(
        &self,
        subject: &str,
        payload: &[u8],
        signature: Option<&str>,
    ) -> Result<(), SignatureError> {
        self.verify_framed(
            Some(u64::MAX),
            &framed(HANDOVER_CONTEXT, &[subject.as_bytes(), payload]),
            signature,
        )
    }

    /// Checks the answer `payload` to the hand-over signed `request`.
    pub fn verify_answer(
        &self,
        request: &str,
        payload: &[u8],
        signature: Option<&str>,
    ) -> Result<(), SignatureError> {
        self.verify_framed(
            Some(u64::MAX),
            &framed(ANSWER_CONTEXT, &[request.as_bytes(), payload]),
            signature,
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(id: &str, byte: u8) -> SigningKey {
        SigningKey::from_seed(id, [byte; 32]).unwrap()
    }

    fn trusting(lines: &[String]) -> TrustedKeys {
        TrustedKeys::parse(&lines.join("\n")).unwrap()
    }

    const CHAIN: &str = "c727a780be2200fdffce67ec6d354196670f191066c10a1517646d3a942cf3cb";

    #[test]
    fn an_event_signed_by_a_trusted_key_verifies_and_nothing_else_does() {
        let writer = key("writer-1", 7);
        let trusted = trusting(&[writer.public_line()]);
        let signature = writer.sign_event(CHAIN);
        assert!(signature.starts_with("writer-1:"));
        assert_eq!(
            trusted.verify_event(5, Some(CHAIN), Some(&signature)),
            Ok(())
        );
        // Another chain value (another event, or the same event elsewhere in a history).
        let other = CHAIN.replace('c', "d");
        assert_eq!(
            trusted.verify_event(5, Some(&other), Some(&signature)),
            Err(SignatureError::Invalid("writer-1".into()))
        );
        assert_eq!(
            trusted.verify_event(5, Some(CHAIN), None),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            trusted.verify_event(5, None, Some(&signature)),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            trusted.verify_event(5, Some(CHAIN), Some("writer-1")),
            Err(SignatureError::Malformed)
        );
        // A key that is not trusted, even under a trusted key's id.
        let forger = key("writer-1", 8);
        assert_eq!(
            trusted.verify_event(5, Some(CHAIN), Some(&forger.sign_event(CHAIN))),
            Err(SignatureError::Invalid("writer-1".into()))
        );
        let stranger = key("stranger", 9);
        assert_eq!(
            trusted.verify_event(5, Some(CHAIN), Some(&stranger.sign_event(CHAIN))),
            Err(SignatureError::UnknownKey("stranger".into()))
        );
        // A snapshot signature is not an event signature.
        assert!(trusted
            .verify_event(
                5,
                Some(CHAIN),
                Some(&writer.sign_snapshot(CHAIN.as_bytes()))
            )
            .is_err());
    }

    #[test]
    fn a_retired_key_is_trusted_up_to_its_position_and_unsigned_events_up_to_theirs() {
        let old = key("old", 1);
        let new = key("new", 2);
        let trusted = trusting(&[
            "# rotated at 100; unsigned history up to 10".into(),
            format!("{} until=100", old.public_line()),
            new.public_line(),
            "unsigned-until 10".into(),
        ]);
        assert_eq!(
            trusted.verify_event(100, Some(CHAIN), Some(&old.sign_event(CHAIN))),
            Ok(())
        );
        assert_eq!(
            trusted.verify_event(101, Some(CHAIN), Some(&old.sign_event(CHAIN))),
            Err(SignatureError::Retired {
                key: "old".into(),
                until: 100
            })
        );
        assert_eq!(
            trusted.verify_event(101, Some(CHAIN), Some(&new.sign_event(CHAIN))),
            Ok(())
        );
        assert_eq!(trusted.verify_event(10, Some(CHAIN), None), Ok(()));
        assert_eq!(
            trusted.verify_event(11, Some(CHAIN), None),
            Err(SignatureError::Missing)
        );
        assert!(trusted.trusts(&new));
        assert!(!trusted.trusts(&old), "a retired key signs nothing new");
        assert!(!trusted.trusts(&key("new", 3)));
    }

    #[test]
    fn markers_hand_overs_and_answers_are_bound_to_their_subject_and_request() {
        let writer = key("w", 4);
        let trusted = trusting(&[writer.public_line()]);
        let marker = writer.sign_marker("coffer.ids.transfer.t", b"record");
        assert_eq!(
            trusted.verify_marker(9, "coffer.ids.transfer.t", b"record", Some(&marker)),
            Ok(())
        );
        assert!(trusted
            .verify_marker(9, "coffer.ids.transfer.u", b"record", Some(&marker))
            .is_err());
        assert!(trusted
            .verify_marker(9, "coffer.ids.transfer.t", b"other", Some(&marker))
            .is_err());
        assert!(trusted
            .verify_marker(9, "coffer.ids.transfer.t", b"record", None)
            .is_err());
        let handover = writer.sign_handover("coffer.owner.w-1", b"deposit");
        assert_eq!(
            trusted.verify_handover("coffer.owner.w-1", b"deposit", Some(&handover)),
            Ok(())
        );
        assert!(trusted
            .verify_handover("coffer.owner.w-2", b"deposit", Some(&handover))
            .is_err());
        // A signature of one kind is not one of another.
        assert!(trusted
            .verify_marker(9, "coffer.owner.w-1", b"deposit", Some(&handover))
            .is_err());
        let answer = writer.sign_answer(&handover, b"done");
        assert_eq!(
            trusted.verify_answer(&handover, b"done", Some(&answer)),
            Ok(())
        );
        let other_request = writer.sign_handover("coffer.owner.w-1", b"withdraw");
        assert!(trusted
            .verify_answer(&other_request, b"done", Some(&answer))
            .is_err());
    }

    #[test]
    fn snapshots_verify_over_their_bytes() {
        let writer = key("w", 4);
        let trusted = trusting(&[writer.public_line()]);
        let signature = writer.sign_snapshot(b"state");
        assert_eq!(trusted.verify_snapshot(b"state", Some(&signature)), Ok(()));
        assert!(trusted.verify_snapshot(b"other", Some(&signature)).is_err());
        assert!(trusted.verify_snapshot(b"state", None).is_err());
    }

    #[test]
    fn key_files_round_trip_and_bad_ones_are_refused_with_the_line() {
        let writer = key("writer-1", 5);
        let read =
            SigningKey::parse(&format!("# the writers' key\n{}\n", writer.secret_line())).unwrap();
        assert_eq!(read.public_line(), writer.public_line());
        assert!(SigningKey::parse("").is_err());
        assert!(SigningKey::parse("a 00\n").is_err());
        assert!(SigningKey::parse(&format!("{0}\n{0}", writer.secret_line())).is_err());
        assert!(SigningKey::parse(&format!("bad/id {}", "00".repeat(32))).is_err());
        for bad in [
            String::new(),
            "unsigned-until 5".into(),
            format!("{} until=x", writer.public_line()),
            format!("{0}\n{0}", writer.public_line()),
            format!(
                "{}\nunsigned-until 1\nunsigned-until 2",
                writer.public_line()
            ),
            "k zz".into(),
            format!(
                "{}\nother {}",
                writer.public_line(),
                writer.public_line().split_once(' ').unwrap().1
            ),
        ] {
            assert!(TrustedKeys::parse(&bad).is_err(), "{bad:?}");
        }
        let error = TrustedKeys::parse(&format!("{}\nk 1 2 3", writer.public_line())).unwrap_err();
        assert!(error.to_string().contains("line 2"), "{error}");
    }
}
