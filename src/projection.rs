//! Projections: subscriptions to the log ([`subscribe`]) and the
//! [`Projection`] trait run by a projection actor (one per projection, with
//! no supervisor: a dead actor shows as failed in its status) with a named,
//! durable checkpoint, controlled through a cheap [`ProjectionHandle`]. A
//! projection starts after its checkpoint and handles every matching event
//! in global order, at least once; a [`SledProjection`] keeps its read model
//! in the store's sled database and commits it with its checkpoint in one
//! transaction, so each event takes effect exactly once, even across a crash.

mod actor;
mod error;
mod handle;
mod lease;
mod read_model;
mod runner;
mod sled;
mod state;
mod subscription;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::codec::{decode_event, DomainEvent};
use crate::error::InvalidInput;
use crate::event::{EventFilter, Position, RecordedEvent};
use crate::projection::runner::caught;
use crate::store::ReadModelStore;

pub use self::error::{BatchFailure, ProjectionControlError};
pub use self::handle::ProjectionHandle;
pub use self::sled::{SledProjection, TypedSledProjection};
pub(crate) use self::subscription::Delivery;
pub use self::subscription::{subscribe, Subscription, DEFAULT_PAGE_SIZE, READ_AHEAD_MIN_PAGE};
pub use crate::error::{ProjectionError, SubscriptionError};
pub use crate::store::{ReadModelBatch, ReadModelView};

/// A read model fed by the log, one raw event at a time.
///
/// The projection actor calls [`Projection::handle`] for every event that
/// passes the projection's filter, in strictly increasing position order,
/// one at a time. Delivery is at least once: after a crash, the events
/// after the last saved checkpoint are handled again, so a read model kept
/// outside the store should remember `context.position()` (or the event id)
/// and ignore what it already applied. For exactly once, see [`ReadModel`]
/// and [`SledProjection`].
///
/// Implement the methods as `async fn`; the futures must be `Send`.
pub trait Projection: Send + 'static {
    /// Applies one event. An error (or a panic) is a failure handled by the
    /// projection's [`FailurePolicy`]: retried, or skipped and recorded.
    fn handle(
        &mut self,
        event: &RecordedEvent,
        context: &ProjectionContext,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;

    /// Applies several events, in order: the projection actor calls it once
    /// per batch (up to the configured batch size), in catch-up and live
    /// alike. `context` is the last event's, with the attempt of the first.
    /// Override it where one call for many events saves work (one write to
    /// an outside database per batch). Default: [`Projection::handle`] per
    /// event, stopping at the first failure or panic.
    ///
    /// # Errors
    /// [`BatchFailure`]: the events before the failing one count as
    /// handled, the failing one goes to the failure policy. A panic that
    /// escapes an override counts as a failure of the first event, so the
    /// whole batch is handled again (at least once).
    fn handle_batch(
        &mut self,
        events: &[RecordedEvent],
        context: &ProjectionContext,
    ) -> impl Future<Output = Result<(), BatchFailure>> + Send {
        async move {
            for (index, event) in events.iter().enumerate() {
                let context = context.for_event(index, event);
                caught(self.handle(event, &context))
                    .await
                    .map_err(|error| BatchFailure::new(index, error))?;
            }
            Ok(())
        }
    }

    /// Erases the read model, before a rebuild from the start of the log
    /// ([`ProjectionHandle::reset`]). The checkpoint is already back at the
    /// start when this runs, so a crash during a reset leads to a rebuild,
    /// never to a read model that misses events. Default: nothing to erase.
    fn reset(&mut self) -> impl Future<Output = Result<(), ProjectionError>> + Send {
        async { Ok(()) }
    }
}

/// A projection of the typed events of one aggregate type, decoded with
/// [`decode_event`]. Run it with [`Typed`]; give the projection a filter
/// for the aggregate's category so that it sees only its own events.
pub trait TypedProjection: Send + 'static {
    /// The aggregate's event enum.
    type Event: DomainEvent;

    /// Applies one decoded event; `recorded` is the raw event (stream,
    /// version, position, metadata).
    fn handle(
        &mut self,
        event: Self::Event,
        recorded: &RecordedEvent,
        context: &ProjectionContext,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;

    /// Applies several decoded events, in order, each with its raw event;
    /// as [`Projection::handle_batch`] (the batch ends before the first
    /// event that does not decode). Default: [`TypedProjection::handle`]
    /// per event, stopping at the first failure or panic.
    ///
    /// # Errors
    /// As [`Projection::handle_batch`].
    fn handle_batch(
        &mut self,
        events: Vec<(Self::Event, &RecordedEvent)>,
        context: &ProjectionContext,
    ) -> impl Future<Output = Result<(), BatchFailure>> + Send {
        async move {
            for (index, (event, recorded)) in events.into_iter().enumerate() {
                let context = context.for_event(index, recorded);
                caught(self.handle(event, recorded, &context))
                    .await
                    .map_err(|error| BatchFailure::new(index, error))?;
            }
            Ok(())
        }
    }

    /// As [`Projection::reset`].
    fn reset(&mut self) -> impl Future<Output = Result<(), ProjectionError>> + Send {
        async { Ok(()) }
    }
}

