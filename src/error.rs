//! Errors, one enum per boundary, so that a caller can tell apart bad input,
//! a concurrency conflict, a failing store, undecodable data and the
//! domain's own rejections. Every enum converts into the umbrella
//! [`Error`](crate::Error). Nothing here names a type of a layer above the
//! store (the projection handle's error is beside the projection).

use std::path::PathBuf;
use std::sync::Arc;

use uuid::Uuid;

use crate::event::{ExpectedVersion, Position, StreamId, Version};

/// Input refused before anything was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidInput {
    /// A name (stream id, event type, checkpoint name, ...) was empty.
    #[error("{what} is empty")]
    EmptyName {
        /// Which kind of name.
        what: &'static str,
    },
    /// A name was longer than its documented maximum.
    #[error("{what} is {len} bytes, more than the maximum of {max}")]
    NameTooLong {
        /// Which kind of name.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// A name held a refused character (control characters are refused).
    #[error("{what} contains the refused character {character:?}")]
    InvalidCharacter {
        /// Which kind of name.
        what: &'static str,
        /// The refused character.
        character: char,
    },
    /// Stream ids starting with `$` are reserved for system streams.
    #[error("stream id {0:?} starts with '$', which is reserved")]
    ReservedStreamId(String),
    /// An append carried no events.
    #[error("an append must carry at least one event")]
    EmptyAppend,
    /// An append carried more events than allowed.
    #[error("an append carries {count} events, more than the maximum of {max}")]
    TooManyEvents {
        /// Events in the append.
        count: usize,
        /// The maximum.
        max: usize,
    },
    /// An event was larger than the store's maximum event size.
    #[error("an event is {size} bytes, more than the maximum of {max} (raise it with {setting})")]
    EventTooLarge {
        /// The event's size.
        size: usize,
        /// The maximum.
        max: usize,
        /// The setting that raises the maximum, e.g.
        /// `"SledStoreConfig::max_event_size"`.
        setting: &'static str,
    },
    /// The same event id appeared twice in one append.
    #[error("event id {0} appears twice in one append")]
    DuplicateEventIdInAppend(Uuid),
    /// A read limit of zero.
    #[error("a read limit must be at least 1")]
    ZeroLimit,
    /// A setting was below its minimum.
    #[error("{what} is {value}, less than the minimum of {min}")]
    TooSmall {
        /// Which setting.
        what: &'static str,
        /// The value given.
        value: u64,
        /// The minimum.
        min: u64,
    },
    /// A setting was above its maximum.
    #[error("{what} is {value}, more than the maximum of {max}")]
    TooLarge {
        /// Which setting.
        what: &'static str,
        /// The value given.
        value: u64,
        /// The maximum.
        max: u64,
    },
    /// A name is reserved for the store's own use (for example a read-model
    /// tree named like one of the store's trees).
    #[error("{what} {name:?} is reserved")]
    ReservedName {
        /// Which kind of name.
        what: &'static str,
        /// The refused name.
        name: String,
    },
}

