use std::{
    collections::hash_map::RandomState,
    fmt,
    hash::BuildHasher,
    sync::Arc,
    time::{Duration, SystemTime},
};

use http::{HeaderMap, HeaderName, Request, Response, StatusCode, header::RETRY_AFTER};
use tokio::time::Sleep;
use tower::retry::{Policy, budget::Budget};

use super::{
    body::{ReplayBody, replay_request},
    layer::KeyHeader,
};
use crate::{IdempotencyKey, clock, key::IDEMPOTENCY_KEY};

/// The `tracing` target of the client's events.
pub(crate) const TARGET: &str = "tower_idempotency::client";

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Decides which errors of the inner service are worth another attempt.
///
/// Any `Fn(&E) -> bool` is one; [`RetryAnyError`] is the default.
pub trait ClassifyError<E> {
    /// `true` when the request may be sent again after `error`.
    fn is_retryable(&self, error: &E) -> bool;
}

/// Treats every error as transient, the default.
///
/// An error from the service under the retry means no HTTP response came back: the connection
/// failed, closed before the response, or the attempt timed out. Each of these is worth another
/// attempt, and the idempotency key is what makes that safe for POST and PATCH.
///
/// It also retries errors that no attempt can get past, such as a request a client refuses to
/// send (hyper-util's for a URI without a scheme and host). Those cost only the backoff, since
/// nothing reaches a server; to stop at once, classify errors yourself with
/// [`RetryPolicy::retry_errors_if`], for example retrying only what your client reports as a
/// connection failure or a timeout.
#[derive(Clone, Copy, Debug, Default)]
pub struct RetryAnyError;

impl<E> ClassifyError<E> for RetryAnyError {
    fn is_retryable(&self, _error: &E) -> bool {
        true
    }
}

impl<E, F: Fn(&E) -> bool> ClassifyError<E> for F {
    fn is_retryable(&self, error: &E) -> bool {
        self(error)
    }
}

/// A [`tower::retry::Policy`] for HTTP requests that keeps the idempotency key.
///
/// # What is retried
///
/// - `502 Bad Gateway` and `504 Gateway Timeout`, after an exponential backoff with jitter;
/// - `503 Service Unavailable`, `429 Too Many Requests` and `408 Request Timeout` (which a
///   server's timeout layer answers while, behind it, the operation may go on and be stored
///   for the retry), after the `Retry-After` the response gives (delta-seconds or an
///   HTTP-date), or the backoff when it gives none. A `Retry-After` longer than
///   [`max_retry_after`](Self::max_retry_after) ends the retries: the response is returned
///   rather than sent again sooner than the server asked;
/// - `409 Conflict` with a `Retry-After`, on a request that carries an idempotency key: the
///   idempotency server's answer while another request with the key is still running, after
///   the wait it gives. A 409 without `Retry-After` is final;
/// - errors of the inner service (connection failures, responses cut off, per-attempt timeouts),
///   as far as [`retry_errors_if`](Self::retry_errors_if) allows.
///
/// Every other response is final. At most [`max_attempts`](Self::max_attempts) attempts are
/// made, the first included, and an optional [`budget`](Self::budget) bounds the retries of all
/// requests together.
///
/// A wait that `Retry-After` gives is lengthened by up to the jitter's share of the minimum
/// backoff (up to 100 ms by default), so that clients told the same wait do not all come back
/// in the same instant.
///
/// # Refuses to retry a request that could run twice
///
/// A request whose method is not idempotent (POST, PATCH, and any method other than GET, HEAD,
/// OPTIONS, TRACE, PUT and DELETE) is retried only when it carries an idempotency key header,
/// because the server may have run it already. Turn this off with
/// [`retry_unkeyed_requests(true)`](Self::retry_unkeyed_requests).
///
/// # Replaying the body
///
/// The policy takes request bodies that implement [`ReplayBody`] (a service over another body
/// type, such as a `BoxBody`, axum's `Body` or hyper's `Incoming`, does not compile with it),
/// and a request is retried only when its body gives a copy. See [`ReplayBody`] for how to
/// buffer a streaming body.
///
/// # Logging
///
/// Each attempt is logged at debug level under the `tower_idempotency::client` target, and so
/// is each decision to retry a failure (with what the attempt got and the wait) or not (with
/// why); with `max_attempts(1)` there is no decision to log:
///
/// ```text
/// Request: POST /api/v1/deployments request_id=abc123 idempotency_key=deploy-v1 attempt=1
/// retrying attempt=1 outcome=503 wait=1.2s
/// Request: POST /api/v1/deployments request_id=abc123 idempotency_key=deploy-v1 attempt=2
/// ```
///
/// `request_id` comes from the `x-request-id` header, and is left out with the key when the
/// request has none.
#[derive(Clone)]
pub struct RetryPolicy<C = RetryAnyError> {
    max_attempts: u32,
    min_backoff: Duration,
    max_backoff: Duration,
    jitter: f64,
    max_retry_after: Duration,
    retry_unkeyed: bool,
    header: HeaderName,
    budget: Option<Arc<dyn Budget + Send + Sync>>,
    classify: C,
    // Per request: the retries made so far. Tower's `Retry` clones the policy for each
    // request, and only the clones reach `retry`.
    retries: u32,
}

