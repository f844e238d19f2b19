//! RFC 9457 problem details (`application/problem+json`), the one error shape of every Coffer
//! HTTP and NATS API. Each problem has a machine-readable `code` that clients switch on; `title`
//! and `detail` are for people.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

pub const CONTENT_TYPE: &str = "application/problem+json";
/// Where the codes are documented; `type` is this plus `#code`.
const TYPE_BASE: &str = "https://coffer.dev/problems";

/// A problem as sent on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_uri: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    pub code: String,
    /// Seconds a client should wait before retrying (sent as `Retry-After` over HTTP).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub retry_after_seconds: Option<u32>,
}

impl Problem {
    pub fn new(status: u16, code: &str, title: &str, detail: impl Into<String>) -> Self {
        Self {
            type_uri: format!("{TYPE_BASE}#{code}"),
            title: title.into(),
            status,
            detail: detail.into(),
            code: code.into(),
            retry_after_seconds: None,
        }
    }

    pub fn invalid_request(detail: impl Into<String>) -> Self {
        Self::new(400, "invalid_request", "Invalid request", detail)
    }

    pub fn not_found(code: &str, detail: impl Into<String>) -> Self {
        Self::new(404, code, "Not found", detail)
    }

    /// 503 with a `Retry-After`.
    pub fn unavailable(code: &str, detail: impl Into<String>, retry_after_seconds: u32) -> Self {
        Self {
            retry_after_seconds: Some(retry_after_seconds),
            ..Self::new(503, code, "Service unavailable", detail)
        }
    }

    pub fn to_json_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry_after = self.retry_after_seconds;
        let mut response = (status, self.to_json_bytes()).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        if let Some(seconds) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_serialises_rfc9457_fields_and_code() {
        let problem = Problem::invalid_request("amount must be positive");
        let json: serde_json::Value = serde_json::from_slice(&problem.to_json_bytes()).unwrap();
        assert_eq!(json["status"], 400);
        assert_eq!(json["code"], "invalid_request");
        assert_eq!(json["type"], "https://coffer.dev/problems#invalid_request");
        assert!(json.get("retry_after_seconds").is_none());
    }

    #[test]
    fn unavailable_sets_retry_after_and_content_type() {
        let response = Problem::unavailable("unavailable", "NATS down", 2).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        assert_eq!(response.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
    }
}
