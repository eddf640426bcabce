use std::{
    future::Future,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, header, request};
use http_body::Body;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use super::{
    IdempotencyServiceLayer, ResponseFuture,
    body::{Buffered, RequestBody, ResponseBody, buffer},
    config::{Config, OnConflict, OnStoreError, Shared},
    fingerprint::fingerprint,
    flight::{Join, Lead, Outcome, follow},
    future::{Answer, Step, Work},
    problem::Problem,
};
use crate::{
    IDEMPOTENT_REPLAYED, key,
    store::{
        BoxError, Claim, Completion, FencingToken, Fingerprint, Holder, KeyStore, Record,
        StoreError, StoreKey,
    },
};

/// Runs the first request for each idempotency key once, stores its response, and replays it
/// to every later request with that key.
///
/// See the [module docs](super) for the behaviour and an example, and
/// [`IdempotencyServiceLayer`] for the settings.
///
/// # Runtime
///
/// The service needs a tokio runtime: a handler whose caller goes away finishes in a task of
/// its own (see [`detach`](IdempotencyServiceLayer::detach)), and a request dropped before its
/// handler finished gives up its claim from a task.
#[derive(Clone, Debug)]
pub struct IdempotencyService<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// What a keyed request needs of the inner service: it moves into a task of its own.
trait Inner<ReqBody, ResBody>:
    Service<
        Request<RequestBody<ReqBody>>,
        Response = Response<ResBody>,
        Future: Send + 'static,
        Error: Send + 'static,
    > + Send
    + 'static
{
}

impl<S, ReqBody, ResBody> Inner<ReqBody, ResBody> for S where
    S: Service<
            Request<RequestBody<ReqBody>>,
            Response = Response<ResBody>,
            Future: Send + 'static,
            Error: Send + 'static,
        > + Send
        + 'static
{
}

/// A response body that can move between tasks.
trait SendBody: Body<Data = Bytes, Error: Send + 'static> + Send + 'static {}

impl<B: Body<Data = Bytes, Error: Send + 'static> + Send + 'static> SendBody for B {}

impl<S> IdempotencyService<S> {
    /// Wraps `inner`, keeping keys in `store`, with the default settings.
    pub fn new(inner: S, store: impl KeyStore) -> Self {
        IdempotencyServiceLayer::new(store).layer(inner)
    }

    /// A layer keeping keys in `store`; its setters change the settings.
    pub fn layer(store: impl KeyStore) -> IdempotencyServiceLayer {
        IdempotencyServiceLayer::new(store)
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
        let value = match key::single_value(req.headers(), &config.header) {
            // A copy of a header value shares its bytes.
            Ok(Some(value)) => value.clone(),
            Ok(None) if config.require_key => {
                return ResponseFuture::ready(reject(Problem::MissingKey {
                    header: config.header.clone(),
                }));
            }
            Ok(None) => {
                return ResponseFuture::passthrough(self.inner.call(req.map(RequestBody::inner)));
            }
            Err(err) => return ResponseFuture::ready(reject(Problem::InvalidKey(err))),
        };
        let (parts, body) = req.into_parts();
        let store_key = match key::parse(&value)
            .map_err(Problem::InvalidKey)
            .and_then(|key| admit(config, &parts, &key))
        {
            Ok(store_key) => store_key,
            Err(problem) => return ResponseFuture::ready(reject(problem)),
        };
        let key = LogKey(value);
        // The ready service handles this request; a clone takes its place for the next one.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let detach = config.detach;
        ResponseFuture::keyed(Box::pin(Work::new(
            handle(self.shared.clone(), key, store_key, inner, parts, body),
            Run::start,
            detach,
        )))
    }
}

fn reject<B: Body>(problem: Problem) -> Response<ResponseBody<B>> {
    tracing::debug!(
        status = problem.status().as_u16(),
        ?problem,
        "idempotency: answered without running"
    );
    problem.into_response()
}

