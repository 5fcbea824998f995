//! Fault injection, one binary: the runtime and the projections on a store
//! whose reads, appends and saves fail on purpose (`annals::testing`).

mod common;

#[path = "faults/projection.rs"]
mod projection;
#[path = "faults/runtime.rs"]
mod runtime;
