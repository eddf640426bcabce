//! Idempotency keys for tower.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod key;
pub mod server;
pub mod store;

pub use key::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, IdempotencyKey, InvalidKey};
pub use server::{IdempotencyService, IdempotencyServiceLayer};