/// Everything about a keyed request once its body is read.
struct Keyed {
    shared: Arc<Shared>,
    key: LogKey,
    store_key: StoreKey,
    fingerprint: Fingerprint,
    /// When waiting for the same request gives up: set when this request first waits.
    deadline: Option<Instant>,
}

/// What can be checked of a keyed request before its body is read: its scope and declared
/// length. Gives the key's name in the store.
fn admit(config: &Config, parts: &request::Parts, key: &str) -> Result<StoreKey, Problem> {
    let scope = match &config.scope {
        None => String::new(),
        Some(scope) => scope(parts).ok_or(Problem::MissingScope)?,
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
struct LogKey(HeaderValue);

impl std::fmt::Display for LogKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A key that was admitted is visible ASCII.
        f.write_str(self.0.to_str().unwrap_or("(not ASCII)"))
    }
}

// `handle` and `ClaimGuard::execute` return `async` blocks rather than being `async fn`s: an
// `async fn` keeps a second copy of its arguments in its future, and these futures are moved
// and boxed on every keyed request.

/// Reads the body, then leads the request or follows the same request in this process.
/// Leading, it ends in [`Step::Run`], and [`Work`] runs the handler.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would keep its arguments twice"
)]
fn handle<S, ReqBody, ResBody>(
    shared: Arc<Shared>,
    key: LogKey,
    store_key: StoreKey,
    inner: S,
    parts: request::Parts,
    body: ReqBody,
) -> impl Future<Output = Step<Run<S, ReqBody>, Answer<ResBody, S::Error>>> + Send
where
    S: Inner<ReqBody, ResBody>,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: SendBody,
{
    async move {
        let config = &shared.config;
        let limit = config.max_request_body;
        let bytes = match buffer(std::pin::pin!(body), limit).await {
            Buffered::Whole { data, .. } => data,
            Buffered::TooLarge { .. } => {
                return Step::Answered(Ok(reject(Problem::BodyTooLarge { limit })));
            }
            Buffered::Failed { .. } => return Step::Answered(Ok(reject(Problem::BodyUnreadable))),
        };
        let fingerprint = fingerprint(&parts, &config.fingerprint_headers, &bytes);
        let request = Request::from_parts(parts, RequestBody::buffered(bytes));
        let mut keyed = Keyed {
            shared: shared.clone(),
            key,
            store_key,
            fingerprint,
            deadline: None,
        };
        loop {
            let lead = match shared.flights.join(store_key, fingerprint) {
                Join::Lead(lead) => lead,
                Join::Mismatch => return Step::Answered(Ok(reject(Problem::KeyReused))),
                Join::Follow(_) if config.on_conflict == OnConflict::Reject => {
                    return Step::Answered(Ok(reject(Problem::InFlight)));
                }
                Join::Follow(receiver) => {
                    tracing::debug!(key = %keyed.key, "idempotency: waiting for the same request in this process");
                    // Boxed, as every wait is: waits are rare, and their timers would weigh on
                    // every request.
                    match Box::pin(follow(receiver, keyed.deadline())).await {
                        None => return Step::Answered(Ok(reject(Problem::WaitTimedOut))),
                        Some(Outcome::Released) => continue,
                        Some(Outcome::Completed(record)) => {
                            return Step::Answered(Ok(keyed.replay(Record::clone(&record))));
                        }
                        Some(Outcome::Respond(problem)) => {
                            return Step::Answered(Ok(reject(problem)));
                        }
                    }
                }
            };
            // Lead in this process: claim the key in the store, and run the request once it is
            // claimed. Written out here rather than as a future of its own, which would hold a
            // second copy of the request.
            return match keyed.claim().await {
                Ok(Claim::Claimed(token)) => keyed.run(lead, Some(token), inner, request),
                Ok(Claim::Held(Holder::Completed(record))) => {
                    Step::Answered(Ok(keyed.settle(lead, record)))
                }
                // Anything else is rarer, and may wait: it is boxed, so that its timers do not
                // weigh on every request.
                claimed => Box::pin(keyed.contend(lead, claimed, inner, request)).await,
            };
        }
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
    fn config(&self) -> &Config {
        &self.shared.config
    }

    fn deadline(&mut self) -> Instant {
        let wait = self.shared.config.wait_timeout;
        *self.deadline.get_or_insert_with(|| Instant::now() + wait)
    }

    /// The stored response, marked as replayed; or why it cannot be.
    fn replay<B: Body>(&self, record: Record) -> Response<ResponseBody<B>> {
        if record.fingerprint != self.fingerprint {
            return reject(Problem::KeyReused);
        }
        if !record.replayable {
            return reject(Problem::NotReplayable {
                status: record.status,
            });
        }
        tracing::debug!(key = %self.key, status = record.status.as_u16(), "idempotency: replaying the stored response");
        let mut response = Response::new(ResponseBody::full(record.body, record.trailers));
        *response.status_mut() = record.status;
        *response.headers_mut() = record.headers;
        response
            .headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        response
    }

    /// Ends this process's flight with `problem`, and answers with it.
    fn give_up<B: Body>(&self, lead: Lead, problem: Problem) -> Response<ResponseBody<B>> {
        lead.finish(Outcome::Respond(problem.clone()));
        reject(problem)
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

    async fn claim(&self) -> Result<Claim, StoreError> {
        let config = self.config();
        if let Some(local) = &config.local {
            return local.claim_now(&self.store_key, &self.fingerprint, config.lease);
        }
        store_call(
            config,
            config
                .store
                .claim(&self.store_key, &self.fingerprint, config.lease),
        )
        .await
    }

    /// Acts on a claim that did not simply succeed: replays what the store holds, fails open
    /// or closed, or waits for whoever holds the key in the store and claims it again.
    async fn contend<S, ReqBody, ResBody>(
        mut self,
        lead: Lead,
        mut claimed: Result<Claim, StoreError>,
        inner: S,
        request: Request<RequestBody<ReqBody>>,
    ) -> Step<Run<S, ReqBody>, Answer<ResBody, S::Error>>
    where
        S: Inner<ReqBody, ResBody>,
        ReqBody: Body<Data = Bytes> + Send + 'static,
        ResBody: SendBody,
    {
        let shared = self.shared.clone();
        let config = &shared.config;
        loop {
            let held = match claimed {
                Ok(Claim::Claimed(token)) => {
                    return self.run(lead, Some(token), inner, request);
                }
                Ok(Claim::Held(holder)) => holder,
                Err(err) => match self.store_failed(lead, &err) {
                    Ok(lead) => return self.run(lead, None, inner, request),
                    Err(problem) => return Step::Answered(Ok(reject(problem))),
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
                return Step::Answered(Ok(self.give_up(lead, Problem::WaitTimedOut)));
            }
            tracing::debug!(key = %self.key, "idempotency: waiting for the same request in another process");
            let waited = tokio::time::timeout(
                remaining + config.store_timeout,
                config.store.wait(&self.store_key, remaining),
            )
            .await
            .unwrap_or(Err(StoreError::Timeout(remaining + config.store_timeout)));
            claimed = match waited {
                // Freed: claim it again.
                Ok(None) => self.claim().await,
                Ok(Some(Holder::Completed(record))) => {
                    return Step::Answered(Ok(self.settle(lead, record)));
                }
                Ok(Some(Holder::InFlight { .. })) => {
                    return Step::Answered(Ok(self.give_up(lead, Problem::WaitTimedOut)));
                }
                Err(err) => Err(err),
            };
        }
    }

    /// Leads: the handler is to run under a claim (`token`), or without one when the store
    /// failed open.
    fn run<S, ReqBody, O>(
        self,
        lead: Lead,
        token: Option<FencingToken>,
        inner: S,
        request: Request<RequestBody<ReqBody>>,
    ) -> Step<Run<S, ReqBody>, O> {
        Step::Run(Run {
            claim: ClaimGuard {
                keyed: self,
                token,
                lead: Some(lead),
            },
            inner,
            request,
        })
    }
}

/// What the handler's run needs: the claim it runs under, the service and the request.
struct Run<S, ReqBody> {
    claim: ClaimGuard,
    inner: S,
    request: Request<RequestBody<ReqBody>>,
}

impl<S, ReqBody> Run<S, ReqBody> {
    fn start<ResBody>(self) -> impl Future<Output = Answer<ResBody, S::Error>> + Send
    where
        S: Inner<ReqBody, ResBody>,
        ResBody: SendBody,
    {
        tracing::debug!(key = %self.claim.keyed.key, "idempotency: running the first request");
        self.claim.execute(self.inner, self.request)
    }
}

/// A claim being run. Dropped before it is completed or released (the handler panicked, or the
/// caller went away), it releases the claim from a task at once and then tells this process's
/// followers, so one of them can run.
struct ClaimGuard {
    keyed: Keyed,
    token: Option<FencingToken>,
    lead: Option<Lead>,
}

impl ClaimGuard {
    /// Calls the inner service, then stores its response. The call is made at once; the
    /// future returned holds the call's future, not the service.
    fn execute<S, ReqBody, ResBody>(
        mut self,
        mut inner: S,
        request: Request<RequestBody<ReqBody>>,
    ) -> impl Future<Output = Answer<ResBody, S::Error>> + Send
    where
        S: Inner<ReqBody, ResBody>,
        ResBody: SendBody,
    {
        let call = inner.call(request);
        async move {
            let shared = self.keyed.shared.clone();
            let config = &shared.config;
            let call = std::pin::pin!(call);
            let response = match self.keep_alive(call).await {
                Ok(response) => response,
                Err(err) => {
                    self.release().await;
                    return Err(err);
                }
            };
            let (mut parts, body) = response.into_parts();
            if !(config.store_if)(&parts) {
                tracing::debug!(key = %self.keyed.key, status = parts.status.as_u16(), "idempotency: response not stored; releasing the key");
                self.release().await;
                return Ok(Response::from_parts(parts, ResponseBody::inner(body)));
            }
            let fingerprint = self.keyed.fingerprint;
            let limit = config.max_stored_response;
            // A body that gives its length, within the limit, is read where it lies; any other
            // is boxed, so that what is left of it can stream on if it is too large to store.
            let fits = body.size_hint().exact().is_some_and(|n| n <= limit as u64);
            let (buffered, rest) = if fits {
                (buffer(std::pin::pin!(body), usize::MAX).await, None)
            } else {
                let mut body = Box::pin(body);
                (buffer(body.as_mut(), limit).await, Some(body))
            };
            let unstored = match buffered {
                Buffered::Whole { data, trailers } if data.len() <= limit => {
                    // The record takes the response's headers, and gives them back once stored;
                    // only a response with headers that are never replayed needs a filtered copy.
                    let excluded = parts
                        .headers
                        .keys()
                        .any(|name| config.replay_excluded.contains(name));
                    let headers = if excluded {
                        let mut kept = HeaderMap::with_capacity(parts.headers.len());
                        for (name, value) in &parts.headers {
                            if !config.replay_excluded.contains(name) {
                                kept.append(name.clone(), value.clone());
                            }
                        }
                        kept
                    } else {
                        std::mem::take(&mut parts.headers)
                    };
                    let record =
                        Record::response(fingerprint, parts.status, headers, data, trailers);
                    self.complete(&record).await;
                    if !excluded {
                        parts.headers = record.headers;
                    }
                    return Ok(Response::from_parts(
                        parts,
                        ResponseBody::full(record.body, record.trailers),
                    ));
                }
                // Only a body that ran past the length it gave arrives here whole.
                Buffered::Whole { data, trailers } => ResponseBody::full(data, trailers),
                Buffered::TooLarge { chunks } => ResponseBody::partial(chunks, rest, None),
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
            self.complete(&Record::not_replayable(fingerprint, parts.status))
                .await;
            Ok(Response::from_parts(parts, unstored))
        }
    }

    /// Runs `call`, renewing the claim's lease every third of it if it takes that long.
    async fn keep_alive<F: Future>(&self, mut call: std::pin::Pin<&mut F>) -> F::Output {
        let config = self.keyed.config();
        let token = match self.token {
            Some(token) if config.keep_lease_alive => token,
            _ => return call.await,
        };
        // A handler that answers at once needs no renewal timer.
        if let Poll::Ready(output) = poll_once(call.as_mut()).await {
            return output;
        }
        let period = (config.lease / 3).max(std::time::Duration::from_millis(1));
        // Boxed: only handlers that wait carry the timer.
        let mut ticker = Box::new(tokio::time::interval_at(Instant::now() + period, period));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                output = &mut call => return output,
                _ = ticker.tick() => {
                    let renewed = config.store.extend(&self.keyed.store_key, token, config.lease);
                    match store_call(config, renewed).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!(
                                key = %self.keyed.key,
                                "idempotency: the claim was lost while the handler ran; its response will not be stored"
                            );
                            // Nothing left to renew: let the handler finish on its own.
                            return call.await;
                        }
                        Err(err) => tracing::warn!(key = %self.keyed.key, error = %err, "idempotency: could not renew the lease"),
                    }
                }
            }
        }
    }

    /// Stores the record, if the claim still holds, and hands it to the followers.
    async fn complete(&mut self, record: &Record) {
        let Some(token) = self.token.take() else {
            // Failing open: nothing to store, but this process's duplicates get the answer.
            self.finish_with(|| Outcome::Completed(Arc::new(record.clone())));
            return;
        };
        let config = self.keyed.config();
        let stored = match &config.local {
            Some(local) => {
                local.complete_now(&self.keyed.store_key, token, record, config.retention)
            }
            None => {
                let complete =
                    config
                        .store
                        .complete(&self.keyed.store_key, token, record, config.retention);
                store_call(config, complete).await
            }
        };
        match stored {
            Ok(Completion::Stored) => {
                self.finish_with(|| Outcome::Completed(Arc::new(record.clone())));
            }
            Ok(Completion::Fenced) => {
                tracing::warn!(
                    key = %self.keyed.key,
                    "idempotency: the claim's lease lapsed before the handler finished; its response was not stored (fenced)"
                );
                self.finish_with(|| Outcome::Released);
            }
            Err(err) => {
                tracing::error!(key = %self.keyed.key, error = %err, "idempotency: could not store the response");
                self.token = Some(token);
                self.release().await;
            }
        }
    }

    fn finish_with(&mut self, outcome: impl FnOnce() -> Outcome) {
        self.token = None;
        if let Some(lead) = self.lead.take() {
            lead.finish_with(outcome);
        }
    }

    /// Gives up the claim so a retry can run, then tells the followers.
    async fn release(&mut self) {
        if let Some(token) = self.token.take() {
            let config = self.keyed.config();
            let released = match &config.local {
                Some(local) => Ok(local.release_now(&self.keyed.store_key, token)),
                None => {
                    store_call(config, config.store.release(&self.keyed.store_key, token)).await
                }
            };
            if let Err(err) = released {
                tracing::warn!(key = %self.keyed.key, error = %err, "idempotency: could not release the claim; it frees itself when its lease lapses");
            }
        }
        self.finish_with(|| Outcome::Released);
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        let Some(token) = self.token.take() else {
            return;
        };
        let lead = self.lead.take();
        let shared = self.keyed.shared.clone();
        let key = self.keyed.store_key;
        tracing::debug!(key = %self.keyed.key, "idempotency: request dropped before it finished; releasing the key");
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = store_call(&shared.config, shared.config.store.release(&key, token)).await;
                drop(lead);
            });
        }
    }
}
