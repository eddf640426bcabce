//! The service's own answers: `application/problem+json` bodies (RFC 9457).

use std::fmt::Write as _;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode, header};
use http_body::Body;

use super::body::ResponseBody;
use crate::{IDEMPOTENCY_KEY, InvalidKey};

/// Seconds a client is asked to wait before retrying a 409 or 503.
const RETRY_AFTER_SECS: u64 = 1;

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

    pub(crate) fn into_response<B: Body>(self) -> Response<ResponseBody<B>> {
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
        if matches!(
            status,
            StatusCode::CONFLICT | StatusCode::SERVICE_UNAVAILABLE
        ) && !matches!(self, Self::NotReplayable { .. })
        {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
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
        .into_response::<Full<Bytes>>();
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
            let response = problem.into_response::<Full<Bytes>>();
            assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        }
        let response = Problem::NotReplayable {
            status: StatusCode::OK,
        }
        .into_response::<Full<Bytes>>();
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert!(response.headers().get(header::RETRY_AFTER).is_none());
    }
}
