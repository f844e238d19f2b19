//! Validated values. Each is built by `parse`/`new` returning a `Result`, so an invalid value
//! cannot exist past the edge that received it.

use std::fmt;

/// Largest amount accepted: 2^53-1, the largest integer every JSON parser holds exactly.
pub const AMOUNT_MAX: u64 = 9_007_199_254_740_991;
/// Identifiers are used in NATS subjects and URLs, so they are short and need no escaping.
pub const IDENTIFIER_LENGTH_MAX: usize = 64;

/// Why a value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("{field} must be 1-{IDENTIFIER_LENGTH_MAX} characters of A-Z, a-z, 0-9, '_' or '-'")]
    Identifier { field: &'static str },
    #[error("currency must be three upper-case letters (ISO 4217 style), got {0:?}")]
    Currency(String),
    #[error("amount must be an integer from 1 to {AMOUNT_MAX}, got {0}")]
    Amount(i128),
    #[error("overdraft_limit must be an integer from 0 to {AMOUNT_MAX}, got {0}")]
    OverdraftLimit(i128),
    #[error("metadata: {0}")]
    Metadata(String),
}

fn is_identifier(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= IDENTIFIER_LENGTH_MAX
        && text
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-')
}

macro_rules! identifier {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub fn parse(text: &str) -> Result<Self, ValueError> {
                if is_identifier(text) {
                    Ok(Self(text.to_owned()))
                } else {
                    Err(ValueError::Identifier { field: $field })
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str(&self.0)
            }
        }
    };
}

identifier!(
    /// An account's id: 1-64 of `[A-Za-z0-9_-]`, safe as a NATS subject token.
    AccountId,
    "account_id"
);
identifier!(
    /// A transfer's id: 1-64 of `[A-Za-z0-9_-]`; it is also the transfer's idempotency key.
    TransferId,
    "transfer_id"
);

/// A three-letter upper-case currency code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency([u8; 3]);

impl Currency {
    pub fn parse(text: &str) -> Result<Self, ValueError> {
        match text.as_bytes() {
            [a, b, c] if [a, b, c].iter().all(|byte| byte.is_ascii_uppercase()) => {
                Ok(Self([*a, *b, *c]))
            }
            _ => Err(ValueError::Currency(text.to_owned())),
        }
    }

    pub fn as_str(&self) -> &str {
        // The bytes are checked to be ASCII upper-case letters at construction, so they are UTF-8.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// A positive amount of minor units, at most [`AMOUNT_MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Amount(u64);

impl Amount {
    pub fn new(minor_units: i128) -> Result<Self, ValueError> {
        if (1..=AMOUNT_MAX as i128).contains(&minor_units) {
            Ok(Self(minor_units as u64))
        } else {
            Err(ValueError::Amount(minor_units))
        }
    }

    pub fn minor_units(self) -> u64 {
        self.0
    }

    /// The amount as a signed value; always exact because it is at most 2^53-1.
    pub fn signed(self) -> i64 {
        self.0 as i64
    }
}

/// How far below zero a balance may go, in minor units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct OverdraftLimit(u64);

impl OverdraftLimit {
    pub fn new(minor_units: i128) -> Result<Self, ValueError> {
        if (0..=AMOUNT_MAX as i128).contains(&minor_units) {
            Ok(Self(minor_units as u64))
        } else {
            Err(ValueError::OverdraftLimit(minor_units))
        }
    }

    pub fn minor_units(self) -> u64 {
        self.0
    }

    /// The lowest balance allowed: `-limit`. Exact because the limit is at most 2^53-1.
    pub fn floor(self) -> i64 {
        -(self.0 as i64)
    }
}

/// Values arrive in request bodies, so each one deserializes only through its validation: a
/// body that names a bad value never reaches a command. The messages leave out the field's name,
/// which the caller's error path supplies (`to: expected ...`). Each serializes as its text or
/// number.
mod serde_impls {
    use std::fmt;

    use serde::de::{Error, Visitor};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::*;

    macro_rules! as_text {
        ($($name:ident),*) => {$(
            impl Serialize for $name {
                fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                    serializer.serialize_str(self.as_str())
                }
            }
        )*};
    }
    as_text!(AccountId, TransferId, Currency);

    impl Serialize for Amount {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.serialize_u64(self.0)
        }
    }

