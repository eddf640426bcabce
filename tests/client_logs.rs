//! What the client stack logs, in a process of its own: the log is global, and a test that
//! reads it cannot share it with tests running beside it.

use std::{
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{ServiceExt, service_fn};
use tower_idempotency::client::{IdempotencyLayer, IdempotentClientLayer, RetryPolicy};
use tower_layer::Layer;

#[derive(Clone, Default)]
struct Logged(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logged {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn each_attempt_and_each_decision_to_retry_or_not_is_logged() {
    let logged = Logged::default();
    let writer = logged.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    // Unavailable once, then created.
    let calls = Arc::new(AtomicUsize::new(0));
    let server = service_fn({
        let calls = calls.clone();
        move |_req: Request<Full<Bytes>>| {
            let status = match calls.fetch_add(1, Ordering::SeqCst) {
                0 => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::CREATED,
            };
            let response = Response::builder().status(status).body(String::new());
            async move { Ok::<_, Infallible>(response.unwrap()) }
        }
    });
    let client = IdempotentClientLayer::new()
        .keys(IdempotencyLayer::new().generate_keys())
        .retry(RetryPolicy::new().backoff(Duration::from_millis(1), Duration::from_millis(10)))
        .layer(server);
    let request = Request::post("http://api.test/orders")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let response = client.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // A key header that holds no key: warned of, and its failure is not retried.
    let mut request = Request::post("http://api.test/orders")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    request
        .headers_mut()
        .insert("idempotency-key", "two words".parse().unwrap());
    calls.store(0, Ordering::SeqCst);
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // An error the policy's classifier does not retry: the decision is logged with why.
    let failing = IdempotentClientLayer::new()
        .retry(RetryPolicy::new().retry_errors_if(|_: &tower::BoxError| false))
        .layer(service_fn(|_req: Request<Full<Bytes>>| async {
            Err::<Response<String>, _>("connection reset")
        }));
    let request = Request::get("http://api.test/orders")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert!(failing.oneshot(request).await.is_err());

    let text = String::from_utf8(logged.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let find = |what: &[&str]| {
        lines
            .iter()
            .position(|line| what.iter().all(|part| line.contains(part)))
            .unwrap_or_else(|| panic!("no line with {what:?} in:\n{text}"))
    };
    let first = find(&["Request: POST /orders", "attempt=1"]);
    let retrying = find(&["retrying", "attempt=1", "outcome=503", "wait="]);
    let second = find(&["Request: POST /orders", "attempt=2"]);
    assert!(first < retrying && retrying < second, "{text}");
    let invalid = find(&[
        "WARN",
        "idempotency-key header holds no valid key",
        "a POST or PATCH with it is not retried",
    ]);
    let not_retrying = find(&["not retrying", "outcome=503", "no idempotency key"]);
    assert!(second < invalid && invalid < not_retrying, "{text}");
    find(&["not retrying", "outcome=error", "classifier does not retry"]);
}
