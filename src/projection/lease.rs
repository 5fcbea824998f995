//! The name lease: one running projection per name and store in this
//! process, since two actors with one name would overwrite each other's
//! checkpoint; and, for a store shared by several processes, the store's
//! checkpoint lease on top, one runner per name across processes.

use std::sync::{Arc, OnceLock};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use crate::projection::ProjectionControlError;
use crate::store::{CheckpointLease, EventStore};

/// The projection names running in this process, per store: two actors with
/// one name would overwrite each other's checkpoint.
static RUNNING: OnceLock<DashMap<(usize, String), ()>> = OnceLock::new();

/// The right to run the projection `name` on one store, released when the
/// actor's state is dropped (at shutdown, or if the actor dies).
#[derive(Debug)]
pub(crate) struct NameLease {
    key: (usize, String),
    /// The store's lease across processes, when taken (see
    /// [`NameLease::acquire_everywhere`]).
    _store: Option<CheckpointLease>,
}

impl NameLease {
    pub(crate) fn acquire(
        store: &Arc<dyn EventStore>,
        name: &str,
    ) -> Result<Self, ProjectionControlError> {
        // The address identifies the store while any actor holds it.
        let key = (Arc::as_ptr(store).cast::<()>() as usize, name.to_owned());
        match RUNNING.get_or_init(DashMap::new).entry(key.clone()) {
            Entry::Occupied(_) => Err(ProjectionControlError::AlreadyRunning {
                name: name.to_owned(),
            }),
            Entry::Vacant(vacant) => {
                vacant.insert(());
                Ok(Self { key, _store: None })
            }
        }
    }

    /// The in-process lease, then the store's lease across processes
    /// ([`EventStore::lease_checkpoint`]). Taken before the checkpoint is
    /// read: a store that fences its previous holder lets that holder's
    /// last write land (or fail) before this one reads where to start.
    pub(crate) async fn acquire_everywhere(
        store: &Arc<dyn EventStore>,
        name: &str,
    ) -> Result<Self, ProjectionControlError> {
        let mut lease = Self::acquire(store, name)?;
        match store.lease_checkpoint(name).await? {
            Some(held) => {
                lease._store = Some(held);
                Ok(lease)
            }
            None => Err(ProjectionControlError::AlreadyRunning {
                name: name.to_owned(),
            }),
        }
    }
}

impl Drop for NameLease {
    fn drop(&mut self) {
        if let Some(running) = RUNNING.get() {
            running.remove(&self.key);
        }
    }
}
