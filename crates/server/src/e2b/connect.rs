//! The Connect protocol as E2B's SDKs speak it to the sandbox daemon: JSON
//! only. Unary calls are plain JSON bodies; server streams are envelopes
//! (one flag byte, a 4-byte big-endian length, the message), ended by an
//! end-of-stream envelope. Errors carry a Connect code name and a message.
//!
//! The envelope reader takes untrusted bytes (fuzzed: `fuzz_targets/connect_envelope.rs`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Flag of a compressed message; we offer no compression, so none may come.
pub const FLAG_COMPRESSED: u8 = 0x01;
/// Flag of the end-of-stream envelope, which closes a server stream.
pub const FLAG_END_STREAM: u8 = 0x02;
const HEADER_LEN: usize = 5;

/// The content type of Connect's enveloped JSON streams.
pub const STREAM_JSON: &str = "application/connect+json";

/// A request's content type, or "" without one.
pub fn content_type(headers: &axum::http::HeaderMap) -> &str {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub flags: u8,
    pub message: &'a [u8],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("the envelope stream ends inside an envelope's 5-byte header")]
    TruncatedHeader,
    #[error("an envelope says {said} bytes follow, but {left} do")]
    TruncatedMessage { said: usize, left: usize },
    #[error("an envelope of {said} bytes is over the {limit}-byte limit")]
    TooLarge { said: usize, limit: usize },
    #[error("a compressed envelope, but no compression was agreed")]
    Compressed,
    #[error("unknown envelope flags {0:#04x}")]
    UnknownFlags(u8),
}

/// Splits `bytes` into envelopes, each at most `limit` bytes.
pub fn read_envelopes(mut bytes: &[u8], limit: usize) -> Result<Vec<Envelope<'_>>, EnvelopeError> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < HEADER_LEN {
            return Err(EnvelopeError::TruncatedHeader);
        }
        let flags = bytes[0];
        let said = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        if flags & FLAG_COMPRESSED != 0 {
            return Err(EnvelopeError::Compressed);
        }
        if flags & !FLAG_END_STREAM != 0 {
            return Err(EnvelopeError::UnknownFlags(flags));
        }
        if said > limit {
            return Err(EnvelopeError::TooLarge { said, limit });
        }
        let rest = &bytes[HEADER_LEN..];
        if rest.len() < said {
            return Err(EnvelopeError::TruncatedMessage { said, left: rest.len() });
        }
        out.push(Envelope {
            flags,
            message: &rest[..said],
        });
        bytes = &rest[said..];
    }
    Ok(out)
}

/// One envelope around `message`.
pub fn envelope(flags: u8, message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + message.len());
    out.push(flags);
    // Messages we send are far below 4 GiB: a chunk of output, or an error.
    out.extend_from_slice(&(message.len().min(u32::MAX as usize) as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// A Connect error: its code (a name from the protocol's fixed list) and
/// message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectError {
    pub code: &'static str,
    pub message: String,
    /// A status other than the code's (415 for a codec we do not speak).
    pub status: Option<StatusCode>,
}

impl ConnectError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            status: None,
        }
    }

    /// A request in a codec other than JSON (binary protobuf, say).
    pub fn unsupported_codec(content_type: &str, wanted: &str) -> Self {
        Self {
            status: Some(StatusCode::UNSUPPORTED_MEDIA_TYPE),
            ..Self::new(
                "unimplemented",
                format!(
                    "content type {content_type:?}: this server speaks Connect with the JSON codec only ({wanted})"
                ),
            )
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new("invalid_argument", message)
    }

    /// The HTTP status of a unary response carrying this error, as the
    /// Connect protocol maps codes.
    pub fn status(&self) -> StatusCode {
        if let Some(status) = self.status {
            return status;
        }
        match self.code {
            "canceled" => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            "invalid_argument" | "failed_precondition" | "out_of_range" => StatusCode::BAD_REQUEST,
            "deadline_exceeded" => StatusCode::GATEWAY_TIMEOUT,
            "not_found" => StatusCode::NOT_FOUND,
            "already_exists" | "aborted" => StatusCode::CONFLICT,
            "permission_denied" => StatusCode::FORBIDDEN,
            "resource_exhausted" => StatusCode::TOO_MANY_REQUESTS,
            "unimplemented" => StatusCode::NOT_IMPLEMENTED,
            "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            "unauthenticated" => StatusCode::UNAUTHORIZED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"code": self.code, "message": self.message})
    }

    /// The end-of-stream envelope that ends a stream with this error.
    pub fn end_of_stream(&self) -> Vec<u8> {
        envelope(FLAG_END_STREAM, json!({"error": self.body()}).to_string().as_bytes())
    }
}

/// The API's errors as Connect codes.
impl From<crate::error::ApiError> for ConnectError {
    fn from(e: crate::error::ApiError) -> Self {
        let code = match e.status.as_u16() {
            400 | 413 => "invalid_argument",
            401 => "unauthenticated",
            403 => "permission_denied",
            404 | 410 => "not_found",
            409 => "already_exists",
            429 | 507 => "resource_exhausted",
            503 => "unavailable",
            504 => "deadline_exceeded",
            _ => "internal",
        };
        Self::new(code, e.message)
    }
}

impl IntoResponse for ConnectError {
    fn into_response(self) -> Response {
        (self.status(), axum::Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_damage_is_named() {
        let mut bytes = envelope(0, b"{\"a\":1}");
        bytes.extend(envelope(FLAG_END_STREAM, b"{}"));
        let read = read_envelopes(&bytes, 64).unwrap();
        assert_eq!(read.len(), 2);
        assert_eq!((read[0].flags, read[0].message), (0, &b"{\"a\":1}"[..]));
        assert_eq!((read[1].flags, read[1].message), (FLAG_END_STREAM, &b"{}"[..]));
        assert_eq!(read_envelopes(&[], 64).unwrap(), []);
        assert_eq!(read_envelopes(&bytes[..3], 64), Err(EnvelopeError::TruncatedHeader));
        assert_eq!(
            read_envelopes(&bytes[..8], 64),
            Err(EnvelopeError::TruncatedMessage { said: 7, left: 3 })
        );
        assert_eq!(
            read_envelopes(&bytes, 4),
            Err(EnvelopeError::TooLarge { said: 7, limit: 4 })
        );
        assert_eq!(read_envelopes(&envelope(1, b"x"), 64), Err(EnvelopeError::Compressed));
        assert_eq!(
            read_envelopes(&envelope(0x80, b"x"), 64),
            Err(EnvelopeError::UnknownFlags(0x80))
        );
    }

    #[test]
    fn codes_map_to_the_protocols_statuses() {
        assert_eq!(ConnectError::invalid("x").status(), StatusCode::BAD_REQUEST);
        assert_eq!(ConnectError::new("not_found", "x").status(), StatusCode::NOT_FOUND);
        assert_eq!(
            ConnectError::new("unimplemented", "x").status(),
            StatusCode::NOT_IMPLEMENTED
        );
        let end = ConnectError::new("not_found", "gone").end_of_stream();
        let read = read_envelopes(&end, 1024).unwrap();
        assert_eq!(read[0].flags, FLAG_END_STREAM);
        let body: serde_json::Value = serde_json::from_slice(read[0].message).unwrap();
        assert_eq!(body["error"]["code"], "not_found");
    }
}
