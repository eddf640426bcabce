use std::{
    fmt,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header, request, response,
};
use http_body::Body;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use super::{
    IdempotencyServiceLayer, ResponseFuture,
    body::{Buffered, Collect, RequestBody, ResponseBody},
    config::{Config, OnConflict, OnStoreError, Shared},
    fingerprint::fingerprint,
    flight::{Join, Lead, Outcome, follow},
    future::{Answer, BoxFuture, Respond, Step, Work},
    problem::{Dialect, Problem},
};
use crate::{
    IDEMPOTENT_REPLAYED, InvalidKey,
    clock::{self, Backoff},
    key,
    store::{
        BoxError, Claim, Completion, FencingToken, Fingerprint, Holder, KeyStore, MemoryStore,
        Record, RecordView, StoreError, StoreKey,
    },
};

/// Runs the first request for each idempotency key once, stores its response, and replays it
/// to every later request with that key.
///
/// See the [module docs](super) for the behaviour and an example, and
/// [`IdempotencyServiceLayer`] for the settings.
///
/// # The inner service
///
/// A keyed request's body is read before the handler runs, so the inner service takes
/// `Request<RequestBody<B>>` (a [`RequestBody`](super::RequestBody) over the body type `B` the
/// service is called with), and its response body goes out as a
/// [`ResponseBody`](super::ResponseBody). axum's router takes any body, so it fits as it is; a
/// hand-written service names the type:
///
/// ```
/// use std::convert::Infallible;
/// use bytes::Bytes;
/// use http::{Request, Response};
/// use http_body_util::Full;
/// use tower::service_fn;
/// use tower_idempotency::{IdempotencyService, server::RequestBody, store::MemoryStore};
///
/// let handler = service_fn(|_request: Request<RequestBody<Full<Bytes>>>| async {
///     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("created"))))
/// });
/// let service = IdempotencyService::new(handler, MemoryStore::new());
/// # let _ = service;
/// ```
///
/// The inner service must be `Clone + Send + 'static`, with a `Send + 'static` future: a run
/// whose caller goes away goes on in a task of its own. Its errors pass through unchanged.
///
/// # Runtime
///
/// The service runs in a tokio runtime with timers: a handler whose caller goes away finishes
/// in a task of its own (see [`detach`](IdempotencyServiceLayer::detach)), a claim a remote
/// store failed to complete or release is tried again from a task, and a lease is renewed on a
/// timer. Outside any runtime, a run whose caller goes away is dropped (its claim released at
/// once in a memory store, and left to lapse with its lease in a remote one), and a handler
/// that waits goes on without its lease renewed, with a warning.
#[derive(Clone)]
pub struct IdempotencyService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: fmt::Debug> fmt::Debug for IdempotencyService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyService")
            .field("inner", &self.inner)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

/// What a keyed request needs of the inner service: it moves into a task of its own.
pub(super) trait Inner<ReqBody, ResBody>:
    Service<
        Request<RequestBody<ReqBody>>,
        Response = Response<ResBody>,
        Future: Send + 'static,
        Error: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S, ReqBody, ResBody> Inner<ReqBody, ResBody> for S where
    S: Service<
            Request<RequestBody<ReqBody>>,
            Response = Response<ResBody>,
            Future: Send + 'static,
            Error: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// The inner service a keyed request holds: ready to be called, or given up while the request
/// waits, so that a duplicate does not keep what readiness reserves (a concurrency limit's
/// permit, a buffer's slot) from other requests for as long as it waits.
enum Ready<S> {
    Ready(S),
    Unready(S),
}

impl<S: Clone> Ready<S> {
    /// Gives up the ready service before a wait, keeping a clone.
    fn release(self) -> Self {
        match self {
            Ready::Ready(ready) => Ready::Unready(ready.clone()),
            unready => unready,
        }
    }

    /// The service, ready to be called: at once if it was not given up, else once its clone
    /// is ready.
    async fn ready<R>(self) -> Result<S, S::Error>
    where
        S: Service<R>,
    {
        match self {
            Ready::Ready(ready) => Ok(ready),
            Ready::Unready(mut service) => {
                std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
                Ok(service)
            }
        }
    }
}

/// A response body that can move between tasks.
pub(super) trait SendBody:
    Body<Data = Bytes, Error: Send + 'static> + Send + 'static
{
}

impl<B: Body<Data = Bytes, Error: Send + 'static> + Send + 'static> SendBody for B {}

impl IdempotencyService<()> {
    /// A layer keeping keys in `store`; its setters change the settings. The same as
    /// [`IdempotencyServiceLayer::new`].
    ///
    /// ```
    /// use tower_idempotency::{IdempotencyService, store::MemoryStore};
    ///
    /// let layer = IdempotencyService::layer(MemoryStore::new());
    /// # let _ = layer;
    /// ```
    pub fn layer(store: impl KeyStore) -> IdempotencyServiceLayer {
        IdempotencyServiceLayer::new(store)
    }
}

impl<S> IdempotencyService<S> {
    /// Wraps `inner`, keeping keys in `store`, with the default settings.
    pub fn new(inner: S, store: impl KeyStore) -> Self {
        IdempotencyServiceLayer::new(store).layer(inner)
    }

