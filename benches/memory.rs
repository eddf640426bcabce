//! Resident memory of a `MemoryStore` holding many records of a 1 KiB response, as a ratio to
//! the response bodies it keeps.
//!
//! ```text
//! cargo bench --bench memory [-- --records 100000 --body-bytes 1024]
//! ```
//!
//! The resident set is read from `/proc/self/statm` before the store is filled and after; the
//! records are stored through the same `claim` and `complete` steps the service takes.

#![allow(missing_docs)]

use std::{process::ExitCode, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tower_idempotency::{
    IdempotencyKey,
    store::{Claim, Fingerprint, KeyStore, MemoryStore, Record, StoreKey},
};

/// The resident set in bytes (Linux only), with the page size the kernel uses for it.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size()?)
}

/// The page size, from `/proc/self/smaps` (the `KernelPageSize` of the first mapping).
fn page_size() -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let line = smaps.lines().find(|l| l.starts_with("KernelPageSize:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn main() -> ExitCode {
    let mut records = 100_000usize;
    let mut body_bytes = 1024usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().and_then(|v| v.parse().ok());
        match (arg.as_str(), value) {
            ("--records", Some(v)) => records = v,
            ("--body-bytes", Some(v)) => body_bytes = v,
            ("--bench", _) => {}
            _ => {
                eprintln!("usage: memory [--records N] [--body-bytes N]");
                return ExitCode::from(2);
            }
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");

    // The response as the service stores it: status, the example server's headers, the body.
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::LOCATION,
        HeaderValue::from_static("/orders/0c9f3d1e-8a5b-4c47-9a0e-3f2b6d7e1a40"),
    );
    let fingerprint = Fingerprint::from_bytes([7; 32]);
    let record = Record::response(
        fingerprint,
        StatusCode::CREATED,
        headers,
        Bytes::from(vec![b'x'; body_bytes]),
        None,
    );
    let keys: Vec<StoreKey> = (0..records)
        .map(|i| StoreKey::new(b"", &IdempotencyKey::new(format!("k-{i}")).expect("a key")))
        .collect();

    let store = MemoryStore::new();
    let Some(before) = resident_bytes() else {
        println!("memory: skipped, /proc/self/statm is not readable here");
        return ExitCode::SUCCESS;
    };
    rt.block_on(async {
        for key in &keys {
            let Ok(Claim::Claimed(token)) = store
                .claim(key, &fingerprint, Duration::from_secs(60))
                .await
            else {
                panic!("a fresh key is claimable")
            };
            store
                .complete(key, token, &record, Duration::from_secs(3600))
                .await
                .expect("stored");
        }
    });
    let after = resident_bytes().expect("readable once");
    assert_eq!(store.len(), records, "nothing evicted");

    let payload = (records * body_bytes) as u64;
    let grown = after.saturating_sub(before);
    let encoded = store.stored_bytes() as u64;
    println!(
        "MEMORY records={records} body_bytes={body_bytes} payload_mib={:.1} rss_growth_mib={:.1} ratio={:.2} encoded_mib={:.1} encoded_ratio={:.2} per_record_bytes={}",
        payload as f64 / 1048576.0,
        grown as f64 / 1048576.0,
        grown as f64 / payload as f64,
        encoded as f64 / 1048576.0,
        encoded as f64 / payload as f64,
        grown / records as u64,
    );
    drop(store);
    ExitCode::SUCCESS
}
