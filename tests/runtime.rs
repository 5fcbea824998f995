//! The runtime's tests, one binary (one link step) for the area:
//! backpressure, command ids (exactly-once commands), concurrency,
//! conflicts, features, idle aggregates, panics, passivation, recovery,
//! shutdown and tracing.

mod common;
mod pg_support;

#[path = "runtime/backpressure.rs"]
mod backpressure;
#[path = "runtime/command_ids.rs"]
mod command_ids;
#[path = "runtime/concurrency.rs"]
mod concurrency;
#[path = "runtime/conflicts.rs"]
mod conflicts;
#[path = "runtime/features.rs"]
mod features;
#[path = "runtime/idle.rs"]
mod idle;
#[path = "runtime/panics.rs"]
mod panics;
#[path = "runtime/passivation.rs"]
mod passivation;
#[path = "runtime/recovery.rs"]
mod recovery;
#[path = "runtime/shutdown.rs"]
mod shutdown;
#[path = "runtime/traces.rs"]
mod traces;