    pub(crate) fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The work this service and its clones left running; see
    /// [`IdempotencyServiceLayer::background`].
    pub fn background(&self) -> super::Background {
        self.shared.background()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for IdempotencyService<S>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send + 'static,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let config = &self.shared.config;
        if !config.methods.contains(req.method()) {
            return ResponseFuture::passthrough(self.inner.call(req.map(RequestBody::inner)));
        }
        let req = match &config.pass_through_if {
            Some(pass) => {
                let (parts, body) = req.into_parts();
                if pass(&parts) {
                    let req = Request::from_parts(parts, RequestBody::inner(body));
                    return ResponseFuture::passthrough(self.inner.call(req));
                }
                Request::from_parts(parts, body)
            }
            None => req,
        };
        let value = match key::single_value(req.headers(), &config.header) {
            // A copy of a header value shares its bytes.
            Ok(Some(value)) => value.clone(),
            Ok(None) if config.require_key => {
                let problem = Problem::MissingKey {
                    header: config.header.clone(),
                };
                return ResponseFuture::ready(reject(problem, Dialect::of(req.headers())));
            }
            Ok(None) => {
                return ResponseFuture::passthrough(self.inner.call(req.map(RequestBody::inner)));
            }
            Err(err) => {
                let problem = invalid_key(config, err);
                return ResponseFuture::ready(reject(problem, Dialect::of(req.headers())));
            }
        };
        let (parts, body) = req.into_parts();
        let store_key = match key::parse(&value)
            .and_then(|key| {
                if key::is_auto(&key) {
                    Err(InvalidKey::Placeholder)
                } else {
                    Ok(key)
                }
            })
            .map_err(|err| invalid_key(config, err))
            .and_then(|key| admit(config, &parts, &key))
        {
            Ok(store_key) => store_key,
            Err(problem) => {
                return ResponseFuture::ready(reject(problem, Dialect::of(&parts.headers)));
            }
        };
        let (limit, detach) = (config.max_request_body, config.detach);
        // The ready service handles this request; a clone takes its place for the next one.
        let clone = self.inner.clone();
        let start = Start {
            shared: self.shared.clone(),
            key: LogKey(value),
            store_key,
            inner: std::mem::replace(&mut self.inner, clone),
            parts,
        };
        ResponseFuture::keyed(Box::pin(Work::new(start, body, limit, detach)))
    }
}

fn invalid_key(config: &Config, err: InvalidKey) -> Problem {
    Problem::InvalidKey {
        err,
        header: config.header.clone(),
    }
}

/// Ends a keyed request with `problem`'s answer, without running it.
fn rejected<A, B: Body, E>(problem: Problem, dialect: Dialect) -> Step<A, Answer<B, E>> {
    Step::Answered(Ok(reject(problem, dialect)))
}

fn reject<B: Body>(problem: Problem, dialect: Dialect) -> Response<ResponseBody<B>> {
    tracing::debug!(
        status = problem.status().as_u16(),
        ?problem,
        "idempotency: answered without running"
    );
    problem.into_response(dialect)
}

/// Everything about a keyed request once its body is read.
struct Keyed {
    shared: Arc<Shared>,
    key: LogKey,
    store_key: StoreKey,
    fingerprint: Fingerprint,
    /// When waiting for the same request gives up: set when this request first waits.
    deadline: Option<Instant>,
    /// How the service answers this request itself.
    dialect: Dialect,
}

/// What can be checked of a keyed request before its body is read: its scope and declared
/// length. Gives the key's name in the store.
fn admit(config: &Config, parts: &request::Parts, key: &[u8]) -> Result<StoreKey, Problem> {
    let scope = match &config.scope {
        None => String::new(),
        Some(scope) => scope(parts)
            .filter(|scope| !scope.is_empty())
            .ok_or_else(|| Problem::MissingScope {
                header: config.scope_header.clone(),
            })?,
    };
    let limit = config.max_request_body;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(Problem::BodyTooLarge { limit });
    }
    Ok(StoreKey::of(scope.as_bytes(), key))
}

/// The key as it came in its header, for the logs.
#[derive(Clone)]
struct LogKey(HeaderValue);

impl fmt::Display for LogKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A key that was admitted is visible ASCII.
        f.write_str(self.0.to_str().unwrap_or("(not ASCII)"))
    }
}

/// A keyed request whose body is still to be read.
pub(super) struct Start<S> {
    shared: Arc<Shared>,
    key: LogKey,
    store_key: StoreKey,
    inner: S,
    parts: request::Parts,
}

impl<S> Start<S> {
    /// With the body read: fingerprints the request, then leads it or follows the same
    /// request.
    pub(super) fn read<ReqBody, ResBody>(
        self,
        buffered: Buffered<ReqBody::Error>,
    ) -> Step<Run<S::Future>, Answer<ResBody, S::Error>>
    where
        S: Inner<ReqBody, ResBody>,
        ReqBody: Body<Data = Bytes> + Send + 'static,
        ReqBody::Error: Into<BoxError>,
        ResBody: SendBody,
    {
        let config = &self.shared.config;
        let limit = config.max_request_body;
        let (bytes, trailers) = match buffered {
            Buffered::Whole { data, trailers } => (data, trailers),
            Buffered::TooLarge { .. } => {
                let dialect = Dialect::of(&self.parts.headers);
                return rejected(Problem::BodyTooLarge { limit }, dialect);
            }
            Buffered::Failed { error, .. } => {
                let dialect = Dialect::of(&self.parts.headers);
                return rejected(Problem::body_failed(error.into()), dialect);
            }
        };
        let (fingerprint, dialect) = fingerprint(&self.parts, &config.fingerprint_headers, &bytes);
        let request = Request::from_parts(self.parts, RequestBody::buffered(bytes, trailers));
        let keyed = Keyed {
            shared: self.shared,
            key: self.key,
            store_key: self.store_key,
            fingerprint,
            deadline: None,
            dialect,
        };
        keyed.begin(self.inner, request)
    }
}

/// A call to the store, bounded by the store timeout.
async fn store_call<T>(
    config: &Config,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let mut call = std::pin::pin!(call);
    // A store that answers at once (the memory store always does) needs no timer.
    if let Poll::Ready(answer) = poll_once(call.as_mut()).await {
        return answer;
    }
    Box::pin(tokio::time::timeout(config.store_timeout, call))
        .await
        .unwrap_or(Err(StoreError::Timeout(config.store_timeout)))
}

/// Polls `future` once, registering the task's waker as any poll does.
async fn poll_once<F: Future>(mut future: std::pin::Pin<&mut F>) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx))).await
}

impl Keyed {
    fn reject<B: Body>(&self, problem: Problem) -> Response<ResponseBody<B>> {
        reject(problem, self.dialect)
    }

    fn rejected<A, B: Body, E>(&self, problem: Problem) -> Step<A, Answer<B, E>> {
        rejected(problem, self.dialect)
    }

    fn config(&self) -> &Config {
        &self.shared.config
    }

    fn deadline(&mut self) -> Instant {
        let wait = self.shared.config.wait_timeout;
        *self
            .deadline
            .get_or_insert_with(|| clock::after(Instant::now(), wait))
    }

