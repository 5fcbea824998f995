//! What the operations layer (`annals::ops`) needs of the PostgreSQL store
//! beyond the [`EventStore`](crate::EventStore) contract: listing
//! checkpoints and snapshots, deleting a checkpoint, the size on disk, a
//! check of the tables' own invariants, and loading imported events as they
//! were recorded, in one transaction under the head lock.

use std::collections::HashSet;
use std::sync::Arc;

use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::reads::{connection, encode_extra, to_sql};
use super::{backend, query, unbits, PostgresStore};
use crate::error::StoreError;
use crate::event::{Position, RecordedEvent, StreamId};
use crate::store::bulk::{check_batch, BulkError};
use crate::store::validate_checkpoint_name;

impl PostgresStore {
    fn schema(&self) -> &str {
        &self.config.schema
    }

    /// Every saved checkpoint, by name.
    pub(crate) async fn ops_checkpoints(&self) -> Result<Vec<(String, Position)>, StoreError> {
        let shared = Arc::clone(&self.shared);
        let text = format!(
            "SELECT name, position FROM {}.checkpoints ORDER BY name",
            self.schema()
        );
        self.run(async move {
            let rows = query(&shared, &text, &[]).await?;
            Ok(rows
                .iter()
                .map(|row| (row.get::<_, String>(0), Position(unbits(row.get(1)))))
                .collect())
        })
        .await
    }

    /// Every snapshot, by stream, with its version.
    pub(crate) async fn ops_snapshots(
        &self,
    ) -> Result<Vec<(String, Result<u64, String>)>, StoreError> {
        let shared = Arc::clone(&self.shared);
        let text = format!(
            "SELECT stream_id, version FROM {}.snapshots ORDER BY stream_id",
            self.schema()
        );
        self.run(async move {
            let rows = query(&shared, &text, &[]).await?;
            Ok(rows
                .iter()
                .map(|row| (row.get::<_, String>(0), Ok(unbits(row.get(1)))))
                .collect())
        })
        .await
    }

    /// Deletes a checkpoint (committed when this returns); whether there
    /// was one.
    pub(crate) async fn ops_delete_checkpoint(&self, name: &str) -> Result<bool, StoreError> {
        validate_checkpoint_name(name)?;
        let shared = Arc::clone(&self.shared);
        let name = name.to_owned();
        let text = format!(
            "DELETE FROM {}.checkpoints WHERE name = $1 RETURNING name",
            self.schema()
        );
        self.run(async move { Ok(!query(&shared, &text, &[&name]).await?.is_empty()) })
            .await
    }

    /// The bytes of the store's tables, with their indexes and TOAST.
    pub(crate) async fn ops_size_on_disk(&self) -> Result<u64, StoreError> {
        let shared = Arc::clone(&self.shared);
        let text = "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint \
                    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                    WHERE n.nspname = $1 AND c.relkind = 'r'";
        let schema = self.schema().to_owned();
        self.run(async move {
            let rows = query(&shared, text, &[&schema]).await?;
            Ok(rows.first().map_or(0, |row| row.get::<_, i64>(0) as u64))
        })
        .await
    }

    /// The stored head row (not the feed's head, which may lag behind
    /// other processes' commits).
    pub(crate) async fn ops_stored_head(&self) -> Result<Position, StoreError> {
        let shared = Arc::clone(&self.shared);
        let text = format!("SELECT position FROM {}.head", self.schema());
        self.run(async move {
            let rows = query(&shared, &text, &[]).await?;
            Ok(Position(
                rows.first().map_or(0, |row| row.get::<_, i64>(0) as u64),
            ))
        })
        .await
    }

    /// Loads `events`, which must continue the log at its head, in one
    /// transaction under the head lock: all of them or none.
    pub(crate) async fn ops_load(&self, events: Vec<RecordedEvent>) -> Result<(), BulkError> {
        self.refuse_if_closed()?;
        if events.is_empty() {
            return Ok(());
        }
        let shared = Arc::clone(&self.shared);
        let outcome = self
            .run(async move {
                let statements = &shared.statements;
                let mut client = connection(&shared.pool).await?;
                let transaction = client.transaction().await.map_err(backend)?;
                transaction
                    .batch_execute("SET LOCAL synchronous_commit = on")
                    .await
                    .map_err(backend)?;
                let head: i64 = transaction
                    .query_one(statements.lock_head.as_str(), &[])
                    .await
                    .map_err(backend)?
                    .get(0);
                let mut streams: Vec<&str> = events.iter().map(|e| e.stream_id.as_str()).collect();
                streams.sort_unstable();
                streams.dedup();
                let stream_rows = transaction
                    .query(statements.stream_heads.as_str(), &[&streams])
                    .await
                    .map_err(backend)?;
                let heads: std::collections::HashMap<&str, u64> = streams
                    .iter()
                    .zip(&stream_rows)
                    .map(|(stream, row)| {
                        (*stream, row.get::<_, Option<i64>>(0).unwrap_or(0) as u64)
                    })
                    .collect();
                let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
                let stored: HashSet<Uuid> = transaction
                    .query(statements.stored_ids.as_str(), &[&ids])
                    .await
                    .map_err(backend)?
                    .iter()
                    .map(|row| row.get(0))
                    .collect();
                let checked = check_batch(
                    head as u64,
                    &events,
                    |stream: &StreamId| Ok(heads.get(stream.as_str()).copied().unwrap_or(0)),
                    &stored,
                );
                if let Err(refusal) = checked {
                    return Ok(Err(refusal));
                }
                let positions: Vec<i64> = events.iter().map(|e| to_sql(e.position.0)).collect();
                let event_streams: Vec<&str> =
                    events.iter().map(|e| e.stream_id.as_str()).collect();
                let versions: Vec<i64> = events.iter().map(|e| to_sql(e.version.0)).collect();
                let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
                let schema_versions: Vec<i32> =
                    events.iter().map(|e| i32::from(e.schema_version)).collect();
                let recorded_at: Vec<i64> = events
                    .iter()
                    .map(|e| to_sql(e.recorded_at_micros))
                    .collect();
                let correlation: Vec<Option<Uuid>> =
                    events.iter().map(|e| e.metadata.correlation_id).collect();
                let causation: Vec<Option<Uuid>> =
                    events.iter().map(|e| e.metadata.causation_id).collect();
                let extra = events
                    .iter()
                    .map(|e| encode_extra(&e.metadata))
                    .collect::<Result<Vec<_>, _>>()?;
                let payloads: Vec<&[u8]> = events.iter().map(|e| e.payload.as_slice()).collect();
                let new_head = *positions.last().expect("not empty");
                let columns: [&(dyn ToSql + Sync); 12] = [
                    &positions,
                    &ids,
                    &event_streams,
                    &versions,
                    &types,
                    &schema_versions,
                    &recorded_at,
                    &correlation,
                    &causation,
                    &extra,
                    &payloads,
                    &new_head,
                ];
                transaction
                    .execute(statements.insert_events.as_str(), &columns)
                    .await
                    .map_err(backend)?;
                transaction
                    .query_one(statements.notify.as_str(), &[&statements.channel])
                    .await
                    .map_err(backend)?;
                transaction.commit().await.map_err(backend)?;
                Ok(Ok(()))
            })
            .await?;
        outcome
    }
}
