//! The read-model capability of a store: commit a read model's writes
//! together with its checkpoint, atomically and fenced, so that a projection
//! applies each event to the read model exactly once, even across crashes
//! and even when a second runner of the same read model appears.

mod key;

use std::future::Future;

use crate::error::StoreError;
use crate::event::Position;
use crate::store::EventStore;

pub use self::key::{FromKey, Key, Unordered};

/// A store that can commit a read model's writes with its checkpoint in one
/// transaction (the sled store: a multi-tree sled transaction; PostgreSQL:
/// one SQL transaction over the user's tables and the checkpoint row).
///
/// The protocol a runner follows, per batch of events:
/// [`begin`](ReadModelStore::begin) a transaction; let the handler write
/// into it, with a [`savepoint`](ReadModelStore::savepoint) before each event
/// where a failure must drop that event's writes alone
/// ([`rollback_to_savepoint`](ReadModelStore::rollback_to_savepoint));
/// then [`commit`](ReadModelStore::commit) it with the checkpoint moving from
/// where the runner last committed it to the batch's last position.
/// Dropping a transaction without committing writes nothing.
///
/// The checkpoint is the one of [`EventStore::load_checkpoint`]: the
/// same name and the same value.
pub trait ReadModelStore: EventStore {
    /// The open transaction a handler writes into: for the sled store a
    /// [`ReadModelBatch`](crate::projection::ReadModelBatch) that stages
    /// writes, for a SQL store the open transaction itself. Owned (no
    /// borrow of the store), so that a runner can keep it across awaits.
    type Transaction: Send + 'static;

    /// Opens a transaction for the read model `name` over `tables` (the sled
    /// store's trees; a SQL store may ignore them). Reads in the
    /// transaction see what is committed plus its own writes.
    ///
    /// # Errors
    /// [`StoreError::InvalidInput`] for a table name the store refuses (the
    /// sled store: empty, or one of its own trees), [`StoreError::Closed`]
    /// after shutdown, the backend's errors.
    fn begin(
        &self,
        name: &str,
        tables: &[String],
    ) -> impl Future<Output = Result<Self::Transaction, StoreError>> + Send;

    /// Keeps every write made in `transaction` so far: a later
    /// [`rollback_to_savepoint`](ReadModelStore::rollback_to_savepoint)
    /// drops only what was written after this call.
    ///
    /// # Errors
    /// The backend's errors; the transaction must then be dropped.
    fn savepoint(
        &self,
        transaction: &mut Self::Transaction,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Drops the writes made since the last savepoint (since `begin` if
    /// none); the transaction stays usable.
    ///
    /// # Errors
    /// The backend's errors; the transaction must then be dropped.
    fn rollback_to_savepoint(
        &self,
        transaction: &mut Self::Transaction,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Commits `transaction`'s writes and moves the checkpoint `name` from
    /// `from` to `to`, all or nothing. The commit is conditional: when the
    /// stored checkpoint is not `from` (`None`: no checkpoint stored), some
    /// other runner moved it, and the commit fails with
    /// [`StoreError::CheckpointMoved`] having written nothing. A runner that
    /// lost its right to run can thus never move the checkpoint nor write
    /// the read model.
    ///
    /// Once this returns, readers see the writes. They are durable once
    /// [`flush_read_models`](ReadModelStore::flush_read_models) returns
    /// after it (at once on a store whose commits are durable).
    ///
    /// # Errors
    /// [`StoreError::CheckpointMoved`], [`StoreError::InvalidInput`] for a
    /// bad checkpoint name, [`StoreError::Closed`] after shutdown, the
    /// backend's errors; in every case nothing was written.
    fn commit(
        &self,
        transaction: Self::Transaction,
        name: &str,
        from: Option<Position>,
        to: Position,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Makes every read-model commit so far durable, under the store's
    /// durability.
    ///
    /// # Errors
    /// The backend's errors, [`StoreError::Closed`] after shutdown.
    fn flush_read_models(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}
