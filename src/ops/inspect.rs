//! [`Inspect`]: what the operations need of a store beyond the
//! [`EventStore`] contract (listings, sizes, backend-specific checks),
//! implemented for [`SledStore`] and [`PostgresStore`].

use async_trait::async_trait;
use serde::Serialize;

use super::verify::Violation;
use crate::error::StoreError;
use crate::event::Position;
use crate::store::postgres::PostgresStore;
use crate::store::sled::ops::RawFinding;
use crate::store::{EventStore, SledStore};

/// A stored snapshot as listed by [`Inspect::snapshots`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct SnapshotRecord {
    /// The stream it belongs to.
    pub stream: String,
    /// Its version, or why the record does not decode (a snapshot is only a
    /// cache: the runtime ignores such a record and replays the stream).
    pub version: Result<u64, String>,
}

/// A store the operations can inspect: the [`EventStore`] contract plus the
/// facts only the backend knows. Listings are read as of the call; they are
/// not a consistent snapshot with concurrent writers.
#[async_trait]
pub trait Inspect: EventStore {
    /// The backend's name (`"sled"`, `"postgres"`).
    fn backend_name(&self) -> &'static str;

    /// The on-disk (or schema) format version the store has.
    fn format_version(&self) -> u32;

    /// This store as a plain [`EventStore`].
    fn as_event_store(&self) -> &dyn EventStore;

    /// The last committed position as stored, including other processes'
    /// commits not yet on this store's live feed.
    async fn stored_head(&self) -> Result<Position, StoreError> {
        Ok(self.head_position())
    }

    /// The bytes the store occupies (its directory, or its tables).
    async fn size_on_disk(&self) -> Result<u64, StoreError>;

    /// Every saved checkpoint, by name.
    async fn checkpoints(&self) -> Result<Vec<(String, Position)>, StoreError>;

    /// Every stored snapshot, by stream.
    async fn snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError>;

    /// Deletes a checkpoint, durably under the store's durability; returns
    /// whether there was one.
    async fn delete_checkpoint(&self, name: &str) -> Result<bool, StoreError>;

    /// The checks only the backend can make (its own indexes), as
    /// violations, with the number of index entries checked.
    async fn check_backend(&self) -> Result<(Vec<Violation>, u64), StoreError>;
}

#[async_trait]
impl Inspect for SledStore {
    fn backend_name(&self) -> &'static str {
        "sled"
    }

    fn format_version(&self) -> u32 {
        crate::store::FORMAT_VERSION
    }

    fn as_event_store(&self) -> &dyn EventStore {
        self
    }

    async fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.ops_size_on_disk()
    }

    async fn checkpoints(&self) -> Result<Vec<(String, Position)>, StoreError> {
        self.ops_checkpoints()
    }

    async fn snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        Ok(self
            .ops_snapshots()?
            .into_iter()
            .map(|(stream, version)| SnapshotRecord { stream, version })
            .collect())
    }

    async fn delete_checkpoint(&self, name: &str) -> Result<bool, StoreError> {
        self.ops_delete_checkpoint(name).await
    }

    async fn check_backend(&self) -> Result<(Vec<Violation>, u64), StoreError> {
        let check = self.ops_check_log()?;
        let mut violations: Vec<Violation> =
            check.findings.into_iter().map(Violation::from).collect();
        if check.more_findings > 0 {
            violations.push(Violation::More {
                count: check.more_findings,
            });
        }
        Ok((violations, check.index_entries))
    }
}

impl From<RawFinding> for Violation {
    fn from(finding: RawFinding) -> Self {
        match finding {
            RawFinding::PositionGap { after, next } => Violation::PositionGap { after, next },
            RawFinding::HeadMismatch { stored, last } => Violation::HeadMismatch {
                head: stored,
                last_event: last,
            },
            RawFinding::Undecodable { position, error } => {
                Violation::UndecodableEvent { position, error }
            }
            RawFinding::NotIndexed {
                position,
                index,
                detail,
            } => Violation::NotIndexed {
                position,
                index: index.to_owned(),
                detail,
            },
            RawFinding::BadIndexEntry { index, key, detail } => Violation::BadIndexEntry {
                index: index.to_owned(),
                key,
                detail,
            },
        }
    }
}

#[async_trait]
impl Inspect for PostgresStore {
    fn backend_name(&self) -> &'static str {
        "postgres"
    }

    fn format_version(&self) -> u32 {
        crate::store::POSTGRES_FORMAT_VERSION
    }

    fn as_event_store(&self) -> &dyn EventStore {
        self
    }

    async fn stored_head(&self) -> Result<Position, StoreError> {
        self.ops_stored_head().await
    }

    async fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.ops_size_on_disk().await
    }

    async fn checkpoints(&self) -> Result<Vec<(String, Position)>, StoreError> {
        self.ops_checkpoints().await
    }

    async fn snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        Ok(self
            .ops_snapshots()
            .await?
            .into_iter()
            .map(|(stream, version)| SnapshotRecord { stream, version })
            .collect())
    }

    async fn delete_checkpoint(&self, name: &str) -> Result<bool, StoreError> {
        self.ops_delete_checkpoint(name).await
    }

    /// PostgreSQL keeps the indexes itself (the primary key on position,
    /// `UNIQUE (stream_id, version)` and `UNIQUE (event_id)`): the contract
    /// checks of [`super::verify`] cover the rest.
    async fn check_backend(&self) -> Result<(Vec<Violation>, u64), StoreError> {
        Ok((Vec::new(), 0))
    }
}
