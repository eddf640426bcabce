//! The service's settings and their defaults.

use std::{
    any::Any,
    fmt,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use http::{HeaderMap, HeaderName, Method, StatusCode, header, request, response};

use super::flight::Flights;
use crate::{
    IDEMPOTENCY_KEY,
    store::{KeyStore, MemoryStore},
};

/// What a request does when another request with the same key is still running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnConflict {
    /// Wait for the running request, up to the wait timeout, and answer with its response
    /// (the default). Past the timeout: 409 with `Retry-After`.
    #[default]
    Wait,
    /// Answer 409 with `Retry-After` at once. A duplicate in this process of a request still
    /// asking a remote store about the key waits for that answer (one round trip): a key that
    /// turns out done is replayed, not refused; one that runs, or ran and was given back, is
    /// refused.
    Reject,
}

/// What the service does when its store fails or does not answer in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnStoreError {
    /// Answer 503 with `Retry-After` and do not run the request (the default): a retry with
    /// the same key is safe once the store is back.
    #[default]
    FailClosed,
    /// Run the request without idempotency, and log a warning. Duplicates in this process
    /// are still coalesced; duplicates elsewhere may run again. A duplicate that found the
    /// key in flight, and whose wait for it failed, is answered 503 all the same: it would
    /// run beside the request in progress.
    FailOpen,
}

pub(crate) type ScopeFn = dyn Fn(&request::Parts) -> Option<String> + Send + Sync;
pub(crate) type RequestPredicate = dyn Fn(&request::Parts) -> bool + Send + Sync;
pub(crate) type StorePredicate = dyn Fn(&response::Parts) -> bool + Send + Sync;

/// The settings shared by every service a layer makes.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) store: Arc<dyn KeyStore>,
    /// The store again when it is a [`MemoryStore`], whose steps are called directly.
    pub(crate) local: Option<MemoryStore>,
    pub(crate) header: HeaderName,
    pub(crate) methods: Vec<Method>,
    pub(crate) require_key: bool,
    pub(crate) scope: Option<Arc<ScopeFn>>,
    pub(crate) pass_through_if: Option<Arc<RequestPredicate>>,
    /// The header `scope` reads, when it was set by `scope_by_header`: error messages name it.
    pub(crate) scope_header: Option<HeaderName>,
    pub(crate) fingerprint_headers: Vec<HeaderName>,
    pub(crate) on_conflict: OnConflict,
    pub(crate) wait_timeout: Duration,
    pub(crate) retention: Duration,
    pub(crate) lease: Duration,
    pub(crate) keep_lease_alive: bool,
    pub(crate) max_request_body: usize,
    pub(crate) max_stored_response: usize,
    pub(crate) store_if: Arc<StorePredicate>,
    pub(crate) stream_if: Arc<StorePredicate>,
    pub(crate) replay_excluded: Vec<HeaderName>,
    pub(crate) on_store_error: OnStoreError,
    pub(crate) store_timeout: Duration,
    pub(crate) detach: bool,
    pub(crate) max_detached: usize,
}

/// The responses an [`IdempotencyServiceLayer`](super::IdempotencyServiceLayer) stores unless
/// told otherwise: every one but 1xx (no final answer), 5xx, 408, 429, and a gRPC answer whose
/// `grpc-status` header says it failed in passing (see [`transient_grpc_status`]). Those are
/// worth running again, so their claim is released for the retry.
///
/// Combine it with a rule of your own in
/// [`store_if`](super::IdempotencyServiceLayer::store_if).
pub fn default_store_if(parts: &response::Parts) -> bool {
    let status = parts.status;
    !(status.is_server_error()
        || status.is_informational()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        // gRPC answers 200, whatever happened.
        || (status == StatusCode::OK && transient_grpc_status(&parts.headers)))
}

