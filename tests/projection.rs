//! The projections' tests, one binary (one link step) for the area:
//! batches, control through the handle, a `kill -9` crash test (the binary
//! re-runs itself), lag, read models, rebuilds and the catch-up/live switch.

mod common;

#[path = "projection/batch.rs"]
mod batch;
#[path = "projection/control.rs"]
mod control;
#[path = "projection/crash.rs"]
mod crash;
#[path = "projection/lag.rs"]
mod lag;
#[path = "projection/read_model.rs"]
mod read_model;
#[path = "projection/rebuild.rs"]
mod rebuild;
#[path = "projection/switch.rs"]
mod switch;
