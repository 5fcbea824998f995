//! [`ProjectionHandle`]: how users start, watch and steer a projection
//! actor without touching ractor. Status and `wait_for` read a watch channel
//! the actor publishes to, so they answer at once even while a handler is
//! busy; pause, resume, reset and shutdown are messages to the actor.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::concurrency::JoinHandle;
use ractor::{Actor, ActorRef, RpcReplyPort};
use tokio::sync::{watch, Notify};
use tracing::instrument;

use crate::error::StoreError;
use crate::event::Position;
use crate::projection::actor::{ProjectionActor, ProjectionMessage};
use crate::projection::lease::NameLease;
use crate::projection::read_model::ReadModelRunner;
use crate::projection::runner::{PlainRunner, Runner};
use crate::projection::sled::SledReadModel;
use crate::projection::state::ActorState;
use crate::projection::ProjectionControlError;
use crate::projection::{
    Projection, ProjectionConfig, ProjectionFailure, ProjectionState, ProjectionStatus, ReadModel,
    SledProjection,
};
use crate::store::sled::SledStore;
use crate::store::{EventStore, ReadModelStore};

/// A cheap, cloneable handle to a running projection actor.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use annals::{EventStore, ExpectedVersion, MemoryStore, NewEvent, Projection, ProjectionConfig, ProjectionHandle, RecordedEvent, StreamId};
/// use annals::projection::{ProjectionContext, ProjectionError};
///
/// struct Count(u64);
///
/// impl Projection for Count {
///     async fn handle(&mut self, _: &RecordedEvent, _: &ProjectionContext) -> Result<(), ProjectionError> {
///         self.0 += 1;
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
/// let counter = ProjectionHandle::spawn(store.clone(), ProjectionConfig::builder("count").build()?, Count(0)).await?;
/// let appended = store
///     .append(&StreamId::new("order-1")?, ExpectedVersion::Any, vec![NewEvent::new("OrderPlaced", vec![])])
///     .await?;
/// // Read-your-writes: returns once the projection handled the event.
/// counter.wait_for(appended.last_position, Duration::from_secs(5)).await?;
/// assert_eq!(counter.status().lag, 0);
/// counter.shutdown().await?; // saves the checkpoint
/// # Ok(())
/// # }
/// ```
///
/// The actor runs until [`ProjectionHandle::shutdown`], which saves its
/// checkpoint. If every handle is dropped without it, the actor is asked to
/// shut down the same way, but nothing waits for it: call `shutdown` to know
/// the checkpoint was saved. One running projection per name and store:
/// starting a second fails with [`ProjectionControlError::AlreadyRunning`].
#[derive(Clone)]
pub struct ProjectionHandle {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    actor: ActorRef<ProjectionMessage>,
    status: watch::Receiver<ProjectionStatus>,
    interrupt: Arc<Notify>,
    store: Arc<dyn EventStore>,
    join: Mutex<Option<JoinHandle<()>>>,
    /// The actor's answer to the first shutdown, so that later calls return
    /// it rather than a stale checkpoint. A tokio mutex because concurrent
    /// calls must wait for the first to finish, across its awaits.
    shutdown: tokio::sync::Mutex<Option<Result<Position, StoreError>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.actor.cast(ProjectionMessage::Shutdown(None)).is_ok() {
            self.interrupt.notify_one();
        }
    }
}

impl fmt::Debug for ProjectionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProjectionHandle")
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

impl ProjectionHandle {
    /// Starts a [`Projection`] after its checkpoint (named
    /// [`ProjectionConfig::name`]; from the start of the log if none).
    ///
    /// Guarantees: every event after the checkpoint that passes the filter
    /// is handled, in position order, at least once (events after the last
    /// saved checkpoint are handled again after a crash).
    ///
    /// # Errors
    /// [`ProjectionControlError::Read`] when the checkpoint cannot be loaded,
    /// [`ProjectionControlError::AlreadyRunning`] when one of that name runs
    /// on this store, [`ProjectionControlError::Spawn`] when the actor cannot
    /// start.
    #[instrument(skip_all, fields(projection = %config.name))]
    pub async fn spawn<P: Projection>(
        store: Arc<dyn EventStore>,
        config: ProjectionConfig,
        projection: P,
    ) -> Result<Self, ProjectionControlError> {
        let lease = NameLease::acquire_everywhere(&store, &config.name).await?;
        let checkpoint = store
            .load_checkpoint(&config.name)
            .await?
            .unwrap_or(Position::START);
        let runner = PlainRunner::new(Arc::clone(&store), config.name.as_str().into(), projection);
        Self::start_leased(store, config, Box::new(runner), checkpoint, lease).await
    }

