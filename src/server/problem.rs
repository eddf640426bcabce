//! The service's own answers: `application/problem+json` bodies (RFC 9457), or for a gRPC
//! call, a gRPC status.

use std::fmt::Write as _;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header};
use http_body::Body;

use super::body::ResponseBody;
use crate::{IDEMPOTENCY_KEY, InvalidKey};

/// Seconds a client is asked to wait before retrying a 409 or 503.
const RETRY_AFTER_SECS: u64 = 1;

/// How a request is answered by the service itself: a gRPC client reads only a gRPC status
/// (it takes any other body for gRPC frames, and reports a protocol error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    Http,
    /// A gRPC call, or a gRPC-Web one: answered in the content type of its family.
    Grpc(&'static str),
}

impl Dialect {
    /// A request whose `Content-Type` is `application/grpc` (or `application/grpc+...`) is a
    /// gRPC call.
    pub(crate) fn of(headers: &HeaderMap) -> Self {
        Self::of_content_type(
            headers
                .get(header::CONTENT_TYPE)
                .map_or(&[][..], HeaderValue::as_bytes),
        )
    }

    /// [`of`](Self::of) a request whose `Content-Type` is `content_type`.
    pub(crate) fn of_content_type(content_type: &[u8]) -> Self {
        let Some(rest) = content_type.strip_prefix(b"application/grpc") else {
            return Self::Http;
        };
        if rest.starts_with(b"-web-text") {
            Self::Grpc("application/grpc-web-text")
        } else if rest.starts_with(b"-web") {
            Self::Grpc("application/grpc-web")
        } else {
            Self::Grpc("application/grpc")
        }
    }
}

/// The bytes `grpc-message` carries as they are; the others are percent-encoded (the gRPC
/// over HTTP/2 protocol).
const GRPC_MESSAGE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');

/// Why the service answered a request itself.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Problem {
    MissingKey {
        header: HeaderName,
    },
    InvalidKey {
        err: InvalidKey,
        header: HeaderName,
    },
    /// The request cannot be scoped; `header` names what scopes it, when a header does.
    MissingScope {
        header: Option<HeaderName>,
    },
    BodyTooLarge {
        limit: usize,
    },
    /// A limit outside this service (such as tower-http's `RequestBodyLimitLayer`) cut the
    /// body off.
    BodyOverOuterLimit,
    BodyUnreadable,
    KeyReused,
    InFlight,
    WaitTimedOut,
    NotReplayable {
        status: StatusCode,
    },
    StoreUnavailable,
}