/// Runs a [`TypedProjection`] as a [`Projection`] (or a
/// [`TypedSledProjection`] as a [`SledProjection`]): each event is decoded
/// first, and an event that does not decode is a failure
/// ([`ProjectionError::Codec`]) under the failure policy, never a silent skip.
#[derive(Debug, Clone, Default)]
pub struct Typed<P>(pub P);

impl<P: TypedProjection> Projection for Typed<P> {
    async fn handle(
        &mut self,
        event: &RecordedEvent,
        context: &ProjectionContext,
    ) -> Result<(), ProjectionError> {
        let decoded = decode_event::<P::Event>(event)?;
        self.0.handle(decoded, event, context).await
    }

    async fn handle_batch(
        &mut self,
        events: &[RecordedEvent],
        context: &ProjectionContext,
    ) -> Result<(), BatchFailure> {
        let mut decoded = Vec::with_capacity(events.len());
        let mut undecodable = None;
        for (index, event) in events.iter().enumerate() {
            match decode_event::<P::Event>(event) {
                Ok(typed) => decoded.push((typed, event)),
                Err(error) => {
                    undecodable = Some(BatchFailure::new(index, error));
                    break;
                }
            }
        }
        if !decoded.is_empty() {
            self.0.handle_batch(decoded, context).await?;
        }
        undecodable.map_or(Ok(()), Err)
    }

    async fn reset(&mut self) -> Result<(), ProjectionError> {
        self.0.reset().await
    }
}

