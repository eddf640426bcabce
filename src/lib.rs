//! Idempotency keys for tower.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod key;
pub mod store;

pub use key::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, IdempotencyKey, InvalidKey};