/// A failure of the storage itself (I/O, corruption, a closed store).
/// The operation may not have happened; for appends, see [`AppendError`].
///
/// Cloning keeps every variant; an I/O error is cloned as one of the same
/// kind and message (`std::io::Error` is not `Clone`), as sled does.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend (sled, a database driver, ...) reported an error; it is
    /// kept as the source.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// An I/O error outside sled (for example the fdatasync of its files).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A stored record did not decode: the store's files are damaged.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The path holds an annals store of another format version.
    #[error("store format version {found}, this build reads version {expected}")]
    FormatMismatch {
        /// The version found on disk.
        found: u32,
        /// The version this build reads.
        expected: u32,
    },
    /// Another store (of this process or another) has the directory open;
    /// it stays locked until that store is shut down or dropped.
    #[error("{} is in use: another process or store handle has it open", path.display())]
    InUse {
        /// The store's directory.
        path: PathBuf,
    },
    /// The path holds something that is not an annals store.
    #[error("{0} does not hold an annals store")]
    NotAStore(String),
    /// The filesystem is too full to commit safely; nothing was written.
    /// Appends succeed again once space is freed; the store stays usable.
    #[error("the disk is full: {available} bytes free, {needed} needed")]
    DiskFull {
        /// Bytes free on the store's filesystem.
        available: u64,
        /// Bytes the group commit needed (its size plus the reserve).
        needed: u64,
    },
    /// The log sled recovered ends before the last position the store had
    /// acknowledged as durable: its files were damaged (a flipped byte makes
    /// sled stop recovering at the damaged record) or replaced by an older
    /// copy. Nothing was changed. Opening with
    /// `SledStoreConfig::accept_lost_events(true)` accepts the loss.
    #[error(
        "the store had acknowledged events up to position {} but only {} were recovered: \
         its files are damaged; open with accept_lost_events to accept the loss",
        acknowledged.0, recovered.0
    )]
    ShorterThanAcknowledged {
        /// The last position acknowledged before.
        acknowledged: Position,
        /// The last position found in the log.
        recovered: Position,
    },
    /// The store was shut down.
    #[error("the store is shut down")]
    Closed,
    /// An earlier write failed part-way through a flush; the store refuses
    /// further writes until it is reopened, because what is on disk is not
    /// known (the same policy as PostgreSQL after a failed fsync).
    #[error("the store failed an earlier flush and must be reopened: {0}")]
    Poisoned(String),
    /// A name or argument was refused.
    #[error(transparent)]
    InvalidInput(#[from] InvalidInput),
    /// A read-model commit was fenced off: the stored checkpoint was no
    /// longer the one the committer started from (another runner moved it),
    /// so nothing was written.
    #[error("checkpoint {name:?} is at {found:?}, not {expected:?}: another runner moved it; nothing was written")]
    CheckpointMoved {
        /// The checkpoint's name.
        name: String,
        /// The checkpoint the commit expected (`None`: none stored).
        expected: Option<Position>,
        /// The checkpoint found.
        found: Option<Position>,
    },
    /// The connection to the server was lost after the commit may have
    /// reached it: the append may or may not be stored. Retrying it with the
    /// same event ids is safe: a stored append is answered with its original
    /// result, and nothing is written twice.
    #[error("the outcome of the commit is unknown: {0}")]
    OutcomeUnknown(String),
    /// A checkpoint write was fenced off: another process took the
    /// checkpoint's lease ([`EventStore::lease_checkpoint`](crate::store::EventStore::lease_checkpoint))
    /// since this one took it, so nothing was written.
    #[error("the lease of checkpoint {name:?} was taken by another process; nothing was written")]
    LeaseLost {
        /// The checkpoint's name.
        name: String,
    },
    /// The server could not take a lock in time (PostgreSQL's
    /// `lock_timeout`): another session held it, a hung transaction say.
    /// Nothing was written; trying again later is safe.
    #[error("a lock could not be taken in time; nothing was written: {0}")]
    Busy(String),
}

impl Clone for StoreError {
    fn clone(&self) -> Self {
        match self {
            StoreError::Backend(e) => StoreError::Backend(e.clone()),
            StoreError::Io(e) => StoreError::Io(std::io::Error::new(e.kind(), e.to_string())),
            StoreError::Corrupt(what) => StoreError::Corrupt(what.clone()),
            StoreError::FormatMismatch { found, expected } => StoreError::FormatMismatch {
                found: *found,
                expected: *expected,
            },
            StoreError::InUse { path } => StoreError::InUse { path: path.clone() },
            StoreError::NotAStore(what) => StoreError::NotAStore(what.clone()),
            StoreError::ShorterThanAcknowledged {
                acknowledged,
                recovered,
            } => StoreError::ShorterThanAcknowledged {
                acknowledged: *acknowledged,
                recovered: *recovered,
            },
            StoreError::DiskFull { available, needed } => StoreError::DiskFull {
                available: *available,
                needed: *needed,
            },
            StoreError::Closed => StoreError::Closed,
            StoreError::Poisoned(why) => StoreError::Poisoned(why.clone()),
            StoreError::InvalidInput(e) => StoreError::InvalidInput(e.clone()),
            StoreError::CheckpointMoved {
                name,
                expected,
                found,
            } => StoreError::CheckpointMoved {
                name: name.clone(),
                expected: *expected,
                found: *found,
            },
            StoreError::OutcomeUnknown(why) => StoreError::OutcomeUnknown(why.clone()),
            StoreError::LeaseLost { name } => StoreError::LeaseLost { name: name.clone() },
            StoreError::Busy(why) => StoreError::Busy(why.clone()),
        }
    }
}

/// A backend's own error inside a [`StoreError::Backend`]: the backend's
/// name and its error, kept as the [`source`](std::error::Error::source)
/// (shared, so that [`StoreError`] stays `Clone`). Backends written outside
/// the crate report their failures with [`BackendError::new`].
#[derive(Debug, Clone)]
pub struct BackendError {
    backend: &'static str,
    error: Arc<dyn std::error::Error + Send + Sync>,
}

