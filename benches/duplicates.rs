//! A storm of concurrent duplicates against a running example server: how long after the first
//! request's start every duplicate was answered, and how many times the handler ran.
//!
//! ```text
//! cargo run --release --example server -- --addr 127.0.0.1:3000 &
//! cargo bench --bench duplicates -- --addr 127.0.0.1:3000 [--requests 1000] [--delay-ms 100]
//! ```
//!
//! `scripts/bench duplicates` does both, against the bare server too, on separate cores. All
//! connections are opened and handshaken first; the clock starts when the first request is
//! sent, and every request is sent at once after that.

#![allow(missing_docs)]

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, sync::watch};

struct Options {
    addr: Option<String>,
    requests: usize,
    delay_ms: u64,
}

fn parse_args() -> Result<Options, String> {
    let mut opts = Options {
        addr: None,
        requests: 1000,
        delay_ms: 100,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--addr" => opts.addr = Some(value()?),
            "--requests" => opts.requests = value()?.parse().map_err(|e| format!("{e}"))?,
            "--delay-ms" => opts.delay_ms = value()?.parse().map_err(|e| format!("{e}"))?,
            // What `cargo bench` passes to every bench binary.
            "--bench" => {}
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(opts)
}

type Client = SendRequest<Full<Bytes>>;

async fn connect(addr: &str) -> Result<Client, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn executions(addr: &str) -> Result<u64, String> {
    let mut client = connect(addr).await?;
    let req = Request::get("/stats")
        .header("host", addr)
        .body(Full::default())
        .expect("a valid request");
    let response = client.send_request(req).await.map_err(|e| e.to_string())?;
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let stats: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    stats["executions"]
        .as_u64()
        .ok_or_else(|| format!("unexpected /stats answer {stats}"))
}

/// What one duplicate saw.
struct Answer {
    status: StatusCode,
    replayed: bool,
    done: Instant,
}

async fn run(opts: &Options, addr: &str) -> Result<(), String> {
    let before = executions(addr).await?;
    let mut clients = Vec::with_capacity(opts.requests);
    // In batches, so that the listener's backlog never overflows.
    for batch in (0..opts.requests).collect::<Vec<_>>().chunks(100) {
        let connecting: Vec<_> = batch
            .iter()
            .map(|_| {
                let addr = addr.to_owned();
                async move { connect(&addr).await }
            })
            .collect();
        for client in futures_join(connecting).await {
            clients.push(client?);
        }
    }

    let key = format!("storm-{}", uuid::Uuid::new_v4());
    let path = format!("/orders?delay_ms={}", opts.delay_ms);
    let (go, ready) = watch::channel(None::<Instant>);
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let mut ready = ready.clone();
            let req = Request::builder()
                .method(Method::POST)
                .uri(&path)
                .header("host", addr)
                .header("content-type", "application/json")
                .header("idempotency-key", &key)
                .body(Full::new(Bytes::from_static(br#"{"sku":"tea","qty":1}"#)))
                .expect("a valid request");
            tokio::spawn(async move {
                ready
                    .wait_for(Option::is_some)
                    .await
                    .map_err(|e| e.to_string())?;
                let response = client.send_request(req).await.map_err(|e| e.to_string())?;
                let status = response.status();
                let replayed = response.headers().contains_key("idempotent-replayed");
                response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(Answer {
                    status,
                    replayed,
                    done: Instant::now(),
                })
            })
        })
        .collect();
    // Lets every task reach its wait before the clock starts.
    tokio::task::yield_now().await;
    let start = Instant::now();
    go.send_replace(Some(start));

    let mut answers = Vec::with_capacity(tasks.len());
    for task in tasks {
        answers.push(task.await.map_err(|e| e.to_string())??);
    }
    let after = executions(addr).await?;

    let last = answers.iter().map(|a| a.done).max().unwrap_or(start);
    let first = answers.iter().map(|a| a.done).min().unwrap_or(start);
    let ok = answers.iter().filter(|a| a.status.is_success()).count();
    let replayed = answers.iter().filter(|a| a.replayed).count();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "DUPLICATES requests={} delay_ms={} all_answered_ms={:.1} first_answered_ms={:.1} ok={} replayed={} handler_runs={}",
        opts.requests,
        opts.delay_ms,
        ms(last - start),
        ms(first - start),
        ok,
        replayed,
        after - before,
    );
    Ok(())
}

/// Awaits every future, concurrently, in order.
async fn futures_join<F>(futures: Vec<F>) -> Vec<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        out.push(handle.await.expect("no panic"));
    }
    out
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(opts) => opts,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    let Some(addr) = opts.addr.clone() else {
        println!(
            "duplicates: skipped, no server to drive; run scripts/bench duplicates, or pass --addr HOST:PORT of a running example server"
        );
        return ExitCode::SUCCESS;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    match rt.block_on(run(&opts, &addr)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
