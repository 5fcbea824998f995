//! The projection actor: one ractor actor per running projection. It pulls
//! events from its [`Subscription`] in batches, hands them to a runner (a
//! plain [`Projection`] or a sled read model), applies the failure policy,
//! saves the checkpoint, and publishes its status on a watch channel so that
//! status queries and `wait_for` never queue behind a slow handler.

use std::any::Any;
use std::collections::VecDeque;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::{watch, Notify};
use tokio::time::{sleep_until, Instant};
use tracing::{debug, error, info, warn};

use crate::error::{ProjectionControlError, ProjectionError, StoreError, SubscriptionError};
use crate::event::{Position, RecordedEvent};
use crate::projection::subscription::{subscribe, Delivery, Subscription};
use crate::projection::{
    FailurePolicy, Projection, ProjectionConfig, ProjectionContext, ProjectionFailure,
    ProjectionState, ProjectionStatus, SkippedEvent,
};
use crate::store::EventStore;

/// The longest wait between retries of a failing handler.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The wait before reading again after a failed catch-up read.
const READ_RETRY_DELAY: Duration = Duration::from_millis(200);

/// The actor's messages. Private to the crate: users hold a
/// [`ProjectionHandle`](crate::ProjectionHandle).
#[derive(Debug)]
pub(crate) enum ProjectionMessage {
    /// Take and handle the next batch. Sent by the actor to itself, one at a
    /// time, so that control messages interleave with the work.
    Process,
    Pause(RpcReplyPort<()>),
    Resume(RpcReplyPort<()>),
    Reset(RpcReplyPort<Result<(), ProjectionControlError>>),
    /// Save the checkpoint and stop. No reply port when sent because the
    /// last handle was dropped.
    Shutdown(Option<RpcReplyPort<Result<Position, StoreError>>>),
}

/// How many events of a batch a runner applied, and why it stopped early.
#[derive(Debug)]
pub(crate) struct Applied {
    pub(crate) count: usize,
    pub(crate) error: Option<ProjectionError>,
    /// The failure is the store's, not the handler's (a sled commit failed):
    /// the projection stops rather than skip an event it never applied.
    pub(crate) store_failed: bool,
}

/// The rest of a checkpoint save, once started: see
/// [`Runner::start_checkpoint`].
pub(crate) type SaveCheckpoint = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

/// What the actor drives: a user's projection plus where its checkpoint and
/// read model live.
#[async_trait]
pub(crate) trait Runner: Send + 'static {
    /// Applies `events` in order (their effects visible once this returns),
    /// stopping at the first failure.
    async fn apply(&mut self, events: &[RecordedEvent], attempt: u32) -> Applied;

    /// Starts making `position` the durable checkpoint: whatever must be
    /// written in order with the runner's other writes is written now, and
    /// the returned future completes the save (durability). It borrows
    /// nothing from the runner, so the actor keeps applying events while the
    /// store syncs.
    fn start_checkpoint(&mut self, position: Position) -> Result<SaveCheckpoint, StoreError>;

    /// Makes `position` the durable checkpoint.
    async fn save_checkpoint(&mut self, position: Position) -> Result<(), StoreError> {
        self.start_checkpoint(position)?.await
    }

    /// Moves the checkpoint back to the start and erases the read model.
    /// The flag says whether the checkpoint is now at the start, even if a
    /// later step failed: the actor must then rebuild from the start too.
    async fn reset(&mut self) -> (bool, Result<(), ProjectionControlError>);
}

/// Runs a plain [`Projection`]: at least once, checkpoint in the store.
pub(crate) struct PlainRunner<P> {
    store: Arc<dyn EventStore>,
    name: Arc<str>,
    projection: P,
}

impl<P: Projection> PlainRunner<P> {
    pub(crate) fn new(store: Arc<dyn EventStore>, name: Arc<str>, projection: P) -> Self {
        Self {
            store,
            name,
            projection,
        }
    }
}

