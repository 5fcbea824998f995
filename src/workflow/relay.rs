//! The outbox relay: follows the log from a durable checkpoint and publishes
//! every committed event, in position order, to a broker through an
//! [`EventSink`]; [`JetStreamSink`] is the NATS JetStream one.
//!
//! What is guaranteed (see also `docs/design.md`, "The relay"):
//!
//! - **At least once into the broker.** The checkpoint `relay:<name>` is
//!   saved only after the sink returned, that is after the broker
//!   acknowledged every event up to it. A crash therefore loses no event: the
//!   next start re-publishes from the checkpoint, which may repeat events the
//!   broker had already acknowledged.
//! - **Duplicates removed within the broker's window.** A re-published event
//!   carries the same message id (its event id), so JetStream drops it when
//!   the first copy is still inside the stream's duplicate window
//!   ([`JetStreamStream::duplicate_window`]); older repeats are delivered
//!   again, and consumers that must be exact de-duplicate by event id.
//! - **Order.** One relay publishes in position order, and waits for a
//!   batch's acknowledgements before it sends the next batch: the broker
//!   stores the events of one stream (and of the whole log) in position
//!   order. Within a batch [`JetStreamSink`] pipelines up to
//!   [`JetStreamSink::with_max_in_flight`] messages on one connection, which
//!   the server stores in the order sent; set it to 1 to never have more than
//!   one message unacknowledged.
//! - **The log is the source of truth.** A broker may lose acknowledged
//!   writes (JetStream did so in a published Jepsen analysis), so nothing is
//!   ever deleted from the log for having been relayed, and
//!   [`Relay::replay_from`] re-publishes from any position.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::message::PublishMessage;
use async_nats::HeaderMap;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, Instant};
use tracing::{debug, info, warn};

use crate::error::{InvalidInput, ReadError, StoreError, SubscriptionError};
use crate::event::{EventFilter, Position, RecordedEvent};
use crate::projection::{subscribe, Delivery, Subscription, DEFAULT_PAGE_SIZE};
use crate::store::{validate_checkpoint_name, EventStore};

/// The prefix of a relay's checkpoint name: relay `orders` saves its
/// position as the checkpoint `relay:orders`.
pub const RELAY_CHECKPOINT_PREFIX: &str = "relay:";

/// A broker that the [`Relay`] publishes to.
///
/// A Kafka, RabbitMQ or test sink implements this one method. The relay
/// calls it with one batch at a time and never calls it again before the
/// previous call returned.
pub trait EventSink: Send + 'static {
    /// Why a publish failed. The relay records it in its status and retries
    /// the whole batch with backoff.
    type Error: StdError + Send + Sync + 'static;

    /// Publishes `events` (non-empty, in increasing position order) and
    /// returns `Ok` only once the broker has acknowledged every one of them.
    ///
    /// On `Err` some of the events may have reached the broker: the relay
    /// publishes the same batch again, so a sink should give each message an
    /// idempotency key the broker de-duplicates on (the event id).
    fn publish(
        &mut self,
        events: &[RecordedEvent],
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// How to run a [`Relay`]: built with [`RelayConfig::new`] and the builder
/// methods.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    name: String,
    filter: EventFilter,
    batch_size: usize,
    page_size: usize,
    checkpoint_every_events: u64,
    checkpoint_interval: Duration,
    retry_initial: Duration,
    retry_max: Duration,
    shutdown_timeout: Duration,
}

impl RelayConfig {
    /// The defaults for the relay named `name` (checkpoint `relay:<name>`):
    /// the whole log, batches of 256 events, the checkpoint saved every 1000
    /// events or 1 s with progress, retries from 100 ms doubling to 10 s, and
    /// 10 s for a shutdown to publish what it had read.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            filter: EventFilter::All,
            batch_size: 256,
            page_size: DEFAULT_PAGE_SIZE,
            checkpoint_every_events: 1000,
            checkpoint_interval: Duration::from_secs(1),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(10),
        }
    }

    /// Publishes only the events that pass `filter` (default: all). The
    /// checkpoint still moves past the events filtered out.
    pub fn filter(mut self, filter: EventFilter) -> Self {
        self.filter = filter;
        self
    }

    /// The most events handed to the sink in one call (at least 1).
    pub fn batch_size(mut self, events: usize) -> Self {
        self.batch_size = events.max(1);
        self
    }

    /// Events read per catch-up page of the log (at least 1).
    pub fn page_size(mut self, events: usize) -> Self {
        self.page_size = events.max(1);
        self
    }

    /// Saves the checkpoint after `events` acknowledged events (at least 1)
    /// or `interval` after the first unsaved progress, whichever comes
    /// first. A crash re-publishes at most what was acknowledged since.
    pub fn checkpoint_every(mut self, events: u64, interval: Duration) -> Self {
        self.checkpoint_every_events = events.max(1);
        self.checkpoint_interval = interval;
        self
    }

    /// The wait after a failed publish, doubling from `initial` up to `max`.
    pub fn retry_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.retry_initial = initial;
        self.retry_max = max.max(initial);
        self
    }

    /// How long [`Relay::shutdown`] keeps retrying to publish the events it
    /// had already read before it gives up on them.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// The relay's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name of the checkpoint the relay saves: `relay:<name>`.
    pub fn checkpoint_name(&self) -> String {
        format!("{RELAY_CHECKPOINT_PREFIX}{}", self.name)
    }
}

