//! The server half end to end: an axum app behind `IdempotencyService`, over real sockets, driven
//! by a hyper client. Each test asserts what a client would notice: status, headers, body, and
//! how many times the handler ran.

mod support;

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use axum::{
    body::Bytes,
    http::{HeaderMap, Method, Request, StatusCode, header},
    response::Response,
};
use http_body_util::{BodyExt, Full};
use support::app::{Counter, assert_one_answer, many_keys, serve, server, storm, two_servers};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_idempotency::{
    IdempotencyService, IdempotencyServiceLayer,
    server::{OnConflict, OnStoreError, RequestBody},
    store::{
        Claim, Completion, FencingToken, Fingerprint, Holder, KeyStore, MemoryStore, Record,
        StoreError, StoreKey,
    },
};

#[tokio::test]
async fn first_request_runs_once_and_retries_get_the_stored_response() {
    let s = server(IdempotencyServiceLayer::default()).await;
    let first = s.post("/orders", "order-1", "tea").await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.text(), "run=1 body=tea");
    assert!(!first.replayed());
    assert_eq!(
        first.headers[header::SET_COOKIE],
        "session=secret",
        "the first caller gets every header"
    );

    for _ in 0..3 {
        let retry = s.post("/orders", "order-1", "tea").await;
        assert_eq!(retry.status, StatusCode::CREATED);
        assert_eq!(retry.body, first.body);
        assert!(retry.replayed());
        assert_eq!(retry.headers[header::LOCATION], "/orders/1");
        assert_eq!(retry.headers["x-order-run"], "1");
        assert!(
            retry.headers.get(header::SET_COOKIE).is_none(),
            "Set-Cookie must not be replayed"
        );
    }
    // The quoted form of the draft names the same key.
    let quoted = s.post("/orders", "\"order-1\"", "tea").await;
    assert!(quoted.replayed());
    assert_eq!(quoted.body, first.body);
    assert_eq!(s.runs.runs(), 1);
}

#[tokio::test]
async fn a_key_reused_with_another_request_is_422_and_does_not_run() {
    let s = server(IdempotencyServiceLayer::default()).await;
    assert_eq!(
        s.post("/orders", "k", "tea").await.status,
        StatusCode::CREATED
    );
    let other_body = s.post("/orders", "k", "coffee").await;
    assert_eq!(other_body.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        other_body.problem()["detail"]
            .as_str()
            .unwrap()
            .contains("different request")
    );
    assert_eq!(
        s.post("/orders?x=1", "k", "tea").await.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "query counts"
    );
    assert_eq!(s.runs.runs(), 1);
}

#[tokio::test]
async fn a_grpc_call_is_answered_with_a_grpc_status_a_grpc_client_can_read() {
    // A gRPC client reads a problem+json body as gRPC frames, and reports a protocol error.
    // The service answers a gRPC call with a gRPC status, and its detail in `grpc-message`.
    let calls = Counter::default();
    let svc = IdempotencyServiceLayer::default().layer(counted_orders(&calls));
    let call = |key: &str, message: &'static [u8]| {
        Request::post("/svc.Orders/Create")
            .header("idempotency-key", key)
            .header(header::CONTENT_TYPE, "application/grpc")
            .body(Full::new(Bytes::from_static(message)))
            .unwrap()
    };
    let first = svc
        .clone()
        .oneshot(call("k", b"\0\0\0\0\x01a"))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let reused = svc
        .clone()
        .oneshot(call("k", b"\0\0\0\0\x01b"))
        .await
        .unwrap();
    let invalid = svc
        .clone()
        .oneshot(call("", b"\0\0\0\0\x01a"))
        .await
        .unwrap();
    for (answer, what) in [(reused, "already used"), (invalid, "is empty")] {
        assert_eq!(answer.status(), StatusCode::OK, "trailers-only");
        let headers = answer.headers();
        assert_eq!(headers[header::CONTENT_TYPE], "application/grpc");
        assert_eq!(headers["grpc-status"], "3", "INVALID_ARGUMENT");
        let message = headers["grpc-message"].to_str().unwrap();
        assert!(message.contains(what), "{message}");
        assert!(
            answer
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .is_empty()
        );
    }
    assert_eq!(calls.runs(), 1);
}

#[tokio::test]
async fn requests_picked_to_pass_through_are_neither_read_first_nor_stored() {
    // A streaming call sends its first message and waits for a reply: read whole first, its
    // body would never end, and its handler never run.
    let calls = Counter::default();
    let counted = calls.clone();
    let svc = IdempotencyServiceLayer::default()
        .pass_through_if(|parts| parts.uri.path() == "/svc.Orders/Watch")
        .layer(service_fn(move |_req: Request<RequestBody<Events>>| {
            let run = counted.count();
            async move {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("run={run}")))))
            }
        }));
    // Request bodies that never end: their senders are kept, and send nothing.
    let mut senders = Vec::new();
    let mut call = |path: &str| {
        let (sender, events) = tokio::sync::mpsc::channel(1);
        senders.push(sender);
        Request::post(path)
            .header("idempotency-key", "k")
            .body(Events(events))
            .unwrap()
    };
    let within = Duration::from_secs(1);
    for run in ["run=1", "run=2"] {
        let answer = tokio::time::timeout(within, svc.clone().oneshot(call("/svc.Orders/Watch")))
            .await
            .expect("the streaming call was answered")
            .unwrap();
        assert!(!answer.headers().contains_key("idempotent-replayed"));
        assert_eq!(answer.into_body().collect().await.unwrap().to_bytes(), run);
    }
    // Any other call is read whole first, as it is to be fingerprinted.
    let other = tokio::time::timeout(within, svc.oneshot(call("/svc.Orders/Create"))).await;
    assert!(other.is_err(), "the other call was not read first");
    assert_eq!(calls.runs(), 2);
}

#[tokio::test]
async fn named_headers_count_towards_the_fingerprint() {
    let layer = IdempotencyServiceLayer::default()
        .fingerprint_headers([header::HeaderName::from_static("x-account")]);
    let s = server(layer).await;
    let send = async |account: &str| s.post_with("k", ("x-account", account)).await;
    assert_eq!(send("a").await.status, StatusCode::CREATED);
    assert!(send("a").await.replayed());
    assert_eq!(send("b").await.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(s.runs.runs(), 1);
}

#[tokio::test]
async fn a_retry_that_corrects_its_content_type_is_not_answered_the_stored_415() {
    // axum's `Json` answers 415 to a body sent without its media type; the 415 is stored. The
    // client fixes the header and retries with the same key: that is another request, told
    // so, never handed the 415 it no longer deserves.
    let runs = Counter::default();
    let counted = runs.clone();
    let router = axum::Router::new()
        .route(
            "/orders",
            axum::routing::post(
                move |axum::Json(order): axum::Json<serde_json::Value>| async move {
                    counted.count();
                    (StatusCode::CREATED, order.to_string())
                },
            ),
        )
        .layer(IdempotencyServiceLayer::default());
    let s = serve(router, runs).await;
    let send = async |content_type: &str| {
        s.send(
            Method::POST,
            "/orders",
            &[b"k"],
            &[("content-type", content_type)],
            r#"{"sku":"tea"}"#,
        )
        .await
    };
    let wrong = send("text/plain").await;
    assert_eq!(wrong.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let corrected = send("application/json").await;
    assert_eq!(corrected.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(!corrected.replayed());
    assert_eq!(s.runs.runs(), 0);
    // With a key of its own, the corrected request runs, and its retry is replayed.
    let fresh = async || {
        s.send(
            Method::POST,
            "/orders",
            &[b"k2"],
            &[("content-type", "application/json")],
            r#"{"sku":"tea"}"#,
        )
        .await
    };
    assert_eq!(fresh().await.status, StatusCode::CREATED);
    assert!(fresh().await.replayed());
    assert_eq!(s.runs.runs(), 1);
}

#[tokio::test]
async fn a_duplicate_in_flight_waits_and_gets_the_same_answer() {
    let s = Arc::new(server(IdempotencyServiceLayer::default()).await);
    let first = s.spawn_post("/orders?delay_ms=400", "slow", "tea");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!first.is_finished(), "the first request is still running");
    let duplicate = s.post("/orders?delay_ms=400", "slow", "tea").await;
    let first = first.await.unwrap();
    assert_eq!(duplicate.status, StatusCode::CREATED);
    assert_eq!(duplicate.body, first.body);
    assert!(duplicate.replayed());
    assert_eq!(s.runs.runs(), 1);
}

#[tokio::test]
async fn a_duplicate_in_flight_with_another_body_is_422_at_once() {
    let s = Arc::new(server(IdempotencyServiceLayer::default()).await);
    let first = s.spawn_post("/orders?delay_ms=1000", "slow", "tea");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let other = s.post("/orders?delay_ms=1000", "slow", "coffee").await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        !first.is_finished(),
        "the 422 must not wait for the first request"
    );
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(s.runs.runs(), 1);
}

#[tokio::test]
async fn reject_mode_answers_409_with_retry_after_while_in_flight() {
    let s =
        Arc::new(server(IdempotencyServiceLayer::default().on_conflict(OnConflict::Reject)).await);
    let first = s.spawn_post("/orders?delay_ms=1000", "k", "tea");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let conflict = s.post("/orders?delay_ms=1000", "k", "tea").await;
    assert_eq!(conflict.status, StatusCode::CONFLICT);
    assert_eq!(conflict.headers[header::RETRY_AFTER], "1");
    conflict.problem();
    assert!(!first.is_finished(), "reject mode must not wait");
    let first = first.await.unwrap();
    // Once it finished, the retry is a replay.
    let retry = s.post("/orders?delay_ms=1000", "k", "tea").await;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(s.runs.runs(), 1);
}

#[tokio::test]
async fn a_wait_past_its_timeout_is_409_with_retry_after() {
    let s = Arc::new(
        server(IdempotencyServiceLayer::default().wait_timeout(Duration::from_millis(200))).await,
    );
    let first = s.spawn_post("/orders?delay_ms=1000", "k", "tea");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let waited = s.post("/orders?delay_ms=1000", "k", "tea").await;
    assert_eq!(waited.status, StatusCode::CONFLICT);
    assert_eq!(waited.headers[header::RETRY_AFTER], "1");
    assert!(
        waited.problem()["detail"]
            .as_str()
            .unwrap()
            .contains("still being processed")
    );
    assert!(!first.is_finished());
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(s.runs.runs(), 1);
}

#[tokio::test]
async fn requests_without_a_key_or_with_other_methods_pass_through() {
    let s = server(IdempotencyServiceLayer::default()).await;
    assert_eq!(
        s.send(Method::POST, "/orders", &[], &[], "tea")
            .await
            .text(),
        "run=1 body=tea"
    );
    assert_eq!(
        s.send(Method::POST, "/orders", &[], &[], "tea")
            .await
            .text(),
        "run=2 body=tea"
    );
    // GET is not made idempotent, even with a key.
    let get = s.send(Method::GET, "/orders", &[b"k"], &[], "").await;
    assert!(!get.replayed());
    assert!(
        !s.send(Method::GET, "/orders", &[b"k"], &[], "")
            .await
            .replayed()
    );
    assert_eq!(s.runs.runs(), 4);
}

#[tokio::test]
async fn require_key_answers_400_without_running() {
    let s = server(IdempotencyServiceLayer::default().require_key(true)).await;
    let missing = s.send(Method::POST, "/orders", &[], &[], "tea").await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert!(
        missing.problem()["detail"]
            .as_str()
            .unwrap()
            .contains("Idempotency-Key")
    );
    assert_eq!(
        s.send(Method::GET, "/orders", &[], &[], "").await.status,
        StatusCode::CREATED,
        "GET needs no key"
    );
    assert_eq!(s.runs.runs(), 1);
}

#[tokio::test]
async fn invalid_keys_are_400_with_a_message_that_says_why() {
    let s = server(IdempotencyServiceLayer::default()).await;
    let long = "k".repeat(256);
    let cases: [(&[&[u8]], &str); 7] = [
        (&[b""], "empty"),
        (&[long.as_bytes()], "256 bytes"),
        (&["clé".as_bytes()], "non-ASCII"),
        (
            &[b"a", b"b"],
            "Idempotency-Key header was given more than once",
        ),
        (&[b"\"unterminated"], "closing quote"),
        // The placeholder a client library should have replaced: taken as a key, it would be
        // shared by every client that sent it.
        (&[b"auto"], "placeholder"),
        (&[b"\"AUTO\""], "placeholder"),
    ];
    for (keys, why) in cases {
        let answer = s.send(Method::POST, "/orders", keys, &[], "tea").await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{why}");
        let detail = answer.problem()["detail"].as_str().unwrap().to_owned();
        assert!(detail.contains(why), "{detail:?} should mention {why:?}");
        assert!(
            detail.starts_with(char::is_uppercase) && detail.ends_with('.'),
            "{detail:?} is a sentence"
        );
    }
    // A key that merely starts with the word is a key like any other.
    assert_eq!(
        s.post("/orders", "auto-42", "tea").await.status,
        StatusCode::CREATED
    );
    let longest = "k".repeat(255);
    assert_eq!(
        s.post("/orders", &longest, "tea").await.status,
        StatusCode::CREATED
    );
    assert_eq!(s.runs.runs(), 2);
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_and_does_not_run() {
    let s = server(IdempotencyServiceLayer::default().max_request_body(1024)).await;
    let big = "x".repeat(1025);
    let answer = s.post("/orders", "k", &big).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        answer.problem()["detail"]
            .as_str()
            .unwrap()
            .contains("1024 bytes")
    );

    // Without a Content-Length (chunked), the limit still holds.
    let mut stream = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let chunk = "y".repeat(600);
    let raw = format!(
        "POST /orders HTTP/1.1\r\nhost: x\r\nidempotency-key: k2\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n\
         258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n"
    );
    stream.write_all(raw.as_bytes()).await.unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");

    assert_eq!(
        s.post("/orders", "k", &"x".repeat(1024)).await.status,
        StatusCode::CREATED
    );
    assert_eq!(s.runs.runs(), 1);
}

#[tokio::test]
async fn server_errors_are_not_stored_so_a_retry_runs_again() {
    let s = server(IdempotencyServiceLayer::default()).await;
    for status in [500, 503, 408, 429] {
        let key = format!("k{status}");
        let path = format!("/orders?status={status}");
        let first = s.post(&path, &key, "tea").await;
        assert_eq!(first.status.as_u16(), status);
        let retry = s.post(&path, &key, "tea").await;
        assert_eq!(retry.status.as_u16(), status);
        assert!(!retry.replayed(), "{status} must not be replayed");
        assert_ne!(retry.body, first.body, "{status}: the retry ran again");
    }
    assert_eq!(s.runs.runs(), 8);
    // A client error is an answer like any other: stored and replayed.
    let bad = s.post("/orders?status=404", "k404", "tea").await;
    let again = s.post("/orders?status=404", "k404", "tea").await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    assert!(again.replayed());
    assert_eq!(again.body, bad.body);
    assert_eq!(s.runs.runs(), 9);
}

#[tokio::test]
async fn the_store_predicate_is_configurable() {
    let s = server(IdempotencyServiceLayer::default().store_if(|parts| parts.status.is_success()))
        .await;
    s.post("/orders?status=409", "k", "tea").await;
    assert!(!s.post("/orders?status=409", "k", "tea").await.replayed());
    assert_eq!(s.runs.runs(), 2);
    // What the predicate lets through is still stored.
    s.post("/orders", "other", "tea").await;
    assert!(s.post("/orders", "other", "tea").await.replayed());
    assert_eq!(s.runs.runs(), 3);
}

#[tokio::test]
async fn a_replay_gives_the_stored_body_s_length_and_an_informational_answer_is_not_stored() {
    // A handler that says 13 bytes and sends 10, then one that answers 103 as if final.
    let calls = Counter::default();
    let counted = calls.clone();
    let svc = IdempotencyService::new(
        service_fn(move |req: Request<RequestBody<Full<Bytes>>>| {
            let n = counted.count();
            let path = req.uri().path().to_owned();
            async move {
                let said = format!("run={n} body");
                let (response, body) = match path.as_str() {
                    "/early" => (Response::builder().status(StatusCode::EARLY_HINTS), said),
                    // A 304's length is the one a 200 would have had, not its empty body's.
                    "/unchanged" => (
                        Response::builder()
                            .status(StatusCode::NOT_MODIFIED)
                            .header(header::CONTENT_LENGTH, "1234"),
                        String::new(),
                    ),
                    _ => (
                        Response::builder().header(header::CONTENT_LENGTH, "13"),
                        said,
                    ),
                };
                Ok::<_, Infallible>(response.body(Full::new(Bytes::from(body))).unwrap())
            }
        }),
        MemoryStore::new(),
    );
    svc.clone().oneshot(order()).await.unwrap();
    let replay = svc.clone().oneshot(order()).await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.headers()[header::CONTENT_LENGTH], "10");
    assert_eq!(
        replay.into_body().collect().await.unwrap().to_bytes(),
        "run=1 body"
    );

    let keyed = |path: &str, key: &str| {
        Request::post(path)
            .header("idempotency-key", key)
            .body(Full::new(Bytes::from("tea")))
            .unwrap()
    };
    svc.clone().oneshot(keyed("/unchanged", "u")).await.unwrap();
    let unchanged = svc.clone().oneshot(keyed("/unchanged", "u")).await.unwrap();
    assert_eq!(unchanged.headers()["idempotent-replayed"], "true");
    assert_eq!(unchanged.headers()[header::CONTENT_LENGTH], "1234");
    let early = || keyed("/early", "e");
    assert_eq!(
        svc.clone().oneshot(early()).await.unwrap().status(),
        StatusCode::EARLY_HINTS
    );
    let again = svc.oneshot(early()).await.unwrap();
    assert!(!again.headers().contains_key("idempotent-replayed"));
    assert_eq!(calls.runs(), 4, "the 103 was not stored, so it ran again");
}

