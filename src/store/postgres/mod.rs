//! The [`EventStore`] on PostgreSQL, for several processes sharing one
//! database: one writer task per store commits its process's appends in
//! groups, each transaction holding the lock on one head row, so positions
//! are dense and in commit order across processes; the live feed carries
//! every process's commits. The table layout and the argument that no
//! reader can see position p+1 before p are in docs/design.md, "The
//! PostgreSQL store".

mod config;
mod feed;
mod lease;
mod ops;
mod read_model;
mod reads;
mod schema;
mod writer;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use deadpool_postgres::{Manager, Pool};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_postgres::types::ToSql;
use tokio_postgres::NoTls;
use tracing::debug;

pub use self::config::{PostgresConfig, MAX_SCHEMA_NAME_LEN};
pub use self::read_model::PostgresTransaction;
pub use self::schema::POSTGRES_FORMAT_VERSION;

use self::feed::Feed;
use self::lease::Leases;
use self::reads::{connection, decode_rows, filter_index, to_sql};
use self::schema::Statements;
use self::writer::{Append, Counters, Request, Writer};
use crate::error::{AppendError, ReadError, StoreError};
use crate::event::{
    validate_append, AppendResult, EventFilter, ExpectedVersion, NewEvent, Position, ReadDirection,
    RecordedEvent, Snapshot, StreamId, Version,
};
use crate::store::{
    validate_checkpoint_name, validate_limit, CheckpointLease, EventStore, LiveFeed,
};

/// Every error of the PostgreSQL driver and its pool becomes a
/// [`StoreError`] here, and only here. The message carries the whole chain
/// (tokio-postgres's own says only "db error"); the error stays the source.
pub(crate) fn backend(error: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Backend(crate::error::BackendError::new(
        "postgres",
        DriverError::new(error),
    ))
}

/// A driver error whose message includes its sources.
#[derive(Debug)]
struct DriverError {
    message: String,
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl DriverError {
    fn new(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Self {
            message,
            source: Box::new(error),
        }
    }
}

impl std::fmt::Display for DriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DriverError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// Whether `error` means the connection is gone (closed, terminated by an
/// administrator, the server shutting down or not accepting connections):
/// the same request on a new connection may well succeed.
pub(crate) fn connection_lost(error: &tokio_postgres::Error) -> bool {
    match error.code() {
        None => error.as_db_error().is_none(),
        Some(code) => {
            let class = &code.code()[..2];
            class == "08" || class == "57" || class == "53"
        }
    }
}

/// Counters of a [`PostgresStore`]'s writer, for monitoring and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PostgresStats {
    /// Appends answered with success (idempotent retries included).
    pub appends: u64,
    /// Transactions that wrote events; `appends / transactions` is the mean
    /// group size.
    pub transactions: u64,
    /// Write transactions tried again after a transient failure.
    pub retries: u64,
}

/// What the store's tasks share.
#[derive(Debug)]
struct Shared {
    pool: Pool,
    statements: Arc<Statements>,
    feed: Arc<Feed>,
    closed: AtomicBool,
    /// The checkpoint leases this store holds, whose writes it fences.
    leases: Arc<Leases>,
    /// How to open a connection of its own (a lease's).
    pg_config: tokio_postgres::Config,
}

/// The event store on PostgreSQL.
///
/// Guarantees, beyond those of [`EventStore`]:
/// - an acknowledged append is committed with `synchronous_commit = on`;
/// - positions are dense (1..n, also after rolled-back transactions) and in
///   commit order across every process sharing the schema, and a reader
///   never sees position p+1 before p;
/// - the live feed delivers the commits of every process sharing the
///   schema, in position order: LISTEN/NOTIFY wakes the store, and it polls
///   every [`PostgresConfig::poll_interval`] in case a notification was lost;
/// - a lost connection, a serialization failure, a deadlock or a unique
///   violation is retried inside (up to [`PostgresConfig::retries`] times);
///   an append whose commit may or may not have happened is answered with
///   [`StoreError::OutcomeUnknown`], and retrying it with the same event ids
///   is idempotent;
/// - the pool reconnects by itself: the store needs no restart after the
///   server restarts.
///
/// The store runs its connections and tasks on a small runtime of its own,
/// so it works the same from any tokio runtime (or none, for `open`).
#[derive(Debug)]
pub struct PostgresStore {
    shared: Arc<Shared>,
    sender: mpsc::Sender<Request>,
    counters: Arc<Counters>,
    stop: watch::Sender<bool>,
    config: PostgresConfig,
    runtime: OwnRuntime,
}

/// The store's runtime. Dropping it stops its tasks without waiting: a plain
/// drop of a tokio runtime panics inside an async context, and a store (or
/// a failed `open`) may well be dropped there.
#[derive(Debug)]
struct OwnRuntime(Option<Runtime>);

