//! The server half: run each create request once, and replay its response to retries.
//!
//! [`IdempotencyService`] reads the `Idempotency-Key` header of `POST` and `PATCH` requests.
//! The first request with a key runs; its response is stored and replayed, with
//! `Idempotent-Replayed: true`, to every later request with the same key for 24 hours.
//!
//! | the store holds | the request's fingerprint | answer |
//! | --- | --- | --- |
//! | nothing (or expired) | any | claim the key, run the handler once |
//! | a claim in flight | same | wait for it, then replay (409 + `Retry-After` in reject mode or past the wait timeout) |
//! | a claim in flight | different | 422 at once |
//! | a completed response | same | replay it |
//! | a completed response | different | 422 |
//!
//! The fingerprint covers the method, the path and query (as sent), the `Content-Type`, the body
//! and any headers you name. A named header counts as one list, however it is split over lines.
//!
//! # The service's own answers
//!
//! Every answer the service gives itself is an `application/problem+json` body (RFC 9457)
//! whose `detail` says what to do. Its `type` is `tag:tower-idempotency,2026:` followed by
//! one of these, for clients to tell them apart:
//!
//! | status | `type` ends with | when | `Retry-After` |
//! | --- | --- | --- | --- |
//! | 400 | `missing-idempotency-key` | no key, where [`require_key`](IdempotencyServiceLayer::require_key) asks for one | |
//! | 400 | `invalid-idempotency-key` | the key is empty, too long, has characters it may not, is given twice, or is `auto` (the placeholder a client library replaces with a fresh key, sent as it is) | |
//! | 400 | `missing-idempotency-scope` | the [scope](IdempotencyServiceLayer::scope) cannot be told | |
//! | 400 | `request-body-unreadable` | the request body failed while it was read | |
//! | 413 | `request-too-large` | the body is over [`max_request_body`](IdempotencyServiceLayer::max_request_body), or a limit outside the service cut it off | |
//! | 422 | `idempotency-key-reused` | the key was used for a different request | |
//! | 409 | `request-in-progress` | the first request with the key is still running (reject mode, or the wait timed out) | 1 s |
//! | 409 | `response-not-replayable` | the first request ran, but its response was not stored: too large, or [streamed](IdempotencyServiceLayer::stream_if) | |
//! | 503 | `idempotency-store-unavailable` | the store cannot be reached, and the service fails closed | 1 s |
//!
//! None of them runs the handler.
//!
//! A gRPC call (`Content-Type: application/grpc...`) would read such a body as gRPC frames, so
//! it gets the same answers as gRPC statuses instead: HTTP 200 with no message, `grpc-status`
//! INVALID_ARGUMENT for the 400s and the 422, RESOURCE_EXHAUSTED for the 413,
//! FAILED_PRECONDITION for the 409 that cannot be replayed, and UNAVAILABLE (the status a gRPC
//! client with a retry policy retries, with `grpc-retry-pushback-ms` for how long to wait) for
//! the other 409 and the 503, the detail in `grpc-message`. A gRPC-Web call is answered in its
//! own content type. A keyed request is read whole before its handler runs, and a keyed
//! response read whole before it goes out, so a keyed client-streaming or bidirectional call
//! would wait for its whole request stream, and a keyed server-streaming call would send
//! nothing until its stream ends: send keys on unary calls only, or leave the streaming calls
//! out with [`pass_through_if`](IdempotencyServiceLayer::pass_through_if).
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, atomic::{AtomicUsize, Ordering}};
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_idempotency::{IdempotencyServiceLayer, store::MemoryStore};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let runs = Arc::new(AtomicUsize::new(0));
//! let counter = runs.clone();
//! let svc = ServiceBuilder::new()
//!     .layer(IdempotencyServiceLayer::new(MemoryStore::new()))
//!     .service(service_fn(move |_req: Request<_>| {
//!         let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
//!         async move {
//!             let body = Full::new(Bytes::from(format!("order #{n}")));
//!             Ok::<_, std::convert::Infallible>(Response::builder().status(201).body(body).unwrap())
//!         }
//!     }));
//!
//! let create = || Request::post("/orders").header("idempotency-key", "order-42").body(Full::new(Bytes::from("{}"))).unwrap();
//!
//! let first = svc.clone().oneshot(create()).await?;
//! assert_eq!(first.status(), StatusCode::CREATED);
//! assert_eq!(first.into_body().collect().await?.to_bytes(), "order #1");
//!
//! // The retry is answered from the store; the handler does not run again.
//! let retry = svc.clone().oneshot(create()).await?;
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! assert_eq!(retry.into_body().collect().await?.to_bytes(), "order #1");
//!
//! // The same key with another body is refused.
//! let reused = Request::post("/orders").header("idempotency-key", "order-42").body(Full::new(Bytes::from("{\"x\":1}")))?;
//! assert_eq!(svc.clone().oneshot(reused).await?.status(), StatusCode::UNPROCESSABLE_ENTITY);
//! assert_eq!(runs.load(Ordering::SeqCst), 1);
//! # Ok(())
//! # }
//! ```
//!
//! # With axum: per route, or around the router
//!
//! `Router::layer` runs the service after routing, on each route and on the router's
//! fallback: a keyed request to a path no route matches is answered 404, and that answer is
//! stored and replayed like any other; the key then cannot be used for another request.
//! `Router::route_layer`, and a layer on one method router (`post(handler).layer(..)`), leave
//! the router's fallback out: its 404 is not stored. All three wrap the method router's own
//! fallback: a keyed `PATCH` to a path that serves only `POST` gets a 405 that is stored.
//!
//! Wrapping the whole router runs it before routing: a replay is answered without routing, and
//! no request pays for a clone and a box of the layer on each route (in the example server
//! that is about 9% less CPU per replay, and 1–2% per other request). axum serves its own body
//! type, so the wrapped router maps the response body back to it. Every keyed request is then
//! answered like any other, a 404 included.
//!
//! Behind `Router::nest`, a route sees its path without the nest's prefix. A layer put on
//! nested routers (or on their routes) sees `/orders` for both `/v1/orders` and `/v2/orders`,
//! so one key sent to both would be taken for one request and answered with the first's
//! response. Put the layer around the outer router, as below, or give each nested router a
//! store of its own.
//!
//! ```
//! use axum::{Router, body::Body, extract::Request, http::{Response, StatusCode}, routing::post};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_idempotency::{IdempotencyServiceLayer, server::ResponseBody, store::MemoryStore};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let router = Router::new().route("/orders", post(|| async { (StatusCode::CREATED, "created") }));
//!
//! // Per route, after routing:
//! let per_route: Router = router.clone().layer(IdempotencyServiceLayer::new(MemoryStore::new()));
//!
//! // Around the router, before routing:
//! let around = ServiceBuilder::new()
//!     // axum's own body type back; one passed on as it was (no key) is not boxed again.
//!     .map_response(|response: Response<ResponseBody<Body>>| {
//!         response.map(|body| body.into_inner().unwrap_or_else(Body::new))
//!     })
//!     .layer(IdempotencyServiceLayer::new(MemoryStore::new()))
//!     .service(router.clone());
//!
//! let order = || Request::post("/orders").header("idempotency-key", "order-7").body(Body::empty());
//! assert_eq!(per_route.clone().oneshot(order()?).await?.status(), StatusCode::CREATED);
//!
//! // A mistyped path: its 404 is stored under the key by `Router::layer`...
//! let typo = || Request::post("/order").header("idempotency-key", "order-8").body(Body::empty());
//! assert_eq!(per_route.clone().oneshot(typo()?).await?.status(), StatusCode::NOT_FOUND);
//! let again = per_route.oneshot(typo()?).await?;
//! assert_eq!(again.headers()["idempotent-replayed"], "true");
//! // ...and not by `Router::route_layer`, which leaves the fallback out.
//! let routes_only: Router = router.clone().route_layer(IdempotencyServiceLayer::new(MemoryStore::new()));
//! assert_eq!(routes_only.clone().oneshot(typo()?).await?.status(), StatusCode::NOT_FOUND);
//! let again = routes_only.oneshot(typo()?).await?;
//! assert!(again.headers().get("idempotent-replayed").is_none());
//! assert_eq!(around.clone().oneshot(order()?).await?.status(), StatusCode::CREATED);
//! let replay = around.clone().oneshot(order()?).await?;
//! assert_eq!(replay.headers()["idempotent-replayed"], "true");
//!
//! // Either one is served the same way:
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let server = axum::serve(listener, axum::ServiceExt::<Request>::into_make_service(around));
//! # drop(server);
//! # Ok(())
//! # }
//! ```
//!
//! # Scope keys in a server with many clients
//!
//! By default every caller shares one key space. **A multi-tenant server must set a
//! [scope](IdempotencyServiceLayer::scope)** (a tenant id, an API key, a user id), or a caller
//! who reuses another's key is answered with the other's response.
//!
//! # Streamed responses
//!
//! A response is stored whole, so it is read whole (up to
//! [`max_stored_response`](IdempotencyServiceLayer::max_stored_response)) before its first byte
//! goes out. Server-sent events are not: they go out as they are made, and their key is marked
//! done without them, so the request still runs once and a retry is told it cannot be replayed
//! (409). [`stream_if`](IdempotencyServiceLayer::stream_if) says which responses stream.
//!
//! # Compression goes outside
//!
//! A replay is the stored response, encoded as it was for the first request. Put a layer that
//! compresses responses (tower-http's `CompressionLayer`) outside this one, so that the record
//! is the plain response and each replay is compressed for the `Accept-Encoding` of its own
//! request; inside, a retry whose client does not accept the first one's encoding would get a
//! body it cannot read. A gRPC server compresses messages itself: give the calls one
//! `grpc-accept-encoding`, or name that header in
//! [`fingerprint_headers`](IdempotencyServiceLayer::fingerprint_headers) to answer a retry that
//! differs 422 (INVALID_ARGUMENT) rather than a replay it cannot decode.
//!
//! # Duplicates wait for the first request
//!
//! A duplicate that arrives while the first request runs waits for it and gets the same
//! answer. With a [`MemoryStore`](crate::store::MemoryStore), duplicates wait on the key's
//! claim and are woken the moment it completes. With a store in another process, one request
//! per key leads in each process and the others there with the same fingerprint wait on it
//! without asking the store (one with another fingerprint asks the store, which knows which
//! request the key is for), and the store tells the leaders of other processes when the key
//! completes.
//! [`OnConflict::Reject`] answers 409 at once instead.
//!
//! # What goes inside, and what outside
//!
//! A replay is the first response as the layers inside this one made it. Middleware that
//! should answer each request afresh goes outside: compression (above), a request id
//! (tower-http's `SetRequestIdLayer` and `PropagateRequestIdLayer`), tracing. Limits meant to
//! bound the handlers go inside: a run whose caller left holds no permit of a concurrency limit
//! outside (see [`detach`](IdempotencyServiceLayer::detach)).
//!
//! A timeout inside bounds each run, the runs whose callers left included. With axum, the
//! router's error type is `Infallible`, so the timeout's error becomes a response inside the
//! layer; a 408 is not stored, so the key is given back and a retry runs again:
//!
//! ```
//! use std::time::Duration;
//! use axum::{BoxError, Router, body::Body, error_handling::HandleErrorLayer, extract::Request, http::StatusCode, routing::post};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_idempotency::{IdempotencyServiceLayer, store::MemoryStore};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let slow = || async {
//!     tokio::time::sleep(Duration::from_secs(60)).await;
//!     StatusCode::CREATED
//! };
//! let app = Router::new().route("/orders", post(slow)).layer(
//!     ServiceBuilder::new()
//!         .layer(IdempotencyServiceLayer::new(MemoryStore::new()))
//!         .layer(HandleErrorLayer::new(|_: BoxError| async { StatusCode::REQUEST_TIMEOUT }))
//!         .timeout(Duration::from_secs(10)),
//! );
//!
//! let order = || Request::post("/orders").header("idempotency-key", "order-9").body(Body::empty());
//! assert_eq!(app.clone().oneshot(order()?).await?.status(), StatusCode::REQUEST_TIMEOUT);
//! // Not a replay: the key was given back, and the retry ran (and timed out) again.
//! let retry = app.oneshot(order()?).await?;
//! assert_eq!(retry.status(), StatusCode::REQUEST_TIMEOUT);
//! assert!(retry.headers().get("idempotent-replayed").is_none());
//! # Ok(())
//! # }
//! ```
//!
//! # Requests the application refused
//!
//! Every response but those [`store_if`](IdempotencyServiceLayer::store_if) leaves out is
//! stored, an answer of the application's that refuses the request included: axum's 400 for
//! JSON that does not parse, a 404 for a path no route matches, a validation error. A client
//! that corrects the request and sends it again with the same key is then answered 422 (the
//! key was used for another request), and should send the corrected one with a new key. To
//! let such a retry run instead, as Stripe's API does for a request that failed validation,
//! leave the refusals out of what is stored:
//!
//! ```
//! use http::StatusCode;
//! use tower_idempotency::{IdempotencyServiceLayer, server::default_store_if};
//!
//! let layer = IdempotencyServiceLayer::default().store_if(|response| {
//!     let refused = matches!(
//!         response.status,
//!         StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND | StatusCode::UNPROCESSABLE_ENTITY
//!     );
//!     !refused && default_store_if(response)
//! });
//! # let _ = layer;
//! ```
//!
//! Only do so where those answers come before anything was done: a handler that refuses
//! after it acted (a 422 once the payment went through) should have its refusal replayed.
//!
//! # Failures
//!
//! - A handler that returns an error or panics gives up its claim at once, so a retry runs;
//!   so does one whose caller goes away, with `detach(false)`. By default a handler whose caller
//!   disconnects is not cancelled ([`detach`](IdempotencyServiceLayer::detach)): it finishes in
//!   a task of its own, and the retry gets its stored response. Up to 1,024 such runs go on at
//!   once ([`max_detached`](IdempotencyServiceLayer::max_detached)), and a server that shuts
//!   down can wait for them ([`background`](IdempotencyServiceLayer::background)).
//! - A duplicate that waits gives up the inner service's readiness meanwhile (a concurrency
//!   limit's permit, a buffer's slot), and gets ready again only if it is to run, by its own
//!   wait's deadline (past it: 409).
//! - Responses with a 1xx, 5xx, 408 or 429 status, and gRPC answers whose `grpc-status` (in
//!   the headers or the trailers) is one a retry may get past, are not stored: the claim is
//!   released and a retry runs again ([`store_if`](IdempotencyServiceLayer::store_if) changes
//!   this). So a handler answers 5xx only when it did nothing: one that charged a card and then
//!   failed to answer would charge it again on the retry (clients retry 502, 503 and 504, this
//!   crate's among them). After the side effect, answer what happened, or store the 5xx.
//! - A claim carries a lease, renewed while the handler runs and while its response body is
//!   read. If the process dies, the key is free again once the lease lapses; a run whose lease
//!   lapsed stores its response only if, when it ends, no other run holds a live claim on the
//!   key and no response is stored yet.
//! - A response the store refuses to record (a Redis out of memory, say) still reaches its
//!   caller, and its key stays claimed while a task tries again, for up to one lease (five
//!   minutes at most; without [`keep_lease_alive`](IdempotencyServiceLayer::keep_lease_alive)
//!   the claim lasts its whole lease): a retry meanwhile waits rather than running the handler
//!   again.
//! - When the store fails, the service answers 503 without running the request
//!   ([`OnStoreError::FailOpen`] runs it instead, unless it is a duplicate that found the key
//!   in flight). A claim that the store grants after the service stopped waiting for it (the
//!   store timeout passed, or the caller went away) is given back as soon as the answer comes,
//!   within another store timeout, so a retry does not wait for its lease.

mod body;
mod config;
mod fingerprint;
mod flight;
mod future;
mod layer;
mod problem;
mod service;

pub use body::{RequestBody, ResponseBody};
pub use config::{
    OnConflict, OnStoreError, default_replay_excluded, default_store_if, default_stream_if,
    transient_grpc_status,
};
pub use future::ResponseFuture;
pub use layer::{Background, IdempotencyServiceLayer};
pub use service::IdempotencyService;
