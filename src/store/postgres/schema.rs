//! The store's tables in its PostgreSQL schema, created and version-checked
//! by `open`, and the text of every statement the store runs (the schema
//! name is part of each). The layout and its reasons are in docs/design.md,
//! "The PostgreSQL store".

use tokio_postgres::Client;

use super::backend;
use crate::error::StoreError;

/// The layout of the store's tables this build reads and writes.
pub const POSTGRES_FORMAT_VERSION: u32 = 1;

/// The columns of an event, in the order `reads::decode_row` expects.
pub(super) const EVENT_COLUMNS: &str = "position, event_id, stream_id, version, event_type, \
     schema_version, recorded_at_micros, correlation_id, causation_id, extra, payload";

/// Every statement of the store, with its schema name spliced in (the name
/// was validated as a plain identifier, see `PostgresConfig::validate`).
#[derive(Debug)]
pub(super) struct Statements {
    pub(super) channel: String,
    pub(super) lock_head: String,
    pub(super) stream_heads: String,
    pub(super) stored_ids: String,
    pub(super) insert_events: String,
    pub(super) notify: String,
    pub(super) read_range: String,
    pub(super) read_stream_forward: String,
    pub(super) read_stream_backward: String,
    pub(super) stream_version: String,
    /// `read_all` by direction (forward, backward) and filter (all,
    /// category, event types, stream).
    pub(super) read_all: [[String; 4]; 2],
    pub(super) save_snapshot: String,
    pub(super) load_snapshot: String,
    pub(super) delete_snapshot: String,
    pub(super) save_checkpoint: String,
    pub(super) load_checkpoint: String,
    /// A read model's commit: the checkpoint moves only from where the
    /// committer left it.
    pub(super) move_checkpoint: String,
    /// A read model's first commit: only if no checkpoint is stored.
    pub(super) insert_checkpoint: String,
    /// Locks the lease row FOR SHARE if it still has the holder's epoch.
    pub(super) check_lease: String,
    /// Takes a lease: moves its epoch on (waiting for the old holder's
    /// checkpoint writes in flight) and returns it.
    pub(super) take_lease: String,
    /// `save_checkpoint` by a lease holder: only while its epoch is current.
    pub(super) save_leased_checkpoint: String,
}

impl Statements {
    pub(super) fn new(schema: &str) -> Self {
        let s = schema;
        // Readers see the head row's committed value and nothing past it:
        // see docs/design.md for why that is a gapless prefix.
        let head = format!("(SELECT position FROM {s}.head)");
        let filters = [
            String::new(),
            "AND split_part(stream_id, '-', 1) = $3".to_owned(),
            "AND event_type = ANY($3)".to_owned(),
            "AND stream_id = $3".to_owned(),
        ];
        let read_all = |forward: bool| {
            filters.clone().map(|filter| {
                if forward {
                    format!(
                        "SELECT {EVENT_COLUMNS} FROM {s}.events \
                         WHERE position >= $1 AND position <= {head} {filter} \
                         ORDER BY position LIMIT $2"
                    )
                } else {
                    format!(
                        "SELECT {EVENT_COLUMNS} FROM {s}.events \
                         WHERE position <= LEAST($1, {head}) {filter} \
                         ORDER BY position DESC LIMIT $2"
                    )
                }
            })
        };
        Self {
            channel: format!("annals_{s}"),
            lock_head: format!("SELECT position FROM {s}.head FOR UPDATE"),
            stream_heads: format!(
                "SELECT (SELECT max(version) FROM {s}.events WHERE stream_id = t.name) \
                 FROM unnest($1::text[]) WITH ORDINALITY AS t(name, n) ORDER BY t.n"
            ),
            stored_ids: format!(
                "SELECT event_id, stream_id, version, position FROM {s}.events \
                 WHERE event_id = ANY($1)"
            ),
            // The head moves in the same statement as the events go in, so
            // that no failure between two statements can commit one without
            // the other.
            insert_events: format!(
                "WITH head AS (UPDATE {s}.head SET position = $12) \
                 INSERT INTO {s}.events ({EVENT_COLUMNS}) \
                 SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::bigint[], \
                 $5::text[], $6::integer[], $7::bigint[], $8::uuid[], $9::uuid[], $10::bytea[], \
                 $11::bytea[])"
            ),
            notify: "SELECT pg_notify($1, '')".to_owned(),
            read_range: format!(
                "SELECT {EVENT_COLUMNS} FROM {s}.events \
                 WHERE position > $1 AND position <= {head} ORDER BY position LIMIT $2"
            ),
            read_stream_forward: format!(
                "SELECT {EVENT_COLUMNS} FROM {s}.events \
                 WHERE stream_id = $1 AND version >= $2 AND position <= {head} \
                 ORDER BY version LIMIT $3"
            ),
            read_stream_backward: format!(
                "SELECT {EVENT_COLUMNS} FROM {s}.events \
                 WHERE stream_id = $1 AND version <= $2 AND position <= {head} \
                 ORDER BY version DESC LIMIT $3"
            ),
            stream_version: format!(
                "SELECT max(version) FROM {s}.events \
                 WHERE stream_id = $1 AND position <= {head}"
            ),
            read_all: [read_all(true), read_all(false)],
            save_snapshot: format!(
                "INSERT INTO {s}.snapshots (stream_id, version, payload) VALUES ($1, $2, $3) \
                 ON CONFLICT (stream_id) DO UPDATE \
                 SET version = EXCLUDED.version, payload = EXCLUDED.payload \
                 WHERE snapshots.version < EXCLUDED.version"
            ),
            load_snapshot: format!(
                "SELECT version, payload FROM {s}.snapshots WHERE stream_id = $1"
            ),
            delete_snapshot: format!("DELETE FROM {s}.snapshots WHERE stream_id = $1"),
            save_checkpoint: format!(
                "INSERT INTO {s}.checkpoints (name, position) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position"
            ),
            load_checkpoint: format!("SELECT position FROM {s}.checkpoints WHERE name = $1"),
            move_checkpoint: format!(
                "UPDATE {s}.checkpoints SET position = $2 WHERE name = $1 AND position = $3"
            ),
            insert_checkpoint: format!(
                "INSERT INTO {s}.checkpoints (name, position) VALUES ($1, $2) \
                 ON CONFLICT (name) DO NOTHING"
            ),
            check_lease: format!(
                "SELECT 1 FROM {s}.leases WHERE name = $1 AND epoch = $2 FOR SHARE"
            ),
            take_lease: format!(
                "INSERT INTO {s}.leases (name, epoch) VALUES ($1, 1) \
                 ON CONFLICT (name) DO UPDATE SET epoch = leases.epoch + 1 RETURNING epoch"
            ),
            save_leased_checkpoint: format!(
                "WITH lease AS (SELECT 1 FROM {s}.leases \
                 WHERE name = $1::text AND epoch = $3::bigint FOR SHARE) \
                 INSERT INTO {s}.checkpoints (name, position) SELECT $1::text, $2::bigint FROM lease \
                 ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position"
            ),
        }
    }
}

