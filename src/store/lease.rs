//! The checkpoint lease: the right to run the projection of one name in
//! every process that shares a store. A store shared by several processes
//! (PostgreSQL) hands one out to one process at a time and fences the
//! checkpoint writes of a holder that lost it; a store of one process (sled,
//! memory) hands out a lease that costs nothing, since the projection's
//! in-process name lease already excludes a second runner.

use std::fmt;

/// Held by a running projection for as long as it runs; dropping it gives
/// the right up. Returned by
/// [`EventStore::lease_checkpoint`](crate::store::EventStore::lease_checkpoint).
pub struct CheckpointLease {
    _guard: Option<Box<dyn Send + Sync + 'static>>,
    holder: String,
}

impl CheckpointLease {
    /// A lease of a store that needs none across processes (one process
    /// owns the store): nothing is held.
    pub fn local() -> Self {
        Self {
            _guard: None,
            holder: "this process".to_owned(),
        }
    }

    /// A lease held while `guard` lives: dropping the lease drops the guard,
    /// which must give the right up (for an outside backend: release its
    /// lock or row). `holder` says what holds it, for debugging.
    pub fn new(guard: impl Send + Sync + 'static, holder: impl Into<String>) -> Self {
        Self {
            _guard: Some(Box::new(guard)),
            holder: holder.into(),
        }
    }
}

impl fmt::Debug for CheckpointLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointLease")
            .field("holder", &self.holder)
            .finish_non_exhaustive()
    }
}