    /// The stored response, marked as replayed; or why it cannot be.
    fn replay<B: Body>(&self, record: Record) -> Response<ResponseBody<B>> {
        if record.fingerprint != self.fingerprint {
            return self.reject(Problem::KeyReused);
        }
        if !record.replayable {
            return self.reject(Problem::NotReplayable {
                status: record.status,
            });
        }
        tracing::debug!(key = %self.key, status = record.status.as_u16(), "idempotency: replaying the stored response");
        let mut headers = record.headers;
        // The length is the stored body's, whatever the first response said (a handler that
        // got it wrong would leave every replay's client waiting for bytes that never come);
        // a 304's or a 204's says something else, and stays as it was.
        let bodiless = matches!(
            record.status,
            StatusCode::NOT_MODIFIED | StatusCode::NO_CONTENT
        );
        if !bodiless && headers.contains_key(header::CONTENT_LENGTH) {
            if record.trailers.is_some() {
                headers.remove(header::CONTENT_LENGTH);
            } else {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(record.body.len()));
            }
        }
        // A map already holding as many names as a map can has no room for the mark, and the
        // replay goes without it rather than panic.
        let _ = headers.try_insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        let (mut parts, ()) = Response::new(()).into_parts();
        parts.status = record.status;
        parts.headers = headers;
        whole(parts, record.body, record.trailers)
    }

    /// Ends this process's flight with `problem`, and answers with it.
    fn give_up<B: Body>(&self, lead: Lead, problem: Problem) -> Response<ResponseBody<B>> {
        lead.finish(Outcome::Respond(problem.clone()));
        self.reject(problem)
    }

    /// Gets `inner` ready to claim and run. A request that gave its service up to wait gets a
    /// clone ready by its own deadline: one that only waited does not wait for capacity past
    /// it. `None` when the deadline passed first.
    async fn ready<S, R>(&mut self, inner: Ready<S>) -> Option<Result<S, S::Error>>
    where
        S: Service<R> + Clone,
    {
        match inner {
            Ready::Ready(ready) => Some(Ok(ready)),
            unready => tokio::time::timeout_at(self.deadline(), unready.ready())
                .await
                .ok(),
        }
    }

    /// This request's wait is over: it answers 409, and this process's followers, each with
    /// its own deadline, take over the flight rather than share this one's.
    fn timed_out<B: Body>(&self, lead: Lead) -> Response<ResponseBody<B>> {
        lead.finish(Outcome::Unanswered);
        self.reject(Problem::WaitTimedOut)
    }

    /// Replays `record` and hands it to this process's followers.
    fn settle<B: Body>(&self, lead: Lead, record: Record) -> Response<ResponseBody<B>> {
        // Followers get a copy; without any, the record is replayed as it is.
        lead.finish_with(|| Outcome::Completed(Arc::new(record.clone())));
        self.replay(record)
    }

    /// Fails open (the lead goes on, without a claim) or closed (the flight ends with 503).
    fn store_failed(&self, lead: Lead, err: &StoreError) -> Result<Lead, Problem> {
        match self.config().on_store_error {
            OnStoreError::FailClosed => {
                tracing::error!(key = %self.key, error = %err, "idempotency: store failed; answering 503");
                lead.finish(Outcome::Respond(Problem::StoreUnavailable));
                Err(Problem::StoreUnavailable)
            }
            OnStoreError::FailOpen => {
                tracing::warn!(key = %self.key, error = %err, "idempotency: store failed; running without idempotency");
                Ok(lead)
            }
        }
    }

    /// Leads the request, or waits for the same request. A store in this process is asked at
    /// once (its claim is what duplicates wait on); with another store, duplicates in this
    /// process follow one flight rather than each asking the store.
    fn begin<S, ReqBody, ResBody>(
        self,
        inner: S,
        request: Request<RequestBody<ReqBody>>,
    ) -> Step<Run<S::Future>, Answer<ResBody, S::Error>>
    where
        S: Inner<ReqBody, ResBody>,
        ReqBody: Body<Data = Bytes> + Send + 'static,
        ResBody: SendBody,
    {
        let config = self.config();
        match &config.local {
            Some(local) => {
                let claimed = local.claim_now(&self.store_key, &self.fingerprint, config.lease);
                self.claimed(Lead::alone(), claimed, inner, request)
            }
            None => {
                let joined = self.shared.flights.join(self.store_key, self.fingerprint);
                Step::Wait(Box::pin(self.proceed(joined, inner, request)))
            }
        }
    }

    /// Acts on the store's answer to a claim: runs, replays, or contends for the key.
    fn claimed<S, ReqBody, ResBody>(
        self,
        lead: Lead,
        claimed: Result<Claim, StoreError>,
        inner: S,
        request: Request<RequestBody<ReqBody>>,
    ) -> Step<Run<S::Future>, Answer<ResBody, S::Error>>
    where
        S: Inner<ReqBody, ResBody>,
        ReqBody: Body<Data = Bytes> + Send + 'static,
        ResBody: SendBody,
    {
        match claimed {
            Ok(Claim::Claimed(token)) => self.run(lead, Some(token), inner, request),
            Ok(Claim::Held(Holder::Completed(record))) => {
                Step::Answered(Ok(self.settle(lead, record)))
            }
            claimed => Step::Wait(Box::pin(self.contend(lead, claimed, inner, request))),
        }
    }

    /// [`begin`](Self::begin) when it waits: follows this process's flight for the key (as
    /// `joined` says, then as each new join says), or claims the key in the store. In reject
    /// mode too a request follows the flight until its lead has heard from the store: the key
    /// may be done (a replay) rather than running (409).
    async fn proceed<S, ReqBody, ResBody>(
        mut self,
        mut joined: Join,
        inner: S,
        request: Request<RequestBody<ReqBody>>,
    ) -> Step<Run<S::Future>, Answer<ResBody, S::Error>>
    where
        S: Inner<ReqBody, ResBody>,
        ReqBody: Body<Data = Bytes> + Send + 'static,
        ResBody: SendBody,
    {
        let shared = self.shared.clone();
        let mut inner = Ready::Ready(inner);
        loop {
            let lead = match joined {
                Join::Lead(lead) => lead,
                // The request leading here has another fingerprint, but it may be the one that
                // reused the key: only the store knows which request the key is for. This one
                // asks it, outside the flight.
                Join::Mismatch => Lead::alone(),
                Join::Follow(receiver) => {
                    tracing::debug!(key = %self.key, "idempotency: waiting for the same request in this process");
                    inner = inner.release();
                    match follow(receiver, self.deadline()).await {
                        None => return self.rejected(Problem::WaitTimedOut),
                        // In reject mode, the request it followed was in progress: 409, as
                        // for any duplicate of a request in progress.
                        Some(Outcome::Released)
                            if shared.config.on_conflict == OnConflict::Reject =>
                        {
                            return self.rejected(Problem::InFlight);
                        }
                        // It ran and gave its claim back, or it ended before the store said
                        // what the key holds: the store knows, and this one asks it.
                        Some(Outcome::Released | Outcome::Unanswered) => {
                            joined = shared.flights.join(self.store_key, self.fingerprint);
                            continue;
                        }
                        Some(Outcome::Completed(record)) => {
                            return Step::Answered(Ok(self.replay(Record::clone(&record))));
                        }
                        Some(Outcome::Respond(problem)) => return self.rejected(problem),
                    }
                }
            };
            // About to claim, and perhaps to run: the service must be ready first.
            let inner = match self.ready(inner).await {
                Some(Ok(inner)) => inner,
                Some(Err(err)) => return Step::Answered(Err(err)),
                None => return Step::Answered(Ok(self.timed_out(lead))),
            };
            let claimed = self.claim().await;
            return match self.claimed(lead, claimed, inner, request) {
                Step::Wait(waiting) => waiting.await,
                step => step,
            };
        }
    }

    async fn claim(&self) -> Result<Claim, StoreError> {
        let config = self.config();
        if let Some(local) = &config.local {
            return local.claim_now(&self.store_key, &self.fingerprint, config.lease);
        }
        RemoteClaim::send(
            self.shared.clone(),
            self.store_key,
            self.key.clone(),
            self.fingerprint,
        )
        .await
    }

    /// Acts on a claim that did not simply succeed: replays what the store holds, fails open
    /// or closed, or waits for whoever holds the key in the store and claims it again. While
    /// it waits, the inner service is given up (see [`Ready`]), and made ready again before
    /// the key is claimed again.
    async fn contend<S, ReqBody, ResBody>(
        mut self,
        lead: Lead,
        mut claimed: Result<Claim, StoreError>,
        inner: S,
        request: Request<RequestBody<ReqBody>>,
    ) -> Step<Run<S::Future>, Answer<ResBody, S::Error>>
    where
        S: Inner<ReqBody, ResBody>,
        ReqBody: Body<Data = Bytes> + Send + 'static,
        ResBody: SendBody,
    {
        let shared = self.shared.clone();
        let config = &shared.config;
        let mut inner = Ready::Ready(inner);
        loop {
            let held = match claimed {
                Ok(Claim::Claimed(token)) => {
                    // Ready: claims are only made with a ready service.
                    let (Ready::Ready(inner) | Ready::Unready(inner)) = inner;
                    return self.run(lead, Some(token), inner, request);
                }
                Ok(Claim::Held(holder)) => holder,
                Err(err) => match self.store_failed(lead, &err) {
                    Ok(lead) => {
                        return match self.ready(inner).await {
                            Some(Ok(inner)) => self.run(lead, None, inner, request),
                            Some(Err(err)) => Step::Answered(Err(err)),
                            None => Step::Answered(Ok(self.timed_out(lead))),
                        };
                    }
                    Err(problem) => return self.rejected(problem),
                },
            };
            match held {
                Holder::Completed(record) => return Step::Answered(Ok(self.settle(lead, record))),
                Holder::InFlight { fingerprint } if fingerprint != self.fingerprint => {
                    return Step::Answered(Ok(self.give_up(lead, Problem::KeyReused)));
                }
                Holder::InFlight { .. } if config.on_conflict == OnConflict::Reject => {
                    return Step::Answered(Ok(self.give_up(lead, Problem::InFlight)));
                }
                Holder::InFlight { .. } => {}
            }
            let remaining = self.deadline().saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Step::Answered(Ok(self.timed_out(lead)));
            }
            inner = inner.release();
            let waited = match &config.local {
                // Answers by the deadline, without a timer of its own.
                Some(local) => {
                    tracing::debug!(key = %self.key, "idempotency: waiting for the same request");
                    local.wait_now(&self.store_key, remaining).await
                }
                None => {
                    tracing::debug!(key = %self.key, "idempotency: waiting for the same request in another process");
                    // Answered by the deadline, even if a read of the store's hangs past it: the
                    // key was last seen in flight. The store's own last look, at the deadline, is
                    // given a moment to come back.
                    let grace = config
                        .store_timeout
                        .min(std::time::Duration::from_millis(100));
                    let bound = remaining.saturating_add(grace);
                    tokio::time::timeout(bound, config.store.wait(&self.store_key, remaining))
                        .await
                        .unwrap_or(Ok(Some(Holder::InFlight {
                            fingerprint: self.fingerprint,
                        })))
                }
            };
            claimed = match waited {
                // Freed: claim it again, with the service ready to run.
                Ok(None) => {
                    inner = match self.ready(inner).await {
                        Some(Ok(ready)) => Ready::Ready(ready),
                        Some(Err(err)) => return Step::Answered(Err(err)),
                        None => return Step::Answered(Ok(self.timed_out(lead))),
                    };
                    self.claim().await
                }
                Ok(Some(Holder::Completed(record))) => {
                    return Step::Answered(Ok(self.settle(lead, record)));
                }
                Ok(Some(Holder::InFlight { .. })) => {
                    return Step::Answered(Ok(self.timed_out(lead)));
                }
                // The key was in flight when last seen: failing open or closed, this request
                // does not run beside that one.
                Err(err) => {
                    tracing::error!(key = %self.key, error = %err, "idempotency: the store failed while this request waited for the same request; answering 503");
                    return Step::Answered(Ok(self.give_up(lead, Problem::StoreUnavailable)));
                }
            };
        }
    }

    /// Leads: runs the handler under a claim (`token`), or without one when the store failed
    /// open. The future returned is the call's alone: the service is dropped.
    fn run<S, ReqBody, O>(
        self,
        mut lead: Lead,
        token: Option<FencingToken>,
        mut inner: S,
        request: Request<RequestBody<ReqBody>>,
    ) -> Step<Run<S::Future>, O>
    where
        S: Service<Request<RequestBody<ReqBody>>>,
    {
        tracing::debug!(key = %self.key, "idempotency: running the first request");
        // In reject mode, duplicates that followed this one to hear what the store holds are
        // told now that it runs, as are those that join while it runs.
        if self.config().on_conflict == OnConflict::Reject {
            lead.announce(Outcome::Respond(Problem::InFlight));
        }
        // Made first, so that a handler that panics in `call` gives the claim back.
        let claim = ClaimGuard {
            keyed: self,
            token,
            lead: Some(lead),
            renewal: None,
        };
        Step::Run(Run {
            call: inner.call(request),
            claim,
        })
    }
}