impl OwnRuntime {
    fn get(&self) -> &Runtime {
        self.0.as_ref().expect("the runtime is taken only by drop")
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl PostgresStore {
    /// Connects, creates the store's tables in the configured schema if it
    /// has none (or checks their format), and starts the writer and the feed.
    /// Blocks the calling thread until then, like
    /// [`SledStore::open`](crate::SledStore::open); it may be called from
    /// inside a tokio runtime.
    ///
    /// # Errors
    /// [`StoreError::InvalidInput`] for a setting refused by
    /// [`PostgresConfig::validate`], before connecting;
    /// [`StoreError::FormatMismatch`] when the schema holds a store of
    /// another format; [`StoreError::NotAStore`] when the schema holds other
    /// tables; [`StoreError::Backend`] when the URL does not parse or the server
    /// cannot be reached.
    pub fn open(config: PostgresConfig) -> Result<Self, StoreError> {
        config.validate()?;
        let mut pg_config: tokio_postgres::Config = config.url.parse().map_err(backend)?;
        pg_config.connect_timeout(config.connect_timeout);
        let runtime = OwnRuntime(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("annals-postgres")
                .enable_all()
                .build()?,
        ));

        let setup = {
            let pg_config = pg_config.clone();
            let schema = config.schema.clone();
            async move {
                let (mut client, connection) = pg_config.connect(NoTls).await.map_err(backend)?;
                let connection = tokio::spawn(connection);
                let head = schema::create_or_check(&mut client, &schema).await;
                drop(client);
                let _ = connection.await;
                head
            }
        };
        // Not `block_on`, which panics inside a runtime: the caller's thread
        // only waits for a channel.
        let (sender, receiver) = std::sync::mpsc::channel();
        runtime.get().spawn(async move {
            let _ = sender.send(setup.await);
        });
        let head = receiver.recv().map_err(|_| StoreError::Closed)??;

        let pool = Pool::builder(Manager::new(pg_config.clone(), NoTls))
            .max_size(config.pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(config.connect_timeout))
            .create_timeout(Some(config.connect_timeout))
            .build()
            .map_err(backend)?;
        let statements = Arc::new(Statements::new(&config.schema));
        let feed = Arc::new(Feed::new(
            config.live_feed_capacity,
            head,
            pool.clone(),
            Arc::clone(&statements),
        ));
        let counters = Arc::new(Counters::default());
        let (sender, receiver) = mpsc::channel(config.queue_capacity);
        let (stop, stopped) = watch::channel(false);
        let wake = Arc::new(Notify::new());
        runtime.get().spawn(
            Writer {
                pool: pool.clone(),
                statements: Arc::clone(&statements),
                feed: Arc::clone(&feed),
                receiver,
                max_group_commit: config.max_group_commit,
                retries: config.retries,
                counters: Arc::clone(&counters),
                begin: format!(
                    "BEGIN; SET LOCAL synchronous_commit = on; SET LOCAL lock_timeout = '{}ms'",
                    config.lock_timeout.as_millis()
                ),
                metrics: crate::metrics::StoreMetrics::new("postgres"),
            }
            .run(),
        );
        runtime.get().spawn(feed::listen(
            pg_config.clone(),
            statements.channel.clone(),
            Arc::clone(&wake),
            stopped.clone(),
        ));
        runtime.get().spawn(feed::poll(
            Arc::clone(&feed),
            wake,
            config.poll_interval,
            stopped,
        ));
        debug!(schema = %config.schema, head, "opened postgres store");
        Ok(Self {
            shared: Arc::new(Shared {
                pool,
                statements,
                feed,
                closed: AtomicBool::new(false),
                leases: Arc::default(),
                pg_config,
            }),
            sender,
            counters,
            stop,
            config,
            runtime,
        })
    }

    /// What the writer has done so far.
    pub fn stats(&self) -> PostgresStats {
        PostgresStats {
            appends: self.counters.appends.load(Ordering::Relaxed),
            transactions: self.counters.transactions.load(Ordering::Relaxed),
            retries: self.counters.retries.load(Ordering::Relaxed),
        }
    }

    /// The configuration the store was opened with.
    pub fn config(&self) -> &PostgresConfig {
        &self.config
    }

    /// Runs `task` on the store's runtime, where its connections live.
    async fn run<T: Send + 'static>(
        &self,
        task: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        match self.runtime.get().spawn(task).await {
            Ok(result) => result,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(_) => Err(StoreError::Closed),
        }
    }

    fn refuse_if_closed(&self) -> Result<(), StoreError> {
        if self.shared.closed.load(Ordering::Acquire) {
            Err(StoreError::Closed)
        } else {
            Ok(())
        }
    }
}