#[async_trait]
impl<P: Projection> Runner for PlainRunner<P> {
    async fn apply(&mut self, events: &[RecordedEvent], attempt: u32) -> Applied {
        for (index, event) in events.iter().enumerate() {
            let attempt = if index == 0 { attempt } else { 1 };
            let context = ProjectionContext::new(Arc::clone(&self.name), event.position, attempt);
            let result = CatchUnwind(self.projection.handle(event, &context)).await;
            let error = match result {
                Ok(Ok(())) => continue,
                Ok(Err(error)) => error,
                Err(panic) => ProjectionError::Panicked(panic_message(&*panic)),
            };
            return Applied {
                count: index,
                error: Some(error),
                store_failed: false,
            };
        }
        Applied {
            count: events.len(),
            error: None,
            store_failed: false,
        }
    }

    fn start_checkpoint(&mut self, position: Position) -> Result<SaveCheckpoint, StoreError> {
        // The store's save is one call (write and sync), so all of it runs in
        // the future. The actor starts the next save only once this one
        // completed, so saves cannot overtake each other.
        let store = Arc::clone(&self.store);
        let name = Arc::clone(&self.name);
        Ok(Box::pin(async move {
            store.save_checkpoint(&name, position).await
        }))
    }

    async fn reset(&mut self) -> (bool, Result<(), ProjectionControlError>) {
        // Checkpoint first: a crash (or a failing hook) between the two steps
        // then rebuilds over the old read model (at least once), instead of
        // leaving an erased read model behind a checkpoint that skips events.
        if let Err(error) = self
            .store
            .save_checkpoint(&self.name, Position::START)
            .await
        {
            return (false, Err(error.into()));
        }
        let result = match CatchUnwind(self.projection.reset()).await {
            Ok(result) => result.map_err(Into::into),
            Err(panic) => Err(ProjectionError::Panicked(panic_message(&*panic)).into()),
        };
        (true, result)
    }
}

/// Polls a boxed future, turning a panic into an `Err`. The projection's
/// state may be half-updated after a panic, as after any caught panic; the
/// failure policy decides whether it is tried again.
pub(crate) struct CatchUnwind<F>(pub(crate) F);

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match catch_unwind(AssertUnwindSafe(|| Pin::new(inner).poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "a panic with a non-string payload".to_owned()
    }
}

/// The projection names running in this process, per store: two actors with
/// one name would overwrite each other's checkpoint.
static RUNNING: OnceLock<DashMap<(usize, String), ()>> = OnceLock::new();

/// The right to run the projection `name` on one store, released when the
/// actor's state is dropped (at shutdown, or if the actor dies).
#[derive(Debug)]
pub(crate) struct NameLease {
    key: (usize, String),
}

impl NameLease {
    pub(crate) fn acquire(
        store: &Arc<dyn EventStore>,
        name: &str,
    ) -> Result<Self, ProjectionControlError> {
        // The address identifies the store while any actor holds it.
        let key = (Arc::as_ptr(store).cast::<()>() as usize, name.to_owned());
        match RUNNING.get_or_init(DashMap::new).entry(key.clone()) {
            Entry::Occupied(_) => Err(ProjectionControlError::AlreadyRunning {
                name: name.to_owned(),
            }),
            Entry::Vacant(vacant) => {
                vacant.insert(());
                Ok(Self { key })
            }
        }
    }
}

impl Drop for NameLease {
    fn drop(&mut self) {
        if let Some(running) = RUNNING.get() {
            running.remove(&self.key);
        }
    }
}

/// The projection actor. Configuration lives in [`ActorState`], which
/// `pre_start` receives whole: everything that can fail with a typed error
/// (loading the checkpoint, opening trees) happens before the spawn.
#[derive(Debug)]
pub(crate) struct ProjectionActor;

/// A handler failure being retried.
#[derive(Debug, Clone, Copy)]
struct Retry {
    /// Failed tries of the first pending event so far.
    attempts: u32,
    at: Instant,
}

/// A checkpoint save under way: the store syncs while the actor goes on.
struct Saving {
    position: Position,
    /// The events counted in `unsaved` when it started, counted again if it
    /// fails.
    events: u64,
    rest: SaveCheckpoint,
}

