//! RFC 9457 problem details (`application/problem+json`), the one error shape of every Coffer
//! HTTP and NATS API, plus the other pieces both HTTP services share: the OpenAPI assembly, the
//! routes every service has, the request-id and trace layers, and [`server`]: serving with
//! connection limits and timeouts. Each problem has a machine-readable `code` that clients switch on; `title`
//! and `detail` are for people.

pub mod query;
pub mod server;

pub use server::{serve, HttpLimits};

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

pub const CONTENT_TYPE: &str = "application/problem+json";
/// Where the codes are documented; `type` is this plus `#code`.
const TYPE_BASE: &str = "https://coffer.dev/problems";

/// A problem as sent on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
/// RFC 9457 problem details with a machine-readable code.
pub struct Problem {
    /// A URI naming the problem type: the documentation of `code`.
    #[serde(rename = "type")]
    pub type_uri: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// What clients switch on (`insufficient_funds`, `stale`, ...).
    pub code: String,
    /// Seconds a client should wait before retrying (sent as `Retry-After` over HTTP).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub retry_after_seconds: Option<u32>,
    /// For a refused transaction or reversal: the index (0-based) of the first posting that
    /// failed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub posting: Option<u16>,
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
            posting: None,
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

/// The served OpenAPI documents: one per service, and both merged for `docs/openapi.json`.
pub mod openapi {
    use std::collections::BTreeMap;

    use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
    use utoipa::openapi::{ContentBuilder, OpenApi, RefOr, Response, ResponseBuilder};
    use utoipa::{PartialSchema, ToSchema};

    use super::{Problem, CONTENT_TYPE};

    /// One document from the services' parts, with the problem schema every error response
    /// refers to and the optional bearer token.
    pub fn document(title: &str, parts: impl IntoIterator<Item = OpenApi>) -> OpenApi {
        let mut document = OpenApi::default();
        for part in parts {
            document.merge(part);
        }
        document.info.title = title.to_owned();
        document.info.version = env!("CARGO_PKG_VERSION").to_owned();
        document.info.description = Some(
            "Errors are RFC 9457 problems (`application/problem+json`) with a machine-readable \
             `code`. With `COFFER_HTTP_TOKEN` set, every route but the probes and `/metrics` \
             needs `Authorization: Bearer <token>`."
                .to_owned(),
        );
        optional_bodies_are_absent_not_null(&mut document);
        let components = document.components.get_or_insert_with(Default::default);
        components
            .schemas
            .insert(Problem::name().into_owned(), Problem::schema());
        components.security_schemes.insert(
            "bearer".to_owned(),
            RefOr::T(SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build(),
            )),
        );
        document
    }

    /// utoipa marks a body optional by its `Option` type, which also makes its schema accept
    /// `null`; an optional body here is one that may be left out (or sent as `{}`), not `null`.
    fn optional_bodies_are_absent_not_null(document: &mut OpenApi) {
        use utoipa::openapi::schema::{Schema, Type};
        use utoipa::openapi::Required;
        for item in document.paths.paths.values_mut() {
            for operation in [&mut item.post, &mut item.put, &mut item.patch]
                .into_iter()
                .flatten()
            {
                let Some(RefOr::T(body)) = operation.request_body.as_mut() else {
                    continue;
                };
                if body.required == Some(Required::True) {
                    continue;
                }
                for content in body.content.values_mut() {
                    let RefOr::T(content) = content else {
                        continue;
                    };
                    if let Some(RefOr::T(Schema::OneOf(one_of))) = &content.schema {
                        let not_null = one_of.items.iter().find(|item| {
                            !matches!(item, RefOr::T(Schema::Object(object))
                                if object.schema_type == Type::Null.into())
                        });
                        if let (Some(only), 2) = (not_null.cloned(), one_of.items.len()) {
                            content.schema = Some(only);
                        }
                    }
                }
            }
        }
    }

    /// Error responses, one per status, each naming the codes answered with it.
    pub fn problem_responses(
        codes: impl IntoIterator<Item = (u16, String)>,
    ) -> BTreeMap<String, RefOr<Response>> {
        let mut by_status: BTreeMap<u16, Vec<String>> = BTreeMap::new();
        for (status, code) in codes {
            let codes = by_status.entry(status).or_default();
            if !codes.contains(&code) {
                codes.push(code);
            }
        }
        by_status
            .into_iter()
            .map(|(status, codes)| {
                let response = ResponseBuilder::new()
                    .description(format!("Problem with code {}", codes.join(", ")))
                    .content(
                        CONTENT_TYPE,
                        ContentBuilder::new()
                            .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                                Problem::name(),
                            ))))
                            .build(),
                    )
                    .build();
                (status.to_string(), RefOr::T(response))
            })
            .collect()
    }

    /// What every service's HTTP layers may answer on any route: a missing or wrong token, a
    /// request too slow to arrive or to run.
    pub fn common_problems() -> Vec<(u16, String)> {
        vec![
            (401, "unauthorized".to_owned()),
            (408, "request_timeout".to_owned()),
        ]
    }
}

/// Adds what every Coffer service answers besides its own API: `GET /healthz`,
/// `GET /openapi.json` (this service's document), `GET /docs` (Swagger UI from the vendored
/// assets of `utoipa-swagger-ui`, nothing fetched at build or run time) and a problem+json 404
/// fallback. Call it after the service's own routes and before its layers.
pub fn with_service_routes<S: Clone + Send + Sync + 'static>(
    router: axum::Router<S>,
    document: utoipa::openapi::OpenApi,
) -> axum::Router<S> {
    use axum::routing::get;
    let docs = utoipa_swagger_ui::SwaggerUi::new("/docs").url("/openapi.json", document);
    router
        .route("/healthz", get(|| async { "ok" }))
        .merge(docs)
        .fallback(|| async { Problem::not_found("not_found", "no such route") })
}

