use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use http::{HeaderName, Method, Request, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::key::{self, IDEMPOTENCY_KEY, IdempotencyKey};

/// Makes the key for a request that has none, on the methods an [`IdempotencyLayer`] was told
/// to generate keys for.
///
/// [`MakeUuidKey`] is the default. Return `None` to send the request without a key.
///
/// A key must name one operation: a server answers every request with a key it has seen (for
/// 24 hours, by default) with the first one's response. So a maker must never give a key to two
/// operations, from any process, before or after a restart: a counter that starts again at 0
/// does. A key taken from the operation itself is best, since a retry made later, by another
/// process, finds it again. Here, the request id the caller gave the operation:
///
/// ```
/// use http::Request;
/// use tower_idempotency::{IdempotencyKey, client::MakeIdempotencyKey};
///
/// #[derive(Clone)]
/// struct FromRequestId;
///
/// impl MakeIdempotencyKey for FromRequestId {
///     fn make_key<B>(&mut self, request: &Request<B>) -> Option<IdempotencyKey> {
///         let id = request.headers().get("x-request-id")?;
///         IdempotencyKey::from_header_value(id).ok()
///     }
/// }
///
/// let request = Request::post("/orders").header("x-request-id", "order-7f3a").body(()).unwrap();
/// assert_eq!(FromRequestId.make_key(&request).unwrap().as_str(), "order-7f3a");
/// ```
///
/// The maker is cloned with the service, and services are cloned freely (once a request with
/// `oneshot`, once a task): state it keeps must be shared, behind an `Arc`.
pub trait MakeIdempotencyKey {
    /// The key for `request`, or `None` for no key.
    fn make_key<B>(&mut self, request: &Request<B>) -> Option<IdempotencyKey>;
}

/// Makes a fresh UUID v4 key, as [`IdempotencyKey::auto`] does.
#[derive(Clone, Copy, Debug, Default)]
pub struct MakeUuidKey;

impl MakeIdempotencyKey for MakeUuidKey {
    fn make_key<B>(&mut self, _request: &Request<B>) -> Option<IdempotencyKey> {
        Some(IdempotencyKey::auto())
    }
}

/// Puts the idempotency key on requests: the [`Layer`] for [`Idempotency`].
///
/// This is the client half, for the requests a program sends. A server wants
/// [`IdempotencyServiceLayer`](crate::IdempotencyServiceLayer): on a router, this layer would
/// only put a key header on the requests it receives, and run every one of them.
///
/// A request's key comes from, in this order:
/// 1. the key header it already carries (it is kept as it is, unless it is the special value
///    `auto`: that is replaced with a fresh UUID v4 on each call);
/// 2. an [`IdempotencyKey`] in its extensions;
/// 3. the key maker, when [key generation](Self::generate_keys) is on for its method.
///
/// Otherwise the request goes out without a key. The key in use is also put into the
/// response's extensions, so a caller can read the key that was generated for it.
///
/// Place this layer *outside* the retry, so the key is written once and every attempt carries
/// it; [`IdempotentClientLayer`](super::IdempotentClientLayer) does that for you. The debug
/// line for each attempt comes from the [`RetryPolicy`](super::RetryPolicy) inside it.
#[derive(Clone, Debug)]
pub struct IdempotencyLayer<M = MakeUuidKey> {
    header: HeaderName,
    methods: Arc<[Method]>,
    make: M,
}

impl IdempotencyLayer {
    /// A layer that sends the keys callers put in request extensions, under `Idempotency-Key`,
    /// and generates none.
    pub fn new() -> Self {
        Self {
            header: IDEMPOTENCY_KEY,
            methods: Arc::from([]),
            make: MakeUuidKey,
        }
    }
}

impl Default for IdempotencyLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<M> IdempotencyLayer<M> {
    /// Generates a key for every POST and PATCH that has none.
    ///
    /// The generated key protects the retries of this one call, and comes back in the
    /// response's extensions. A call that fails has no response to carry it: to keep a key
    /// for retrying later (after a timeout, say, or from another process), make it before the
    /// call with [`IdempotencyKey::auto`], store it, and put it in the request's extensions.
    pub fn generate_keys(self) -> Self {
        self.generate_keys_for([Method::POST, Method::PATCH])
    }

    /// Generates a key for requests with one of `methods` that have none, replacing the
    /// methods set before.
    ///
    /// Safe methods (GET, HEAD, OPTIONS, TRACE) are skipped: the key maker never gives them a
    /// key. (A request of any method whose key header is `auto` asked for a fresh key, and gets
    /// one.)
    pub fn generate_keys_for(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().filter(|m| !m.is_safe()).collect();
        self
    }

    /// Makes generated keys with `make` in place of UUID v4.
    pub fn make_key_with<M2: MakeIdempotencyKey>(self, make: M2) -> IdempotencyLayer<M2> {
        IdempotencyLayer {
            header: self.header,
            methods: self.methods,
            make,
        }
    }

    /// Sends the key under `name` in place of `Idempotency-Key`. A
    /// [`RetryPolicy`](super::RetryPolicy) inside this layer looks for the key under the same
    /// name, without being told.
    pub fn header_name(mut self, name: HeaderName) -> Self {
        self.header = name;
        self
    }
}

/// The header a request's key went out under, left in the request's extensions by
/// [`Idempotency`] so that a retry policy inside it looks for the key where it is.
#[derive(Clone, Debug)]
pub(crate) struct KeyHeader(pub(crate) HeaderName);

impl<S, M: Clone> Layer<S> for IdempotencyLayer<M> {
    type Service = Idempotency<S, M>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency {
            inner,
            layer: self.clone(),
        }
    }
}