/// Everything the actor mutates.
pub(crate) struct ActorState {
    store: Arc<dyn EventStore>,
    config: ProjectionConfig,
    runner: Box<dyn Runner>,
    subscription: Subscription,
    status: watch::Sender<ProjectionStatus>,
    /// Rung by handles after they queue a control message, so that an actor
    /// waiting for the next event turns to its mailbox.
    interrupt: Arc<Notify>,
    /// Held for the actor's life, however it ends.
    _lease: NameLease,
    /// Events taken from the subscription, not yet applied (at most one
    /// batch: this is what bounds the actor's memory).
    pending: VecDeque<RecordedEvent>,
    /// Progress through filtered-out events after `pending`.
    pending_passed: Option<Position>,
    position: Position,
    checkpoint: Position,
    /// Events handled since the last save started.
    unsaved: u64,
    /// When the last save started.
    last_save: Instant,
    /// At most one save at a time, so that saves cannot overtake each other.
    saving: Option<Saving>,
    events_handled: u64,
    retry: Option<Retry>,
    read_retry_at: Option<Instant>,
    last_error: Option<ProjectionFailure>,
    paused: bool,
    failed: bool,
    stopped: bool,
    ended: bool,
    process_scheduled: bool,
}

impl ActorState {
    pub(crate) fn new(
        store: Arc<dyn EventStore>,
        config: ProjectionConfig,
        runner: Box<dyn Runner>,
        checkpoint: Position,
        interrupt: Arc<Notify>,
        lease: NameLease,
    ) -> (Self, watch::Receiver<ProjectionStatus>) {
        let subscription = subscribe(Arc::clone(&store), checkpoint, config.filter.clone())
            .with_page_size(config.batch_size.max(64));
        let (status, receiver) = watch::channel(ProjectionStatus {
            name: config.name.clone(),
            state: ProjectionState::Running,
            position: checkpoint,
            checkpoint,
            head: Position::START,
            lag: 0,
            events_handled: 0,
            last_error: None,
            skipped_total: 0,
            skipped: Vec::new(),
        });
        let state = Self {
            store,
            config,
            runner,
            subscription,
            status,
            interrupt,
            pending: VecDeque::new(),
            pending_passed: None,
            position: checkpoint,
            checkpoint,
            unsaved: 0,
            last_save: Instant::now(),
            saving: None,
            events_handled: 0,
            retry: None,
            read_retry_at: None,
            last_error: None,
            paused: false,
            failed: false,
            stopped: false,
            ended: false,
            process_scheduled: false,
            _lease: lease,
        };
        (state, receiver)
    }

    fn runnable(&self) -> bool {
        !(self.paused || self.failed || self.stopped || self.finished())
    }

    /// The live feed closed and nothing taken from the subscription is left
    /// to apply (a batch being retried is still retried).
    fn finished(&self) -> bool {
        self.ended && self.pending.is_empty() && self.pending_passed.is_none()
    }

    fn schedule(&mut self, myself: &ActorRef<ProjectionMessage>) {
        if self.runnable() && !self.process_scheduled {
            // Fails only if the actor is stopping, when there is nothing to do.
            if myself.cast(ProjectionMessage::Process).is_ok() {
                self.process_scheduled = true;
            }
        }
    }

    fn publish(&self) {
        let state = if self.stopped {
            ProjectionState::Stopped
        } else if self.failed {
            ProjectionState::Failed
        } else if self.finished() {
            ProjectionState::Ended
        } else if self.paused {
            ProjectionState::Paused
        } else {
            ProjectionState::Running
        };
        self.status.send_if_modified(|status| {
            let changed = status.state != state
                || status.position != self.position
                || status.checkpoint != self.checkpoint
                || status.events_handled != self.events_handled
                || status.last_error != self.last_error;
            status.state = state;
            status.position = self.position;
            status.checkpoint = self.checkpoint;
            status.events_handled = self.events_handled;
            status.last_error.clone_from(&self.last_error);
            changed
        });
    }