    impl Serialize for OverdraftLimit {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.serialize_u64(self.0)
        }
    }

    fn identifier<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
        let text = String::deserialize(deserializer)?;
        if is_identifier(&text) {
            Ok(text)
        } else {
            Err(D::Error::custom(format!(
                "expected 1-{IDENTIFIER_LENGTH_MAX} characters of A-Z, a-z, 0-9, '_' or '-', got {text:?}"
            )))
        }
    }

    impl<'de> Deserialize<'de> for AccountId {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            identifier(deserializer).map(Self)
        }
    }

    impl<'de> Deserialize<'de> for TransferId {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            identifier(deserializer).map(Self)
        }
    }

    impl<'de> Deserialize<'de> for Currency {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            let text = String::deserialize(deserializer)?;
            Currency::parse(&text).map_err(|_| {
                D::Error::custom(format!("expected three upper-case letters, got {text:?}"))
            })
        }
    }

    /// An integer in `minimum..=AMOUNT_MAX`; a fraction, a string or a bigger number is refused
    /// with the range in the message.
    struct Units {
        minimum: u64,
    }

    impl Units {
        fn check<E: Error>(&self, value: i128) -> Result<u64, E> {
            if (i128::from(self.minimum)..=i128::from(AMOUNT_MAX)).contains(&value) {
                Ok(value as u64)
            } else {
                Err(E::custom(format!("expected {self}, got {value}")))
            }
        }
    }

    impl fmt::Display for Units {
        fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                formatter,
                "an integer from {} to {AMOUNT_MAX}",
                self.minimum
            )
        }
    }

    impl Visitor<'_> for Units {
        type Value = u64;

        fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
            fmt::Display::fmt(self, formatter)
        }

        fn visit_i64<E: Error>(self, value: i64) -> Result<u64, E> {
            self.check(value.into())
        }

        fn visit_u64<E: Error>(self, value: u64) -> Result<u64, E> {
            self.check(value.into())
        }

        /// JSON Schema counts `5.0` as the integer 5, and so do the documents that describe
        /// these values; every integral float up to [`AMOUNT_MAX`] is exact, so none is rounded.
        fn visit_f64<E: Error>(self, value: f64) -> Result<u64, E> {
            if value.fract() == 0.0 && value.abs() <= AMOUNT_MAX as f64 {
                self.check(value as i128)
            } else {
                Err(E::custom(format!("expected {self}, got {value}")))
            }
        }
    }

    impl<'de> Deserialize<'de> for Amount {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_u64(Units { minimum: 1 }).map(Self)
        }
    }

    impl<'de> Deserialize<'de> for OverdraftLimit {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_u64(Units { minimum: 0 }).map(Self)
        }
    }
}

/// The OpenAPI schemas of the values, beside the validation they describe so the two cannot
/// drift apart.
#[cfg(feature = "openapi")]
mod openapi {
    use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaFormat, Type};
    use utoipa::openapi::{KnownFormat, RefOr};
    use utoipa::{PartialSchema, ToSchema};

    use super::*;

    /// The identifier alphabet and length as a JSON Schema pattern.
    pub const IDENTIFIER_PATTERN: &str = "^[A-Za-z0-9_-]{1,64}$";

    fn identifier(description: &str) -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(IDENTIFIER_PATTERN))
            .min_length(Some(1))
            .max_length(Some(IDENTIFIER_LENGTH_MAX))
            .description(Some(description))
            .into()
    }

    fn units(minimum: u64, description: &str) -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .minimum(Some(minimum as usize))
            .maximum(Some(AMOUNT_MAX as usize))
            .description(Some(description))
            .into()
    }

    impl PartialSchema for AccountId {
        fn schema() -> RefOr<Schema> {
            identifier("An account's id, safe as a NATS subject token and in URLs")
        }
    }
    impl ToSchema for AccountId {}

    impl PartialSchema for TransferId {
        fn schema() -> RefOr<Schema> {
            identifier("A transfer's or hold's id; unique forever across all senders")
        }
    }
    impl ToSchema for TransferId {}

    impl PartialSchema for Currency {
        fn schema() -> RefOr<Schema> {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^[A-Z]{3}$"))
                .description(Some("Three upper-case letters (ISO 4217 style)"))
                .into()
        }
    }
    impl ToSchema for Currency {}

    impl PartialSchema for Amount {
        fn schema() -> RefOr<Schema> {
            units(
                1,
                "Minor units (cents); at most 2^53-1 so every JSON parser holds it exactly",
            )
        }
    }
    impl ToSchema for Amount {}

    impl PartialSchema for OverdraftLimit {
        fn schema() -> RefOr<Schema> {
            units(0, "How far below zero the balance may go, in minor units")
        }
    }
    impl ToSchema for OverdraftLimit {}
}

