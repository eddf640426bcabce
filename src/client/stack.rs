use std::time::Duration;

use tower::{retry::Retry, timeout::Timeout};
use tower_layer::Layer;

use super::{IdempotencyLayer, MakeUuidKey, RetryAnyError, RetryPolicy};

/// The whole client stack, in the one order that is safe: the key is fixed outside the retry,
/// and each attempt has its own timeout inside it.
///
/// ```text
/// Idempotency      writes the key header once
///   Retry          re-sends the same request, key included, per RetryPolicy
///     Timeout      bounds each attempt; an attempt that times out is retried
///       your client
/// ```
///
/// The retry policy looks for each request's key under the header the key layer wrote it to.
///
/// The service's error is a [`BoxError`](tower::BoxError): the inner client's last error, or a
/// [`tower::timeout::error::Elapsed`] when the last attempt timed out.
#[derive(Clone, Debug)]
pub struct IdempotentClientLayer<M = MakeUuidKey, C = RetryAnyError> {
    keys: IdempotencyLayer<M>,
    policy: RetryPolicy<C>,
    attempt_timeout: Duration,
}

/// The service an [`IdempotentClientLayer`] makes around `S`.
pub type IdempotentClient<S, M = MakeUuidKey, C = RetryAnyError> =
    super::Idempotency<Retry<RetryPolicy<C>, Timeout<S>>, M>;

impl IdempotentClientLayer {
    /// Sends the keys callers put in request extensions, retries with the default
    /// [`RetryPolicy`], and gives each attempt 30 seconds.
    pub fn new() -> Self {
        Self {
            keys: IdempotencyLayer::new(),
            policy: RetryPolicy::new(),
            attempt_timeout: Duration::from_secs(30),
        }
    }
}

impl Default for IdempotentClientLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<M, C> IdempotentClientLayer<M, C> {
    /// How keys are put on requests: which header, and whether to generate them.
    pub fn keys<M2>(self, keys: IdempotencyLayer<M2>) -> IdempotentClientLayer<M2, C> {
        IdempotentClientLayer {
            keys,
            policy: self.policy,
            attempt_timeout: self.attempt_timeout,
        }
    }

    /// When and how often to retry.
    pub fn retry<C2>(self, policy: RetryPolicy<C2>) -> IdempotentClientLayer<M, C2> {
        IdempotentClientLayer {
            keys: self.keys,
            policy,
            attempt_timeout: self.attempt_timeout,
        }
    }

    /// The longest one attempt may wait for its response's head (default 30 s). A timed-out
    /// attempt counts as a failure, and is retried like one.
    ///
    /// The response's body comes after the attempt ends, as it is read; a retry could not
    /// replace it by then. To bound the reading too, wrap it in a timeout of its own (such as
    /// `tokio::time::timeout` around `collect()`), or wrap the client this layer wraps in
    /// tower-http's `ResponseBodyTimeoutLayer`, which bounds the wait for each piece of it.
    ///
    /// # Panics
    ///
    /// When `timeout` is zero: every attempt would time out before it was sent.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        assert!(
            !timeout.is_zero(),
            "IdempotentClientLayer: the attempt timeout must be greater than zero"
        );
        self.attempt_timeout = timeout;
        self
    }
}

impl<S, M: Clone, C: Clone> Layer<S> for IdempotentClientLayer<M, C> {
    type Service = IdempotentClient<S, M, C>;

    fn layer(&self, inner: S) -> Self::Service {
        self.keys.layer(Retry::new(
            self.policy.clone(),
            Timeout::new(inner, self.attempt_timeout),
        ))
    }
}