    /// One step: wait for events (or a control message, or the checkpoint
    /// timer), take a batch, apply it.
    async fn process(&mut self) {
        if self.pending.is_empty() && self.pending_passed.is_none() {
            // Events left from the last catch-up page need no wait.
            self.subscription
                .take_buffered(self.config.batch_size, &mut self.pending);
            if self.pending.is_empty() {
                if let Some(at) = self.read_retry_at {
                    if Instant::now() < at {
                        wait_until(&self.interrupt, at).await;
                        return;
                    }
                    self.read_retry_at = None;
                }
                let interrupt = Arc::clone(&self.interrupt);
                let deadline = (self.position > self.checkpoint && self.saving.is_none())
                    .then(|| self.last_save + self.config.checkpoint_interval);
                let woke = tokio::select! {
                    biased;
                    () = interrupt.notified() => Woke::Interrupted,
                    result = save_finished(&mut self.saving) => Woke::Saved(result),
                    () = sleep_until_some(deadline) => Woke::CheckpointDue,
                    delivery = self.subscription.next_delivery() => Woke::Delivery(delivery),
                };
                match woke {
                    Woke::Interrupted => return,
                    Woke::Saved(result) => {
                        if let Some(saving) = self.saving.take() {
                            self.saved(saving.position, saving.events, result);
                        }
                        return;
                    }
                    Woke::CheckpointDue => {
                        self.start_save().await;
                        return;
                    }
                    Woke::Delivery(delivery) => {
                        if !self.take(delivery) {
                            return;
                        }
                    }
                }
            }
            self.fill_batch();
        }
        if let Some(retry) = self.retry {
            if Instant::now() < retry.at {
                wait_until(&self.interrupt, retry.at).await;
                return;
            }
        }
        self.apply_pending().await;
        self.collect_save().await;
        if self.saving.is_none()
            && self.position > self.checkpoint
            && (self.unsaved >= self.config.checkpoint_every_events
                || self.last_save.elapsed() >= self.config.checkpoint_interval)
        {
            self.start_save().await;
        }
    }

    /// Tops the batch up with what the subscription has without waiting: the
    /// rest of the current page in one move, then (if the batch has room) the
    /// next page, which the store answers at once.
    fn fill_batch(&mut self) {
        while self.pending.len() < self.config.batch_size && self.pending_passed.is_none() {
            let room = self.config.batch_size - self.pending.len();
            if self.subscription.take_buffered(room, &mut self.pending) > 0 {
                continue;
            }
            let Some(delivery) = self.subscription.try_next_delivery() else {
                break;
            };
            if !self.take(delivery) {
                break;
            }
        }
    }

    /// Queues one delivery; false when there is nothing to apply.
    fn take(&mut self, delivery: Result<Delivery, SubscriptionError>) -> bool {
        match delivery {
            Ok(Delivery::Event(event)) => {
                self.pending.push_back(event);
                true
            }
            Ok(Delivery::Passed(position)) => {
                self.pending_passed = Some(position);
                true
            }
            Ok(Delivery::End) => {
                info!(projection = %self.config.name, "the store's live feed closed and every event was handled; the projection ended");
                self.ended = true;
                false
            }
            Err(error) => {
                warn!(projection = %self.config.name, %error, "reading the log failed; retrying");
                self.last_error = Some(ProjectionFailure {
                    position: self.position,
                    error: error.to_string(),
                    attempts: 1,
                });
                self.read_retry_at = Some(Instant::now() + READ_RETRY_DELAY);
                false
            }
        }
    }