#[tokio::test]
async fn a_response_too_large_to_store_reaches_its_caller_and_never_runs_twice() {
    let s = server(IdempotencyServiceLayer::default().max_stored_response(64 * 1024)).await;
    let path = "/orders?size=200000";
    let first = s.post(path, "big", "tea").await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(
        first.body.len(),
        200_000,
        "the first caller gets the whole body"
    );
    assert!(first.body.iter().all(|&b| b == b'x'));
    let duplicate = s.post(path, "big", "tea").await;
    assert_eq!(duplicate.status, StatusCode::CONFLICT);
    assert!(
        duplicate.headers.get(header::RETRY_AFTER).is_none(),
        "retrying would not help"
    );
    assert!(
        duplicate.problem()["detail"]
            .as_str()
            .unwrap()
            .contains("too large")
    );
    assert_eq!(s.runs.runs(), 1);
}

#[tokio::test]
async fn scopes_keep_callers_apart() {
    let s = server(
        IdempotencyServiceLayer::default()
            .scope_by_header(header::HeaderName::from_static("x-tenant")),
    )
    .await;
    let send = async |tenant: &str| s.post_with("same-key", ("x-tenant", tenant)).await;
    let a = send("a").await;
    let b = send("b").await;
    assert_eq!(
        (a.status, b.status),
        (StatusCode::CREATED, StatusCode::CREATED)
    );
    assert!(!b.replayed(), "tenant b must not get tenant a's response");
    assert_ne!(a.body, b.body);
    assert_eq!(send("a").await.body, a.body);
    assert_eq!(send("b").await.body, b.body);
    let unscoped = s
        .send(Method::POST, "/orders", &[b"same-key"], &[], "tea")
        .await;
    assert_eq!(unscoped.status, StatusCode::BAD_REQUEST);
    unscoped.problem();
    assert_eq!(s.runs.runs(), 2);
}

#[tokio::test]
async fn a_scope_header_given_twice_empty_or_not_utf8_is_400_never_another_scope() {
    let calls = Counter::default();
    let svc = IdempotencyServiceLayer::new(MemoryStore::new())
        .scope_by_header(header::HeaderName::from_static("x-tenant"))
        .layer(counted_orders(&calls));
    let scoped = |values: &[&[u8]]| {
        let mut req = order();
        for value in values {
            req.headers_mut()
                .append("x-tenant", header::HeaderValue::from_bytes(value).unwrap());
        }
        req
    };
    // One tenant's key is done; requests whose scope cannot be told for sure never see it.
    let first = svc.clone().oneshot(scoped(&[b"victim"])).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let unclear: [&[&[u8]]; 4] = [
        &[b"victim", b"attacker"],
        &[b"attacker", b"victim"],
        &[b""],
        &[b"\xffvictim"],
    ];
    for values in unclear.into_iter().chain([&[][..]]) {
        let answer = svc.clone().oneshot(scoped(values)).await.unwrap();
        assert_eq!(answer.status(), StatusCode::BAD_REQUEST, "{values:?}");
        assert!(!answer.headers().contains_key("idempotent-replayed"));
        let body = answer.into_body().collect().await.unwrap().to_bytes();
        assert!(
            String::from_utf8_lossy(&body).contains("Send x-tenant exactly once"),
            "the answer names the header: {body:?}"
        );
    }
    assert_eq!(calls.runs(), 1);
}

/// A store whose every call fails, as a store whose backend is down would.
#[derive(Debug)]
struct DownStore;

#[async_trait]
impl KeyStore for DownStore {
    async fn claim(&self, _: &StoreKey, _: &Fingerprint, _: Duration) -> Result<Claim, StoreError> {
        Err(StoreError::backend("connection refused"))
    }
    async fn complete(
        &self,
        _: &StoreKey,
        _: FencingToken,
        _: &Record,
        _: Duration,
    ) -> Result<Completion, StoreError> {
        Err(StoreError::backend("connection refused"))
    }
    async fn release(&self, _: &StoreKey, _: FencingToken) -> Result<bool, StoreError> {
        Err(StoreError::backend("connection refused"))
    }
    async fn extend(&self, _: &StoreKey, _: FencingToken, _: Duration) -> Result<bool, StoreError> {
        Err(StoreError::backend("connection refused"))
    }
    async fn read(&self, _: &StoreKey) -> Result<Option<Holder>, StoreError> {
        Err(StoreError::backend("connection refused"))
    }
    async fn wait(&self, _: &StoreKey, _: Duration) -> Result<Option<Holder>, StoreError> {
        Err(StoreError::backend("connection refused"))
    }
}

/// A store that never answers.
#[derive(Debug)]
struct HungStore;

#[async_trait]
impl KeyStore for HungStore {
    async fn claim(&self, _: &StoreKey, _: &Fingerprint, _: Duration) -> Result<Claim, StoreError> {
        std::future::pending().await
    }
    async fn complete(
        &self,
        _: &StoreKey,
        _: FencingToken,
        _: &Record,
        _: Duration,
    ) -> Result<Completion, StoreError> {
        std::future::pending().await
    }
    async fn release(&self, _: &StoreKey, _: FencingToken) -> Result<bool, StoreError> {
        std::future::pending().await
    }
    async fn extend(&self, _: &StoreKey, _: FencingToken, _: Duration) -> Result<bool, StoreError> {
        std::future::pending().await
    }
    async fn read(&self, _: &StoreKey) -> Result<Option<Holder>, StoreError> {
        std::future::pending().await
    }
    async fn wait(&self, _: &StoreKey, _: Duration) -> Result<Option<Holder>, StoreError> {
        std::future::pending().await
    }
}

