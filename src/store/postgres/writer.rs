//! The writer task: one per store, it owns every append of its process and
//! commits the queued ones as one transaction. Each transaction locks the
//! head row, decides every append of the group in memory (idempotency,
//! expected version, versions, positions) from one flight of reads, then
//! writes the accepted ones in one flight: insert, head, notify, commit.
//! A refused append is answered with its error and the others commit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tracing::{debug, warn};
use uuid::Uuid;

use super::feed::Feed;
use super::reads::{connection, encode_extra, to_sql};
use super::schema::Statements;
use super::{backend, connection_lost};
use crate::error::{AppendError, StoreError};
use crate::event::{
    now_micros, AppendResult, ExpectedVersion, NewEvent, Position, RecordedEvent, StreamId, Version,
};
use crate::store::{check_idempotency, IdempotencyCheck, StoredId};

/// A group stops taking appends once it holds this many bytes of events:
/// PostgreSQL refuses a parameter (one column of the group's INSERT) over
/// 1 GiB, and a smaller transaction holds the head lock for less time.
const MAX_GROUP_BYTES: usize = 32 << 20;

fn request_bytes(request: &Request) -> usize {
    match request {
        Request::Append(append) => append.events.iter().map(NewEvent::size).sum(),
        Request::Shutdown { .. } => 0,
    }
}

#[derive(Debug)]
pub(super) enum Request {
    Append(Append),
    /// Finish what was queued before it, then stop.
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

#[derive(Debug)]
pub(super) struct Append {
    pub(super) stream: StreamId,
    pub(super) expected: ExpectedVersion,
    pub(super) events: Vec<NewEvent>,
    pub(super) reply: oneshot::Sender<Result<AppendResult, AppendError>>,
}

/// Counters of the writer.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) appends: AtomicU64,
    pub(super) transactions: AtomicU64,
    pub(super) retries: AtomicU64,
}

/// What one append of a group was decided to be.
#[derive(Debug)]
enum Decision {
    /// New events, to be written at these versions and positions.
    Write(AppendResult),
    /// Every event id is stored already: a retry, answered with the original.
    Stored(AppendResult),
}

/// A committed transaction: what it decided for each append of the group,
/// and the time it recorded on the events it wrote.
#[derive(Debug)]
struct Committed {
    decisions: Vec<Result<Decision, AppendError>>,
    recorded_at_micros: u64,
}

/// Why a transaction failed, and what is known about it.
#[derive(Debug)]
struct Failure {
    error: StoreError,
    /// Worth trying again: a lost connection, a serialization failure, a
    /// deadlock or a unique violation (another writer got there first).
    transient: bool,
    /// The connection was lost after COMMIT may have reached the server.
    maybe_committed: bool,
    /// A lock was not had within `lock_timeout`.
    busy: bool,
}

impl Failure {
    fn of(error: tokio_postgres::Error, after_commit_sent: bool) -> Self {
        let connection_lost = connection_lost(&error);
        let busy = error.code() == Some(&SqlState::LOCK_NOT_AVAILABLE);
        let transient = connection_lost
            || busy
            || matches!(
                error.code(),
                Some(&SqlState::T_R_SERIALIZATION_FAILURE)
                    | Some(&SqlState::T_R_DEADLOCK_DETECTED)
                    | Some(&SqlState::UNIQUE_VIOLATION)
            );
        Self {
            error: backend(error),
            transient,
            maybe_committed: after_commit_sent && connection_lost,
            busy,
        }
    }

    /// No connection could be had: nothing was sent.
    fn no_connection(error: StoreError) -> Self {
        Self {
            error,
            transient: true,
            maybe_committed: false,
            busy: false,
        }
    }
}

pub(super) struct Writer {
    pub(super) pool: Pool,
    pub(super) statements: Arc<Statements>,
    pub(super) feed: Arc<Feed>,
    pub(super) receiver: mpsc::Receiver<Request>,
    pub(super) max_group_commit: usize,
    pub(super) retries: u32,
    pub(super) counters: Arc<Counters>,
    /// `BEGIN` with the transaction's settings (durability, lock timeout).
    pub(super) begin: String,
    pub(super) metrics: crate::metrics::StoreMetrics,
}

