//! The client stack against tower-test mocks, on paused time: ordering, waits and counts that
//! real sockets cannot pin down.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header::RETRY_AFTER};
use http_body_util::Full;
use tokio::time::Instant;
use tower::{BoxError, ServiceBuilder, ServiceExt, retry::budget::TpsBudget};
use tower_layer::Layer;
use tower_test::mock::{self, Handle, Mock, SendResponse};

use super::{policy::retry_after, *};
use crate::key::{IDEMPOTENCY_KEY, IdempotencyKey};

type Body = Full<Bytes>;
type Res = Response<String>;

/// A quick policy: backoff of 10 ms to 1 s, 5 attempts.
fn policy() -> RetryPolicy {
    RetryPolicy::new()
        .max_attempts(5)
        .backoff(Duration::from_millis(10), Duration::from_secs(1))
}

type Client<C> = IdempotentClient<Mock<Request<Body>, Res>, MakeUuidKey, C>;

fn stack<C: Clone>(
    keys: IdempotencyLayer,
    policy: RetryPolicy<C>,
) -> (Client<C>, Handle<Request<Body>, Res>) {
    let (mock, handle) = mock::pair::<Request<Body>, Res>();
    let client = IdempotentClientLayer::new()
        .keys(keys)
        .retry(policy)
        .attempt_timeout(Duration::from_secs(1))
        .layer(mock);
    (client, handle)
}

fn post(key: Option<&str>) -> Request<Body> {
    let mut req = Request::post("http://api.test/api/v1/deployments")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    if let Some(key) = key {
        req.extensions_mut()
            .insert(IdempotencyKey::new(key).unwrap());
    }
    req
}

fn status(code: u16) -> Res {
    Response::builder()
        .status(code)
        .body(format!("status {code}"))
        .unwrap()
}

fn status_retry_after(code: u16, after: &str) -> Res {
    let mut res = status(code);
    res.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_str(after).unwrap());
    res
}

/// What one attempt carried, and when it arrived.
struct Seen {
    key: Option<String>,
    at: Instant,
}

/// Answers the attempts in turn with `answers`, then returns what each attempt carried. An
/// answer of `None` leaves that attempt hanging, to time out.
async fn serve(
    handle: &mut Handle<Request<Body>, Res>,
    answers: Vec<Option<Res>>,
) -> (Vec<Seen>, Vec<SendResponse<Res>>) {
    let mut seen = Vec::new();
    let mut hanging = Vec::new();
    for answer in answers {
        let (req, send) = handle.next_request().await.expect("another attempt");
        seen.push(Seen {
            key: req
                .headers()
                .get(IDEMPOTENCY_KEY)
                .map(|v| v.to_str().unwrap().to_owned()),
            at: Instant::now(),
        });
        match answer {
            Some(res) => send.send_response(res),
            None => hanging.push(send),
        }
    }
    (seen, hanging)
}

/// Asserts that no attempt follows the ones served: once the call is over and the client gone,
/// the mock's channel closes without another request in it. Call it before awaiting the call,
/// so that an extra attempt fails the test rather than hanging it.
async fn assert_no_more_attempts<B>(mut handle: Handle<Request<B>, Res>) {
    assert!(
        handle.next_request().await.is_none(),
        "an extra attempt was made"
    );
}

#[tokio::test(start_paused = true)]
async fn generated_key_is_written_once_and_kept_on_every_attempt() {
    let (client, mut handle) = stack(IdempotencyLayer::new().generate_keys(), policy());
    let call = tokio::spawn(client.oneshot(post(None)));
    // A 408: the server's timeout answered, and the run may go on behind it.
    let answers = vec![
        Some(status(503)),
        Some(status(502)),
        Some(status(504)),
        Some(status(408)),
        Some(status(201)),
    ];
    let (seen, _) = serve(&mut handle, answers).await;
    assert_no_more_attempts(handle).await;
    let res = call.await.unwrap().unwrap();

    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(seen.len(), 5);
    let key = seen[0].key.clone().expect("a generated key");
    assert_eq!(uuid::Uuid::parse_str(&key).unwrap().get_version_num(), 4);
    assert!(seen.iter().all(|s| s.key.as_deref() == Some(key.as_str())));
    assert_eq!(
        res.extensions().get::<IdempotencyKey>().unwrap().as_str(),
        key
    );
}