/// A read model applied exactly once by a store with the
/// [`ReadModelStore`] capability: the handler writes into the store's open
/// transaction (`S::Transaction`), which the runner commits together with
/// the checkpoint, so after any crash the read model holds exactly the
/// events up to its checkpoint. Run it with
/// [`ProjectionHandle::spawn_read_model`]. For the sled store, implementing
/// [`SledProjection`] is simpler.
///
/// Keep all of the read model's state in the store: the writes of a failed
/// or crashed batch are thrown away, fields of `self` are not rolled back.
pub trait ReadModel<S: ReadModelStore>: Send + 'static {
    /// The tables (sled trees) the read model writes, passed to
    /// [`ReadModelStore::begin`].
    fn tables(&self) -> Vec<String>;

    /// Writes one event's changes into `transaction`. An error (or a panic)
    /// drops this event's writes and is handled by the failure policy.
    fn handle(
        &mut self,
        event: &RecordedEvent,
        transaction: &mut S::Transaction,
        context: &ProjectionContext,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;

    /// Writes the changes of several events, in order, into one
    /// transaction; `context` is the last event's. Override it where one
    /// call for many events saves work. Default: [`ReadModel::handle`] per
    /// event.
    ///
    /// An error (or a panic) drops the writes of the whole call; the runner
    /// then handles the same events one at a time with
    /// [`ReadModel::handle`], so that the events before the failing one
    /// are applied and the failure policy sees the failing event itself.
    fn handle_batch(
        &mut self,
        events: &[RecordedEvent],
        transaction: &mut S::Transaction,
        context: &ProjectionContext,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send {
        async move {
            for (index, event) in events.iter().enumerate() {
                let context = context.for_event(index, event);
                self.handle(event, transaction, &context).await?;
            }
            Ok(())
        }
    }

    /// Erases the read model through `transaction`, which is committed with
    /// the checkpoint back at the start ([`ProjectionHandle::reset`]): a
    /// crash leaves the old read model and checkpoint, or the empty ones.
    ///
    /// # Errors
    /// An error (or a panic) fails the reset with nothing erased: the
    /// projection goes on where it was.
    fn reset(
        &mut self,
        transaction: &mut S::Transaction,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;
}

/// What a handler knows besides the event.
#[derive(Debug, Clone)]
pub struct ProjectionContext {
    name: Arc<str>,
    position: Position,
    attempt: u32,
}

impl ProjectionContext {
    pub(crate) fn new(name: Arc<str>, position: Position, attempt: u32) -> Self {
        Self {
            name,
            position,
            attempt,
        }
    }

    /// The projection's (and its checkpoint's) name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The global position of the event being handled. Positions strictly
    /// increase, so a read model that stores the last one it applied can
    /// ignore redeliveries after a restart (`position <= stored`).
    pub fn position(&self) -> Position {
        self.position
    }

    /// 1 for the first try of this event, more when retried.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The context of the batch's event at `index`: the batch's attempt
    /// for the first event, the first attempt for the others (an earlier
    /// try stopped at the first).
    pub(crate) fn for_event(&self, index: usize, event: &RecordedEvent) -> Self {
        let attempt = if index == 0 { self.attempt } else { 1 };
        Self::new(Arc::clone(&self.name), event.position, attempt)
    }
}

/// What a projection does when its handler fails on an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailurePolicy {
    /// Tries the event up to `max_attempts` times in all, waiting `backoff`
    /// after the first failure and twice as long after each next one (at
    /// most 60 s); then stops in [`ProjectionState::Failed`] with the error
    /// in its status, its checkpoint just before the event. A `resume`
    /// tries again, a `reset` rebuilds.
    Retry {
        /// Tries in all (at least 1).
        max_attempts: u32,
        /// The wait after the first failure.
        backoff: Duration,
    },
    /// Skips the event and goes on. The skip is recorded: a `warn` trace,
    /// the count and the latest skipped positions in the status.
    SkipAndRecord,
}

impl Default for FailurePolicy {
    fn default() -> Self {
        FailurePolicy::Retry {
            max_attempts: 5,
            backoff: Duration::from_millis(100),
        }
    }
}

/// How to run a projection, built with [`ProjectionConfig::builder`] and
/// checked by [`ProjectionConfigBuilder::build`]: a setting out of range is
/// a typed error there, never silently corrected. Read with the getters,
/// named like the builder's setters.
#[derive(Debug, Clone)]
pub struct ProjectionConfig {
    pub(crate) name: String,
    pub(crate) filter: EventFilter,
    pub(crate) failure_policy: FailurePolicy,
    pub(crate) checkpoint_every_events: u64,
    pub(crate) checkpoint_interval: Duration,
    pub(crate) batch_size: usize,
    pub(crate) read_page_size: usize,
    pub(crate) max_recorded_skips: usize,
}

/// Builds a [`ProjectionConfig`]; every setting starts at its default.
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct ProjectionConfigBuilder {
    config: ProjectionConfig,
}

impl ProjectionConfig {
    /// A builder with the defaults, for the projection (and checkpoint)
    /// named `name`.
    pub fn builder(name: impl Into<String>) -> ProjectionConfigBuilder {
        ProjectionConfigBuilder {
            config: Self {
                name: name.into(),
                filter: EventFilter::All,
                failure_policy: FailurePolicy::default(),
                checkpoint_every_events: 10_000,
                checkpoint_interval: Duration::from_secs(1),
                batch_size: 256,
                read_page_size: 4096,
                max_recorded_skips: 100,
            },
        }
    }

    /// The projection's name, also the name of its checkpoint. One running
    /// projection per name and store.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which events it handles. Default: all.
    pub fn filter(&self) -> &EventFilter {
        &self.filter
    }

    /// What to do when the handler fails. Default: retry 5 times from 100 ms.
    pub fn failure_policy(&self) -> FailurePolicy {
        self.failure_policy
    }

    /// When the checkpoint is saved: after this many handled events
    /// (default 10,000), or when this much time passed since the last save
    /// with progress since (default 1 s). The handling goes on while the
    /// store makes a save durable; a save that comes due meanwhile starts
    /// after it. After a crash, a plain projection handles again what came
    /// after its last save: at most about this many events or this much
    /// time's worth, whichever is less. Each save is an fdatasync: at the
    /// millions of events per second of a catch-up, one every 1,000 events
    /// cost about a sixth of the rate.
    pub fn checkpoint_every(&self) -> (u64, Duration) {
        (self.checkpoint_every_events, self.checkpoint_interval)
    }

    /// The most events handled in one go (one read-model transaction for a
    /// [`ReadModel`], one [`ReadModel::handle_batch`] call). Default 256.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// How many events one catch-up read asks the store for; a page is
    /// never smaller than [`batch_size`](Self::batch_size). Default 4,096.
    /// While catching up the projection holds up to two pages: the one it
    /// handles and the next, which it reads meanwhile (see
    /// [`subscribe`]).
    pub fn read_page_size(&self) -> usize {
        self.read_page_size.max(self.batch_size)
    }

    /// How many skipped events the status lists (the newest). Default 100.
    pub fn max_recorded_skips(&self) -> usize {
        self.max_recorded_skips
    }

    /// Checks the settings.
    fn validate(&self) -> Result<(), InvalidInput> {
        crate::store::validate_checkpoint_name(&self.name)?;
        use crate::error::at_least_one;
        at_least_one("checkpoint_every_events", self.checkpoint_every_events)?;
        at_least_one("batch_size", self.batch_size as u64)?;
        at_least_one("read_page_size", self.read_page_size as u64)?;
        if let FailurePolicy::Retry { max_attempts, .. } = self.failure_policy {
            at_least_one("max_attempts", u64::from(max_attempts))?;
        }
        Ok(())
    }
}

impl ProjectionConfigBuilder {
    /// Sets the filter.
    pub fn filter(mut self, filter: EventFilter) -> Self {
        self.config.filter = filter;
        self
    }

    /// Sets the failure policy.
    pub fn failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.config.failure_policy = policy;
        self
    }

    /// Sets how often the checkpoint is saved: after `events` handled events
    /// (at least 1) or `interval` with progress, whichever comes first.
    pub fn checkpoint_every(mut self, events: u64, interval: Duration) -> Self {
        self.config.checkpoint_every_events = events;
        self.config.checkpoint_interval = interval;
        self
    }

    /// Sets the most events handled in one go (at least 1).
    pub fn batch_size(mut self, events: usize) -> Self {
        self.config.batch_size = events;
        self
    }

    /// Sets how many events one catch-up read asks for (at least 1; a page
    /// is never smaller than the batch size). Lower it for large events:
    /// a catch-up holds up to two pages.
    pub fn read_page_size(mut self, events: usize) -> Self {
        self.config.read_page_size = events;
        self
    }

    /// Sets how many skipped events the status lists (0: none, only the
    /// count).
    pub fn max_recorded_skips(mut self, events: usize) -> Self {
        self.config.max_recorded_skips = events;
        self
    }

    /// Checks the settings and returns the configuration.
    ///
    /// # Errors
    /// [`InvalidInput`] for a name the checkpoints cannot hold, or a setting
    /// below its minimum: the events of `checkpoint_every`, `batch_size`,
    /// `read_page_size` and a retry's `max_attempts` must be at least 1.
    pub fn build(self) -> Result<ProjectionConfig, InvalidInput> {
        self.config.validate()?;
        Ok(self.config)
    }
}