/// A claim sent to a store in another process, bounded by the store timeout. The store may
/// grant it after its caller stopped waiting (the caller went away, or the timeout passed), and
/// then nobody would run the request or give the claim back: the key would stay claimed until
/// the lease lapsed, and retries would wait for it. So a claim dropped before its answer is
/// finished in a task of its own, and given back if granted (tried again while the store fails,
/// as any release is). That task waits at most another store timeout for the answer, so a
/// store that hangs cannot pile them up for longer: a claim granted later still than that
/// lapses with its lease.
struct RemoteClaim {
    call: Option<BoxFuture<Result<Claim, StoreError>>>,
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    shared: Arc<Shared>,
    key: StoreKey,
    log_key: LogKey,
    // Set while the call is polled: a drop that finds it set comes from a panic in the call,
    // which cannot be polled again. (A panic elsewhere in the task does not stop the hand-off.)
    polling: bool,
}

impl RemoteClaim {
    fn send(shared: Arc<Shared>, key: StoreKey, log_key: LogKey, fingerprint: Fingerprint) -> Self {
        let sender = shared.clone();
        let call = Box::pin(async move {
            let config = &sender.config;
            config.store.claim(&key, &fingerprint, config.lease).await
        });
        Self {
            call: Some(call),
            timer: None,
            shared,
            key,
            log_key,
            polling: false,
        }
    }
}