/// A store that hands every step to a memory store and counts the claims and completions it
/// saw, as a user's instrumented store would. Its first `slow_claims` claims are answered
/// `claim_reply` after they were made, as a remote store's reply can be; every completion
/// takes `complete_delay`, and the first `failing_completions` fail.
#[derive(Debug, Default)]
struct CountingStore {
    inner: MemoryStore,
    claims: AtomicUsize,
    completions: AtomicUsize,
    extensions: AtomicUsize,
    slow_claims: usize,
    claim_reply: Duration,
    /// How long each completion waits before it reaches the memory store.
    complete_delay: Duration,
    /// How many completions fail first, as a store out of memory refuses writes.
    failing_completions: usize,
    /// Whether those failures call the record corrupt, as a store that will never take it.
    refuse_as_corrupt: bool,
    releases: AtomicUsize,
    /// How many releases fail first, as they would over a broken connection.
    failing_releases: usize,
    /// Whether every wait fails, as it does against a store that went away.
    failing_waits: bool,
}

impl CountingStore {
    /// A shared store whose first claim is answered `reply` after it was made.
    fn first_claim_answered_after(reply: Duration) -> Arc<Self> {
        Arc::new(Self {
            slow_claims: 1,
            claim_reply: reply,
            ..Self::default()
        })
    }

    /// A shared store whose every claim is answered `reply` after it was made.
    fn claims_answered_after(reply: Duration) -> Arc<Self> {
        Arc::new(Self {
            slow_claims: usize::MAX,
            claim_reply: reply,
            ..Self::default()
        })
    }
}