/// Paths that stay open when a token is configured: probes and metrics (contract v2).
pub const OPEN_PATHS: &[&str] = &["/healthz", "/readyz", "/metrics"];

/// The bearer token the HTTP API requires (`COFFER_HTTP_TOKEN`, or read from a file such as a
/// mounted Secret with `COFFER_HTTP_TOKEN_FILE`). Its `Debug` does not show it.
#[derive(Clone)]
pub struct BearerToken(std::sync::Arc<[u8; 32]>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("BearerToken(..)")
    }
}

impl BearerToken {
    /// A token; surrounding whitespace (a file's trailing newline) is not part of it. An empty
    /// token is refused: it would let every request in.
    pub fn new(token: &str) -> Option<Self> {
        let token = token.trim();
        (!token.is_empty()).then(|| Self(std::sync::Arc::new(digest(token.as_bytes()))))
    }

    /// Whether an `Authorization` header value carries this token (the scheme is
    /// case-insensitive, RFC 9110). Digests of equal length are compared in constant time, so
    /// response timing reveals neither how much of a guess was right nor the token's length.
    pub fn accepts(&self, authorization: Option<&[u8]>) -> bool {
        use subtle::ConstantTimeEq;
        let Some(value) = authorization else {
            return false;
        };
        let scheme = b"bearer ";
        if value.len() <= scheme.len() || !value[..scheme.len()].eq_ignore_ascii_case(scheme) {
            return false;
        }
        bool::from(digest(&value[scheme.len()..]).ct_eq(self.0.as_ref()))
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// Requires `Authorization: Bearer {token}` on every route but [`OPEN_PATHS`] when a token is
/// configured; without one, nothing is checked (local use).
pub fn with_bearer_token<S: Clone + Send + Sync + 'static>(
    router: axum::Router<S>,
    token: Option<BearerToken>,
) -> axum::Router<S> {
    let Some(token) = token else {
        return router;
    };
    router.layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| {
            let token = token.clone();
            async move {
                let open = OPEN_PATHS.contains(&request.uri().path());
                let presented = request
                    .headers()
                    .get(header::AUTHORIZATION)
                    .map(HeaderValue::as_bytes);
                if open || token.accepts(presented) {
                    next.run(request).await
                } else {
                    let mut response = Problem::new(
                        401,
                        "unauthorized",
                        "Unauthorized",
                        "this API requires Authorization: Bearer <token>",
                    )
                    .into_response();
                    response
                        .headers_mut()
                        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                    response
                }
            }
        },
    ))
}

/// Wraps a router in the request-id layers (`X-Request-Id` taken or generated, and echoed) with
/// a tracing span per request inside them, so every log line of a request carries its id.
pub fn with_request_ids<S: Clone + Send + Sync + 'static>(
    router: axum::Router<S>,
) -> axum::Router<S> {
    use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
    router
        .layer(PropagateRequestIdLayer::x_request_id())
        // Inside the request span, so the hop it passes on is that span when it is exported.
        .layer(axum::middleware::from_fn(continue_trace))
        .layer(tower_http::trace::TraceLayer::new_for_http().make_span_with(request_span))
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

/// Continues the caller's W3C trace (or starts one): the request's `traceparent` becomes this
/// service's hop, which handlers pass on (to NATS, into events), and the response carries it,
/// so a caller that sent none learns the trace id.
async fn continue_trace(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let span = tracing::Span::current();
    let trace = trace_context::otel::hop(
        &span,
        request
            .headers()
            .get(trace_context::HEADER)
            .and_then(|value| value.to_str().ok()),
    );
    span.record("trace_id", trace.trace_id());
    let value = HeaderValue::from_str(&trace.to_string());
    if let Ok(value) = &value {
        request
            .headers_mut()
            .insert(trace_context::HEADER, value.clone());
    }
    let mut response = next.run(request).await;
    if let Ok(value) = value {
        response.headers_mut().insert(trace_context::HEADER, value);
    }
    response
}

/// The trace of a request that went through [`with_request_ids`].
pub fn request_trace(headers: &axum::http::HeaderMap) -> trace_context::TraceParent {
    headers
        .get(trace_context::HEADER)
        .and_then(|value| value.to_str().ok())
        .and_then(trace_context::TraceParent::parse)
        .unwrap_or_else(trace_context::TraceParent::new_root)
}

/// The span of one HTTP request, named by method, path and request id.
fn request_span(request: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    // `trace_id` is recorded by `continue_trace`; the caller's span is the parent (exported).
    let span = tracing::info_span!("http", method = %request.method(), path = %request.uri().path(), request_id, trace_id = tracing::field::Empty);
    trace_context::otel::link(
        &span,
        request
            .headers()
            .get(trace_context::HEADER)
            .and_then(|value| value.to_str().ok()),
    );
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_compared_whole_and_never_empty() {
        let token = BearerToken::new("s3cret\n").unwrap();
        assert!(token.accepts(Some(b"Bearer s3cret")));
        assert!(!token.accepts(Some(b"Bearer s3cre")));
        assert!(!token.accepts(Some(b"Bearer s3cret2")));
        assert!(!token.accepts(Some(b"Basic s3cret")));
        assert!(token.accepts(Some(b"bearer s3cret")));
        assert!(!token.accepts(Some(b"Bearer ")));
        assert!(!token.accepts(None));
        assert!(BearerToken::new("  ").is_none());
        assert_eq!(format!("{token:?}"), "BearerToken(..)");
    }

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