impl Drop for PostgresStore {
    /// Without [`EventStore::shutdown`], stops the store's tasks at once. An
    /// append in flight is rolled back by the server or committed; either
    /// way, what was acknowledged is committed.
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// A checkpoint's position or a snapshot's version as a bigint column: the
/// same 64 bits, so that every `u64` round-trips (values past `i64::MAX`
/// show as negative numbers in psql). Event positions and versions stay far
/// below and are stored as they are.
fn bits(value: u64) -> i64 {
    value as i64
}

fn unbits(value: i64) -> u64 {
    value as u64
}

/// Rows of a query on one pooled connection, with a cached statement. Every
/// query of the store outside the writer is one statement that may run
/// twice (a read, or an upsert to the same value), so one whose connection
/// was lost (a pooled connection the server dropped while idle, say) is
/// run again on a new one.
async fn query(
    shared: &Shared,
    text: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, StoreError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let client = connection(&shared.pool).await?;
        let result = match client.prepare_cached(text).await {
            Ok(statement) => client.query(&statement, params).await,
            Err(error) => Err(error),
        };
        match result {
            Ok(rows) => return Ok(rows),
            Err(error) if connection_lost(&error) && attempts < 3 => {
                drop(deadpool_postgres::Object::take(client));
            }
            Err(error) => return Err(backend(error)),
        }
    }
}

/// As [`query`], for a statement: the number of rows it changed.
async fn query_count(
    shared: &Shared,
    text: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, StoreError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let client = connection(&shared.pool).await?;
        let result = match client.prepare_cached(text).await {
            Ok(statement) => client.execute(&statement, params).await,
            Err(error) => Err(error),
        };
        match result {
            Ok(count) => return Ok(count),
            Err(error) if connection_lost(&error) && attempts < 3 => {
                drop(deadpool_postgres::Object::take(client));
            }
            Err(error) => return Err(backend(error)),
        }
    }
}