#[async_trait]
impl KeyStore for CountingStore {
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let seen = self.claims.fetch_add(1, Ordering::SeqCst);
        let claimed = self.inner.claim(key, fingerprint, lease).await;
        if seen < self.slow_claims {
            tokio::time::sleep(self.claim_reply).await;
        }
        claimed
    }
    async fn complete(
        &self,
        key: &StoreKey,
        token: FencingToken,
        record: &Record,
        retention: Duration,
    ) -> Result<Completion, StoreError> {
        let seen = self.completions.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.complete_delay).await;
        if seen < self.failing_completions {
            return Err(if self.refuse_as_corrupt {
                StoreError::Corrupt("a record this store cannot hold".into())
            } else {
                StoreError::backend("OOM command not allowed when used memory > 'maxmemory'")
            });
        }
        self.inner.complete(key, token, record, retention).await
    }
    async fn release(&self, key: &StoreKey, token: FencingToken) -> Result<bool, StoreError> {
        if self.releases.fetch_add(1, Ordering::SeqCst) < self.failing_releases {
            return Err(StoreError::backend("connection reset by peer"));
        }
        self.inner.release(key, token).await
    }
    async fn extend(
        &self,
        key: &StoreKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.extensions.fetch_add(1, Ordering::SeqCst);
        self.inner.extend(key, token, lease).await
    }
    async fn read(&self, key: &StoreKey) -> Result<Option<Holder>, StoreError> {
        self.inner.read(key).await
    }
    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<Option<Holder>, StoreError> {
        if self.failing_waits {
            return Err(StoreError::backend("connection refused"));
        }
        self.inner.wait(key, timeout).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_whose_wait_fails_is_answered_503_and_does_not_run_even_failing_open() {
    // The duplicate found the key in flight; its wait then fails. Failing open would run it
    // beside the request in progress.
    let store = Arc::new(CountingStore {
        failing_waits: true,
        ..CountingStore::default()
    });
    let calls = Counter::default();
    // Two services on one store, as two processes: the duplicate asks the store.
    let service = || {
        IdempotencyServiceLayer::with_shared_store(store.clone())
            .on_store_error(OnStoreError::FailOpen)
            .layer(slow_orders(&calls, Duration::from_secs(1)))
    };
    let first = tokio::spawn(service().oneshot(order()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let duplicate = service().oneshot(order()).await.unwrap();
    assert_eq!(duplicate.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(duplicate.headers()[header::RETRY_AFTER], "1");
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
    assert_eq!(calls.runs(), 1);
}

#[tokio::test]
async fn a_memory_store_works_however_it_is_handed_over_and_a_wrapper_sees_every_step() {
    // In an `Arc`: replays as it does when handed over by value.
    let memory = MemoryStore::new();
    let s = server(IdempotencyServiceLayer::new(Arc::new(memory.clone()))).await;
    let first = s.post("/orders", "k", "tea").await;
    assert_eq!(first.status, StatusCode::CREATED);
    let again = s.post("/orders", "k", "tea").await;
    assert!(again.replayed());
    assert_eq!(again.body, first.body);
    assert_eq!((s.runs.runs(), memory.len()), (1, 1));

    // A store that wraps a memory store is called for every step, not skipped past.
    let counting = Arc::new(CountingStore::default());
    let s = server(IdempotencyServiceLayer::with_shared_store(counting.clone())).await;
    assert_eq!(
        s.post("/orders", "k", "tea").await.status,
        StatusCode::CREATED
    );
    assert!(s.post("/orders", "k", "tea").await.replayed());
    assert_eq!(s.runs.runs(), 1);
    assert_eq!(counting.claims.load(Ordering::SeqCst), 2);
    assert_eq!(counting.completions.load(Ordering::SeqCst), 1);
    assert_eq!(counting.inner.len(), 1);
}

#[tokio::test]
async fn a_failed_store_fails_closed_with_503_and_nothing_runs() {
    let s = server(IdempotencyServiceLayer::new(DownStore)).await;
    let answer = s.post("/orders", "k", "tea").await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.headers[header::RETRY_AFTER], "1");
    answer.problem();
    let hung =
        server(IdempotencyServiceLayer::new(HungStore).store_timeout(Duration::from_millis(100)))
            .await;
    assert_eq!(
        hung.post("/orders", "k", "tea").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(s.runs.runs() + hung.runs.runs(), 0);
    // Requests without a key never touch the store.
    assert_eq!(
        s.send(Method::POST, "/orders", &[], &[], "tea")
            .await
            .status,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn fail_open_runs_without_idempotency() {
    let s = server(IdempotencyServiceLayer::new(DownStore).on_store_error(OnStoreError::FailOpen))
        .await;
    assert_eq!(
        s.post("/orders", "k", "tea").await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        s.post("/orders", "k", "tea").await.status,
        StatusCode::CREATED
    );
    assert_eq!(s.runs.runs(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_storm_of_duplicates_with_random_delays_runs_once() {
    let s = Arc::new(server(IdempotencyServiceLayer::default()).await);
    let answers = storm(
        std::slice::from_ref(&s),
        150,
        "/orders?delay_ms=100",
        "storm",
        200,
    )
    .await;
    assert_one_answer(&answers);
    assert_eq!(s.runs.runs(), 1, "150 duplicates ran the handler once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_distinct_keys_run_a_thousand_times() {
    let s = Arc::new(server(IdempotencyServiceLayer::default()).await);
    many_keys(std::slice::from_ref(&s), 1000, 2).await;
    assert_eq!(s.runs.runs(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicates_split_across_two_services_on_one_store_run_once() {
    // Two services that share a store but not their in-process coalescing, as two processes
    // sharing Redis would.
    let store = MemoryStore::new();
    let servers = two_servers(
        IdempotencyServiceLayer::new(store.clone()),
        IdempotencyServiceLayer::new(store),
    )
    .await;
    assert_one_answer(&storm(&servers, 100, "/orders?delay_ms=150", "shared", 100).await);
    assert_eq!(servers[0].runs.runs(), 1);
    many_keys(&servers, 200, 4).await;
    assert_eq!(servers[0].runs.runs(), 201);
}

#[tokio::test]
async fn a_lapsed_lease_lets_another_run_in_and_fences_the_stale_completion() {
    let store = MemoryStore::new();
    // Service a never renews its short lease; service b keeps its claims alive.
    let short = IdempotencyServiceLayer::new(store.clone())
        .lease(Duration::from_millis(600))
        .keep_lease_alive(false);
    let [a, b] = two_servers(short, IdempotencyServiceLayer::new(store)).await;
    let slow = a.spawn_post("/orders?delay_ms=2000", "k", "tea");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // The first run's lease has lapsed: the second service takes the key over and runs.
    let second = b.post("/orders?delay_ms=2000", "k", "tea").await;
    assert_eq!(second.status, StatusCode::CREATED);
    assert!(!second.replayed());
    let first = slow.await.unwrap();
    assert_eq!(
        first.status,
        StatusCode::CREATED,
        "the first caller still gets its own response"
    );
    assert_ne!(first.body, second.body);
    assert_eq!(a.runs.runs(), 2);
    // The stale run was fenced: what is replayed is the second run's answer.
    let replay = a.post("/orders?delay_ms=2000", "k", "tea").await;
    assert!(replay.replayed());
    assert_eq!(replay.body, second.body);
    assert_eq!(a.runs.runs(), 2);
}

#[tokio::test]
async fn a_run_whose_lease_lapsed_with_nobody_taking_over_stores_its_response() {
    // The lease lapses mid-run and no other request comes for the key: the run's response is
    // still stored, so the retry is a replay rather than a second run.
    let s = server(
        IdempotencyServiceLayer::new(MemoryStore::new())
            .lease(Duration::from_millis(300))
            .keep_lease_alive(false),
    )
    .await;
    let first = s.post("/orders?delay_ms=800", "k", "tea").await;
    assert_eq!(first.status, StatusCode::CREATED);
    let retry = s.post("/orders?delay_ms=800", "k", "tea").await;
    assert!(retry.replayed(), "the retry ran again: {}", retry.text());
    assert_eq!(retry.body, first.body);
    assert_eq!(s.runs.runs(), 1);
}

#[tokio::test]
async fn with_keep_alive_a_slow_handler_keeps_its_claim() {
    let store = MemoryStore::new();
    // A 1.5 s lease, renewed every 500 ms, under a 3 s handler: without the renewals the
    // duplicate at 2 s would find the claim lapsed and run.
    let layer = || IdempotencyServiceLayer::new(store.clone()).lease(Duration::from_millis(1500));
    let [a, b] = two_servers(layer(), layer()).await;
    let slow = a.spawn_post("/orders?delay_ms=3000", "k", "tea");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let duplicate = b.post("/orders?delay_ms=3000", "k", "tea").await;
    let first = slow.await.unwrap();
    assert!(
        duplicate.replayed(),
        "the duplicate waited for the renewed claim"
    );
    assert_eq!(duplicate.body, first.body);
    assert_eq!(a.runs.runs(), 1);
}

#[tokio::test]
async fn a_disconnected_caller_does_not_cancel_a_detached_handler() {
    let s = server(IdempotencyServiceLayer::default()).await;
    let mut stream = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    stream
        .write_all(b"POST /orders?delay_ms=300 HTTP/1.1\r\nhost: x\r\nidempotency-key: k\r\ncontent-length: 3\r\n\r\ntea")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(stream);
    // The retry arrives while the orphaned run is still going: it waits and gets its answer.
    let retry = s.post("/orders?delay_ms=300", "k", "tea").await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(retry.text(), "run=1 body=tea");
    assert_eq!(s.runs.runs(), 1);
}

/// A handler that takes `delay`: it counts each run in `started` as it is called, and in
/// `finished` once it is done, answering `run=N` for the Nth.
fn finishing_orders(started: &Counter, finished: &Counter, delay: Duration) -> impl Orders {
    let (started, finished) = (started.clone(), finished.clone());
    service_fn(move |_req: Request<RequestBody<Full<Bytes>>>| {
        let n = started.count();
        let finished = finished.clone();
        async move {
            tokio::time::sleep(delay).await;
            finished.count();
            Ok(Response::new(Full::new(Bytes::from(format!("run={n}")))))
        }
    })
}

fn order_with_key(key: &str) -> Request<Full<Bytes>> {
    Request::post("/orders")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from("tea")))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn past_max_detached_a_run_whose_caller_leaves_is_cancelled_and_its_key_freed() {
    // The handler takes 1 s.
    let (started, finished) = (Counter::default(), Counter::default());
    let handler = finishing_orders(&started, &finished, Duration::from_secs(1));
    five_callers_leave_two_runs_go_on(handler).await;
    assert_eq!(started.runs(), 8, "the three cancelled ran again");
    assert_eq!(finished.runs(), 5, "two went on, and the three ran again");

    // The handler answers at once, with a body it makes over 1 s: still the run.
    let started = Counter::default();
    let counted = started.clone();
    let handler = service_fn(move |_req: Request<RequestBody<Full<Bytes>>>| {
        counted.count();
        let (events, body) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = events.send("made").await;
        });
        async move { Ok::<_, Infallible>(Response::new(Events(body))) }
    });
    five_callers_leave_two_runs_go_on(handler).await;
    assert_eq!(started.runs(), 8, "the three cancelled ran again");
}

/// Sends five requests with keys of their own through `handler` behind a layer that lets two
/// runs go on without their callers, and leaves each while its run goes on; then retries
/// them all: two are replayed, three run again.
async fn five_callers_leave_two_runs_go_on<B>(handler: impl Handler<B>)
where
    B: http_body::Body<Data = Bytes, Error = Infallible> + Send + 'static,
{
    let layer = IdempotencyServiceLayer::default().max_detached(2);
    let background = layer.background();
    let svc = layer.layer(handler);
    let keys = ["k1", "k2", "k3", "k4", "k5"];
    let mut calls = tokio::task::JoinSet::new();
    for key in keys {
        let call = svc.clone().oneshot(order_with_key(key));
        calls.spawn(tokio::time::timeout(Duration::from_millis(50), call));
    }
    for left in calls.join_all().await {
        assert!(left.is_err(), "the caller left before the answer");
    }
    assert_eq!(background.len(), 2, "two runs went on");
    background.wait().await;
    // The two that went on are replayed; the keys of the cancelled ones are free at once.
    let mut replayed = 0;
    for key in keys {
        let retry = svc.clone().oneshot(order_with_key(key)).await.unwrap();
        assert_eq!(retry.status(), StatusCode::OK);
        replayed += usize::from(retry.headers().contains_key("idempotent-replayed"));
    }
    assert_eq!(replayed, 2);
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_leaves_during_the_store_s_step_leaves_no_run_to_cancel() {
    // The handler is done and its body read; a remote store takes 1 s to store the response.
    // With no run allowed to go on without its caller, the store's step still does: the
    // response is stored, and the retry replayed, whether the body gave its length or not.
    for given_length in [true, false] {
        let store = Arc::new(CountingStore {
            complete_delay: Duration::from_secs(1),
            ..CountingStore::default()
        });
        let runs = Counter::default();
        let counted = runs.clone();
        let handler = service_fn(move |_req: Request<RequestBody<Full<Bytes>>>| {
            counted.count();
            let (events, made) = tokio::sync::mpsc::channel(1);
            events.try_send("made").unwrap();
            let body = match given_length {
                true => http_body_util::Either::Left(Full::new(Bytes::from("made"))),
                false => http_body_util::Either::Right(Events(made)),
            };
            async move { Ok::<_, Infallible>(Response::new(body)) }
        });
        let layer = IdempotencyServiceLayer::with_shared_store(store).max_detached(0);
        let background = layer.background();
        let svc = layer.layer(handler);
        let call = svc.clone().oneshot(order_with_key("k"));
        let left = tokio::time::timeout(Duration::from_millis(100), call).await;
        assert!(left.is_err(), "the caller left during the store's step");
        background.wait().await;
        let retry = svc.oneshot(order_with_key("k")).await.unwrap();
        assert!(
            retry.headers().contains_key("idempotent-replayed"),
            "given length: {given_length}"
        );
        assert_eq!(runs.runs(), 1, "given length: {given_length}");
    }
}

#[tokio::test(start_paused = true)]
async fn background_waits_for_a_run_whose_caller_left() {
    let (started, finished) = (Counter::default(), Counter::default());
    let svc = IdempotencyServiceLayer::default().layer(finishing_orders(
        &started,
        &finished,
        Duration::from_secs(1),
    ));
    let background = svc.background();
    assert!(background.is_empty());
    let left = tokio::time::timeout(Duration::from_millis(50), svc.clone().oneshot(order()));
    assert!(left.await.is_err(), "the caller left before the answer");
    assert_eq!(background.len(), 1);
    let waited = tokio::time::Instant::now();
    background.wait().await;
    assert_eq!(finished.runs(), 1, "the run was done when the wait ended");
    assert!(waited.elapsed() >= Duration::from_millis(900));
    assert!(background.is_empty());
    let retry = svc.oneshot(order()).await.unwrap();
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(started.runs(), 1);
}

#[tokio::test]
async fn without_detach_a_disconnect_releases_the_claim_at_once() {
    // With a 60 s lease and a 2 s wait, a retry could only run if the claim was released.
    let s = server(
        IdempotencyServiceLayer::default()
            .detach(false)
            .wait_timeout(Duration::from_secs(2)),
    )
    .await;
    let mut stream = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    stream
        .write_all(b"POST /orders?delay_ms=1000 HTTP/1.1\r\nhost: x\r\nidempotency-key: k\r\ncontent-length: 3\r\n\r\ntea")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(stream);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let retry = s.post("/orders", "k", "tea").await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed(), "the retry ran itself");
    assert_eq!(
        s.runs.runs(),
        1,
        "the cancelled run never reached its count"
    );
}

#[tokio::test]
async fn a_panicking_handler_releases_its_claim_so_a_retry_runs() {
    for detach in [true, false] {
        let s = server(IdempotencyServiceLayer::default().detach(detach)).await;
        let req = Request::post(format!("http://{}/orders?panic=1", s.addr))
            .header("idempotency-key", "k")
            .body(Full::new(Bytes::from("tea")))
            .unwrap();
        assert!(
            s.client.request(req).await.is_err(),
            "the panic dropped the connection"
        );
        let retry = s.post("/orders", "k", "tea").await;
        assert_eq!(retry.status, StatusCode::CREATED, "detach={detach}");
        assert!(!retry.replayed());
        assert_eq!(
            s.runs.runs(),
            2,
            "detach={detach}: the panicked run, then the retry"
        );
    }
}

#[tokio::test]
async fn a_run_whose_caller_left_finishes_on_its_own_and_a_panic_there_frees_the_key() {
    for panics in [false, true] {
        let calls = Counter::default();
        let counted = calls.clone();
        let gate = Arc::new(tokio::sync::Notify::new());
        let opened = gate.clone();
        let svc = IdempotencyService::new(
            service_fn(move |_req: Request<_>| {
                let n = counted.count();
                let opened = opened.clone();
                async move {
                    if n == 1 {
                        opened.notified().await;
                        assert!(!panics, "the first run panics after its caller left");
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("run={n}")))))
                }
            }),
            MemoryStore::new(),
        );
        // The caller gives up while the handler waits; then the handler goes on.
        let first = tokio::time::timeout(Duration::from_millis(50), svc.clone().oneshot(order()));
        assert!(first.await.is_err(), "the first call was still running");
        gate.notify_one();
        let retry = svc.clone().oneshot(order()).await.unwrap();
        assert_eq!(retry.status(), StatusCode::OK);
        let replayed = retry.headers().contains_key("idempotent-replayed");
        let body = retry.into_body().collect().await.unwrap().to_bytes();
        if panics {
            assert!(!replayed, "the panicked run freed the key");
            assert_eq!(body, "run=2");
            assert_eq!(calls.runs(), 2);
        } else {
            assert!(replayed, "the orphaned run finished and was stored");
            assert_eq!(body, "run=1");
            assert_eq!(calls.runs(), 1);
        }
    }
}

#[tokio::test]
async fn an_inner_service_error_releases_the_claim_so_a_retry_runs() {
    let calls = Counter::default();
    let counted = calls.clone();
    let svc = IdempotencyService::new(
        service_fn(move |_req: Request<_>| {
            let n = counted.count();
            async move {
                if n == 1 {
                    Err("backend unreachable")
                } else {
                    Ok(Response::new(Full::new(Bytes::from("created"))))
                }
            }
        }),
        MemoryStore::new(),
    );
    assert_eq!(
        svc.clone().oneshot(order()).await.unwrap_err(),
        "backend unreachable"
    );
    let retry = svc.clone().oneshot(order()).await.unwrap();
    assert_eq!(
        retry.into_body().collect().await.unwrap().to_bytes(),
        "created"
    );
    let replay = svc.clone().oneshot(order()).await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(calls.runs(), 2);
}

#[tokio::test]
async fn trailers_are_stored_and_replayed() {
    // A memory store is called at once; a store of another type is awaited, as a remote one.
    trailers_stored_and_replayed(MemoryStore::new()).await;
    trailers_stored_and_replayed(CountingStore::default()).await;
}

async fn trailers_stored_and_replayed(store: impl KeyStore) {
    let svc = IdempotencyService::new(
        service_fn(|_req: Request<_>| async {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            // Trailers go through the same filter as headers.
            trailers.insert(header::SET_COOKIE, "session=first-caller".parse().unwrap());
            let body =
                Full::new(Bytes::from("message")).with_trailers(async { Some(Ok(trailers)) });
            Ok::<_, Infallible>(Response::new(body))
        }),
        store,
    );
    let req = || {
        Request::post("/svc/Method")
            .header("idempotency-key", "k")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    for replayed in [false, true] {
        let response = svc.clone().oneshot(req()).await.unwrap();
        assert_eq!(
            response.headers().contains_key("idempotent-replayed"),
            replayed
        );
        let collected = response.into_body().collect().await.unwrap();
        let trailers = collected.trailers().unwrap();
        assert_eq!(trailers["grpc-status"], "0");
        // The first caller gets its cookie; a replay does not.
        assert_eq!(trailers.contains_key(header::SET_COOKIE), !replayed);
        assert_eq!(collected.to_bytes(), "message");
    }
}

#[tokio::test]
async fn records_expire_after_the_retention() {
    let s = server(IdempotencyServiceLayer::default().retention(Duration::from_secs(1))).await;
    let first = s.post("/orders", "k", "tea").await;
    assert!(s.post("/orders", "k", "tea").await.replayed());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = s.post("/orders", "k", "tea").await;
    assert!(!later.replayed());
    assert_ne!(later.body, first.body);
    assert_eq!(s.runs.runs(), 2);
}

/// A response body that sends its chunks, and says it is `says` bytes long, or gives no length
/// (as a proxied chunked answer does).
struct Chunks {
    chunks: std::collections::VecDeque<Bytes>,
    says: Option<u64>,
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(
            self.chunks
                .pop_front()
                .map(|c| Ok(http_body::Frame::data(c))),
        )
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.says
            .map_or_else(http_body::SizeHint::new, http_body::SizeHint::with_exact)
    }
}

/// A handler whose body says it is 5 bytes long and sends 20, in two chunks; it counts its
/// runs in `calls`.
fn overrunning_orders(calls: &Counter) -> impl Handler<Chunks> {
    let counted = calls.clone();
    service_fn(move |_req: Request<_>| {
        counted.count();
        async {
            let body = Chunks {
                chunks: [Bytes::from("0123456789"), Bytes::from("abcdefghij")].into(),
                says: Some(5),
            };
            Ok::<_, Infallible>(Response::new(body))
        }
    })
}

#[tokio::test]
async fn a_body_that_runs_past_its_length_and_the_limit_is_cut_off_there_and_not_stored() {
    // A body that gave its length is read where it lies, so what it sends past that length is
    // read no further than the limit, however much more it sends.
    let calls = Counter::default();
    let svc = IdempotencyServiceLayer::default()
        .max_stored_response(8)
        .layer(overrunning_orders(&calls));
    let first = svc.clone().oneshot(order()).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(
        first.into_body().collect().await.unwrap().to_bytes(),
        "0123456789"
    );
    let again = svc.clone().oneshot(order()).await.unwrap();
    assert_eq!(again.status(), StatusCode::CONFLICT);
    assert_eq!(calls.runs(), 1);
}

#[tokio::test]
async fn a_body_that_runs_past_its_length_within_the_limit_is_stored_as_it_came() {
    let calls = Counter::default();
    let svc = IdempotencyServiceLayer::default().layer(overrunning_orders(&calls));
    for replayed in [false, true] {
        let response = svc.clone().oneshot(order()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers().contains_key("idempotent-replayed"),
            replayed
        );
        let body = response.into_body();
        assert_eq!(
            http_body::Body::size_hint(&body).exact(),
            Some(20),
            "framed by what it sent"
        );
        assert_eq!(
            body.collect().await.unwrap().to_bytes(),
            "0123456789abcdefghij"
        );
    }
    assert_eq!(calls.runs(), 1);
}

/// A response body that sends its chunks, then fails; it gives a length, or none.
struct FailsPartWay {
    chunks: std::collections::VecDeque<&'static str>,
    says: Option<u64>,
}

impl FailsPartWay {
    fn after<const N: usize>(chunks: [&'static str; N], says: Option<u64>) -> Self {
        Self {
            chunks: chunks.into(),
            says,
        }
    }
}

impl http_body::Body for FailsPartWay {
    type Data = Bytes;
    type Error = &'static str;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, &'static str>>> {
        std::task::Poll::Ready(Some(match self.chunks.pop_front() {
            Some(chunk) => Ok(http_body::Frame::data(Bytes::from(chunk))),
            None => Err("upstream reset"),
        }))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.says
            .map_or_else(http_body::SizeHint::new, http_body::SizeHint::with_exact)
    }
}

#[tokio::test]
async fn a_response_body_that_fails_reaches_its_caller_and_a_retry_runs_again() {
    let calls = Counter::default();
    let counted = calls.clone();
    let svc = IdempotencyService::new(
        service_fn(move |_req: Request<_>| {
            let n = counted.count();
            async move {
                let body = if n == 1 {
                    http_body_util::Either::Left(FailsPartWay::after(["01234"], Some(10)))
                } else {
                    http_body_util::Either::Right(
                        Full::new(Bytes::from("created")).map_err(|never| match never {}),
                    )
                };
                Ok::<_, Infallible>(Response::new(body))
            }
        }),
        MemoryStore::new(),
    );
    let first = svc.clone().oneshot(order()).await.unwrap();
    assert_eq!(
        first.into_body().collect().await.unwrap_err().to_string(),
        "upstream reset",
        "the caller sees the body fail, after its first part"
    );
    let retry = svc.clone().oneshot(order()).await.unwrap();
    assert!(!retry.headers().contains_key("idempotent-replayed"));
    assert_eq!(
        retry.into_body().collect().await.unwrap().to_bytes(),
        "created"
    );
    let replay = svc.clone().oneshot(order()).await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(calls.runs(), 2, "the failed run, then the retry");
}

/// A response body that comes `delay` after the handler answered: `created`, with its length
/// given or not.
struct LateBody {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    sent: bool,
    exact: bool,
}

impl LateBody {
    fn new(delay: Duration, exact: bool) -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep(delay)),
            sent: false,
            exact,
        }
    }
}

impl http_body::Body for LateBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        if self.sent {
            return std::task::Poll::Ready(None);
        }
        std::task::ready!(self.sleep.as_mut().poll(cx));
        self.sent = true;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from("created")))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match (self.exact, self.sent) {
            (true, false) => http_body::SizeHint::with_exact(7),
            (true, true) => http_body::SizeHint::with_exact(0),
            (false, _) => http_body::SizeHint::default(),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_response_body_slower_than_the_lease_keeps_the_claim_and_runs_once() {
    // The handler answers its head at once; its body comes 10 s later, past three 3 s leases.
    // A duplicate from another service on the same store, 5 s in, would find a lapsed claim
    // and run again unless the lease is renewed while the body is read.
    for (exact, wrapped) in [(true, false), (false, false), (true, true), (false, true)] {
        let case = format!("length given: {exact}, store wrapped: {wrapped}");
        let calls = Counter::default();
        let memory = MemoryStore::new();
        let counting = Arc::new(CountingStore {
            inner: memory.clone(),
            ..CountingStore::default()
        });
        let layer = || {
            let layer = if wrapped {
                IdempotencyServiceLayer::with_shared_store(counting.clone())
            } else {
                IdempotencyServiceLayer::new(memory.clone())
            };
            let counted = calls.clone();
            layer
                .lease(Duration::from_secs(3))
                .layer(service_fn(move |_req: Request<_>| {
                    counted.count();
                    async move {
                        let body = LateBody::new(Duration::from_secs(10), exact);
                        Ok::<_, Infallible>(Response::new(body))
                    }
                }))
        };
        let (a, b) = (layer(), layer());
        let first = tokio::spawn(a.clone().oneshot(order()));
        tokio::time::sleep(Duration::from_secs(5)).await;
        let duplicate = b.clone().oneshot(order()).await.unwrap();
        assert_eq!(
            duplicate
                .headers()
                .get("idempotent-replayed")
                .map(|v| v.as_bytes()),
            Some(&b"true"[..]),
            "{case}: the duplicate waited for the first run"
        );
        assert_eq!(
            duplicate.into_body().collect().await.unwrap().to_bytes(),
            "created"
        );
        let first = first.await.unwrap().unwrap();
        assert_eq!(
            first.into_body().collect().await.unwrap().to_bytes(),
            "created"
        );
        let retry = b.oneshot(order()).await.unwrap();
        assert_eq!(retry.headers()["idempotent-replayed"], "true", "{case}");
        assert_eq!(calls.runs(), 1, "{case}");
    }
}

#[tokio::test]
async fn a_response_the_store_refused_is_stored_later_and_the_key_never_runs_twice() {
    // The store refuses the first two completions. The caller still gets its answer; the claim
    // is kept rather than given back, and the record is stored from a task on a later try. A
    // duplicate from another service on the same store waits for it instead of running.
    let store = Arc::new(CountingStore {
        failing_completions: 2,
        ..CountingStore::default()
    });
    let calls = Counter::default();
    let layer =
        || IdempotencyServiceLayer::with_shared_store(store.clone()).layer(counted_orders(&calls));
    let (a, b) = (layer(), layer());
    let first = a.oneshot(order()).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(
        first.into_body().collect().await.unwrap().to_bytes(),
        "run=1"
    );
    let duplicate = b.oneshot(order()).await.unwrap();
    assert_eq!(duplicate.headers()["idempotent-replayed"], "true");
    assert_eq!(
        duplicate.into_body().collect().await.unwrap().to_bytes(),
        "run=1"
    );
    assert_eq!(calls.runs(), 1);
    assert_eq!(
        store.completions.load(Ordering::SeqCst),
        3,
        "two refused, then stored"
    );
}

#[tokio::test]
async fn a_retry_beside_a_request_that_reused_its_key_is_replayed_not_rejected() {
    // The key is done (body `tea`). A request that reuses it with another body leads the key
    // in this process, its claim slow to come back from the store; the true retry arrives
    // meanwhile. The retry is the one the key is for: it is replayed, and only the reuse is 422.
    let store = Arc::new(CountingStore {
        slow_claims: 2,
        claim_reply: Duration::from_millis(200),
        ..CountingStore::default()
    });
    let calls = Counter::default();
    let svc =
        IdempotencyServiceLayer::with_shared_store(store.clone()).layer(counted_orders(&calls));
    let first = svc.clone().oneshot(order()).await.unwrap();
    assert_eq!(
        first.into_body().collect().await.unwrap().to_bytes(),
        "run=1"
    );
    let reused = tokio::spawn(svc.clone().oneshot(order_of("coffee")));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let retry = svc.oneshot(order()).await.unwrap();
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(
        retry.into_body().collect().await.unwrap().to_bytes(),
        "run=1"
    );
    let reused = reused.await.unwrap().unwrap();
    assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(calls.runs(), 1);
}

/// How long a key stays held when the store refuses every completion, under `lease`: the first
/// request is answered, then a retry waits for the key and runs the handler again. Also how
/// many completions the store saw.
async fn held_by_a_refused_response(lease: Duration) -> (Duration, usize) {
    let store = Arc::new(CountingStore {
        failing_completions: usize::MAX,
        ..CountingStore::default()
    });
    let calls = Counter::default();
    let svc = IdempotencyServiceLayer::with_shared_store(store.clone())
        .lease(lease)
        .wait_timeout(Duration::from_secs(3600))
        .layer(counted_orders(&calls));
    let started = tokio::time::Instant::now();
    let first = svc.clone().oneshot(order()).await.unwrap();
    assert_eq!(
        first.into_body().collect().await.unwrap().to_bytes(),
        "run=1"
    );
    let retry = svc.oneshot(order()).await.unwrap();
    assert_eq!(
        retry.into_body().collect().await.unwrap().to_bytes(),
        "run=2"
    );
    (started.elapsed(), store.completions.load(Ordering::SeqCst))
}

#[tokio::test(start_paused = true)]
async fn a_response_the_store_never_records_holds_its_key_one_lease_at_most() {
    // The key stays claimed while the response is tried again, for one 3 s lease and no
    // longer: then a retry runs the handler again.
    let (held, completions) = held_by_a_refused_response(Duration::from_secs(3)).await;
    assert!(
        (Duration::from_secs(3)..Duration::from_secs(4)).contains(&held),
        "the key was held {held:?}"
    );
    assert!(completions > 2, "the response was tried again");
}

#[tokio::test(start_paused = true)]
async fn a_refused_response_is_tried_for_five_minutes_at_most_and_a_corrupt_one_once() {
    // A 1 h lease: the tries stop after five minutes, and the claim they kept lapses then, so
    // a retry waiting since the start runs the handler five minutes in, not an hour.
    let (held, _) = held_by_a_refused_response(Duration::from_secs(3600)).await;
    assert!(
        (Duration::from_secs(300)..Duration::from_secs(310)).contains(&held),
        "the key was held {held:?}"
    );

    // A store that calls the record corrupt will never take it: one try, then no more.
    let corrupt = Arc::new(CountingStore {
        failing_completions: usize::MAX,
        refuse_as_corrupt: true,
        ..CountingStore::default()
    });
    let svc = IdempotencyServiceLayer::with_shared_store(corrupt.clone())
        .layer(counted_orders(&Counter::default()));
    svc.oneshot(order()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        corrupt.completions.load(Ordering::SeqCst),
        2,
        "the first, and one try"
    );
}

#[tokio::test]
async fn headers_named_in_connection_are_not_replayed() {
    named_in_connection_not_replayed(MemoryStore::new()).await;
    named_in_connection_not_replayed(CountingStore::default()).await;
}

async fn named_in_connection_not_replayed(store: impl KeyStore) {
    let svc = IdempotencyService::new(
        service_fn(|_req: Request<_>| async {
            let response = Response::builder()
                // A value that is not all visible ASCII still names its headers.
                .header(
                    header::CONNECTION,
                    http::HeaderValue::from_bytes(b"X-Hop, close, x-\xe9").unwrap(),
                )
                .header("x-hop", "this connection only")
                .header("x-order", "42")
                .body(Full::new(Bytes::from("created")))
                .unwrap();
            Ok::<_, Infallible>(response)
        }),
        store,
    );
    let first = svc.clone().oneshot(order()).await.unwrap();
    assert_eq!(first.headers()["x-hop"], "this connection only");
    let replay = svc.oneshot(order()).await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.headers()["x-order"], "42");
    assert!(!replay.headers().contains_key("x-hop"));
    assert!(!replay.headers().contains_key(header::CONNECTION));
}

#[tokio::test]
async fn a_chunked_response_reaches_its_first_caller_and_is_replayed() {
    // A handler that forwards an upstream's chunked answer keeps its `Transfer-Encoding`. The
    // service reads the body whole to store it, and sends it framed by its length: under the
    // old header hyper would drop the connection, and the caller of a run that happened would
    // get nothing.
    for stored_whole in [false, true] {
        let runs = Counter::default();
        let counted = runs.clone();
        let handler = move || {
            counted.count();
            let body = if stored_whole {
                axum::body::Body::from("order 42")
            } else {
                axum::body::Body::new(Chunks {
                    chunks: [Bytes::from("order "), Bytes::from("42")].into(),
                    says: None,
                })
            };
            async move {
                Response::builder()
                    .status(StatusCode::CREATED)
                    .header(header::TRANSFER_ENCODING, "chunked")
                    .body(body)
                    .unwrap()
            }
        };
        let router = axum::Router::new()
            .route("/orders", axum::routing::post(handler))
            .layer(IdempotencyServiceLayer::default());
        let s = serve(router, runs).await;
        let send = || s.send(Method::POST, "/orders", &[b"k"], &[], "tea");
        let first = send().await;
        assert_eq!(first.status, StatusCode::CREATED, "{stored_whole}");
        assert_eq!(first.text(), "order 42");
        assert_eq!(first.headers[header::CONTENT_LENGTH], "8");
        assert!(!first.replayed());
        let replay = send().await;
        assert_eq!(replay.status, StatusCode::CREATED);
        assert_eq!(replay.text(), "order 42");
        assert!(replay.replayed());
        assert_eq!(s.runs.runs(), 1);
    }
}

/// A body whose chunks come from a channel, as a handler's events or a streaming call's
/// messages do; it ends when its sender is dropped.
struct Events(tokio::sync::mpsc::Receiver<&'static str>);

impl http_body::Body for Events {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|event| event.map(|e| Ok(http_body::Frame::data(Bytes::from(e)))))
    }
}

/// A server whose `POST /orders` answers server-sent events: those sent on the returned
/// channel, for the first run (later runs get none).
async fn events_server(
    layer: IdempotencyServiceLayer,
) -> (
    support::app::TestServer,
    tokio::sync::mpsc::Sender<&'static str>,
) {
    let (events, receiver) = tokio::sync::mpsc::channel(8);
    let receiver = Arc::new(std::sync::Mutex::new(Some(receiver)));
    let runs = Counter::default();
    let counted = runs.clone();
    let handler = move || {
        counted.count();
        let receiver = receiver.lock().unwrap().take();
        async move {
            let receiver = receiver.unwrap_or_else(|| tokio::sync::mpsc::channel(1).1);
            Response::builder()
                .header(header::CONTENT_TYPE, "text/event-stream")
                .body(axum::body::Body::new(Events(receiver)))
                .unwrap()
        }
    };
    let router = axum::Router::new()
        .route("/orders", axum::routing::post(handler))
        .layer(layer);
    (serve(router, runs).await, events)
}

#[tokio::test]
async fn server_sent_events_go_out_as_they_are_made_and_never_run_twice() {
    // With the store in this process, and with one the service reaches through `KeyStore`.
    let store = Arc::new(CountingStore::default());
    for layer in [
        IdempotencyServiceLayer::default(),
        IdempotencyServiceLayer::with_shared_store(store.clone()),
    ] {
        server_sent_events_stream(layer).await;
    }
    assert_eq!(store.completions.load(Ordering::SeqCst), 1);
}

async fn server_sent_events_stream(layer: IdempotencyServiceLayer) {
    let (s, events) = events_server(layer).await;
    let request = || {
        Request::post(format!("http://{}/orders", s.addr))
            .header("idempotency-key", "k")
            .body(Full::new(Bytes::from("tea")))
            .unwrap()
    };
    events.send("data: 1\n\n").await.unwrap();
    // The first event arrives while the handler is still making the second.
    let response = tokio::time::timeout(Duration::from_secs(5), s.client.request(request()))
        .await
        .expect("the answer began before the handler's last event")
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "data: 1\n\n");
    events.send("data: 2\n\n").await.unwrap();
    drop(events);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "data: 2\n\n");

    // The key is done: a retry does not run the handler again, and is told why.
    let retry = s.send(Method::POST, "/orders", &[b"k"], &[], "tea").await;
    assert_eq!(retry.status, StatusCode::CONFLICT);
    let kind = retry.problem()["type"].to_string();
    assert!(kind.ends_with("response-not-replayable\""), "{kind}");
    assert_eq!(s.runs.runs(), 1);
}

