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
}
