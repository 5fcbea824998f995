//! The store's tests, one binary (one link step) for the area: the
//! conformance suite on every backend (`backends`), concurrency, reopening,
//! limits, decoders fed damaged records, damaged files, a model check, and
//! the refusal to open a log shorter than it acknowledged.

#[path = "common/chunks.rs"]
mod chunks;
mod common;
#[macro_use]
#[path = "common/conformance.rs"]
mod conformance;
#[path = "common/outside_store.rs"]
mod outside_store;
mod pg_support;

#[path = "store/acknowledged.rs"]
mod acknowledged;
#[path = "store/backends.rs"]
mod backends;
#[path = "store/concurrency.rs"]
mod concurrency;
#[path = "store/corruption.rs"]
mod corruption;
#[path = "store/decoders.rs"]
mod decoders;
#[path = "store/id_index.rs"]
mod id_index;
#[path = "store/limits.rs"]
mod limits;
#[path = "store/model.rs"]
mod model;
#[path = "store/reopen.rs"]
mod reopen;
#[path = "store/stream_index.rs"]
mod stream_index;
#[path = "store/upgrade.rs"]
mod upgrade;
