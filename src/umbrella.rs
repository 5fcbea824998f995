//! The umbrella [`Error`], for callers that only pass errors on: it names
//! the error of every layer, so it sits above all of them (each layer's own
//! errors are in `crate::error`, or beside the layer when they name its
//! types).

use crate::error::{
    AppendError, CodecError, InvalidInput, ProjectionError, QueryError, ReadError, ReadModelError,
    StoreError, SubscriptionError,
};
use crate::projection::ProjectionControlError;

/// The umbrella error: any error of any layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// See [`InvalidInput`].
    #[error(transparent)]
    InvalidInput(#[from] InvalidInput),
    /// See [`StoreError`].
    #[error(transparent)]
    Store(#[from] StoreError),
    /// See [`AppendError`].
    #[error(transparent)]
    Append(#[from] AppendError),
    /// See [`ReadError`].
    #[error(transparent)]
    Read(#[from] ReadError),
    /// See [`CodecError`].
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// See [`QueryError`].
    #[error(transparent)]
    Query(#[from] QueryError),
    /// See [`SubscriptionError`].
    #[error(transparent)]
    Subscription(#[from] SubscriptionError),
    /// See [`ProjectionError`].
    #[error(transparent)]
    Projection(#[from] ProjectionError),
    /// See [`ProjectionControlError`].
    #[error(transparent)]
    ProjectionControl(#[from] ProjectionControlError),
    /// See [`ReadModelError`].
    #[error(transparent)]
    ReadModel(#[from] ReadModelError),
}