impl BackendError {
    /// `backend`'s `error` (a name such as `"sled"` or `"postgres"`).
    pub fn new(
        backend: &'static str,
        error: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            backend,
            error: Arc::from(error.into()),
        }
    }

    /// The name of the backend that failed.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// The backend's error, if it is an `E`.
    pub fn downcast_ref<E: std::error::Error + 'static>(&self) -> Option<&E> {
        self.error.downcast_ref::<E>()
    }
}

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.backend, self.error)
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.error)
    }
}

/// The message of a caught panic (its `&str` or `String` payload).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

/// `Ok` when `value` is at least 1, else [`InvalidInput::TooSmall`] for
/// the setting `what`.
pub(crate) fn at_least_one(what: &'static str, value: u64) -> Result<(), InvalidInput> {
    if value == 0 {
        Err(InvalidInput::TooSmall {
            what,
            value,
            min: 1,
        })
    } else {
        Ok(())
    }
}

/// Why an append failed. Except for [`AppendError::Store`], nothing was
/// written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// The stream was not at the expected version (a concurrency conflict).
    #[error("stream {stream}: expected version {expected:?}, actual {actual}")]
    WrongExpectedVersion {
        /// The stream.
        stream: StreamId,
        /// What the caller expected.
        expected: ExpectedVersion,
        /// The stream's actual version.
        actual: Version,
    },
    /// Some but not all of the append's event ids are already stored, or an
    /// id is stored on another stream or at another version: the append is
    /// neither new nor a retry of an earlier one.
    #[error("event id {event_id} is already stored ({reason})")]
    DuplicateEventId {
        /// The offending id.
        event_id: Uuid,
        /// Why the append is not an idempotent retry.
        reason: &'static str,
    },
    /// The input was refused; nothing was written.
    #[error(transparent)]
    InvalidInput(#[from] InvalidInput),
    /// The store failed. For the sled store this means the batch was not
    /// acknowledged: either it was not written or the store is poisoned.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a read failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The input was refused.
    #[error(transparent)]
    InvalidInput(#[from] InvalidInput),
    /// The store failed or a record is corrupt.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Encoding or decoding failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The value could not be encoded.
    #[error("cannot encode {what}: {message}")]
    Encode {
        /// What was being encoded.
        what: String,
        /// postcard's message.
        message: String,
    },
    /// The bytes did not decode.
    #[error("cannot decode {what}: {message}")]
    Decode {
        /// What was being decoded.
        what: String,
        /// postcard's message.
        message: String,
    },
    /// A stored event's type is neither one of the event enum's variants
    /// nor a name renamed to one ([`Upcasters::rename`](crate::codec::Upcasters::rename)).
    /// The event stays in the log untouched; the aggregate or projection
    /// that reads it cannot go on until the event type knows the name.
    #[error(
        "stream {stream_id} version {version}: unknown event type {event_type:?} \
         (a renamed variant? register the old name with Upcasters::rename)"
    )]
    UnknownEventType {
        /// The stream of the event.
        stream_id: StreamId,
        /// The event's version in its stream.
        version: Version,
        /// The stored name.
        event_type: String,
    },
    /// As [`CodecError::UnknownEventType`], from
    /// [`decode_event_parts`](crate::codec::decode_event_parts), whose bare parts
    /// name no stream and no version.
    #[error(
        "unknown event type {event_type:?} \
         (a renamed variant? register the old name with Upcasters::rename)"
    )]
    UnknownEventTypeName {
        /// The stored name.
        event_type: String,
    },
    /// No upcaster leads from the stored schema version to the current one.
    #[error(
        "event type {event_type:?}: no upcaster from schema version {found} (current {current})"
    )]
    NoUpcaster {
        /// The stored name.
        event_type: String,
        /// The stored schema version.
        found: u16,
        /// The current schema version.
        current: u16,
    },
}