impl Problem {
    /// The answer to a request body that failed while it was read: 413 when a length limit
    /// around this service cut it off (resending it cannot help), 400 for anything else.
    pub(crate) fn body_failed(error: tower::BoxError) -> Self {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&*error);
        while let Some(err) = cause {
            if err.is::<http_body_util::LengthLimitError>() {
                return Self::BodyOverOuterLimit;
            }
            cause = err.source();
        }
        tracing::debug!(error = %error, "idempotency: the request body failed while it was read");
        Self::BodyUnreadable
    }

    fn parts(&self) -> (StatusCode, &'static str, &'static str, String) {
        match self {
            Self::MissingKey { header } => (
                StatusCode::BAD_REQUEST,
                "missing-idempotency-key",
                "Idempotency key required",
                format!(
                    "This request must carry an {} header. Send a unique key for the operation \
                     (a UUID v4 works) and send the same key again on every retry.",
                    display_name(header)
                ),
            ),
            Self::InvalidKey { err, header } => (
                StatusCode::BAD_REQUEST,
                "invalid-idempotency-key",
                "Invalid idempotency key",
                match err {
                    InvalidKey::Repeated => format!(
                        "The {} header was given more than once. Send it exactly once.",
                        display_name(header)
                    ),
                    err => sentence(&err.to_string()),
                },
            ),
            Self::MissingScope { header } => (
                StatusCode::BAD_REQUEST,
                "missing-idempotency-scope",
                "Request cannot be scoped",
                match header {
                    Some(name) => format!(
                        "The server scopes idempotency keys by the {name} header, and this request \
                         does not carry it once with a value. Send {name} exactly once, with a \
                         non-empty UTF-8 value."
                    ),
                    None => "The server scopes idempotency keys per client, but could not tell \
                             which client sent this request. Send the credentials or tenant header \
                             the API requires, once, with a value."
                        .into(),
                },
            ),
            Self::BodyTooLarge { limit } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "request-too-large",
                "Request body too large",
                format!(
                    "Requests with an idempotency key may carry at most {limit} bytes of body. Send a \
                     smaller body."
                ),
            ),
            Self::BodyOverOuterLimit => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "request-too-large",
                "Request body too large",
                "The request body is larger than this server accepts. Send a smaller body.".into(),
            ),
            Self::BodyUnreadable => (
                StatusCode::BAD_REQUEST,
                "request-body-unreadable",
                "Request body could not be read",
                "The request body ended with an error before it was complete. Send the request again."
                    .into(),
            ),
            Self::KeyReused => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                "Idempotency key reused",
                "This idempotency key was already used for a different request (method, path, \
                 content type, body or headers differ). Use a new key for a new operation, or resend the original request \
                 unchanged."
                    .into(),
            ),
            Self::InFlight => (
                StatusCode::CONFLICT,
                "request-in-progress",
                "Request in progress",
                "A request with this idempotency key is still being processed. Retry after the delay \
                 in Retry-After to get its result."
                    .into(),
            ),
            Self::WaitTimedOut => (
                StatusCode::CONFLICT,
                "request-in-progress",
                "Request still in progress",
                "A request with this idempotency key is still being processed and did not finish while \
                 this one waited. Retry after the delay in Retry-After to get its result."
                    .into(),
            ),
            Self::NotReplayable { status } => (
                StatusCode::CONFLICT,
                "response-not-replayable",
                "Response cannot be replayed",
                format!(
                    "A request with this idempotency key already completed with status {}, but its \
                     response was not stored (it was too large, or streamed as it was made), so it \
                     cannot be sent again. The operation ran once; fetch its result another way, \
                     or use a new key for a new operation.",
                    status.as_u16()
                ),
            ),
            Self::StoreUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "idempotency-store-unavailable",
                "Idempotency store unavailable",
                "The server cannot check this idempotency key right now, so it did not process the \
                 request. Retry after the delay in Retry-After with the same key."
                    .into(),
            ),
        }
    }

    /// The status this problem is answered with.
    pub(crate) fn status(&self) -> StatusCode {
        self.parts().0
    }

    /// The gRPC status code answering this problem: what a gRPC client does with it matches
    /// what an HTTP client does with the status (UNAVAILABLE is the one gRPC clients retry).
    fn grpc_code(&self) -> u8 {
        const INVALID_ARGUMENT: u8 = 3;
        const RESOURCE_EXHAUSTED: u8 = 8;
        const FAILED_PRECONDITION: u8 = 9;
        const UNAVAILABLE: u8 = 14;
        match self {
            Self::MissingKey { .. }
            | Self::InvalidKey { .. }
            | Self::MissingScope { .. }
            | Self::BodyUnreadable
            | Self::KeyReused => INVALID_ARGUMENT,
            Self::BodyTooLarge { .. } | Self::BodyOverOuterLimit => RESOURCE_EXHAUSTED,
            Self::NotReplayable { .. } => FAILED_PRECONDITION,
            Self::InFlight | Self::WaitTimedOut | Self::StoreUnavailable => UNAVAILABLE,
        }
    }

    /// Whether a client is asked to come back after [`RETRY_AFTER_SECS`].
    fn retry_after(&self) -> bool {
        matches!(
            self,
            Self::InFlight | Self::WaitTimedOut | Self::StoreUnavailable
        )
    }

    pub(crate) fn into_response<B: Body>(self, dialect: Dialect) -> Response<ResponseBody<B>> {
        if let Dialect::Grpc(content_type) = dialect {
            return self.into_grpc_response(content_type);
        }
        let (status, slug, title, detail) = self.parts();
        let mut json = String::with_capacity(160 + detail.len());
        json.push_str("{\"type\":\"tag:tower-idempotency,2026:");
        json.push_str(slug);
        json.push_str("\",\"title\":");
        push_json_string(&mut json, title);
        let _ = write!(json, ",\"status\":{},\"detail\":", status.as_u16());
        push_json_string(&mut json, &detail);
        json.push('}');

        let mut response = Response::new(ResponseBody::full(Bytes::from(json), None));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }

    /// A gRPC "trailers-only" answer: HTTP 200, no messages, and the status with the detail in
    /// `grpc-message`. Where HTTP would have `Retry-After`, `grpc-retry-pushback-ms` (what a
    /// gRPC client with a retry policy waits by) says the same, and `retry-after` stays among
    /// the metadata.
    fn into_grpc_response<B: Body>(self, content_type: &'static str) -> Response<ResponseBody<B>> {
        let detail = self.parts().3;
        let message = percent_encoding::utf8_percent_encode(&detail, GRPC_MESSAGE).to_string();
        let mut response = Response::new(ResponseBody::full(Bytes::new(), None));
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert(
            "grpc-status",
            HeaderValue::from(u16::from(self.grpc_code())),
        );
        headers.insert(
            "grpc-message",
            HeaderValue::try_from(message).expect("percent-encoded text is a header value"),
        );
        if self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            headers.insert(
                "grpc-retry-pushback-ms",
                HeaderValue::from(RETRY_AFTER_SECS * 1000),
            );
        }
        response
    }
}

