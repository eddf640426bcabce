//! The client half: send an idempotency key with create requests, and retry them safely.
//!
//! - [`IdempotencyLayer`] puts the key on a request: the one the caller chose (an
//!   [`IdempotencyKey`](crate::IdempotencyKey) in the request's extensions), or a generated
//!   UUID v4 for the methods it was told to (POST and PATCH once turned on). A request that
//!   already has the header keeps it (unless it is `auto`, which asks for a fresh one, on any
//!   method); otherwise GET and the other safe methods never get a generated key.
//! - [`RetryPolicy`] is a [`tower::retry::Policy`] for 502, 503, 504, 429, 408 (honouring
//!   `Retry-After`), the idempotency server's 409 "still running", connection failures and
//!   timeouts, with exponential backoff, jitter and a
//!   bounded number of attempts. It refuses to retry a POST or PATCH that has no key.
//! - [`IdempotentClientLayer`] puts them together in the only safe order, with a timeout for
//!   each attempt. Use it: it is the way this module is meant to be used.
//!
//! # Example
//!
//! A server that is unavailable for two attempts; the third gets through, and all three
//! carried the same key.
//!
//! ```
//! use std::{convert::Infallible, sync::{Arc, Mutex}, time::Duration};
//!
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
//! use tower_idempotency::{
//!     IdempotencyKey,
//!     client::{IdempotencyLayer, IdempotentClientLayer, RetryPolicy},
//! };
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let keys_seen = Arc::new(Mutex::new(Vec::new()));
//! let server = service_fn({
//!     let keys_seen = keys_seen.clone();
//!     move |req: Request<Full<Bytes>>| {
//!         let mut keys_seen = keys_seen.lock().unwrap();
//!         keys_seen.push(req.headers()["idempotency-key"].clone());
//!         let status = match keys_seen.len() {
//!             1 | 2 => StatusCode::SERVICE_UNAVAILABLE,
//!             _ => StatusCode::CREATED,
//!         };
//!         let res = Response::builder().status(status).body(String::new());
//!         async move { Ok::<_, Infallible>(res.unwrap()) }
//!     }
//! });
//!
//! let mut client = ServiceBuilder::new()
//!     .layer(
//!         IdempotentClientLayer::new()
//!             // Keys from request extensions, and a UUID v4 for a POST or PATCH without one.
//!             .keys(IdempotencyLayer::new().generate_keys())
//!             .retry(
//!                 RetryPolicy::new()
//!                     .max_attempts(4)
//!                     .backoff(Duration::from_millis(10), Duration::from_secs(1)),
//!             )
//!             .attempt_timeout(Duration::from_secs(5)),
//!     )
//!     .service(server);
//!
//! let mut req = Request::post("http://control-plane/api/v1/deployments")
//!     .body(Full::new(Bytes::from_static(b"{\"name\":\"my-deployment\"}")))?;
//! req.extensions_mut().insert(IdempotencyKey::new("deploy-v1")?);
//!
//! let res = client.ready().await?.call(req).await?;
//! assert_eq!(res.status(), StatusCode::CREATED);
//! assert_eq!(*keys_seen.lock().unwrap(), ["deploy-v1"; 3]);
//! // The key that was sent comes back in the response's extensions.
//! assert_eq!(res.extensions().get::<IdempotencyKey>().unwrap().as_str(), "deploy-v1");
//! # Ok(())
//! # }
//! ```
//!
//! # Choosing the key
//!
//! Per request, put a key in the extensions: `IdempotencyKey::new("deploy-v1")?` for a key
//! tied to the operation, which also protects a retry made later by another process, or
//! `IdempotencyKey::auto()` for a fresh UUID v4 (what the special value `"auto"` asks for in
//! other SDKs), which protects the retries of this one call. Make it for each call:
//! `IdempotencyKey::new("auto")` is refused, since one key made of it and reused would send the
//! same key for every operation.
//! With `.generate_keys()` every POST and PATCH that has no key gets an `auto` one. The key
//! sent is in the response's extensions either way; to keep one for retrying after a call
//! that failed, make it before the call and store it.
//!
//! # Why the order matters, and what goes wrong otherwise
//!
//! The key must be written *before* the retry makes its copy of the request, or each attempt
//! would carry a different generated key and the server would run each one. The timeout must
//! be *inside* the retry, or it would bound all attempts together and a slow first attempt
//! would never be retried. [`IdempotentClientLayer`] fixes that order in its type:
//! `Idempotency<Retry<RetryPolicy, Timeout<S>>>`.
//!
//! Should you compose the layers by hand, list them in this order:
//! `ServiceBuilder::new().layer(IdempotencyLayer::new()).retry(RetryPolicy::new()).timeout(d)`.
//! The policy looks for each request's key under the header the key layer wrote it to, so a
//! `header_name` set on the layer needs no repeating.
//! Put the key layer inside the retry by mistake and POSTs and PATCHes without a key header of
//! their own (or with `auto`) are simply not retried: the policy sees no key on its copy of the
//! request and refuses, even for one with an [`IdempotencyKey`](crate::IdempotencyKey) in its
//! extensions (the policy cannot tell whether a key layer below it will send that key). Keys
//! generated for a method the policy retries without a key (PUT, with `generate_keys_for`)
//! would change on every attempt in that order: keep it right.
//!
//! # Request bodies
//!
//! The retry needs to send the body again, so the stack takes bodies that implement
//! [`ReplayBody`] (`Full<Bytes>`, `String`, `Bytes`, `Empty` and the like); a stack over a
//! boxed body (`BoxBody`, axum's `Body`), which may stream, does not compile. Buffer a
//! streaming body into a `Full` first (see [`ReplayBody`]).
//!
//! # Logging
//!
//! Each attempt is a `tracing` debug event under the `tower_idempotency::client` target, and
//! so is each decision to retry or not, for example with
//! `RUST_LOG=tower_idempotency::client=debug`:
//!
//! ```text
//! Request: POST /api/v1/deployments request_id=abc123 idempotency_key=deploy-v1 attempt=1
//! retrying attempt=1 outcome=503 wait=1.2s
//! Request: POST /api/v1/deployments request_id=abc123 idempotency_key=deploy-v1 attempt=2
//! ```

mod body;
mod layer;
mod policy;
mod stack;

pub use body::ReplayBody;
pub use layer::{Idempotency, IdempotencyLayer, MakeIdempotencyKey, MakeUuidKey, ResponseFuture};
pub use policy::{ClassifyError, RetryAnyError, RetryPolicy};
pub use stack::{IdempotentClient, IdempotentClientLayer};

#[cfg(test)]
mod tests;
