//! The request and response bodies the service hands on.

use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// The request body the inner service sees: the original body, or, for a request with an
    /// idempotency key, the buffered bytes that were fingerprinted (and the trailers, if any).
    pub struct RequestBody<B> {
        #[pin]
        kind: RequestKind<B>,
    }
}

pin_project! {
    #[project = RequestKindProj]
    enum RequestKind<B> {
        Inner { #[pin] body: B },
        Buffered { data: Option<Bytes>, trailers: Option<Box<HeaderMap>> },
    }
}

/// A request body as the inner service sees it when the service passes a request on
/// unread: to call an inner service directly, in a test of its own.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use tower_idempotency::server::RequestBody;
///
/// let body = RequestBody::from(Full::new(Bytes::from("tea")));
/// # let _ = body;
/// ```
impl<B> From<B> for RequestBody<B> {
    fn from(body: B) -> Self {
        Self::inner(body)
    }
}

impl<B> RequestBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        Self {
            kind: RequestKind::Inner { body },
        }
    }

    pub(crate) fn buffered(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            kind: RequestKind::Buffered {
                data: (!data.is_empty()).then_some(data),
                trailers: trailers.map(Box::new),
            },
        }
    }
}

impl<B> std::fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            RequestKind::Inner { .. } => f.write_str("RequestBody::Inner"),
            RequestKind::Buffered { data, .. } => {
                write!(
                    f,
                    "RequestBody::Buffered({} bytes)",
                    data.as_ref().map_or(0, Bytes::len)
                )
            }
        }
    }
}

impl<B: Body<Data = Bytes>> Body for RequestBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            RequestKindProj::Inner { body } => body.poll_frame(cx),
            RequestKindProj::Buffered { data, trailers } => Poll::Ready(match data.take() {
                Some(d) => Some(Ok(Frame::data(d))),
                None => trailers.take().map(|t| Ok(Frame::trailers(*t))),
            }),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Inner { body } => body.is_end_stream(),
            RequestKind::Buffered { data, trailers } => data.is_none() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Inner { body } => body.size_hint(),
            RequestKind::Buffered { data, trailers } => whole(data, trailers),
        }
    }
}

/// The size of a whole body still to send: exact, unless trailers follow. An exact size is sent
/// as `Content-Length`, and over HTTP/1.1 a body framed by its length has no room for trailers:
/// the server would drop them.
#[inline]
fn whole(data: &Option<Bytes>, trailers: &Option<Box<HeaderMap>>) -> SizeHint {
    let len = data.as_ref().map_or(0, |d| d.len() as u64);
    if trailers.is_some() {
        let mut hint = SizeHint::new();
        hint.set_lower(len);
        hint
    } else {
        SizeHint::with_exact(len)
    }
}

pin_project! {
    /// The response body the service answers with: the inner service's body, a buffered or
    /// replayed one, or an error response's.
    pub struct ResponseBody<B: Body> {
        #[pin]
        kind: ResponseKind<B>,
    }
}

pin_project! {
    #[project = ResponseKindProj]
    enum ResponseKind<B: Body> {
        Inner { #[pin] body: B },
        // A whole body: its one chunk and its trailers. Small, since responses are moved about
        // and boxed by the layers around this one.
        Full { data: Option<Bytes>, trailers: Option<Box<HeaderMap>> },
        // Part of a body, read before it proved too large to store or failed.
        Partial { partial: Box<Partial<B>> },
    }
}

/// The frames read of a body, then the rest of it, or the error that cut it short.
struct Partial<B: Body> {
    data: VecDeque<Bytes>,
    rest: Option<Pin<Box<B>>>,
    error: Option<B::Error>,
}

impl<B: Body> ResponseBody<B> {
    /// The inner service's own body, where the service passed it on as it was (a request
    /// without a key, a response it does not store, such as a 5xx, or a streamed one);
    /// otherwise `self`. A server that maps the body back
    /// to its own type (axum's `Body`) avoids boxing it a second time:
    /// `response.map(|body| body.into_inner().unwrap_or_else(Body::new))`.
    pub fn into_inner(self) -> Result<B, Self> {
        match self.kind {
            ResponseKind::Inner { body } => Ok(body),
            kind => Err(Self { kind }),
        }
    }

    pub(crate) fn inner(body: B) -> Self {
        Self {
            kind: ResponseKind::Inner { body },
        }
    }

    pub(crate) fn full(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            kind: ResponseKind::Full {
                data: (!data.is_empty()).then_some(data),
                trailers: trailers.map(Box::new),
            },
        }
    }

    /// The chunks read, then `rest` of the body or the `error` that cut it short.
    pub(crate) fn partial(
        data: VecDeque<Bytes>,
        rest: Option<Pin<Box<B>>>,
        error: Option<B::Error>,
    ) -> Self {
        Self {
            kind: ResponseKind::Partial {
                partial: Box::new(Partial { data, rest, error }),
            },
        }
    }
}

impl<B: Body> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            ResponseKind::Inner { .. } => f.write_str("ResponseBody::Inner"),
            ResponseKind::Full { data, .. } => write!(
                f,
                "ResponseBody::Full({} bytes)",
                data.as_ref().map_or(0, Bytes::len)
            ),
            ResponseKind::Partial { partial } => {
                write!(f, "ResponseBody::Partial({} chunks)", partial.data.len())
            }
        }
    }
}