    async fn apply_pending(&mut self) {
        while !self.pending.is_empty() {
            let attempt = self.retry.map_or(1, |retry| retry.attempts + 1);
            let applied = self
                .runner
                .apply(self.pending.make_contiguous(), attempt)
                .await;
            if applied.count > 0 {
                self.position = self.pending[applied.count - 1].position;
                self.pending.drain(..applied.count);
                self.events_handled += applied.count as u64;
                self.unsaved += applied.count as u64;
                self.retry = None;
            }
            let Some(error) = applied.error else {
                continue;
            };
            // Attempts count per event: once earlier events of the batch
            // applied, the failure is the failing event's first attempt.
            let attempt = if applied.count > 0 { 1 } else { attempt };
            let failing = &self.pending[0];
            let failing_position = failing.position;
            if applied.store_failed {
                error!(projection = %self.config.name, %error, position = %failing_position,
                    "committing the read model failed; the projection stops");
                self.last_error = Some(ProjectionFailure {
                    position: failing_position,
                    error: error.to_string(),
                    attempts: attempt,
                });
                self.failed = true;
                // As on any failure: a failed actor is not scheduled again,
                // so the save under way is collected now or never.
                self.settle_save().await;
                return;
            }
            match self.config.failure_policy {
                FailurePolicy::SkipAndRecord => {
                    warn!(projection = %self.config.name, position = %failing_position,
                        event_id = %failing.event_id, stream = %failing.stream_id,
                        event_type = %failing.event_type, %error,
                        "projection handler failed; skipping the event and recording it");
                    let skipped = SkippedEvent {
                        position: failing_position,
                        event_id: failing.event_id,
                        stream_id: failing.stream_id.clone(),
                        event_type: failing.event_type.clone(),
                        error: error.to_string(),
                    };
                    self.last_error = Some(ProjectionFailure {
                        position: failing_position,
                        error: skipped.error.clone(),
                        attempts: 1,
                    });
                    let max = self.config.max_recorded_skips;
                    self.status.send_modify(|status| {
                        status.skipped_total += 1;
                        status.skipped.push(skipped);
                        let excess = status.skipped.len().saturating_sub(max);
                        status.skipped.drain(..excess);
                    });
                    self.pending.pop_front();
                    self.position = failing_position;
                    self.unsaved += 1;
                    self.retry = None;
                }
                FailurePolicy::Retry {
                    max_attempts,
                    backoff,
                } => {
                    self.last_error = Some(ProjectionFailure {
                        position: failing_position,
                        error: error.to_string(),
                        attempts: attempt,
                    });
                    if attempt >= max_attempts {
                        error!(projection = %self.config.name, position = %failing_position,
                            attempts = attempt, %error, "projection handler kept failing; the projection stops");
                        self.failed = true;
                        self.retry = None;
                        self.save_checkpoint().await;
                        return;
                    }
                    let factor = 2u32.saturating_pow(attempt - 1);
                    let delay = backoff.saturating_mul(factor).min(MAX_BACKOFF);
                    warn!(projection = %self.config.name, position = %failing_position,
                        attempt, ?delay, %error, "projection handler failed; retrying");
                    self.retry = Some(Retry {
                        attempts: attempt,
                        at: Instant::now() + delay,
                    });
                    return;
                }
            }
        }
        if let Some(passed) = self.pending_passed.take() {
            if passed > self.position {
                self.position = passed;
            }
        }
    }

    /// Starts saving the checkpoint at the current position, without waiting
    /// for the store to make it durable: the save completes while the actor
    /// applies the next batches (a sync per save would otherwise stall a
    /// catch-up for most of its time), and [`ActorState::checkpoint`] moves
    /// once it did.
    async fn start_save(&mut self) {
        let position = self.position;
        let events = self.unsaved;
        self.unsaved = 0;
        self.last_save = Instant::now();
        match self.runner.start_checkpoint(position) {
            Ok(rest) => {
                self.saving = Some(Saving {
                    position,
                    events,
                    rest,
                });
                // Polled once now, so that the store starts on it at once.
                self.collect_save().await;
            }
            Err(error) => {
                self.saved(position, events, Err(error));
            }
        }
    }

    /// Polls the save under way once, without waiting, and records its end
    /// if it completed.
    async fn collect_save(&mut self) {
        std::future::poll_fn(|cx| {
            self.poll_save(cx);
            Poll::Ready(())
        })
        .await;
    }

    fn poll_save(&mut self, cx: &mut Context<'_>) {
        let Some(saving) = &mut self.saving else {
            return;
        };
        if let Poll::Ready(result) = saving.rest.as_mut().poll(cx) {
            let (position, events) = (saving.position, saving.events);
            self.saving = None;
            self.saved(position, events, result);
        }
    }

    /// Waits for the save under way, if any.
    async fn settle_save(&mut self) {
        if let Some(mut saving) = self.saving.take() {
            let result = saving.rest.as_mut().await;
            self.saved(saving.position, saving.events, result);
        }
    }

    /// Saves the checkpoint at the current position and waits until it is
    /// durable (after the save under way, if any); a failure is reported in
    /// the status and retried at the next save.
    async fn save_checkpoint(&mut self) -> Option<StoreError> {
        self.settle_save().await;
        let position = self.position;
        let events = self.unsaved;
        self.unsaved = 0;
        self.last_save = Instant::now();
        let result = self.runner.save_checkpoint(position).await;
        self.saved(position, events, result)
    }

