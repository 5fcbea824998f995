//! The projection layer's own errors: the handle's, which names the
//! projection's state, and a batch handler's partial failure. They sit
//! beside the projection rather than in `crate::error`, which names no type
//! of a layer above the store.

use crate::error::{InvalidInput, ProjectionError, ReadError, StoreError};
use crate::event::Position;
use crate::projection::ProjectionState;

/// Why an operation on a [`ProjectionHandle`](crate::ProjectionHandle)
/// failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionControlError {
    /// `wait_for` gave up: the projection had not processed the position in
    /// time. It keeps running.
    #[error("projection {name:?} did not reach position {target} within {timeout:?} (it is at {reached})")]
    Timeout {
        /// The projection's name.
        name: String,
        /// The position waited for.
        target: Position,
        /// The position it had reached.
        reached: Position,
        /// How long the caller waited.
        timeout: std::time::Duration,
    },
    /// The projection is stopped or failed, so it will not get there (or
    /// cannot do what was asked) until it is resumed or restarted.
    #[error("projection {name:?} is {state:?}{}", last_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default())]
    NotRunning {
        /// The projection's name.
        name: String,
        /// Its state.
        state: ProjectionState,
        /// Its last error, if any.
        last_error: Option<String>,
    },
    /// The name or configuration was refused.
    #[error(transparent)]
    InvalidInput(#[from] InvalidInput),
    /// The checkpoint could not be loaded.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The checkpoint or read model could not be saved.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The projection's own reset hook failed.
    #[error(transparent)]
    Projection(#[from] ProjectionError),
    /// A projection of this name already runs on this store in this process,
    /// or (on a store that several processes share, such as PostgreSQL) in
    /// another process, which holds the checkpoint's lease; two would
    /// overwrite each other's checkpoint.
    #[error("a projection named {name:?} already runs on this store")]
    AlreadyRunning {
        /// The name.
        name: String,
    },
    /// The actor could not be started.
    #[error("cannot start the projection actor: {0}")]
    Spawn(String),
}

/// Why a batch handler ([`Projection::handle_batch`](crate::Projection::handle_batch),
/// [`TypedProjection::handle_batch`](crate::TypedProjection::handle_batch))
/// stopped early: how many events of the batch, from the first, it
/// applied, and the error of the next one, which goes to the failure
/// policy.
#[derive(Debug)]
#[non_exhaustive]
pub struct BatchFailure {
    /// Events applied before the failing one; less than the batch's length
    /// (a larger count is taken as all but the last event).
    pub applied: usize,
    /// The failing event's error.
    pub error: ProjectionError,
}

impl BatchFailure {
    /// `applied` events were applied, then the next one failed with
    /// `error`.
    pub fn new(applied: usize, error: impl Into<ProjectionError>) -> Self {
        Self {
            applied,
            error: error.into(),
        }
    }
}
