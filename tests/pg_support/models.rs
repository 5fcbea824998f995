//! What the tests of several processes on PostgreSQL share: an aggregate
//! through the runtime (`Tally`, one tagged event per command), a read model
//! in PostgreSQL tables (`Totals`), and what checks it against a rebuild from
//! the log.

use std::collections::BTreeMap;
use std::sync::Arc;

use annals::projection::{ProjectionContext, ProjectionError, ReadModel};
use annals::store::{PostgresStore, PostgresTransaction};
use annals::{Position, RecordedEvent};
use tokio::sync::Semaphore;
use tokio_postgres::NoTls;

/// A read model in two tables of the store's schema: per stream, how many
/// events and the sum of their versions; and one row per applied event,
/// with no unique constraint, so that an event applied twice shows as a
/// duplicate row instead of an error.
pub struct Totals {
    pub schema: String,
    /// When set, the handler waits for a permit before the event at this
    /// position (a test holds a batch open with it).
    pub gate: Option<(Position, Arc<Semaphore>)>,
}

impl Totals {
    pub fn new(schema: &str) -> Self {
        Self {
            schema: schema.to_owned(),
            gate: None,
        }
    }
}

pub fn create_tables(schema: &str) {
    super::execute(&format!(
        "CREATE TABLE {schema}.totals (stream text PRIMARY KEY, events bigint NOT NULL, \
         version_sum bigint NOT NULL);
         CREATE TABLE {schema}.applied (position bigint NOT NULL, stream text NOT NULL)"
    ));
}

impl ReadModel<PostgresStore> for Totals {
    fn tables(&self) -> Vec<String> {
        vec![
            format!("{}.totals", self.schema),
            format!("{}.applied", self.schema),
        ]
    }

    async fn handle(
        &mut self,
        event: &RecordedEvent,
        transaction: &mut PostgresTransaction,
        _: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        if let Some((at, gate)) = &self.gate {
            if event.position == *at {
                gate.acquire().await.expect("gate").forget();
            }
        }
        let s = &self.schema;
        let stream = event.stream_id.as_str();
        transaction
            .execute(
                &format!(
                    "INSERT INTO {s}.totals VALUES ($1, 1, $2) ON CONFLICT (stream) DO UPDATE \
                     SET events = totals.events + 1, \
                     version_sum = totals.version_sum + EXCLUDED.version_sum"
                ),
                &[&stream, &(event.version.0 as i64)],
            )
            .await?;
        transaction
            .execute(
                &format!("INSERT INTO {s}.applied VALUES ($1, $2)"),
                &[&(event.position.0 as i64), &stream],
            )
            .await?;
        Ok(())
    }

    async fn reset(
        &mut self,
        transaction: &mut PostgresTransaction,
    ) -> Result<(), ProjectionError> {
        let s = &self.schema;
        transaction
            .batch_execute(&format!("DELETE FROM {s}.totals; DELETE FROM {s}.applied"))
            .await
    }
}

pub async fn client() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&super::url(), NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot reach PostgreSQL: {e}\n{}", super::HOW_TO_START));
    tokio::spawn(connection);
    client
}

/// The read model as stored: per stream (events, version sum), and the
/// applied positions in order.
pub async fn stored_model(schema: &str) -> (BTreeMap<String, (i64, i64)>, Vec<i64>) {
    let client = client().await;
    let totals = client
        .query(
            &format!("SELECT stream, events, version_sum FROM {schema}.totals"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2))))
        .collect();
    let applied = client
        .query(
            &format!("SELECT position FROM {schema}.applied ORDER BY position"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    (totals, applied)
}

/// The read model rebuilt from the log, up to `checkpoint`.
pub fn rebuilt(
    log: &[RecordedEvent],
    checkpoint: Position,
) -> (BTreeMap<String, (i64, i64)>, Vec<i64>) {
    let mut totals = BTreeMap::new();
    let mut applied = Vec::new();
    for event in log.iter().take_while(|e| e.position <= checkpoint) {
        let entry = totals
            .entry(event.stream_id.as_str().to_owned())
            .or_insert((0i64, 0i64));
        entry.0 += 1;
        entry.1 += event.version.0 as i64;
        applied.push(event.position.0 as i64);
    }
    (totals, applied)
}

/// A counter with a tag per increment, for the runtime on two processes.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Tally {
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum TallyEvent {
    Added { tag: u64 },
}
impl annals::DomainEvent for TallyEvent {}

#[derive(Debug)]
pub struct Add(pub u64);

#[derive(Debug)]
pub struct Never;
impl std::fmt::Display for Never {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("never")
    }
}
impl std::error::Error for Never {}

impl annals::Aggregate for Tally {
    type Command = Add;
    type Event = TallyEvent;
    type Error = Never;
    const CATEGORY: &'static str = "tally";

    fn handle(&self, command: &Add) -> Result<Vec<TallyEvent>, Never> {
        Ok(vec![TallyEvent::Added { tag: command.0 }])
    }

    fn apply(&mut self, _: &TallyEvent) {
        self.count += 1;
    }
}