impl<B: Body<Data = Bytes>> Body for ResponseBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            ResponseKindProj::Inner { body } => body.poll_frame(cx),
            ResponseKindProj::Full { data, trailers } => Poll::Ready(match data.take() {
                Some(data) => Some(Ok(Frame::data(data))),
                None => trailers.take().map(|t| Ok(Frame::trailers(*t))),
            }),
            ResponseKindProj::Partial { partial } => {
                if let Some(chunk) = partial.data.pop_front() {
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                if let Some(rest) = &mut partial.rest {
                    return rest.as_mut().poll_frame(cx);
                }
                Poll::Ready(partial.error.take().map(Err))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Inner { body } => body.is_end_stream(),
            ResponseKind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            ResponseKind::Partial { partial } => {
                partial.data.is_empty()
                    && partial.error.is_none()
                    && partial.rest.as_ref().is_none_or(|r| r.is_end_stream())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Inner { body } => body.size_hint(),
            ResponseKind::Full { data, trailers } => whole(data, trailers),
            ResponseKind::Partial { partial } => {
                let buffered: u64 = partial.data.iter().map(|d| d.len() as u64).sum();
                match &partial.rest {
                    // A body that failed has no length to give: given one, a server would send
                    // what was read as if it were whole, and the error would go unseen.
                    None if partial.error.is_some() => {
                        let mut out = SizeHint::new();
                        out.set_lower(buffered);
                        out
                    }
                    None => SizeHint::with_exact(buffered),
                    Some(rest) => {
                        let hint = rest.size_hint();
                        let mut out = SizeHint::new();
                        out.set_lower(hint.lower() + buffered);
                        if let Some(upper) = hint.upper() {
                            out.set_upper(upper + buffered);
                        }
                        out
                    }
                }
            }
        }
    }
}

/// How a body was buffered: a request's to fingerprint it, a response's to store it.
pub(crate) enum Buffered<E> {
    /// The whole body, within the limit.
    Whole {
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// The limit was passed: what was read so far. The rest is still in the body.
    TooLarge { chunks: VecDeque<Bytes> },
    /// The body failed part way.
    Failed { chunks: VecDeque<Bytes>, error: E },
}

pin_project! {
    /// Reads a body until its end or until more than `limit` bytes have come. A body that
    /// arrives in one chunk (the usual case) is kept as it is, without copying or collecting.
    pub(crate) struct Collect<B: Body> {
        #[pin]
        body: B,
        limit: usize,
        first: Option<Bytes>,
        more: VecDeque<Bytes>,
        len: usize,
        trailers: Option<HeaderMap>,
    }
}

impl<B: Body> Collect<B> {
    pub(crate) fn new(body: B, limit: usize) -> Self {
        Self {
            body,
            limit,
            first: None,
            more: VecDeque::new(),
            len: 0,
            trailers: None,
        }
    }
}

impl<B: Body<Data = Bytes>> Future for Collect<B> {
    type Output = Buffered<B::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let chunks = |first: &mut Option<Bytes>, more: &mut VecDeque<Bytes>| {
            let mut chunks = std::mem::take(more);
            if let Some(first) = first.take() {
                chunks.push_front(first);
            }
            chunks
        };
        loop {
            if *this.len > *this.limit {
                return Poll::Ready(Buffered::TooLarge {
                    chunks: chunks(this.first, this.more),
                });
            }
            match ready!(this.body.as_mut().poll_frame(cx)) {
                None => break,
                Some(Err(error)) => {
                    return Poll::Ready(Buffered::Failed {
                        chunks: chunks(this.first, this.more),
                        error,
                    });
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) => {
                        *this.len += data.len();
                        match this.first {
                            None => *this.first = Some(data),
                            Some(_) => this.more.push_back(data),
                        }
                    }
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            this.trailers.get_or_insert_with(HeaderMap::new).extend(t);
                        }
                    }
                },
            }
        }
        let data = match (this.first.take(), this.more.is_empty()) {
            (None, _) => Bytes::new(),
            (Some(only), true) => only,
            (Some(first), false) => {
                let mut joined = bytes::BytesMut::with_capacity(*this.len);
                joined.extend_from_slice(&first);
                for chunk in this.more.drain(..) {
                    joined.extend_from_slice(&chunk);
                }
                joined.freeze()
            }
        };
        Poll::Ready(Buffered::Whole {
            data,
            trailers: this.trailers.take(),
        })
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::combinators::BoxBody;

    use super::*;

    type Failing = ResponseBody<BoxBody<Bytes, &'static str>>;

    #[test]
    fn a_body_cut_short_by_an_error_gives_no_exact_length() {
        let read = || VecDeque::from([Bytes::from_static(b"run=1;")]);
        let failed = Failing::partial(read(), None, Some("upstream reset"));
        assert_eq!(failed.size_hint().exact(), None);
        assert_eq!(failed.size_hint().lower(), 6);
        let whole = Failing::partial(read(), None, None);
        assert_eq!(whole.size_hint().exact(), Some(6));
    }

    #[test]
    fn only_a_body_passed_on_as_it_was_is_given_back() {
        let passed = ResponseBody::inner(http_body_util::Full::new(Bytes::from_static(b"inner")));
        let body = passed.into_inner().expect("the inner body");
        assert_eq!(body.size_hint().exact(), Some(5));
        let made =
            ResponseBody::<http_body_util::Full<Bytes>>::full(Bytes::from_static(b"stored"), None);
        let made = made.into_inner().expect_err("a body the service made");
        assert_eq!(made.size_hint().exact(), Some(6));
    }
}