impl Writer {
    pub(super) async fn run(mut self) {
        let mut group = Vec::new();
        let mut shutdown = None;
        while shutdown.is_none() {
            let Some(first) = self.receiver.recv().await else {
                break;
            };
            let mut bytes = request_bytes(&first);
            let mut requests = vec![first];
            while requests.len() < self.max_group_commit && bytes < MAX_GROUP_BYTES {
                match self.receiver.try_recv() {
                    Ok(request) => {
                        bytes += request_bytes(&request);
                        requests.push(request);
                    }
                    Err(_) => break,
                }
            }
            for request in requests {
                match request {
                    Request::Append(append) if shutdown.is_none() => group.push(append),
                    Request::Append(append) => {
                        let _ = append.reply.send(Err(StoreError::Closed.into()));
                    }
                    Request::Shutdown { reply } => shutdown = Some(reply),
                }
            }
            if !group.is_empty() {
                self.commit(std::mem::take(&mut group)).await;
            }
        }
        self.receiver.close();
        while let Ok(request) = self.receiver.try_recv() {
            match request {
                Request::Append(append) => {
                    let _ = append.reply.send(Err(StoreError::Closed.into()));
                }
                Request::Shutdown { reply } => drop(reply),
            }
        }
        if let Some(reply) = shutdown {
            let _ = reply.send(());
        }
        debug!("postgres writer stopped");
    }

    /// Commits a group, retrying transient failures. When a group fails for
    /// a reason that is not transient (a trigger refusing at commit, say),
    /// each of its appends is tried alone, so that one bad append does not
    /// fail the others.
    async fn commit(&self, group: Vec<Append>) {
        let mut maybe_committed = false;
        let mut attempt = 0;
        let failure = loop {
            let started = std::time::Instant::now();
            match self.transaction(&group).await {
                Ok(committed) => {
                    self.metrics.synced(started.elapsed());
                    self.answer(group, committed).await;
                    return;
                }
                Err(failure) => {
                    maybe_committed |= failure.maybe_committed;
                    if !failure.transient || attempt >= self.retries {
                        break failure;
                    }
                    attempt += 1;
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    debug!(error = %failure.error, attempt, "write transaction failed; retrying");
                    // Retrying is safe even if the lost transaction committed:
                    // the group's event ids are then found stored and each
                    // append is answered with its original result.
                    tokio::time::sleep(Duration::from_millis(10 << attempt.min(6))).await;
                }
            }
        };
        if !failure.transient && !maybe_committed && group.len() > 1 {
            for append in group {
                Box::pin(self.commit(vec![append])).await;
            }
            return;
        }
        warn!(error = %failure.error, maybe_committed, "write transaction failed");
        self.metrics.group_failed();
        for append in group {
            let error = if maybe_committed {
                StoreError::OutcomeUnknown(failure.error.to_string())
            } else if failure.busy {
                StoreError::Busy(failure.error.to_string())
            } else {
                failure.error.clone()
            };
            let _ = append.reply.send(Err(error.into()));
        }
    }

    /// Publishes what the group committed, then answers every append.
    async fn answer(&self, group: Vec<Append>, committed_group: Committed) {
        let Committed {
            decisions,
            recorded_at_micros,
        } = committed_group;
        let mut committed = Vec::new();
        let mut answers = Vec::with_capacity(group.len());
        let mut newest_stored = 0;
        for (append, decision) in group.into_iter().zip(decisions) {
            let outcome = match decision {
                Ok(Decision::Write(result)) => {
                    for (offset, event) in append.events.into_iter().enumerate() {
                        let offset = offset as u64;
                        committed.push(RecordedEvent {
                            event_id: event.event_id,
                            stream_id: append.stream.clone(),
                            version: Version(result.first_version.0 + offset),
                            position: Position(result.first_position.0 + offset),
                            event_type: event.event_type,
                            schema_version: event.schema_version,
                            recorded_at_micros,
                            metadata: event.metadata,
                            payload: event.payload,
                        });
                    }
                    Ok(result)
                }
                Ok(Decision::Stored(result)) => {
                    newest_stored = newest_stored.max(result.last_position.0);
                    Ok(result)
                }
                Err(error) => Err(error),
            };
            answers.push((append.reply, outcome));
        }
        let appended = answers.iter().filter(|(_, o)| o.is_ok()).count() as u64;
        self.counters.appends.fetch_add(appended, Ordering::Relaxed);
        self.metrics
            .group_committed(appended, committed.len() as u64);
        if !committed.is_empty() {
            self.counters.transactions.fetch_add(1, Ordering::Relaxed);
        }
        // Published before answering, so that a caller whose append returned
        // finds it in `head_position()` and on the feed.
        self.feed.publish_own(committed).await;
        if newest_stored > self.feed.head().0 {
            // A retry of events committed by a transaction whose answer was
            // lost: the poller's read publishes them.
            if let Err(error) = self.feed.catch_up().await {
                debug!(%error, "could not publish retried events yet");
            }
        }
        for (reply, outcome) in answers {
            let _ = reply.send(outcome);
        }
    }

