//! The runner: what the projection actor drives, a user's projection plus
//! where its checkpoint and read model live; and the plain [`Projection`]'s
//! runner (at least once, checkpoint in the store).

use std::any::Any;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use tracing::warn;

use crate::error::{panic_message, ProjectionError, StoreError};
use crate::event::{Position, RecordedEvent};
use crate::projection::ProjectionControlError;
use crate::projection::{Projection, ProjectionContext};
use crate::store::EventStore;

/// How many events of a batch a runner applied, and why it stopped early.
#[derive(Debug)]
pub(crate) struct Applied {
    pub(crate) count: usize,
    pub(crate) error: Option<ProjectionError>,
    /// The failure is the store's, not the handler's (a sled commit failed):
    /// the projection stops rather than skip an event it never applied.
    pub(crate) store_failed: bool,
}

impl Applied {
    /// `count` events applied, then a handler's failure (`error`), if any.
    pub(crate) fn handled(count: usize, error: Option<ProjectionError>) -> Self {
        Self {
            count,
            error,
            store_failed: false,
        }
    }
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
    async fn start_checkpoint(&mut self, position: Position) -> Result<SaveCheckpoint, StoreError>;

    /// Makes `position` the durable checkpoint.
    async fn save_checkpoint(&mut self, position: Position) -> Result<(), StoreError> {
        self.start_checkpoint(position).await?.await
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
        let Some(last) = events.last() else {
            return Applied::handled(0, None);
        };
        // One call per batch: the projection decides how to go through it.
        let context = ProjectionContext::new(Arc::clone(&self.name), last.position, attempt);
        let (count, error) =
            match CatchUnwind(pin!(self.projection.handle_batch(events, &context))).await {
                Ok(Ok(())) => (events.len(), None),
                // The failing event is one of the batch.
                Ok(Err(failure)) => {
                    if failure.applied >= events.len() {
                        // A contract breach of the override: the failing
                        // event must be one of the batch. The last is taken
                        // as failing, so it may be handled again.
                        warn!(projection = %self.name, applied = failure.applied,
                            batch = events.len(),
                            "handle_batch failed with an applied count outside its batch; \
                             retrying its last event");
                    }
                    (failure.applied.min(events.len() - 1), Some(failure.error))
                }
                Err(panic) => (0, Some(ProjectionError::Panicked(panic_message(&*panic)))),
            };
        Applied::handled(count, error)
    }

    async fn start_checkpoint(&mut self, position: Position) -> Result<SaveCheckpoint, StoreError> {
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
        let result = caught(self.projection.reset()).await.map_err(Into::into);
        (true, result)
    }
}

/// Runs a handler's future, a panic in it turned into
/// [`ProjectionError::Panicked`].
pub(crate) async fn caught<T>(
    future: impl Future<Output = Result<T, ProjectionError>>,
) -> Result<T, ProjectionError> {
    match CatchUnwind(pin!(future)).await {
        Ok(result) => result,
        Err(panic) => Err(ProjectionError::Panicked(panic_message(&*panic))),
    }
}

/// Polls a (pinned) future, turning a panic into an `Err`. The projection's
/// state may be half-updated after a panic, as after any caught panic; the
/// failure policy decides whether it is tried again.
struct CatchUnwind<F>(F);

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
