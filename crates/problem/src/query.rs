//! Query parameters both services take, validated while they are deserialized.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::Uri;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

use crate::Problem;

/// Query parameters deserialized as `T`; a refusal is `400 invalid_request` (problem+json) that
/// names the parameter, like every other bad input (axum's own `Query` answers plain text).
pub struct ValidQuery<T>(pub T);

impl<T: DeserializeOwned> ValidQuery<T> {
    pub fn from_uri(uri: &Uri) -> Result<Self, Problem> {
        axum::extract::Query::<T>::try_from_uri(uri)
            .map(|query| Self(query.0))
            .map_err(|rejection| Problem::invalid_request(rejection.body_text()))
    }
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ValidQuery<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Problem> {
        Self::from_uri(&parts.uri)
    }
}

/// How many items a page may hold: `limit`, 1 to [`PageLimit::MAX`], default
/// [`PageLimit::DEFAULT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageLimit(usize);

impl PageLimit {
    /// The most items one page returns (contract: `limit` <= 1000).
    pub const MAX: usize = 1_000;
    pub const DEFAULT: usize = 100;

    pub fn get(self) -> usize {
        self.0
    }
}

impl Default for PageLimit {
    fn default() -> Self {
        Self(Self::DEFAULT)
    }
}

impl<'de> Deserialize<'de> for PageLimit {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let limit = u64::deserialize(deserializer)?;
        match usize::try_from(limit) {
            Ok(limit) if (1..=Self::MAX).contains(&limit) => Ok(Self(limit)),
            _ => Err(serde::de::Error::custom(format!(
                "expected an integer from 1 to {}, got {limit}",
                Self::MAX
            ))),
        }
    }
}

impl PartialSchema for PageLimit {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(1))
            .maximum(Some(Self::MAX))
            .default(Some(Self::DEFAULT.into()))
            .description(Some("How many items the page holds at most"))
            .into()
    }
}

impl ToSchema for PageLimit {}

/// A stream position given by a client (`after`, `min_position`, `position`, the
/// `X-Coffer-Min-Position` header): 0 to 2^63-1, so that it fits the `int64` every OpenAPI tool
/// reads; JetStream sequences never come near the bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position(u64);

impl Position {
    pub const MAX: u64 = i64::MAX as u64;

    pub fn get(self) -> u64 {
        self.0
    }

    /// Parses a header's text.
    pub fn parse(text: &str) -> Option<Self> {
        text.parse::<u64>()
            .ok()
            .filter(|position| *position <= Self::MAX)
            .map(Self)
    }
}

impl<'de> Deserialize<'de> for Position {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let position = u64::deserialize(deserializer)?;
        if position <= Self::MAX {
            Ok(Self(position))
        } else {
            Err(serde::de::Error::custom(format!(
                "expected a position from 0 to {}, got {position}",
                Self::MAX
            )))
        }
    }
}

impl PartialSchema for Position {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                utoipa::openapi::KnownFormat::Int64,
            )))
            .minimum(Some(0))
            .maximum(Some(Self::MAX as usize))
            .description(Some("A stream position"))
            .into()
    }
}

impl ToSchema for Position {}

#[cfg(test)]
mod tests {
    use super::*;

    fn query<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T, String> {
        #[derive(Deserialize)]
        struct Query<T> {
            value: T,
        }
        serde_urlencoded::from_str::<Query<T>>(text)
            .map(|query| query.value)
            .map_err(|error| error.to_string())
    }

    #[test]
    fn positions_fit_int64_and_limits_the_page_bounds() {
        assert_eq!(query::<Position>("value=0").map(Position::get), Ok(0));
        assert_eq!(
            query::<Position>("value=9223372036854775807").map(Position::get),
            Ok(Position::MAX)
        );
        for bad in [
            "value=9223372036854775808",
            "value=-1",
            "value=x",
            "value=1.5",
        ] {
            assert!(query::<Position>(bad).is_err(), "{bad}");
        }
        assert_eq!(Position::parse("42").map(Position::get), Some(42));
        assert_eq!(Position::parse("{}"), None);
        assert_eq!(
            query::<PageLimit>("value=1000").map(PageLimit::get),
            Ok(1000)
        );
        for bad in ["value=0", "value=1001", "value=-5"] {
            let error = query::<PageLimit>(bad).expect_err(bad);
            assert!(
                error.contains("from 1 to 1000") || error.contains("invalid"),
                "{error}"
            );
        }
        assert_eq!(PageLimit::default().get(), 100);
    }
}