/// What a relay is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelayState {
    /// Publishing, or waiting for new events.
    Running,
    /// The last publish failed; it is retried after a backoff.
    Retrying,
    /// The store shut down and every event was published.
    Ended,
    /// [`Relay::shutdown`] returned, or the task stopped.
    Stopped,
}

/// A snapshot of a relay's progress, from [`Relay::status`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayStatus {
    /// The relay's name.
    pub name: String,
    /// What it is doing.
    pub state: RelayState,
    /// Every event at or below this position was acknowledged by the broker
    /// (or did not pass the filter).
    pub position: Position,
    /// The last saved checkpoint: where a restart would begin.
    pub checkpoint: Position,
    /// The store's head when the status was taken.
    pub head: Position,
    /// `head - position`: how many positions the relay is behind.
    pub lag: u64,
    /// Events acknowledged by the broker since the relay started (repeats
    /// after a [`Relay::replay_from`] count again).
    pub events_published: u64,
    /// Failed attempts of the current batch (0 once it went through).
    pub failed_attempts: u32,
    /// The most recent failure (publish, read or checkpoint save), kept
    /// after the relay recovered.
    pub last_error: Option<String>,
}

/// Why a relay call failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The relay's name makes an invalid checkpoint name.
    #[error("invalid relay name: {0}")]
    InvalidInput(#[from] InvalidInput),
    /// Loading the checkpoint failed.
    #[error("loading the relay's checkpoint failed: {0}")]
    Read(#[from] ReadError),
    /// Saving the checkpoint failed.
    #[error("saving the relay's checkpoint failed: {0}")]
    Store(#[from] StoreError),
    /// The sink kept failing until the shutdown timeout: the events after
    /// the returned checkpoint were not all acknowledged and will be
    /// published by the next start.
    #[error("the sink did not acknowledge the events read before shutdown: {0}")]
    Sink(String),
    /// The relay's task is no longer running.
    #[error("the relay is not running")]
    NotRunning,
}

/// A running relay: a cheap `Clone` handle on the task that follows the log
/// and publishes to the sink.
///
/// Nothing relies on `Drop`: call [`Relay::shutdown`] to publish what was
/// read and save the checkpoint. (When every handle is dropped the task
/// shuts down the same way, unobserved.)
#[derive(Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    store: Arc<dyn EventStore>,
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<RelayStatus>,
    join: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relay")
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

enum Command {
    ReplayFrom(Position, oneshot::Sender<Result<(), RelayError>>),
    Shutdown(oneshot::Sender<Result<Position, RelayError>>),
}

impl Relay {
    /// Starts relaying after the checkpoint `relay:<name>` (from the start
    /// of the log when none is saved) and returns at once.
    ///
    /// # Errors
    /// [`RelayError::InvalidInput`] for a name that makes no valid
    /// checkpoint name, [`RelayError::Read`] when the checkpoint cannot be
    /// loaded.
    pub async fn start<S: EventSink>(
        store: Arc<dyn EventStore>,
        config: RelayConfig,
        sink: S,
    ) -> Result<Relay, RelayError> {
        let checkpoint_name = config.checkpoint_name();
        validate_checkpoint_name(&checkpoint_name)?;
        let from = store
            .load_checkpoint(&checkpoint_name)
            .await?
            .unwrap_or(Position::START);
        info!(relay = %config.name, %from, "relay starting");
        let initial = RelayStatus {
            name: config.name.clone(),
            state: RelayState::Running,
            position: from,
            checkpoint: from,
            head: store.head_position(),
            lag: 0,
            events_published: 0,
            failed_attempts: 0,
            last_error: None,
        };
        let (status_sender, status) = watch::channel(initial);
        // Commands are rare (replay, shutdown): a small queue is enough.
        let (commands, command_receiver) = mpsc::channel(8);
        let worker = Worker {
            subscription: subscribe(Arc::clone(&store), from, config.filter.clone())
                .with_page_size(config.page_size),
            checkpoint_name,
            store: Arc::clone(&store),
            sink,
            commands: command_receiver,
            status: status_sender,
            batch: VecDeque::new(),
            position: from,
            checkpoint: from,
            unsaved_events: 0,
            checkpoint_due: None,
            ended: false,
            metrics: crate::metrics::RelayMetrics::new(&config.name),
            config: config.clone(),
        };
        let join = tokio::spawn(worker.run());
        Ok(Relay {
            inner: Arc::new(Inner {
                name: config.name,
                store,
                commands,
                status,
                join: std::sync::Mutex::new(Some(join)),
            }),
        })
    }

    /// The relay's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The relay's progress now: position acknowledged by the broker, saved
    /// checkpoint, lag behind the store's head, and the last error. Answers
    /// at once, even while a publish is in flight.
    pub fn status(&self) -> RelayStatus {
        let mut status = self.inner.status.borrow().clone();
        if self.inner.status.has_changed().is_err() {
            status.state = RelayState::Stopped;
        }
        status.head = self.inner.store.head_position();
        status.lag = status.head.0.saturating_sub(status.position.0);
        status
    }

    /// Waits until the broker acknowledged every event up to and including
    /// `position`, and returns the status then. It waits as long as that
    /// takes: bound it with `tokio::time::timeout` when the broker may be
    /// down or `position` may never be committed.
    ///
    /// # Errors
    /// [`RelayError::NotRunning`] when the relay stopped before.
    pub async fn wait_for(&self, position: Position) -> Result<RelayStatus, RelayError> {
        let mut receiver = self.inner.status.clone();
        receiver
            .wait_for(|status| status.position >= position)
            .await
            .map_err(|_| RelayError::NotRunning)?;
        Ok(self.status())
    }

    /// Moves the relay to `position` (exclusive: the next event published is
    /// the first one after it) and saves that as its checkpoint, so that a
    /// crash afterwards also resumes from there. `Position::START`
    /// re-publishes the whole log; a position ahead of the relay skips the
    /// events in between. A batch in flight is finished (or, while it is
    /// being retried, given up) first.
    ///
    /// # Errors
    /// [`RelayError::Store`] when the checkpoint cannot be saved (the relay
    /// still continues from `position`), [`RelayError::NotRunning`] when the
    /// relay stopped.
    pub async fn replay_from(&self, position: Position) -> Result<(), RelayError> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .commands
            .send(Command::ReplayFrom(position, reply))
            .await
            .map_err(|_| RelayError::NotRunning)?;
        answer.await.map_err(|_| RelayError::NotRunning)?
    }

    /// Stops the relay cleanly: publishes the events it had already read
    /// from the log (retrying for at most the configured shutdown timeout),
    /// saves the checkpoint, ends the task and returns the checkpoint.
    /// Shut the relay down before the store: a shut-down store refuses the
    /// checkpoint save ([`RelayError::Store`]), and the next start then
    /// re-publishes from the last saved checkpoint.
    ///
    /// # Errors
    /// [`RelayError::Sink`] when the read events could not be published in
    /// time (the checkpoint then covers what was acknowledged),
    /// [`RelayError::Store`] when the checkpoint cannot be saved,
    /// [`RelayError::NotRunning`] when the relay had already stopped.
    pub async fn shutdown(&self) -> Result<Position, RelayError> {
        let (reply, answer) = oneshot::channel();
        let sent = self.inner.commands.send(Command::Shutdown(reply)).await;
        let result = match sent {
            Ok(()) => answer.await.unwrap_or(Err(RelayError::NotRunning)),
            Err(_) => Err(RelayError::NotRunning),
        };
        let join = self
            .inner
            .join
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(join) = join {
            // The task ends right after answering; a panic in it shows here.
            if join.await.is_err() {
                return Err(RelayError::NotRunning);
            }
        }
        result
    }
}

/// The task: owns the subscription, the sink and the checkpoint.
struct Worker<S> {
    config: RelayConfig,
    checkpoint_name: String,
    store: Arc<dyn EventStore>,
    sink: S,
    subscription: Subscription,
    commands: mpsc::Receiver<Command>,
    status: watch::Sender<RelayStatus>,
    /// The batch being published, in position order.
    batch: VecDeque<RecordedEvent>,
    /// Everything up to here was acknowledged (or filtered out).
    position: Position,
    /// The last saved checkpoint.
    checkpoint: Position,
    unsaved_events: u64,
    /// When the checkpoint must be saved, if there is unsaved progress.
    checkpoint_due: Option<Instant>,
    /// The store shut down and everything was published.
    ended: bool,
    metrics: crate::metrics::RelayMetrics,
}

/// What interrupted a publish that was being retried.
enum Interrupted {
    Command(Command),
    /// Every handle was dropped.
    Closed,
}

impl<S: EventSink> Worker<S> {
    async fn run(mut self) {
        let mut pending: Option<Interrupted> = None;
        loop {
            if let Some(interrupted) = pending.take() {
                match interrupted {
                    Interrupted::Command(Command::ReplayFrom(position, reply)) => {
                        let _ = reply.send(self.replay_from(position).await);
                        continue;
                    }
                    Interrupted::Command(Command::Shutdown(reply)) => {
                        let _ = reply.send(self.finish().await);
                        return;
                    }
                    Interrupted::Closed => {
                        let _ = self.finish().await;
                        return;
                    }
                }
            }
            let due = self.checkpoint_due;
            // Biased: a shutdown or replay is taken before the next batch,
            // and a due checkpoint before more publishing.
            tokio::select! {
                biased;
                command = self.commands.recv() => {
                    pending = Some(command.map_or(Interrupted::Closed, Interrupted::Command));
                }
                () = sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    self.save_checkpoint().await;
                }
                delivery = self.subscription.next_delivery(), if !self.ended => {
                    pending = self.handle(delivery).await;
                }
            }
        }
    }

    async fn handle(
        &mut self,
        delivery: Result<Delivery, SubscriptionError>,
    ) -> Option<Interrupted> {
        match delivery {
            Ok(Delivery::Event(event)) => {
                self.batch.push_back(event);
                let room = self.config.batch_size - 1;
                self.subscription.take_buffered(room, &mut self.batch);
                self.publish_batch(None).await.err()
            }
            Ok(Delivery::Passed(position)) => {
                self.advance(position, 0).await;
                None
            }
            Ok(Delivery::End) => {
                info!(relay = %self.config.name, position = %self.position, "store shut down; relay ended");
                self.ended = true;
                // The store refuses writes now; the saved checkpoint stays
                // where the last save put it, and a restart re-publishes
                // from there (de-duplicated by the broker).
                self.checkpoint_due = None;
                self.status
                    .send_modify(|status| status.state = RelayState::Ended);
                None
            }
            Err(error) => {
                warn!(relay = %self.config.name, %error, "reading the log failed; retrying");
                self.record_error(error.to_string(), RelayState::Retrying);
                // The subscription keeps its place; wait before reading again.
                let delay = self.config.retry_initial;
                tokio::select! {
                    biased;
                    command = self.commands.recv() => {
                        Some(command.map_or(Interrupted::Closed, Interrupted::Command))
                    }
                    () = sleep(delay) => None,
                }
            }
        }
    }

    /// Publishes the batch until the sink acknowledges it, with backoff.
    /// Without a `deadline`, a command interrupts the retries (the batch
    /// stays, to be published again or dropped by the caller); with one,
    /// it gives up at the deadline and returns the last error.
    async fn publish_batch(&mut self, deadline: Option<Instant>) -> Result<(), Interrupted> {
        let mut delay = self.config.retry_initial;
        let mut attempts = 0u32;
        while !self.batch.is_empty() {
            let events = self.batch.make_contiguous();
            let last = events[events.len() - 1].position;
            let count = events.len() as u64;
            match self.sink.publish(events).await {
                Ok(()) => {
                    debug!(relay = %self.config.name, %last, count, "batch acknowledged");
                    self.batch.clear();
                    self.status.send_modify(|status| {
                        status.events_published += count;
                        status.failed_attempts = 0;
                        status.state = RelayState::Running;
                    });
                    self.advance(last, count).await;
                }
                Err(error) => {
                    attempts += 1;
                    warn!(relay = %self.config.name, %error, attempts, first = %self.batch[0].position, "publish failed; retrying");
                    self.record_error(error.to_string(), RelayState::Retrying);
                    self.status
                        .send_modify(|status| status.failed_attempts = attempts);
                    match deadline {
                        Some(deadline) => {
                            if Instant::now() + delay > deadline {
                                return Err(Interrupted::Closed);
                            }
                            sleep(delay).await;
                        }
                        None => {
                            tokio::select! {
                                biased;
                                command = self.commands.recv() => {
                                    return Err(command.map_or(Interrupted::Closed, Interrupted::Command));
                                }
                                () = sleep(delay) => {}
                            }
                        }
                    }
                    delay = (delay * 2).min(self.config.retry_max);
                }
            }
        }
        Ok(())
    }

    /// Records progress through `position` after `events` acknowledged
    /// events, and saves the checkpoint when enough accumulated.
    async fn advance(&mut self, position: Position, events: u64) {
        self.position = position;
        self.unsaved_events += events;
        self.status.send_modify(|status| status.position = position);
        self.metrics
            .advanced(position, self.store.head_position(), events);
        if self.unsaved_events >= self.config.checkpoint_every_events {
            self.save_checkpoint().await;
        } else if self.checkpoint_due.is_none() && self.position > self.checkpoint {
            self.checkpoint_due = Some(Instant::now() + self.config.checkpoint_interval);
        }
    }

    async fn save_checkpoint(&mut self) -> Option<StoreError> {
        if self.position == self.checkpoint {
            self.checkpoint_due = None;
            return None;
        }
        match self
            .store
            .save_checkpoint(&self.checkpoint_name, self.position)
            .await
        {
            Ok(()) => {
                self.checkpoint = self.position;
                self.unsaved_events = 0;
                self.checkpoint_due = None;
                let checkpoint = self.checkpoint;
                self.status
                    .send_modify(|status| status.checkpoint = checkpoint);
                None
            }
            Err(error) => {
                warn!(relay = %self.config.name, %error, "saving the relay checkpoint failed");
                self.record_error(error.to_string(), RelayState::Running);
                // Try again after another interval rather than after every
                // batch: the store is probably failing for everyone.
                self.checkpoint_due = Some(Instant::now() + self.config.checkpoint_interval);
                Some(error)
            }
        }
    }

    async fn replay_from(&mut self, position: Position) -> Result<(), RelayError> {
        info!(relay = %self.config.name, from = %self.position, to = %position, "relay replaying");
        // A batch still here was being retried: it is re-read if it lies
        // after `position`, skipped on purpose otherwise.
        self.batch.clear();
        self.subscription = subscribe(
            Arc::clone(&self.store),
            position,
            self.config.filter.clone(),
        )
        .with_page_size(self.config.page_size);
        self.position = position;
        self.ended = false;
        self.status.send_modify(|status| {
            status.position = position;
            status.state = RelayState::Running;
            status.failed_attempts = 0;
        });
        // Saved even when `position` equals the old checkpoint, so a crash
        // right after this call resumes from `position` too.
        self.checkpoint = Position::END;
        match self.save_checkpoint().await {
            None => Ok(()),
            Some(error) => Err(error.into()),
        }
    }

    /// Publishes what was read, saves the checkpoint, marks the relay
    /// stopped.
    async fn finish(&mut self) -> Result<Position, RelayError> {
        self.subscription.take_buffered(usize::MAX, &mut self.batch);
        let deadline = Instant::now() + self.config.shutdown_timeout;
        let published = self.publish_batch(Some(deadline)).await;
        let saved = self.save_checkpoint().await;
        let last_error = self.status.borrow().last_error.clone();
        self.status
            .send_modify(|status| status.state = RelayState::Stopped);
        info!(relay = %self.config.name, checkpoint = %self.checkpoint, "relay stopped");
        if published.is_err() {
            return Err(RelayError::Sink(last_error.unwrap_or_default()));
        }
        match saved {
            None => Ok(self.checkpoint),
            Some(error) => Err(error.into()),
        }
    }

    fn record_error(&self, error: String, state: RelayState) {
        self.metrics
            .failed(self.position, self.store.head_position());
        self.status.send_modify(|status| {
            status.last_error = Some(error);
            status.state = state;
        });
    }
}

