//! Make "create" requests safe to retry.
//!
//! A client that times out cannot know whether the server created the order. It sends the
//! request again with the same `Idempotency-Key`, and the server must run the operation once and
//! give every retry the first answer. This crate is both halves, for any `tower` service (axum,
//! hyper, tonic):
//!
//! - [`IdempotencyLayer`] (the [`client`] half) puts a key on create requests, the caller's own
//!   or a generated UUID v4, and keeps it on every retry; [`client::IdempotentClientLayer`] adds
//!   a retry policy for 502, 503, 504, 429, 408, the server's 409 with `Retry-After`, connection
//!   failures and timeouts, that refuses to retry a `POST` or `PATCH` without a key.
//! - [`IdempotencyService`] runs the first request for each key once, stores its response, and
//!   replays it to later requests with the key (24 h by default). A duplicate that arrives while
//!   the first runs waits for it and gets the same answer. A key reused with a different request
//!   gets 422.
//! - Keys live in a [`KeyStore`](store::KeyStore): [`MemoryStore`](store::MemoryStore) in this
//!   process (the default), or, with the `redis` feature, Redis shared by many processes.
//!
//! # Quick start with axum
//!
//! ```
//! use axum::{Router, routing::post};
//! use tower_idempotency::{IdempotencyServiceLayer, store::MemoryStore};
//!
//! async fn create_order(body: String) -> (http::StatusCode, String) {
//!     (http::StatusCode::CREATED, format!("created {body}"))
//! }
//!
//! let app: Router = Router::new()
//!     .route("/orders", post(create_order))
//!     .layer(IdempotencyServiceLayer::new(MemoryStore::new()));
//! # let _ = app;
//! ```
//!
//! Every `POST` and `PATCH` with an `Idempotency-Key` header now runs once:
//!
//! ```
//! # use axum::{Router, routing::post};
//! # use tower_idempotency::{IdempotencyServiceLayer, store::MemoryStore};
//! # use tower::ServiceExt;
//! # use http_body_util::BodyExt;
//! # async fn create_order(body: String) -> (http::StatusCode, String) {
//! #     (http::StatusCode::CREATED, format!("created {body}"))
//! # }
//! # #[tokio::main]
//! # async fn main() {
//! # let app: Router = Router::new()
//! #     .route("/orders", post(create_order))
//! #     .layer(IdempotencyServiceLayer::new(MemoryStore::new()));
//! let request = || {
//!     http::Request::post("/orders")
//!         .header("idempotency-key", "order-42")
//!         .body(axum::body::Body::from("tea"))
//!         .unwrap()
//! };
//! let first = app.clone().oneshot(request()).await.unwrap();
//! assert_eq!(first.status(), 201);
//!
//! let retry = app.clone().oneshot(request()).await.unwrap();
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! assert_eq!(retry.into_body().collect().await.unwrap().to_bytes(), "created tea");
//! # }
//! ```
//!
//! On a server, the layer is [`IdempotencyServiceLayer`]; [`IdempotencyLayer`] is the client's,
//! which only writes keys onto outgoing requests.
//!
//! **A server with more than one client must [scope](IdempotencyServiceLayer::scope) its keys**
//! (by tenant, API key or user), or one caller reusing another's key gets the other's response.
//!
//! # Modules
//!
//! - [`client`]: the key layer, the retry policy, and the stack that composes them safely.
//! - [`server`]: the service, its settings and its behaviour in detail.
//! - [`store`]: the store trait, the memory store, and (feature `test-util`) the conformance
//!   suite for your own stores.
//! - [`key`]: the key type and its validation.
//!
//! # Features
//!
//! - `redis`: the Redis store.
//! - `test-util`: `store::conformance` and the `key_store_conformance!` macro.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod client;
mod clock;
mod digest;
pub mod key;
#[cfg(test)]
mod logged;
pub mod server;
pub mod store;

pub use client::IdempotencyLayer;
pub use key::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, IdempotencyKey, InvalidKey};
pub use server::{IdempotencyService, IdempotencyServiceLayer};

/// The README's code, compiled with the doctests.
#[cfg(all(doctest, feature = "redis"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
