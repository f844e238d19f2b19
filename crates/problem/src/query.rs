//! Query parameters both services take, validated while they are deserialized.

use serde::{Deserialize, Deserializer};
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

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
            .maximum(Some(Self::MAX as f64))
            .default(Some(Self::DEFAULT.into()))
            .description(Some("How many items the page holds at most"))
            .into()
    }
}

impl ToSchema for PageLimit {}