// ---------------------------------------------------------------------------
// NATS JetStream

/// Header carrying the event's stream id.
pub const HEADER_STREAM_ID: &str = "Annals-Stream-Id";
/// Header carrying the event's version in its stream (decimal).
pub const HEADER_VERSION: &str = "Annals-Version";
/// Header carrying the event's global position (decimal).
pub const HEADER_POSITION: &str = "Annals-Position";
/// Header carrying the event's type name, unescaped.
pub const HEADER_EVENT_TYPE: &str = "Annals-Event-Type";
/// Header carrying the event's schema version (decimal).
pub const HEADER_SCHEMA_VERSION: &str = "Annals-Schema-Version";
/// Header carrying when the event was recorded, in microseconds since the
/// Unix epoch (decimal).
pub const HEADER_RECORDED_AT_MICROS: &str = "Annals-Recorded-At-Micros";
/// Header carrying the correlation id, when the event has one.
pub const HEADER_CORRELATION_ID: &str = "Annals-Correlation-Id";
/// Header carrying the causation id, when the event has one.
pub const HEADER_CAUSATION_ID: &str = "Annals-Causation-Id";
/// JetStream's de-duplication header; the relay sets it to the event id.
pub const HEADER_MESSAGE_ID: &str = "Nats-Msg-Id";