#[tokio::test]
async fn events_left_to_be_stored_are_read_whole_and_replayed() {
    let (s, events) = events_server(IdempotencyServiceLayer::default().stream_if(|_| false)).await;
    for event in ["data: 1\n\n", "data: 2\n\n"] {
        events.send(event).await.unwrap();
    }
    drop(events);
    let first = s.send(Method::POST, "/orders", &[b"k"], &[], "tea").await;
    assert_eq!(first.text(), "data: 1\n\ndata: 2\n\n");
    let replay = s.send(Method::POST, "/orders", &[b"k"], &[], "tea").await;
    assert!(replay.replayed());
    assert_eq!(replay.text(), "data: 1\n\ndata: 2\n\n");
    assert_eq!(s.runs.runs(), 1);
}

#[tokio::test]
async fn without_detach_a_caller_gone_while_its_response_is_stored_frees_the_key_at_once() {
    // The store takes 500 ms to complete; the caller leaves 100 ms in. The claim is given
    // back, so the retry runs rather than waiting out its 2 s and being answered 409.
    let store = Arc::new(CountingStore {
        complete_delay: Duration::from_millis(500),
        ..CountingStore::default()
    });
    let calls = Counter::default();
    let svc = IdempotencyServiceLayer::with_shared_store(store.clone())
        .detach(false)
        .wait_timeout(Duration::from_secs(2))
        .layer(counted_orders(&calls));
    let first = tokio::time::timeout(Duration::from_millis(100), svc.clone().oneshot(order()));
    assert!(
        first.await.is_err(),
        "the caller left while the response was being stored"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    let retry = svc.oneshot(order()).await.unwrap();
    assert_eq!(retry.status(), StatusCode::OK);
    assert!(!retry.headers().contains_key("idempotent-replayed"));
    assert_eq!(
        retry.into_body().collect().await.unwrap().to_bytes(),
        "run=2"
    );
    assert_eq!(calls.runs(), 2);
}

/// `POST /orders` with the key `k` and the body `tea`, for the services called in process.
fn order() -> Request<Full<Bytes>> {
    order_of("tea")
}

/// `POST /orders` with the key `k` and `body`.
fn order_of(body: &'static str) -> Request<Full<Bytes>> {
    Request::post("/orders")
        .header("idempotency-key", "k")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// The handlers of the services called in process, answering bodies of type `B`.
trait Handler<B>:
    Service<
        Request<RequestBody<Full<Bytes>>>,
        Response = Response<B>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<T, B> Handler<B> for T where
    T: Service<
            Request<RequestBody<Full<Bytes>>>,
            Response = Response<B>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// The handlers of the services called in process that answer whole bodies.
trait Orders: Handler<Full<Bytes>> {}

impl<T: Handler<Full<Bytes>>> Orders for T {}

/// A handler for the services called in process: it counts each run in `calls` and answers
/// `run=N` for the Nth.
fn counted_orders(calls: &Counter) -> impl Orders {
    slow_orders(calls, Duration::ZERO)
}

#[tokio::test]
async fn a_caller_gone_before_its_claim_was_answered_does_not_leave_the_key_claimed() {
    // The claim is given back once its answer is in, and tried again if the store fails that,
    // as any release is.
    for failing_releases in [0, 1] {
        let store = Arc::new(CountingStore {
            slow_claims: 1,
            claim_reply: Duration::from_millis(200),
            failing_releases,
            ..CountingStore::default()
        });
        let calls = Counter::default();
        // A claim left behind would hold the key for its 60 s lease: the retry would wait its
        // 1 s and be answered 409.
        let svc = IdempotencyServiceLayer::with_shared_store(store.clone())
            .wait_timeout(Duration::from_secs(1))
            .layer(counted_orders(&calls));
        let first = tokio::time::timeout(Duration::from_millis(50), svc.clone().oneshot(order()));
        assert!(
            first.await.is_err(),
            "the caller left while the claim was on its way back"
        );
        let retry = svc.clone().oneshot(order()).await.unwrap();
        assert_eq!(retry.status(), StatusCode::OK, "{failing_releases}");
        assert!(!retry.headers().contains_key("idempotent-replayed"));
        assert_eq!(
            retry.into_body().collect().await.unwrap().to_bytes(),
            "run=1"
        );
        assert_eq!(calls.runs(), 1, "only the retry ran");
        assert!(store.claims.load(Ordering::SeqCst) >= 2);
        assert_eq!(store.releases.load(Ordering::SeqCst), failing_releases + 1);
    }
}

#[tokio::test]
async fn a_claim_on_its_way_back_is_given_back_when_its_task_panics_elsewhere() {
    // The request is dropped as its task unwinds from a panic in another future of the task:
    // its claim did not panic, and is given back once its answer is in.
    let store = CountingStore::first_claim_answered_after(Duration::from_millis(200));
    let calls = Counter::default();
    let svc = IdempotencyServiceLayer::with_shared_store(store.clone())
        .wait_timeout(Duration::from_secs(1))
        .layer(counted_orders(&calls));
    let service = svc.clone();
    let task = tokio::spawn(async move {
        tokio::select! {
            _ = service.oneshot(order()) => {}
            () = async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                panic!("another future of the task panicked");
            } => {}
        }
    });
    assert!(task.await.unwrap_err().is_panic());
    let retry = svc.oneshot(order()).await.unwrap();
    assert_eq!(retry.status(), StatusCode::OK);
    assert_eq!(calls.runs(), 1, "only the retry ran");
    assert_eq!(store.releases.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn in_reject_mode_a_duplicate_of_a_request_gone_before_the_store_answered_asks_the_store() {
    // Every claim takes 100 ms to come back. The key is done; a retry leads, and its caller
    // leaves before the store answers; a duplicate was following it. The store says the key is
    // done, so the duplicate is replayed, not told the key is in progress.
    let store = CountingStore::claims_answered_after(Duration::from_millis(100));
    let calls = Counter::default();
    let svc = IdempotencyServiceLayer::with_shared_store(store.clone())
        .on_conflict(OnConflict::Reject)
        .layer(counted_orders(&calls));
    assert_eq!(
        svc.clone().oneshot(order()).await.unwrap().status(),
        StatusCode::OK
    );
    let leaving = tokio::spawn(tokio::time::timeout(
        Duration::from_millis(20),
        svc.clone().oneshot(order()),
    ));
    tokio::time::sleep(Duration::from_millis(5)).await;
    let duplicate = svc.clone().oneshot(order()).await.unwrap();
    assert!(leaving.await.unwrap().is_err(), "the retry's caller left");
    assert_eq!(duplicate.status(), StatusCode::OK);
    assert!(duplicate.headers().contains_key("idempotent-replayed"));
    assert_eq!(calls.runs(), 1);
}

/// Polls `future` to its end on this thread, with no tokio runtime.
fn block_on_without_a_runtime<F: std::future::Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let std::task::Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}

#[test]
fn without_a_tokio_runtime_a_handler_that_waits_runs_once() {
    // The lease is not renewed (there are no timers), but the run goes on, and is stored.
    let calls = Counter::default();
    let counted = calls.clone();
    let svc = IdempotencyServiceLayer::default().layer(service_fn(
        move |_req: Request<RequestBody<Full<Bytes>>>| {
            let run = counted.count();
            async move {
                // Not ready when first polled, as a handler waiting on I/O is not.
                let mut waited = false;
                std::future::poll_fn(|cx| {
                    if std::mem::replace(&mut waited, true) {
                        return std::task::Poll::Ready(());
                    }
                    cx.waker().wake_by_ref();
                    std::task::Poll::Pending
                })
                .await;
                let body = Full::new(Bytes::from(format!("run={run}")));
                Ok::<_, Infallible>(Response::new(body))
            }
        },
    ));
    let first = block_on_without_a_runtime(svc.clone().oneshot(order())).unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let replay = block_on_without_a_runtime(svc.oneshot(order())).unwrap();
    assert!(replay.headers().contains_key("idempotent-replayed"));
    assert_eq!(calls.runs(), 1);
}

#[tokio::test]
async fn a_claim_answered_after_the_store_timeout_is_given_back() {
    let store = CountingStore::first_claim_answered_after(Duration::from_millis(150));
    let calls = Counter::default();
    let svc = IdempotencyServiceLayer::with_shared_store(store.clone())
        .store_timeout(Duration::from_millis(100))
        .wait_timeout(Duration::from_secs(1))
        .layer(counted_orders(&calls));
    let first = svc.clone().oneshot(order()).await.unwrap();
    assert_eq!(
        first.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "the claim timed out"
    );
    // The store granted that claim after the timeout; once its answer is in, it is given back.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let retry = svc.clone().oneshot(order()).await.unwrap();
    assert_eq!(retry.status(), StatusCode::OK);
    assert_eq!(
        retry.into_body().collect().await.unwrap().to_bytes(),
        "run=1"
    );
    assert_eq!(calls.runs(), 1, "only the retry ran");
}

/// A body with trailers, as a gRPC handler answers.
type WithTrailers = http_body_util::combinators::WithTrailers<
    Full<Bytes>,
    std::future::Ready<Option<Result<HeaderMap, Infallible>>>,
>;

/// A gRPC handler: answers HTTP 200 with `grpc-status` `code`, in the headers (a
/// "trailers-only" error) or in the trailers, and counts its runs.
fn grpc_answering(
    calls: &Counter,
    code: &'static str,
    in_trailers: bool,
    store: impl KeyStore,
) -> IdempotencyService<impl Handler<WithTrailers>> {
    let calls = calls.clone();
    IdempotencyService::new(
        service_fn(move |_req: Request<RequestBody<Full<Bytes>>>| {
            calls.count();
            let mut status = HeaderMap::new();
            status.insert("grpc-status", code.parse().unwrap());
            let (head, trailers) = if in_trailers {
                (HeaderMap::new(), Some(Ok(status)))
            } else {
                (status, None)
            };
            let mut response = Response::new(
                Full::new(Bytes::from("message")).with_trailers(std::future::ready(trailers)),
            );
            *response.headers_mut() = head;
            async move { Ok::<_, Infallible>(response) }
        }),
        store,
    )
}

#[tokio::test]
async fn a_grpc_failure_that_may_pass_is_not_stored_so_a_retry_runs_again() {
    // A memory store is called at once; a store of another type is awaited, as a remote one.
    for in_trailers in [false, true] {
        grpc_failure_is_not_stored(in_trailers, MemoryStore::new).await;
        grpc_failure_is_not_stored(in_trailers, CountingStore::default).await;
    }
}

async fn grpc_failure_is_not_stored<S: KeyStore>(in_trailers: bool, store: impl Fn() -> S) {
    let setup = format!(
        "status in trailers: {in_trailers}, {}",
        std::any::type_name::<S>()
    );
    // UNAVAILABLE: the retry runs again.
    let calls = Counter::default();
    let svc = grpc_answering(&calls, "14", in_trailers, store());
    for _ in 0..2 {
        let response = svc.clone().oneshot(order()).await.unwrap();
        assert!(!response.headers().contains_key("idempotent-replayed"));
        let collected = response.into_body().collect().await.unwrap();
        assert_eq!(
            collected.to_bytes(),
            "message",
            "the caller gets the answer"
        );
    }
    assert_eq!(calls.runs(), 2, "UNAVAILABLE, {setup}");
    // INVALID_ARGUMENT is final: stored and replayed.
    let calls = Counter::default();
    let svc = grpc_answering(&calls, "3", in_trailers, store());
    svc.clone().oneshot(order()).await.unwrap();
    let replay = svc.clone().oneshot(order()).await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true", "{setup}");
    assert_eq!(calls.runs(), 1, "INVALID_ARGUMENT, {setup}");
}

#[tokio::test]
async fn a_body_cut_off_by_a_limit_around_the_service_is_413_and_does_not_run() {
    let calls = Counter::default();
    // A limit around the service, as tower-http's `RequestBodyLimitLayer` puts on a body of
    // unknown length.
    let svc = tower::ServiceBuilder::new()
        .map_request(|req: Request<Full<Bytes>>| req.map(|b| http_body_util::Limited::new(b, 8)))
        .layer(IdempotencyServiceLayer::default())
        .service(service_fn({
            let calls = calls.clone();
            move |_req: Request<_>| {
                calls.count();
                async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::new()))) }
            }
        }));
    let response = svc
        .oneshot(order_of("a body over eight bytes"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("Send a smaller body"),
        "{body:?}"
    );
    assert_eq!(calls.runs(), 0);
}