    /// Records how the save of `position` ended.
    fn saved(
        &mut self,
        position: Position,
        events: u64,
        result: Result<(), StoreError>,
    ) -> Option<StoreError> {
        match result {
            Ok(()) => {
                debug!(projection = %self.config.name, %position, "checkpoint saved");
                self.checkpoint = position;
                None
            }
            Err(error) => {
                warn!(projection = %self.config.name, %position, %error, "saving the checkpoint failed");
                self.last_error = Some(ProjectionFailure {
                    position,
                    error: error.to_string(),
                    attempts: 1,
                });
                // Retried after the next batch, not at once from the timer.
                self.unsaved += events;
                self.last_save = Instant::now();
                Some(error)
            }
        }
    }

    async fn reset(&mut self) -> Result<(), ProjectionControlError> {
        // A save still under way must not land after the reset's checkpoint.
        self.settle_save().await;
        let (at_start, result) = self.runner.reset().await;
        if !at_start {
            warn!(projection = %self.config.name, error = ?result.as_ref().err(), "reset failed; the projection goes on where it was");
            return result;
        }
        info!(projection = %self.config.name, "projection reset; rebuilding from the start of the log");
        self.subscription = subscribe(
            Arc::clone(&self.store),
            Position::START,
            self.config.filter.clone(),
        )
        .with_page_size(self.config.batch_size.max(64));
        self.pending.clear();
        self.pending_passed = None;
        self.position = Position::START;
        self.checkpoint = Position::START;
        self.unsaved = 0;
        self.last_save = Instant::now();
        self.events_handled = 0;
        self.retry = None;
        self.read_retry_at = None;
        self.last_error = None;
        self.failed = false;
        self.ended = false;
        self.status.send_modify(|status| {
            status.skipped_total = 0;
            status.skipped.clear();
        });
        if let Err(error) = &result {
            warn!(projection = %self.config.name, %error, "reset moved the checkpoint to the start but did not finish; rebuilding anyway");
            self.last_error = Some(ProjectionFailure {
                position: Position::START,
                error: error.to_string(),
                attempts: 1,
            });
        }
        result
    }
}

enum Woke {
    Interrupted,
    Saved(Result<(), StoreError>),
    CheckpointDue,
    Delivery(Result<Delivery, SubscriptionError>),
}

/// Waits until `at` unless a control message arrives first. A free function
/// over the `Notify` alone: borrowing the whole state across the await would
/// need the state to be `Sync`.
async fn wait_until(interrupt: &Notify, at: Instant) {
    tokio::select! {
        biased;
        () = interrupt.notified() => {}
        () = sleep_until(at) => {}
    }
}