    /// One transaction for the group: the decisions, once committed.
    async fn transaction(&self, group: &[Append]) -> Result<Committed, Failure> {
        let client = connection(&self.pool)
            .await
            .map_err(Failure::no_connection)?;
        let result = self.transaction_on(&client, group).await;
        if result.is_err() {
            // Its state is unknown (perhaps inside an aborted transaction):
            // never hand it back to the pool.
            drop(Object::take(client));
        }
        result
    }

    async fn transaction_on(
        &self,
        client: &Object,
        group: &[Append],
    ) -> Result<Committed, Failure> {
        let sql = &self.statements;
        let statement = |text: &str| {
            let text = text.to_owned();
            async move { client.prepare_cached(&text).await }
        };
        let (lock_head, stream_heads, stored_ids) = tokio::try_join!(
            statement(&sql.lock_head),
            statement(&sql.stream_heads),
            statement(&sql.stored_ids),
        )
        .map_err(|e| Failure::of(e, false))?;

        let mut streams: Vec<&str> = group.iter().map(|a| a.stream.as_str()).collect();
        streams.sort_unstable();
        streams.dedup();
        let ids: Vec<Uuid> = group
            .iter()
            .flat_map(|a| a.events.iter().map(|e| e.event_id))
            .collect();

        // First flight, one round trip: begin, lock the head, then read the
        // group's stream heads and stored ids under the lock.
        let (streams_param, ids_param): ([&(dyn ToSql + Sync); 1], [&(dyn ToSql + Sync); 1]) =
            ([&streams], [&ids]);
        let (begin, head, heads, stored) = tokio::join!(
            client.batch_execute(&self.begin),
            client.query_one(&lock_head, &[]),
            client.query(&stream_heads, &streams_param),
            client.query(&stored_ids, &ids_param),
        );
        begin.map_err(|e| Failure::of(e, false))?;
        let head: i64 = head.map_err(|e| Failure::of(e, false))?.get(0);
        let heads = heads.map_err(|e| Failure::of(e, false))?;
        let stored = stored.map_err(|e| Failure::of(e, false))?;

        // One row per stream, in the order of `streams`.
        let mut versions: HashMap<&str, u64> = streams
            .iter()
            .zip(&heads)
            .map(|(stream, row)| (*stream, row.get::<_, Option<i64>>(0).unwrap_or(0) as u64))
            .collect();
        let mut known: HashMap<Uuid, StoredId> = HashMap::with_capacity(stored.len());
        for row in &stored {
            let stream: &str = row.get(1);
            let stream = StreamId::new(stream).map_err(|e| Failure {
                error: StoreError::Corrupt(format!("stored stream id: {e}")),
                transient: false,
                maybe_committed: false,
                busy: false,
            })?;
            let version: i64 = row.get(2);
            let position: i64 = row.get(3);
            known.insert(
                row.get(0),
                StoredId {
                    stream,
                    version: Version(version as u64),
                    position: Position(position as u64),
                },
            );
        }

        let mut next_position = head as u64 + 1;
        let decisions: Vec<Result<Decision, AppendError>> = group
            .iter()
            .map(|append| decide(append, &mut versions, &mut known, &mut next_position))
            .collect();

        let new_head = next_position - 1;
        if new_head == head as u64 {
            // Nothing to write: release the lock.
            client
                .batch_execute("ROLLBACK")
                .await
                .map_err(|e| Failure::of(e, false))?;
            return Ok(Committed {
                decisions,
                recorded_at_micros: 0,
            });
        }

        let recorded_at_micros = now_micros();
        let rows = Rows::new(group, &decisions, recorded_at_micros).map_err(|error| Failure {
            error,
            transient: false,
            maybe_committed: false,
            busy: false,
        })?;
        let (insert_events, notify) =
            tokio::try_join!(statement(&sql.insert_events), statement(&sql.notify),)
                .map_err(|e| Failure::of(e, false))?;
        // Second flight: write the accepted appends and move the head (one
        // statement), wake the other processes (delivered at commit), commit.
        let new_head = to_sql(new_head);
        let columns: [&(dyn ToSql + Sync); 12] = [
            &rows.positions,
            &rows.ids,
            &rows.streams,
            &rows.versions,
            &rows.types,
            &rows.schema_versions,
            &rows.recorded_at,
            &rows.correlation,
            &rows.causation,
            &rows.extra,
            &rows.payloads,
            &new_head,
        ];
        let channel_param: [&(dyn ToSql + Sync); 1] = [&sql.channel];
        let (inserted, notified, committed) = tokio::join!(
            client.execute(&insert_events, &columns),
            client.query_one(&notify, &channel_param),
            client.batch_execute("COMMIT"),
        );
        // A statement that failed makes COMMIT roll back (PostgreSQL answers
        // COMMIT of an aborted transaction with ROLLBACK, not an error).
        let inserted = inserted.map_err(|e| Failure::of(e, true))?;
        notified.map_err(|e| Failure::of(e, true))?;
        committed.map_err(|e| Failure::of(e, true))?;
        if inserted != rows.positions.len() as u64 {
            // Cannot happen with PostgreSQL; if it did, the head and the
            // events would disagree, which every reader must hear about.
            return Err(Failure {
                error: StoreError::Corrupt(format!(
                    "inserted {inserted} events of {}",
                    rows.positions.len()
                )),
                transient: false,
                maybe_committed: true,
                busy: false,
            });
        }
        Ok(Committed {
            decisions,
            recorded_at_micros,
        })
    }
}