#[tokio::test(start_paused = true)]
async fn unkeyed_post_is_not_retried() {
    let (client, mut handle) = stack(IdempotencyLayer::new(), policy());
    let call = tokio::spawn(client.oneshot(post(None)));
    let (seen, _) = serve(&mut handle, vec![Some(status(503))]).await;
    assert_no_more_attempts(handle).await;
    let res = call.await.unwrap().unwrap();

    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(seen[0].key, None);
}

#[tokio::test(start_paused = true)]
async fn post_whose_key_header_holds_no_valid_key_is_not_retried() {
    // A server may take a header that holds no valid key for no key at all, and run each
    // attempt: such a request is treated as having none.
    for values in [&[""][..], &["has space"], &["a", "b"], &[&"k".repeat(256)]] {
        let (client, mut handle) = stack(IdempotencyLayer::new().generate_keys(), policy());
        let mut req = post(None);
        for value in values {
            req.headers_mut()
                .append(IDEMPOTENCY_KEY, HeaderValue::from_str(value).unwrap());
        }
        let call = tokio::spawn(client.oneshot(req));
        let (_, _) = serve(&mut handle, vec![Some(status(503))]).await;
        assert_no_more_attempts(handle).await;
        let res = call.await.unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{values:?}");
        assert!(res.extensions().get::<IdempotencyKey>().is_none());
    }
}

#[tokio::test(start_paused = true)]
async fn unkeyed_post_error_is_not_retried() {
    let (client, mut handle) = stack(IdempotencyLayer::new(), policy());
    let call = tokio::spawn(client.oneshot(post(None)));
    let (_req, send) = handle.next_request().await.unwrap();
    send.send_error("connection closed before message completed");
    assert_no_more_attempts(handle).await;
    let err = call.await.unwrap().unwrap_err();

    assert_eq!(
        err.to_string(),
        "connection closed before message completed"
    );
}

