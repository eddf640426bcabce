//! What the in-process benches share: the request, the trivial handler, and sending one
//! through a service as a server would.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::runtime::Runtime;
use tower::{Service, ServiceExt};

pub(crate) const BODY: &[u8] = br#"{"sku":"tea","qty":1}"#;
pub(crate) const ANSWER: &[u8] = br#"{"id":"8f14e45f","status":"created"}"#;

pub(crate) fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

pub(crate) fn request(key: Option<&str>) -> Request<Full<Bytes>> {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri("/orders")
        .header("content-type", "application/json");
    if let Some(key) = key {
        // As hyper hands it over: a slice of a buffer shared with the rest of the request.
        let read = Bytes::from(format!("idempotency-key: {key}"));
        let value = http::HeaderValue::from_maybe_shared(read.slice("idempotency-key: ".len()..))
            .expect("a valid key");
        req = req.header("idempotency-key", value);
    }
    req.body(Full::new(Bytes::from_static(BODY)))
        .expect("a valid request")
}

/// The trivial handler, generic over the request body so that both services run the same code.
pub(crate) fn handler<B>(
    _req: Request<B>,
) -> std::future::Ready<Result<Response<Full<Bytes>>, Infallible>> {
    std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(ANSWER)))))
}

/// The trivial handler, after yielding twice to the runtime: duplicates spawned with the first
/// request all reach the service before it answers.
pub(crate) async fn yielding<B>(req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    tokio::task::yield_now().await;
    tokio::task::yield_now().await;
    handler(req).await
}

/// Sends `req` through `svc` and reads the whole response body, as a server would.
pub(crate) async fn send<S, B, RB>(svc: &S, req: Request<B>)
where
    S: Service<Request<B>, Response = Response<RB>, Error = Infallible> + Clone,
    RB: http_body::Body<Data = Bytes>,
    RB::Error: std::fmt::Debug,
{
    let response = svc.clone().oneshot(req).await.expect("infallible");
    assert!(response.status().is_success());
    let body = response.into_body().collect().await.expect("a body");
    std::hint::black_box(body);
}
