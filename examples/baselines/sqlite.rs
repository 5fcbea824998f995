//! The store a Rust developer would write instead of annals: events in
//! SQLite (rusqlite, bundled), built as a competent one would (issue 14):
//! WAL with `synchronous=FULL` (every commit fsynced), `position INTEGER
//! PRIMARY KEY`, `UNIQUE(stream_id, version)` and a unique event id; one
//! writer thread that drains the queued appends into one `BEGIN IMMEDIATE`
//! transaction; cached prepared statements; a cache of committed stream
//! heads; an append refused (wrong expected version, reused event id) is
//! answered without aborting the rest of its group.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::mpsc;

use annals::store::Metadata;
use annals::{Position, RecordedEvent, StreamId, Version};
use rusqlite::{params, Connection, OptionalExtension};
use uuid::Uuid;

type Result<T, E = Box<dyn std::error::Error + Send + Sync>> = std::result::Result<T, E>;

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS events (
        position INTEGER PRIMARY KEY,
        event_id BLOB NOT NULL UNIQUE,
        stream_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        event_type TEXT NOT NULL,
        schema_version INTEGER NOT NULL,
        recorded_at_micros INTEGER NOT NULL,
        correlation_id BLOB,
        causation_id BLOB,
        payload BLOB NOT NULL,
        UNIQUE (stream_id, version)
    );";

const INSERT: &str = "INSERT INTO events (event_id, stream_id, version, event_type, \
    schema_version, recorded_at_micros, correlation_id, causation_id, payload) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";
const HEAD: &str = "SELECT MAX(version) FROM events WHERE stream_id = ?1";

/// One event to append, encoded by the caller.
pub(crate) struct SqlEvent {
    pub(crate) event_id: Uuid,
    pub(crate) event_type: String,
    pub(crate) payload: Vec<u8>,
}

/// What an appender expects of the stream's version.
#[derive(Clone, Copy)]
#[allow(dead_code)]
pub(crate) enum Expected {
    Any,
    Exact(u64),
}

/// Why an append was refused.
#[derive(Debug)]
pub(crate) enum Refused {
    WrongVersion { actual: u64 },
    Failed(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::WrongVersion { actual } => write!(f, "wrong expected version (at {actual})"),
            Self::Failed(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Refused {}

struct Request {
    stream: String,
    expected: Expected,
    events: Vec<SqlEvent>,
    reply: tokio::sync::oneshot::Sender<Result<u64, Refused>>,
}

/// A cheap handle to the writer thread; appends from any task.
#[derive(Clone)]
pub(crate) struct SqliteStore {
    requests: mpsc::Sender<Request>,
}

/// The largest group one transaction takes: bounds the time a caller waits
/// behind others.
const MAX_GROUP: usize = 16_384;

pub(crate) fn connect(path: &Path) -> Result<Connection> {
    let connection = Connection::open(path)?;
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", "FULL")?;
    connection.execute_batch(SCHEMA)?;
    Ok(connection)
}

impl SqliteStore {
    /// Opens (or creates) the database at `path` and starts its writer
    /// thread, which ends when every handle is dropped. Also returns the
    /// number of group commits made so far (read after the handles drop).
    pub(crate) fn open(path: &Path) -> Result<(Self, std::thread::JoinHandle<Result<u64>>)> {
        let connection = connect(path)?;
        let (requests, queue) = mpsc::channel();
        let writer = std::thread::spawn(move || write_loop(connection, queue));
        Ok((Self { requests }, writer))
    }

    /// Appends `events` to `stream` if its version is `expected`; answers
    /// once the transaction holding them is committed (fsynced). Returns the
    /// stream's new version.
    pub(crate) async fn append(
        &self,
        stream: &str,
        expected: Expected,
        events: Vec<SqlEvent>,
    ) -> Result<u64> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.requests
            .send(Request {
                stream: stream.to_owned(),
                expected,
                events,
                reply,
            })
            .map_err(|_| "the SQLite writer stopped")?;
        Ok(answer.await??)
    }
}

fn micros_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn write_loop(mut connection: Connection, queue: mpsc::Receiver<Request>) -> Result<u64> {
    connection.set_prepared_statement_cache_capacity(16);
    // Committed heads; a group's own heads go in `pending` until it commits.
    let mut heads: HashMap<String, u64> = HashMap::new();
    let mut commits = 0u64;
    while let Ok(first) = queue.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(request) => group.push(request),
                Err(_) => break,
            }
        }
        let recorded_at = micros_now();
        let mut pending: HashMap<String, u64> = HashMap::new();
        let mut answers = Vec::with_capacity(group.len());
        let transaction =
            connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut insert = transaction.prepare_cached(INSERT)?;
            let mut head_query = transaction.prepare_cached(HEAD)?;
            for request in group {
                let head = match pending.get(&request.stream).or(heads.get(&request.stream)) {
                    Some(head) => *head,
                    None => head_query
                        .query_row([&request.stream], |row| row.get::<_, Option<i64>>(0))
                        .optional()?
                        .flatten()
                        .map_or(0, |v| v as u64),
                };
                if let Expected::Exact(version) = request.expected {
                    if version != head {
                        answers.push((request.reply, Err(Refused::WrongVersion { actual: head })));
                        continue;
                    }
                }
                // A multi-event append is all or nothing inside the group: a
                // savepoint undoes its first events if a later one fails. A
                // single insert that fails undoes itself (ON CONFLICT ABORT).
                let several = request.events.len() > 1;
                if several {
                    transaction.execute_batch("SAVEPOINT append")?;
                }
                let mut version = head;
                let mut failed = None;
                for event in &request.events {
                    version += 1;
                    if let Err(e) = insert.execute(params![
                        event.event_id.as_bytes(),
                        request.stream,
                        version as i64,
                        event.event_type,
                        1u16,
                        recorded_at as i64,
                        Option::<&[u8]>::None,
                        Option::<&[u8]>::None,
                        event.payload,
                    ]) {
                        failed = Some(e.to_string());
                        break;
                    }
                }
                if several {
                    if failed.is_some() {
                        transaction.execute_batch("ROLLBACK TO append; RELEASE append")?;
                    } else {
                        transaction.execute_batch("RELEASE append")?;
                    }
                }
                match failed {
                    Some(e) => answers.push((request.reply, Err(Refused::Failed(e)))),
                    None => {
                        pending.insert(request.stream, version);
                        answers.push((request.reply, Ok(version)));
                    }
                }
            }
        }
        transaction.commit()?;
        commits += 1;
        heads.extend(pending);
        for (reply, answer) in answers {
            let _ = reply.send(answer);
        }
    }
    Ok(commits)
}

