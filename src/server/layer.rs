use std::{sync::Arc, time::Duration};

use http::{HeaderName, Method, request, response};
use tokio_util::task::TaskTracker;
use tower_layer::Layer;

use super::{
    IdempotencyService,
    config::{Config, OnConflict, OnStoreError, Shared},
};
use crate::store::{KeyStore, MemoryStore};

/// The shortest lease or retention: stores keep time in milliseconds.
const MIN_TIME: Duration = Duration::from_millis(1);

/// Applies [`IdempotencyService`] to a service, with its settings.
///
/// Every setter consumes and returns the layer. Services made by one layer share its settings
/// and its in-process coalescing: a duplicate that reaches another route's service still waits
/// for the first request.
///
/// # Defaults
///
/// | setting | default |
/// | --- | --- |
/// | [`header_name`](Self::header_name) | `Idempotency-Key` |
/// | [`methods`](Self::methods) | `POST`, `PATCH` |
/// | [`pass_through_if`](Self::pass_through_if) | none: every request of those methods |
/// | [`require_key`](Self::require_key) | `false`: requests without a key pass through |
/// | [`scope`](Self::scope) | none: one key space for every caller |
/// | [`fingerprint_headers`](Self::fingerprint_headers) | none: method, path, query, `Content-Type` and body |
/// | [`on_conflict`](Self::on_conflict) | [`OnConflict::Wait`] |
/// | [`wait_timeout`](Self::wait_timeout) | 30 s |
/// | [`retention`](Self::retention) | 24 h |
/// | [`lease`](Self::lease) | 60 s, renewed until the response is stored |
/// | [`max_request_body`](Self::max_request_body) | 1 MiB (413 above) |
/// | [`max_stored_response`](Self::max_stored_response) | 1 MiB |
/// | [`store_if`](Self::store_if) | [`default_store_if`](super::default_store_if): every status but 1xx, 5xx, 408 and 429, and no gRPC failure that may pass |
/// | [`stream_if`](Self::stream_if) | [`default_stream_if`](super::default_stream_if): server-sent events go out as they are made, unstored |
/// | [`replay_excluded_headers`](Self::replay_excluded_headers) | [`default_replay_excluded`](super::default_replay_excluded): hop-by-hop headers, `Date`, `Set-Cookie` |
/// | [`on_store_error`](Self::on_store_error) | [`OnStoreError::FailClosed`] (503) |
/// | [`store_timeout`](Self::store_timeout) | 2 s per store call |
/// | [`detach`](Self::detach) | `true` |
/// | [`max_detached`](Self::max_detached) | 1,024 handlers |
#[derive(Clone)]
pub struct IdempotencyServiceLayer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for IdempotencyServiceLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyServiceLayer")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl Default for IdempotencyServiceLayer {
    /// A layer on a new [`MemoryStore`].
    fn default() -> Self {
        Self::new(MemoryStore::new())
    }
}

impl IdempotencyServiceLayer {
    /// A layer keeping keys in `store`, with the default settings.
    ///
    /// A [`MemoryStore`] (or an `Arc` of one) answers every step at once, so the service calls
    /// it directly rather than through a boxed future; any other store, a wrapper around a
    /// memory store included, is called through [`KeyStore`].
    pub fn new(store: impl KeyStore) -> Self {
        Self::with_shared_store(Arc::new(store))
    }

    /// A layer keeping keys in a store that is already shared, as [`new`](Self::new) does.
    pub fn with_shared_store(store: Arc<dyn KeyStore>) -> Self {
        Self {
            shared: Arc::new(Shared::new(Config::new(store))),
        }
    }

    fn config(&mut self) -> &mut Config {
        &mut Arc::make_mut(&mut self.shared).config
    }

    /// The request header the key is read from.
    pub fn header_name(mut self, name: HeaderName) -> Self {
        self.config().header = name;
        self
    }