/// Puts the idempotency key on requests; see [`IdempotencyLayer`].
#[derive(Clone, Debug)]
pub struct Idempotency<S, M = MakeUuidKey> {
    inner: S,
    layer: IdempotencyLayer<M>,
}

impl<S> Idempotency<S> {
    /// Wraps `inner`, sending the keys callers put in request extensions.
    pub fn new(inner: S) -> Self {
        IdempotencyLayer::new().layer(inner)
    }
}

impl Idempotency<()> {
    /// The default [`IdempotencyLayer`], to configure; the same as
    /// [`IdempotencyLayer::new`].
    ///
    /// ```
    /// use tower_idempotency::client::Idempotency;
    ///
    /// let layer = Idempotency::layer().generate_keys();
    /// # let _ = layer;
    /// ```
    pub fn layer() -> IdempotencyLayer {
        IdempotencyLayer::new()
    }
}

impl<S, M> Idempotency<S, M> {
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

impl<S, M, B, ResB> Service<Request<B>> for Idempotency<S, M>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    M: MakeIdempotencyKey,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let header = &self.layer.header;
        // Quoted or bare, as the server reads it.
        let asks_auto = req
            .headers()
            .get(header)
            .is_some_and(|value| key::parse(value).is_ok_and(|key| key::is_auto(&key)));
        let key = if asks_auto {
            let key = IdempotencyKey::auto();
            req.headers_mut()
                .insert(header.clone(), key.to_header_value());
            Some(key)
        } else if req.headers().contains_key(header) {
            // The caller's header stays as it is; report it when it parses.
            match IdempotencyKey::from_headers(req.headers(), header) {
                Ok(key) => key,
                Err(err) => {
                    tracing::warn!(
                        target: super::policy::TARGET,
                        "the request's {header} header holds no valid key ({err}); it is sent as it is, and is not taken for a key (a POST or PATCH with it is not retried)"
                    );
                    None
                }
            }
        } else {
            let key = match req.extensions().get::<IdempotencyKey>() {
                Some(key) => Some(key.clone()),
                None if self.layer.methods.contains(req.method()) => self.layer.make.make_key(&req),
                None => None,
            };
            if let Some(key) = &key {
                req.headers_mut()
                    .insert(header.clone(), key.to_header_value());
            }
            key
        };
        if req.headers().contains_key(header) {
            req.extensions_mut().insert(KeyHeader(header.clone()));
        }
        ResponseFuture {
            inner: self.inner.call(req),
            key,
        }
    }
}

pin_project! {
    /// The response future of [`Idempotency`]: the inner response, with the key that was sent
    /// in its extensions.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        key: Option<IdempotencyKey>,
    }
}

impl<F, ResB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResB>, E>>,
{
    type Output = Result<Response<ResB>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = ready!(this.inner.poll(cx))?;
        if let Some(key) = this.key.take() {
            res.extensions_mut().insert(key);
        }
        Poll::Ready(Ok(res))
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::HeaderValue;
    use tower::{ServiceExt, service_fn};

    use super::*;

    /// Echoes the key header it received in the response body.
    async fn echo_key(req: Request<()>) -> Result<Response<String>, Infallible> {
        let seen = req
            .headers()
            .get_all(IDEMPOTENCY_KEY)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect::<Vec<_>>()
            .join(",");
        Ok(Response::new(seen))
    }

    async fn send(layer: IdempotencyLayer, req: Request<()>) -> Response<String> {
        layer
            .layer(service_fn(echo_key))
            .oneshot(req)
            .await
            .unwrap()
    }

    fn post() -> Request<()> {
        Request::post("/api/v1/deployments").body(()).unwrap()
    }