/// Why a JetStream call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JetStreamError {
    /// The subject prefix is not one or more valid NATS subject tokens.
    #[error("invalid subject prefix {prefix:?}: {reason}")]
    InvalidPrefix {
        /// The prefix given.
        prefix: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Connecting to the NATS server failed.
    #[error("connecting to NATS failed: {0}")]
    Connect(#[source] Box<dyn StdError + Send + Sync>),
    /// Creating or updating the JetStream stream failed.
    #[error("creating the JetStream stream {stream:?} failed: {source}")]
    Stream {
        /// The stream's name.
        stream: String,
        /// The client's error.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// Sending an event, or its acknowledgement, failed (the event may or
    /// may not be stored: publishing it again is safe within the duplicate
    /// window).
    #[error("publishing the event at position {position} failed: {source}")]
    Publish {
        /// The event's position in the log.
        position: Position,
        /// The client's error.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
}

/// How [`JetStreamSink::ensure_stream`] creates the JetStream stream that
/// captures the relay's subjects.
#[derive(Debug, Clone)]
pub struct JetStreamStream {
    name: String,
    duplicate_window: Duration,
    memory: bool,
    max_age: Duration,
}

impl JetStreamStream {
    /// A stream named `name` (no spaces, `.`, `*` or `>`), file storage,
    /// messages kept forever, and a duplicate window of 2 minutes
    /// (JetStream's default).
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            duplicate_window: Duration::from_secs(120),
            memory: false,
            max_age: Duration::ZERO,
        }
    }

    /// How long JetStream remembers a message id: a re-publish within it is
    /// dropped. Make it longer than the relay's longest plausible outage
    /// plus its checkpoint interval; it costs server memory per message.
    pub fn duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = window;
        self
    }

    /// Keeps messages in memory instead of files (for tests).
    pub fn in_memory(mut self) -> Self {
        self.memory = true;
        self
    }

    /// Discards messages older than `age` (zero: keep forever).
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = age;
        self
    }
}