/// Decides one append of the group, against the heads and ids read under the
/// lock and those of the appends decided before it.
fn decide(
    append: &Append,
    versions: &mut HashMap<&str, u64>,
    known: &mut HashMap<Uuid, StoredId>,
    next_position: &mut u64,
) -> Result<Decision, AppendError> {
    let stream = &append.stream;
    let check = check_idempotency(stream, &append.events, |id| {
        Ok::<_, std::convert::Infallible>(known.get(&id).cloned())
    })
    .unwrap_or_else(|never| match never {})?;
    if let IdempotencyCheck::Retry(result) = check {
        return Ok(Decision::Stored(result));
    }
    let actual = versions.get(stream.as_str()).copied().unwrap_or(0);
    if !append.expected.accepts(Version(actual)) {
        return Err(AppendError::WrongExpectedVersion {
            stream: stream.clone(),
            expected: append.expected,
            actual: Version(actual),
        });
    }
    let count = append.events.len() as u64;
    let first_position = *next_position;
    for (offset, event) in append.events.iter().enumerate() {
        let offset = offset as u64;
        known.insert(
            event.event_id,
            StoredId {
                stream: stream.clone(),
                version: Version(actual + 1 + offset),
                position: Position(first_position + offset),
            },
        );
    }
    *next_position += count;
    if let Some(version) = versions.get_mut(stream.as_str()) {
        *version = actual + count;
    }
    Ok(Decision::Write(AppendResult {
        first_version: Version(actual + 1),
        last_version: Version(actual + count),
        first_position: Position(first_position),
        last_position: Position(first_position + count - 1),
    }))
}

/// The accepted appends' events as one array per column, for one INSERT of
/// the whole group (`unnest`), whatever its size.
struct Rows<'a> {
    positions: Vec<i64>,
    ids: Vec<Uuid>,
    streams: Vec<&'a str>,
    versions: Vec<i64>,
    types: Vec<&'a str>,
    schema_versions: Vec<i32>,
    recorded_at: Vec<i64>,
    correlation: Vec<Option<Uuid>>,
    causation: Vec<Option<Uuid>>,
    extra: Vec<Option<Vec<u8>>>,
    payloads: Vec<&'a [u8]>,
}

impl<'a> Rows<'a> {
    fn new(
        group: &'a [Append],
        decisions: &[Result<Decision, AppendError>],
        recorded_at_micros: u64,
    ) -> Result<Self, StoreError> {
        let count: usize = group
            .iter()
            .zip(decisions)
            .filter(|(_, d)| matches!(d, Ok(Decision::Write(_))))
            .map(|(a, _)| a.events.len())
            .sum();
        let mut rows = Rows {
            positions: Vec::with_capacity(count),
            ids: Vec::with_capacity(count),
            streams: Vec::with_capacity(count),
            versions: Vec::with_capacity(count),
            types: Vec::with_capacity(count),
            schema_versions: Vec::with_capacity(count),
            recorded_at: Vec::with_capacity(count),
            correlation: Vec::with_capacity(count),
            causation: Vec::with_capacity(count),
            extra: Vec::with_capacity(count),
            payloads: Vec::with_capacity(count),
        };
        for (append, decision) in group.iter().zip(decisions) {
            let Ok(Decision::Write(result)) = decision else {
                continue;
            };
            for (offset, event) in append.events.iter().enumerate() {
                let offset = offset as u64;
                rows.positions
                    .push(to_sql(result.first_position.0 + offset));
                rows.ids.push(event.event_id);
                rows.streams.push(append.stream.as_str());
                rows.versions.push(to_sql(result.first_version.0 + offset));
                rows.types.push(&event.event_type);
                rows.schema_versions.push(i32::from(event.schema_version));
                rows.recorded_at.push(to_sql(recorded_at_micros));
                rows.correlation.push(event.metadata.correlation_id);
                rows.causation.push(event.metadata.causation_id);
                rows.extra.push(encode_extra(&event.metadata)?);
                rows.payloads.push(&event.payload);
            }
        }
        Ok(rows)
    }
}