    #[tokio::test]
    async fn key_from_extensions_is_sent_and_reported() {
        let mut req = post();
        req.extensions_mut()
            .insert(IdempotencyKey::new("deploy-v1").unwrap());
        let res = send(IdempotencyLayer::new(), req).await;
        assert_eq!(res.body(), "deploy-v1");
        assert_eq!(
            res.extensions().get::<IdempotencyKey>().unwrap().as_str(),
            "deploy-v1"
        );
    }

    #[tokio::test]
    async fn existing_header_is_kept_over_the_extension() {
        let mut req = post();
        req.headers_mut()
            .insert(IDEMPOTENCY_KEY, HeaderValue::from_static("from-header"));
        req.extensions_mut()
            .insert(IdempotencyKey::new("from-extension").unwrap());
        let res = send(IdempotencyLayer::new().generate_keys(), req).await;
        assert_eq!(res.body(), "from-header");
        assert_eq!(
            res.extensions().get::<IdempotencyKey>().unwrap().as_str(),
            "from-header"
        );
    }

    #[tokio::test]
    async fn the_special_value_auto_is_a_fresh_key_each_time() {
        // As a key in the extensions, and as the header's value (bare or quoted): each request
        // gets its own UUID v4, never the literal `auto`, and the response reports the key sent.
        let mut sent = Vec::new();
        for in_header in [None, Some("auto"), None, Some("\"auto\"")] {
            let mut req = post();
            if let Some(value) = in_header {
                req.headers_mut()
                    .insert(IDEMPOTENCY_KEY, HeaderValue::from_static(value));
            } else {
                req.extensions_mut().insert(IdempotencyKey::auto());
            }
            let res = send(IdempotencyLayer::new(), req).await;
            let uuid = uuid::Uuid::parse_str(res.body()).unwrap();
            assert_eq!(uuid.get_version_num(), 4);
            let reported = res.extensions().get::<IdempotencyKey>().unwrap();
            assert_eq!(reported.as_str(), res.body());
            sent.push(res.into_body());
        }
        sent.sort();
        sent.dedup();
        assert_eq!(sent.len(), 4, "every request had a key of its own");
    }

    #[tokio::test]
    async fn nothing_is_generated_unless_asked() {
        let res = send(IdempotencyLayer::new(), post()).await;
        assert_eq!(res.body(), "");
        assert!(res.extensions().get::<IdempotencyKey>().is_none());
    }

    #[tokio::test]
    async fn generated_keys_are_uuid_v4_on_post_and_patch_only() {
        let layer = IdempotencyLayer::new().generate_keys();
        let patch = Request::patch("/api/v1/deployments/1").body(()).unwrap();
        for req in [post(), patch] {
            let res = send(layer.clone(), req).await;
            let uuid = uuid::Uuid::parse_str(res.body()).unwrap();
            assert_eq!(uuid.get_version_num(), 4);
        }

        let get = Request::get("/api/v1/deployments").body(()).unwrap();
        assert_eq!(send(layer.clone(), get).await.body(), "");
        let put = Request::put("/api/v1/deployments/1").body(()).unwrap();
        assert_eq!(send(layer, put).await.body(), "");
    }

    #[tokio::test]
    async fn safe_methods_are_never_given_a_generated_key() {
        let layer = IdempotencyLayer::new().generate_keys_for([Method::GET, Method::PATCH]);
        let get = Request::get("/x").body(()).unwrap();
        assert_eq!(send(layer.clone(), get).await.body(), "");
        let patch = Request::patch("/x").body(()).unwrap();
        assert_eq!(send(layer, patch).await.body().len(), 36);
    }

    #[tokio::test]
    async fn custom_header_name_and_key_maker() {
        // Shared, as every clone of the service must count from the same place.
        #[derive(Clone)]
        struct Counter(Arc<std::sync::atomic::AtomicU32>);
        impl MakeIdempotencyKey for Counter {
            fn make_key<B>(&mut self, _: &Request<B>) -> Option<IdempotencyKey> {
                let n = 1 + self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                IdempotencyKey::new(format!("job-{n}")).ok()
            }
        }
        let name = HeaderName::from_static("x-idempotency-key");
        let svc = IdempotencyLayer::new()
            .generate_keys()
            .header_name(name.clone())
            .make_key_with(Counter(Arc::default()))
            .layer(service_fn(move |req: Request<()>| {
                let name = name.clone();
                async move {
                    assert!(!req.headers().contains_key(IDEMPOTENCY_KEY));
                    let v = req.headers()[&name].to_str().unwrap().to_owned();
                    Ok::<_, Infallible>(Response::new(v))
                }
            }));
        let res = svc.clone().oneshot(post()).await.unwrap();
        assert_eq!(res.body(), "job-1");
        let res = svc.oneshot(post()).await.unwrap();
        assert_eq!(
            res.body(),
            "job-2",
            "a clone of the service made the same key again"
        );
    }
}