/// An [`EventSink`] publishing to NATS JetStream.
///
/// Each event becomes one message:
/// - subject `<prefix>.<category>.<event_type>`, each part escaped by
///   [`subject_token`];
/// - message id ([`HEADER_MESSAGE_ID`]) = the event id, so JetStream drops a
///   re-publish within the stream's duplicate window;
/// - headers [`HEADER_STREAM_ID`], [`HEADER_VERSION`], [`HEADER_POSITION`],
///   [`HEADER_EVENT_TYPE`], [`HEADER_SCHEMA_VERSION`],
///   [`HEADER_RECORDED_AT_MICROS`], and [`HEADER_CORRELATION_ID`] /
///   [`HEADER_CAUSATION_ID`] when set (the metadata's `extra` map is not
///   sent);
/// - payload = the stored payload bytes, unchanged.
///
/// [`EventSink::publish`] returns once JetStream acknowledged every message
/// of the batch (a message dropped as a duplicate is acknowledged too).
#[derive(Clone)]
pub struct JetStreamSink {
    context: jetstream::Context,
    prefix: String,
    max_in_flight: usize,
    /// Shared by the clones of this sink.
    duplicates: Arc<AtomicU64>,
}

impl fmt::Debug for JetStreamSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JetStreamSink")
            .field("prefix", &self.prefix)
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