/// Writes `events` counter events as the sled figures' bulk store has them
/// (1,000 per append to streams `counter-bulk-{k % 1000}`, each append's
/// events one after another), in transactions of 100,000.
pub(crate) fn fill_bulk(path: &Path, events: u64, event_type: &str, payload: &[u8]) -> Result<()> {
    let mut connection = connect(path)?;
    let mut versions = vec![0u64; 1000];
    let mut written = 0u64;
    while written < events {
        let transaction = connection.transaction()?;
        {
            let mut insert = transaction.prepare_cached(INSERT)?;
            let end = (written + 100_000).min(events);
            let recorded_at = micros_now();
            while written < end {
                let append = (written / 1000) as usize;
                let stream = append % 1000;
                versions[stream] += 1;
                insert.execute(params![
                    Uuid::now_v7().as_bytes(),
                    format!("counter-bulk-{stream}"),
                    versions[stream] as i64,
                    event_type,
                    1u16,
                    recorded_at as i64,
                    Option::<&[u8]>::None,
                    Option::<&[u8]>::None,
                    payload,
                ])?;
                written += 1;
            }
        }
        transaction.commit()?;
    }
    Ok(())
}

fn uuid(bytes: Option<Vec<u8>>) -> rusqlite::Result<Option<Uuid>> {
    bytes
        .map(|b| Uuid::from_slice(&b))
        .transpose()
        .map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, e.into())
        })
}

/// Reads the whole table in position order, each row decoded into the
/// owned [`RecordedEvent`] a catch-up hands out; returns the count.
pub(crate) fn scan(path: &Path) -> Result<u64> {
    let connection = connect(path)?;
    let mut statement = connection.prepare(
        "SELECT position, event_id, stream_id, version, event_type, schema_version, \
         recorded_at_micros, correlation_id, causation_id, payload FROM events ORDER BY position",
    )?;
    let mut rows = statement.query([])?;
    let mut count = 0u64;
    let mut bytes = 0usize;
    while let Some(row) = rows.next()? {
        let id: [u8; 16] = row.get(1)?;
        let stream: String = row.get(2)?;
        let event = RecordedEvent {
            position: Position(row.get::<_, i64>(0)? as u64),
            event_id: Uuid::from_bytes(id),
            stream_id: StreamId::new(stream)?,
            version: Version(row.get::<_, i64>(3)? as u64),
            event_type: row.get(4)?,
            schema_version: row.get(5)?,
            recorded_at_micros: row.get::<_, i64>(6)? as u64,
            metadata: Metadata {
                correlation_id: uuid(row.get(7)?)?,
                causation_id: uuid(row.get(8)?)?,
                extra: BTreeMap::new(),
            },
            payload: row.get(9)?,
        };
        bytes += event.payload.len();
        std::hint::black_box(&event);
        count += 1;
    }
    std::hint::black_box(bytes);
    Ok(count)
}