#[cfg(feature = "openapi")]
pub use openapi::IDENTIFIER_PATTERN;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_accept_the_contract_alphabet_and_length() {
        assert!(AccountId::parse("acc-1_X").is_ok());
        assert!(AccountId::parse(&"a".repeat(64)).is_ok());
        for bad in ["", "has.dot", "has space", "ü", "a>b", "a*"] {
            assert!(AccountId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(TransferId::parse(&"t".repeat(65)).is_err());
    }

    #[test]
    fn currency_is_three_upper_case_letters() {
        assert_eq!(
            Currency::parse("EUR").map(|c| c.to_string()),
            Ok("EUR".into())
        );
        for bad in ["eur", "EURO", "EU", "E1R", ""] {
            assert!(Currency::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn amount_bounds_are_one_to_two_pow_53_minus_one() {
        assert!(Amount::new(0).is_err());
        assert!(Amount::new(-1).is_err());
        assert!(Amount::new(1).is_ok());
        assert!(Amount::new(AMOUNT_MAX as i128).is_ok());
        assert!(Amount::new(AMOUNT_MAX as i128 + 1).is_err());
    }

    #[test]
    fn overdraft_limit_allows_zero_and_refuses_negative() {
        assert_eq!(OverdraftLimit::new(0).map(|l| l.floor()), Ok(0));
        assert_eq!(OverdraftLimit::new(50).map(|l| l.floor()), Ok(-50));
        assert!(OverdraftLimit::new(-1).is_err());
    }

    #[test]
    fn values_deserialize_only_through_their_validation() {
        let amount = |json: &str| serde_json::from_str::<Amount>(json).map_err(|e| e.to_string());
        assert_eq!(amount("5").map(Amount::minor_units), Ok(5));
        // Integral floats are integers in JSON Schema, which the API documents follow.
        assert_eq!(amount("5.0").map(Amount::minor_units), Ok(5));
        assert_eq!(amount("1e3").map(Amount::minor_units), Ok(1_000));
        for bad in [
            "0",
            "-1",
            "1.5",
            "0.0",
            "\"10\"",
            "null",
            "9007199254740992",
            "9.1e15",
            "1e300",
        ] {
            let error = amount(bad).expect_err(bad);
            assert!(error.contains("an integer from 1 to"), "{bad}: {error}");
        }
        assert!(serde_json::from_str::<OverdraftLimit>("0").is_ok());
        assert!(serde_json::from_str::<OverdraftLimit>("-1").is_err());
        assert!(serde_json::from_str::<AccountId>("\"acc-1\"").is_ok());
        let error = serde_json::from_str::<AccountId>("\"has.dot\"").expect_err("dot");
        assert!(error.to_string().contains("has.dot"), "{error}");
        assert!(serde_json::from_str::<TransferId>(&format!("\"{}\"", "t".repeat(65))).is_err());
        assert!(serde_json::from_str::<Currency>("\"eur\"").is_err());
        assert!(serde_json::from_str::<Currency>("\"EUR\"").is_ok());
    }
}
