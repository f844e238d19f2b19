//! Metadata: the caller's own labels on an account or a movement (a user id, an order, an
//! invoice), so that teams embedding the ledger find their things back. Bounded, so that an
//! account's state and every event stay small: at most [`METADATA_ENTRIES_MAX`] entries, keys
//! 1 to [`METADATA_KEY_LENGTH_MAX`] characters of `[A-Za-z0-9_.-]`, values strings of at most
//! [`METADATA_VALUE_LENGTH_MAX`] characters.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use crate::values::ValueError;

pub const METADATA_ENTRIES_MAX: usize = 16;
pub const METADATA_KEY_LENGTH_MAX: usize = 64;
pub const METADATA_VALUE_LENGTH_MAX: usize = 256;

/// Validated metadata, ordered by key. Deserializes only through its validation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Metadata(BTreeMap<String, String>);

impl Metadata {
    pub fn new(entries: BTreeMap<String, String>) -> Result<Self, ValueError> {
        if entries.len() > METADATA_ENTRIES_MAX {
            return Err(ValueError::Metadata(format!(
                "at most {METADATA_ENTRIES_MAX} entries, got {}",
                entries.len()
            )));
        }
        for (key, value) in &entries {
            check_key(key)?;
            if value.chars().count() > METADATA_VALUE_LENGTH_MAX {
                return Err(ValueError::Metadata(format!(
                    "the value of {key:?} is longer than {METADATA_VALUE_LENGTH_MAX} characters"
                )));
            }
        }
        Ok(Self(entries))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn entries(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    /// Writes `set` over this metadata, then removes the keys of `unset`. Unchecked: a stored
    /// change is applied as it is; `decide` refuses one that would exceed the bound.
    pub fn apply(&mut self, set: &Metadata, unset: &[String]) {
        for (key, value) in &set.0 {
            self.0.insert(key.clone(), value.clone());
        }
        for key in unset {
            self.0.remove(key);
        }
    }
}

/// Checks one metadata key.
pub fn check_key(key: &str) -> Result<(), ValueError> {
    let valid = !key.is_empty()
        && key.len() <= METADATA_KEY_LENGTH_MAX
        && key
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'.' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(ValueError::Metadata(format!(
            "key {key:?} must be 1-{METADATA_KEY_LENGTH_MAX} characters of A-Z, a-z, 0-9, '_', \
             '.' or '-'"
        )))
    }
}

/// One metadata key, checked ([`check_key`]): what `unset` names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct MetadataKey(String);

impl MetadataKey {
    pub fn into_string(self) -> String {
        self.0
    }
}

impl<'de> Deserialize<'de> for MetadataKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let key = String::deserialize(deserializer)?;
        match check_key(&key) {
            Ok(()) => Ok(Self(key)),
            Err(ValueError::Metadata(reason)) => Err(serde::de::Error::custom(reason)),
            Err(other) => Err(serde::de::Error::custom(other)),
        }
    }
}

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let entries = BTreeMap::<String, String>::deserialize(deserializer)?;
        // The caller's path names the field (`metadata: ...`); the message says the rest.
        Metadata::new(entries).map_err(|error| match error {
            ValueError::Metadata(reason) => serde::de::Error::custom(reason),
            other => serde::de::Error::custom(other),
        })
    }
}

#[cfg(feature = "openapi")]
mod openapi {
    use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Schema, Type};
    use utoipa::openapi::RefOr;
    use utoipa::{PartialSchema, ToSchema};

    use super::*;

    impl PartialSchema for Metadata {
        fn schema() -> RefOr<Schema> {
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .property_names(Some(
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .min_length(Some(1))
                        .max_length(Some(METADATA_KEY_LENGTH_MAX))
                        .pattern(Some("^[A-Za-z0-9_.-]+$")),
                ))
                .additional_properties(Some(AdditionalProperties::RefOr(RefOr::T(
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .max_length(Some(METADATA_VALUE_LENGTH_MAX))
                        .into(),
                ))))
                .max_properties(Some(METADATA_ENTRIES_MAX))
                .description(Some(
                    "Your own labels: at most 16 entries, keys 1-64 characters of [A-Za-z0-9_.-], \
                     values strings of at most 256 characters",
                ))
                .into()
        }
    }
    impl ToSchema for Metadata {}

    impl PartialSchema for MetadataKey {
        fn schema() -> RefOr<Schema> {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(METADATA_KEY_LENGTH_MAX))
                .pattern(Some("^[A-Za-z0-9_.-]+$"))
                .description(Some("A metadata key"))
                .into()
        }
    }
    impl ToSchema for MetadataKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    #[test]
    fn metadata_is_bounded_as_the_contract_says() {
        assert!(Metadata::new(entries(&[("user.id", "42"), ("a-b_C9", "")])).is_ok());
        let sixteen: BTreeMap<String, String> = (0..16)
            .map(|index| (format!("k{index}"), "v".into()))
            .collect();
        assert!(Metadata::new(sixteen.clone()).is_ok());
        let mut seventeen = sixteen;
        seventeen.insert("k16".into(), "v".into());
        assert!(Metadata::new(seventeen).is_err());
        for bad in ["", "bad key!", "ü", "a/b", &"k".repeat(65)] {
            let error = Metadata::new(entries(&[(bad, "v")])).expect_err(bad);
            assert!(error.to_string().contains("key"), "{error}");
        }
        assert!(Metadata::new(entries(&[("k", &"é".repeat(256))])).is_ok());
        assert!(Metadata::new(entries(&[("k", &"v".repeat(257))])).is_err());
    }

    #[test]
    fn metadata_deserializes_only_through_its_validation() {
        assert!(serde_json::from_str::<Metadata>(r#"{"tier":"gold"}"#).is_ok());
        assert!(serde_json::from_str::<Metadata>(r#"{"bad key!":"x"}"#).is_err());
        assert!(serde_json::from_str::<Metadata>(r#"{"n":1}"#).is_err());
        assert!(serde_json::from_str::<Metadata>("null").is_err());
    }
}
