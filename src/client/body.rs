use bytes::Bytes;
use http::Request;
use http_body_util::{Either, Empty, Full};

/// A request body that can be sent again: what the retry policy needs to re-send a request.
///
/// Bodies held in memory replay: [`Full`], [`Empty`], [`String`], [`Bytes`], `Vec<u8>`,
/// `&'static str`, `()`, and an [`Either`] of two of them. Boxed bodies (`BoxBody`,
/// `UnsyncBoxBody`, axum's `Body`) may stream, and do not implement it: a client stack over
/// them does not compile, rather than compile and never retry.
///
/// ```compile_fail
/// use bytes::Bytes;
/// use http_body_util::combinators::BoxBody;
/// use tower_idempotency::client::ReplayBody;
///
/// fn retryable<B: ReplayBody>() {}
/// retryable::<BoxBody<Bytes, std::convert::Infallible>>();
/// ```
///
/// # Buffering a streaming body
///
/// To make a streaming body retryable, read it into memory first and send a [`Full`]:
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::{BodyExt, Full};
///
/// # async fn buffer(body: http_body_util::combinators::BoxBody<Bytes, std::io::Error>)
/// # -> Result<(), std::io::Error> {
/// let bytes: Bytes = body.collect().await?.to_bytes();
/// let replayable = Full::new(bytes);
/// # let _ = replayable;
/// # Ok(())
/// # }
/// ```
///
/// Your own body type can implement this trait too: return `None` when this value cannot be
/// sent again (a request with such a body is sent once, and never retried).
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be sent again, so the retry policy cannot take it",
    label = "a request body the retry policy needs to copy",
    note = "buffer the body into `http_body_util::Full<Bytes>` (see `ReplayBody`), or implement `ReplayBody` for it"
)]
pub trait ReplayBody: Sized {
    /// A copy of the body to send again, or `None` when this body can be sent only once.
    fn replay(&self) -> Option<Self>;
}

impl<D: Clone> ReplayBody for Full<D> {
    fn replay(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl<D> ReplayBody for Empty<D> {
    fn replay(&self) -> Option<Self> {
        Some(Empty::new())
    }
}

impl ReplayBody for String {
    fn replay(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl ReplayBody for Bytes {
    fn replay(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl ReplayBody for Vec<u8> {
    fn replay(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl ReplayBody for &'static str {
    fn replay(&self) -> Option<Self> {
        Some(self)
    }
}

impl ReplayBody for () {
    fn replay(&self) -> Option<Self> {
        Some(())
    }
}

impl<L: ReplayBody, R: ReplayBody> ReplayBody for Either<L, R> {
    fn replay(&self) -> Option<Self> {
        match self {
            Either::Left(l) => l.replay().map(Either::Left),
            Either::Right(r) => r.replay().map(Either::Right),
        }
    }
}

/// Copies a request whose body replays: method, URI, version, headers (and so the idempotency
/// key) and extensions.
pub(crate) fn replay_request<B: ReplayBody>(req: &Request<B>) -> Option<Request<B>> {
    let body = req.body().replay()?;
    let mut copy = Request::new(body);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    *copy.extensions_mut() = req.extensions().clone();
    Some(copy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn replayed_request_keeps_everything() {
        let mut req = Request::post("http://example.test/api/v1/deployments?x=1")
            .header("idempotency-key", "deploy-v1")
            .body(Full::new(Bytes::from_static(b"{\"name\":\"a\"}")))
            .unwrap();
        req.extensions_mut().insert(7u32);
        let copy = replay_request(&req).unwrap();
        assert_eq!(copy.method(), req.method());
        assert_eq!(copy.uri(), req.uri());
        assert_eq!(copy.headers(), req.headers());
        assert_eq!(copy.extensions().get::<u32>(), Some(&7));
    }

    #[tokio::test]
    async fn full_body_replays_its_bytes() {
        let body = Full::new(Bytes::from_static(b"payload"));
        let again = body.replay().unwrap();
        assert_eq!(again.collect().await.unwrap().to_bytes(), "payload");
    }
}