impl JetStreamSink {
    /// A sink on an existing JetStream context, publishing under `prefix`
    /// (one or more dot-separated tokens, such as `annals` or `shop.events`).
    ///
    /// # Errors
    /// [`JetStreamError::InvalidPrefix`] when `prefix` is empty, has an
    /// empty token, whitespace or a wildcard (`*`, `>`).
    pub fn new(
        context: jetstream::Context,
        prefix: impl Into<String>,
    ) -> Result<Self, JetStreamError> {
        let prefix = prefix.into();
        let invalid = |reason| JetStreamError::InvalidPrefix {
            prefix: prefix.clone(),
            reason,
        };
        if prefix.is_empty() || prefix.split('.').any(str::is_empty) {
            return Err(invalid("a token is empty"));
        }
        if prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid("it holds whitespace or a control character"));
        }
        if prefix.contains(['*', '>']) {
            return Err(invalid("it holds a wildcard"));
        }
        Ok(Self {
            context,
            prefix,
            max_in_flight: 256,
            duplicates: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Connects to the NATS server at `url` (such as `127.0.0.1:4222`) and
    /// makes a sink on it; see [`JetStreamSink::new`].
    ///
    /// # Errors
    /// [`JetStreamError::Connect`] when the server cannot be reached, and as
    /// [`JetStreamSink::new`].
    pub async fn connect(url: &str, prefix: impl Into<String>) -> Result<Self, JetStreamError> {
        let client = async_nats::connect(url)
            .await
            .map_err(|error| JetStreamError::Connect(Box::new(error)))?;
        Self::new(jetstream::new(client), prefix)
    }

    /// How many messages of a batch may await their acknowledgement at once
    /// (default 256, at least 1). 1 sends each message only after the
    /// previous one was acknowledged: slower, and never more than one
    /// message in doubt.
    pub fn with_max_in_flight(mut self, messages: usize) -> Self {
        self.max_in_flight = messages.max(1);
        self
    }

    /// How many published messages JetStream acknowledged as duplicates
    /// (re-publishes it dropped within its duplicate window) since this sink,
    /// or the one it was cloned from, was made.
    pub fn duplicates_acknowledged(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }

    /// The subject prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The JetStream context, for consumers and stream management.
    pub fn context(&self) -> &jetstream::Context {
        &self.context
    }

    /// The subject an event is published on:
    /// `<prefix>.<category>.<event_type>` (see [`subject_token`]).
    pub fn subject_for(&self, event: &RecordedEvent) -> String {
        format!(
            "{}.{}.{}",
            self.prefix,
            subject_token(event.stream_id.category()),
            subject_token(&event.event_type)
        )
    }

    /// Creates the JetStream stream capturing `<prefix>.>`, or updates it to
    /// these settings if it exists. Returns once the server confirmed.
    ///
    /// # Errors
    /// [`JetStreamError::Stream`] when the server refuses (for example, a
    /// stream of another name already captures these subjects).
    pub async fn ensure_stream(&self, settings: &JetStreamStream) -> Result<(), JetStreamError> {
        let config = jetstream::stream::Config {
            name: settings.name.clone(),
            subjects: vec![format!("{}.>", self.prefix)],
            duplicate_window: settings.duplicate_window,
            max_age: settings.max_age,
            storage: if settings.memory {
                jetstream::stream::StorageType::Memory
            } else {
                jetstream::stream::StorageType::File
            },
            ..Default::default()
        };
        self.context
            .create_or_update_stream(config)
            .await
            .map_err(|error| JetStreamError::Stream {
                stream: settings.name.clone(),
                source: Box::new(error),
            })?;
        Ok(())
    }
}

impl EventSink for JetStreamSink {
    type Error = JetStreamError;

    async fn publish(&mut self, events: &[RecordedEvent]) -> Result<(), JetStreamError> {
        let failed = |position, error: async_nats::jetstream::context::PublishError| {
            JetStreamError::Publish {
                position,
                source: Box::new(error),
            }
        };
        for chunk in events.chunks(self.max_in_flight) {
            // Send the whole chunk, then collect its acknowledgements: one
            // round trip per chunk instead of per event.
            let mut acks = Vec::with_capacity(chunk.len());
            for event in chunk {
                let message = PublishMessage::build()
                    .payload(Bytes::copy_from_slice(&event.payload))
                    .headers(headers_for(event));
                let ack = self
                    .context
                    .send_publish(self.subject_for(event), message)
                    .await
                    .map_err(|error| failed(event.position, error))?;
                acks.push((event.position, ack));
            }
            for (position, ack) in acks {
                let ack = ack.await.map_err(|error| failed(position, error))?;
                if ack.duplicate {
                    self.duplicates.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }
}

fn headers_for(event: &RecordedEvent) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_MESSAGE_ID, event.event_id.to_string());
    headers.insert(HEADER_STREAM_ID, event.stream_id.as_str());
    headers.insert(HEADER_VERSION, event.version.0.to_string());
    headers.insert(HEADER_POSITION, event.position.0.to_string());
    headers.insert(HEADER_EVENT_TYPE, event.event_type.as_str());
    headers.insert(HEADER_SCHEMA_VERSION, event.schema_version.to_string());
    headers.insert(
        HEADER_RECORDED_AT_MICROS,
        event.recorded_at_micros.to_string(),
    );
    if let Some(id) = event.metadata.correlation_id {
        headers.insert(HEADER_CORRELATION_ID, id.to_string());
    }
    if let Some(id) = event.metadata.causation_id {
        headers.insert(HEADER_CAUSATION_ID, id.to_string());
    }
    headers
}

/// Escapes `text` into one NATS subject token.
///
/// ASCII letters, digits, `-` and `_` are kept; every other character is
/// written as `%XX` for each byte of its UTF-8 encoding (`.` → `%2E`,
/// `*` → `%2A`, `>` → `%3E`, a space → `%20`, `%` → `%25`, `é` → `%C3%A9`).
/// The empty string becomes `_`. The mapping is one-to-one for non-empty
/// text, so subjects can be filtered exactly; the exact category and event
/// type are also in the headers.
pub fn subject_token(text: &str) -> Cow<'_, str> {
    fn kept(byte: u8) -> bool {
        byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_'
    }
    if text.is_empty() {
        return Cow::Borrowed("_");
    }
    if text.bytes().all(kept) {
        return Cow::Borrowed(text);
    }
    let mut token = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if kept(byte) {
            token.push(char::from(byte));
        } else {
            token.push_str(&format!("%{byte:02X}"));
        }
    }
    Cow::Owned(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ExpectedVersion, NewEvent, StreamId};
    use crate::store::memory::MemoryStore;
    use std::sync::Mutex;

    #[test]
    fn subject_tokens_escape_what_nats_does_not_allow() {
        assert_eq!(subject_token("OrderPlaced"), "OrderPlaced");
        assert_eq!(subject_token("order_v-2"), "order_v-2");
        assert_eq!(subject_token("a.b"), "a%2Eb");
        assert_eq!(subject_token("a*>"), "a%2A%3E");
        assert_eq!(subject_token("x y\t"), "x%20y%09");
        assert_eq!(subject_token("100%"), "100%25");
        assert_eq!(subject_token("café"), "caf%C3%A9");
        assert_eq!(subject_token(""), "_");
        // One-to-one: a literal "%2E" does not collide with ".".
        assert_ne!(subject_token("%2E"), subject_token("."));
    }

    /// Records what it was given; fails the first `failures` calls.
    #[derive(Clone, Default)]
    struct Recording {
        seen: Arc<Mutex<Vec<Position>>>,
        failures: Arc<Mutex<u32>>,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("broker unavailable")]
    struct Unavailable;

    impl EventSink for Recording {
        type Error = Unavailable;
        async fn publish(&mut self, events: &[RecordedEvent]) -> Result<(), Unavailable> {
            let mut failures = self.failures.lock().unwrap();
            if *failures > 0 {
                *failures -= 1;
                return Err(Unavailable);
            }
            let mut seen = self.seen.lock().unwrap();
            seen.extend(events.iter().map(|event| event.position));
            Ok(())
        }
    }

    async fn append(store: &dyn EventStore, count: usize) -> Position {
        let stream = StreamId::new("order-1").unwrap();
        let mut last = Position::START;
        for _ in 0..count {
            last = store
                .append(
                    &stream,
                    ExpectedVersion::Any,
                    vec![NewEvent::new("OrderPlaced", b"x".to_vec())],
                )
                .await
                .unwrap()
                .last_position;
        }
        last
    }

    #[tokio::test]
    async fn relays_in_order_retries_and_resumes_from_its_checkpoint() {
        let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
        let head = append(&*store, 10).await;
        let sink = Recording::default();
        *sink.failures.lock().unwrap() = 2;
        let config = RelayConfig::new("test")
            .batch_size(3)
            .retry_backoff(Duration::from_millis(1), Duration::from_millis(2));
        let relay = Relay::start(Arc::clone(&store), config.clone(), sink.clone())
            .await
            .unwrap();
        let status = relay.wait_for(head).await.unwrap();
        assert_eq!(status.lag, 0);
        assert_eq!(status.events_published, 10);
        assert_eq!(status.last_error.as_deref(), Some("broker unavailable"));
        assert_eq!(relay.shutdown().await.unwrap(), head);
        let expected: Vec<Position> = (1..=10).map(Position).collect();
        assert_eq!(*sink.seen.lock().unwrap(), expected);
        assert_eq!(
            store.load_checkpoint("relay:test").await.unwrap(),
            Some(head)
        );
        assert!(matches!(
            relay.shutdown().await,
            Err(RelayError::NotRunning)
        ));

        // A restart continues after the checkpoint; a replay re-sends.
        let later = append(&*store, 2).await;
        let relay = Relay::start(Arc::clone(&store), config, sink.clone())
            .await
            .unwrap();
        relay.wait_for(later).await.unwrap();
        relay.replay_from(Position(8)).await.unwrap();
        assert_eq!(
            store.load_checkpoint("relay:test").await.unwrap(),
            Some(Position(8))
        );
        relay.wait_for(later).await.unwrap();
        relay.shutdown().await.unwrap();
        let seen = sink.seen.lock().unwrap();
        assert_eq!(seen[10..], [11, 12, 9, 10, 11, 12].map(Position));
    }

    #[tokio::test]
    async fn a_filtered_relay_publishes_only_matching_events_and_passes_the_rest() {
        let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
        append(&*store, 3).await; // order-1: positions 1..=3
        let user = StreamId::new("user-1").unwrap();
        let head = store
            .append(
                &user,
                ExpectedVersion::Any,
                vec![NewEvent::new("UserJoined", Vec::new())],
            )
            .await
            .unwrap()
            .last_position;
        let sink = Recording::default();
        let config = RelayConfig::new("orders")
            .filter(EventFilter::Category("order".into()))
            .checkpoint_every(1, Duration::from_secs(60));
        let relay = Relay::start(Arc::clone(&store), config, sink.clone())
            .await
            .unwrap();
        // The user event is passed, not published, and still counts as done.
        let status = relay.wait_for(head).await.unwrap();
        assert_eq!((status.lag, status.events_published), (0, 3));
        assert_eq!(relay.shutdown().await.unwrap(), head);
        assert_eq!(*sink.seen.lock().unwrap(), [1, 2, 3].map(Position));
    }

    #[tokio::test]
    async fn shutdown_gives_up_on_a_failing_sink_and_keeps_the_checkpoint() {
        let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
        append(&*store, 3).await;
        let sink = Recording::default();
        *sink.failures.lock().unwrap() = u32::MAX;
        let config = RelayConfig::new("down")
            .retry_backoff(Duration::from_millis(1), Duration::from_millis(1))
            .shutdown_timeout(Duration::from_millis(20));
        let relay = Relay::start(Arc::clone(&store), config, sink.clone())
            .await
            .unwrap();
        let mut status = relay.inner.status.clone();
        status
            .wait_for(|status| status.failed_attempts >= 2)
            .await
            .unwrap();
        assert_eq!(relay.status().state, RelayState::Retrying);
        assert_eq!(relay.status().lag, 3);
        assert!(matches!(relay.shutdown().await, Err(RelayError::Sink(_))));
        assert_eq!(store.load_checkpoint("relay:down").await.unwrap(), None);
        assert!(sink.seen.lock().unwrap().is_empty());
    }
}
