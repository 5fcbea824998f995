//! Reads: rows of the `events` table back into [`RecordedEvent`]s, and the
//! read queries, each bounded by the committed head row (docs/design.md).

use deadpool_postgres::{Object, Pool};
use tokio_postgres::Row;
use uuid::Uuid;

use super::backend;
use super::schema::Statements;
use crate::error::StoreError;
use crate::event::{EventFilter, Metadata, Position, RecordedEvent, StreamId, Version};

/// A bigint column holds at most `i64::MAX`; larger bounds (`Version::MAX`,
/// `Position::END`) mean "no bound" and are clamped.
pub(super) fn to_sql(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn corrupt(position: i64, what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("event at position {position}: {what}"))
}

/// The extra metadata as stored: postcard's encoding of the key/value
/// pairs, as the sled store keeps them; NULL when there are none.
pub(super) fn encode_extra(metadata: &Metadata) -> Result<Option<Vec<u8>>, StoreError> {
    if metadata.extra.is_empty() {
        return Ok(None);
    }
    let pairs: Vec<(&str, &str)> = metadata
        .extra
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    postcard::to_stdvec(&pairs)
        .map(Some)
        .map_err(|e| StoreError::Corrupt(format!("cannot encode metadata: {e}")))
}

/// One row of `events` (columns in `schema::EVENT_COLUMNS` order).
pub(super) fn decode_row(row: &Row) -> Result<RecordedEvent, StoreError> {
    let position: i64 = row.try_get(0).map_err(backend)?;
    let stream: &str = row.try_get(2).map_err(backend)?;
    let schema_version: i32 = row.try_get(5).map_err(backend)?;
    let extra: Option<&[u8]> = row.try_get(9).map_err(backend)?;
    let extra = match extra {
        None => Default::default(),
        Some(bytes) => postcard::from_bytes::<Vec<(String, String)>>(bytes)
            .map_err(|e| corrupt(position, e))?
            .into_iter()
            .collect(),
    };
    let unsigned = |value: i64| u64::try_from(value).map_err(|e| corrupt(position, e));
    Ok(RecordedEvent {
        event_id: row.try_get(1).map_err(backend)?,
        stream_id: StreamId::new(stream).map_err(|e| corrupt(position, e))?,
        version: Version(unsigned(row.try_get(3).map_err(backend)?)?),
        position: Position(unsigned(position)?),
        event_type: row.try_get(4).map_err(backend)?,
        schema_version: u16::try_from(schema_version).map_err(|e| corrupt(position, e))?,
        recorded_at_micros: unsigned(row.try_get(6).map_err(backend)?)?,
        metadata: Metadata {
            correlation_id: row.try_get::<_, Option<Uuid>>(7).map_err(backend)?,
            causation_id: row.try_get::<_, Option<Uuid>>(8).map_err(backend)?,
            extra,
        },
        payload: row.try_get(10).map_err(backend)?,
    })
}

pub(super) fn decode_rows(rows: &[Row]) -> Result<Vec<RecordedEvent>, StoreError> {
    rows.iter().map(decode_row).collect()
}

/// A pooled connection. The pool reconnects by itself: a connection that
/// closed is dropped at its next checkout and replaced.
pub(super) async fn connection(pool: &Pool) -> Result<Object, StoreError> {
    pool.get().await.map_err(backend)
}

/// Up to `limit` events after `after`, up to the committed head.
pub(super) async fn read_after(
    pool: &Pool,
    statements: &Statements,
    after: u64,
    limit: usize,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let client = connection(pool).await?;
    let statement = client
        .prepare_cached(&statements.read_range)
        .await
        .map_err(backend)?;
    let rows = client
        .query(&statement, &[&to_sql(after), &to_sql(limit as u64)])
        .await
        .map_err(backend)?;
    decode_rows(&rows)
}

/// The index into `Statements::read_all`'s second dimension.
pub(super) fn filter_index(filter: &EventFilter) -> usize {
    match filter {
        EventFilter::Category(_) => 1,
        EventFilter::EventTypes(_) => 2,
        EventFilter::Stream(_) => 3,
        EventFilter::All => 0,
    }
}
