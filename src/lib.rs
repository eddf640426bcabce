//! Idempotency keys for tower.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod client;
pub mod key;
pub mod store;

pub use client::IdempotencyLayer;
pub use key::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, IdempotencyKey, InvalidKey};