impl Future for RemoteClaim {
    type Output = Result<Claim, StoreError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let call = this
            .call
            .as_mut()
            .expect("RemoteClaim polled after completion");
        this.polling = true;
        let polled = call.as_mut().poll(cx);
        this.polling = false;
        if let Poll::Ready(claimed) = polled {
            this.call = None;
            return Poll::Ready(claimed);
        }
        // A store that answers at once needs no timer.
        let timeout = this.shared.config.store_timeout;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        std::task::ready!(timer.as_mut().poll(cx));
        // The call stays: dropping this hands it to a task.
        Poll::Ready(Err(StoreError::Timeout(timeout)))
    }
}

impl Drop for RemoteClaim {
    fn drop(&mut self) {
        // A call that panicked cannot be polled again.
        let Some(call) = self.call.take().filter(|_| !self.polling) else {
            return;
        };
        let (shared, key, log_key) = (self.shared.clone(), self.key, self.log_key.clone());
        tracing::debug!("idempotency: a claim was left unanswered; giving it back if granted");
        self.shared.spawn(async move {
            let answered = tokio::time::timeout(shared.config.store_timeout, call).await;
            if let Ok(Ok(Claim::Claimed(token))) = answered {
                release_retrying(shared, key, log_key, token, std::time::Duration::ZERO, None)
                    .await;
            }
        });
    }
}

/// The handler's run: its future, and the claim it runs under.
pub(super) struct Run<F> {
    pub(super) call: F,
    pub(super) claim: ClaimGuard,
}

/// A claim being run. Dropped before it is completed or released (the handler panicked, or the
/// caller went away), it releases the claim at once (from a task, for a remote store, which
/// tries again while the store fails) and tells this process's followers, so one of them can
/// run.
pub(super) struct ClaimGuard {
    keyed: Keyed,
    token: Option<FencingToken>,
    lead: Option<Lead>,
    /// Renews the lease: made the first time the run waits.
    renewal: Option<BoxFuture<()>>,
}

impl ClaimGuard {
    /// Renews the claim's lease every third of it, for as long as the run is polled while it
    /// waits: on the handler, and then on the response's body, which can take as long to come.
    /// Started the first time the run waits: one that answers at once needs no timer.
    pub(super) fn keep_alive(&mut self, cx: &mut Context<'_>) {
        let keyed = &self.keyed;
        let Some(token) = self.token.filter(|_| keyed.config().keep_lease_alive) else {
            return;
        };
        let renewal = self.renewal.get_or_insert_with(|| {
            if tokio::runtime::Handle::try_current().is_err() {
                tracing::warn!(key = %keyed.key, "idempotency: no tokio runtime to renew the lease with; a run that outlives its lease may run again beside a retry");
                return Box::pin(std::future::pending());
            }
            Box::pin(renew(
                keyed.shared.clone(),
                keyed.key.clone(),
                keyed.store_key,
                token,
            ))
        });
        // It never ends: a lost claim leaves it idle.
        let _ = renewal.as_mut().poll(cx);
    }

    /// `work`, with the lease renewed while it waits.
    async fn keeping_alive<T>(&mut self, work: impl Future<Output = T>) -> T {
        let mut work = std::pin::pin!(work);
        std::future::poll_fn(|cx| {
            let done = work.as_mut().poll(cx);
            if done.is_pending() {
                self.keep_alive(cx);
            }
            done
        })
        .await
    }

