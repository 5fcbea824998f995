//! The one error of the operations layer: a store's error, or what is wrong
//! with an export file or with importing it.

use std::path::PathBuf;

use crate::error::{InvalidInput, ReadError, StoreError};

/// Why an operation (`annals::ops`) failed.
///
/// Import refusals ([`OpsError::NotAtHead`], [`OpsError::Diverged`],
/// [`OpsError::Refused`], [`OpsError::BadFile`]) are found before the
/// batch concerned is written: the target then holds whole batches only,
/// a gapless prefix that a second import of the same file continues.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpsError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An argument was refused.
    #[error(transparent)]
    InvalidInput(#[from] InvalidInput),
    /// A checkpoint cannot be set past the store's head.
    #[error("position {position} is past the store's head {head}")]
    PastHead {
        /// The position asked for.
        position: u64,
        /// The head.
        head: u64,
    },
    /// Reading or writing the export file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The export file is damaged, truncated or not an export file; nothing
    /// of it was imported.
    #[error("{}: {reason} (at byte {offset})", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// Where in the file.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The export file exists and no resume was asked for.
    #[error("{} exists; resume the export or choose another file", .0.display())]
    FileExists(PathBuf),
    /// The file's events do not continue the target store: it holds events
    /// up to `head` and the file starts at `first_position`.
    #[error(
        "the store holds events up to position {head}; the file starts at {first_position}: \
         an import must continue exactly at the store's head"
    )]
    NotAtHead {
        /// The target store's head.
        head: u64,
        /// The file's first position.
        first_position: u64,
    },
    /// The store and the file (or, on a resumed export, the source store and
    /// the file) hold different events at the same position.
    #[error("position {position} differs between the store and the file: {reason}")]
    Diverged {
        /// The position.
        position: u64,
        /// What differs.
        reason: String,
    },
    /// An event of the file cannot continue the store (a version or
    /// position out of sequence, an id stored already, an invalid name);
    /// its batch was not written.
    #[error("the event at position {position} was refused: {reason}")]
    Refused {
        /// The event's position.
        position: u64,
        /// Why.
        reason: String,
    },
}

impl From<ReadError> for OpsError {
    fn from(error: ReadError) -> Self {
        match error {
            ReadError::InvalidInput(e) => OpsError::InvalidInput(e),
            ReadError::Store(e) => OpsError::Store(e),
        }
    }
}

impl From<crate::store::bulk::BulkError> for OpsError {
    fn from(error: crate::store::bulk::BulkError) -> Self {
        match error {
            crate::store::bulk::BulkError::Store(e) => OpsError::Store(e),
            crate::store::bulk::BulkError::Refused { position, reason } => {
                OpsError::Refused { position, reason }
            }
        }
    }
}