/// The responses an [`IdempotencyServiceLayer`](super::IdempotencyServiceLayer) lets through
/// as they are made unless told otherwise: server-sent events (`Content-Type:
/// text/event-stream`), whose caller wants each event as it comes. See
/// [`stream_if`](super::IdempotencyServiceLayer::stream_if).
pub fn default_stream_if(parts: &response::Parts) -> bool {
    parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| {
            let media_type = value
                .as_bytes()
                .split(|&b| b == b';')
                .next()
                .unwrap_or_default();
            media_type
                .trim_ascii()
                .eq_ignore_ascii_case(b"text/event-stream")
        })
}

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Whether `headers` (a gRPC response's headers, or its trailers) carry a `grpc-status` that a
/// retry may get past: the codes that map to HTTP 5xx, 408, 429 or 499 (CANCELLED, UNKNOWN,
/// DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS), and
/// ABORTED, which maps to 409 but asks the client to try again (a transaction lost a race). gRPC
/// answers with HTTP 200 whatever happened, so its status is in this header.
///
/// A response whose trailers carry such a status is never stored, whatever
/// [`store_if`](super::IdempotencyServiceLayer::store_if) said of its head.
pub fn transient_grpc_status(headers: &HeaderMap) -> bool {
    let Some(status) = headers.get(GRPC_STATUS) else {
        return false;
    };
    matches!(
        status.as_bytes(),
        b"1" | b"2" | b"4" | b"8" | b"10" | b"12" | b"13" | b"14" | b"15"
    )
}

/// The response headers never replayed unless told otherwise: the hop-by-hop headers (RFC 9110
/// section 7.6.1, and the proxy authentication ones), `Date` (a replay gets a fresh one) and
/// `Set-Cookie` (one caller's session is not handed to another). `Trailer` is replayed: the
/// trailers are stored, and over HTTP/1.1 a server sends only those a response announces.
///
/// [`replay_excluded_headers`](super::IdempotencyServiceLayer::replay_excluded_headers)
/// replaces this list; to add to it, chain it:
///
/// ```
/// use http::HeaderName;
/// use tower_idempotency::{IdempotencyServiceLayer, server::default_replay_excluded};
///
/// let layer = IdempotencyServiceLayer::default().replay_excluded_headers(
///     default_replay_excluded().into_iter().chain([HeaderName::from_static("x-request-id")]),
/// );
/// # let _ = layer;
/// ```
pub fn default_replay_excluded() -> Vec<HeaderName> {
    vec![
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::DATE,
        header::SET_COOKIE,
    ]
}

impl Config {
    pub(crate) fn new(store: Arc<dyn KeyStore>) -> Self {
        // A memory store answers every step at once: the service calls it directly, however it
        // was handed over.
        let any: &dyn Any = &*store;
        let local = any
            .downcast_ref::<MemoryStore>()
            .or_else(|| any.downcast_ref::<Arc<MemoryStore>>().map(|store| &**store))
            .or_else(|| {
                // An `Arc<dyn KeyStore>` handed over as a store of its own.
                let shared = any.downcast_ref::<Arc<dyn KeyStore>>()?;
                (&**shared as &dyn Any).downcast_ref::<MemoryStore>()
            })
            .cloned();
        Self {
            store,
            local,
            header: IDEMPOTENCY_KEY,
            methods: vec![Method::POST, Method::PATCH],
            require_key: false,
            scope: None,
            pass_through_if: None,
            scope_header: None,
            fingerprint_headers: Vec::new(),
            on_conflict: OnConflict::Wait,
            wait_timeout: Duration::from_secs(30),
            retention: Duration::from_secs(24 * 60 * 60),
            lease: Duration::from_secs(60),
            keep_lease_alive: true,
            max_request_body: 1024 * 1024,
            max_stored_response: 1024 * 1024,
            store_if: Arc::new(default_store_if),
            stream_if: Arc::new(default_stream_if),
            replay_excluded: default_replay_excluded(),
            on_store_error: OnStoreError::FailClosed,
            store_timeout: Duration::from_secs(2),
            detach: true,
            max_detached: 1024,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("store", &self.store)
            .field("header", &self.header)
            .field("methods", &self.methods)
            .field("require_key", &self.require_key)
            .field("scoped", &self.scope.is_some())
            .field("fingerprint_headers", &self.fingerprint_headers)
            .field("on_conflict", &self.on_conflict)
            .field("wait_timeout", &self.wait_timeout)
            .field("retention", &self.retention)
            .field("lease", &self.lease)
            .field("keep_lease_alive", &self.keep_lease_alive)
            .field("max_request_body", &self.max_request_body)
            .field("max_stored_response", &self.max_stored_response)
            .field("replay_excluded", &self.replay_excluded)
            .field("on_store_error", &self.on_store_error)
            .field("store_timeout", &self.store_timeout)
            .field("detach", &self.detach)
            .field("max_detached", &self.max_detached)
            .finish_non_exhaustive()
    }
}

/// The settings, the in-process flights and the tasks left running, shared by a layer and
/// every service it makes.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) flights: Arc<Flights>,
    /// The tasks the services left running: the runs whose callers went away (and the
    /// storing of their responses), and the store steps tried again.
    pub(crate) tasks: tokio_util::task::TaskTracker,
    /// The runs whose callers went away.
    pub(crate) detached: Arc<Detached>,
}

/// How many runs whose callers went away go on, and the warning that one was cancelled.
pub(crate) struct Detached {
    running: AtomicUsize,
    pub(crate) cancelled: crate::clock::OncePerMinute,
}

impl Shared {
    pub(crate) fn new(config: Config) -> Self {
        Self {
            config,
            flights: Arc::new(Flights::new()),
            tasks: tokio_util::task::TaskTracker::new(),
            detached: Arc::new(Detached {
                running: AtomicUsize::new(0),
                cancelled: crate::clock::OncePerMinute::new(),
            }),
        }
    }

    /// Runs `task` in a task of its own, tracked; `false` (and `task` is dropped) outside a
    /// tokio runtime.
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) -> bool {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                self.tasks.spawn_on(task, &runtime);
                true
            }
            Err(_) => false,
        }
    }

    /// A place for one more run whose caller went away, if fewer than the most allowed go on.
    pub(crate) fn detached_slot(&self) -> Option<DetachedSlot> {
        let running = self.detached.running.fetch_add(1, Ordering::Relaxed);
        let slot = DetachedSlot(self.detached.clone());
        (running < self.config.max_detached).then_some(slot)
    }
}

/// One run's place among those whose callers went away; given back when dropped.
pub(crate) struct DetachedSlot(Arc<Detached>);

impl Drop for DetachedSlot {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}