/// Where a projection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProjectionState {
    /// Handling events as they come.
    Running,
    /// Paused by [`ProjectionHandle::pause`]; resumes where it stopped.
    Paused,
    /// Shut down. Its checkpoint was saved then, unless
    /// [`ProjectionHandle::shutdown`] returned an error (the status's
    /// `checkpoint` is the last save that succeeded).
    Stopped,
    /// Its handler kept failing (see [`FailurePolicy::Retry`]) or the actor
    /// died; [`ProjectionStatus::last_error`] says why.
    Failed,
    /// The store shut down (its live feed closed) and the projection handled
    /// every event it holds: nothing more will arrive. A checkpoint save
    /// under way is finished first, so the status shows where a restart
    /// would begin. The actor stays until [`ProjectionHandle::shutdown`],
    /// which also frees its name. Saving (at that shutdown) and a
    /// [`ProjectionHandle::reset`] need the store, which a shut-down sled
    /// store refuses with [`StoreError::Closed`](crate::StoreError::Closed):
    /// shut projections down before their store.
    Ended,
}

/// An event skipped under [`FailurePolicy::SkipAndRecord`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SkippedEvent {
    /// Its position.
    pub position: Position,
    /// Its id.
    pub event_id: uuid::Uuid,
    /// Its stream.
    pub stream_id: crate::event::StreamId,
    /// Its type.
    pub event_type: String,
    /// The handler's error.
    pub error: String,
}

/// A projection's handler failure, as reported in its status.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProjectionFailure {
    /// The position of the event that failed (or the position the
    /// projection was at, for a failure to read or to save).
    pub position: Position,
    /// The error.
    pub error: String,
    /// How many tries of this event failed so far.
    pub attempts: u32,
}

/// A snapshot of a projection's progress.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProjectionStatus {
    /// The projection's name.
    pub name: String,
    /// Running, paused, stopped, failed or ended.
    pub state: ProjectionState,
    /// Every matching event at or below this position was handled (for a
    /// [`SledProjection`], committed to its trees).
    pub position: Position,
    /// The last saved checkpoint: where a restart would begin.
    pub checkpoint: Position,
    /// The store's head when the status was taken.
    pub head: Position,
    /// `head - position`: how many positions the projection is behind.
    pub lag: u64,
    /// Events handled since the actor started (or was reset).
    pub events_handled: u64,
    /// The most recent failure (handler, read or checkpoint save); kept
    /// after the projection recovered, cleared by a reset.
    pub last_error: Option<ProjectionFailure>,
    /// Events skipped under [`FailurePolicy::SkipAndRecord`] since start.
    pub skipped_total: u64,
    /// The newest skipped events, at most
    /// [`ProjectionConfig::max_recorded_skips`], oldest first.
    pub skipped: Vec<SkippedEvent>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_sync<T: Send + Sync>() {}
    fn send_unpin<T: Send + Unpin>() {}

    #[test]
    fn handles_and_subscriptions_move_between_tasks() {
        send_sync::<ProjectionHandle>();
        send_sync::<ProjectionStatus>();
        send_unpin::<Subscription>();
    }
}