#[tokio::test]
async fn a_keyed_request_s_trailers_reach_the_handler() {
    let svc = IdempotencyService::new(
        service_fn(|req: Request<RequestBody<_>>| async move {
            let collected = req.into_body().collect().await.unwrap();
            let seen = collected
                .trailers()
                .and_then(|t| t.get("x-checksum"))
                .map_or("none".to_owned(), |v| v.to_str().unwrap().to_owned());
            let answer = format!("{} {seen}", String::from_utf8_lossy(&collected.to_bytes()));
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(answer))))
        }),
        MemoryStore::new(),
    );
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", "abc".parse().unwrap());
    let req = Request::post("/upload")
        .header("idempotency-key", "k")
        .body(
            Full::new(Bytes::from("data")).with_trailers(std::future::ready(Some(Ok::<
                _,
                Infallible,
            >(
                trailers
            )))),
        )
        .unwrap();
    let response = svc.oneshot(req).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "data abc");
}

#[tokio::test]
async fn a_response_with_trailers_goes_out_chunked_with_its_trailers_over_http1() {
    // A real HTTP/1.1 connection: a response framed by Content-Length would lose its trailers.
    let app = tower::ServiceBuilder::new()
        .map_response(|response: Response<_>| response.map(axum::body::Body::new))
        .layer(IdempotencyServiceLayer::default())
        .service(service_fn(|_req: Request<_>| async {
            let mut trailers = HeaderMap::new();
            trailers.insert("x-checksum", "abc".parse().unwrap());
            let body = Full::new(Bytes::from("hello"))
                .with_trailers(std::future::ready(Some(Ok::<_, Infallible>(trailers))));
            // hyper sends over HTTP/1.1 only the trailers a response announces.
            let mut response = Response::new(body);
            response
                .headers_mut()
                .insert(header::TRAILER, "x-checksum".parse().unwrap());
            Ok::<_, Infallible>(response)
        }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            axum::ServiceExt::<axum::extract::Request>::into_make_service(app),
        )
        .await
        .unwrap();
    });
    for replayed in [false, true] {
        let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        socket
            .write_all(
                b"POST /upload HTTP/1.1\r\nhost: x\r\nidempotency-key: k\r\nte: trailers\r\n\
                  content-length: 0\r\nconnection: close\r\n\r\n",
            )
            .await
            .unwrap();
        let mut answer = String::new();
        socket.read_to_string(&mut answer).await.unwrap();
        let answer = answer.to_ascii_lowercase();
        assert_eq!(
            answer.contains("idempotent-replayed: true"),
            replayed,
            "{answer}"
        );
        assert!(answer.contains("transfer-encoding: chunked"), "{answer}");
        assert!(
            answer.contains("x-checksum: abc"),
            "the trailers were lost: {answer}"
        );
    }
}