/// The tables of a new store. `head` holds one row: the last position
/// assigned. Every append transaction locks it, so appends are serialized
/// across processes and positions are dense (docs/design.md).
fn create_tables(s: &str) -> String {
    format!(
        "CREATE TABLE {s}.format (version integer NOT NULL);
         INSERT INTO {s}.format VALUES ({POSTGRES_FORMAT_VERSION});
         CREATE TABLE {s}.head (
             singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
             position bigint NOT NULL);
         INSERT INTO {s}.head VALUES (true, 0);
         CREATE TABLE {s}.events (
             position bigint PRIMARY KEY,
             event_id uuid NOT NULL UNIQUE,
             stream_id text NOT NULL,
             version bigint NOT NULL,
             event_type text NOT NULL,
             schema_version integer NOT NULL,
             recorded_at_micros bigint NOT NULL,
             correlation_id uuid,
             causation_id uuid,
             extra bytea,
             payload bytea NOT NULL,
             UNIQUE (stream_id, version));
         CREATE TABLE {s}.snapshots (
             stream_id text PRIMARY KEY,
             version bigint NOT NULL,
             payload bytea NOT NULL);
         CREATE TABLE {s}.checkpoints (
             name text PRIMARY KEY,
             position bigint NOT NULL);"
    )
}

/// The table of checkpoint leases (docs/design.md, "Projections on several
/// processes"): added to stores created before it, so no format change.
fn create_leases(s: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {s}.leases (
             name text PRIMARY KEY,
             epoch bigint NOT NULL)"
    )
}

/// Creates the store's tables in `schema` if it has none, or checks their
/// format; returns the head position. Concurrent opens of one schema (several
/// processes starting at once) are serialized by an advisory lock, so
/// exactly one of them creates the tables.
pub(super) async fn create_or_check(client: &mut Client, schema: &str) -> Result<u64, StoreError> {
    let transaction = client.transaction().await.map_err(backend)?;
    transaction
        .execute(
            "SELECT pg_advisory_xact_lock(hashtext('annals schema ' || $1::text))",
            &[&schema],
        )
        .await
        .map_err(backend)?;
    let tables: Vec<String> = transaction
        .query(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1",
            &[&schema],
        )
        .await
        .map_err(backend)?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if tables.iter().any(|table| table == "format") {
        let found: i32 = transaction
            .query_one(&format!("SELECT version FROM {schema}.format"), &[])
            .await
            .map_err(backend)?
            .get(0);
        if found != POSTGRES_FORMAT_VERSION as i32 {
            return Err(StoreError::FormatMismatch {
                found: found as u32,
                expected: POSTGRES_FORMAT_VERSION,
            });
        }
    } else if tables.is_empty() {
        transaction
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {schema}; {}",
                create_tables(schema)
            ))
            .await
            .map_err(backend)?;
    } else {
        return Err(StoreError::NotAStore(format!("schema {schema}")));
    }
    transaction
        .batch_execute(&create_leases(schema))
        .await
        .map_err(backend)?;
    let head: i64 = transaction
        .query_one(&format!("SELECT position FROM {schema}.head"), &[])
        .await
        .map_err(backend)?
        .get(0);
    transaction.commit().await.map_err(backend)?;
    Ok(head as u64)
}