#[async_trait]
impl EventStore for PostgresStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, AppendError> {
        validate_append(
            &events,
            self.config.max_event_size,
            "PostgresConfig::max_event_size",
        )?;
        crate::store::ask(&self.sender, |reply| {
            Request::Append(Append {
                stream: stream.clone(),
                expected,
                events,
                reply,
            })
        })
        .await
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from: Version,
        direction: ReadDirection,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        validate_limit(limit)?;
        let shared = Arc::clone(&self.shared);
        let stream = stream.clone();
        Ok(self
            .run(async move {
                let text = match direction {
                    ReadDirection::Forward => &shared.statements.read_stream_forward,
                    ReadDirection::Backward => &shared.statements.read_stream_backward,
                };
                let params: [&(dyn ToSql + Sync); 3] =
                    [&stream.as_str(), &to_sql(from.0), &to_sql(limit as u64)];
                decode_rows(&query(&shared, text, &params).await?)
            })
            .await?)
    }

    async fn read_event(&self, event_id: uuid::Uuid) -> Result<Option<RecordedEvent>, ReadError> {
        let shared = Arc::clone(&self.shared);
        // Built here rather than in `Statements`: one lookup by the unique
        // index, bounded by the head row like every read.
        let s = &self.config.schema;
        let text = format!(
            "SELECT {} FROM {s}.events WHERE event_id = $1 \
             AND position <= (SELECT position FROM {s}.head)",
            schema::EVENT_COLUMNS
        );
        Ok(self
            .run(async move {
                let params: [&(dyn ToSql + Sync); 1] = [&event_id];
                let rows = query(&shared, &text, &params).await?;
                rows.first().map(reads::decode_row).transpose()
            })
            .await?)
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Version, ReadError> {
        let shared = Arc::clone(&self.shared);
        let stream = stream.clone();
        Ok(self
            .run(async move {
                let text = &shared.statements.stream_version;
                let rows = query(&shared, text, &[&stream.as_str()]).await?;
                let version: Option<i64> = rows.first().and_then(|row| row.get(0));
                Ok(Version(version.unwrap_or(0) as u64))
            })
            .await?)
    }

    async fn read_all(
        &self,
        from: Position,
        direction: ReadDirection,
        limit: usize,
        filter: &EventFilter,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        validate_limit(limit)?;
        let shared = Arc::clone(&self.shared);
        let filter = filter.clone();
        Ok(self
            .run(async move {
                let direction_index = match direction {
                    ReadDirection::Forward => 0,
                    ReadDirection::Backward => 1,
                };
                let text = &shared.statements.read_all[direction_index][filter_index(&filter)];
                let (from, limit) = (to_sql(from.0), to_sql(limit as u64));
                let mut params: Vec<&(dyn ToSql + Sync)> = vec![&from, &limit];
                let stream;
                match &filter {
                    EventFilter::All => {}
                    EventFilter::Category(category) => params.push(category),
                    EventFilter::EventTypes(types) => params.push(types),
                    EventFilter::Stream(id) => {
                        stream = id.as_str();
                        params.push(&stream);
                    }
                }
                decode_rows(&query(&shared, text, &params).await?)
            })
            .await?)
    }

    fn writer_status(&self) -> crate::store::WriterStatus {
        if self.sender.is_closed() {
            crate::store::WriterStatus::Closed
        } else {
            crate::store::WriterStatus::Running
        }
    }

    fn head_position(&self) -> Position {
        self.shared.feed.head()
    }

    fn subscribe_live(&self) -> LiveFeed {
        self.shared.feed.subscribe()
    }

    async fn save_snapshot(&self, stream: &StreamId, snapshot: Snapshot) -> Result<(), StoreError> {
        self.refuse_if_closed()?;
        let shared = Arc::clone(&self.shared);
        let stream = stream.clone();
        self.run(async move {
            let text = &shared.statements.save_snapshot;
            let version = bits(snapshot.version.0);
            query(
                &shared,
                text,
                &[&stream.as_str(), &version, &snapshot.payload],
            )
            .await?;
            Ok(())
        })
        .await
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, ReadError> {
        let shared = Arc::clone(&self.shared);
        let stream = stream.clone();
        Ok(self
            .run(async move {
                let text = &shared.statements.load_snapshot;
                let rows = query(&shared, text, &[&stream.as_str()]).await?;
                Ok(rows.first().map(|row| Snapshot {
                    version: Version(unbits(row.get(0))),
                    payload: row.get(1),
                }))
            })
            .await?)
    }

    async fn delete_snapshot(&self, stream: &StreamId) -> Result<(), StoreError> {
        self.refuse_if_closed()?;
        let shared = Arc::clone(&self.shared);
        let stream = stream.clone();
        self.run(async move {
            let text = &shared.statements.delete_snapshot;
            query(&shared, text, &[&stream.as_str()]).await?;
            Ok(())
        })
        .await
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError> {
        validate_checkpoint_name(name)?;
        // Refused after shutdown, as every backend does (the contract).
        self.refuse_if_closed()?;
        let shared = Arc::clone(&self.shared);
        let name = name.to_owned();
        self.run(async move {
            // A lease holder's save is fenced on its epoch (see `lease`).
            match shared.leases.epoch(&name) {
                None => {
                    let text = &shared.statements.save_checkpoint;
                    query(&shared, text, &[&name, &bits(position.0)]).await?;
                }
                Some(epoch) => {
                    let text = &shared.statements.save_leased_checkpoint;
                    let saved =
                        query_count(&shared, text, &[&name, &bits(position.0), &epoch]).await?;
                    if saved != 1 {
                        return Err(StoreError::LeaseLost { name });
                    }
                }
            }
            Ok(())
        })
        .await
    }

    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, ReadError> {
        validate_checkpoint_name(name)?;
        let shared = Arc::clone(&self.shared);
        let name = name.to_owned();
        Ok(self
            .run(async move {
                let text = &shared.statements.load_checkpoint;
                let rows = query(&shared, text, &[&name]).await?;
                Ok(rows.first().map(|row| Position(unbits(row.get(0)))))
            })
            .await?)
    }

    /// True: other processes may write the same schema.
    fn shared_by_processes(&self) -> bool {
        true
    }

    /// A session advisory lock on a connection of the lease's own, and a new
    /// epoch in the schema's `leases` table that fences the previous
    /// holder's checkpoint writes (docs/design.md, "Projections on several
    /// processes"). The lock goes when the lease is dropped or its process
    /// dies (the server closes the connection).
    async fn lease_checkpoint(&self, name: &str) -> Result<Option<CheckpointLease>, StoreError> {
        validate_checkpoint_name(name)?;
        self.refuse_if_closed()?;
        let task = lease::take(
            self.shared.pg_config.clone(),
            Arc::clone(&self.shared.statements),
            Arc::clone(&self.shared.leases),
            self.config.schema.clone(),
            name.to_owned(),
        );
        self.run(task).await
    }

    /// Lets the writer commit what was queued before this call, then refuses
    /// appends, snapshot writes and checkpoint saves
    /// ([`StoreError::Closed`]) and ends the live feed. Reads still work.
    /// Every acknowledged
    /// append is committed; nothing needs flushing.
    async fn shutdown(&self) -> Result<(), StoreError> {
        let (reply, done) = oneshot::channel();
        if self.sender.send(Request::Shutdown { reply }).await.is_ok() {
            // An error only means the writer stopped already.
            let _ = done.await;
        }
        self.shared.closed.store(true, Ordering::Release);
        let _ = self.stop.send(true);
        self.shared.feed.close();
        Ok(())
    }
}
