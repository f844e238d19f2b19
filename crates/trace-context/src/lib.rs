//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): the `traceparent` header.
//!
//! Coffer carries one trace from the HTTP request (or NATS command) that caused an event, in the
//! event's own headers, to the reader that applies it, so one trace id finds every log line of a
//! write on every process. A caller's `traceparent` is continued (same trace id, a new span id
//! for our hop); a request without a valid one starts a new trace, not sampled.
//!
//! When an OpenTelemetry layer is installed (OTLP export configured), [`otel`] ties the
//! `tracing` spans to the same trace: a request span's parent is the caller's span, and the
//! `traceparent` passed on is the exported span's own context, so the trace is one tree.

use std::fmt::{self, Write as _};

/// The header name, on HTTP requests and responses, NATS requests and stored events.
pub const HEADER: &str = "traceparent";

const SAMPLED: u8 = 0x01;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    flags: u8,
}

fn random_bytes() -> [u8; 16] {
    // Version 4 UUIDs are 122 random bits from the OS generator: plenty for span ids.
    *uuid::Uuid::new_v4().as_bytes()
}

fn hex_into(text: &str, out: &mut [u8]) -> Option<()> {
    if text.len() != out.len() * 2
        || !text
            .bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
    {
        return None;
    }
    for (index, slot) in out.iter_mut().enumerate() {
        *slot = u8::from_str_radix(text.get(index * 2..index * 2 + 2)?, 16).ok()?;
    }
    Some(())
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Writes `bytes` as lowercase hex digits. A trace is formatted several times per request, so
/// this writes straight into the destination (a `format!` per byte cost dozens of allocations
/// per command: issue 21).
fn write_hex(bytes: &[u8], out: &mut impl fmt::Write) -> fmt::Result {
    for byte in bytes {
        out.write_char(char::from(HEX_DIGITS[usize::from(byte >> 4)]))?;
        out.write_char(char::from(HEX_DIGITS[usize::from(byte & 0x0f)]))?;
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 2);
    // Writing into a `String` cannot fail.
    let _ = write_hex(bytes, &mut text);
    text
}

impl TraceParent {
    /// Parses a header value; `None` if it is not a valid `traceparent` (the spec says to
    /// start a new trace then, not to fail the request).
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let mut fields = text.splitn(5, '-');
        let version = fields.next()?;
        let (trace, parent, flags) = (fields.next()?, fields.next()?, fields.next()?);
        let mut version_byte = [0u8; 1];
        hex_into(version, &mut version_byte)?;
        match version_byte[0] {
            0xff => return None,
            // Version 00 has exactly these four fields.
            0x00 if fields.next().is_some() || text.len() != 55 => return None,
            // A later version may append fields; what we know is parsed as version 00.
            _ => {}
        }
        let mut parsed = Self {
            trace_id: [0; 16],
            parent_id: [0; 8],
            flags: 0,
        };
        hex_into(trace, &mut parsed.trace_id)?;
        hex_into(parent, &mut parsed.parent_id)?;
        let mut flags_byte = [0u8; 1];
        hex_into(flags, &mut flags_byte)?;
        parsed.flags = flags_byte[0];
        if parsed.trace_id == [0; 16] || parsed.parent_id == [0; 8] {
            return None;
        }
        Some(parsed)
    }

    /// A new trace, not sampled.
    pub fn new_root() -> Self {
        let random = random_bytes();
        let mut parent_id = [0u8; 8];
        parent_id.copy_from_slice(&random[..8]);
        let mut trace = Self {
            trace_id: random_bytes(),
            parent_id,
            flags: 0,
        };
        // All-zero ids are invalid; 2^-64 odds, but never emit one.
        if trace.parent_id == [0; 8] {
            trace.parent_id[7] = 1;
        }
        if trace.trace_id == [0; 16] {
            trace.trace_id[15] = 1;
        }
        trace
    }

    /// The caller's trace continued by a new span (ours), or a new trace if the caller sent
    /// none or an invalid one.
    pub fn continue_from(header: Option<&str>) -> Self {
        header
            .and_then(Self::parse)
            .map_or_else(Self::new_root, |parent| parent.child())
    }

    /// The same trace and flags, a new span id.
    pub fn child(&self) -> Self {
        let mut child = *self;
        child.parent_id.copy_from_slice(&random_bytes()[..8]);
        if child.parent_id == [0; 8] {
            child.parent_id[7] = 1;
        }
        child
    }

    /// The trace id as 32 lowercase hex digits (what log lines carry as `trace_id`).
    pub fn trace_id(&self) -> String {
        hex(&self.trace_id)
    }

    /// The span id as 16 lowercase hex digits.
    pub fn span_id(&self) -> String {
        hex(&self.parent_id)
    }

    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }
}

