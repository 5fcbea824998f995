//! The name lease: one running projection per name and store in this
//! process, since two actors with one name would overwrite each other's
//! checkpoint.

use std::sync::{Arc, OnceLock};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use crate::projection::ProjectionControlError;
use crate::store::EventStore;

/// The projection names running in this process, per store: two actors with
/// one name would overwrite each other's checkpoint.
static RUNNING: OnceLock<DashMap<(usize, String), ()>> = OnceLock::new();

/// The right to run the projection `name` on one store, released when the
/// actor's state is dropped (at shutdown, or if the actor dies).
#[derive(Debug)]
pub(crate) struct NameLease {
    key: (usize, String),
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
                Ok(Self { key })
            }
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