impl RetryPolicy {
    /// The default policy: 3 attempts, a backoff from 100 ms doubling up to 5 s with up to 100%
    /// jitter, `Retry-After` honoured up to 30 s, no budget, and no retry of a POST or PATCH
    /// without a key.
    pub fn new() -> Self {
        Self {
            max_attempts: 3,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            jitter: 1.0,
            max_retry_after: Duration::from_secs(30),
            retry_unkeyed: false,
            header: IDEMPOTENCY_KEY,
            budget: None,
            classify: RetryAnyError,
            retries: 0,
        }
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl<C> RetryPolicy<C> {
    /// Makes at most `attempts` attempts in all, the first included (at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Waits `min` before the first retry and doubles the wait on each retry after it, up to
    /// `max`.
    ///
    /// # Panics
    ///
    /// When `min` is zero (the wait doubles from it, so it would stay zero) or greater than
    /// `max`.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min;
        self.max_backoff = max;
        self.check_backoff();
        self
    }

    /// Adds up to `ratio` times the wait at random to each backoff (1.0, the default, waits
    /// between one and two times the base), so clients that failed together do not retry
    /// together. A wait never exceeds the backoff's maximum: once the base is close to it, the
    /// wait is drawn from the same spread below the maximum (between half of it and all of it,
    /// for 1.0, or from the minimum up when that is higher), so clients stay apart there too.
    ///
    /// # Panics
    ///
    /// When `ratio` is negative, greater than 100 or NaN.
    pub fn jitter(mut self, ratio: f64) -> Self {
        self.jitter = ratio;
        self.check_backoff();
        self
    }

    /// The longest `Retry-After` the policy waits for; a longer one ends the retries.
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.max_retry_after = max;
        self
    }

    /// Whether to retry a POST, PATCH or other non-idempotent request that carries no
    /// idempotency key (default `false`). Turning it on may run such a request twice.
    pub fn retry_unkeyed_requests(mut self, retry: bool) -> Self {
        self.retry_unkeyed = retry;
        self
    }

    /// The header that holds the idempotency key (default `Idempotency-Key`), for requests
    /// that did not come through an [`IdempotencyLayer`](super::IdempotencyLayer): behind one,
    /// the policy looks under the header the layer wrote the key to, whatever its name.
    pub fn header_name(mut self, name: HeaderName) -> Self {
        self.header = name;
        self
    }

    /// Bounds the retries of all the requests made through this policy and its clones, such as
    /// tower's [`TpsBudget`](tower::retry::budget::TpsBudget): each request deposits, each
    /// retry withdraws, and an empty budget means no retry.
    pub fn budget(mut self, budget: impl Budget + Send + Sync + 'static) -> Self {
        self.budget = Some(Arc::new(budget));
        self
    }

    /// Retries an error only when `classify` says so, in place of every error.
    ///
    /// In [`IdempotentClientLayer`](super::IdempotentClientLayer) the error is a
    /// [`BoxError`](tower::BoxError); a per-attempt timeout is a
    /// [`tower::timeout::error::Elapsed`] in it.
    pub fn retry_errors_if<C2>(self, classify: C2) -> RetryPolicy<C2> {
        RetryPolicy {
            max_attempts: self.max_attempts,
            min_backoff: self.min_backoff,
            max_backoff: self.max_backoff,
            jitter: self.jitter,
            max_retry_after: self.max_retry_after,
            retry_unkeyed: self.retry_unkeyed,
            header: self.header,
            budget: self.budget,
            classify,
            retries: self.retries,
        }
    }