impl fmt::Display for TraceParent {
    /// Always written as version 00, as the spec asks of a version 00 implementation.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("00-")?;
        write_hex(&self.trace_id, formatter)?;
        formatter.write_char('-')?;
        write_hex(&self.parent_id, formatter)?;
        formatter.write_char('-')?;
        write_hex(&[self.flags], formatter)
    }
}

/// The bridge to exported OpenTelemetry spans; every function is a no-op (or `None`) when no
/// OpenTelemetry layer is installed.
pub mod otel {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::TraceParent;

    /// Makes `parent` (a remote span: the caller's, or the writer's for an event) the parent
    /// of `span` in exported traces.
    pub fn set_parent(span: &tracing::Span, parent: &TraceParent) {
        let remote = SpanContext::new(
            TraceId::from_bytes(parent.trace_id),
            SpanId::from_bytes(parent.parent_id),
            TraceFlags::new(parent.flags),
            true,
            TraceState::default(),
        );
        let context = opentelemetry::Context::new().with_remote_span_context(remote);
        // Fails only when the span is disabled or already started exporting: nothing to link.
        let _ = span.set_parent(context);
    }

    /// The exported span's own context as a `traceparent`, if `span` is exported.
    pub fn of_span(span: &tracing::Span) -> Option<TraceParent> {
        let context = span.context();
        let span_context = context.span().span_context().clone();
        span_context.is_valid().then(|| TraceParent {
            trace_id: span_context.trace_id().to_bytes(),
            parent_id: span_context.span_id().to_bytes(),
            flags: span_context.trace_flags().to_u8(),
        })
    }

    /// Links a new span to the caller's trace in `header`. Call it before the span is first
    /// entered: an exported span's parent is fixed once it starts.
    pub fn link(span: &tracing::Span, header: Option<&str>) {
        if let Some(parent) = header.and_then(TraceParent::parse) {
            set_parent(span, &parent);
        }
    }

    /// This service's hop of a request that came with `header`, inside `span` (linked first):
    /// the exported span's context when spans are exported, else the caller's trace continued
    /// with a new span id, else a new trace.
    pub fn hop(span: &tracing::Span, header: Option<&str>) -> TraceParent {
        of_span(span).unwrap_or_else(|| TraceParent::continue_from(header))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_spec_example_round_trips() {
        let parsed = TraceParent::parse(VALID).unwrap();
        assert_eq!(parsed.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parsed.span_id(), "00f067aa0ba902b7");
        assert!(parsed.sampled());
        assert_eq!(parsed.to_string(), VALID);
    }

    #[test]
    fn invalid_values_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_as_version_00() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next";
        let parsed = TraceParent::parse(later).unwrap();
        assert_eq!(parsed.to_string(), VALID);
    }

    #[test]
    fn continuing_keeps_the_trace_and_flags_and_makes_a_new_span() {
        let ours = TraceParent::continue_from(Some(VALID));
        assert_eq!(ours.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(ours.span_id(), "00f067aa0ba902b7");
        assert!(ours.sampled());
        let fresh = TraceParent::continue_from(Some("garbage"));
        assert_ne!(fresh.trace_id(), ours.trace_id());
        assert!(!fresh.sampled());
        assert_eq!(TraceParent::parse(&fresh.to_string()), Some(fresh));
        assert_ne!(TraceParent::new_root(), TraceParent::new_root());
    }
}
