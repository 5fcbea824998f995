//! The PostgreSQL store's read-model capability: a [`PostgresTransaction`]
//! is an open SQL transaction on a pooled connection, in which a read
//! model's handler writes its own tables; the commit moves the checkpoint
//! in the same transaction, fenced on the checkpoint the runner last
//! committed (and on the checkpoint's lease, when this store holds it), so
//! each event takes effect in the read model exactly once, across crashes
//! and across processes.

use std::fmt;

use deadpool_postgres::Object;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};

use super::reads::connection;
use super::{backend, bits, connection_lost, unbits, PostgresStore};
use crate::error::{InvalidInput, ProjectionError, StoreError};
use crate::event::Position;
use crate::store::{validate_checkpoint_name, ReadModelStore};

/// The savepoint a handler's writes roll back to; one at a time, moved on
/// by each [`ReadModelStore::savepoint`].
const SAVEPOINT: &str = "annals_event";

/// The store's own tables, which no read model may name.
const STORE_TABLES: [&str; 6] = [
    "format",
    "head",
    "events",
    "snapshots",
    "checkpoints",
    "leases",
];

/// An open transaction of a PostgreSQL read model: the handler of a
/// [`ReadModel<PostgresStore>`](crate::projection::ReadModel) writes its
/// own tables through it, and the projection runner commits it together
/// with the checkpoint, all or nothing. Reads through it see what is
/// committed plus the transaction's own writes (READ COMMITTED).
///
/// Use its methods, or [`PostgresTransaction::client`] for anything else
/// (prepared statements, `COPY`), but never end the transaction yourself
/// (`COMMIT`, `ROLLBACK`): the runner does, and a transaction ended early
/// would commit writes without their checkpoint. An SQL error inside the
/// handler is the handler's failure: its event's writes are rolled back
/// (to a savepoint) and the failure policy decides what follows.
///
/// Dropped without a commit, the transaction is rolled back and nothing is
/// written.
pub struct PostgresTransaction {
    client: Option<Object>,
    /// The store's runtime, where a dropped transaction is rolled back.
    runtime: tokio::runtime::Handle,
}

impl fmt::Debug for PostgresTransaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresTransaction")
            .field("open", &self.client.is_some())
            .finish_non_exhaustive()
    }
}

impl PostgresTransaction {
    fn object(&self) -> &Object {
        self.client
            .as_ref()
            .expect("a transaction is used only until its commit")
    }

    /// The connection, inside the open transaction. Do not end the
    /// transaction through it (see the type's documentation).
    pub fn client(&self) -> &Client {
        self.object()
    }

    /// Runs one statement (prepared and cached on the connection) and
    /// returns the number of rows it changed.
    ///
    /// # Errors
    /// [`ProjectionError::Store`] with the server's error.
    pub async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, ProjectionError> {
        let client = self.object();
        let statement = client.prepare_cached(sql).await.map_err(backend)?;
        Ok(client.execute(&statement, params).await.map_err(backend)?)
    }

    /// Runs one query (prepared and cached on the connection) and returns
    /// its rows.
    ///
    /// # Errors
    /// [`ProjectionError::Store`] with the server's error.
    pub async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, ProjectionError> {
        let client = self.object();
        let statement = client.prepare_cached(sql).await.map_err(backend)?;
        Ok(client.query(&statement, params).await.map_err(backend)?)
    }

    /// Runs one query that returns at most one row.
    ///
    /// # Errors
    /// [`ProjectionError::Store`] with the server's error, also when the
    /// query returns more than one row.
    pub async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, ProjectionError> {
        let client = self.object();
        let statement = client.prepare_cached(sql).await.map_err(backend)?;
        Ok(client
            .query_opt(&statement, params)
            .await
            .map_err(backend)?)
    }

    /// Runs statements separated by `;`, without parameters (DDL,
    /// `TRUNCATE` in a reset).
    ///
    /// # Errors
    /// [`ProjectionError::Store`] with the server's error.
    pub async fn batch_execute(&self, sql: &str) -> Result<(), ProjectionError> {
        Ok(self.object().batch_execute(sql).await.map_err(backend)?)
    }

    /// Runs `sql` on the connection; a failure leaves the transaction
    /// unusable, so the connection is not given back to the pool.
    async fn control(&mut self, sql: &str) -> Result<(), StoreError> {
        match self.object().batch_execute(sql).await {
            Ok(()) => Ok(()),
            Err(error) => {
                if let Some(client) = self.client.take() {
                    drop(Object::take(client));
                }
                Err(backend(error))
            }
        }
    }
}

impl Drop for PostgresTransaction {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        // Rolled back before the connection goes back to the pool; one that
        // cannot roll back is closed, which rolls back on the server.
        self.runtime.spawn(async move {
            if client.batch_execute("ROLLBACK").await.is_err() {
                drop(Object::take(client));
            }
        });
    }
}

/// Refuses an empty table name and the store's own tables.
fn validate_table(schema: &str, table: &str) -> Result<(), InvalidInput> {
    const WHAT: &str = "read-model table name";
    if table.trim().is_empty() {
        return Err(InvalidInput::EmptyName { what: WHAT });
    }
    let lower = table.to_ascii_lowercase().replace('"', "");
    let reserved = STORE_TABLES
        .iter()
        .any(|own| lower == format!("{schema}.{own}"));
    if reserved {
        return Err(InvalidInput::ReservedName {
            what: WHAT,
            name: table.to_owned(),
        });
    }
    Ok(())
}