/// A handler that counts its run, takes `delay`, and answers `run=N` for the Nth.
fn slow_orders(calls: &Counter, delay: Duration) -> impl Orders {
    let counted = calls.clone();
    service_fn(move |_req: Request<RequestBody<Full<Bytes>>>| {
        let n = counted.count();
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok(Response::new(Full::new(Bytes::from(format!("run={n}")))))
        }
    })
}

#[tokio::test(start_paused = true)]
async fn in_reject_mode_retries_of_a_done_key_arriving_together_are_both_replayed() {
    // Every claim takes 50 ms to come back, as a remote store's does.
    let store = CountingStore::claims_answered_after(Duration::from_millis(50));
    let calls = Counter::default();
    let svc = IdempotencyServiceLayer::with_shared_store(store)
        .on_conflict(OnConflict::Reject)
        .layer(counted_orders(&calls));
    assert_eq!(
        svc.clone().oneshot(order()).await.unwrap().status(),
        StatusCode::OK
    );
    let (a, b) = tokio::join!(svc.clone().oneshot(order()), svc.clone().oneshot(order()));
    for retry in [a.unwrap(), b.unwrap()] {
        assert_eq!(
            retry.status(),
            StatusCode::OK,
            "nothing runs: a replay, not 409"
        );
        assert_eq!(retry.headers()["idempotent-replayed"], "true");
    }
    assert_eq!(calls.runs(), 1);
    // While it runs, a duplicate is still told 409 at once.
    let slow = IdempotencyServiceLayer::with_shared_store(Arc::new(CountingStore::default()))
        .on_conflict(OnConflict::Reject)
        .layer(slow_orders(&calls, Duration::from_secs(2)));
    let first = tokio::spawn(slow.clone().oneshot(order()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = tokio::time::Instant::now();
    let duplicate = slow.clone().oneshot(order()).await.unwrap();
    assert_eq!(duplicate.status(), StatusCode::CONFLICT);
    assert!(started.elapsed() < Duration::from_millis(100));
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_waits_to_its_own_deadline_not_that_of_the_one_it_followed() {
    let store = Arc::new(CountingStore::default());
    let calls = Counter::default();
    // One process runs the request, for 3 s.
    let running = IdempotencyServiceLayer::with_shared_store(store.clone())
        .layer(slow_orders(&calls, Duration::from_secs(3)));
    // Another process on the same store waits up to 2 s for it.
    let waiting = IdempotencyServiceLayer::with_shared_store(store)
        .wait_timeout(Duration::from_secs(2))
        .layer(slow_orders(&calls, Duration::from_secs(3)));
    let run = tokio::spawn(running.oneshot(order()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Waits from 0.1 s to 2.1 s, and gets 409.
    let early = tokio::spawn(waiting.clone().oneshot(order()));
    tokio::time::sleep(Duration::from_millis(1400)).await;
    // Follows it from 1.5 s; its own 2 s last past the run's end at 3 s.
    let late = waiting.oneshot(order()).await.unwrap();
    assert_eq!(early.await.unwrap().unwrap().status(), StatusCode::CONFLICT);
    assert_eq!(
        late.status(),
        StatusCode::OK,
        "answered at its leader's deadline"
    );
    assert_eq!(late.headers()["idempotent-replayed"], "true");
    assert_eq!(run.await.unwrap().unwrap().status(), StatusCode::OK);
    assert_eq!(calls.runs(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_duplicate_leaves_the_inner_service_s_capacity_to_other_requests() {
    use tower::limit::ConcurrencyLimitLayer;
    // A memory store is called at once; a store of another type is awaited, as a remote one.
    for store in [
        Arc::new(MemoryStore::new()) as Arc<dyn KeyStore>,
        Arc::new(CountingStore::default()),
    ] {
        let calls = Counter::default();
        let limited =
            ConcurrencyLimitLayer::new(2).layer(slow_orders(&calls, Duration::from_secs(5)));
        let svc = IdempotencyServiceLayer::with_shared_store(store).layer(limited);
        let keyed = |key: &'static str| {
            Request::post("/orders")
                .header("idempotency-key", key)
                .body(Full::new(Bytes::from("tea")))
                .unwrap()
        };
        let first = tokio::spawn(svc.clone().oneshot(keyed("k1")));
        tokio::time::sleep(Duration::from_millis(10)).await;
        let duplicate = tokio::spawn(svc.clone().oneshot(keyed("k1")));
        tokio::time::sleep(Duration::from_millis(10)).await;
        // One handler runs and the limit is 2: another key starts at once.
        let started = tokio::time::Instant::now();
        let other = svc.clone().oneshot(keyed("k2")).await.unwrap();
        assert_eq!(other.status(), StatusCode::OK);
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "held up {:?} by a duplicate that only waited",
            started.elapsed()
        );
        assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
        let duplicate = duplicate.await.unwrap().unwrap();
        assert_eq!(duplicate.headers()["idempotent-replayed"], "true");
        assert_eq!(calls.runs(), 2);
    }
}

#[tokio::test(start_paused = true)]
async fn in_reject_mode_with_the_store_down_and_failing_open_a_duplicate_is_still_refused() {
    let calls = Counter::default();
    let svc = IdempotencyServiceLayer::new(DownStore)
        .on_conflict(OnConflict::Reject)
        .on_store_error(OnStoreError::FailOpen)
        .layer(slow_orders(&calls, Duration::from_secs(2)));
    let first = tokio::spawn(svc.clone().oneshot(order()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let duplicate = svc.clone().oneshot(order()).await.unwrap();
    assert_eq!(duplicate.status(), StatusCode::CONFLICT);
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
    assert_eq!(
        calls.runs(),
        1,
        "a duplicate in this process ran beside the first"
    );
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_that_waited_does_not_wait_for_capacity_past_its_deadline() {
    use tower::limit::ConcurrencyLimitLayer;
    let store = Arc::new(CountingStore::default());
    let calls = Counter::default();
    // Another process runs k for 3 s.
    let elsewhere = IdempotencyServiceLayer::with_shared_store(store.clone())
        .layer(slow_orders(&calls, Duration::from_secs(3)));
    let run = tokio::spawn(elsewhere.oneshot(order()));
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Here, one request at a time, and waits of 1 s.
    let here = IdempotencyServiceLayer::with_shared_store(store)
        .wait_timeout(Duration::from_secs(1))
        .layer(ConcurrencyLimitLayer::new(1).layer(slow_orders(&calls, Duration::from_secs(60))));
    let started = tokio::time::Instant::now();
    let leading = tokio::spawn(here.clone().oneshot(order()));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let following = tokio::spawn(here.clone().oneshot(order()));
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Another key takes the one slot for a minute.
    let other = tokio::spawn(
        here.clone().oneshot(
            Request::post("/orders")
                .header("idempotency-key", "other")
                .body(Full::new(Bytes::from("tea")))
                .unwrap(),
        ),
    );
    assert_eq!(
        leading.await.unwrap().unwrap().status(),
        StatusCode::CONFLICT
    );
    let following = following.await.unwrap().unwrap();
    assert_eq!(following.status(), StatusCode::CONFLICT);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a duplicate with a 1 s wait answered after {:?}",
        started.elapsed()
    );
    assert_eq!(run.await.unwrap().unwrap().status(), StatusCode::OK);
    assert_eq!(other.await.unwrap().unwrap().status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn in_reject_mode_a_duplicate_of_a_first_request_that_failed_is_refused() {
    // The first request's claim takes 100 ms to come back; its handler then fails, giving the
    // key back. A duplicate that followed it is told 409, not run beside a retry.
    let store = Arc::new(CountingStore {
        slow_claims: 1,
        claim_reply: Duration::from_millis(100),
        ..CountingStore::default()
    });
    let calls = Counter::default();
    let counted = calls.clone();
    let svc = IdempotencyServiceLayer::with_shared_store(store)
        .on_conflict(OnConflict::Reject)
        .layer(service_fn(
            move |_req: Request<RequestBody<Full<Bytes>>>| {
                counted.count();
                async { Err::<Response<Full<Bytes>>, _>("the database is down") }
            },
        ));
    let first = tokio::spawn(svc.clone().oneshot(order()));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let duplicate = svc.clone().oneshot(order()).await.unwrap();
    assert_eq!(duplicate.status(), StatusCode::CONFLICT);
    assert!(
        first.await.unwrap().is_err(),
        "the first request's error reaches its caller"
    );
    assert_eq!(calls.runs(), 1);
}

#[tokio::test]
async fn a_response_too_large_to_store_that_fails_later_keeps_its_key_done() {
    // As documented: the key is marked done as the response passes the storable limit, so a
    // failure after that does not free it, and the operation never runs twice.
    let calls = Counter::default();
    let counted = calls.clone();
    let svc = IdempotencyServiceLayer::new(MemoryStore::new())
        .max_stored_response(8)
        .layer(service_fn(
            move |_req: Request<RequestBody<Full<Bytes>>>| {
                counted.count();
                async {
                    Ok::<_, Infallible>(Response::new(FailsPartWay::after(["0123456789"; 2], None)))
                }
            },
        ));
    let first = svc.clone().oneshot(order()).await.unwrap();
    assert_eq!(
        first.into_body().collect().await.unwrap_err().to_string(),
        "upstream reset"
    );
    let retry = svc.clone().oneshot(order()).await.unwrap();
    assert_eq!(retry.status(), StatusCode::CONFLICT);
    assert!(
        !retry.headers().contains_key(header::RETRY_AFTER),
        "waiting would not help"
    );
    assert_eq!(calls.runs(), 1);
}

#[tokio::test]
async fn duplicates_in_one_process_ask_a_remote_store_once() {
    // Claims take 50 ms to come back, as a remote store's do; 100 duplicates arrive together.
    let store = CountingStore::claims_answered_after(Duration::from_millis(50));
    let calls = Counter::default();
    let svc = IdempotencyServiceLayer::with_shared_store(store.clone())
        .layer(slow_orders(&calls, Duration::from_millis(100)));
    let answers: Vec<_> = (0..100)
        .map(|_| tokio::spawn(svc.clone().oneshot(order())))
        .collect();
    let mut replayed = 0;
    for answer in answers {
        let answer = answer.await.unwrap().unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        replayed += usize::from(answer.headers().contains_key("idempotent-replayed"));
    }
    assert_eq!(replayed, 99);
    assert_eq!(calls.runs(), 1);
    assert_eq!(
        store.claims.load(Ordering::SeqCst),
        1,
        "the duplicates followed the first instead of each asking the store"
    );
}

#[tokio::test]
async fn patch_a_custom_header_and_a_scope_closure_work_as_configured() {
    let calls = Counter::default();
    let svc = IdempotencyServiceLayer::new(MemoryStore::new())
        .header_name(header::HeaderName::from_static("x-request-key"))
        .methods([Method::PATCH])
        .scope(|parts| {
            parts
                .uri
                .query()
                .and_then(|q| q.strip_prefix("tenant="))
                .map(str::to_owned)
        })
        .layer(counted_orders(&calls));
    let patch = |tenant: &str| {
        Request::patch(format!("/orders/7?tenant={tenant}"))
            .header("x-request-key", "k")
            .body(Full::new(Bytes::from("qty=2")))
            .unwrap()
    };
    let first = svc.clone().oneshot(patch("a")).await.unwrap();
    let again = svc.clone().oneshot(patch("a")).await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let (first, again) = (
        first.into_body().collect().await.unwrap().to_bytes(),
        again.into_body().collect().await.unwrap().to_bytes(),
    );
    assert_eq!(again, first);
    // Another tenant's key of the same name is its own.
    let other = svc.clone().oneshot(patch("b")).await.unwrap();
    assert!(!other.headers().contains_key("idempotent-replayed"));
    // POST is not among the methods now, and a request no scope can be read from is 400.
    let post = Request::post("/orders?tenant=a")
        .header("x-request-key", "k")
        .body(Full::new(Bytes::from("qty=2")))
        .unwrap();
    svc.clone().oneshot(post).await.unwrap();
    let unscoped = Request::patch("/orders/7")
        .header("x-request-key", "k")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(
        svc.clone().oneshot(unscoped).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    // Nor is an empty scope one: it would be the key space of a service without a scope.
    assert_eq!(
        svc.clone().oneshot(patch("")).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        calls.runs(),
        3,
        "tenant a once, tenant b once, the POST once"
    );
}

#[tokio::test]
async fn a_replay_leaves_out_date_and_request_trailers_do_not_count_towards_the_fingerprint() {
    let calls = Counter::default();
    let counted = calls.clone();
    let svc = IdempotencyService::new(
        service_fn(move |_req: Request<RequestBody<_>>| {
            counted.count();
            async {
                let mut response = Response::new(Full::new(Bytes::from("created")));
                let headers = response.headers_mut();
                headers.insert(
                    header::DATE,
                    "Mon, 01 Jan 2024 00:00:00 GMT".parse().unwrap(),
                );
                headers.insert("x-order", "7".parse().unwrap());
                Ok::<_, Infallible>(response)
            }
        }),
        MemoryStore::new(),
    );
    let with_trailer = |checksum: &'static str| {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", checksum.parse().unwrap());
        Request::post("/upload")
            .header("idempotency-key", "k")
            .body(
                Full::new(Bytes::from("data")).with_trailers(std::future::ready(Some(Ok::<
                    _,
                    Infallible,
                >(
                    trailers
                )))),
            )
            .unwrap()
    };
    let first = svc.clone().oneshot(with_trailer("abc")).await.unwrap();
    assert!(
        first.headers().contains_key(header::DATE),
        "the first caller gets every header"
    );
    let replay = svc.clone().oneshot(with_trailer("other")).await.unwrap();
    assert_eq!(
        replay.status(),
        StatusCode::OK,
        "trailers are not fingerprinted"
    );
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.headers()["x-order"], "7");
    assert!(
        !replay.headers().contains_key(header::DATE),
        "a stale Date was replayed"
    );
    assert_eq!(calls.runs(), 1);
}

#[tokio::test]
async fn around_a_router_a_keyed_request_to_no_route_has_its_404_stored_and_replayed() {
    let runs = Counter::default();
    let counted = runs.clone();
    let router = axum::Router::new().route(
        "/orders",
        axum::routing::post(move || {
            counted.count();
            async { StatusCode::CREATED }
        }),
    );
    let app = tower::ServiceBuilder::new()
        .map_response(|response: Response<_>| response.map(axum::body::Body::new))
        .layer(IdempotencyServiceLayer::default())
        .service(router);
    let to = |path: &str| {
        Request::post(path)
            .header("idempotency-key", "k-404")
            .body(axum::body::Body::empty())
            .unwrap()
    };
    let first = app.clone().oneshot(to("/nope")).await.unwrap();
    assert_eq!(first.status(), StatusCode::NOT_FOUND);
    let again = app.clone().oneshot(to("/nope")).await.unwrap();
    assert_eq!(again.status(), StatusCode::NOT_FOUND);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    // The same key to a route that exists is another request: 422, and nothing runs.
    let other = app.clone().oneshot(to("/orders")).await.unwrap();
    assert_eq!(other.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(runs.runs(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_slow_handler_renews_its_lease_once_a_third_of_it() {
    // A 3 s lease under a 10 s handler: a renewal every second, about ten in all, and none
    // for a handler quicker than a third of the lease.
    let store = Arc::new(CountingStore::default());
    let calls = Counter::default();
    let svc = IdempotencyServiceLayer::with_shared_store(store.clone())
        .lease(Duration::from_secs(3))
        .layer(slow_orders(&calls, Duration::from_secs(10)));
    assert_eq!(
        svc.clone().oneshot(order()).await.unwrap().status(),
        StatusCode::OK
    );
    let renewals = store.extensions.load(Ordering::SeqCst);
    assert!((8..=11).contains(&renewals), "{renewals} renewals in 10 s");
    let quick = IdempotencyServiceLayer::with_shared_store(store.clone())
        .lease(Duration::from_secs(3))
        .layer(slow_orders(&calls, Duration::from_millis(900)));
    let fresh = Request::post("/orders")
        .header("idempotency-key", "quick")
        .body(Full::new(Bytes::from("tea")))
        .unwrap();
    assert_eq!(quick.oneshot(fresh).await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        store.extensions.load(Ordering::SeqCst),
        renewals,
        "a quick handler renewed"
    );
}