#[tokio::test(start_paused = true)]
async fn unkeyed_post_is_retried_when_allowed() {
    let (client, mut handle) = stack(
        IdempotencyLayer::new(),
        policy().retry_unkeyed_requests(true),
    );
    let call = tokio::spawn(client.oneshot(post(None)));
    let (seen, _) = serve(&mut handle, vec![Some(status(503)), Some(status(201))]).await;
    assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::CREATED);
    assert_eq!(seen.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn unkeyed_get_and_put_are_retried_without_a_key() {
    for method in [Method::GET, Method::PUT, Method::DELETE] {
        let (client, mut handle) = stack(IdempotencyLayer::new().generate_keys(), policy());
        let req = Request::builder()
            .method(method.clone())
            .uri("http://api.test/api/v1/deployments/1")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let call = tokio::spawn(client.oneshot(req));
        let (seen, _) = serve(&mut handle, vec![Some(status(502)), Some(status(200))]).await;
        assert_eq!(
            call.await.unwrap().unwrap().status(),
            StatusCode::OK,
            "{method}"
        );
        assert!(
            seen.iter().all(|s| s.key.is_none()),
            "{method} was given a key"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_seconds_is_waited_for() {
    let (client, mut handle) = stack(IdempotencyLayer::new(), policy());
    let call = tokio::spawn(client.oneshot(post(Some("deploy-v1"))));
    let answers = vec![
        Some(status_retry_after(503, "7")),
        Some(status_retry_after(429, "3")),
        Some(status(201)),
    ];
    let (seen, _) = serve(&mut handle, answers).await;
    assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::CREATED);

    assert!(seen[1].at - seen[0].at >= Duration::from_secs(7));
    assert!(seen[2].at - seen[1].at >= Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn retry_after_longer_than_the_cap_returns_the_response() {
    let policy = policy().max_retry_after(Duration::from_secs(30));
    let (client, mut handle) = stack(IdempotencyLayer::new(), policy);
    let call = tokio::spawn(client.oneshot(post(Some("deploy-v1"))));
    serve(&mut handle, vec![Some(status_retry_after(503, "120"))]).await;
    assert_no_more_attempts(handle).await;
    let res = call.await.unwrap().unwrap();

    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()[RETRY_AFTER], "120");
}

#[test]
fn retry_after_parses_seconds_and_http_dates() {
    let now = SystemTime::now();
    let parse = |value: &str| {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
        retry_after(&headers, now)
    };
    assert_eq!(parse("5"), Some(Duration::from_secs(5)));
    assert_eq!(parse(" 0 "), Some(Duration::ZERO));
    let later = httpdate::fmt_http_date(now + Duration::from_secs(10));
    let wait = parse(&later).unwrap();
    // HTTP-dates have whole seconds.
    assert!(
        wait > Duration::from_secs(8) && wait <= Duration::from_secs(10),
        "{wait:?}"
    );
    let earlier = httpdate::fmt_http_date(now - Duration::from_secs(10));
    assert_eq!(parse(&earlier), Some(Duration::ZERO));
    assert_eq!(parse("soon"), None);
    assert_eq!(parse("-5"), None);
    assert_eq!(retry_after(&HeaderMap::new(), now), None);
}

#[tokio::test(start_paused = true)]
async fn attempts_are_bounded() {
    let (client, mut handle) = stack(IdempotencyLayer::new(), policy().max_attempts(3));
    let call = tokio::spawn(client.oneshot(post(Some("deploy-v1"))));
    let (seen, _) = serve(&mut handle, vec![Some(status(503)); 3]).await;
    assert_no_more_attempts(handle).await;
    let res = call.await.unwrap().unwrap();

    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(seen.len(), 3);
}

#[tokio::test(start_paused = true)]
async fn backoff_grows_between_attempts() {
    let policy = policy()
        .backoff(Duration::from_secs(1), Duration::from_secs(60))
        .jitter(0.0);
    let (client, mut handle) = stack(IdempotencyLayer::new(), policy);
    let call = tokio::spawn(client.oneshot(post(Some("deploy-v1"))));
    let answers = vec![
        Some(status(502)),
        Some(status(502)),
        Some(status(502)),
        Some(status(201)),
    ];
    let (seen, _) = serve(&mut handle, answers).await;
    assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::CREATED);

    let gaps: Vec<Duration> = seen.windows(2).map(|w| w[1].at - w[0].at).collect();
    assert!(gaps[0] >= Duration::from_secs(1), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_secs(2), "{gaps:?}");
    assert!(gaps[2] >= Duration::from_secs(4), "{gaps:?}");
}

#[test]
fn jitter_spreads_the_waits_below_the_maximum_too() {
    let ms = Duration::from_millis;
    // Jitter 1.0 (the default): between one and two times the base.
    let policy = RetryPolicy::new().backoff(ms(100), ms(400));
    assert_eq!(policy.backoff_wait(1, 0.0), ms(100));
    assert_eq!(policy.backoff_wait(1, 0.5), ms(150));
    assert_eq!(policy.backoff_wait(2, 0.0), ms(200));
    // Once the base reaches the maximum, the waits spread below it, over half of it to all of
    // it, rather than all landing on it.
    for retry in 3..64 {
        assert_eq!(policy.backoff_wait(retry, 0.0), ms(200), "retry {retry}");
        assert_eq!(policy.backoff_wait(retry, 0.5), ms(300), "retry {retry}");
        let top = policy.backoff_wait(retry, 0.999_999);
        assert!(top > ms(399) && top <= ms(400), "retry {retry}: {top:?}");
    }
    // A minimum close to the maximum: waits spread over all of what lies between them, rather
    // than meeting at the maximum.
    let narrow = RetryPolicy::new().backoff(ms(300), ms(400));
    assert_eq!(narrow.backoff_wait(1, 0.0), ms(300));
    assert_eq!(narrow.backoff_wait(5, 0.2), ms(320));
    assert_eq!(narrow.backoff_wait(5, 0.9), ms(390));
    assert_eq!(narrow.backoff_wait(1, 0.5), ms(350));
    // Waits keep doubling however small the minimum: 1 ns doubled 44 times is over an hour.
    let tiny = RetryPolicy::new()
        .backoff(Duration::from_nanos(1), Duration::from_secs(3600))
        .jitter(0.0);
    assert_eq!(tiny.backoff_wait(45, 0.5), Duration::from_secs(3600));
    assert_eq!(tiny.backoff_wait(u32::MAX, 0.5), Duration::from_secs(3600));
    // The longest settings give long waits, not a panic.
    let forever = RetryPolicy::new()
        .backoff(ms(100), Duration::MAX)
        .jitter(0.0);
    assert_eq!(forever.backoff_wait(1, 0.5), ms(100));
    assert!(forever.backoff_wait(200, 0.5) > Duration::from_secs(365 * 24 * 3600));
    let longest = RetryPolicy::new().backoff(Duration::MAX, Duration::MAX);
    assert!(longest.backoff_wait(3, 0.999) > Duration::from_secs(365 * 24 * 3600));
    // A `Retry-After` of 1 s waits 1 s and up to a minimum backoff more, spread by the jitter.
    assert_eq!(policy.after_wait(ms(1000), 0.0), ms(1000));
    assert_eq!(policy.after_wait(ms(1000), 0.5), ms(1050));
    assert_eq!(policy.jitter(0.0).after_wait(ms(1000), 0.9), ms(1000));
    // No jitter: the base alone, up to the maximum.
    let steady = RetryPolicy::new().backoff(ms(100), ms(400)).jitter(0.0);
    assert_eq!(steady.backoff_wait(2, 0.7), ms(200));
    assert_eq!(steady.backoff_wait(9, 0.7), ms(400));
}

#[tokio::test(start_paused = true)]
async fn waits_at_the_maximum_backoff_still_vary() {
    let policy = policy()
        .max_attempts(6)
        .backoff(Duration::from_millis(100), Duration::from_millis(400));
    let (client, mut handle) = stack(IdempotencyLayer::new(), policy);
    let call = tokio::spawn(client.oneshot(post(Some("deploy-v1"))));
    let answers = (0..6).map(|_| Some(status(502))).collect();
    let (seen, _) = serve(&mut handle, answers).await;
    assert_eq!(
        call.await.unwrap().unwrap().status(),
        StatusCode::BAD_GATEWAY
    );
    // The third to fifth waits have reached the 400 ms maximum: each is somewhere between 200
    // and 400 ms, and not all the same.
    let gaps: Vec<Duration> = seen.windows(2).map(|w| w[1].at - w[0].at).collect();
    let capped = &gaps[2..];
    assert!(
        capped
            .iter()
            .all(|gap| (Duration::from_millis(200)..=Duration::from_millis(401)).contains(gap)),
        "{gaps:?}"
    );
    assert!(capped.windows(2).any(|w| w[0] != w[1]), "{gaps:?}");
}

#[tokio::test(start_paused = true)]
async fn timed_out_attempt_is_retried_with_the_same_key() {
    let (client, mut handle) = stack(IdempotencyLayer::new(), policy());
    let call = tokio::spawn(client.oneshot(post(Some("deploy-v1"))));
    // The first attempt never answers; the 1 s attempt timeout ends it.
    let (seen, _hanging) = serve(&mut handle, vec![None, Some(status(201))]).await;
    assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::CREATED);

    assert!(seen[1].at - seen[0].at >= Duration::from_secs(1));
    assert!(seen.iter().all(|s| s.key.as_deref() == Some("deploy-v1")));
}

#[tokio::test(start_paused = true)]
async fn last_timeout_is_the_error() {
    let (client, mut handle) = stack(IdempotencyLayer::new(), policy().max_attempts(2));
    let call = tokio::spawn(client.oneshot(post(Some("deploy-v1"))));
    let (seen, _hanging) = serve(&mut handle, vec![None, None]).await;
    let err = call.await.unwrap().unwrap_err();

    assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    assert_eq!(seen.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn error_classifier_limits_what_is_retried() {
    let only_timeouts = |e: &BoxError| e.is::<tower::timeout::error::Elapsed>();
    let (client, mut handle) = stack(
        IdempotencyLayer::new(),
        policy().retry_errors_if(only_timeouts),
    );
    let call = tokio::spawn(client.oneshot(post(Some("deploy-v1"))));
    let (seen, _hanging) = serve(&mut handle, vec![None]).await;
    let (_req, send) = handle.next_request().await.unwrap();
    send.send_error("certificate rejected");
    assert_no_more_attempts(handle).await;
    let err = call.await.unwrap().unwrap_err();

    assert_eq!(err.to_string(), "certificate rejected");
    assert_eq!(seen.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn conflict_with_retry_after_is_retried_for_a_keyed_request_only() {
    // The idempotency server's "still running" answer: come back after Retry-After.
    let (client, mut handle) = stack(IdempotencyLayer::new(), policy());
    let call = tokio::spawn(client.oneshot(post(Some("deploy-v1"))));
    let answers = vec![Some(status_retry_after(409, "2")), Some(status(201))];
    let (seen, _) = serve(&mut handle, answers).await;
    assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::CREATED);
    assert!(seen[1].at - seen[0].at >= Duration::from_secs(2));

    let unkeyed_put = Request::put("http://api.test/api/v1/deployments/1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (client, mut handle) = stack(IdempotencyLayer::new(), policy());
    let call = tokio::spawn(client.oneshot(unkeyed_put));
    serve(&mut handle, vec![Some(status_retry_after(409, "2"))]).await;
    assert_no_more_attempts(handle).await;
    assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::CONFLICT);
}

#[tokio::test(start_paused = true)]
async fn other_statuses_are_final() {
    for code in [200, 201, 400, 409, 422, 500] {
        let (client, mut handle) = stack(IdempotencyLayer::new(), policy());
        let call = tokio::spawn(client.oneshot(post(Some("deploy-v1"))));
        serve(&mut handle, vec![Some(status(code))]).await;
        assert_no_more_attempts(handle).await;
        assert_eq!(call.await.unwrap().unwrap().status().as_u16(), code);
    }
}

#[tokio::test(start_paused = true)]
async fn spent_budget_stops_retries() {
    // No reserve and no share of deposits: the budget never allows a retry.
    let policy = policy().budget(TpsBudget::new(Duration::from_secs(1), 0, 0.0));
    let (client, mut handle) = stack(IdempotencyLayer::new(), policy);
    let call = tokio::spawn(client.oneshot(post(Some("deploy-v1"))));
    serve(&mut handle, vec![Some(status(503))]).await;

    assert_no_more_attempts(handle).await;
    assert_eq!(
        call.await.unwrap().unwrap().status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
}

/// A body that can be sent only once, as a stream would be; with `true`, one that must not even
/// be asked for a copy.
struct Once(Full<Bytes>, bool);

impl http_body::Body for Once {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.0).poll_frame(cx)
    }
}

impl ReplayBody for Once {
    fn replay(&self) -> Option<Self> {
        assert!(
            !self.1,
            "a copy of the body was asked for where no retry can come"
        );
        None
    }
}

/// Sends an upload with `body` through a client with `policy`, answers its one attempt 503,
/// and checks that no other attempt follows and the 503 is the answer.
async fn sent_once_and_answered(policy: RetryPolicy, body: Once) {
    let (mock, mut handle) = mock::pair::<Request<Once>, Res>();
    let client = IdempotentClientLayer::new().retry(policy).layer(mock);
    let mut req = Request::post("http://api.test/upload").body(body).unwrap();
    req.extensions_mut()
        .insert(IdempotencyKey::new("upload-1").unwrap());
    let call = tokio::spawn(client.oneshot(req));
    let (_req, send) = handle.next_request().await.unwrap();
    send.send_response(status(503));
    assert_no_more_attempts(handle).await;
    assert_eq!(
        call.await.unwrap().unwrap().status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test(start_paused = true)]
async fn no_copy_of_the_body_is_made_when_no_retry_can_come() {
    let body = Once(Full::new(Bytes::from_static(b"{}")), true);
    sent_once_and_answered(policy().max_attempts(1), body).await;
}

#[tokio::test(start_paused = true)]
async fn body_that_cannot_replay_is_sent_once() {
    let body = Once(Full::new(Bytes::from_static(b"{}")), false);
    sent_once_and_answered(policy(), body).await;
}

#[tokio::test(start_paused = true)]
async fn key_layer_inside_the_retry_does_not_retry_posts() {
    // The wrong order: each attempt would get a new generated key. The policy sees no key on
    // its copy of the request and refuses to retry, so nothing runs twice.
    let (mock, mut handle) = mock::pair::<Request<Body>, Res>();
    let client = ServiceBuilder::new()
        .retry(policy())
        .layer(IdempotencyLayer::new().generate_keys())
        .service(mock);
    let call = tokio::spawn(client.oneshot(post(None)));
    let (seen, _) = serve(&mut handle, vec![Some(status(503))]).await;

    assert_no_more_attempts(handle).await;
    assert_eq!(
        call.await.unwrap().unwrap().status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(seen[0].key.is_some());
}

#[tokio::test(start_paused = true)]
async fn a_key_only_in_the_extensions_is_not_enough_for_the_policy() {
    // Without a key layer below it, the key in the extensions never goes out: retrying would
    // send the POST twice with no key at all. The policy cannot tell, so it does not retry.
    let (mock, mut handle) = mock::pair::<Request<Body>, Res>();
    let client = ServiceBuilder::new().retry(policy()).service(mock);
    let call = tokio::spawn(client.oneshot(post(Some("order-1"))));
    let (seen, _) = serve(&mut handle, vec![Some(status(503))]).await;

    assert_no_more_attempts(handle).await;
    assert_eq!(
        call.await.unwrap().unwrap().status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(seen[0].key, None, "no key went out");
}

#[tokio::test(start_paused = true)]
async fn key_layer_inside_the_retry_does_not_retry_an_auto_header_either() {
    // `auto` asks the key layer for a key; in the wrong order it would make a new one for each
    // attempt. The policy does not count it as a key.
    let (mock, mut handle) = mock::pair::<Request<Body>, Res>();
    let client = ServiceBuilder::new()
        .retry(policy())
        .layer(IdempotencyLayer::new())
        .service(mock);
    let mut req = post(None);
    req.headers_mut()
        .insert(IDEMPOTENCY_KEY, http::HeaderValue::from_static("auto"));
    let call = tokio::spawn(client.oneshot(req));
    let (seen, _) = serve(&mut handle, vec![Some(status(503))]).await;

    assert_no_more_attempts(handle).await;
    assert_eq!(
        call.await.unwrap().unwrap().status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_ne!(seen[0].key.as_deref(), Some("auto"), "the layer made a key");
}

#[tokio::test(start_paused = true)]
async fn custom_header_name_reaches_the_policy() {
    let name = http::HeaderName::from_static("x-idempotency-key");
    let (mock, mut handle) = mock::pair::<Request<Body>, Res>();
    let client = IdempotentClientLayer::new()
        .keys(IdempotencyLayer::new().header_name(name.clone()))
        .retry(policy())
        .layer(mock);
    let call = tokio::spawn(client.oneshot(post(Some("deploy-v1"))));
    let mut keys = Vec::new();
    for res in [status(503), status(201)] {
        let (req, send) = handle.next_request().await.unwrap();
        keys.push(req.headers()[&name].clone());
        assert!(!req.headers().contains_key(IDEMPOTENCY_KEY));
        send.send_response(res);
    }
    assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::CREATED);
    assert_eq!(keys, ["deploy-v1", "deploy-v1"]);
}

#[tokio::test(start_paused = true)]
async fn hand_composed_policy_finds_the_key_under_the_layers_header() {
    // The layers composed by hand, the header renamed on the key layer only: the policy still
    // sees the key, retries, and every attempt carries the same one.
    let name = http::HeaderName::from_static("x-request-key");
    let (mock, mut handle) = mock::pair::<Request<Body>, Res>();
    let client = ServiceBuilder::new()
        .layer(
            IdempotencyLayer::new()
                .generate_keys()
                .header_name(name.clone()),
        )
        .retry(policy())
        .service(mock);
    let call = tokio::spawn(client.oneshot(post(None)));
    let mut keys = Vec::new();
    for res in [status(503), status_retry_after(409, "1"), status(201)] {
        let (req, send) = handle.next_request().await.unwrap();
        keys.push(req.headers()[&name].to_str().unwrap().to_owned());
        send.send_response(res);
    }
    assert_no_more_attempts(handle).await;
    assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::CREATED);
    assert_eq!(keys.len(), 3);
    assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
}

#[test]
#[should_panic(expected = "the backoff's minimum must be greater than zero")]
fn a_backoff_from_zero_is_refused() {
    // Doubling zero stays zero: every retry would go at once.
    let _ = RetryPolicy::new().backoff(Duration::ZERO, Duration::from_secs(1));
}

#[test]
#[should_panic(expected = "the attempt timeout must be greater than zero")]
fn an_attempt_timeout_of_no_time_is_refused() {
    let _ = IdempotentClientLayer::new().attempt_timeout(Duration::ZERO);
}