    fn check_backoff(&self) {
        assert!(
            self.min_backoff <= self.max_backoff,
            "RetryPolicy: the backoff's minimum {:?} is greater than its maximum {:?}",
            self.min_backoff,
            self.max_backoff
        );
        assert!(
            !self.min_backoff.is_zero(),
            "RetryPolicy: the backoff's minimum must be greater than zero: each wait doubles \
             the one before, starting from it"
        );
        assert!(
            (0.0..=100.0).contains(&self.jitter),
            "RetryPolicy: jitter must be between 0 and 100, not {}",
            self.jitter
        );
    }

    /// The wait for a `Retry-After` of `after`, for `unit` drawn from [0, 1): lengthened by up
    /// to `jitter` times the minimum backoff.
    pub(super) fn after_wait(&self, after: Duration, unit: f64) -> Duration {
        let spread = self
            .min_backoff
            .min(clock::FOREVER)
            .mul_f64(self.jitter * unit);
        after.saturating_add(spread)
    }

    /// The wait before retry number `retry` (1 for the first), for `unit` drawn from [0, 1): a
    /// base of `min_backoff` doubled on each retry, spread by up to `jitter` times itself, and
    /// kept under `max_backoff` by lowering the spread's floor (never below `min_backoff`)
    /// and drawing from what is left of the spread below the maximum, rather than cutting the
    /// waits off at the maximum, where they would all meet.
    pub(super) fn backoff_wait(&self, retry: u32, unit: f64) -> Duration {
        // Cut to a century, so that the float steps below cannot overflow.
        let max = self.max_backoff.min(clock::FOREVER);
        let min = self.min_backoff.min(max);
        let mut doubled = min;
        for _ in 1..retry {
            if doubled >= max {
                break;
            }
            doubled = doubled.saturating_mul(2);
        }
        let spread = 1.0 + self.jitter;
        let floor = doubled.min(max.div_f64(spread)).max(min);
        let top = floor.mul_f64(spread).min(max);
        floor + (top - floor).mul_f64(unit)
    }

    /// Where `req`'s key is: under the header the key layer wrote it to, or else under
    /// [`header_name`](Self::header_name).
    fn key_header<'a, B>(&'a self, req: &'a Request<B>) -> &'a HeaderName {
        req.extensions()
            .get::<KeyHeader>()
            .map_or(&self.header, |written| &written.0)
    }

    /// Whether the request carries a key of its own, in its key header: the one thing the
    /// policy can be sure goes out on every attempt. An `auto` header is a request for a key,
    /// not one: a key layer inside the retry (the wrong order) would put a fresh one on each
    /// attempt, so such a request is treated as having none. So is a key in the extensions
    /// alone: with no key layer inside the retry, it would never be sent.
    ///
    /// A header that holds no valid key (empty, too long, given twice) is none either: a server
    /// may take it for no key at all, and run each attempt.
    fn has_key<B>(&self, req: &Request<B>) -> bool {
        // The key layer's reading of a caller's header: one valid key, not `auto`.
        matches!(
            IdempotencyKey::from_headers(req.headers(), self.key_header(req)),
            Ok(Some(_))
        )
    }
}

impl<C> fmt::Debug for RetryPolicy<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_attempts", &self.max_attempts)
            .field("min_backoff", &self.min_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("jitter", &self.jitter)
            .field("max_retry_after", &self.max_retry_after)
            .field("retry_unkeyed", &self.retry_unkeyed)
            .field("header", &self.header)
            .field("budget", &self.budget.is_some())
            .finish_non_exhaustive()
    }
}

enum Wait {
    Backoff,
    For(Duration),
}

