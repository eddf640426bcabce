//! Sends one POST through the idempotent client stack, retrying what is safe to retry.
//!
//! ```text
//! cargo run --release --example client -- --url URL [--key KEY|auto] [--data JSON]
//!     [--max-attempts N] [--timeout-ms N]
//! ```
//!
//! It prints the final status code on the first line and the response body after it, and exits
//! 0 when it got an HTTP response, 1 when every attempt failed, 2 on bad arguments. Without
//! `--key` no key is sent, so the POST is not retried; `--key auto` sends a fresh UUID v4 (shown
//! on stderr). `RUST_LOG=tower_idempotency::client=debug` logs each attempt on stderr.

use std::{
    io::{IsTerminal, Write},
    process::ExitCode,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, header::CONTENT_TYPE};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tower::{BoxError, Service, ServiceExt};
use tower_idempotency::{
    IdempotencyKey,
    client::{IdempotentClientLayer, RetryPolicy},
};
use tower_layer::Layer;

const USAGE: &str =
    "usage: client --url URL [--key KEY|auto] [--data JSON] [--max-attempts N] [--timeout-ms N]";

struct Args {
    url: http::Uri,
    key: Option<IdempotencyKey>,
    data: String,
    max_attempts: u32,
    timeout: Duration,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut url = None;
    let mut key = None;
    let mut data = "{}".to_owned();
    let mut max_attempts = 3;
    let mut timeout = Duration::from_secs(30);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => url = Some(value()?),
            "--key" => {
                let value = value()?;
                // `auto` asks for a fresh UUID v4.
                key = Some(if value.eq_ignore_ascii_case("auto") {
                    IdempotencyKey::auto()
                } else {
                    IdempotencyKey::new(&value).map_err(|e| e.to_string())?
                });
            }
            "--data" => data = value()?,
            "--max-attempts" => {
                max_attempts = value()?
                    .parse()
                    .map_err(|_| "--max-attempts takes a whole number".to_owned())?;
                if max_attempts == 0 {
                    return Err("--max-attempts must be at least 1".to_owned());
                }
            }
            "--timeout-ms" => {
                let ms = value()?
                    .parse()
                    .map_err(|_| "--timeout-ms takes a whole number of milliseconds".to_owned())?;
                if ms == 0 {
                    return Err("--timeout-ms must be at least 1".to_owned());
                }
                timeout = Duration::from_millis(ms);
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    const URL_FORM: &str = "--url takes http://HOST[:PORT]/PATH, such as http://127.0.0.1:3000/orders (this client \
         speaks plain HTTP)";
    let url: http::Uri = url
        .ok_or("--url is required")?
        .parse()
        .map_err(|err| format!("{URL_FORM}; {err}"))?;
    if url.scheme_str() != Some("http") || url.host().is_none() {
        return Err(URL_FORM.into());
    }
    Ok(Args {
        url,
        key,
        data,
        max_attempts,
        timeout,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        // `--help`: the usage alone, and success.
        Err(message) if message.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("error: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprint!("error: {err}");
            let mut source = err.source();
            while let Some(cause) = source {
                eprint!(": {cause}");
                source = cause.source();
            }
            eprintln!();
            ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> Result<(), BoxError> {
    let hyper = Client::builder(TokioExecutor::new()).build_http();
    let mut client = IdempotentClientLayer::new()
        .retry(RetryPolicy::new().max_attempts(args.max_attempts))
        .attempt_timeout(args.timeout)
        .layer(hyper);

    let mut req = Request::post(args.url)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(args.data)))?;
    if let Some(key) = args.key {
        eprintln!("idempotency key: {key}");
        req.extensions_mut().insert(key);
    }

    let started = Instant::now();
    let res = match client.ready().await?.call(req).await {
        Ok(res) => res,
        Err(err) => {
            let waited = started.elapsed().as_secs_f64();
            eprintln!("no HTTP response after {waited:.1} s");
            return Err(err);
        }
    };
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();

    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", status.as_u16())?;
    out.write_all(&body)?;
    if !body.is_empty() && !body.ends_with(b"\n") {
        writeln!(out)?;
    }
    Ok(())
}