    /// Acts on what the handler answered: releases the claim, or stores the response.
    pub(super) fn answered<ResBody, E>(
        mut self,
        answered: Result<Response<ResBody>, E>,
    ) -> Respond<ResBody, E>
    where
        ResBody: SendBody,
        E: Send + 'static,
    {
        let response = match answered {
            Ok(response) => response,
            Err(err) => return self.released(Err(err)),
        };
        let (parts, body) = response.into_parts();
        let config = self.keyed.config();
        if !(config.store_if)(&parts) {
            tracing::debug!(key = %self.keyed.key, status = parts.status.as_u16(), "idempotency: response not stored; releasing the key");
            return self.released(Ok(Response::from_parts(parts, ResponseBody::inner(body))));
        }
        if (config.stream_if)(&parts) {
            return self.streamed(Response::from_parts(parts, ResponseBody::inner(body)));
        }
        let limit = config.max_stored_response;
        // A body that gives its length, within the limit, is read where it lies; any other
        // is boxed, so that what is left of it can stream on if it is too large to store.
        if body.size_hint().exact().is_some_and(|n| n <= limit as u64) {
            return Respond::Keep(parts, body, self);
        }
        let shared = self.keyed.shared.clone();
        let reading = Arc::new(AtomicBool::new(true));
        Respond::later(shared, Some(reading.clone()), async move {
            let mut body = Box::pin(body);
            let buffered = self.keeping_alive(Collect::new(body.as_mut(), limit)).await;
            // Read: from here on, a caller that leaves leaves only the store's step.
            reading.store(false, Ordering::Release);
            self.store(parts, buffered, Some(body)).await
        })
    }

    pub(super) fn shared(&self) -> &Arc<Shared> {
        &self.keyed.shared
    }

    /// The largest response body stored.
    pub(super) fn max_stored_response(&self) -> usize {
        self.keyed.config().max_stored_response
    }

    /// Stores a response whose body was read whole: at once in a store in this process.
    pub(super) fn keep<ResBody, E>(
        mut self,
        parts: response::Parts,
        buffered: Buffered<ResBody::Error>,
    ) -> Respond<ResBody, E>
    where
        ResBody: SendBody,
        E: Send + 'static,
    {
        let shared = self.keyed.shared.clone();
        let Some(local) = &shared.config.local else {
            return Respond::later(shared, None, self.store(parts, buffered, None));
        };
        match buffered {
            Buffered::Whole { data, trailers } if failed_in_passing(&trailers) => {
                self.released(Ok(whole(parts, data, trailers)))
            }
            // Read whole, a body is within the limit.
            Buffered::Whole { data, trailers } => {
                // Stored from where the response lies; the response goes on as it is.
                let copies = Replayed::of(self.keyed.config(), &parts.headers, trailers.as_ref());
                let fingerprint = self.keyed.fingerprint;
                let record = copies.view(&fingerprint, &parts, &data, trailers.as_ref());
                self.complete_now(local, record);
                Respond::Now(Ok(whole(parts, data, trailers)))
            }
            // Rarer: a body that failed, or ran past the length it gave and past the limit.
            buffered => Respond::later(shared.clone(), None, self.store(parts, buffered, None)),
        }
    }

    /// Marks the key done without storing `response`, which goes out as it is made: the request
    /// never runs again, and a retry is told its response cannot be replayed.
    fn streamed<B, E>(mut self, response: Response<ResponseBody<B>>) -> Respond<B, E>
    where
        B: SendBody,
        E: Send + 'static,
    {
        tracing::debug!(key = %self.keyed.key, status = response.status().as_u16(), "idempotency: response streamed as it is made; the key is done, and cannot be replayed");
        let record = Record::not_replayable(self.keyed.fingerprint, response.status());
        // `complete` stores at once in a store in this process; a stream is rare enough that
        // the box costs nothing worth a path of its own.
        let shared = self.keyed.shared.clone();
        Respond::later(shared, None, async move {
            self.complete(&record).await;
            Ok(response)
        })
    }

    /// Releases the claim, and answers with `answer`: at once with a store in this process.
    fn released<B, E>(mut self, answer: Answer<B, E>) -> Respond<B, E>
    where
        B: SendBody,
        E: Send + 'static,
    {
        let shared = self.keyed.shared.clone();
        match &shared.config.local {
            Some(local) => {
                self.release_now(local);
                Respond::Now(answer)
            }
            None => Respond::later(shared.clone(), None, async move {
                self.release().await;
                answer
            }),
        }
    }

    /// Stores a buffered response (or marks the key done without it, if it is too large to
    /// store) and answers with it; `rest` is what is left of a body too large to store.
    async fn store<B, E>(
        mut self,
        parts: response::Parts,
        buffered: Buffered<B::Error>,
        rest: Option<std::pin::Pin<Box<B>>>,
    ) -> Answer<B, E>
    where
        B: SendBody,
    {
        let config = self.keyed.config();
        let limit = config.max_stored_response;
        let unstored = match buffered {
            Buffered::Whole { data, trailers } if failed_in_passing(&trailers) => {
                self.release().await;
                return Ok(whole(parts, data, trailers));
            }
            // Read whole, a body is within the limit.
            Buffered::Whole { data, trailers } => {
                let copies = Replayed::of(config, &parts.headers, trailers.as_ref());
                let fingerprint = self.keyed.fingerprint;
                let record = copies
                    .view(&fingerprint, &parts, &data, trailers.as_ref())
                    .to_record();
                self.complete(&record).await;
                return Ok(whole(parts, data, trailers));
            }
            Buffered::TooLarge { chunks } => {
                if rest.is_none() {
                    tracing::error!(
                        key = %self.keyed.key,
                        limit,
                        "idempotency: the response body ran past the length it gave, and past the limit; it is cut off there"
                    );
                }
                Response::from_parts(parts, ResponseBody::partial(chunks, rest, None))
            }
            Buffered::Failed { chunks, error } => {
                self.release().await;
                return Ok(Response::from_parts(
                    parts,
                    ResponseBody::partial(chunks, None, Some(error)),
                ));
            }
        };
        tracing::warn!(
            key = %self.keyed.key,
            limit,
            "idempotency: response too large to store; duplicates will be told it cannot be replayed"
        );
        let fingerprint = self.keyed.fingerprint;
        self.complete(&Record::not_replayable(fingerprint, unstored.status()))
            .await;
        Ok(unstored)
    }

