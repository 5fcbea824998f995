//! Operating a store: what the `annals` command-line tool does, as library
//! calls a service can make itself. [`stats`] and [`streams`] summarize the
//! log; [`verify`] checks its invariants end to end and reports every
//! violation precisely; [`export`] and [`import`] copy a log between stores
//! (sled and PostgreSQL, either way) through a documented, versioned,
//! checksummed file, preserving ids, versions, positions, timestamps and
//! metadata; [`set_checkpoint`] and [`delete_checkpoint`] rewind or reset a
//! projection offline; [`verify_aggregate`] checks a user's aggregate type
//! (every snapshot equal to a full replay), which the tool itself cannot
//! know. The backend-specific facts come through the [`Inspect`] trait,
//! which both of the crate's durable stores implement.

mod aggregate;
#[cfg(feature = "cli")]
pub mod cli;
mod error;
mod inspect;
mod stats;
mod transfer;
mod verify;

pub use self::aggregate::{verify_aggregate, AggregateCheck, AggregateMismatch};
pub use self::error::OpsError;
pub use self::inspect::{Inspect, SnapshotRecord};
pub use self::stats::{
    delete_checkpoint, set_checkpoint, stats, streams, CategorySummary, CheckpointSummary,
    StoreSummary, StreamSummary,
};
pub use self::transfer::{
    export, import, inspect_export, ExportFileSummary, ExportOptions, ExportSummary, ImportSummary,
    ImportTarget, SledImport, EXPORT_FORMAT_VERSION, EXPORT_MAGIC,
};
pub use self::verify::{verify, VerifyReport, Violation};