impl<B, ResB, E, C> Policy<Request<B>, Response<ResB>, E> for RetryPolicy<C>
where
    B: ReplayBody,
    C: ClassifyError<E>,
{
    type Future = Sleep;

    fn retry(
        &mut self,
        req: &mut Request<B>,
        result: &mut Result<Response<ResB>, E>,
    ) -> Option<Self::Future> {
        let attempt = self.retries + 1;
        let give_up = |outcome: &str, why: &str| {
            tracing::debug!(target: TARGET, attempt, outcome = %outcome, "not retrying: {why}");
        };
        // The status that asks for a retry; `None` for an error.
        let (wait, status) = match result {
            Ok(res) => match res.status() {
                StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT => {
                    (Wait::Backoff, Some(res.status()))
                }
                StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::TOO_MANY_REQUESTS
                | StatusCode::REQUEST_TIMEOUT => {
                    let wait = match retry_after(res.headers(), SystemTime::now()) {
                        Some(after) => Wait::For(after),
                        None => Wait::Backoff,
                    };
                    (wait, Some(res.status()))
                }
                // An idempotency server's "a request with this key is still running": come back
                // after `Retry-After` for its result.
                StatusCode::CONFLICT if self.has_key(req) => {
                    match retry_after(res.headers(), SystemTime::now()) {
                        Some(after) => (Wait::For(after), Some(res.status())),
                        None => {
                            give_up("409", "a 409 without Retry-After is not \"still running\"");
                            return None;
                        }
                    }
                }
                _ => return None,
            },
            Err(e) if self.classify.is_retryable(e) => (Wait::Backoff, None),
            Err(_) => {
                give_up(
                    "error",
                    "the policy's error classifier does not retry this error",
                );
                return None;
            }
        };

        let outcome = status.as_ref().map_or("error", StatusCode::as_str);
        let give_up = |why: &str| give_up(outcome, why);
        if attempt >= self.max_attempts {
            give_up("no attempts left");
            return None;
        }
        if !self.retry_unkeyed && !req.method().is_idempotent() && !self.has_key(req) {
            give_up("the request has no idempotency key, and could run twice");
            return None;
        }
        if let Wait::For(after) = wait
            && after > self.max_retry_after
        {
            give_up("Retry-After is longer than the policy waits");
            return None;
        }
        if let Some(budget) = &self.budget
            && !budget.withdraw()
        {
            give_up("the retry budget is spent");
            return None;
        }

        self.retries += 1;
        let wait = match wait {
            Wait::For(after) => self.after_wait(after, random_unit()),
            Wait::Backoff => self.backoff_wait(self.retries, random_unit()),
        };
        tracing::debug!(target: TARGET, attempt, outcome = %outcome, ?wait, "retrying");
        Some(tokio::time::sleep(wait))
    }

    fn clone_request(&mut self, req: &Request<B>) -> Option<Request<B>> {
        // Called just before each attempt goes out: on the first, with no retries made yet.
        if self.retries == 0
            && let Some(budget) = &self.budget
        {
            budget.deposit();
        }
        log_attempt(req, self.key_header(req), self.retries + 1);
        if self.max_attempts == 1 {
            // No retry can come: no copy to make.
            return None;
        }
        let copy = replay_request(req);
        if copy.is_none() {
            tracing::debug!(
                target: TARGET,
                "this request will not be retried: its body cannot be replayed (see ReplayBody)"
            );
        }
        copy
    }
}

fn log_attempt<B>(req: &Request<B>, key_header: &HeaderName, attempt: u32) {
    // The fields are only read when the event is enabled.
    let header = |name: &HeaderName| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(tracing::field::display)
    };
    tracing::debug!(
        target: TARGET,
        request_id = header(&X_REQUEST_ID),
        idempotency_key = header(key_header),
        attempt,
        "Request: {} {}",
        req.method(),
        req.uri().path(),
    );
}

/// How long `Retry-After` asks to wait: delta-seconds, or an HTTP-date (a date in the past
/// means now). `None` when the header is absent or malformed.
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Absurdly many digits: as long as a wait can be.
        return Some(value.parse().map_or(Duration::MAX, Duration::from_secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A random number in [0, 1) for the jitter, different for each call in every clone of the
/// policy (tower's `HasherRng` would repeat one sequence in each clone).
fn random_unit() -> f64 {
    // Each `RandomState` has fresh keys, so hashing a constant gives a new value each time.
    let bits = RandomState::new().hash_one(0u8) >> 11;
    bits as f64 / (1u64 << 53) as f64
}