/// A header's name as its documentation writes it: `Idempotency-Key` for the default.
fn display_name(header: &HeaderName) -> &str {
    if *header == IDEMPOTENCY_KEY {
        "Idempotency-Key"
    } else {
        header.as_str()
    }
}

/// An error's message (lower case, no full stop) as the sentence a problem's detail is.
fn sentence(message: &str) -> String {
    let mut chars = message.chars();
    chars.next().map_or_else(String::new, |first| {
        format!("{}{}.", first.to_ascii_uppercase(), chars.as_str())
    })
}

fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Full};

    use super::*;

    #[tokio::test]
    async fn bodies_are_problem_json_with_escaped_details() {
        let response = Problem::InvalidKey {
            err: InvalidKey::InvalidEscape,
            header: IDEMPOTENCY_KEY,
        }
        .into_response::<Full<Bytes>>(Dialect::Http);
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["status"], 400);
        assert_eq!(json["title"], "Invalid idempotency key");
        let detail = json["detail"].as_str().unwrap();
        assert!(detail.starts_with("The quoted idempotency key"), "{detail}");
        assert!(detail.contains("escapes neither '\"' nor '\\'"), "{detail}");
        assert!(detail.ends_with('.'), "{detail}");
        assert!(
            json["type"]
                .as_str()
                .unwrap()
                .ends_with(":invalid-idempotency-key")
        );
    }

    #[test]
    fn conflicts_and_outages_carry_retry_after() {
        for problem in [
            Problem::InFlight,
            Problem::WaitTimedOut,
            Problem::StoreUnavailable,
        ] {
            let response = problem.into_response::<Full<Bytes>>(Dialect::Http);
            assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        }
        let response = Problem::NotReplayable {
            status: StatusCode::OK,
        }
        .into_response::<Full<Bytes>>(Dialect::Http);
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert!(response.headers().get(header::RETRY_AFTER).is_none());
    }

    #[tokio::test]
    async fn a_grpc_call_is_answered_with_a_grpc_status_and_its_detail() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert_eq!(Dialect::of(&headers), Dialect::Grpc("application/grpc"));
        assert_eq!(Dialect::of(&HeaderMap::new()), Dialect::Http);
        assert_eq!(
            Dialect::of_content_type(b"application/grpc-web+proto"),
            Dialect::Grpc("application/grpc-web")
        );
        assert_eq!(
            Dialect::of_content_type(b"application/grpc-web-text"),
            Dialect::Grpc("application/grpc-web-text")
        );
        assert_eq!(Dialect::of_content_type(b"application/json"), Dialect::Http);
        for (problem, code, retry) in [
            (Problem::KeyReused, "3", false),
            (Problem::BodyTooLarge { limit: 8 }, "8", false),
            (
                Problem::NotReplayable {
                    status: StatusCode::OK,
                },
                "9",
                false,
            ),
            (Problem::InFlight, "14", true),
            (Problem::StoreUnavailable, "14", true),
        ] {
            let detail = problem.parts().3;
            let grpc = Dialect::Grpc("application/grpc");
            let response = problem.into_response::<Full<Bytes>>(grpc);
            assert_eq!(response.status(), StatusCode::OK);
            let headers = response.headers();
            assert_eq!(headers[header::CONTENT_TYPE], "application/grpc");
            assert_eq!(headers["grpc-status"], code);
            assert_eq!(headers.contains_key(header::RETRY_AFTER), retry);
            assert_eq!(headers.contains_key("grpc-retry-pushback-ms"), retry);
            let message = headers["grpc-message"].to_str().unwrap();
            let decoded = percent_encoding::percent_decode_str(message)
                .decode_utf8()
                .unwrap();
            assert_eq!(decoded, detail);
            // Trailers-only: no messages follow.
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert!(body.is_empty());
        }
    }
}
