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
//! The fingerprint covers the method, the path and query, the body and any headers you name.
//! Every answer the service gives itself is an `application/problem+json` body (RFC 9457) that
//! says what to do: 400 for a bad or missing key, 413 for a body over the limit, 422 for a
//! reused key, 409 while the first request runs, 503 when the store is down.
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
//! # Scope keys in a server with many clients
//!
//! By default every caller shares one key space. **A multi-tenant server must set a
//! [scope](IdempotencyServiceLayer::scope)** (a tenant id, an API key, a user id), or a caller
//! who reuses another's key is answered with the other's response.
//!
//! # Duplicates wait for the first request
//!
//! A duplicate that arrives while the first request runs waits for it and gets the same
//! answer. In one process this costs nothing: one request per key leads, the rest wait on it
//! without touching the store. Across processes sharing a store, the store tells waiters when
//! the key completes. [`OnConflict::Reject`] answers 409 at once instead.
//!
//! # Failures
//!
//! - A handler that returns an error, panics, or whose caller goes away gives up its claim at
//!   once, so a retry runs. By default a handler whose caller disconnects is not cancelled
//!   ([`detach`](IdempotencyServiceLayer::detach)): it finishes in a task of its own, and the
//!   retry gets its stored response.
//! - Responses with a 5xx, 408 or 429 status are not stored: the claim is released and a retry
//!   runs again ([`store_if`](IdempotencyServiceLayer::store_if) changes this).
//! - A claim carries a lease, renewed while the handler runs. If the process dies, the key is
//!   free again once the lease lapses; a run whose lease lapsed cannot store its response.
//! - When the store fails, the service answers 503 without running the request
//!   ([`OnStoreError::FailOpen`] runs it instead). A claim that the store grants after the
//!   service stopped waiting for it (the store timeout passed, or the caller went away) is
//!   given back as soon as the answer comes, within another store timeout, so a retry does not
//!   wait for its lease.

mod body;
mod config;
mod fingerprint;
mod flight;
mod future;
mod layer;
mod problem;
mod service;

pub use body::{RequestBody, ResponseBody};
pub use config::{OnConflict, OnStoreError};
pub use future::ResponseFuture;
pub use layer::IdempotencyServiceLayer;
pub use service::IdempotencyService;