/// Why [`Aggregates::execute`](crate::Aggregates::execute) did not commit a
/// command. [`CommandError::Domain`] is the domain's own refusal; every
/// other variant is the infrastructure's.
///
/// Unless said otherwise, nothing was stored. The exceptions are
/// [`CommandError::Timeout`] and, for some store failures,
/// [`CommandError::Store`]: the outcome is then unknown and the stream tells.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError<E: std::error::Error + 'static> {
    /// The domain refused the command ([`crate::Aggregate::handle`] returned
    /// an error). Nothing was stored.
    #[error("the command was refused: {0}")]
    Domain(#[source] E),
    /// Another writer kept appending to the stream: every attempt (the first
    /// plus the configured retries, each after catching up) met a newer
    /// version. Nothing was stored.
    #[error("stream {stream}: still in conflict after {attempts} attempts")]
    Conflict {
        /// The stream.
        stream: StreamId,
        /// How many times the command was decided and appended.
        attempts: u32,
    },
    /// The aggregate already had its maximum of pending commands; the command
    /// was refused at once, without queueing. Nothing was stored.
    #[error("stream {stream}: {pending} commands pending, the maximum")]
    Overloaded {
        /// The stream.
        stream: StreamId,
        /// The configured maximum of pending commands.
        pending: usize,
    },
    /// No answer within the command timeout. A command that had not started
    /// by then is dropped unrun; one that had started may still commit, so
    /// the outcome is unknown ([`CommandError::is_outcome_unknown`]): retry
    /// it with the same command id.
    #[error("stream {stream}: no answer within {after:?}; the outcome is unknown (retrying with the same command id is safe)")]
    Timeout {
        /// The stream.
        stream: StreamId,
        /// The configured timeout.
        after: std::time::Duration,
    },
    /// The aggregate's code panicked in `handle` or `apply`. Nothing of this
    /// command was stored (its events are applied to a copy before they are
    /// stored). The actor was retired; the next command reloads the
    /// aggregate from the store.
    #[error("stream {stream}: the aggregate panicked: {message}")]
    AggregatePanicked {
        /// The stream.
        stream: StreamId,
        /// The panic's message.
        message: String,
    },
    /// The store failed to read or write. For a failed append, the sled store
    /// guarantees nothing was acknowledged; see [`AppendError::Store`].
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The store refused the append for a reason other than a conflict.
    #[error(transparent)]
    Append(AppendError),
    /// An event or the state did not encode or a stored event did not
    /// decode. Nothing of this command was stored.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The aggregate id or an event was refused (too long, too large, ...).
    #[error(transparent)]
    InvalidInput(#[from] InvalidInput),
    /// The caller gave the version it expected the stream at
    /// ([`crate::CommandContext::expected_version`]) and the stream is at
    /// another: it moved since the caller looked. Not retried; nothing was
    /// stored.
    #[error("stream {stream}: expected version {expected}, but it is at {actual}")]
    WrongExpectedVersion {
        /// The stream.
        stream: StreamId,
        /// The version the caller expected.
        expected: Version,
        /// The version the stream was found at.
        actual: Version,
    },
    /// The aggregate type cannot be used on this runtime (see
    /// [`CategoryError`]). Nothing was stored.
    #[error(transparent)]
    Category(#[from] CategoryError),
    /// The runtime was shut down.
    #[error("the runtime is shut down")]
    ShutDown,
    /// The command's id ([`crate::CommandContext::with_command_id`]) already
    /// ran on this aggregate for another command (its stored fingerprint
    /// differs from this command's). Nothing was stored.
    #[error("stream {stream}: command id {command_id} was already used for another command")]
    CommandIdReused {
        /// The stream.
        stream: StreamId,
        /// The reused command id.
        command_id: Uuid,
    },
}

impl<E: std::error::Error + 'static> CommandError<E> {
    /// Whether the command may or may not have been stored: a
    /// [`CommandError::Timeout`], or a store that lost its connection after
    /// the commit may have reached it ([`StoreError::OutcomeUnknown`]).
    /// Sending it again with the same command id
    /// ([`crate::CommandContext::with_command_id`]) is then safe: a command
    /// that was stored answers with its original outcome and stores nothing
    /// new; one that was not runs now.
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(
            self,
            CommandError::Timeout { .. }
                | CommandError::Store(StoreError::OutcomeUnknown(_))
                | CommandError::Append(AppendError::Store(StoreError::OutcomeUnknown(_)))
        )
    }
}

/// Why an aggregate type was refused by a runtime, when it was first used
/// ([`crate::Runtime::try_aggregates`]): its streams would not be its own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CategoryError {
    /// The category contains `-`, the separator of category and id: its
    /// streams (`a-b-42`) would belong to category `a`.
    #[error("aggregate {aggregate}: category {category:?} contains '-', the category separator")]
    ContainsSeparator {
        /// The aggregate type's name.
        aggregate: &'static str,
        /// Its category.
        category: &'static str,
    },
    /// The category is not a valid stream id prefix (empty, starting with
    /// `$`, a control character, too long).
    #[error("aggregate {aggregate}: category {category:?} is not a valid stream prefix: {source}")]
    Invalid {
        /// The aggregate type's name.
        aggregate: &'static str,
        /// Its category.
        category: &'static str,
        /// Why.
        source: InvalidInput,
    },
    /// Another aggregate type already uses this category on this runtime:
    /// both would write the same streams.
    #[error("aggregate {refused}: category {category:?} is already used by {registered}")]
    Shared {
        /// The category.
        category: &'static str,
        /// The type that used it first.
        registered: &'static str,
        /// The type refused.
        refused: &'static str,
    },
}

