//! The projection's state machine: what the actor holds and does between
//! messages (taking batches from the subscription, applying them through
//! the runner, the failure policy, checkpoint saves, the status it
//! publishes).

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ractor::ActorRef;
use tokio::sync::{watch, Notify};
use tokio::time::{sleep_until, Instant};
use tracing::{debug, error, info, warn};

use crate::error::{StoreError, SubscriptionError};
use crate::event::{Position, RecordedEvent};
use crate::projection::actor::ProjectionMessage;
use crate::projection::lease::NameLease;
use crate::projection::runner::{Runner, SaveCheckpoint};
use crate::projection::subscription::{subscribe, Delivery, Subscription};
use crate::projection::ProjectionControlError;
use crate::projection::{
    FailurePolicy, ProjectionConfig, ProjectionFailure, ProjectionState, ProjectionStatus,
    SkippedEvent,
};
use crate::store::EventStore;

/// The longest wait between retries of a failing handler.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The wait before reading again after a failed catch-up read.
const READ_RETRY_DELAY: Duration = Duration::from_millis(200);

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

/// Where the actor is in its life, and whether its next step is already
/// asked for: one value, so that paused, failed and stopped cannot hold at
/// once, and a `Process` message can be queued only where one can be
/// handled. (That the store's live feed closed is the subscription's to
/// say: a paused or failed projection can have events left to apply after
/// it.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Handling events as they come. `queued`: a `Process` message is in
    /// the mailbox (at most one is).
    Running { queued: bool },
    /// Paused by its handle. `queued`: the `Process` message sent while it
    /// ran is still in the mailbox; a resume before it arrives needs no
    /// other.
    Paused { queued: bool },
    /// Its handler kept failing, or the read model's commit failed. Entered
    /// while handling a `Process` message, so none is queued.
    Failed,
    /// Shut down; the actor stops.
    Stopped,
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
    phase: Phase,
    metrics: crate::metrics::ProjectionMetrics,
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
            .with_page_size(config.read_page_size());
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
            metrics: crate::metrics::ProjectionMetrics::new(&config.name),
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
            phase: Phase::Running { queued: false },
            _lease: lease,
        };
        (state, receiver)
    }

    /// Logs the start and schedules the first step.
    pub(super) fn started(&mut self, myself: &ActorRef<ProjectionMessage>) {
        info!(projection = %self.config.name, position = %self.position, filter = ?self.config.filter, "projection started");
        if self.position > self.store.head_position() {
            warn!(projection = %self.config.name, checkpoint = %self.position,
                head = %self.store.head_position(),
                "the checkpoint is beyond the store's head; was the store replaced?");
        }
        self.schedule(myself);
    }

    /// Handles one `Process` message: one step, if the projection runs.
    pub(super) async fn on_process(&mut self) {
        if let Phase::Running { queued } | Phase::Paused { queued } = &mut self.phase {
            *queued = false;
        }
        if self.runnable() {
            self.process().await;
            if self.finished() {
                // Nothing schedules the actor again once it ended, so a save
                // under way would never be collected and the status would
                // show a stale checkpoint forever.
                self.settle_save().await;
            }
        }
    }

    /// Pauses a running projection (a failed one stays failed: its status
    /// says more) and saves its checkpoint.
    pub(super) async fn pause(&mut self) {
        match self.phase {
            Phase::Stopped => return,
            Phase::Running { queued } => self.phase = Phase::Paused { queued },
            Phase::Paused { .. } | Phase::Failed => {}
        }
        if self.position > self.checkpoint {
            self.save_checkpoint().await;
        }
        debug!(projection = %self.config.name, position = %self.position, "paused");
    }

    /// Resumes a paused projection; a failed one gets a fresh series of tries
    /// of its failing event.
    pub(super) fn resume(&mut self) {
        self.phase = match self.phase {
            Phase::Stopped | Phase::Running { .. } => return,
            Phase::Failed => {
                self.retry = None;
                Phase::Running { queued: false }
            }
            Phase::Paused { queued } => Phase::Running { queued },
        };
        debug!(projection = %self.config.name, position = %self.position, "resumed");
    }

    /// Handles a `Reset` message.
    pub(super) async fn control_reset(&mut self) -> Result<(), ProjectionControlError> {
        if self.phase == Phase::Stopped {
            return Err(ProjectionControlError::NotRunning {
                name: self.config.name.clone(),
                state: ProjectionState::Stopped,
                last_error: None,
            });
        }
        self.reset().await
    }

    /// Saves the checkpoint and enters its last phase; returns the saved
    /// checkpoint.
    pub(super) async fn stop(&mut self) -> Result<Position, StoreError> {
        let result = match self.save_checkpoint().await {
            None => Ok(self.checkpoint),
            Some(error) => Err(error),
        };
        info!(projection = %self.config.name, checkpoint = %self.checkpoint, "projection stopped");
        self.phase = Phase::Stopped;
        result
    }

    fn runnable(&self) -> bool {
        matches!(self.phase, Phase::Running { .. }) && !self.finished()
    }

    /// The live feed closed and nothing taken from the subscription is left
    /// to apply (a batch being retried is still retried).
    fn finished(&self) -> bool {
        self.subscription.ended() && self.pending.is_empty() && self.pending_passed.is_none()
    }

    pub(super) fn schedule(&mut self, myself: &ActorRef<ProjectionMessage>) {
        if self.runnable() && self.phase == (Phase::Running { queued: false }) {
            // Fails only if the actor is stopping, when there is nothing to do.
            if myself.cast(ProjectionMessage::Process).is_ok() {
                self.phase = Phase::Running { queued: true };
            }
        }
    }

    pub(super) fn publish(&self) {
        let head = self.store.head_position();
        self.metrics
            .progress(self.position, self.checkpoint, head, self.events_handled);
        let state = match self.phase {
            Phase::Stopped => ProjectionState::Stopped,
            Phase::Failed => ProjectionState::Failed,
            _ if self.finished() => ProjectionState::Ended,
            Phase::Paused { .. } => ProjectionState::Paused,
            Phase::Running { .. } => ProjectionState::Running,
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
    /// next page if it is ready (the embedded store answers a read at once;
    /// a page still being read ahead waits for the next step).
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
                // The subscription now reports it ended (`finished`).
                info!(projection = %self.config.name, "the store's live feed closed and every event was handled; the projection ended");
                false
            }
            Err(error) => {
                warn!(projection = %self.config.name, %error, "reading the log failed; retrying");
                self.metrics.failed();
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
            self.metrics.failed();
            if applied.store_failed {
                error!(projection = %self.config.name, %error, position = %failing_position,
                    "committing the read model failed; the projection stops");
                self.last_error = Some(ProjectionFailure {
                    position: failing_position,
                    error: error.to_string(),
                    attempts: attempt,
                });
                self.phase = Phase::Failed;
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
                    self.metrics.skipped();
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
                        self.phase = Phase::Failed;
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
        match self.runner.start_checkpoint(position).await {
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
                self.metrics.failed();
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
        .with_page_size(self.config.read_page_size());
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
        if self.phase == Phase::Failed {
            // Failed while handling a `Process` message: none is queued.
            self.phase = Phase::Running { queued: false };
        }
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