    /// Starts a [`SledProjection`] whose read model lives in trees of
    /// `store`'s sled database, after its checkpoint: see
    /// [`ProjectionHandle::spawn_read_model`], which it calls.
    ///
    /// # Errors
    /// As [`ProjectionHandle::spawn_read_model`];
    /// [`ProjectionControlError::InvalidInput`] also for a tree name that is
    /// empty or reserved by the store.
    #[instrument(skip_all, fields(projection = %config.name))]
    pub async fn spawn_sled<P: SledProjection>(
        store: Arc<SledStore>,
        config: ProjectionConfig,
        projection: P,
    ) -> Result<Self, ProjectionControlError> {
        Self::spawn_read_model(store, config, SledReadModel(projection)).await
    }

    /// Starts a [`ReadModel`] on a store with the read-model capability
    /// ([`ReadModelStore`]), after its checkpoint.
    ///
    /// Guarantees: each batch of events is committed to the read model in
    /// one store transaction together with the checkpoint, so after any
    /// crash the read model holds exactly the events up to its checkpoint:
    /// none lost, none applied twice. Every commit is fenced on the
    /// checkpoint this projection last committed: if anything else moved it,
    /// the commit writes nothing and the projection stops as failed
    /// ([`StoreError::CheckpointMoved`]). On the sled store, commits become
    /// durable with the next checkpoint save (every N events or T ms, and at
    /// shutdown); a crash before that rolls read model and checkpoint back
    /// together, and the events are applied again.
    ///
    /// # Errors
    /// [`ProjectionControlError::InvalidInput`] for a table the store
    /// refuses;
    /// [`ProjectionControlError::Store`] when the store cannot open the
    /// tables, [`ProjectionControlError::Read`] when the checkpoint cannot
    /// be read; [`ProjectionControlError::AlreadyRunning`] and
    /// [`ProjectionControlError::Spawn`] as for [`ProjectionHandle::spawn`].
    #[instrument(skip_all, fields(projection = %config.name))]
    pub async fn spawn_read_model<S: ReadModelStore, P: ReadModel<S>>(
        store: Arc<S>,
        config: ProjectionConfig,
        projection: P,
    ) -> Result<Self, ProjectionControlError> {
        let dyn_store: Arc<dyn EventStore> = Arc::clone(&store) as Arc<dyn EventStore>;
        let lease = NameLease::acquire_everywhere(&dyn_store, &config.name).await?;
        let (runner, checkpoint) =
            ReadModelRunner::open(Arc::clone(&store), config.name.as_str().into(), projection)
                .await?;
        Self::start_leased(store, config, Box::new(runner), checkpoint, lease).await
    }

    #[cfg(test)]
    pub(crate) async fn start(
        store: Arc<dyn EventStore>,
        config: ProjectionConfig,
        runner: Box<dyn Runner>,
        checkpoint: Position,
    ) -> Result<Self, ProjectionControlError> {
        let lease = NameLease::acquire(&store, &config.name)?;
        Self::start_leased(store, config, runner, checkpoint, lease).await
    }