/// Why [`Aggregates::state`](crate::Aggregates::state) or
/// [`Aggregates::state_at`](crate::Aggregates::state_at) gave no state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// The stream has not reached the requested version.
    #[error("stream {stream} is at version {current}, version {requested} does not exist")]
    VersionNotFound {
        /// The stream.
        stream: StreamId,
        /// The version asked for.
        requested: Version,
        /// The stream's version.
        current: Version,
    },
    /// The aggregate panicked while rebuilding its state.
    #[error("stream {stream}: the aggregate panicked: {message}")]
    AggregatePanicked {
        /// The stream.
        stream: StreamId,
        /// The panic's message.
        message: String,
    },
    /// The aggregate had its maximum of pending commands.
    #[error("stream {stream}: {pending} commands pending, the maximum")]
    Overloaded {
        /// The stream.
        stream: StreamId,
        /// The configured maximum of pending commands.
        pending: usize,
    },
    /// No answer within the command timeout.
    #[error("stream {stream}: no answer within {after:?}")]
    Timeout {
        /// The stream.
        stream: StreamId,
        /// The configured timeout.
        after: std::time::Duration,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored event did not decode.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The aggregate id was refused.
    #[error(transparent)]
    InvalidInput(#[from] InvalidInput),
    /// The aggregate type cannot be used on this runtime (see
    /// [`CategoryError`]).
    #[error(transparent)]
    Category(#[from] CategoryError),
    /// The runtime was shut down.
    #[error("the runtime is shut down")]
    ShutDown,
}

/// Why a [`Subscription`](crate::projection::Subscription) could not deliver its next
/// event. The subscription keeps its place: the next call retries from the
/// same position, so an error never causes a gap.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubscriptionError {
    /// Reading the log failed.
    #[error(transparent)]
    Read(#[from] ReadError),
}

/// Why a projection's handler did not apply an event. The projection's
/// [`FailurePolicy`](crate::projection::FailurePolicy) decides what happens next; no
/// failure is ever skipped silently.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError {
    /// The handler refused or failed, for its own reasons.
    #[error("projection handler failed: {0}")]
    Handler(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The event did not decode as the projection's event type.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The store or the read model's sled trees failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The handler named a read-model tree it did not declare.
    #[error("read-model tree {0:?} is not one of the projection's trees")]
    UnknownTree(String),
    /// The handler panicked; the panic was caught and handled as a failure.
    #[error("projection handler panicked: {0}")]
    Panicked(String),
}

/// Why reading a committed read model failed (see
/// [`SledStore::read_model`](crate::SledStore::read_model)).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadModelError {
    /// The tree name is empty or belongs to the store (`log`, `snapshots`,
    /// `checkpoints`, ...): readers get no access to the store's own trees.
    #[error(transparent)]
    InvalidInput(#[from] InvalidInput),
    /// A stored key or value did not decode as the requested type.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The store failed, or was shut down ([`StoreError::Closed`]).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ProjectionError {
    /// Wraps any error (or message) of the handler's own.
    pub fn handler(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        ProjectionError::Handler(error.into())
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("connection reset")]
    struct DriverError;

    #[test]
    fn a_backend_error_keeps_its_backend_and_source_through_clones() {
        let error = StoreError::from(BackendError::new("postgres", DriverError));
        let cloned = error.clone();
        for error in [&error, &cloned] {
            assert_eq!(error.to_string(), "postgres: connection reset");
            let StoreError::Backend(backend) = error else {
                panic!("expected Backend, got {error:?}");
            };
            assert_eq!(backend.backend(), "postgres");
            assert!(backend.downcast_ref::<DriverError>().is_some());
            assert!(backend.downcast_ref::<std::io::Error>().is_none());
            let source = backend.source().expect("the driver's error is the source");
            assert_eq!(source.to_string(), "connection reset");
        }
    }

    #[test]
    fn in_use_names_the_path() {
        let error = StoreError::InUse {
            path: PathBuf::from("/var/lib/orders"),
        };
        let message = error.to_string();
        assert!(message.contains("/var/lib/orders"), "{message}");
        assert!(message.contains("another process"), "{message}");
    }
}