    /// Stores the record, if the claim still holds, and hands it to the followers.
    async fn complete(&mut self, record: &Record) {
        let shared = self.keyed.shared.clone();
        let config = &shared.config;
        if let Some(local) = &config.local {
            return self.complete_now(local, record.view());
        }
        // The token stays with the guard until the store answers: a caller that leaves in
        // between (without `detach`) drops the guard, which gives the claim back. Given back
        // after the record landed, it is gone already, and nothing changes.
        let stored = match self.token {
            None => None,
            Some(token) => {
                let key = &self.keyed.store_key;
                let complete = config.store.complete(key, token, record, config.retention);
                Some((token, store_call(config, complete).await))
            }
        };
        self.completed(stored, record.view());
    }

    /// [`complete`](Self::complete) in a store in this process.
    fn complete_now(&mut self, local: &MemoryStore, record: RecordView<'_>) {
        let retention = self.keyed.config().retention;
        let stored = self.token.take().map(|token| {
            let stored = local.complete_now(&self.keyed.store_key, token, record, retention);
            (token, stored)
        });
        self.completed(stored, record);
    }

    /// Tells the followers how the completion went (`None`: there was no claim to complete,
    /// failing open). When the store failed, the claim is kept and the record stored later.
    fn completed(
        &mut self,
        stored: Option<(FencingToken, Result<Completion, StoreError>)>,
        record: RecordView<'_>,
    ) {
        match stored {
            // Failing open: nothing was stored, but this process's duplicates get the answer.
            None | Some((_, Ok(Completion::Stored))) => {
                self.finish_with(|| Outcome::Completed(Arc::new(record.to_record())));
            }
            Some((_, Ok(Completion::Fenced))) => {
                tracing::warn!(
                    key = %self.keyed.key,
                    "idempotency: the claim's lease lapsed before the handler finished, and another run took the key; this response was not stored (fenced)"
                );
                self.finish_with(|| Outcome::Released);
            }
            Some((token, Err(err))) => {
                // The handler ran: giving the claim back would let a retry run it again. The
                // claim is kept, and the record stored from a task once the store takes it.
                tracing::error!(key = %self.keyed.key, error = %err, "idempotency: could not store the response; trying again in the background, the key held meanwhile");
                let record = Arc::new(record.to_record());
                self.complete_later(token, record.clone());
                self.finish_with(|| Outcome::Completed(record));
            }
        }
    }

    /// Stores `record` from a task once the store takes it: tried again after a pause that
    /// doubles up to 5 s, for one lease (five minutes at most, and no longer than the
    /// retention), the claim renewed before each try to last until that window ends and no
    /// longer. A claim found fenced, or a record the store calls corrupt, ends the tries; after
    /// the last, the claim frees itself at the end of the window, and only then may a retry run
    /// the handler again.
    fn complete_later(&self, token: FencingToken, record: Arc<Record>) {
        let (shared, store_key, key) = self.detached();
        let spawned = self.keyed.shared.spawn(async move {
            let config = &shared.config;
            let mut backoff = Backoff::new(background_window(config), RETRY_PAUSE, RETRY_PAUSE);
            loop {
                let last = backoff.wait().await;
                let left = backoff.give_up.saturating_duration_since(Instant::now());
                if config.keep_lease_alive && !left.is_zero() {
                    // Refused when the claim lapsed, or when an earlier try landed after all
                    // (its answer lost to a timeout): the completion below tells which.
                    let extend = config.store.extend(&store_key, token, left);
                    let _ = store_call(config, extend).await;
                }
                let complete = config
                    .store
                    .complete(&store_key, token, &record, config.retention);
                match store_call(config, complete).await {
                    Ok(Completion::Stored) => {
                        tracing::info!(key = %key, "idempotency: the response was stored after all");
                    }
                    Ok(Completion::Fenced) => {
                        tracing::error!(key = %key, "idempotency: the claim lapsed before the response could be stored, and another run took the key (fenced)");
                    }
                    Err(err @ StoreError::Corrupt(_)) => {
                        tracing::error!(key = %key, error = %err, "idempotency: the store refuses the response for good; the key frees itself when its lease lapses");
                    }
                    Err(err) if last => {
                        tracing::error!(key = %key, error = %err, "idempotency: gave up storing the response; the key frees itself when its lease lapses");
                    }
                    Err(_) => continue,
                }
                return;
            }
        });
        if !spawned {
            tracing::error!(key = %self.keyed.key, "idempotency: no runtime to store the response later; the key frees itself when its lease lapses");
        }
    }

    /// What a task of its own needs to finish this claim's business with the store.
    fn detached(&self) -> (Arc<Shared>, StoreKey, LogKey) {
        let keyed = &self.keyed;
        (keyed.shared.clone(), keyed.store_key, keyed.key.clone())
    }

    /// [`release_retrying`], from a task of its own.
    fn release_later(&self, token: FencingToken, pause: std::time::Duration, lead: Option<Lead>) {
        let (shared, store_key, key) = self.detached();
        self.keyed
            .shared
            .spawn(release_retrying(shared, store_key, key, token, pause, lead));
    }

    fn finish_with(&mut self, outcome: impl FnOnce() -> Outcome) {
        self.token = None;
        if let Some(lead) = self.lead.take() {
            lead.finish_with(outcome);
        }
    }

    /// Gives up the claim in a store in this process, then tells the followers.
    fn release_now(&mut self, local: &MemoryStore) {
        if let Some(token) = self.token.take() {
            local.release_now(&self.keyed.store_key, token);
        }
        self.finish_with(|| Outcome::Released);
    }

    /// Gives up the claim so a retry can run, then tells the followers.
    async fn release(&mut self) {
        let shared = self.keyed.shared.clone();
        let config = &shared.config;
        if let Some(local) = &config.local {
            return self.release_now(local);
        }
        // As in `complete`, the token stays with the guard until the store answers.
        if let Some(token) = self.token {
            let released = config.store.release(&self.keyed.store_key, token);
            if let Err(err) = store_call(config, released).await {
                // A retry would otherwise wait for the lease to lapse.
                tracing::warn!(key = %self.keyed.key, error = %err, "idempotency: could not release the claim; trying again in the background");
                self.release_later(token, RETRY_PAUSE, None);
            }
        }
        self.finish_with(|| Outcome::Released);
    }
}