    /// Starts the actor of a projection whose lease is taken and whose
    /// checkpoint was read after it.
    pub(crate) async fn start_leased(
        store: Arc<dyn EventStore>,
        config: ProjectionConfig,
        runner: Box<dyn Runner>,
        checkpoint: Position,
        lease: NameLease,
    ) -> Result<Self, ProjectionControlError> {
        let interrupt = Arc::new(Notify::new());
        let name = config.name.clone();
        let (state, status) = ActorState::new(
            Arc::clone(&store),
            config,
            runner,
            checkpoint,
            Arc::clone(&interrupt),
            lease,
        );
        let (actor, join) = Actor::spawn(None, ProjectionActor, state)
            .await
            .map_err(|e| ProjectionControlError::Spawn(e.to_string()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                name,
                actor,
                status,
                interrupt,
                store,
                join: Mutex::new(Some(join)),
                shutdown: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// The projection's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The projection's progress now: its state, position, checkpoint, lag
    /// behind the store's head, last error and skipped events. Answers at
    /// once, even while the handler is busy.
    pub fn status(&self) -> ProjectionStatus {
        let mut status = self.inner.status.borrow().clone();
        if self.inner.status.has_changed().is_err() && status.state != ProjectionState::Stopped {
            // The actor is gone without shutting down: it died.
            status.state = ProjectionState::Failed;
            status.last_error.get_or_insert(ProjectionFailure {
                position: status.position,
                error: "the projection actor stopped unexpectedly".to_owned(),
                attempts: 0,
            });
        }
        status.head = self.inner.store.head_position();
        status.lag = status.head.0.saturating_sub(status.position.0);
        status
    }

    /// Waits until the projection has handled every matching event up to
    /// and including `position` (for read-your-writes: pass the position an
    /// append returned). Returns the position reached.
    ///
    /// # Errors
    /// [`ProjectionControlError::Timeout`] when `timeout` passed first (the
    /// projection keeps going), [`ProjectionControlError::NotRunning`] when
    /// it stopped, failed or ended (the store shut down) before getting
    /// there. A paused projection is waited for, until the timeout.
    pub async fn wait_for(
        &self,
        position: Position,
        timeout: Duration,
    ) -> Result<Position, ProjectionControlError> {
        let mut receiver = self.inner.status.clone();
        let waited = tokio::time::timeout(
            timeout,
            receiver.wait_for(|status| {
                status.position >= position
                    || matches!(
                        status.state,
                        ProjectionState::Stopped | ProjectionState::Failed | ProjectionState::Ended
                    )
            }),
        )
        .await;
        match waited {
            Ok(Ok(status)) if status.position >= position => Ok(status.position),
            Ok(_) => Err(self.not_running()),
            Err(_) => Err(ProjectionControlError::Timeout {
                name: self.inner.name.clone(),
                target: position,
                reached: self.inner.status.borrow().position,
                timeout,
            }),
        }
    }

    /// Pauses the projection. Returns once no handler runs and none will
    /// until [`ProjectionHandle::resume`] (it waits for the event being
    /// handled). The checkpoint is saved. Appends go on; the projection
    /// catches up from the store after it resumes.
    ///
    /// # Errors
    /// [`ProjectionControlError::NotRunning`] when the actor is gone.
    pub async fn pause(&self) -> Result<(), ProjectionControlError> {
        self.call(ProjectionMessage::Pause).await
    }

    /// Resumes a paused projection; a failed one tries its failing event
    /// again, with a fresh count of attempts.
    ///
    /// # Errors
    /// [`ProjectionControlError::NotRunning`] when the actor is gone.
    pub async fn resume(&self) -> Result<(), ProjectionControlError> {
        self.call(ProjectionMessage::Resume).await
    }

    /// Erases the read model ([`Projection::reset`], or every key of a
    /// [`SledProjection`]'s trees), moves the checkpoint back to the start
    /// and rebuilds from the first event. A failed projection runs again; a
    /// paused one stays paused. Like pause, it waits for the event being
    /// handled.
    ///
    /// If it fails before the checkpoint moved, nothing changed and the
    /// projection goes on where it was. If the checkpoint moved but a later
    /// step failed (a plain projection's reset hook, or the final sync), the
    /// projection rebuilds anyway, since its checkpoint now says so; the
    /// error is returned and kept in the status.
    ///
    /// # Errors
    /// [`ProjectionControlError::Store`] when the checkpoint or read model
    /// cannot be written, [`ProjectionControlError::Projection`] when the
    /// projection's reset hook fails, and
    /// [`ProjectionControlError::NotRunning`] when the actor is gone.
    pub async fn reset(&self) -> Result<(), ProjectionControlError> {
        self.call(ProjectionMessage::Reset).await?
    }

    /// Stops the projection after saving its checkpoint (for a sled read
    /// model: syncing it), and waits for the actor to end (and so for the
    /// event being handled, if any). Returns the saved
    /// checkpoint. Calling it again (from any clone) returns the same result
    /// as the first call, success or failure.
    ///
    /// Shut projections down before their store: the final save needs the
    /// store, and a shut-down sled store refuses it
    /// ([`StoreError::Closed`]), leaving the checkpoint where the last
    /// successful save put it.
    ///
    /// # Errors
    /// [`ProjectionControlError::Store`] when the checkpoint cannot be saved
    /// (the actor stops anyway), [`ProjectionControlError::NotRunning`] when
    /// the actor had died.
    pub async fn shutdown(&self) -> Result<Position, ProjectionControlError> {
        let mut first = self.inner.shutdown.lock().await;
        if let Some(result) = &*first {
            return result.clone().map_err(Into::into);
        }
        let result = match self
            .call(|reply| ProjectionMessage::Shutdown(Some(reply)))
            .await
        {
            Ok(result) => {
                *first = Some(result.clone());
                result.map_err(Into::into)
            }
            Err(error) => Err(error),
        };
        let join = self
            .inner
            .join
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(join) = join {
            let _ = join.await;
        }
        result
    }

    async fn call<T>(
        &self,
        message: impl FnOnce(RpcReplyPort<T>) -> ProjectionMessage,
    ) -> Result<T, ProjectionControlError> {
        let (sender, receiver) = ractor::concurrency::oneshot();
        self.inner
            .actor
            .cast(message(sender.into()))
            .map_err(|_| self.not_running())?;
        // After queueing, so that an actor waiting for events wakes up and
        // finds the message (see `ActorState::process`).
        self.inner.interrupt.notify_one();
        receiver.await.map_err(|_| self.not_running())
    }

    fn not_running(&self) -> ProjectionControlError {
        let status = self.status();
        ProjectionControlError::NotRunning {
            name: self.inner.name.clone(),
            state: status.state,
            last_error: status.last_error.map(|failure| failure.error),
        }
    }
}