    /// The methods the service makes idempotent; requests with other methods pass through
    /// untouched, with or without a key.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config().methods = methods.into_iter().collect();
        self
    }

    /// Lets the requests `predicate` picks pass through untouched, with or without a key: their
    /// bodies are not read first, nor their responses before they go out. For the endpoints of
    /// a method the service handles that must stream both ways, such as a gRPC service's
    /// streaming calls (every gRPC call is a `POST`).
    ///
    /// ```
    /// use tower_idempotency::IdempotencyServiceLayer;
    ///
    /// // The `Watch` call of the `orders.v1.Orders` gRPC service streams; its other calls don't.
    /// let layer = IdempotencyServiceLayer::default()
    ///     .pass_through_if(|parts| parts.uri.path() == "/orders.v1.Orders/Watch");
    /// # let _ = layer;
    /// ```
    pub fn pass_through_if<F>(mut self, predicate: F) -> Self
    where
        F: Fn(&request::Parts) -> bool + Send + Sync + 'static,
    {
        self.config().pass_through_if = Some(Arc::new(predicate));
        self
    }

    /// Whether a request with one of the [`methods`](Self::methods) must carry a key. When it
    /// must, a request without one is answered 400 and does not run.
    pub fn require_key(mut self, require: bool) -> Self {
        self.config().require_key = require;
        self
    }

    /// Scopes keys by what `scope` reads from the request head: a tenant, an API token, a user
    /// id. Requests in different scopes never share a key, so one caller can never be answered
    /// with another's response. When `scope` returns `None` or an empty string, a keyed request
    /// is answered 400: an empty scope would be the key space of a service with no scope, which
    /// may share the store.
    ///
    /// **A server with more than one client must set a scope.** Without one, every caller
    /// shares one key space, and a caller who guesses or reuses another's key gets that
    /// caller's response.
    ///
    /// The scope is read as the request reaches this layer, so what sets it (an
    /// authentication middleware that puts the caller's tenant in a header or an extension)
    /// must run first: outside this layer, which with axum's `Router::layer` means added after
    /// it. In the other order every keyed request is answered 400.
    ///
    /// This and [`scope_by_header`](Self::scope_by_header) replace each other: the one set last
    /// is used.
    pub fn scope<F>(mut self, scope: F) -> Self
    where
        F: Fn(&request::Parts) -> Option<String> + Send + Sync + 'static,
    {
        let config = self.config();
        config.scope = Some(Arc::new(scope));
        config.scope_header = None;
        self
    }

    /// Scopes keys by the value of the request header `name` (for example an API key or a
    /// tenant id that an authentication layer has checked). A keyed request is answered 400
    /// unless it carries the header exactly once, with a value that is not empty and is UTF-8:
    /// a header given twice (one value a client's, one a proxy's) or a value that would have to
    /// be altered to be read could otherwise put the request in another caller's scope.
    ///
    /// It replaces a [`scope`](Self::scope) set before, and is replaced by one set after.
    pub fn scope_by_header(self, name: HeaderName) -> Self {
        let read = name.clone();
        let mut layer = self.scope(move |parts| {
            let mut values = parts.headers.get_all(&read).iter();
            let (Some(value), None) = (values.next(), values.next()) else {
                return None;
            };
            std::str::from_utf8(value.as_bytes())
                .ok()
                .filter(|scope| !scope.is_empty())
                .map(str::to_owned)
        });
        layer.config().scope_header = Some(name);
        layer
    }

    /// Request headers that count towards the fingerprint, beside the method, path, query,
    /// `Content-Type` and body: a request that reuses a key with other values for them gets
    /// 422. Each counts as one list: `a, b` on one line and `a` and `b` on two are the same.
    /// Headers not named here, and a request's trailers, do not count.
    pub fn fingerprint_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.config().fingerprint_headers = names.into_iter().collect();
        self
    }

    /// What a duplicate does while the first request with its key is still running.
    pub fn on_conflict(mut self, on_conflict: OnConflict) -> Self {
        self.config().on_conflict = on_conflict;
        self
    }

    /// How long a duplicate waits for the first request before it is answered 409 (default
    /// 30 s). Zero answers every duplicate of a request in progress 409 at once.
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.config().wait_timeout = timeout;
        self
    }

    /// How long a completed response is kept and replayed; after it, the key may be used again.
    ///
    /// # Panics
    ///
    /// When `retention` is under a millisecond: nothing would be replayed.
    pub fn retention(mut self, retention: Duration) -> Self {
        assert!(
            retention >= MIN_TIME,
            "retention must be at least 1 ms (records kept for no time replay nothing), not {retention:?}"
        );
        self.config().retention = retention;
        self
    }

    /// The lease of a claim: if the process running the request dies, another may run it once
    /// this long has passed. While the handler runs and its response body is read, the lease is
    /// renewed every third of it.
    ///
    /// # Panics
    ///
    /// When `lease` is under a millisecond: a claim would lapse as it was made, and every
    /// duplicate would run.
    pub fn lease(mut self, lease: Duration) -> Self {
        assert!(
            lease >= MIN_TIME,
            "lease must be at least 1 ms (a claim that lapses at once lets every duplicate run), not {lease:?}"
        );
        self.config().lease = lease;
        self
    }

    /// Whether the lease is renewed while the handler runs and while its response body is read
    /// to be stored (on by default). Without renewal, a run slower than the lease loses its
    /// claim, and a duplicate the store then lets through runs too (with a store in another
    /// process, duplicates in the run's own process still wait on it; those of other
    /// processes run). A run's response is then stored only if, when it ends, no response is
    /// stored yet and no other run holds a live claim on the key; otherwise it is fenced (not
    /// stored, and logged). So the response kept is not always the first run's: the slow
    /// run's is kept when the duplicate's lease has lapsed too by the time the slow run ends.
    ///
    /// With renewal, a run that never ends (a handler that hangs, a body that stalls) holds its
    /// key for as long as the process lives, even once its caller has left. Bound runs inside
    /// this layer: tower's `TimeoutLayer` around the handler, and a body timeout such as
    /// tower-http's `ResponseBodyTimeoutLayer`; a run that times out gives its key back.
    ///
    /// A renewal the store refuses because the lease lapsed (the store was down for longer
    /// than the lease, say) is not tried again: the run goes on without a claim, and a
    /// duplicate that comes meanwhile runs. Give the lease room for the store outages it
    /// should ride out.
    ///
    /// Renewal takes a tokio runtime with its timers, as the service's waits do. A run polled
    /// outside any tokio runtime goes on without renewal, and says so in a warning; on a
    /// runtime built without timers it panics, as tokio's timers do.
    pub fn keep_lease_alive(mut self, keep_alive: bool) -> Self {
        self.config().keep_lease_alive = keep_alive;
        self
    }

    /// The largest request body, in bytes, buffered for the fingerprint (default 1 MiB); a
    /// larger one is answered 413 and does not run. Keyed requests are bounded by this limit
    /// as well as by axum's `DefaultBodyLimit` (2 MB): for larger bodies, raise both.
    pub fn max_request_body(mut self, bytes: usize) -> Self {
        self.config().max_request_body = bytes;
        self
    }

    /// The largest response body, in bytes, that is stored. A larger response still reaches
    /// its caller whole, streamed; the key is then done but cannot be replayed, and duplicates
    /// are told so with 409. The request never runs twice. The key is marked done as the
    /// response passes the limit, so a failure later in its body (an error, or a gRPC status
    /// in its trailers) does not free it for a retry.
    pub fn max_stored_response(mut self, bytes: usize) -> Self {
        self.config().max_stored_response = bytes;
        self
    }

    /// Which responses are stored and replayed. For the others the claim is released, so a
    /// retry runs the request again. The default, [`default_store_if`], stores every response
    /// but 1xx, 5xx, 408, 429 and a gRPC failure that may pass. A response whose trailers carry
    /// such a gRPC status ([`transient_grpc_status`]) is not stored either way, unless it is too
    /// large to store: such a response is marked done (not replayable) as it passes the limit,
    /// before its trailers come.
    ///
    /// A stored response is read whole (up to [`max_stored_response`](Self::max_stored_response))
    /// before its first byte goes out; one that should go out as it is made is for
    /// [`stream_if`](Self::stream_if). This rule is asked first: a response it leaves out is not
    /// streamed either, but released.
    ///
    /// ```
    /// use http::StatusCode;
    /// use tower_idempotency::{IdempotencyServiceLayer, server::default_store_if};
    ///
    /// // A 409 of the handler's own (a conflict with the current state) may pass: run it again.
    /// let layer = IdempotencyServiceLayer::default()
    ///     .store_if(|parts| parts.status != StatusCode::CONFLICT && default_store_if(parts));
    /// # let _ = layer;
    /// ```
    ///
    /// [`default_store_if`]: super::default_store_if
    /// [`transient_grpc_status`]: super::transient_grpc_status
    pub fn store_if<F>(mut self, predicate: F) -> Self
    where
        F: Fn(&response::Parts) -> bool + Send + Sync + 'static,
    {
        self.config().store_if = Arc::new(predicate);
        self
    }

    /// Which stored responses go out as they are made, rather than read whole first: their key
    /// is marked done as they start, without them, so the request still runs once, and a retry
    /// with the key is answered 409 (the response cannot be replayed). The default,
    /// [`default_stream_if`], streams server-sent events (`text/event-stream`). A failure later
    /// in such a body (an error, or a gRPC status in its trailers) does not free the key.
    ///
    /// ```
    /// use http::header::CONTENT_TYPE;
    /// use tower_idempotency::{IdempotencyServiceLayer, server::default_stream_if};
    ///
    /// // Newline-delimited JSON streams too.
    /// let layer = IdempotencyServiceLayer::default().stream_if(|parts| {
    ///     let ndjson = parts.headers.get(CONTENT_TYPE).is_some_and(|v| v == "application/x-ndjson");
    ///     ndjson || default_stream_if(parts)
    /// });
    /// # let _ = layer;
    /// ```
    ///
    /// [`default_stream_if`]: super::default_stream_if
    pub fn stream_if<F>(mut self, predicate: F) -> Self
    where
        F: Fn(&response::Parts) -> bool + Send + Sync + 'static,
    {
        self.config().stream_if = Arc::new(predicate);
        self
    }

    /// The response headers left out of a stored response, and so out of every replay. The
    /// first caller still gets them. This list replaces the default,
    /// [`default_replay_excluded`](super::default_replay_excluded): the hop-by-hop headers,
    /// `Date` and `Set-Cookie` (its docs show how to add to it). While `Connection` is among
    /// them, so are the headers a response names in it, which were for that connection only.
    pub fn replay_excluded_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.config().replay_excluded = names.into_iter().collect();
        self
    }

    /// What happens when the store fails.
    pub fn on_store_error(mut self, on_store_error: OnStoreError) -> Self {
        self.config().on_store_error = on_store_error;
        self
    }

    /// The longest the service waits for one store call before treating the store as failed
    /// (default 2 s). A store in this process ([`MemoryStore`]) answers at once, and is never
    /// timed.
    ///
    /// # Panics
    ///
    /// When `timeout` is under a millisecond: every call to a remote store would fail.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        assert!(
            timeout >= MIN_TIME,
            "store_timeout must be at least 1 ms (a remote store cannot answer in no time), not {timeout:?}"
        );
        self.config().store_timeout = timeout;
        self
    }

    /// Whether a handler whose caller goes away finishes anyway (on by default).
    ///
    /// The handler runs in the caller's task. When the caller drops the response future while
    /// the handler runs (a client that disconnects, a timeout layer above this one), what is
    /// left of the run moves into a task of its own: a half-done operation is never cancelled,
    /// and its response is stored for the retry. Off, the drop cancels the handler, and the
    /// claim is released at once so a retry can run.
    ///
    /// Such runs no longer hold what a layer outside this one reserves for a request (a
    /// concurrency limit's permit): limits meant to bound the handlers belong inside this
    /// layer, and [`max_detached`](Self::max_detached) bounds how many go on at once. To let
    /// them finish when the server shuts down, wait for [`background`](Self::background).
    pub fn detach(mut self, detach: bool) -> Self {
        self.config().detach = detach;
        self
    }

    /// How many handlers may go on at once after their callers went away (default 1,024),
    /// while they run or make their response's body. Past it, a run whose caller goes away is
    /// cancelled, as without [`detach`](Self::detach), and its claim released: clients that
    /// disconnect at once cannot start handlers without bound. Zero cancels every such run.
    pub fn max_detached(mut self, max: usize) -> Self {
        self.config().max_detached = max;
        self
    }

    /// The work this layer's services left running: the handlers whose callers went away (and
    /// the storing of their responses), and the store steps the service tries again after a
    /// store failed (a store's own tasks, such
    /// as those of `RedisStore`, are the store's). Wait for it after the server
    /// stopped taking requests, so that a run a client left finishes before the process exits:
    ///
    /// ```
    /// use std::time::Duration;
    /// use axum::{Router, routing::post};
    /// use tower_idempotency::IdempotencyServiceLayer;
    ///
    /// # #[tokio::main]
    /// # async fn main() -> std::io::Result<()> {
    /// let layer = IdempotencyServiceLayer::default();
    /// let background = layer.background();
    /// let app = Router::new().route("/orders", post(|| async { "created" })).layer(layer);
    ///
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// # let shutdown = async {};
    /// axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    /// // The server has stopped; what its handlers started goes on until it is done.
    /// if tokio::time::timeout(Duration::from_secs(30), background.wait()).await.is_err() {
    ///     eprintln!("{} tasks did not finish in time", background.len());
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn background(&self) -> Background {
        self.shared.background()
    }
}

