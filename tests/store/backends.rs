//! The store conformance suite (written once in `common/conformance.rs`)
//! run against every backend: sled, memory, the fault-injecting wrapper
//! with no faults planned, a store written outside the crate with only
//! the public API (`common/outside_store.rs`), and PostgreSQL (bare and
//! wrapped; `ANNALS_PG=off` skips those).

use crate::outside_store;
use crate::pg_support;

use std::sync::Arc;

use crate::conformance::{Backend, Limits, Opening};
use annals::store::SledStoreConfig;
use annals::testing::{FaultPlan, FaultyStore};
use annals::{MemoryStore, SledStore};
use outside_store::OutsideStore;

fn memory(limits: Limits) -> Opening {
    let store = MemoryStore::with_limits(limits.max_event_size, limits.live_feed_capacity)
        .expect("the suite's limits are valid");
    Box::pin(async move { Backend::new(store, None) })
}

fn open_sled(limits: Limits) -> (SledStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = SledStoreConfig::new(dir.path().join("store"))
        .max_event_size(limits.max_event_size)
        .live_feed_capacity(limits.live_feed_capacity);
    let store = SledStore::open_with(config).expect("open sled store");
    (store, dir)
}

fn sled(limits: Limits) -> Opening {
    let (store, dir) = open_sled(limits);
    Box::pin(async move { Backend::new(store, Some(Box::new(dir))) })
}

/// The fault-injecting test wrapper with no faults planned, around a sled
/// store: it must be invisible to every caller.
fn fault_free_wrapper(limits: Limits) -> Opening {
    let (store, dir) = open_sled(limits);
    let store = FaultyStore::new(Arc::new(store), FaultPlan::none());
    Box::pin(async move { Backend::new(store, Some(Box::new(dir))) })
}

/// A store implemented in this test with the public API only.
fn outside(limits: Limits) -> Opening {
    let store = OutsideStore::new(limits.max_event_size, limits.live_feed_capacity);
    Box::pin(async move { Backend::new(store, None) })
}

/// A PostgreSQL store on a fresh schema of the test server (see
/// `pg_support`: `ANNALS_PG_URL`, `ANNALS_PG=off`).
fn postgres(limits: Limits) -> Opening {
    let config = pg_support::config()
        .max_event_size(limits.max_event_size)
        .live_feed_capacity(limits.live_feed_capacity);
    let store = pg_support::open(config);
    Box::pin(async move { Backend::new(store, None) })
}

/// The fault-injecting wrapper with no faults planned, around PostgreSQL.
fn postgres_fault_free_wrapper(limits: Limits) -> Opening {
    let config = pg_support::config()
        .max_event_size(limits.max_event_size)
        .live_feed_capacity(limits.live_feed_capacity);
    let store = FaultyStore::new(Arc::new(pg_support::open(config)), FaultPlan::none());
    Box::pin(async move { Backend::new(store, None) })
}

conformance_suite!(memory_store, super::memory);
conformance_suite!(sled_store, super::sled);
conformance_suite!(fault_free_wrapper, super::fault_free_wrapper);
conformance_suite!(outside_store_conformance, super::outside);
conformance_suite!(
    postgres_store,
    super::postgres,
    skip_if = crate::pg_support::disabled
);
conformance_suite!(
    postgres_fault_free_wrapper_conformance,
    super::postgres_fault_free_wrapper,
    skip_if = crate::pg_support::disabled
);