impl ReadModelStore for PostgresStore {
    type Transaction = PostgresTransaction;

    /// Opens an SQL transaction (READ COMMITTED, `synchronous_commit = on`)
    /// on a pooled connection. `tables` are only checked: not empty, and
    /// none of the store's own tables (`<schema>.events` and the like); the
    /// handler may write any table its SQL names.
    async fn begin(
        &self,
        _name: &str,
        tables: &[String],
    ) -> Result<PostgresTransaction, StoreError> {
        for table in tables {
            validate_table(&self.config.schema, table)?;
        }
        self.refuse_if_closed()?;
        let shared = std::sync::Arc::clone(&self.shared);
        // On the store's runtime, where new connections start their tasks.
        let client = self
            .run(async move { connection(&shared.pool).await })
            .await?;
        let mut transaction = PostgresTransaction {
            client: Some(client),
            runtime: self.runtime.get().handle().clone(),
        };
        transaction
            .control(&format!(
                "BEGIN; SET LOCAL synchronous_commit = on; SAVEPOINT {SAVEPOINT}"
            ))
            .await?;
        Ok(transaction)
    }

    async fn savepoint(&self, transaction: &mut PostgresTransaction) -> Result<(), StoreError> {
        transaction
            .control(&format!(
                "RELEASE SAVEPOINT {SAVEPOINT}; SAVEPOINT {SAVEPOINT}"
            ))
            .await
    }

    async fn rollback_to_savepoint(
        &self,
        transaction: &mut PostgresTransaction,
    ) -> Result<(), StoreError> {
        transaction
            .control(&format!("ROLLBACK TO SAVEPOINT {SAVEPOINT}"))
            .await
    }

    /// Moves the checkpoint with a conditional statement in the read
    /// model's transaction, then commits. A concurrent committer of the
    /// same checkpoint waits for the row lock and then finds the checkpoint
    /// moved; a process that took the checkpoint's lease since this store
    /// took it makes the commit fail with [`StoreError::LeaseLost`]. A
    /// connection lost around COMMIT is [`StoreError::OutcomeUnknown`]: the
    /// runner stops, and the next runner starts from whatever checkpoint
    /// was committed.
    async fn commit(
        &self,
        mut transaction: PostgresTransaction,
        name: &str,
        from: Option<Position>,
        to: Position,
    ) -> Result<(), StoreError> {
        validate_checkpoint_name(name)?;
        let client = transaction
            .client
            .take()
            .expect("a transaction is committed once");
        let statements = &self.shared.statements;
        let lease = self.shared.leases.epoch(name);
        let result = async {
            let to = bits(to.0);
            let fenced = match from {
                Some(from) => {
                    let statement = client
                        .prepare_cached(&statements.move_checkpoint)
                        .await
                        .map_err(backend)?;
                    client
                        .execute(&statement, &[&name, &to, &bits(from.0)])
                        .await
                        .map_err(backend)?
                }
                None => {
                    let statement = client
                        .prepare_cached(&statements.insert_checkpoint)
                        .await
                        .map_err(backend)?;
                    client
                        .execute(&statement, &[&name, &to])
                        .await
                        .map_err(backend)?
                }
            };
            if let Some(epoch) = lease {
                let statement = client
                    .prepare_cached(&statements.check_lease)
                    .await
                    .map_err(backend)?;
                let held = client
                    .query(&statement, &[&name, &epoch])
                    .await
                    .map_err(backend)?;
                if held.is_empty() {
                    client.batch_execute("ROLLBACK").await.map_err(backend)?;
                    return Err(StoreError::LeaseLost {
                        name: name.to_owned(),
                    });
                }
            }
            if fenced != 1 {
                let statement = client
                    .prepare_cached(&statements.load_checkpoint)
                    .await
                    .map_err(backend)?;
                let found = client
                    .query_opt(&statement, &[&name])
                    .await
                    .map_err(backend)?
                    .map(|row| Position(unbits(row.get(0))));
                client.batch_execute("ROLLBACK").await.map_err(backend)?;
                return Err(StoreError::CheckpointMoved {
                    name: name.to_owned(),
                    expected: from,
                    found,
                });
            }
            match client.batch_execute("COMMIT").await {
                Ok(()) => Ok(()),
                Err(error) if connection_lost(&error) => {
                    Err(StoreError::OutcomeUnknown(backend(error).to_string()))
                }
                Err(error) => Err(backend(error)),
            }
        }
        .await;
        match result {
            Ok(()) | Err(StoreError::CheckpointMoved { .. } | StoreError::LeaseLost { .. }) => {
                // The transaction ended cleanly: the connection is reusable.
                drop(client);
            }
            Err(_) => drop(Object::take(client)),
        }
        result
    }

    /// Nothing to do: every commit was durable when it returned
    /// (`synchronous_commit = on`).
    async fn flush_read_models(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_tables_are_refused() {
        assert!(validate_table("annals", "public.order_totals").is_ok());
        assert!(validate_table("annals", "annals.order_totals").is_ok());
        assert!(matches!(
            validate_table("annals", "annals.events"),
            Err(InvalidInput::ReservedName { .. })
        ));
        assert!(matches!(
            validate_table("annals", "\"ANNALS\".Checkpoints"),
            Err(InvalidInput::ReservedName { .. })
        ));
        assert!(matches!(
            validate_table("annals", " "),
            Err(InvalidInput::EmptyName { .. })
        ));
    }
}