impl Shared {
    pub(crate) fn background(&self) -> Background {
        Background(self.tasks.clone())
    }
}

/// The work an [`IdempotencyServiceLayer`]'s services left running in tasks of their own; see
/// [`IdempotencyServiceLayer::background`].
#[derive(Clone, Debug)]
pub struct Background(TaskTracker);

impl Background {
    /// How many tasks are running.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none is running.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Waits until none is running, including those started meanwhile. Meant for shutdown:
    /// with requests still coming in, it may not end.
    pub async fn wait(&self) {
        self.0.close();
        self.0.wait().await;
    }
}

impl<S> Layer<S> for IdempotencyServiceLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService::from_shared(inner, self.shared.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "lease must be at least 1 ms")]
    fn a_lease_of_no_time_is_refused() {
        let _ = IdempotencyServiceLayer::default().lease(Duration::ZERO);
    }

    #[test]
    #[should_panic(expected = "retention must be at least 1 ms")]
    fn a_retention_of_no_time_is_refused() {
        let _ = IdempotencyServiceLayer::default().retention(Duration::from_micros(999));
    }

    #[test]
    fn a_memory_store_is_called_directly_however_it_is_handed_over() {
        let memory = MemoryStore::new();
        let shared: Arc<dyn KeyStore> = Arc::new(memory.clone());
        for layer in [
            IdempotencyServiceLayer::new(memory.clone()),
            IdempotencyServiceLayer::new(Arc::new(memory.clone())),
            IdempotencyServiceLayer::with_shared_store(shared.clone()),
            IdempotencyServiceLayer::new(shared),
        ] {
            assert!(layer.shared.config.local.is_some(), "{layer:?}");
        }
    }

    #[test]
    #[should_panic(expected = "store_timeout must be at least 1 ms")]
    fn a_store_timeout_of_no_time_is_refused() {
        let _ = IdempotencyServiceLayer::default().store_timeout(Duration::ZERO);
    }

    #[test]
    fn debug_shows_the_settings_not_the_workings() {
        let layer = IdempotencyServiceLayer::default().lease(Duration::from_secs(5));
        let shown = format!("{layer:?}");
        assert!(
            shown.starts_with("IdempotencyServiceLayer { config: Config {"),
            "{shown}"
        );
        assert!(shown.contains("lease: 5s"), "{shown}");
        for internal in ["Flights", "TaskTracker", "OncePerMinute"] {
            assert!(!shown.contains(internal), "{shown}");
        }
        let service = format!("{:?}", layer.layer("inner"));
        assert!(service.starts_with("IdempotencyService { inner: \"inner\", config: Config {"));
    }

    #[test]
    fn a_millisecond_is_enough() {
        let _ = IdempotencyServiceLayer::default()
            .lease(MIN_TIME)
            .retention(MIN_TIME)
            .store_timeout(MIN_TIME);
    }
}
