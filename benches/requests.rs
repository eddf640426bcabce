#![allow(missing_docs)]
//! Sends requests of one kind through `IdempotencyService` in process, one after another, and
//! prints the time per request: a program to count instructions per request with callgrind, or
//! to time fresh keys into a store that is already full.
//!
//! ```text
//! cargo bench --bench requests -- MODE N [PREFILL] [--small-store | --max-entries=M]
//! ```
//!
//! MODE is `bare` (the handler alone, with a key), `nokey`, `fresh` (a new key each time),
//! `replay`, or `coalesced` (100 duplicates of a key at once, N in all). PREFILL fresh keys are
//! sent first, untimed, to fill the store. `--small-store` keeps it to 1,000 records, so that it
//! evicts from the start and stays in cache; `--max-entries=M` keeps it to M (under cachegrind,
//! a store larger than the simulated cache then fills in less time than a million records take).
//! Instructions per request: run the executable (`cargo bench --bench requests --no-run` names
//! it) under `valgrind --tool=callgrind` with N and with 2N, and divide the difference by N.

mod common;

use std::time::Instant;

use common::{handler, request, runtime, send, yielding};
use tower::{Layer, service_fn};
use tower_idempotency::{IdempotencyServiceLayer, store::MemoryStore};

const USAGE: &str = "usage: requests bare|nokey|fresh|replay|coalesced N [PREFILL] [--small-store | --max-entries=M]";

fn main() {
    // `cargo bench` adds `--bench`.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let small = args.iter().any(|a| a == "--small-store");
    let mut words = args.iter().filter(|a| !a.starts_with("--"));
    let (Some(mode), Some(n)) = (words.next(), words.next().and_then(|n| n.parse().ok())) else {
        eprintln!("{USAGE}");
        std::process::exit(2);
    };
    let n: u64 = n;
    let prefill: u64 = words.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let max_entries = args
        .iter()
        .find_map(|a| a.strip_prefix("--max-entries="))
        .map(|n| n.parse().expect("--max-entries=N takes a whole number"));
    let store = match (small, max_entries) {
        (true, _) => MemoryStore::with_limits(1_000, usize::MAX),
        (false, Some(max_entries)) => MemoryStore::with_limits(max_entries, usize::MAX),
        (false, None) => MemoryStore::new(),
    };
    let idempotent = IdempotencyServiceLayer::new(store.clone()).layer(service_fn(handler));
    let bare = service_fn(handler);
    runtime().block_on(async {
        for i in 0..prefill {
            send(&idempotent, request(Some(&format!("prefill-{i}")))).await;
        }
        send(&idempotent, request(Some("replayed"))).await;
        // Made in every mode, though only `fresh` sends them: under callgrind each mode then
        // counts their making alike (about 1,300 instructions a request), and the difference
        // between two modes is the middleware's alone.
        let keys: Vec<String> = (0..n).map(|i| format!("fresh-{i:012}")).collect();
        let start = Instant::now();
        match mode.as_str() {
            "bare" => {
                for _ in 0..n {
                    send(&bare, request(Some("k"))).await;
                }
            }
            "nokey" => {
                for _ in 0..n {
                    send(&idempotent, request(None)).await;
                }
            }
            "fresh" => {
                for key in &keys {
                    send(&idempotent, request(Some(key))).await;
                }
            }
            "replay" => {
                for _ in 0..n {
                    send(&idempotent, request(Some("replayed"))).await;
                }
            }
            "coalesced" => {
                // 100 duplicates of one key at a time: one runs the handler, which yields
                // twice, and the other 99 arrive while it runs and wait for its answer.
                let slow = IdempotencyServiceLayer::new(store.clone()).layer(service_fn(yielding));
                for batch in 0..n.div_ceil(100) {
                    let key = format!("coalesced-{batch}");
                    let tasks: Vec<_> = (0..100)
                        .map(|_| {
                            let (slow, key) = (slow.clone(), key.clone());
                            tokio::spawn(async move { send(&slow, request(Some(&key))).await })
                        })
                        .collect();
                    for task in tasks {
                        task.await.expect("no panic");
                    }
                }
            }
            _ => {
                eprintln!("{USAGE}");
                std::process::exit(2);
            }
        }
        let per_request = start.elapsed().as_nanos() as f64 / n.max(1) as f64;
        println!("REQUESTS mode={mode} n={n} prefill={prefill} ns_per_request={per_request:.0}");
    });
}