/// The first pause before a step that failed is tried again in the background.
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// How long a step that failed is tried again in the background: for the lease, which holds
/// the key meanwhile, and no longer than the retention (a record stored later could outlive
/// the key's next use) or five minutes ([`Backoff`]'s bound).
fn background_window(config: &Config) -> std::time::Duration {
    config.lease.min(config.retention)
}

/// Releases `token`'s claim on `store_key` after `pause`, trying again while the store fails
/// for as long as the lease would hold the key anyway (see [`background_window`]). `lead`'s
/// followers in this process are told after the first try that the claim was released: while
/// the store fails, they are better answered by it than left to follow a run that ended.
async fn release_retrying(
    shared: Arc<Shared>,
    store_key: StoreKey,
    key: LogKey,
    token: FencingToken,
    pause: std::time::Duration,
    mut lead: Option<Lead>,
) {
    let config = &shared.config;
    let mut backoff = Backoff::new(background_window(config), pause, RETRY_PAUSE);
    loop {
        let last = backoff.wait().await;
        let released = config.store.release(&store_key, token);
        let result = store_call(config, released).await;
        if let Some(lead) = lead.take() {
            lead.finish(Outcome::Released);
        }
        match result {
            Ok(_) => return,
            Err(err @ StoreError::Corrupt(_)) => {
                tracing::error!(key = %key, error = %err, "idempotency: the store cannot release the claim; it frees itself when its lease lapses");
                return;
            }
            Err(err) if last => {
                tracing::warn!(key = %key, error = %err, "idempotency: could not release the claim; it frees itself when its lease lapses");
                return;
            }
            Err(err) => {
                tracing::debug!(key = %key, error = %err, "idempotency: could not release the claim yet; trying again");
            }
        }
    }
}

/// Copies of a response's headers and trailers without those that are never replayed, made
/// only where it has some: a record of it holds these, and the response keeps its own.
struct Replayed {
    headers: Option<HeaderMap>,
    trailers: Option<HeaderMap>,
}

impl Replayed {
    fn of(config: &Config, headers: &HeaderMap, trailers: Option<&HeaderMap>) -> Self {
        let excluded = &config.replay_excluded;
        Self {
            headers: replayed(excluded, headers),
            trailers: trailers.and_then(|trailers| replayed(excluded, trailers)),
        }
    }

    /// The record of the response with these `parts`, `body` and `trailers`.
    fn view<'a>(
        &'a self,
        fingerprint: &'a Fingerprint,
        parts: &'a response::Parts,
        body: &'a Bytes,
        trailers: Option<&'a HeaderMap>,
    ) -> RecordView<'a> {
        RecordView {
            fingerprint,
            status: parts.status,
            headers: self.headers.as_ref().unwrap_or(&parts.headers),
            body,
            trailers: self.trailers.as_ref().or(trailers),
            replayable: true,
        }
    }
}

/// A copy of `headers` without the `excluded` ones, if it has any; `None` when all of them are
/// replayed as they are. When `Connection` is excluded, so are the headers it names: they were
/// for that connection only (RFC 9110, section 7.6.1).
fn replayed(excluded: &[HeaderName], headers: &HeaderMap) -> Option<HeaderMap> {
    if !headers.keys().any(|name| excluded.contains(name)) {
        return None;
    }
    let named: Vec<HeaderName> = if excluded.contains(&header::CONNECTION) {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|value| value.as_bytes().split(|&b| b == b','))
            .filter_map(|token| HeaderName::from_bytes(token.trim_ascii()).ok())
            .collect()
    } else {
        Vec::new()
    };
    let mut kept = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if !excluded.contains(name) && !named.contains(name) {
            kept.append(name.clone(), value.clone());
        }
    }
    Some(kept)
}

/// A response with a whole body in place of the one its head came with. A `Transfer-Encoding`
/// goes: it framed the body the handler gave (a stream, such as a proxied chunked response),
/// and the server frames a whole one by its length. hyper refuses to send a body of known
/// length under that header, and drops the connection instead.
fn whole<B: Body>(
    mut parts: response::Parts,
    data: Bytes,
    trailers: Option<HeaderMap>,
) -> Response<ResponseBody<B>> {
    parts.headers.remove(header::TRANSFER_ENCODING);
    Response::from_parts(parts, ResponseBody::full(data, trailers))
}

/// Renews a claim's lease every third of it, for as long as it is polled. A claim found lost
/// is not renewed again, and the handler finishes on its own.
async fn renew(shared: Arc<Shared>, key: LogKey, store_key: StoreKey, token: FencingToken) {
    let config = &shared.config;
    let period = (config.lease / 3).max(std::time::Duration::from_millis(1));
    let mut ticker = tokio::time::interval_at(clock::after(Instant::now(), period), period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let renewed = config.store.extend(&store_key, token, config.lease);
        match store_call(config, renewed).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    key = %key,
                    "idempotency: the claim was lost while the handler ran; its response is stored only if no other run took the key"
                );
                return std::future::pending().await;
            }
            Err(err) => {
                tracing::warn!(key = %key, error = %err, "idempotency: could not renew the lease");
            }
        }
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        let Some(token) = self.token.take() else {
            return;
        };
        let lead = self.lead.take();
        tracing::debug!(key = %self.keyed.key, "idempotency: request dropped before it finished; releasing the key");
        match &self.keyed.shared.config.local {
            // At once: a retry that comes right after finds the key free.
            Some(local) => {
                local.release_now(&self.keyed.store_key, token);
                if let Some(lead) = lead {
                    lead.finish(Outcome::Released);
                }
            }
            None => self.release_later(token, std::time::Duration::ZERO, lead),
        }
    }
}

/// Whether a response's trailers say it failed in a way a retry may get past (a gRPC status
/// such as UNAVAILABLE): then it is not stored, whatever its head said.
fn failed_in_passing(trailers: &Option<HeaderMap>) -> bool {
    trailers.as_ref().is_some_and(super::transient_grpc_status)
}