/// Completes the save under way; never completes when there is none.
async fn save_finished(saving: &mut Option<Saving>) -> Result<(), StoreError> {
    match saving {
        Some(saving) => saving.rest.as_mut().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

impl Actor for ProjectionActor {
    type Msg = ProjectionMessage;
    type State = ActorState;
    type Arguments = ActorState;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: ActorState,
    ) -> Result<ActorState, ActorProcessingErr> {
        Ok(state)
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut ActorState,
    ) -> Result<(), ActorProcessingErr> {
        info!(projection = %state.config.name, position = %state.position, filter = ?state.config.filter, "projection started");
        if state.position > state.store.head_position() {
            warn!(projection = %state.config.name, checkpoint = %state.position,
                head = %state.store.head_position(),
                "the checkpoint is beyond the store's head; was the store replaced?");
        }
        state.schedule(&myself);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut ActorState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ProjectionMessage::Process => {
                state.process_scheduled = false;
                if state.runnable() {
                    state.process().await;
                    if state.finished() {
                        // Nothing schedules the actor again once it ended, so
                        // a save under way would never be collected and the
                        // status would show a stale checkpoint forever.
                        state.settle_save().await;
                    }
                }
            }
            ProjectionMessage::Pause(reply) => {
                if !state.stopped {
                    state.paused = true;
                    if state.position > state.checkpoint {
                        state.save_checkpoint().await;
                    }
                    debug!(projection = %state.config.name, position = %state.position, "paused");
                }
                // Published before the reply, so that the caller's next
                // status or wait_for already sees the change.
                state.publish();
                let _ = reply.send(());
            }
            ProjectionMessage::Resume(reply) => {
                if !state.stopped {
                    state.paused = false;
                    if state.failed {
                        // A fresh series of tries of the failing event.
                        state.failed = false;
                        state.retry = None;
                    }
                    debug!(projection = %state.config.name, position = %state.position, "resumed");
                }
                state.publish();
                let _ = reply.send(());
            }
            ProjectionMessage::Reset(reply) => {
                let result = if state.stopped {
                    Err(ProjectionControlError::NotRunning {
                        name: state.config.name.clone(),
                        state: ProjectionState::Stopped,
                        last_error: None,
                    })
                } else {
                    state.reset().await
                };
                state.publish();
                let _ = reply.send(result);
            }
            ProjectionMessage::Shutdown(reply) => {
                let result = match state.save_checkpoint().await {
                    None => Ok(state.checkpoint),
                    Some(error) => Err(error),
                };
                info!(projection = %state.config.name, checkpoint = %state.checkpoint, "projection stopped");
                state.stopped = true;
                state.publish();
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
                myself.stop(None);
                return Ok(());
            }
        }
        state.publish();
        state.schedule(&myself);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ExpectedVersion, NewEvent, StreamId};
    use crate::store::memory::MemoryStore;
    use crate::ProjectionHandle;
    use tokio::sync::Semaphore;

    /// Applies every event before `fail_from`; the commit of a batch that
    /// reaches it fails, as a sled commit can. Checkpoint saves wait at
    /// `gate`, which opens a moment after that failure: the save under way
    /// completes once the projection already stopped handling.
    struct FailingCommit {
        fail_from: Position,
        gate: Arc<Semaphore>,
    }

    #[async_trait]
    impl Runner for FailingCommit {
        async fn apply(&mut self, events: &[RecordedEvent], _attempt: u32) -> Applied {
            if events.iter().any(|event| event.position >= self.fail_from) {
                let gate = Arc::clone(&self.gate);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    gate.add_permits(100);
                });
                return Applied {
                    count: 0,
                    error: Some(ProjectionError::handler("the commit failed")),
                    store_failed: true,
                };
            }
            Applied {
                count: events.len(),
                error: None,
                store_failed: false,
            }
        }

        fn start_checkpoint(&mut self, _position: Position) -> Result<SaveCheckpoint, StoreError> {
            let gate = Arc::clone(&self.gate);
            Ok(Box::pin(async move {
                gate.acquire()
                    .await
                    .map_err(|_| StoreError::Closed)?
                    .forget();
                Ok(())
            }))
        }

        async fn reset(&mut self) -> (bool, Result<(), ProjectionControlError>) {
            (false, Ok(()))
        }
    }

    #[tokio::test]
    async fn a_failed_commit_waits_for_the_save_under_way() {
        let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
        let stream = StreamId::new("order-1").unwrap();
        let events = (0..20)
            .map(|_| NewEvent::new("Happened", Vec::new()))
            .collect();
        let last = store
            .append(&stream, ExpectedVersion::Any, events)
            .await
            .unwrap()
            .last_position;
        let config = ProjectionConfig::new("failing")
            .checkpoint_every(10, Duration::from_secs(3600))
            .batch_size(5);
        let gate = Arc::new(Semaphore::new(0));
        let runner = FailingCommit {
            fail_from: Position(16),
            gate: Arc::clone(&gate),
        };
        let handle = ProjectionHandle::start(store, config, Box::new(runner), Position::START)
            .await
            .unwrap();
        // The save of position 10 is under way when the batch 16..=20 fails.
        assert!(matches!(
            handle.wait_for(last, Duration::from_secs(5)).await,
            Err(ProjectionControlError::NotRunning {
                state: ProjectionState::Failed,
                ..
            })
        ));
        let status = handle.status();
        assert_eq!(
            (status.position, status.checkpoint),
            (Position(15), Position(10))
        );
        assert_eq!(handle.shutdown().await.unwrap(), Position(15));
    }
}
