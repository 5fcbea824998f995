//! Checkpoint leases across processes: a session advisory lock, held on a
//! connection of the lease's own, excludes a second holder while the first
//! lives (the server releases it when that connection ends, also when its
//! process is killed); an epoch per checkpoint in the `leases` table, moved
//! on by each new holder, fences the old holder's checkpoint writes.
//!
//! Why the old holder can never move the checkpoint once another process
//! took the lease: every checkpoint write of a holder (the read model's
//! commit, `save_checkpoint`) locks its `leases` row FOR SHARE and checks
//! its epoch in the same transaction; a new holder moves the epoch on with
//! an UPDATE of that row, which waits for such a transaction to end, and
//! reads the checkpoint only after. So each old write either committed
//! before the new holder read the checkpoint, or sees the new epoch and
//! writes nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_postgres::{Client, NoTls};

use super::backend;
use super::schema::Statements;
use crate::error::StoreError;
use crate::store::CheckpointLease;

/// The leases this store holds: checkpoint name to epoch.
#[derive(Debug, Default)]
pub(super) struct Leases {
    held: Mutex<HashMap<String, i64>>,
}

impl Leases {
    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The epoch of the lease of `name` this store holds, if it does.
    pub(super) fn epoch(&self, name: &str) -> Option<i64> {
        self.held().get(name).copied()
    }
}

/// A held lease: its connection (holding the advisory lock) and the entry
/// in [`Leases`], both given up on drop.
struct Held {
    name: String,
    epoch: i64,
    leases: Arc<Leases>,
    client: Option<Client>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut held = self.leases.held();
        if held.get(&self.name) == Some(&self.epoch) {
            held.remove(&self.name);
        }
        drop(held);
        // Dropping the client ends its connection task, which closes the
        // connection: the server then releases the advisory lock.
        drop(self.client.take());
    }
}

/// Tries to take the lease of `name`: `None` when another session holds
/// it. Runs on the store's runtime.
pub(super) async fn take(
    config: tokio_postgres::Config,
    statements: Arc<Statements>,
    leases: Arc<Leases>,
    schema: String,
    name: String,
) -> Result<Option<CheckpointLease>, StoreError> {
    let (client, connection) = config.connect(NoTls).await.map_err(backend)?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let key = format!("annals lease {schema} {name}");
    let taken = async {
        let locked: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
                &[&key],
            )
            .await
            .map_err(backend)?
            .get(0);
        if !locked {
            return Ok(None);
        }
        let epoch: i64 = client
            .query_one(&statements.take_lease, &[&name])
            .await
            .map_err(backend)?
            .get(0);
        Ok(Some(epoch))
    }
    .await;
    match taken {
        Ok(Some(epoch)) => {
            leases.held().insert(name.clone(), epoch);
            let holder = format!("{name} epoch {epoch}");
            Ok(Some(CheckpointLease::new(
                Held {
                    name,
                    epoch,
                    leases,
                    client: Some(client),
                },
                holder,
            )))
        }
        other => {
            drop(client);
            driver.abort();
            other.map(|_| None)
        }
    }
}
